"""Shared fixtures: small checkpoints in every real source format, generated once per session."""
from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import pytest

from vidport.runtime import configure_cpu

configure_cpu()  # before any test module imports mlx: MLX's fast BLAS, as `vidport generate` has it
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def motion_sources(tmp_path_factory) -> dict[str, Path]:
    """Original AnimateDiff checkpoints of every release layout, plus a Diffusers folder."""
    from fixtures.motion import MOTION_VARIANTS, write_diffusers_motion_adapter, write_original_motion_module

    root = tmp_path_factory.mktemp("motion")
    found = {}
    for seed, variant in enumerate(MOTION_VARIANTS):
        found[variant] = root / f"mm_{variant}.ckpt"
        write_original_motion_module(found[variant], variant, seed=seed)
    found["diffusers"] = root / "motion-adapter-diffusers"
    write_diffusers_motion_adapter(found["diffusers"], "v2", seed=7)
    return found


@pytest.fixture(scope="module")
def ttnn():
    """The ttnn module at the pinned version; the test is skipped, saying why, where it is not."""
    from vidport.converter.ttnn_support import PINNED_TTNN_VERSION, import_ttnn

    module = import_ttnn()
    if module is None:
        pytest.skip("import_ttnn() returned None: ttnn cannot be imported here (no wheel for this Python or OS)")
    if importlib.metadata.version("ttnn") != PINNED_TTNN_VERSION:
        pytest.skip(f"ttnn {importlib.metadata.version('ttnn')} installed; the checks are pinned to {PINNED_TTNN_VERSION}")
    return module
