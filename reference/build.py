"""Build the PyTorch reference from the same source file the port was converted from, in float32
on the CPU: the canonical library's own loader (diffusers / transformers) where it reads the
format, else the format's official code (a source spec's `reference: {official: ...}`).

Files are read by torch / safetensors themselves, never by vidport's reader; only the wrappers
a training run adds (a `state_dict` entry, a `module.` prefix: the spec's `unwrap`) are taken off.
A reference built through vidport's own mapping ("self-mapped") shares its mistakes: it is built
only when asked for by name, and then reported as such."""
from __future__ import annotations

import json
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from vidport.converter.core.errors import VidportError
from vidport.converter.core.named import named_object
from vidport.reference.canonical import build_canonical, canonical_class, tied_aliases
from vidport.reference.wan_official import INSTALL_HINT

if TYPE_CHECKING:
    from vidport.converter.spec import SourceSpec

SELF_MAPPED = "self-mapped"  # what reports call a reference built through vidport's own mapping


@dataclass
class Reference:
    """A reference model and what the report calls it. `run` is set for an official model: it runs
    one of the family's probes (written for the canonical model) on it; `layers` pairs its modules
    with canonical ones (`OfficialReference.layers`)."""

    model: Any
    name: str
    run: Callable[..., Any] | None = None
    layers: tuple = ()


def build_reference(spec: "SourceSpec", canonical: str, source: Path, config_file: dict[str, Any],
                    self_mapped: bool = False, **options: Any) -> Reference:
    """The reference of a conversion from `source` (a `spec` source): the canonical library's
    loader, or the official code; with `self_mapped`, the canonical model loaded through the
    spec's own mapping (only when asked for)."""
    if self_mapped:
        return Reference(_from_mapping(canonical, source, config_file).eval(), SELF_MAPPED)
    if spec.official is not None:
        state = read_state(source, spec.descend, spec.strip_prefixes)
        config = {k: v for k, v in config_file.items() if not k.startswith("_")}
        try:
            official = named_object(spec.official.build)(state, config)
        except ModuleNotFoundError as err:
            raise VidportError(f"{spec.path.name}: no diffusers / transformers loader reads this format, and its "
                               f"official code is missing ({err})",
                               hint=f"{INSTALL_HINT}; or verify --self-mapped (vidport's own mapping: not an "
                                    "independent check)") from err
        return Reference(official.model.eval(), official.name, official.run, spec.official.layers)
    if not spec.reference:
        raise VidportError(f"{spec.path.name}: no reference loader for this source format")
    if spec.reference_class is not None:  # the source holds a larger model; the canonical one is inside it
        model = load_reference(spec.reference_class, spec.reference, source, config_file,
                               unwrap=(spec.descend, spec.strip_prefixes), **options)
        return Reference(model.get_submodule(spec.reference_module).eval(),
                         f"{reference_name(spec.reference_class, spec.reference)}, its {spec.reference_module}")
    model = load_reference(canonical, spec.reference, source, config_file,
                           unwrap=(spec.descend, spec.strip_prefixes), select=spec.select_prefixes, **options)
    return Reference(model, reference_name(canonical, spec.reference))


def reference_name(canonical: str, loader: str) -> str:
    """What a report calls the canonical library's loader: "diffusers:AutoencoderKLWan.from_single_file"."""
    if loader == "from_single_file" and not canonical.startswith("diffusers:"):
        return f"{canonical} via diffusers' single-file loader"
    if loader == "single_file_mapping":
        return f"{canonical} via diffusers' {_mapping_function(canonical).__name__}"
    return f"{canonical}.{loader}"


def load_reference(canonical: str, loader: str, source: Path, config_file: dict[str, Any],
                   unwrap: tuple[list[str], list[str]] = (["state_dict"], []), select: list[str] = (),
                   **options: Any) -> Any:
    """`loader` is the source spec's `reference`: from_single_file (with a local config folder,
    so nothing is downloaded; given the file's tensors, wrappers taken off by `unwrap` = (descend,
    strip_prefix), by default the `state_dict` entries diffusers' own file loader steps into) or
    from_pretrained; `options` go to the loader (`extract_ema`). `single_file_mapping`: a class
    diffusers registers a single-file conversion function for but gives no from_single_file
    (AutoencoderKLLTX2Audio): that function renames the sub-tree under the first of the `select`
    prefixes some key carries (the spec's `select_prefix`, kept on the keys as diffusers' functions
    expect), and the model built from the config takes the result with a strict load_state_dict.
    `from_mapping` is the self-mapped model (see `build_reference`)."""
    import torch
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # keep the report readable; real problems raise
    cls = canonical_class(canonical)
    if loader == "from_pretrained":
        model = cls.from_pretrained(source, torch_dtype=torch.float32, **options)
    elif loader == "from_single_file":
        with tempfile.TemporaryDirectory() as config_dir:
            (Path(config_dir) / "config.json").write_text(json.dumps(config_file))
            model = _from_single_file(cls, canonical, read_state(Path(source), *unwrap), config_dir, **options)
    elif loader == "single_file_mapping":
        model = _through_mapping_function(canonical, _selected(read_state(Path(source), *unwrap), select),
                                          config_file)
    elif loader == "from_mapping":
        model = _from_mapping(canonical, source, config_file)
    else:
        raise VidportError(f"unknown reference loader '{loader}'")
    return model.eval()


