"""The sd15-unet family: the LDM single-file layout is real (diffusers' own loader reads it
exactly), both sources convert to MLX and pass per-layer verify at float32 and bfloat16, EMA
copies can be chosen, and the MLX UNet with AnimateDiff motion modules matches diffusers'
UNetMotionModel layer by layer."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vidport.converter.convert import convert, plan_conversion
from vidport.converter.core.errors import VidportError
from vidport.golden.verify import verify
from fixtures.motion import write_config_folder
from fixtures.references import assert_names_reference
from fixtures.sd import SD_UNET_CONFIG

@pytest.fixture(scope="module")
def sd15_sources(tmp_path_factory) -> dict:
    """An SD 1.5 single file (safetensors, EMA-only release layout), a .ckpt carrying EMA copies,
    and a Diffusers unet/ folder; all hold the same UNet (the EMA copies another)."""
    from fixtures.motion import write_sd15_single_file_with_ema, write_sd15_unet_folder
    from fixtures.sd import write_sd_single_file

    root = tmp_path_factory.mktemp("sd15")
    return {
        "ldm": write_sd_single_file(root / "v1-5-pruned-emaonly.safetensors"),
        "ldm-ema": write_sd15_single_file_with_ema(root / "v1-5-pruned.ckpt"),
        "diffusers": write_sd15_unet_folder(root / "unet"),
    }


@pytest.fixture(scope="module")
def unet_mlx(sd15_sources, tmp_path_factory):
    out = tmp_path_factory.mktemp("unet-mlx") / "mlx"
    convert(plan_conversion(sd15_sources["diffusers"], "mlx", "sd15-unet"), out)
    return out


@pytest.mark.parametrize("source", ["ldm", "ldm-ema"])
def test_ldm_layout_is_real(sd15_sources, source, tmp_path):
    """diffusers' from_single_file maps every UNet key of the file and leaves nothing unloaded."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, load_single_file_checkpoint

    config_dir = write_config_folder(tmp_path, "UNet2DConditionModel", SD_UNET_CONFIG)
    model = UNet2DConditionModel.from_single_file(str(sd15_sources[source]), config=str(config_dir),
                                                  local_files_only=True)
    converted = convert_ldm_unet_checkpoint(load_single_file_checkpoint(str(sd15_sources[source])), model.config)
    loaded = model.state_dict()
    assert set(converted) == set(loaded)  # no missing, no unexpected keys
    assert all(torch.equal(loaded[k], v) for k, v in converted.items())


