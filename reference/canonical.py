"""The canonical model (diffusers / transformers) built from a config dict, and its state-dict
shapes on torch's meta device, without allocating weights."""
from __future__ import annotations

from typing import Any

from vidport.converter.core.errors import VidportError
from vidport.converter.core.named import named_object


def canonical_class(canonical: str) -> type:
    return named_object(canonical)


def build_canonical(canonical: str, config: dict[str, Any]) -> Any:
    """diffusers models build `from_config`; transformers models from their config class."""
    cls = canonical_class(canonical)
    return cls.from_config(config) if hasattr(cls, "from_config") else cls(cls.config_class(**config))


def stored_state(model: Any) -> dict[str, Any]:
    """The state dict as a checkpoint stores it: a tensor tied under several names (transformers'
    `shared` / `encoder.embed_tokens`) is kept once, under its first name, as save_pretrained does."""
    seen: set[int] = set()
    state = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            state[name] = tensor
    return state


def tied_aliases(model: Any) -> set[str]:
    """The state-dict names `stored_state` leaves out (filled by the tie when the model loads)."""
    return set(model.state_dict(keep_vars=True)) - set(stored_state(model))


def canonical_shapes(canonical: str, config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    import torch

    with torch.device("meta"):
        model = build_canonical(canonical, config)
    return {name: tuple(t.shape) for name, t in stored_state(model).items()}


def preprocessed_tree(canonical: str, config: dict[str, Any]) -> dict:
    """The nesting ``preprocess_model_parameters`` gives the canonical model (built on torch's meta
    device): a dict per module (its direct parameters, then children that hold anything), a list
    per ``nn.ModuleList`` (every entry, empty ones too); Linear / LayerNorm / Embedding hold
    weight and bias only.  Leaves are None. (The TTNN target's `model_tree`.)"""
    try:
        import torch
    except ImportError as err:
        raise VidportError("--cache-style model_cache needs torch (so does preprocess_model_parameters)",
                           hint="install torch, or use --cache-style as_tensor / tt_dit") from err

    with torch.device("meta"):
        model = build_canonical(canonical, config)

    def tree(module: torch.nn.Module) -> dict | list:
        if isinstance(module, torch.nn.ModuleList):
            return [tree(child) for child in module.children()]
        found: dict[str, Any] = {name: None for name, _ in module.named_parameters(recurse=False)}
        if isinstance(module, (torch.nn.Linear, torch.nn.LayerNorm, torch.nn.Embedding)):
            return found
        for name, child in module.named_children():
            sub = tree(child)
            if sub:
                found[name] = sub
        return found

    return tree(model)
