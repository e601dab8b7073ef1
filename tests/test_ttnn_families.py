"""Issue 4, remaining families: the TTNN target for sd15-unet, sd-vae, clip-text and wan-dit, each
from a real source format (the LDM single file, a Diffusers pipeline's vae/, a native Wan file).

Every file read back with vidport's reader and its recorded layout undone equals the reference
library's own tensors (bfloat16-rounded; float32 exactly); the manifest says the layout rules by
role; conversion is deterministic; ttnn's own loaders take the files. Only (d) needs ttnn."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from vidport.cli import app
from vidport.converter.convert import convert, plan_conversion
from vidport.converter.transforms import parse_step, shape_steps
from vidport.converter.ttnn_support import group_norm as packing
from vidport.converter.core.tensorbin import read_tensorbin, to_bfloat8_b, to_bfloat16

runner = CliRunner()
WAN_SEED = 3

# family -> (source, --set overrides, TTNN options). The small CLIP and the native Wan file have
# widths no release's variant table knows, so their head counts are given as `--set` would.
CASES: dict[str, tuple[str, dict, dict]] = {
    "sd15-unet": ("ldm", {}, {}),
    "sd-vae": ("pipeline_vae", {}, {"grid": "4x2"}),
    "clip-text": ("ldm", {"num_attention_heads": 4}, {}),
    "wan-dit": ("wan_native", {"num_attention_heads": 4}, {}),
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    from fixtures.sd import write_sd_pipeline, write_sd_single_file
    from fixtures.wan_dit import write_native

    root = tmp_path_factory.mktemp("ttnn-families")
    write_native(root / "wan-i2v.safetensors", "i2v", seed=WAN_SEED)
    return {"ldm": write_sd_single_file(root / "v1-5.safetensors", seed=0),
            "pipeline_vae": write_sd_pipeline(root / "sd-pipeline", seed=0) / "vae",
            "wan_native": root / "wan-i2v.safetensors"}


@pytest.fixture(scope="module")
def canonical() -> dict[str, dict[str, np.ndarray]]:
    """Each family's tensors from the reference models the fixtures were written from (diffusers /
    transformers state dicts: independent of our specs)."""
    from fixtures.sd import sd_components
    from fixtures.wan_dit import random_wan_transformer, wan_config

    vae, text_encoder, unet = sd_components(0)
    wan = random_wan_transformer(wan_config("i2v"), WAN_SEED)

    def state(model, strip: str = "") -> dict[str, np.ndarray]:
        return {k.removeprefix(strip): v.detach().float().numpy() for k, v in model.state_dict().items()}

    return {"sd15-unet": state(unet), "sd-vae": state(vae), "clip-text": state(text_encoder, "text_model."),
            "wan-dit": state(wan)}


def convert_family(family: str, sources: dict[str, Path], out: Path, **options) -> Path:
    source, overrides, defaults = CASES[family]
    plan = plan_conversion(sources[source], "ttnn", family=family, overrides=overrides,
                           target_options={**defaults, **options})
    convert(plan, out)
    return out


@pytest.fixture(scope="module")
def outputs(sources, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ttnn-out")
    return {family: convert_family(family, sources, root / family) for family in CASES}


def manifest(folder: Path) -> dict:
    return json.loads((folder / "ttnn_manifest.json").read_text())


def invert(values: np.ndarray, entry: dict, shape: tuple[int, ...]) -> np.ndarray:
    """Undo a tensor's recorded transforms, last first, from the shapes they pass through."""
    steps = [parse_step(s) for s in entry["transforms"]]
    before = [tuple(shape_steps(steps[:i], shape)) for i in range(len(steps))]
    for step, earlier in zip(reversed(steps), reversed(before)):
        if step.name == "transpose":
            values = values.T
        elif step.name == "permute":
            values = np.transpose(values, np.argsort(step.params))
        elif step.name in ("reshape", "squeeze", "unsqueeze", "collapse_leading"):
            values = values.reshape(earlier)
        elif step.name == "group_norm_weight_bias_rm":
            values = packing.unpack_weight_bias(values, earlier[0], step.params["cores"])
        else:
            raise AssertionError(f"no inverse for {step.name}")
    return values


# --------------------------------------------------------------------------- (a) round trip


