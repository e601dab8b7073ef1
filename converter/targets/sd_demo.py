"""``--cache-style sd_demo``: the model cache tt-metal's Stable Diffusion 1.4 demo
(``models/demos/wormhole/stable_diffusion``) builds with ``preprocess_model_parameters`` and its
``custom_preprocessor``, written so that the demo's call finds it instead of rebuilding it from torch.

The layouts are the family's role table for this style (``targets: ttnn: styles: sd_demo:`` in
its family.yaml: conv weights permuted to [kh, kw, O, I], group norms raw, linears and layer norms
4-D, all bfloat16 TILE), which the plan takes in place of the target's roles. This module adds
what the demo's loader checks beyond layouts: the folder ``preprocess_model_parameters`` reads
(``ttnn.CONFIG.model_cache_path / model_name.replace("/", "_")``, the model_cache tree, a
``version.txt`` without newline) under the model name the family declares (sd15-unet:
``CompVis/stable-diffusion-v1-4``, the name the demo's tests pass; otherwise the family's name).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from vidport.converter.core.errors import VidportError
from vidport.converter.spec import load_catalog

STYLE = "sd_demo"


class SdDemo:
    """The model_cache tree under the demo's model name; refuses a family without a table for the
    style, and dtypes the demo's preprocessor never writes (it stores everything bfloat16)."""

    def __init__(self, plan) -> None:
        from vidport.converter.targets.cache_styles import ModelCache  # here: cache_styles registers this class

        family = plan.detected.family
        extras = family.targets.get(plan.target.name)
        style = extras.styles.get(STYLE) if extras else None
        if style is None:
            known = [f.name for f in load_catalog().families.values()
                     if STYLE in getattr(f.targets.get(plan.target.name), "styles", {})]
            raise VidportError(f"--cache-style {STYLE}: family {family.name} declares no {STYLE} layouts "
                               f"(targets: {plan.target.name}: styles: {STYLE}: in {family.path})",
                               hint=f"families that do: {', '.join(known) or 'none'}; "
                                    "or use --cache-style model_cache")
        if plan.options.get("dtype") != "bfloat16" or plan.block_quantization is not None:
            raise VidportError(f"--cache-style {STYLE}: the demo's custom_preprocessor stores every tensor bfloat16",
                               hint="convert without --ttnn-dtype bfloat8_b / --quantize (the demo's model "
                                    "code makes its own bfloat8_b copies when it builds)")
        self.model_name = style.model_name or family.name
        self.cache = ModelCache(plan)
        self.cache.model_name = self.model_name.replace("/", "_")  # as preprocess_model_parameters names it

    def path_for(self, name: str, dtype: str, layout: str) -> str:
        return self.cache.path_for(name, dtype, layout)

    def finish(self, folder: Path, names: list[str], source_hashes: list[str]) -> dict[str, Any]:
        info = self.cache.finish(folder, names, source_hashes)
        return {**info, "model_name": self.model_name, "folder": self.cache.model_name,
                "load": f"ttnn.CONFIG.model_cache_path = DIR; enable_model_cache = True; "
                        f"preprocess_model_parameters(model_name={self.model_name!r}, version=<version>, ...)"}

