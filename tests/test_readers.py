"""Readers chosen by content: torch zip and legacy, safetensors single and sharded, folders;
wrapped checkpoints unwrapped by the spec's rules, with what was skipped reported."""
from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from vidport.converter.checkpoint import read_checkpoint, unwrap
from vidport.converter.convert import plan_conversion
from vidport.converter.core.errors import VidportError
from vidport.converter.safetensors_io import SafetensorsWriter, read_safetensors

TENSORS = {
    "a": torch.randn(3, 5),
    "b": torch.randn(7).to(torch.bfloat16),
    "c": torch.randn(5, 3).t(),  # non-contiguous view
    "d": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    "e": torch.randn(2, 2).half(),
}


def as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()


@pytest.mark.parametrize("fmt", ["zip", "legacy", "safetensors"])
def test_formats_by_content(tmp_path, fmt):
    path = tmp_path / "weights.bin"  # the extension says nothing
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in TENSORS.items()}, str(path))
    else:
        torch.save(TENSORS, path, _use_new_zipfile_serialization=fmt == "zip")
    source = read_checkpoint(path)
    assert source.format == {"zip": "torch-zip", "legacy": "torch-legacy", "safetensors": "safetensors"}[fmt]
    for name, tensor in TENSORS.items():
        loaded = source.tree[name].load()
        assert loaded.shape == tuple(tensor.shape)
        np.testing.assert_array_equal(loaded.astype(np.float64), as_numpy(tensor).astype(np.float64))
    assert source.tree["b"].dtype == np.dtype(ml_dtypes.bfloat16)
    mapped = source.tree["a"].load()  # contiguous: a view of the file's own bytes
    with pytest.raises(ValueError, match="read-only"):
        mapped[0, 0] = 1.0  # the source can never be written through a loaded tensor


def test_sharded_safetensors_and_writer(tmp_path):
    writer = SafetensorsWriter(tmp_path, "model", shard_bytes=100)
    arrays = {f"t{i}": np.full((10,), i, np.float32) for i in range(5)}
    for name, array in arrays.items():
        writer.add(name, array)
    files = writer.close()
    assert len(files) == 4 and files[-1].name == "model.safetensors.index.json"  # 2 x 40 bytes fit 100
    source = read_checkpoint(files[-1])
    assert source.format == "safetensors-sharded"
    assert all(np.array_equal(source.tree[k].load(), v) for k, v in arrays.items())
    from safetensors.numpy import load_file  # the reference implementation reads our shards

    assert np.array_equal(load_file(str(files[0]))["t0"], arrays["t0"])


def test_unwrap_nested_and_prefixed(tmp_path):
    tree = {"state_dict": {"module.x": torch.zeros(2), "module.y": torch.ones(2)}, "global_step": 5,
            "optimizer": {"lr": 0.1}}
    torch.save(tree, tmp_path / "w.ckpt")
    found = unwrap(read_checkpoint(tmp_path / "w.ckpt").tree, ["state_dict"], ["module."])
    assert set(found.refs) == {"x", "y"}
    assert found.wrappers == ["nested under 'state_dict'", "key prefix 'module.'"]
    assert found.skipped == ["global_step (int)", "optimizer (dict, 0 tensors)"]


def test_wrapped_motion_module_converts(tmp_path):
    from fixtures.motion import write_original_motion_module

    write_original_motion_module(tmp_path / "wrapped.ckpt", "v3", wrap=True)
    plan = plan_conversion(tmp_path / "wrapped.ckpt", "mlx")
    assert plan.detected.tensors.wrappers == ["nested under 'state_dict'"]
    assert plan.detected.tensors.skipped == ["global_step (int)", "epoch (int)"]
    assert plan.variant.startswith("v3")


@pytest.mark.parametrize("fmt", ["legacy", "safetensors"])
def test_motion_module_other_formats(tmp_path, fmt):
    from fixtures.motion import write_original_motion_module

    write_original_motion_module(tmp_path / f"mm.{fmt}", "v2", fmt=fmt)
    plan = plan_conversion(tmp_path / f"mm.{fmt}", "mlx")
    assert plan.source.format == {"legacy": "torch-legacy", "safetensors": "safetensors"}[fmt]
    assert plan.variant.startswith("v2")


def test_diffusers_folder(motion_sources):
    source = read_checkpoint(motion_sources["diffusers"])
    assert source.format == "diffusers-folder" and source.config["_class_name"] == "MotionAdapter"
    refs, meta = read_safetensors(motion_sources["diffusers"] / "diffusion_pytorch_model.safetensors")
    assert set(refs) == set(source.tree)


def test_inspect_describes(motion_sources):
    from vidport.converter.inspect import describe

    rows = describe(motion_sources["v1"])
    assert rows["family"] == "animatediff-motion" and rows["variant"].startswith("v1")
    assert rows["tensors"] == len(torch.load(motion_sources["v1"], weights_only=True))
    assert rows["dtypes"] == f"float32 x{rows['tensors']}"


def test_tensor_past_the_end_of_a_shrunk_file_is_a_clear_error(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.randn(64, 64)}, str(path))
    refs, _ = read_safetensors(path)
    with open(path, "r+b") as handle:  # the file shrinks after its header was read
        handle.truncate(path.stat().st_size - 100)
    with pytest.raises(VidportError, match="w.safetensors.*truncated"):
        refs["a"].load()


def test_source_hashes_in_the_background_match_and_follow_changes(tmp_path):
    import hashlib

    from vidport.converter.hashing import file_sha256, hash_in_background

    path = tmp_path / "src.bin"
    path.write_bytes(b"x" * 3_000_000)
    hash_in_background([path])
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    hash_in_background([path])
    path.write_bytes(b"y" * 3_000_001)  # changed after the background hash began: hashed anew
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
