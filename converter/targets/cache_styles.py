"""Where each TTNN tensor file goes: the three naming conventions tt-metal code loads caches by.

* ``as_tensor``: flat files ``{name}_dtype_{DTYPE}_layout_{LAYOUT}.tensorbin``, the name
  ``ttnn.as_tensor(tensor, dtype=..., layout=..., cache_file_name=DIR/name)`` looks for (a hit
  loads the file and never reads ``tensor``, so ``None`` will do).
* ``model_cache``: the tree ``ttnn.model_preprocessing.preprocess_model_parameters`` dumps and
  reloads, under ``DIR/<model_name>``: one folder per module, ``<param>.tensorbin`` files, every
  ``nn.ModuleList`` entry a folder named by its index (an empty one for a parameterless entry
  such as a Dropout: ttnn reloads a folder of digit-named folders as a list, so a missing one
  would shift the later indices), and ``version.txt`` holding the version string with no
  newline.  With ``ttnn.CONFIG.model_cache_path = DIR`` and ``enable_model_cache`` on,
  ``preprocess_model_parameters(model_name=<model_name>, version=<version>)`` is a cache hit
  (it compares the first line of version.txt with ``version``; both are in ttnn_manifest.json).
* ``tt_dit``: where the family declares tt_dit's layout, the keyed folder tt_dit's ``load_model``
  opens (tt_dit.py: renamed, fused, one shard per device of a mesh); else flat
  ``<dotted.param.path>.tensorbin`` files (what ``models/tt_dit`` modules' ``load`` reads under a
  cache folder) plus ``cache_dict.json``, parameter path -> file name, relative to
  the folder (tt_dit's own dict holds absolute paths; join them with the folder to use it).
"""
from __future__ import annotations

import hashlib
import json
from functools import partial
from pathlib import Path
from typing import Any

from vidport.converter.core.errors import VidportError, listing
from vidport.converter.core.named import named_object
from vidport.converter.infer import public
from vidport.converter.targets.tt_dit import tt_dit_style
from vidport.converter.targets.sd_demo import SdDemo

DTYPE_NAMES = {"bfloat16": "BFLOAT16", "bfloat8_b": "BFLOAT8_B", "bfloat4_b": "BFLOAT4_B", "float32": "FLOAT32"}  # ttnn.DataType.name


class AsTensor:
    def __init__(self, plan) -> None:
        self.plan = plan

    def path_for(self, name: str, dtype: str, layout: str) -> str:
        return f"{name}_dtype_{DTYPE_NAMES[dtype]}_layout_{layout}.tensorbin"

    def finish(self, folder: Path, names: list[str], source_hashes: list[str]) -> dict[str, Any]:
        return {"load": "ttnn.as_tensor(None, dtype=..., layout=..., cache_file_name=DIR/<name>)"}


class TtDit:
    def __init__(self, plan) -> None:
        self.plan = plan

    def path_for(self, name: str, dtype: str, layout: str) -> str:
        return f"{name}.tensorbin"

    def finish(self, folder: Path, names: list[str], source_hashes: list[str]) -> dict[str, Any]:
        cache_dict = {name: self.path_for(name, "", "") for name in sorted(names)}
        (folder / "cache_dict.json").write_text(json.dumps(cache_dict, indent=1, sort_keys=True))
        return {"cache_dict": "cache_dict.json"}


class ModelCache:
    def __init__(self, plan) -> None:
        self.plan = plan
        self.model_name = plan.detected.family.name.replace("/", "_")

    def path_for(self, name: str, dtype: str, layout: str) -> str:
        return f"{self.model_name}/{name.replace('.', '/')}.tensorbin"

    def finish(self, folder: Path, names: list[str], source_hashes: list[str]) -> dict[str, Any]:
        root = folder / self.model_name
        version = model_cache_version(self.plan, source_hashes)
        if not self.plan.target.model_tree:
            raise VidportError(f"{self.plan.target.path.name}: the model_cache style needs the target's model_tree function")
        tree = named_object(self.plan.target.model_tree)(self.plan.detected.family.canonical, public(self.plan.config))
        params = set(_leaves(tree))
        missing = sorted(params - set(names))
        if missing:
            raise VidportError(f"model_cache layout: {len(missing)} parameter(s) of the canonical model have no "
                               f"tensor: {listing(missing)}")
        for module in _modules(tree):  # every module folder, empty list entries included
            (root / module.replace(".", "/")).mkdir(parents=True, exist_ok=True)
        (root / "version.txt").write_text(version)  # read back with readline(): no newline
        return {"model_cache_path": ".", "model_name": self.model_name, "version": version}


STYLES = {"as_tensor": AsTensor, "model_cache": ModelCache, "tt_dit": partial(tt_dit_style, flat=TtDit), "sd_demo": SdDemo}


def model_cache_version(plan, source_hashes: list[str]) -> str:
    """A deterministic version string: the same source files, specs and options give the same one."""
    key = {"sources": sorted(source_hashes),
           "spec": [plan.detected.spec.name, plan.detected.spec.version],
           "target": [plan.target.name, plan.target.version],
           "options": {k: v for k, v in sorted(plan.options.items()) if k != "cache_style"},
           "config": plan.config}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"vidport-{digest}"


def _items(node: dict | list):
    return node.items() if isinstance(node, dict) else ((str(i), v) for i, v in enumerate(node))


def _leaves(node: dict | list, prefix: str = ""):
    for name, value in _items(node):
        if value is None:
            yield prefix + name
        else:
            yield from _leaves(value, f"{prefix}{name}.")


def _modules(node: dict | list, prefix: str = ""):
    for name, value in _items(node):
        if isinstance(value, dict):
            yield prefix + name
        if value is not None:
            yield from _modules(value, f"{prefix}{name}.")
