"""The MLX port: the MLX runtime model, tapped by golden/tap_mlx.py (behaviour unchanged)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vidport.reference.probe import Probe


class MlxPort:
    def __init__(self, model) -> None:
        from vidport.golden.tap_mlx import compute_dtype, modules_by_name

        self.model = model
        self.modules = modules_by_name(model)
        self.dtype = compute_dtype(model)

    @classmethod
    def open(cls, folder: Path, device: bool = False) -> "MlxPort":
        from vidport.converter.core.errors import VidportError
        from vidport.runtime import configure_cpu
        from vidport.runtime.loading import load_model

        if device:
            raise VidportError("--device is for TTNN conversions; MLX runs on this machine")
        configure_cpu()  # malloc tuned only now, after the torch reference ran; warns if MLX missed its BLAS
        return cls(load_model(folder))

    def module_names(self) -> set[str]:
        return set(self.modules)

    def run(self, probes: list[Probe]) -> tuple[dict[str, np.ndarray], set[str]]:
        from vidport.golden.compare import run_port

        return run_port(self.model, probes)

    def call(self, module: str, args: list[Any], kwargs: dict[str, Any]) -> np.ndarray:
        from vidport.golden.tap_mlx import call_with

        return call_with(self.modules[module], args, kwargs, self.dtype)
