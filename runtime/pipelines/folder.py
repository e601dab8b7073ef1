"""A pipeline folder written by `vidport convert PIPELINE`: its manifest, each component's
manifest and config, the scheduler config and the tokenizer, read without loading any weights
(so a request can be refused before heavy work)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vidport.converter.core.errors import VidportError
from vidport.converter.core.manifest import MANIFEST, read_manifest

SCHEDULER_FILE = Path("scheduler") / "scheduler_config.json"


@dataclass
class PipelineFolder:
    path: Path
    manifest: dict[str, Any]
    components: dict[str, dict[str, Any]]  # sub-folder -> its conversion manifest
    scheduler_config: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path) -> "PipelineFolder":
        path = Path(path)
        if not (path / MANIFEST).is_file():
            raise VidportError(f"{path}: no {MANIFEST}; not a vidport pipeline folder",
                               hint="convert one: vidport convert PIPELINE SOURCE --out DIR (vidport models lists the pipelines)")
        manifest = read_manifest(path)
        if manifest.get("kind") != "pipeline":
            raise VidportError(f"{path}: a single {manifest.get('family')} conversion, not a pipeline folder",
                               hint="convert the whole pipeline: vidport convert PIPELINE SOURCE --out DIR")
        components = {}
        for name, entry in manifest["components"].items():
            component = path / entry["manifest"]
            if not component.exists():
                raise VidportError(f"{path}: component {name} is missing ({entry['manifest']})")
            components[name] = read_manifest(component.parent)
        scheduler = path / SCHEDULER_FILE
        config = json.loads(scheduler.read_text()) if scheduler.exists() else {}
        return cls(path, manifest, components, config)

    @classmethod
    def open_mlx(cls, path: str | Path, pipeline: str, title: str) -> "PipelineFolder":
        """A folder the MLX runtime runs: `pipeline`'s (`title` names it in the error), target mlx."""
        folder = cls.open(path)
        if folder.pipeline != pipeline:
            raise VidportError(f"{folder.path}: a {folder.pipeline} pipeline, not {title} one")
        if folder.target != "mlx":
            raise VidportError(f"{folder.path}: converted for target '{folder.target}'; the runtime runs mlx folders",
                               hint=f"vidport convert {pipeline} SRC --target mlx --out DIR")
        return folder

    @property
    def pipeline(self) -> str:
        return self.manifest["pipeline"]

    @property
    def target(self) -> str:
        return self.manifest["target"]["name"]

    @property
    def tokenizer(self) -> Path:
        return self.path / "tokenizer"

    @property
    def scheduler_file(self) -> Path:
        return self.path / SCHEDULER_FILE

    def config(self, component: str) -> dict[str, Any]:
        if component not in self.components:
            raise VidportError(f"{self.path}: a {self.pipeline} pipeline without {component}/")
        return self.components[component]["config"]

    def configs(self) -> dict[str, dict[str, Any]]:
        return {name: manifest["config"] for name, manifest in self.components.items()}

    def scheduler(self, class_name: str | None = None) -> dict[str, Any]:
        """The scheduler config (class swapped to `class_name` if given), checked buildable by the runtime."""
        from vidport.runtime.schedulers import SCHEDULERS, from_config

        config = dict(self.scheduler_config)
        if not config:
            raise VidportError(f"{self.path}: no {SCHEDULER_FILE}",
                               hint="reconvert the pipeline: vidport convert writes the scheduler config")
        if class_name:
            config["_class_name"] = class_name
        try:
            from_config(config)
        except ValueError as err:
            hint = (f"supported: {', '.join(sorted(SCHEDULERS))}; --scheduler NAME swaps the class and keeps the schedule"
                    if config.get("_class_name") not in SCHEDULERS else
                    f"{config['_class_name']} cannot run this folder's schedule: drop --scheduler, or name another class")
            raise VidportError(f"scheduler ({self.scheduler_file}): {err}", hint=hint) from err
        return config