@pytest.mark.parametrize("family", list(CASES))
def test_round_trip(family, outputs, canonical):
    """Every file read back and layout-inverted equals the reference tensor within its dtype's
    rounding; group-norm masks equal ttnn's packing for the grid and the family's group count."""
    found = manifest(outputs[family])
    source = canonical[family]
    groups = found["config"].get("norm_num_groups")
    masks = 0
    for name, entry in found["tensors"].items():
        values, info = read_tensorbin(outputs[family] / entry["file"])
        assert (info["dtype"], info["layout"], list(info["logical_shape"])) == (entry["dtype"], entry["layout"], entry["shape"])
        if entry["role"] == "group_norm.weight:input_mask":
            channels = source[name.replace("input_mask", "weight")].shape[0]
            assert np.array_equal(values, packing.input_mask(channels, groups, found["grid"]["y"])), name
            masks += 1
            continue
        back = invert(values, entry, source[name].shape)
        expected = source[name] if entry["dtype"] == "float32" else to_bfloat16(source[name])
        assert entry["dtype"] in ("float32", "bfloat16") and np.array_equal(back, expected), name
    # nothing left out: every reference tensor but recomputed buffers (CLIP's position ids)
    assert set(found["tensors"]) - {n for n in found["tensors"] if n.endswith("input_mask")} == \
        {n for n in source if not n.endswith("position_ids")}
    assert masks == sum(e["role"] == "group_norm.weight" for e in found["tensors"].values())


def test_bfloat8_b_packs_linear_weights_from_float32(sources, canonical, tmp_path):
    """--ttnn-dtype bfloat8_b: linear weights (and the 1x1 convs stored as linears) are blocks of
    the float32 source in its stored layout; everything else keeps the dtype its role names."""
    found = manifest(convert_family("sd15-unet", sources, tmp_path / "b8", dtype="bfloat8_b"))["tensors"]
    source = canonical["sd15-unet"]
    dtypes = {e["role"]: e["dtype"] for e in found.values()}
    assert dtypes["linear.weight"] == dtypes["conv2d_1x1.weight"] == "bfloat8_b"
    assert dtypes["linear.bias"] == dtypes["layer_norm.weight"] == "bfloat16" and dtypes["conv2d.weight"] == "float32"
    for name in ("time_embedding.linear_1.weight", "down_blocks.1.attentions.0.proj_out.weight",
                 "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"):
        values, _ = read_tensorbin(tmp_path / "b8" / found[name]["file"])
        stored = source[name].reshape(source[name].shape[:2]).T
        assert np.array_equal(values, to_bfloat8_b(stored)), name


# --------------------------------------------------------------------------- (b) layout rules by role