def read_state(source: Path, descend: list[str] = (), strip_prefixes: list[str] = ()) -> dict[str, Any]:
    """The file's tensors as torch / safetensors read them (a sharded index: every shard's), out of
    the wrappers a training run adds: `descend` into wrapper entries while a level holds no tensor,
    nested dicts joined with dots, non-tensor entries left out, a prefix every key has removed."""
    import torch
    from safetensors.torch import load_file

    from vidport.converter.safetensors_io import looks_like_safetensors

    source = Path(source)
    try:
        if source.name.endswith(".index.json"):
            tree: Any = _shards_state_dict(source)
        elif looks_like_safetensors(source):
            tree = load_file(str(source))
        else:
            tree = torch.load(source, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(source))
    except (OSError, RuntimeError, ValueError) as err:
        raise VidportError(f"{source}: the reference library cannot read it ({str(err).splitlines()[0]})") from err
    while isinstance(tree, dict) and not any(isinstance(v, torch.Tensor) for v in tree.values()):
        step = next((k for k in descend if isinstance(tree.get(k), dict)), None)
        if step is None:
            break
        tree = tree[step]
    if not isinstance(tree, dict):
        raise VidportError(f"{source}: holds a {type(tree).__name__}, not a dict of tensors")
    state = _flat_tensors(tree, "")
    for prefix in strip_prefixes:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _flat_tensors(tree: dict, prefix: str) -> dict[str, Any]:
    import torch

    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, torch.Tensor):
            flat[f"{prefix}{key}"] = value
        elif isinstance(value, dict):
            flat.update(_flat_tensors(value, f"{prefix}{key}."))
    return flat


def _from_mapping(canonical: str, source: Path, config_file: dict[str, Any]) -> Any:
    """The self-mapped model: canonical, built from the config and loaded strictly with the source
    converted by its own spec. The spec's mapping is then part of what is trusted (a wrong rule
    passes), so verify builds it only when asked (`--self-mapped`) and says so."""
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


def _mapping_function(canonical: str) -> Callable[..., dict[str, Any]]:
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES

    entry = SINGLE_FILE_LOADABLE_CLASSES.get(canonical.split(":")[-1])
    if entry is None:
        raise VidportError(f"diffusers registers no single-file conversion function for {canonical}")
    return entry["checkpoint_mapping_fn"]


def _selected(state: dict[str, Any], prefixes: list[str]) -> dict[str, Any]:
    """The keys under the first prefix some key carries (all keys when none is given)."""
    for prefix in prefixes:
        chosen = {k: v for k, v in state.items() if k.startswith(prefix)}
        if chosen:
            return chosen
    return state


def _through_mapping_function(canonical: str, state: dict[str, Any], config_file: dict[str, Any]) -> Any:
    """The canonical model built from the config, loaded strictly with the tensors diffusers' own
    conversion function makes of the file's (no key missing, none left over)."""
    model = build_canonical(canonical, {k: v for k, v in config_file.items() if not k.startswith("_")})
    converted = _mapping_function(canonical)(checkpoint=dict(state), config=config_file)
    try:
        model.load_state_dict(converted, strict=True)
    except RuntimeError as err:
        raise VidportError(f"{canonical}: diffusers' {_mapping_function(canonical).__name__} does not make this "
                           f"file's tensors fit the model ({str(err).splitlines()[-1].strip()})") from err
    return model


def _from_single_file(cls: type, canonical: str, state: dict[str, Any], config_dir: str, **options: Any) -> Any:
    """A diffusers model reads its part of the file's tensors itself (from_single_file takes a state
    dict in place of a path); a transformers component (the CLIP text encoder of an LDM file) is
    read the way StableDiffusionPipeline.from_single_file does."""
    import torch

    if hasattr(cls, "from_single_file"):
        return cls.from_single_file(state, config=config_dir, local_files_only=True, torch_dtype=torch.float32,
                                    **options)
    from diffusers.loaders.single_file import load_single_file_sub_model

    library, class_name = canonical.split(":")
    return load_single_file_sub_model(library, class_name, "", state, None, False, config_dir,
                                      local_files_only=True, torch_dtype=torch.float32)


def _shards_state_dict(index: Path) -> dict[str, Any]:
    """Every tensor of a sharded safetensors checkpoint, by the names its index lists."""
    from safetensors.torch import load_file

    weight_map = json.loads(Path(index).read_text())["weight_map"]
    state: dict[str, Any] = {}
    for shard in sorted(set(weight_map.values())):
        state.update(load_file(str(Path(index).parent / shard)))
    return state
