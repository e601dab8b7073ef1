"""What the golden harness needs from a port, whatever runs it: its module names, a free run of
the probes with every module call recorded, and one module called on recorded inputs.
`open_port` picks the implementation by the converted folder's target."""
from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np

from vidport.converter.core.errors import VidportError
from vidport.reference.probe import Probe

# target name -> "module:Class" of its port
PORTS = {"mlx": "vidport.golden.port_mlx:MlxPort", "ttnn": "vidport.golden.port_ttnn:TtnnPort"}


@runtime_checkable
class Port(Protocol):
    def module_names(self) -> set[str]:
        """Dotted module paths, as the canonical model names them."""

    def run(self, probes: list[Probe]) -> tuple[dict[str, np.ndarray], set[str]]:
        """Free run: call name -> output (reference layout, float32), and each probe's last call."""

    def call(self, module: str, args: list[Any], kwargs: dict[str, Any]) -> np.ndarray:
        """Module `module` on the reference's recorded inputs; its output in the reference's layout."""


def open_port(folder: str | Path, manifest: dict[str, Any], device: bool = False) -> Port:
    target = manifest["target"]["name"]
    if target not in PORTS:
        raise VidportError(f"{folder}: verify does not run target '{target}' outputs",
                           hint=f"verify runs: {', '.join(sorted(PORTS))}")
    module, name = PORTS[target].split(":")
    return getattr(importlib.import_module(module), name).open(Path(folder), device=device)


def as_port(model: Any) -> Port:
    """A Port as is; an MLX model (what compare_port always took) wrapped as one."""
    if isinstance(model, Port):
        return model
    from vidport.golden.port_mlx import MlxPort

    return MlxPort(model)


def bind_recorded(fn: Callable, owner: str, args: list[Any], kwargs: dict[str, Any]) -> tuple[list, dict]:
    """Recorded torch call arguments as `fn` takes them: the keyword `input` (torch layers' name)
    becomes positional; a keyword `fn` does not take is dropped only when None (an unused option)."""
    args = list(args)
    params = inspect.signature(fn).parameters
    accepted = {}
    for key, value in kwargs.items():
        if key == "input" and "input" not in params:
            args.insert(0, value)
        elif key in params:
            accepted[key] = value
        elif value is not None:
            raise TypeError(f"{owner} takes no argument '{key}' that the reference passes")
    return args, accepted
