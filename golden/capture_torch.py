"""Run the PyTorch reference with forward hooks on every submodule and record each call."""
from __future__ import annotations

from typing import Any

import numpy as np

from vidport.reference.probe import Probe
from vidport.golden.records import Call, CallNamer


def _to_numpy(value: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return (value.float() if value.is_floating_point() else value).numpy()  # token ids stay integers
    if isinstance(value, (list, tuple)):
        return type(value)(_to_numpy(v) for v in value)
    return value


def _to_torch(value: Any) -> Any:
    import torch

    if isinstance(value, np.ndarray):
        floating = np.issubdtype(value.dtype, np.floating)
        return torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32 if floating else None))
    return value


def _first_tensor(value: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (list, tuple)):
        return next((v for v in value if isinstance(v, torch.Tensor)), None)
    if isinstance(value, dict):  # transformers ModelOutput / diffusers BaseOutput: the first field
        return next((v for v in value.values() if isinstance(v, torch.Tensor)), None)
    return getattr(value, "sample", None)


def capture_reference(model: Any, probes: list[Probe]) -> list[Call]:
    """Every module call (children before parents: the order outputs become available); the
    model itself is named "" (a probe may run the whole model)."""
    import torch

    calls: list[Call] = []
    namer = CallNamer()
    handles = []
    # Inputs are taken when a call begins: a module may change a container it was passed (the
    # Wan VAE's feature cache list), and a replay needs what the module was given.
    started: dict[str, list[tuple[list, dict]]] = {}

    def begin(name: str):
        def snapshot(module, args, kwargs):
            started.setdefault(name, []).append((_to_numpy(list(args)), {k: _to_numpy(v) for k, v in kwargs.items()}))

        return snapshot

    def hook(name: str):
        def record(module, args, kwargs, output):
            inputs, named = started[name].pop()
            tensor = _first_tensor(output)
            if tensor is None:
                return
            calls.append(Call(namer(name), name, type(module).__name__, inputs, named, _to_numpy(tensor)))

        return record

    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(begin(name), with_kwargs=True))
        handles.append(module.register_forward_hook(hook(name), with_kwargs=True))
    try:
        with torch.no_grad():
            for probe in probes:
                target = model.get_submodule(probe.module)
                run = getattr(target, probe.method) if probe.method else target
                run(*map(_to_torch, probe.args), **{k: _to_torch(v) for k, v in probe.kwargs.items()})
    finally:
        for handle in handles:
            handle.remove()
    return calls
