"""Find a runtime model class by the dotted name a family spec gives, and build it from a config."""
from __future__ import annotations

from typing import Any

from mlx.utils import tree_flatten

from vidport.converter.core.errors import VidportError
from vidport.converter.core.named import named_object


def runtime_class(path: str) -> type:
    return named_object(path)


def build_model(path: str, config: dict[str, Any]):
    try:
        return runtime_class(path).from_config(config)
    except (TypeError, ValueError) as err:
        raise VidportError(f"config does not fit {path}: {err}") from err


def runtime_shapes(path: str, config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the runtime model (MLX builds lazily: no weights are materialized)."""
    return {name: tuple(array.shape) for name, array in tree_flatten(build_model(path, config).parameters())}