@pytest.mark.parametrize("source", ["ldm", "diffusers"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_convert_and_verify(sd15_sources, source, dtype, tmp_path):
    plan = plan_conversion(sd15_sources[source], "mlx", "sd15-unet", dtype)
    assert plan.config["block_out_channels"] == [32, 64, 64, 64]
    if source == "ldm":
        assert plan.variant.startswith("sd15") and plan.config["attention_head_dim"] == 8
    convert(plan, tmp_path / "out")
    report = verify(tmp_path / "out")
    assert report.passed, report.first_failure
    assert_names_reference(report, tmp_path / "out")
    assert len(report.layers) > 600 and not report.not_in_port
    worst = min(r.local["pcc"] for r in report.layers)
    assert worst >= (0.99999 if dtype == "float32" else 0.999)


def test_ldm_to_diffusers_folder(sd15_sources, tmp_path):
    """LDM -> Diffusers: from_pretrained loads it and every tensor equals the Diffusers original."""
    from diffusers import UNet2DConditionModel

    convert(plan_conversion(sd15_sources["ldm"], "diffusers", "sd15-unet"), tmp_path / "unet")
    loaded = UNet2DConditionModel.from_pretrained(tmp_path / "unet").state_dict()
    original = UNet2DConditionModel.from_pretrained(sd15_sources["diffusers"]).state_dict()
    assert set(loaded) == set(original) and all(torch.equal(loaded[k], original[k]) for k in original)


def test_ema_weights(sd15_sources, tmp_path):
    """--ema converts the model_ema.* copies (and verify builds the reference from them too);
    without it the file's own weights are converted; a file without copies says so."""
    import mlx.core as mx

    from fixtures.motion import sd15_unet

    plain = plan_conversion(sd15_sources["ldm-ema"], "mlx", "sd15-unet")
    ema = plan_conversion(sd15_sources["ldm-ema"], "mlx", "sd15-unet", ema=True)
    assert any("EMA" in w for w in ema.detected.tensors.wrappers)
    convert(plain, tmp_path / "plain")
    manifest = convert(ema, tmp_path / "ema")
    assert manifest["ema"] is True
    for folder, seed in (("plain", 0), ("ema", 100)):
        expected = sd15_unet(seed).state_dict()["conv_in.weight"].numpy().transpose(0, 2, 3, 1)
        np.testing.assert_array_equal(np.array(mx.load(str(tmp_path / folder / "model.safetensors"))["conv_in.weight"]),
                                      expected)
    report = verify(tmp_path / "ema")
    assert report.passed, report.first_failure
    with pytest.raises(VidportError, match="no EMA weights"):
        plan_conversion(sd15_sources["ldm"], "mlx", "sd15-unet", ema=True)


def test_when_clause_keeps_ldm_slots_strict(tmp_path):
    """A resnet where LDM has the downsampler matches no rule (the `when` fails), with a hint."""
    from vidport.converter.plan import map_keys
    from vidport.converter.spec import SpecError, load_catalog, load_source_spec

    spec = next(s for s in load_catalog().family("sd15-unet").sources if s.source == "ldm")
    good = {"input_blocks.4.0.in_layers.0.weight": (64,), "input_blocks.3.0.op.weight": (32, 32, 3, 3)}
    mapped = map_keys(good, spec.rules, "ldm.yaml").recipes
    assert set(mapped) == {"down_blocks.1.resnets.0.norm1.weight", "down_blocks.0.downsamplers.0.conv.weight"}
    with pytest.raises(VidportError, match="input_blocks.3.0.in_layers.0.weight") as err:
        map_keys({"input_blocks.3.0.in_layers.0.weight": (32,)}, spec.rules, "ldm.yaml")
    assert "closest rule" in str(err.value)
    path = tmp_path / "x.yaml"
    path.write_text("spec: t/x\nversion: 1\nfamily: t\nsource: x\nrules:\n"
                    "  - {from: 'a.{n}.b', when: 'm > 1', to: 'c.{n}'}\n")
    with pytest.raises(SpecError, match="x.yaml:6: 'when' uses placeholder"):
        load_source_spec(path)
    path.write_text("spec: t/x\nversion: 1\nfamily: t\nsource: x\nrules:\n"
                    "  - {from: 'a.{n}.b', when: 'open(n)', to: 'c.{n}'}\n")
    with pytest.raises(SpecError, match="x.yaml:6"):
        load_source_spec(path)


def test_motion_unet_parity(unet_mlx, sd15_sources, tmp_path):
    """Our MLX UNetMotionModel (an sd15-unet and an animatediff-motion conversion, loaded together)
    against diffusers' UNetMotionModel.from_unet2d(unet, adapter), every layer, float32."""
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    from vidport.golden.capture_torch import capture_reference
    from vidport.golden.compare import compare_port
    from vidport.golden.metrics import threshold_for
    from fixtures.motion import motion_adapter_config, random_motion_adapter
    from vidport.reference.sd15_unet import motion_probes
    from vidport.runtime.unet_motion import load_unet_motion

    random_motion_adapter(motion_adapter_config("v2"), seed=5).save_pretrained(str(tmp_path / "adapter"))
    convert(plan_conversion(tmp_path / "adapter", "mlx", "animatediff-motion"), tmp_path / "adapter-mlx")
    ours = load_unet_motion(unet_mlx, tmp_path / "adapter-mlx")

    unet = UNet2DConditionModel.from_pretrained(sd15_sources["diffusers"])
    reference = UNetMotionModel.from_unet2d(unet, MotionAdapter.from_pretrained(tmp_path / "adapter")).eval()
    probes = motion_probes(SD_UNET_CONFIG, seed=0, frames=4)
    report = compare_port(ours, probes, capture_reference(reference, probes), threshold_for("float32"), "float32")
    assert report.passed, report.first_failure
    assert not report.not_in_port
    assert sum(".motion_modules." in r.name for r in report.layers) > 300  # mid block included (v2)
    assert any(r.name.startswith("mid_block.motion_modules.0") for r in report.layers)


def test_sdxl_motion_module_on_sd15_unet_is_refused(unet_mlx, motion_sources, tmp_path, monkeypatch):
    """An SDXL motion module (3 blocks) on an SD 1.5 UNet: refused from the configs, before any
    weight is read."""
    from vidport.runtime import loading
    from vidport.runtime.unet_motion import load_unet_motion

    convert(plan_conversion(motion_sources["sdxl-beta"], "mlx"), tmp_path / "sdxl-mm")
    monkeypatch.setattr(loading, "load_weights", lambda *a: pytest.fail("weights read before the check"))
    with pytest.raises(VidportError, match=r"3 blocks .*SDXL motion module on an SD 1.5 UNet"):
        load_unet_motion(unet_mlx, tmp_path / "sdxl-mm")
    with pytest.raises(VidportError, match="expected animatediff-motion"):
        load_unet_motion(unet_mlx, unet_mlx)


@pytest.fixture(scope="module")
def linear_projection_unet(tmp_path_factory):
    """A Diffusers unet/ folder with `use_linear_projection: true` (SD 2.x-style projections, also
    found in some SD 1.5 fine-tunes): proj_in / proj_out are 2-D linears, not 1x1 convolutions."""
    from diffusers import UNet2DConditionModel

    from fixtures.sd import randomize

    folder = tmp_path_factory.mktemp("unet-linear-projection") / "unet"
    randomize(UNet2DConditionModel(**SD_UNET_CONFIG, use_linear_projection=True), 7).save_pretrained(str(folder))
    return folder


def test_linear_projection_converts_and_verifies(linear_projection_unet, tmp_path):
    """The proj_in / proj_out roles follow the config, not the key: linears convert as linears and
    the MLX UNet built from the config matches diffusers layer by layer."""
    plan = plan_conversion(linear_projection_unet, "mlx", "sd15-unet")
    assert plan.config["use_linear_projection"] is True
    convert(plan, tmp_path / "out")
    report = verify(tmp_path / "out")
    assert report.passed, report.first_failure
    projections = [r for r in report.layers if r.name.endswith(("proj_in", "proj_out"))]
    assert {r.kind for r in projections} == {"Linear"}
    assert len(projections) == 2 * (3 * 2 + 1 + 3 * 3)  # the down, mid and up spatial transformers
    assert min(r.local["pcc"] for r in projections) >= 0.99999


def test_linear_projection_ttnn_stores_linears(linear_projection_unet, tmp_path):
    """On TTNN the linear projections are [in, out] TILE linears, equal to diffusers' weight.T."""
    import json

    from diffusers import UNet2DConditionModel

    from vidport.converter.core.tensorbin import read_tensorbin

    convert(plan_conversion(linear_projection_unet, "ttnn", "sd15-unet"), tmp_path / "tt")
    entry = json.loads((tmp_path / "tt" / "ttnn_manifest.json").read_text())["tensors"]["mid_block.attentions.0.proj_in.weight"]
    assert entry["role"] == "linear.weight" and entry["layout"] == "TILE"
    stored, _ = read_tensorbin(tmp_path / "tt" / entry["file"])
    expected = UNet2DConditionModel.from_pretrained(linear_projection_unet).state_dict()["mid_block.attentions.0.proj_in.weight"]
    np.testing.assert_allclose(stored.astype(np.float32), expected.T.to(torch.bfloat16).float().numpy())
