"""Run the PyTorch reference with forward hooks on every submodule and record each call."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from vidport.converter.core.errors import VidportError
from vidport.reference.probe import Probe
from vidport.golden.records import Call, CallNamer


def _to_numpy(value: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return (value.float() if value.is_floating_point() else value).numpy()  # token ids stay integers
    if isinstance(value, torch.device):  # a module told where to build a table (diffusers' RoPE): a plain name
        return str(value)
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


def capture_reference(model: Any, probes: list[Probe], run: Callable[..., Any] | None = None,
                      layers: tuple = ()) -> list[Call]:
    """Every module call (children before parents: the order outputs become available); the
    model itself is named "" (a probe may run the whole model).

    An official model (`run` given: how a probe runs on it) names its modules its own way: only
    the calls of modules `layers` pairs with a canonical module are kept, under that name; the
    model's own call, paired with "", takes the probe's inputs, as the port's whole-model call does."""
    import torch

    calls: list[Call] = []
    handles = []
    # Inputs are taken when a call begins: a module may change a container it was passed (the
    # Wan VAE's feature cache list), and a replay needs what the module was given.
    started: dict[str, list[tuple[list, dict]]] = {}
    recorded: list[Call] = []

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
            recorded.append(Call(name, name, type(module).__name__, inputs, named, _to_numpy(tensor)))

        return record

    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(begin(name), with_kwargs=True))
        handles.append(module.register_forward_hook(hook(name), with_kwargs=True))
    namer, paired = CallNamer(), _Pairing(layers)
    try:
        with torch.no_grad():
            for probe in probes:
                args, kwargs = list(map(_to_torch, probe.args)), {k: _to_torch(v) for k, v in probe.kwargs.items()}
                if run is not None:
                    run(probe, args, kwargs)
                else:
                    target = model.get_submodule(probe.module)
                    (getattr(target, probe.method) if probe.method else target)(*args, **kwargs)
                for call in recorded:
                    module = paired(call.module) if run is not None else call.module
                    if module is None:
                        continue
                    whole = run is not None and module == probe.module
                    calls.append(Call(namer(module), module, call.kind, list(probe.args) if whole else call.args,
                                      dict(probe.kwargs) if whole else call.kwargs, call.output))
                recorded.clear()
    finally:
        for handle in handles:
            handle.remove()
    return calls


class _Pairing:
    """Official module name -> the canonical module it is, by the first `layers` pair that matches
    (None: no counterpart); two official modules may not be one canonical module."""

    def __init__(self, layers: tuple) -> None:
        self.layers = layers
        self.owner: dict[str, str] = {}

    def __call__(self, official: str) -> str | None:
        for pattern, template in self.layers:
            values = pattern.match(official)
            if values is not None:
                canonical = template.render(values)
                if self.owner.setdefault(canonical, official) != official:
                    raise VidportError(f"reference layers: both {self.owner[canonical]!r} and {official!r} "
                                       f"are paired with {canonical!r}")
                return canonical
        return None
