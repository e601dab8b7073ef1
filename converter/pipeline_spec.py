"""Load and validate pipeline specs (mappings/pipelines/<name>.yaml): which model families make up
a pipeline, where each part lies in each source layout, and the scheduler a pipeline runs with.

A pipeline spec holds no tensor mapping: each component is converted by its family's own specs.
It says only how to find the parts (an LDM single file holds UNet, VAE and text encoder under
prefixes its families' specs select; a Diffusers folder holds them in sub-folders), and what the
pipeline folder carries beside the weights (tokenizer, scheduler config, model_index.json).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vidport.converter.core.errors import VidportError, closest
from vidport.converter.spec import MAPPINGS_DIR, SpecError, _child, _fail, _load

PIPELINES = "pipelines"
LIBRARY_CLASS = ["list", "str"]  # [library, ClassName], as model_index.json writes it
LAYOUT = {"required": {"name": "str", "parts": {"optional": {"*": "str"}}},
          "optional": {"detect": {"optional": {"has": "str", "file": "bool"}}, "description": "str"}}
PIPELINE_SCHEMA = {
    "required": {"pipeline": "str", "version": "int", "diffusers_class": "str",
                 "inputs": {"optional": {"*": {"required": {"layouts": ["list", LAYOUT]},
                                               "optional": {"help": "str", "option": "str", "optional": "bool",
                                                            "why": "str"}}}},
                 "components": ["list", {"required": {"name": "str", "family": "str", "class": LIBRARY_CLASS},
                                         "optional": {"optional": "bool", "why": "str",
                                                      "or": ["list", {"required": {"family": "str",
                                                                                   "class": LIBRARY_CLASS}}]}}]},
    "optional": {
        "description": "str",
        "aliases": ["list", "str"],
        "tokenizer": {"required": {"class": LIBRARY_CLASS}, "optional": {"option": "str", "follows": "str",
                                                                            "files": ["list", "str"]}},
        "scheduler": {"required": {"default": {"optional": {"*": "any"}}},
                      "optional": {"set": {"optional": {"*": "any"}}, "why": "str", "check": "str"}},
        "checks": ["list", "str"],
        "runtime": "str",
        "parity": "str",
        "reference": {"optional": {"*": "str"}},
        "model_index": {"optional": {"*": "any"}},
        "model_index_from_source": {"optional": {"*": "any"}},
        "copy": ["list", "str"],
    },
}


@dataclass(frozen=True)
class Layout:
    """One way a source holds its parts: `parts` maps a part (component, tokenizer, scheduler) to a
    path inside the source; "" is the source itself (a single file each family takes its sub-tree of)."""

    name: str
    parts: dict[str, str]
    has: str | None = None  # a folder holding this file
    file: bool | None = None  # a single file (True) or any folder (False)

    def fits(self, source: Path) -> bool:
        if self.has is not None and not (source.is_dir() and (source / self.has).exists()):
            return False
        if self.file is not None and source.is_file() != self.file:
            return False
        return True


@dataclass(frozen=True)
class Input:
    name: str  # "sd" is the positional source; others come from an option (--motion)
    help: str
    option: str | None
    layouts: tuple[Layout, ...]
    optional: bool = False  # the pipeline converts without it (its parts are then absent)
    why: str = ""


@dataclass(frozen=True)
class Component:
    name: str  # the sub-folder: unet, vae, text_encoder, motion_adapter
    family: str
    library_class: tuple[str, str]
    optional: bool = False  # a source may lack it (Wan's transformer_2, image_encoder): left out, not an error
    why: str = ""  # why it may be absent, as the manifest and the command line say
    # other (family, class) pairs the part may be, tried in order where the first's specs do not
    # fit (LTX-2.3's vocoder is LTX2VocoderWithBWE where LTX-2.0's is LTX2Vocoder)
    alternatives: tuple[tuple[str, tuple[str, str]], ...] = ()

    def choices(self) -> list[tuple[str, tuple[str, str]]]:
        return [(self.family, self.library_class), *self.alternatives]


@dataclass
class PipelineSpec:
    name: str
    version: int
    description: str
    aliases: list[str]
    diffusers_class: str
    inputs: dict[str, Input]
    components: list[Component]
    path: Path
    tokenizer_class: tuple[str, str] | None = None
    tokenizer_option: str | None = None
    tokenizer_follows: str | None = None  # the component (text_encoder) without which no tokenizer is needed
    tokenizer_files: list[str] = field(default_factory=list)  # globs: copy only these (a folder shared with weights)
    scheduler_default: dict[str, Any] = field(default_factory=dict)
    scheduler_set: dict[str, Any] = field(default_factory=dict)
    checks: list[str] = field(default_factory=list)  # "module:function", called with {component: config}
    runtime: str | None = None  # "module:Class": the MLX pipeline (runtime/pipelines/protocol.py) that runs the folder
    parity: str | None = None  # "module:function": its step-by-step parity against the reference (verify --pipeline)
    scheduler_check: str | None = None  # "module:function" that refuses a scheduler config the runtime cannot run
    reference: dict[str, str] = field(default_factory=dict)  # task -> "diffusers:PipelineClass"
    model_index: dict[str, Any] = field(default_factory=dict)  # extra model_index.json entries
    # model_index.json entries read from the source's own model_index.json (the layout's part
    # `model_index`), with these defaults where it has none (Wan: boundary_ratio, expand_timesteps)
    model_index_from_source: dict[str, Any] = field(default_factory=dict)
    copy: list[str] = field(default_factory=list)  # parts copied as they are when the source has them


def load_pipeline_spec(path: Path) -> PipelineSpec:
    data, node = _load(path, PIPELINE_SCHEMA)
    inputs = {}
    for name, entry in data["inputs"].items():
        layouts = tuple(Layout(item["name"], dict(item["parts"]), (item.get("detect") or {}).get("has"),
                               (item.get("detect") or {}).get("file")) for item in entry["layouts"])
        inputs[name] = Input(name, entry.get("help", ""), entry.get("option"), layouts, entry.get("optional", False),
                             " ".join(entry.get("why", "").split()))
    components = []
    for item, item_node in zip(data["components"], _child(node, "components").value):
        if len(item["class"]) != 2:
            raise _fail(path, item_node, "class must be [library, ClassName]")
        alternatives = tuple((other["family"], tuple(other["class"])) for other in item.get("or", []))
        if any(len(library_class) != 2 for _, library_class in alternatives):
            raise _fail(path, item_node, "class must be [library, ClassName]")
        components.append(Component(item["name"], item["family"], tuple(item["class"]), item.get("optional", False),
                                    " ".join(item.get("why", "").split()), alternatives))
    spec = PipelineSpec(data["pipeline"], data["version"], data.get("description", ""), data.get("aliases", []),
                        data["diffusers_class"], inputs, components, path)
    if "tokenizer" in data:
        spec.tokenizer_class = tuple(data["tokenizer"]["class"])
        spec.tokenizer_option = data["tokenizer"].get("option")
        spec.tokenizer_follows = data["tokenizer"].get("follows")
        spec.tokenizer_files = list(data["tokenizer"].get("files", []))
    if "scheduler" in data:
        spec.scheduler_default = dict(data["scheduler"]["default"])
        spec.scheduler_set = dict(data["scheduler"].get("set") or {})
        spec.scheduler_check = data["scheduler"].get("check")
        if "_class_name" not in spec.scheduler_default:
            raise _fail(path, _child(node, "scheduler"), "scheduler.default needs a _class_name")
    spec.checks = list(data.get("checks", []))
    spec.runtime = data.get("runtime")
    spec.parity = data.get("parity")
    if spec.parity and not spec.runtime:
        raise _fail(path, _child(node, "parity"), "parity compares a runtime with its reference: name the `runtime:` too")
    spec.reference = dict(data.get("reference") or {})
    spec.model_index = dict(data.get("model_index") or {})
    spec.model_index_from_source = dict(data.get("model_index_from_source") or {})
    spec.copy = list(data.get("copy") or [])
    for component in spec.components:  # every component must lie in some input
        if not any(component.name in layout.parts for i in inputs.values() for layout in i.layouts):
            raise _fail(path, _child(node, "components"), f"component '{component.name}' is in no input's layout parts")
    return spec


def load_pipeline_specs(root: Path | None = None) -> dict[str, PipelineSpec]:
    """Every spec under mappings/pipelines/ (or $VIDPORT_MAPPINGS/pipelines/), by name."""
    root = Path(root or os.environ.get("VIDPORT_MAPPINGS") or MAPPINGS_DIR) / PIPELINES
    specs = {}
    for path in sorted(root.glob("*.yaml")):
        spec = load_pipeline_spec(path)
        if spec.name in specs:
            raise SpecError(f"{path}:1: pipeline '{spec.name}' is also defined in {specs[spec.name].path.name}")
        specs[spec.name] = spec
    return specs


def find_pipeline(name: str, root: Path | None = None) -> PipelineSpec | None:
    """The pipeline spec called `name` (or aliased so), else None: the name is a model family."""
    for spec in load_pipeline_specs(root).values():
        if name == spec.name or name in spec.aliases:
            return spec
    return None


def pipeline_spec(name: str, root: Path | None = None) -> PipelineSpec:
    found = find_pipeline(name, root)
    if found is None:
        known = list(load_pipeline_specs(root))
        hint = f"known pipelines: {', '.join(known)}"
        near = closest(name, known)
        raise VidportError(f"unknown pipeline '{name}'", hint=hint + (f"; did you mean {near}?" if near else ""))
    return found
