"""What a golden run records: for every
module call in dataflow order, its inputs and output. Shared by the torch capture, the MLX tap
and the golden file, so all three speak numpy."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class Call:
    """One module call: `name` is the module path, with `#k` for its k-th repeated call."""

    name: str
    module: str
    kind: str  # the reference module's class name
    args: list[Any]
    kwargs: dict[str, Any]
    output: np.ndarray


class CallNamer:
    """Names calls the same way on both sides: path, then path#1, path#2 for repeats."""

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}

    def __call__(self, module: str) -> str:
        module = module or "(model)"  # the model itself, when a probe runs it whole
        count = self.seen.get(module, 0)
        self.seen[module] = count + 1
        return module if count == 0 else f"{module}#{count}"
