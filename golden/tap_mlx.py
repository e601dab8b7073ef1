"""Tap every module of an MLX model without touching model code: each instance's class is swapped
for a recording subclass while the tap is on. Also calls one module on recorded inputs."""
from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from vidport.golden.records import CallNamer
from vidport.runtime.cpu_threads import one_at_a_time

_TAPPED: dict[type, type] = {}


def _tapped_class(cls: type) -> type:
    if cls not in _TAPPED:
        def __call__(self, *args, **kwargs):
            output = cls.__call__(self, *args, **kwargs)
            recorder = _TapState.active
            if recorder is not None:
                recorder.append((recorder_namer(self.tap_name), self, output))
            return output

        _TAPPED[cls] = type(cls.__name__, (cls,), {"__call__": __call__})
    return _TAPPED[cls]


class _TapState:
    active: list | None = None
    namer: CallNamer | None = None


def recorder_namer(name: str) -> str:
    assert _TapState.namer is not None
    return _TapState.namer(name)


def modules_by_name(model: nn.Module) -> dict[str, nn.Module]:
    """Every module by its dotted path; the model itself is "" (as in the torch capture)."""
    return {name: module for name, module in model.named_modules()}


@contextlib.contextmanager
def tap(model: nn.Module) -> Iterator[list[tuple[str, nn.Module, Any]]]:
    """Record (call name, module, output) of every module call made inside the block."""
    modules = modules_by_name(model)
    originals = {}
    for name, module in modules.items():
        originals[name] = type(module)
        object.__setattr__(module, "tap_name", name)
        module.__class__ = _tapped_class(type(module))
    records: list[tuple[str, nn.Module, Any]] = []
    _TapState.active, _TapState.namer = records, CallNamer()
    try:
        with one_at_a_time():  # calls recorded in order: a batch's parts in turn, not on threads
            yield records
    finally:
        _TapState.active, _TapState.namer = None, None
        for name, module in modules.items():
            module.__class__ = originals[name]


def compute_dtype(model: nn.Module) -> mx.Dtype:
    from mlx.utils import tree_flatten

    params = tree_flatten(model.parameters())
    return params[0][1].dtype if params else mx.float32


def output_channels_last(module: nn.Module) -> bool:
    return bool(getattr(module, "channels_last", False))


def port_inputs(module: nn.Module, args: list[Any], kwargs: dict[str, Any], dtype: mx.Dtype) -> tuple[list, dict]:
    """Recorded inputs in the layout the port module takes.

    `channels_last = True`: every tensor input (and the output) has the channel axis last.
    `channels_last = ("hidden_states", ...)`: only the named inputs do (and the output); the
    others, such as token sequences beside a feature map, keep the reference's layout.
    `float32_inputs = True`: the float inputs stay float32 whatever the weights' dtype (positions
    and timesteps, which a model computes in float32: 731.0 would read 732 in bfloat16)."""
    if getattr(module, "float32_inputs", False):
        dtype = mx.float32
    declared = getattr(module, "channels_last", False)
    if isinstance(declared, bool):
        return to_port(args, declared, dtype), {k: to_port(v, declared, dtype) for k, v in kwargs.items()}
    cls = type(module)
    cls = cls.__bases__[0] if cls in _TAPPED.values() else cls  # the model's own signature, tap on or off
    names = [n for n in inspect.signature(cls.__call__).parameters if n != "self"]
    moved = [to_port(v, i < len(names) and names[i] in declared, dtype) for i, v in enumerate(args)]
    return moved, {k: to_port(v, k in declared, dtype) for k, v in kwargs.items()}


def to_port(value: Any, channels_last: bool, dtype: mx.Dtype) -> Any:
    """A recorded (torch-layout) numpy input as the port module takes it."""
    if isinstance(value, np.ndarray):
        if channels_last and value.ndim >= 3:
            value = np.moveaxis(value, 1, -1)
        array = mx.array(np.asarray(value, order="C"))
        return array.astype(dtype) if mx.issubdtype(array.dtype, mx.floating) else array
    if isinstance(value, (list, tuple)):
        return type(value)(to_port(v, channels_last, dtype) for v in value)
    return value


def from_port(value: Any, channels_last: bool) -> np.ndarray:
    """A port output in the reference's layout, as float32 numpy."""
    if isinstance(value, (list, tuple)):
        value = value[0]
    array = np.array(value.astype(mx.float32))
    return np.moveaxis(array, -1, 1) if channels_last and array.ndim >= 3 else array


def call_with(module: nn.Module, args: list[Any], kwargs: dict[str, Any], dtype: mx.Dtype) -> np.ndarray:
    """Call a port module on the reference's recorded inputs, in the module's own layout.

    PyTorch layers often take their input by the keyword `input`; it is passed positionally.
    `return_dict` only says how diffusers packs its output (the port returns arrays): dropped.
    Another keyword the port does not take is dropped only when it is None (an unused option)."""
    args = list(args)
    params = inspect.signature(type(module).__call__).parameters
    accepted = {}
    for key, value in kwargs.items():
        if key == "input":
            args.insert(0, value)
        elif key == "return_dict" and key not in params:
            continue
        elif key in params:
            accepted[key] = value
        elif value is not None:
            raise TypeError(f"{type(module).__name__} takes no argument '{key}' that the reference passes")
    args, accepted = port_inputs(module, args, accepted, dtype)
    output = module(*args, **accepted)
    return from_port(output, output_channels_last(module))
