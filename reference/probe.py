"""A probe: which module of the reference model to run on which seeded inputs. Each family's
reference module lists its probes; the golden harness runs them on the reference and the port."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Probe:
    """Run `module` (a dotted path from the model root) on these inputs; with `method`, call that
    method of it instead (a video VAE's `encode` / `decode` loop, which is no module's forward)."""

    module: str
    args: list[Any]
    kwargs: dict[str, Any] = field(default_factory=dict)
    method: str | None = None
