"""The wan-dit family on MLX: every source layout is real (the reference library's own loader, or
the official Wan code, reads it exactly), converts, and passes per-layer verify against diffusers'
WanTransformer3DModel in float32 and bfloat16; the 3D RoPE is diffusers' own, not a 1D stand-in."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vidport.converter.convert import convert, plan_conversion
from vidport.converter.infer import public
from vidport.golden.verify import verify
from fixtures.sparse import sparse_safetensors
from fixtures.motion import write_config_folder
from fixtures.references import assert_names_reference
from fixtures.wan_dit import (native_state_dict, random_wan_transformer, to_native_key, wan_config,
                                        write_a14b_pipeline, write_diffusers, write_native)

SMALL_HEADS = {"num_attention_heads": 4}  # shapes cannot tell heads; the small models have 4


@pytest.fixture(scope="module")
def wan_sources(tmp_path_factory) -> dict[str, dict]:
    """Native files (single, release-style shards, a ComfyUI-prefixed repackaging) and Diffusers
    folders: name -> {"path", "config", "variant"}."""
    root = tmp_path_factory.mktemp("wan-dit")
    found = {}
    for name, variant, seed, kwargs in [("native-t2v", "t2v", 1, {}), ("native-i2v", "i2v", 2, {"shards": 3}),
                                        ("native-ti2v", "ti2v", 3, {"prefix": "model.diffusion_model."})]:
        target = root / (name if kwargs.get("shards") else f"{name}.safetensors")
        config = write_native(target, variant, seed, **kwargs)
        found[name] = {"path": config.pop("_path"), "config": config, "variant": variant}
    for name, variant, seed in [("diffusers-t2v", "t2v", 4), ("diffusers-i2v", "i2v", 5)]:
        found[name] = {"path": root / name, "config": write_diffusers(root / name, variant, seed), "variant": variant}
    return found


def _native_state(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if str(path).endswith(".index.json"):
        index = json.loads(open(path).read())["weight_map"]
        state = {}
        for shard in sorted(set(index.values())):
            state.update(load_file(str(path.parent / shard)))
        return state
    return load_file(str(path))


@pytest.mark.parametrize("name", ["native-t2v", "native-i2v", "native-ti2v"])
def test_native_layout_is_real(wan_sources, name, tmp_path):
    """diffusers' own conversion maps every key of the native fixture onto exactly the model's key
    set, and from_single_file loads those tensors unchanged."""
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    source = wan_sources[name]
    state = _native_state(source["path"])
    config_dir = write_config_folder(tmp_path, "WanTransformer3DModel", source["config"])
    checkpoint = dict(state) if str(source["path"]).endswith(".index.json") else str(source["path"])  # it pops keys
    model = WanTransformer3DModel.from_single_file(checkpoint, config=str(config_dir), local_files_only=True)
    converted = convert_wan_transformer_to_diffusers(dict(state))
    loaded = model.state_dict()
    assert set(converted) == set(loaded)  # no missing, no unexpected keys
    assert all(torch.equal(loaded[k], v) for k, v in converted.items())


CASES = [("native-t2v", SMALL_HEADS), ("native-i2v", SMALL_HEADS), ("native-ti2v", SMALL_HEADS),
         ("diffusers-t2v", {}), ("diffusers-i2v", {})]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name,overrides", CASES, ids=[c[0] for c in CASES])
def test_convert_and_verify(wan_sources, name, overrides, dtype, tmp_path):
    source = wan_sources[name]
    plan = plan_conversion(source["path"], "mlx", "wan-dit", dtype, overrides=overrides)
    assert {k: plan.config[k] for k in source["config"]} == source["config"]  # inferred = what made it
    convert(plan, tmp_path / "out")
    report = verify(tmp_path / "out")
    assert report.passed, report.first_failure
    assert_names_reference(report, tmp_path / "out")
    assert not report.not_in_port
    kinds = {r.kind for r in report.layers}
    assert {"WanRotaryPosEmbed", "WanAttention", "WanTransformerBlock", "Conv3d"} <= kinds
    if source["config"]["image_dim"]:
        assert "WanImageEmbedding" in kinds
    worst = min(r.local["pcc"] for r in report.layers)
    assert worst >= (0.99999 if dtype == "float32" else 0.999)


def test_native_to_diffusers_folder(wan_sources, tmp_path):
    """Native -> Diffusers comes free: from_pretrained loads the folder, every tensor as diffusers'
    own conversion of the native file gives it."""
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    source = wan_sources["native-i2v"]
    convert(plan_conversion(source["path"], "diffusers", overrides=SMALL_HEADS), tmp_path / "transformer")
    loaded = WanTransformer3DModel.from_pretrained(tmp_path / "transformer").state_dict()
    expected = convert_wan_transformer_to_diffusers(_native_state(source["path"]))
    assert set(loaded) == set(expected)
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())


def test_ti2v_runs_per_token_timesteps(wan_sources, tmp_path):
    """Wan 2.2 TI2V is also probed the way its pipeline runs: one timestep per token."""
    from vidport.reference.wan_dit import probes

    config = public(plan_conversion(wan_sources["native-ti2v"]["path"], "mlx", overrides=SMALL_HEADS).config)
    found = probes(config, seed=0)
    assert len(found) == 2 and found[1].kwargs["timestep"].shape == (1, 3 * 2 * 3)
    assert (found[1].kwargs["timestep"][0, :6] == 0).all() and (found[1].kwargs["timestep"][0, 6:] > 0).all()


def test_i2v_diffusers_drops_norm_added_q(wan_sources):
    plan = plan_conversion(wan_sources["diffusers-i2v"]["path"], "mlx")
    dropped = [key for key, why in plan.canonical.dropped]
    assert dropped == [f"blocks.{n}.attn2.norm_added_q.weight" for n in range(2)]
    assert all("ignores" in why for _, why in plan.canonical.dropped)


def test_heads_are_needed_for_unknown_widths(wan_sources):
    from vidport.converter.core.errors import VidportError

    with pytest.raises(VidportError) as err:
        plan_conversion(wan_sources["native-t2v"]["path"], "mlx")
    assert "num_attention_heads" in err.value.hint


def test_a14b_pipeline_converts_both_experts(tmp_path):
    """A Wan 2.2 A14B pipeline folder: transformer/ (high noise) and transformer_2/ (low noise)
    each convert and verify; they are different models."""
    import mlx.core as mx

    root = tmp_path / "Wan2.2-I2V-A14B-Diffusers"
    write_a14b_pipeline(root)
    assert json.loads((root / "model_index.json").read_text())["boundary_ratio"] == 0.9
    outputs = []
    for expert in ("transformer", "transformer_2"):
        manifest = convert(plan_conversion(root / expert, "mlx"), tmp_path / expert)
        assert manifest["config"]["in_channels"] == 36 and manifest["config"]["image_dim"] is None
        report = verify(tmp_path / expert)
        assert report.passed, (expert, report.first_failure)
        outputs.append(mx.load(str(tmp_path / expert / "model.safetensors")))
    assert set(outputs[0]) == set(outputs[1])
    assert not np.array_equal(np.array(outputs[0]["proj_out.weight"]), np.array(outputs[1]["proj_out.weight"]))


def test_rope_is_diffusers_3d_rope():
    """Our tables equal diffusers' WanRotaryPosEmbed on a non-square, multi-frame grid; a 1D RoPE
    over the token index, or height and width swapped, would not."""
    import mlx.core as mx
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed as Reference

    from vidport.runtime.wan_rope import WanRotaryPosEmbed, rope_split, rotary_table

    head_dim, latents = 16, (1, 8, 5, 8, 12)  # 5 frames, 4 x 6 patches
    assert rope_split(head_dim) == (8, 4, 4)
    reference = Reference(head_dim, (1, 2, 2), 1024)
    ref_cos, ref_sin = (t.numpy().reshape(-1, head_dim) for t in reference(torch.zeros(latents)))
    ours = WanRotaryPosEmbed(head_dim, (1, 2, 2), 1024)
    channels_last = mx.zeros((1, 5, 8, 12, 8))
    cos, sin = (np.array(t) for t in ours(channels_last))
    np.testing.assert_allclose(cos, ref_cos, rtol=0, atol=1e-7)
    np.testing.assert_allclose(sin, ref_sin, rtol=0, atol=1e-7)
    one_d_cos, _ = rotary_table(head_dim, ref_cos.shape[0], 10000.0)
    assert np.abs(one_d_cos - ref_cos).max() > 0.5
    swapped_cos, _ = (np.array(t) for t in ours(mx.zeros((1, 5, 12, 8, 8))))
    assert np.abs(swapped_cos - ref_cos).max() > 0.5


def test_rope_rotation_matches_diffusers_attention():
    """The rotation itself: our apply_rotary against diffusers' processor, through a self-attention
    with identity projections (so the output is attention over rotated q/k)."""
    import mlx.core as mx
    from diffusers.models.transformers.transformer_wan import WanAttention as Reference
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed as ReferenceRope

    from vidport.runtime.wan_attention import WanAttention

    torch.manual_seed(0)
    reference = Reference(dim=64, heads=4, dim_head=16, eps=1e-6, processor=WanAttnProcessor()).eval()
    rotary = ReferenceRope(16, (1, 2, 2), 1024)(torch.zeros(1, 8, 3, 4, 6))
    x = torch.randn(1, 18, 64)
    with torch.no_grad():
        expected = reference(x, None, None, rotary).numpy()
    ours = WanAttention(64, 4, 16, eps=1e-6)
    ours.load_weights([(k, mx.array(v.numpy())) for k, v in reference.state_dict().items()], strict=True)
    got = np.array(ours(mx.array(x.numpy()), None, None, tuple(mx.array(t.numpy()) for t in rotary)))
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5)
    without = np.array(ours(mx.array(x.numpy())))
    assert np.abs(without - expected).max() > 1e-2  # the rotation matters at this scale


# The published Diffusers configs of the releases (transformer/config.json), and the variant
# the native spec must name for them from shapes alone.
RELEASES = {
    "Wan2.1 T2V 1.3B": {"num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30},
    "Wan2.1 I2V 14B (480P / 720P)": {"num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40, "in_channels": 36,
                                     "image_dim": 1280, "added_kv_proj_dim": 5120},
    "Wan2.2 TI2V 5B": {"num_attention_heads": 24, "ffn_dim": 14336, "num_layers": 30, "in_channels": 48,
                       "out_channels": 48},
    "Wan2.2 I2V A14B expert": {"num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40, "in_channels": 36},
}


@pytest.mark.parametrize("release", list(RELEASES))
def test_release_config_from_shapes(release, tmp_path):
    """A release-shaped native file (weights never read) is recognised by the variant table and
    planned to exactly its published Diffusers config, with no flags."""
    from vidport.reference.canonical import canonical_shapes

    published = {**wan_config("t2v"), "attention_head_dim": 128, "text_dim": 4096, "freq_dim": 256,
                 **RELEASES[release]}
    shapes = canonical_shapes("diffusers:WanTransformer3DModel", published)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    sparse_safetensors(path, {to_native_key(k): s for k, s in shapes.items()})
    plan = plan_conversion(path, "mlx")
    assert plan.variant == release
    assert public(plan.config) == published
    assert plan.final.shapes["patch_embedding.weight"] == (published["num_attention_heads"] * 128, 1, 2, 2,
                                                           published["in_channels"])


def test_matches_official_wan_code(tmp_path):
    """The official Wan code (wan22) writes the native layout our fixtures use, and our MLX port of
    its checkpoint computes what the official model computes (text padded to 512, as it does)."""
    # diffusers' models load before the official code does, beside its torchvision stand-in
    from diffusers import WanTransformer3DModel  # noqa: F401

    wan_official = pytest.importorskip("vidport.reference.wan_official")
    try:
        model_module = wan_official.official_module("model")
    except ModuleNotFoundError as err:
        pytest.skip(str(err))
    import mlx.core as mx
    from safetensors.torch import save_file

    from vidport.runtime.loading import load_model

    official = model_module.WanModel(model_type="t2v", in_dim=16, dim=64, ffn_dim=128, freq_dim=32, text_dim=32,
                                     out_dim=16, num_heads=4, num_layers=2).eval()
    ours = native_state_dict(random_wan_transformer(wan_config("t2v"), seed=3))
    official.load_state_dict(ours, strict=True)  # the same key set and shapes as the official model
    save_file({k: v.contiguous() for k, v in official.state_dict().items()}, str(tmp_path / "wan.safetensors"))
    convert(plan_conversion(tmp_path / "wan.safetensors", "mlx", overrides=SMALL_HEADS), tmp_path / "mlx")

    rng = np.random.default_rng(0)
    latents = rng.standard_normal((16, 3, 4, 6), dtype=np.float32)
    text = rng.standard_normal((20, 32), dtype=np.float32)
    timestep = np.array([731])
    def attention(q, k, v, k_lens=None, **kwargs):  # self-attention passes k_lens: here always the full length
        assert k_lens is None or bool((k_lens == k.shape[1]).all())
        return wan_official.cpu_attention(q, k, v, **kwargs)

    original = model_module.flash_attention
    model_module.flash_attention = attention
    try:
        with torch.no_grad():
            expected = official([torch.from_numpy(latents)], torch.from_numpy(timestep), [torch.from_numpy(text)],
                                seq_len=18)[0].numpy()
    finally:
        model_module.flash_attention = original
    padded = np.concatenate([text, np.zeros((512 - 20, 32), np.float32)])[None]
    got = load_model(tmp_path / "mlx")(mx.array(latents.transpose(1, 2, 3, 0)[None]), mx.array(timestep),
                                       mx.array(padded))
    got = np.array(got)[0].transpose(3, 0, 1, 2)
    assert np.abs(got - expected).max() <= 1e-4 * max(1.0, float(np.sqrt((expected**2).mean())))
