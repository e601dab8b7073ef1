"""Build the PyTorch reference (diffusers / transformers) from the same source file the port
was converted from, in float32 on the CPU."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from vidport.converter.core.errors import VidportError
from vidport.reference.canonical import build_canonical, canonical_class, tied_aliases


def load_reference(canonical: str, loader: str, source: Path, config_file: dict[str, Any], **options: Any) -> Any:
    """`loader` is the source spec's `reference`: from_single_file (with a local config folder,
    so nothing is downloaded) or from_pretrained; `options` go to the loader (`extract_ema`)."""
    import torch
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # keep the report readable; real problems raise
    cls = canonical_class(canonical)
    if loader == "from_pretrained":
        model = cls.from_pretrained(source, torch_dtype=torch.float32, **options)
    elif loader == "from_single_file":
        with tempfile.TemporaryDirectory() as config_dir:
            (Path(config_dir) / "config.json").write_text(json.dumps(config_file))
            model = _from_single_file(cls, canonical, source, config_dir, **options)
    elif loader == "from_mapping":
        model = _from_mapping(canonical, source, config_file)
    else:
        raise VidportError(f"unknown reference loader '{loader}'")
    return model.eval()


def _from_mapping(canonical: str, source: Path, config_file: dict[str, Any]) -> Any:
    """For a format the reference library cannot read (the native Wan 2.2 VAE): its canonical
    model, built from the config and loaded strictly with the source converted by its own spec.
    The spec's mapping is then part of what is trusted, so a test must prove the result equal to
    the format's official code (tests/test_wan_vae.py does for the Wan 2.2 VAE)."""
    import torch

    from vidport.converter.convert import iter_outputs, plan_conversion
    from vidport.converter.dtypes import is_floating

    model = build_canonical(canonical, {k: v for k, v in config_file.items() if not k.startswith("_")})
    state = {key: torch.from_numpy(array.astype("float32") if is_floating(array.dtype) else array)
             for key, array in iter_outputs(plan_conversion(source, "diffusers"))}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - tied_aliases(model):  # tied aliases are filled by their tie
        raise VidportError(f"{source}: mapped weights do not fit {canonical}: missing "
                           f"{sorted(set(missing) - tied_aliases(model))[:5]}, unexpected {sorted(unexpected)[:5]}")
    return model.to(torch.float32)


def _from_single_file(cls: type, canonical: str, source: Path, config_dir: str, **options: Any) -> Any:
    """A diffusers model reads its part of the file itself; a transformers component (the CLIP
    text encoder of an LDM file) is read the way StableDiffusionPipeline.from_single_file does."""
    import torch

    if hasattr(cls, "from_single_file"):
        # diffusers reads one file; a sharded release (its *.index.json) is handed over as the
        # state dict its shards hold, which from_single_file takes in place of a path
        checkpoint = _shards_state_dict(source) if source.name.endswith(".index.json") else str(source)
        return cls.from_single_file(checkpoint, config=config_dir, local_files_only=True, torch_dtype=torch.float32,
                                    **options)
    from diffusers.loaders.single_file import load_single_file_sub_model
    from diffusers.loaders.single_file_utils import load_single_file_checkpoint

    library, class_name = canonical.split(":")
    checkpoint = load_single_file_checkpoint(str(source), local_files_only=True)
    return load_single_file_sub_model(library, class_name, "", checkpoint, None, False, config_dir,
                                      local_files_only=True, torch_dtype=torch.float32)


def _shards_state_dict(index: Path) -> dict[str, Any]:
    """Every tensor of a sharded safetensors checkpoint, by the names its index lists."""
    from safetensors.torch import load_file

    weight_map = json.loads(Path(index).read_text())["weight_map"]
    state: dict[str, Any] = {}
    for shard in sorted(set(weight_map.values())):
        state.update(load_file(str(Path(index).parent / shard)))
    return state
