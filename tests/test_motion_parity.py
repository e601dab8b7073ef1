"""Done-means 1 and 6 of the foundation: every AnimateDiff source layout is real (diffusers' own
loader reads it exactly), converts, and passes per-layer verify against diffusers."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vidport.converter.convert import convert, plan_conversion
from vidport.golden.verify import verify
from fixtures.motion import write_config_folder
from fixtures.references import assert_names_reference

VARIANTS = ["v1", "v2", "v3", "sdxl-beta"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_fixture_layout_is_real(motion_sources, variant, tmp_path):
    """diffusers' from_single_file maps every key of our fixture and leaves nothing unloaded."""
    from diffusers import MotionAdapter
    from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers
    from fixtures.motion import motion_adapter_config

    state = torch.load(motion_sources[variant], weights_only=True)
    config = motion_adapter_config(variant)
    model = MotionAdapter.from_single_file(str(motion_sources[variant]),
                                           config=str(write_config_folder(tmp_path, "MotionAdapter", config)))
    expected = {k for k in model.state_dict() if not k.endswith("pos_embed.pe")}
    converted = convert_animatediff_checkpoint_to_diffusers(state)
    assert set(converted) == expected  # no missing, no unexpected keys
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in converted.items())


@pytest.mark.parametrize("variant", VARIANTS + ["diffusers"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_convert_and_verify(motion_sources, variant, dtype, tmp_path):
    plan = plan_conversion(motion_sources[variant], "mlx", "animatediff-motion", dtype)
    manifest = convert(plan, tmp_path / "out")
    assert manifest["dtype"] == dtype
    report = verify(tmp_path / "out", frames=8)
    assert report.passed, report.first_failure
    assert_names_reference(report, tmp_path / "out")
    assert len(report.layers) > 100 and not report.not_in_port
    worst = min(r.local["pcc"] for r in report.layers)
    assert worst >= (0.99999 if dtype == "float32" else 0.999)


def test_variant_detection(motion_sources):
    seen = {v: plan_conversion(motion_sources[v], "mlx").variant for v in VARIANTS}
    assert seen["v1"].startswith("v1") and seen["v2"].startswith("v2")
    assert seen["v3"].startswith("v3") and seen["sdxl-beta"].startswith("sdxl")
    plan = plan_conversion(motion_sources["v1"], "mlx")
    assert plan.config["motion_max_seq_length"] == 24 and plan.config["use_motion_mid_block"] is False
    assert plan.config["block_out_channels"] == [32, 64, 64, 64]


def test_heads_override(motion_sources, tmp_path):
    """--set motion_num_attention_heads=4 reaches the built model: every attention of the MLX
    adapter loaded from the folder splits into 4 heads, and a motion module computes what diffusers'
    computes with 4 heads on the same weights, not what it computes with the release's 8."""
    import mlx.core as mx
    from diffusers import MotionAdapter
    from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers
    from fixtures.motion import motion_adapter_config
    from vidport.runtime.animatediff_motion import Attention
    from vidport.runtime.loading import load_model

    convert(plan_conversion(motion_sources["v2"], "mlx", overrides={"motion_num_attention_heads": 4}), tmp_path / "o")
    adapter = load_model(tmp_path / "o")
    heads = [module.heads for _, module in adapter.named_modules() if isinstance(module, Attention)]
    assert len(heads) == 2 * (4 * 2 + 4 * 3 + 1) and set(heads) == {4}  # attn1 + attn2 of every motion module
    state = convert_animatediff_checkpoint_to_diffusers(torch.load(motion_sources["v2"], weights_only=True))
    x = np.random.default_rng(0).standard_normal((8, 32, 2, 3)).astype(np.float32)  # 8 frames, 32 channels
    ours = np.array(adapter.down_blocks[0].motion_modules[0](mx.array(x), num_frames=8))
    theirs = {}
    for count in (4, 8):
        reference = MotionAdapter(**motion_adapter_config("v2", motion_num_attention_heads=count)).eval()
        missing, unexpected = reference.load_state_dict(state, strict=False)
        assert not unexpected and all(k.endswith("pos_embed.pe") for k in missing)  # the table diffusers computes
        with torch.no_grad():
            theirs[count] = reference.down_blocks[0].motion_modules[0](torch.from_numpy(x), num_frames=8).numpy()
    np.testing.assert_allclose(ours, theirs[4], rtol=0, atol=1e-4)
    assert np.abs(ours - theirs[8]).max() > 1e-2


def test_original_to_diffusers_folder(motion_sources, tmp_path):
    """Original -> Diffusers: diffusers' from_pretrained loads it and every tensor equals the source's."""
    from diffusers import MotionAdapter
    from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers

    convert(plan_conversion(motion_sources["v2"], "diffusers"), tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "config.json").read_text())["_class_name"] == "MotionAdapter"
    model = MotionAdapter.from_pretrained(tmp_path / "adapter")
    loaded = model.state_dict()
    source = convert_animatediff_checkpoint_to_diffusers(torch.load(motion_sources["v2"], weights_only=True))
    assert set(loaded) - set(source) == {k for k in loaded if k.endswith("pos_embed.pe")}
    assert all(torch.equal(loaded[k], v) for k, v in source.items())


def test_sharded_output_loads(motion_sources, tmp_path):
    """A small shard limit gives several shards and an index that MLX and diffusers both read."""
    import mlx.utils
    from diffusers import MotionAdapter
    from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers
    from vidport.runtime.loading import load_model

    manifest = convert(plan_conversion(motion_sources["v2"], "mlx"), tmp_path / "mlx", shard_bytes=2_000_000)
    assert sum(f.endswith(".safetensors") for f in manifest["files"]) > 1
    assert "model.safetensors.index.json" in manifest["files"]
    source = convert_animatediff_checkpoint_to_diffusers(torch.load(motion_sources["v2"], weights_only=True))
    loaded = dict(mlx.utils.tree_flatten(load_model(tmp_path / "mlx").parameters()))
    assert len(loaded) == len(source)  # every tensor, once; pos_embed.pe is computed, not loaded
    assert all(np.array_equal(np.array(loaded[k]), source[k].numpy()) for k in source)  # linears and norms keep layout
    convert(plan_conversion(motion_sources["v2"], "diffusers"), tmp_path / "diff", shard_bytes=2_000_000)
    assert (tmp_path / "diff" / "diffusion_pytorch_model.safetensors.index.json").exists()
    state = MotionAdapter.from_pretrained(tmp_path / "diff").state_dict()
    assert all(torch.equal(state[k], v) for k, v in source.items())


def test_manifest_records_provenance(motion_sources, tmp_path):
    from vidport.converter.hashing import file_sha256

    manifest = convert(plan_conversion(motion_sources["v3"], "mlx", dtype="float16"), tmp_path / "o")
    on_disk = json.loads((tmp_path / "o" / "vidport_manifest.json").read_text())
    assert on_disk["sources"][0]["sha256"] == file_sha256(motion_sources["v3"])
    assert on_disk["spec"]["name"] == "animatediff-motion/original" and on_disk["target"]["name"] == "mlx"
    assert on_disk["dtype"] == "float16" and on_disk["config"]["motion_max_seq_length"] == 32
    assert on_disk["dropped"] and all(d["why"] for d in on_disk["dropped"])
    assert on_disk["tensors"] == manifest["tensors"]


def test_mlx_runs_more_frames_than_positions_fails(motion_sources, tmp_path):
    import mlx.core as mx
    from vidport.runtime.loading import load_model

    convert(plan_conversion(motion_sources["v1"], "mlx"), tmp_path / "o")
    module = load_model(tmp_path / "o").down_blocks[0].motion_modules[0]
    x = mx.array(np.zeros((25, 32, 2, 2), np.float32))
    with pytest.raises(ValueError, match="25 frames exceed"):
        module(x, num_frames=25)
