"""`vidport verify`: the reference built from the same source (or a saved golden) against the port."""
from __future__ import annotations

import importlib
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from vidport.converter.core.errors import VidportError
from vidport.golden.compare import Report, compare_port
from vidport.golden.metrics import threshold_for
from vidport.golden.quantized import layer_thresholds
from vidport.reference.probe import Probe
from vidport.golden.records import Call
from vidport.golden.store import load_golden, save_golden
from vidport.reference.build import SELF_MAPPED


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("vidport", "torch", "diffusers", "transformers", "mlx", "numpy"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return found


def _source_spec(manifest: dict[str, Any]) -> tuple[Any, Any]:
    from vidport.converter.spec import load_catalog

    family = load_catalog().family(manifest["family"])
    spec = next((s for s in family.sources if s.name == manifest["spec"]["name"]), None)
    if spec is None:
        raise VidportError(f"source spec '{manifest['spec']['name']}' is not one of {family.name}'s")
    return family, spec


def _build(manifest: dict[str, Any], source: Path, self_mapped: bool = False) -> Any:
    from vidport.reference.build import build_reference

    family, spec = _source_spec(manifest)
    library, class_name = family.canonical.split(":")
    config_file = {"_class_name": class_name, **manifest["config"]}
    options = spec.ema_reference if manifest.get("ema") else {}  # e.g. extract_ema for LDM files
    spec = spec.with_ema() if manifest.get("ema") else spec  # an EMA state dict of its own is read instead
    return build_reference(spec, family.canonical, source, config_file, self_mapped, **options)


def reference_model(manifest: dict[str, Any], source: Path) -> Any:
    """The canonical (diffusers / transformers) model of a conversion, built from `source` by the
    library's own loader: what a reference pipeline is assembled from."""
    family, spec = _source_spec(manifest)
    if spec.official is not None:
        raise VidportError(f"{spec.path.name}: diffusers / transformers read no such file (its reference is the "
                           "official code), so no library pipeline can be built around it",
                           hint=f"convert it to the Diffusers layout (vidport convert {family.name} SRC --target "
                                "diffusers) and use that folder as the source")
    return _build(manifest, source).model


def reference_calls(manifest: dict[str, Any], source: Path, seed: int, frames: int | None,
                    self_mapped: bool = False) -> tuple[list[Probe], list[Call], str]:
    """Build the reference from `source` (the spec's loader, or the official code; with
    `self_mapped`, through vidport's own mapping), run the family's probes; also what the
    reference is called."""
    from vidport.golden.capture_torch import capture_reference

    family, _spec = _source_spec(manifest)
    reference = _build(manifest, source, self_mapped)
    probes = importlib.import_module(family.reference).probes(manifest["config"], seed=seed, frames=frames)
    return probes, capture_reference(reference.model, probes, reference.run, reference.layers), reference.name


def _check_family(converted: Path, manifest: dict[str, Any]) -> None:
    """The manifest's family and source spec must be known before any reference is built."""
    from vidport.converter.core.manifest import MANIFEST
    from vidport.converter.spec import load_catalog

    try:
        family = load_catalog().family(manifest["family"])
    except VidportError as err:
        raise VidportError(f"{converted / MANIFEST}: {err.message}", hint=err.hint) from err
    if all(s.name != manifest["spec"]["name"] for s in family.sources):
        raise VidportError(f"{converted / MANIFEST}: source spec '{manifest['spec']['name']}' is not one of "
                           f"{family.name}'s", hint=f"known: {', '.join(s.name for s in family.sources)}")


def _check_source_kind(source: Path, converted: Path, manifest: dict[str, Any]) -> None:
    """A folder where the conversion read a file (or the reverse) is the wrong source: say so."""
    kind = manifest.get("source_kind")
    if not isinstance(kind, str):
        return
    wanted = "folder" if kind.endswith("-folder") else "file"
    given = "folder" if source.is_dir() else "file"
    if given != wanted:
        raise VidportError(f"{source}: a {given}, but {converted} was converted from a {wanted} ({kind}: "
                           f"{manifest['source']})", hint=f"pass --source the {wanted} it was converted from")


def weights_dtype(folder: Path, manifest: dict[str, Any]) -> str:
    """The dtype of the port's weights as stored, not as the manifest says: the floating dtype that
    holds most of the parameters in its safetensors headers (a TTNN port: of its tensors, each
    checked against its file when the port loads; a few exact 0/1 masks in bfloat8_b do not make
    a bfloat16 port a bfloat8_b one)."""
    import json
    import math

    from vidport.converter.dtypes import dtype_name, is_floating
    from vidport.converter.safetensors_io import read_safetensors
    from vidport.runtime.ttnn.module import TTNN_MANIFEST

    counts: dict[str, int] = {}
    if manifest["target"]["name"] == "ttnn" and (folder / TTNN_MANIFEST).exists():
        for entry in json.loads((folder / TTNN_MANIFEST).read_text()).get("tensors", {}).values():
            counts[entry["dtype"]] = counts.get(entry["dtype"], 0) + math.prod(entry["shape"])
    for weights in sorted(folder.glob("*.safetensors")):
        refs, _ = read_safetensors(weights)
        for ref in refs.values():
            if is_floating(ref.dtype):
                name = dtype_name(ref.dtype)
                counts[name] = counts.get(name, 0) + math.prod(ref.shape)
    if not counts:
        raise VidportError(f"{folder}: no floating-point weights found to verify")
    return max(sorted(counts), key=counts.__getitem__)


def check_source(source: Path, manifest: dict[str, Any], strict: bool) -> dict[str, Any]:
    """Whether `source` holds the files the conversion read (their SHA-256s, as the manifest
    recorded them): a warning in the report when not, an error with `strict`."""
    from vidport.converter.checkpoint import read_checkpoint
    from vidport.converter.hashing import file_sha256

    recorded = [entry.get("sha256") for entry in manifest.get("sources") or [] if isinstance(entry, dict)]
    if not recorded or not all(isinstance(h, str) for h in recorded):
        return {"path": str(source), "matches_conversion": None,
                "warning": "the manifest records no source SHA-256s: the source was not checked"}
    files = read_checkpoint(source).files
    given = {Path(f).name: file_sha256(Path(f)) for f in files}
    if sorted(given.values()) == sorted(recorded):
        return {"path": str(source), "matches_conversion": True}
    known = set(recorded)
    differing = sorted(name for name, digest in given.items() if digest not in known) or sorted(given)
    message = (f"{source}: not the source that was converted: the SHA-256 of {', '.join(differing[:3])}"
               f"{' ...' if len(differing) > 3 else ''} differs from the manifest's ({manifest.get('source')})")
    if strict:
        raise VidportError(message, hint="pass --source the file the folder was converted from, or leave out --strict")
    return {"path": str(source), "matches_conversion": False, "warning": message}


def verify(converted: Path, source: Path | None = None, golden: Path | None = None, save_to: Path | None = None,
           seed: int = 0, frames: int | None = None, progress=None, device: bool = False,
           self_mapped: bool = False, strict: bool = False) -> Report:
    """`device`: run a TTNN conversion on a Tenstorrent card instead of the host emulator.
    `self_mapped`: build the reference through vidport's own mapping (not an independent check;
    the report says so). `strict`: a source other than the file converted is an error, not a warning."""
    from vidport.golden.port import open_port
    from vidport.converter.core.manifest import read_manifest

    converted = Path(converted)
    manifest = read_manifest(converted)
    _check_family(converted, manifest)
    if manifest["target"]["name"] == "ttnn":  # a cache style no TTNN model reads: say so before any reference
        from vidport.runtime.ttnn.loading import runtime_class

        runtime_class(converted, manifest)
    if golden is not None:
        probes, calls, info = load_golden(golden)
        if info.get("family") != manifest["family"]:
            raise VidportError(f"{golden}: a golden of family {info.get('family')}, but {converted} is {manifest['family']}")
    else:
        source = Path(source or manifest["source"])
        if not source.exists():
            raise VidportError(f"{source}: the source is gone", hint="pass --source PATH (the checkpoint converted from)")
        _check_source_kind(source, converted, manifest)
        checked = check_source(source, manifest, strict)
        try:
            probes, calls, reference = reference_calls(manifest, source, seed, frames, self_mapped)
        except VidportError as err:
            if checked["matches_conversion"] is not False:
                raise
            raise VidportError(f"{checked['warning']}, and no reference builds from it: {err.message}",
                               hint="pass --source the file the folder was converted from") from err
        info = {"family": manifest["family"], "source": str(source), "seed": seed, "versions": _versions(),
                "config": manifest["config"], "reference": reference}
        if save_to is not None:
            save_golden(save_to, probes, calls, {**info, "dtype": "float32"})
    quantized = layer_thresholds(manifest)  # before the port loads: a format with no measured thresholds is refused
    port = open_port(converted, manifest, device)  # by the manifest's target: MLX, TTNN (emulator / device)
    dtype = weights_dtype(converted, manifest)
    report = compare_port(port, probes, calls, threshold_for(dtype), dtype, progress, quantized)
    warnings = []
    if info.get("reference") == SELF_MAPPED:
        warnings.append("the reference is SELF-MAPPED: built through vidport's own mapping, so a wrong rule in "
                        f"{manifest['spec']['name']} passes unseen; this is not an independent check")
    if golden is None and checked.get("warning"):
        warnings.append(checked["warning"])
    if manifest.get("dtype") != dtype:
        warnings.append(f"the manifest says dtype {manifest.get('dtype')}, the weights are {dtype}: "
                        f"thresholds for {dtype}")
    report.info = {"converted": str(converted),
                   "reference": info.get("reference") or "unknown (a golden saved without its reference's name)",
                   "reference_run": f"golden {golden}" if golden else "live",
                   "source": None if golden is not None else checked,
                   "overrides": dict(manifest.get("overrides") or {}), "assumed": dict(manifest.get("assumed") or {}),
                   "warnings": warnings, "seed": info.get("seed"), "versions": info.get("versions")}
    return report