# family -> canonical name -> (role, layout, dtype, stored shape)
RULES = {
    "sd15-unet": {
        "conv_in.weight": ("conv2d.weight", "ROW_MAJOR", "float32", [32, 4, 3, 3]),  # OIHW, never TILE
        "conv_in.bias": ("conv2d.bias", "ROW_MAJOR", "float32", [1, 1, 1, 32]),
        "down_blocks.1.resnets.0.conv_shortcut.weight": ("conv2d.weight", "ROW_MAJOR", "float32", [64, 32, 1, 1]),
        "down_blocks.0.attentions.0.proj_in.weight": ("conv2d_1x1.weight", "TILE", "bfloat16", [32, 32]),
        "down_blocks.0.attentions.0.proj_out.bias": ("conv2d_1x1.bias", "TILE", "bfloat16", [1, 32]),
        "time_embedding.linear_1.weight": ("linear.weight", "TILE", "bfloat16", [32, 128]),  # [in, out]
        "down_blocks.0.resnets.0.time_emb_proj.bias": ("linear.bias", "TILE", "bfloat16", [1, 32]),
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight": ("linear.weight", "TILE", "bfloat16", [64, 64]),
        "up_blocks.1.attentions.0.transformer_blocks.0.norm3.weight": ("layer_norm.weight", "TILE", "bfloat16", [1, 64]),
        "down_blocks.0.resnets.0.norm1.weight": ("group_norm.weight", "ROW_MAJOR", "bfloat16", [1, 1, 8, 32]),
        "down_blocks.0.resnets.0.norm1.input_mask": ("group_norm.weight:input_mask", "TILE", "bfloat8_b", [1, 32, 32, 32]),
    },
    "sd-vae": {  # grid 4x2: two cores across the channels
        "encoder.conv_in.weight": ("conv2d.weight", "ROW_MAJOR", "float32", [32, 3, 3, 3]),
        "post_quant_conv.bias": ("conv2d.bias", "ROW_MAJOR", "float32", [1, 1, 1, 4]),
        "decoder.mid_block.attentions.0.to_q.weight": ("linear.weight", "TILE", "bfloat16", [64, 64]),
        "decoder.mid_block.attentions.0.to_out.0.bias": ("linear.bias", "TILE", "bfloat16", [1, 64]),
        "decoder.mid_block.attentions.0.group_norm.bias": ("group_norm.bias", "ROW_MAJOR", "bfloat16", [1, 1, 2, 32]),
        "encoder.conv_norm_out.input_mask": ("group_norm.weight:input_mask", "TILE", "bfloat8_b", [1, 32, 32, 32]),
    },
    "clip-text": {
        "embeddings.token_embedding.weight": ("embedding.weight", "ROW_MAJOR", "bfloat16", [1000, 64]),
        "embeddings.position_embedding.weight": ("embedding.weight", "ROW_MAJOR", "bfloat16", [77, 64]),
        "encoder.layers.0.self_attn.q_proj.weight": ("linear.weight", "TILE", "bfloat16", [64, 64]),
        "encoder.layers.1.mlp.fc1.weight": ("linear.weight", "TILE", "bfloat16", [64, 256]),
        "encoder.layers.1.mlp.fc2.bias": ("linear.bias", "TILE", "bfloat16", [1, 64]),
        "final_layer_norm.weight": ("layer_norm.weight", "TILE", "bfloat16", [1, 64]),
    },
    "wan-dit": {
        "patch_embedding.weight": ("patch_conv3d.weight", "TILE", "bfloat16", [1 * 2 * 2 * 36, 64]),
        "patch_embedding.bias": ("patch_conv3d.bias", "TILE", "bfloat16", [1, 64]),
        "blocks.1.scale_shift_table": ("scale_shift_table.scale_shift_table", "TILE", "float32", [1, 1, 6, 64]),
        "scale_shift_table": ("output_scale_shift_table.scale_shift_table", "TILE", "float32", [1, 2, 64]),
        "condition_embedder.time_proj.weight": ("timestep_linear.weight", "TILE", "float32", [64, 384]),
        "condition_embedder.text_embedder.linear_1.weight": ("linear.weight", "TILE", "bfloat16", [32, 64]),
        "blocks.0.attn2.add_k_proj.weight": ("linear.weight", "TILE", "bfloat16", [64, 64]),
        "blocks.0.attn1.norm_q.weight": ("rms_norm.weight", "TILE", "bfloat16", [1, 64]),
        "blocks.0.norm2.bias": ("layer_norm.bias", "TILE", "bfloat16", [1, 64]),
    },
}


@pytest.mark.parametrize("family", list(CASES))
def test_manifest_states_the_layout_rules(family, outputs):
    found = manifest(outputs[family])
    for name, (role, layout, dtype, shape) in RULES[family].items():
        entry = found["tensors"][name]
        assert (entry["role"], entry["layout"], entry["dtype"], entry["shape"]) == (role, layout, dtype, shape), name
        suffix = f"_dtype_{dtype.upper()}_layout_{layout}.tensorbin"
        assert entry["file"] == name + suffix and (outputs[family] / entry["file"]).is_file()
    assert all(e["layout"] == "ROW_MAJOR" for e in found["tensors"].values() if e["role"].startswith("conv2d."))


def test_patch_embedding_rows_follow_tt_dit_patchify(canonical, outputs):
    """Row r of the stored [kt*kh*kw*I, O] weight multiplies element r of a patch flattened as tt_dit
    does (`permute(0, 2, 4, 6, 3, 5, 7, 1)`: kt, kh, kw, then channels), so one matmul is the conv."""
    entry = manifest(outputs["wan-dit"])["tensors"]["patch_embedding.weight"]
    stored, _ = read_tensorbin(outputs["wan-dit"] / entry["file"])
    weight = canonical["wan-dit"]["patch_embedding.weight"]  # [O, I, kt, kh, kw]
    patch = np.random.default_rng(0).standard_normal(weight.shape[1:]).astype(np.float32)  # [I, kt, kh, kw]
    conv = np.einsum("oitkl,itkl->o", to_bfloat16(weight).astype(np.float64), patch)  # stored is bfloat16
    flat = np.transpose(patch, (1, 2, 3, 0)).reshape(-1)
    np.testing.assert_allclose(flat.astype(np.float64) @ stored, conv, rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------- (c) determinism


def test_cli_converts_each_family_deterministically(sources, outputs, tmp_path, monkeypatch):
    """`vidport convert FAMILY SRC --target ttnn` gives the same bytes as the first conversion; with
    vidport's own codec forced too (the same bytes as ttnn.dump_tensor)."""
    def files(folder: Path) -> dict[str, bytes]:
        return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
                if p.is_file() and p.name != "vidport_manifest.json"}  # that one records when and where

    monkeypatch.setenv("VIDPORT_TENSORBIN_ENCODER", "numpy")
    for family, (source, overrides, options) in CASES.items():
        extra = [f"--set={k}={v}" for k, v in overrides.items()] + [f"--ttnn-{k}={v}" for k, v in options.items()]
        result = runner.invoke(app, ["convert", family, str(sources[source]), "--target", "ttnn",
                                     "--out", str(tmp_path / family), *extra])
        assert result.exit_code == 0, result.output
        first = files(outputs[family])
        assert first and first == files(tmp_path / family), family


