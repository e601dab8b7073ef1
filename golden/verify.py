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
from vidport.reference.probe import Probe
from vidport.golden.records import Call
from vidport.golden.store import load_golden, save_golden


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("vidport", "torch", "diffusers", "transformers", "mlx", "numpy"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return found


def reference_model(manifest: dict[str, Any], source: Path) -> Any:
    """The reference model of a conversion, built from `source` with the loader its spec names."""
    from vidport.converter.spec import load_catalog
    from vidport.reference.build import load_reference

    family = load_catalog().family(manifest["family"])
    spec = next(s for s in family.sources if s.name == manifest["spec"]["name"])
    if not spec.reference:
        raise VidportError(f"{spec.path.name}: no reference loader for this source format")
    library, class_name = family.canonical.split(":")
    config_file = {"_class_name": class_name, **manifest["config"]}
    options = spec.ema_reference if manifest.get("ema") else {}  # e.g. extract_ema for LDM files
    return load_reference(family.canonical, spec.reference, source, config_file, **options)


def reference_calls(manifest: dict[str, Any], source: Path, seed: int, frames: int | None) -> tuple[list[Probe], list[Call]]:
    """Build the reference from `source` with the loader its spec names, run the family's probes."""
    from vidport.converter.spec import load_catalog
    from vidport.golden.capture_torch import capture_reference

    model = reference_model(manifest, source)
    family = load_catalog().family(manifest["family"])
    probes = importlib.import_module(family.reference).probes(manifest["config"], seed=seed, frames=frames)
    return probes, capture_reference(model, probes)


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


def verify(converted: Path, source: Path | None = None, golden: Path | None = None, save_to: Path | None = None,
           seed: int = 0, frames: int | None = None, progress=None, device: bool = False) -> Report:
    """`device`: run a TTNN conversion on a Tenstorrent card instead of the host emulator."""
    from vidport.golden.port import open_port
    from vidport.converter.core.manifest import read_manifest

    converted = Path(converted)
    manifest = read_manifest(converted)
    _check_family(converted, manifest)
    if golden is not None:
        probes, calls, info = load_golden(golden)
        if info.get("family") != manifest["family"]:
            raise VidportError(f"{golden}: a golden of family {info.get('family')}, but {converted} is {manifest['family']}")
    else:
        source = Path(source or manifest["source"])
        if not source.exists():
            raise VidportError(f"{source}: the source is gone", hint="pass --source PATH (the checkpoint converted from)")
        _check_source_kind(source, converted, manifest)
        probes, calls = reference_calls(manifest, source, seed, frames)
        info = {"family": manifest["family"], "source": str(source), "seed": seed, "versions": _versions(),
                "config": manifest["config"]}
        if save_to is not None:
            save_golden(save_to, probes, calls, {**info, "dtype": "float32"})
    port = open_port(converted, manifest, device)  # by the manifest's target: MLX, TTNN (emulator / device)
    dtype = manifest["dtype"]
    report = compare_port(port, probes, calls, threshold_for(dtype), dtype, progress)
    report.info = {"converted": str(converted), "reference": "golden" if golden else "live",
                   "seed": info.get("seed"), "versions": info.get("versions")}
    return report
