"""Tensors a target needs that no source carries, made from the expected shape (named in YAML)."""
from __future__ import annotations

from typing import Callable

import numpy as np

from vidport.converter.transforms import Shape

GENERATORS: dict[str, Callable[[Shape], np.ndarray]] = {}


def generator(name: str):
    def register(fn: Callable[[Shape], np.ndarray]) -> Callable[[Shape], np.ndarray]:
        GENERATORS[name] = fn
        return fn

    return register


@generator("sinusoidal_positions")
def sinusoidal_positions(shape: Shape) -> np.ndarray:
    """The [1, length, dim] sin/cos table of 'Attention is all you need' (sin on even channels)."""
    _, length, dim = shape
    position = np.arange(length, dtype=np.float32)[:, None]
    frequency = np.exp(np.arange(0, dim, 2, dtype=np.float32) * np.float32(-np.log(10000.0) / dim))
    table = np.zeros((1, length, dim), dtype=np.float32)
    table[0, :, 0::2] = np.sin(position * frequency)
    table[0, :, 1::2] = np.cos(position * frequency)
    return table
