"""The reference for a source format no diffusers / transformers loader reads: the format's own
(official) code. A source spec names a builder, `reference: {official: "module:function"}`, that
takes the file's tensors (as torch read them) and the conversion's config and returns an
`Official`: the official model with those tensors loaded strictly (as the official loader does,
`load_state_dict` on the file's own state dict), what the report calls it, and how the family's
probes run on it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from vidport.converter.core.errors import VidportError
from vidport.reference.probe import Probe

# (probe, its args as torch tensors, its kwargs as torch tensors) -> whatever the official call returns
ProbeRunner = Callable[[Probe, list, dict], Any]


@dataclass
class Official:
    model: Any  # torch.nn.Module, float32, eval
    name: str  # "official:wan22 wan/modules/vae2_2.py WanVAE_"
    run: ProbeRunner


def load_strict(model: Any, state: dict[str, Any], what: str) -> Any:
    """`model` (built on torch's meta device) with `state` assigned, every key of both present,
    then cast to float32: the official loaders' `load_state_dict(torch.load(path), assign=True)`."""
    import torch

    missing = sorted(set(model.state_dict()) - set(state))
    unexpected = sorted(set(state) - set(model.state_dict()))
    if missing or unexpected:
        raise VidportError(f"{what}: the file does not fit the official model built from its config: "
                           f"missing {missing[:5]}, unexpected {unexpected[:5]}",
                           hint="the config inferred from the file (or given with --set) is not the file's")
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise VidportError(f"{what}: the file does not fit the official model built from its config "
                           f"({str(err).splitlines()[-1].strip()})",
                           hint="the config inferred from the file (or given with --set) is not the file's") from err
    model = model.to(torch.float32)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise VidportError(f"{what}: the official model has tensors the file does not give: {left[:5]}")
    return model.eval()
