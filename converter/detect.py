"""Tell which family and source format a checkpoint is, from its keys (and a folder's class)."""
from __future__ import annotations

from dataclasses import dataclass

from vidport.converter.checkpoint import NoEmaWeights, Source, Tensors, unwrap
from vidport.converter.core.errors import VidportError
from vidport.converter.spec import Catalog, FamilySpec, SourceSpec

COMMON_WRAPPERS = ["state_dict", "model", "module", "ema", "params"]


@dataclass
class Detected:
    family: FamilySpec
    spec: SourceSpec
    tensors: Tensors


def _fits(spec: SourceSpec, source: Source) -> Tensors | None:
    if source.format.endswith("-folder"):
        config = source.config or {}
        architectures = config.get("architectures")  # a list; null where transformers' to_dict was saved as is
        class_name = config.get("_class_name") or (architectures[0] if isinstance(architectures, list) and architectures
                                                    else None)
        if spec.folder_class is None or spec.folder_class != class_name:
            return None
    elif spec.folder_class is not None:
        return None
    try:
        tensors = unwrap(source.tree, spec.descend, spec.strip_prefixes, spec.select_prefixes, drop=spec.drop)
    except VidportError:
        return None
    keys = list(tensors.refs)
    if not all(any(p.match(k) is not None for k in keys) for p in spec.detect_all):
        return None
    if any(p.match(k) is not None for p in spec.detect_none for k in keys):
        return None
    return tensors


def detect(source: Source, catalog: Catalog, family: str | None = None) -> Detected:
    """The one (family, source spec) whose detection rules fit; an error names what was tried."""
    families = [catalog.family(family)] if family else list(catalog.families.values())
    found = [Detected(f, s, t) for f in families for s in _sources(f, named=bool(family))
             if (t := _fits(s, source)) is not None]
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        names = ", ".join(d.spec.name for d in found)
        raise VidportError(f"{source.path}: ambiguous: fits {names}", hint="name the family on the command line")
    tried = ", ".join(s.name for f in families for s in _sources(f, named=bool(family)))
    sample = ", ".join(_keys(source)[:3])
    if family:
        _refuse_other_model(source, catalog, families[0])
    raise VidportError(
        f"{source.path}: not a known {family or 'model'} checkpoint ({source.format}; first keys: {sample})",
        hint=f"source formats tried: {tried}; `vidport models` lists what is supported",
    )


def _sources(family: FamilySpec, named: bool) -> list[SourceSpec]:
    """The family's source specs detection tries: those `only_when_named` (a Diffusers Wan folder read
    as Self-Forcing's, nothing in it saying so) only where the family was named."""
    return [spec for spec in family.sources if named or spec.only_when_named is None]


def holds_part(source: Source, family: FamilySpec) -> bool:
    """Whether a file that holds several models (an LTX-2 single file) holds any of `family`'s:
    a key under one of the prefixes its source specs select. A family no spec selects a prefix
    for, or one that also reads a file holding it alone (""), is taken to be there."""
    prefixes = [p for spec in family.sources for p in spec.select_prefixes]
    if not prefixes or "" in prefixes:
        return True
    return any(key.startswith(prefix) for key in _keys(source) for prefix in prefixes)


def _keys(source: Source) -> list[str]:
    return list(unwrap(source.tree, COMMON_WRAPPERS, ["module."]).refs) if isinstance(source.tree, dict) else []


def _refuse_other_model(source: Source, catalog: Catalog, family: FamilySpec) -> None:
    """A file asked for as `family` that is another family's checkpoint, or a model vidport knows
    but does not convert (mappings/unconverted.yaml), is refused with a line saying what it is."""
    others = [s for f in catalog.families.values() if f.name != family.name for s in _sources(f, named=False)
              if _fits(s, source) is not None]
    if others:
        names = ", ".join(sorted({s.family for s in others}))
        raise VidportError(f"{source.path}: this is a {names} checkpoint ({others[0].name}), not {family.name}",
                           hint=f"convert it as `vidport convert {others[0].family} ...`")
    keys = _keys(source)
    for model in catalog.unconverted:
        if model.fits(keys):
            raise VidportError(f"{source.path}: this is {model.name}: {' '.join(model.about.split())}",
                               hint="`vidport models` lists the families vidport converts")


def choose_ema(detected: Detected, source: Source, wanted: bool | None = True) -> tuple[Detected, bool]:
    """The detection with the EMA weights the source spec's `unwrap.ema` says the file keeps in
    place of its weights, and whether they were taken: `wanted` True (--ema: an error where there
    are none), False (--no-ema), or None: the spec's `default`, where the file has them."""
    spec = detected.spec
    if wanted is False or (wanted is None and (spec.ema is None or not spec.ema.default)):
        return detected, False
    if spec.ema is None:
        raise VidportError(f"{spec.name}: this source format keeps no EMA copies", hint="convert without --ema")
    try:
        tensors = unwrap(source.tree, spec.descend, spec.strip_prefixes, spec.select_prefixes, ema=spec.ema,
                         drop=spec.drop)
    except NoEmaWeights:
        if wanted:
            raise
        return detected, False
    return Detected(detected.family, spec, tensors), True