def test_cache_styles_hold_the_same_tensors(sources, outputs, tmp_path):
    """model_cache nests the files per module; the bytes are those of the as_tensor files. (The
    tt_dit style writes tt_dit's own names, fusions and shards: tests/test_tt_dit_cache.py.)"""
    reference = manifest(outputs["wan-dit"])["tensors"]
    folder = convert_family("wan-dit", sources, tmp_path / "model_cache", cache_style="model_cache")
    found = manifest(folder)["tensors"]
    assert set(found) == set(reference)
    for name, entry in found.items():
        assert (folder / entry["file"]).read_bytes() == (outputs["wan-dit"] / reference[name]["file"]).read_bytes()
    assert (tmp_path / "model_cache" / "wan-dit" / "blocks" / "0" / "attn1" / "to_q" / "weight.tensorbin").is_file()


# --------------------------------------------------------------------------- (d) ttnn loads them


LOADED = {"sd15-unet": ["conv_in.weight", "down_blocks.0.attentions.0.proj_in.weight", "down_blocks.0.resnets.0.norm1.input_mask"],
          "sd-vae": ["decoder.conv_in.bias", "decoder.mid_block.attentions.0.to_v.weight"],
          "clip-text": ["embeddings.token_embedding.weight", "encoder.layers.0.layer_norm1.weight"],
          "wan-dit": ["patch_embedding.weight", "blocks.0.scale_shift_table"]}


@pytest.mark.parametrize("family", list(CASES))
def test_ttnn_as_tensor_loads_the_cache_files(ttnn, family, outputs):
    layouts = {"TILE": ttnn.TILE_LAYOUT, "ROW_MAJOR": ttnn.ROW_MAJOR_LAYOUT}
    found = manifest(outputs[family])["tensors"]
    for name in LOADED[family]:
        entry = found[name]
        ours, _ = read_tensorbin(outputs[family] / entry["file"])
        # a cache hit never reads the tensor argument: None proves the file was found and loaded
        hit = ttnn.as_tensor(None, dtype=getattr(ttnn, entry["dtype"]), layout=layouts[entry["layout"]],
                             cache_file_name=str(outputs[family] / name))
        assert list(hit.shape) == entry["shape"] and hit.dtype == getattr(ttnn, entry["dtype"]) and hit.layout == layouts[entry["layout"]]
        assert np.array_equal(ttnn.to_torch(hit).float().numpy(), ours), name


def test_group_norm_packing_is_ttnns_for_the_sd_families(ttnn, outputs, canonical):
    """Gamma/beta and masks equal ttnn's own helpers at the families' widths, groups and grids."""
    import torch

    for family in ("sd15-unet", "sd-vae"):
        found = manifest(outputs[family])
        cores, groups = found["grid"]["y"], found["config"]["norm_num_groups"]
        for name, entry in found["tensors"].items():
            if entry["role"] not in ("group_norm.weight", "group_norm.weight:input_mask"):
                continue
            values, _ = read_tensorbin(outputs[family] / entry["file"])
            gamma = torch.from_numpy(canonical[family][name.replace("input_mask", "weight")])
            if entry["role"] == "group_norm.weight":
                expected = ttnn.create_group_norm_weight_bias_rm(gamma, gamma.numel(), cores).float().numpy()
                assert np.array_equal(values, to_bfloat16(expected)), name
            else:
                mask = ttnn.create_group_norm_input_mask(gamma.numel(), groups, cores, ttnn.bfloat8_b)
                assert np.array_equal(values, ttnn.to_torch(mask).float().numpy()), name
