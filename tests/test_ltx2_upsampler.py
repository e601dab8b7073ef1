"""The ltx2-upsampler family: both source layouts are real (ltx_core's own loader reads the
original file by its metadata config, diffusers' from_pretrained the Diffusers folder), both
convert to MLX and pass per-layer verify at float32 and bfloat16 against the real library
(ltx_core's LatentUpsampler for the original file: diffusers has no loader for it), a planted
fault is named, and the pixel shuffle keeps diffusers' channel order in the channels-last port."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from vidport.cli import app
from vidport.converter.convert import convert, plan_conversion
from vidport.converter.core.errors import VidportError
from vidport.golden.verify import verify
from fixtures.faults import perturbed_copy
from fixtures.ltx2_upsampler import (VARIANTS, WIDTHS, diffusers_config, official_config, official_model,
                                     original_state, randomize, write_diffusers, write_original)
from fixtures.references import assert_names_reference

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()
OTHER_RELEASES = [v for v in VARIANTS if v != "x2"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """The LTX-2 x2 file and Diffusers folder, and the LTX-2.3 upsampler files."""
    root = tmp_path_factory.mktemp("ltx2_upsampler")
    found = {"original": root / "ltx-2-spatial-upscaler-x2-1.0.safetensors", "diffusers": root / "latent_upsampler"}
    write_original(found["original"], seed=0)
    write_diffusers(found["diffusers"], seed=1)
    for seed, variant in enumerate(OTHER_RELEASES, start=2):
        found[variant] = root / f"ltx-2.3-upscaler-{variant}.safetensors"
        write_original(found[variant], seed=seed, variant=variant)
    return found


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ltx2_upsampler_mlx") / "x2"
    convert(plan_conversion(sources["original"], "mlx"), out)
    return out


def _latents(channels: int, frames: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, channels, frames, 4, 6)).astype(np.float32)


def _mlx_run(folder: Path, latents: np.ndarray) -> np.ndarray:
    import mlx.core as mx

    from vidport.runtime.loading import load_model

    out = load_model(folder)(mx.array(np.ascontiguousarray(np.moveaxis(latents, 1, -1))))
    return np.moveaxis(np.array(out), -1, 1)


# ---------------------------------------------------------------- the sources are real


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_original_layout_is_real(sources, variant):
    """ltx_core's own builder reads the file (its config from the safetensors metadata, as the
    release's is read) and every key of the file is a tensor of that model, none lacking; every key
    is used by the conversion, and the config read off the shapes is the metadata's."""
    from ltx_core.loader.single_gpu_model_builder import SingleGPUModelBuilder
    from ltx_core.model.upsampler import LatentUpsamplerConfigurator
    from safetensors import safe_open

    from vidport.reference.ltx2_upsampler import official_config as as_official

    path = sources["original" if variant == "x2" else variant]
    builder = SingleGPUModelBuilder(LatentUpsamplerConfigurator, str(path))
    model = builder.build(device=torch.device("cpu"))
    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
        metadata = json.loads(handle.metadata()["config"])
    assert builder.model_config() == metadata == official_config(variant)
    assert keys == set(model.state_dict())  # ltx_core loads non-strictly: strictness checked here
    assert not any(t.is_meta for t in model.state_dict().values())
    plan = plan_conversion(path, "mlx")
    assert plan.detected.spec.name == "ltx2-upsampler/original"
    assert {k for recipe in plan.canonical.recipes.values() for k in recipe.inputs} == keys
    public = {k: v for k, v in plan.config.items() if not k.startswith("_")}
    assert public == diffusers_config(variant)
    assert as_official(public) == {k: v for k, v in metadata.items() if k != "_class_name"}


def test_diffusers_layout_is_real(sources):
    """from_pretrained reads the folder; the conversion uses every tensor it holds."""
    from diffusers.pipelines.ltx2 import LTX2LatentUpsamplerModel

    model = LTX2LatentUpsamplerModel.from_pretrained(sources["diffusers"])
    plan = plan_conversion(sources["diffusers"], "mlx")
    assert plan.detected.spec.name == "ltx2-upsampler/diffusers"
    assert set(plan.canonical.recipes) == set(model.state_dict())
    assert {k: plan.config[k] for k in diffusers_config()} == diffusers_config()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_original_to_diffusers_folder_equals_official(sources, variant, tmp_path):
    """The original file converted to a Diffusers folder: diffusers' from_pretrained builds the model
    ltx_core builds from the file, output for output."""
    from diffusers.pipelines.ltx2 import LTX2LatentUpsamplerModel
    from safetensors.torch import load_file

    path = sources["original" if variant == "x2" else variant]
    convert(plan_conversion(path, "diffusers"), tmp_path / "latent_upsampler")
    config = json.loads((tmp_path / "latent_upsampler" / "config.json").read_text())
    assert config["_class_name"] == "LTX2LatentUpsamplerModel"
    ours = LTX2LatentUpsamplerModel.from_pretrained(tmp_path / "latent_upsampler").eval()
    official = official_model(variant)
    official.load_state_dict(load_file(str(path)), strict=True)
    latents = torch.from_numpy(_latents(4))
    with torch.no_grad():
        expected = official(latents)
        assert torch.allclose(ours(latents), expected, atol=1e-6)


# ---------------------------------------------------------------- convert + verify per layer


@pytest.mark.parametrize("source", ["original", "diffusers"])
def test_convert_and_verify(sources, source, tmp_path):
    """float32 against the live reference (saved as a golden), bfloat16 against that golden."""
    golden = tmp_path / "vidport.golden.safetensors"
    for dtype, floor in (("float32", 0.99999), ("bfloat16", 0.999)):
        convert(plan_conversion(sources[source], "mlx", dtype=dtype), tmp_path / dtype)
        report = (verify(tmp_path / dtype, save_to=golden) if dtype == "float32"
                  else verify(tmp_path / dtype, golden=golden))
        assert report.passed, (dtype, report.first_failure)
        assert_names_reference(report, tmp_path / dtype)
        names = {r.name for r in report.layers}
        assert not report.not_in_port
        assert {"upsampler.conv", "upsampler.pixel_shuffle", "res_blocks.0.activation#1", "final_conv"} <= names
        assert min(r.local["pcc"] for r in report.layers) >= floor


@pytest.mark.parametrize("variant", OTHER_RELEASES)
def test_other_releases_convert_and_verify(sources, variant, tmp_path):
    """LTX-2.3's upsamplers (plain x2, x1.5 with its stride-2 blur, temporal x2) at float32."""
    plan = plan_conversion(sources[variant], "mlx")
    assert plan.variant.startswith("LTX-2.3")
    convert(plan, tmp_path / "out")
    report = verify(tmp_path / "out")
    assert report.passed, report.first_failure
    assert_names_reference(report, tmp_path / "out")
    names = {r.name for r in report.layers}
    assert {"upsampler.blur_down" if variant == "x1.5" else "upsampler.1"} <= names
    assert min(r.local["pcc"] for r in report.layers) >= 0.99999


def test_two_dimensional_upsampler_verifies(tmp_path):
    """dims = 2 (no release, diffusers builds it): every convolution is 2-D, frames folded into the
    batch from the start; the rank-generic conv role stores its weights channels-last as well."""
    from diffusers.pipelines.ltx2 import LTX2LatentUpsamplerModel

    randomize(LTX2LatentUpsamplerModel(**{**WIDTHS, "dims": 2}), 5).save_pretrained(tmp_path / "latent_upsampler")
    convert(plan_conversion(tmp_path / "latent_upsampler", "mlx"), tmp_path / "out")
    report = verify(tmp_path / "out")
    assert report.passed, report.first_failure
    assert not report.not_in_port and min(r.local["pcc"] for r in report.layers) >= 0.99999


# ---------------------------------------------------------------- faults are caught


def test_perturbed_tensor_is_named(converted, tmp_path):
    report = verify(perturbed_copy(converted, tmp_path / "broken", "post_upsample_res_blocks.0.conv1.weight"))
    assert not report.passed
    assert report.first_failure == "post_upsample_res_blocks.0.conv1"
    names = [r.name for r in report.layers]
    assert all(r.passed for r in report.layers[: names.index(report.first_failure)])


def test_wrong_rule_is_caught(sources, tmp_path, monkeypatch):
    """A rule exchanging each block's two convolutions (equal shapes) passes every shape check;
    verify against ltx_core catches it at the first block."""
    mappings = tmp_path / "mappings"
    shutil.copytree(ROOT / "mappings", mappings)
    spec = mappings / "ltx2-upsampler" / "original.yaml"
    marker = '  - from: "{stage:res_blocks|post_upsample_res_blocks}.{i}.{layer:conv1|norm1|conv2|norm2}'
    planted = ('  - from: "res_blocks.{i}.conv{n:[12]}.{param}"\n'
               '    to: "res_blocks.{i}.conv{3-n}.{param}"\n')
    text = spec.read_text()
    assert text.count(marker) == 1
    spec.write_text(text.replace(marker, planted + marker))
    monkeypatch.setenv("VIDPORT_MAPPINGS", str(mappings))
    convert(plan_conversion(sources["original"], "mlx"), tmp_path / "out")
    report = verify(tmp_path / "out")
    assert not report.passed
    assert report.first_failure == "res_blocks.0.conv1"


# ---------------------------------------------------------------- the pixel shuffle and the 2x output


def _simplified(x, factors):
    """The shuffle with the channel axis split as (p1, p2, C): right for NHWC-native code, wrong
    for weights trained with diffusers' (C, p1, p2) order."""
    import mlx.core as mx

    n, h, w, c = x.shape
    p1, p2 = factors
    y = x.reshape(n, h, w, p1, p2, c // (p1 * p2)).transpose(0, 1, 3, 2, 4, 5)
    return mx.reshape(y, (n, h * p1, w * p2, c // (p1 * p2)))


@pytest.mark.parametrize("dims, factors", [(1, (2,)), (2, (2, 3)), (3, (2, 3, 2))])
def test_pixel_shuffle_is_diffusers_channel_order(dims, factors):
    """Every output element comes from the input channel diffusers takes it from (distinct factors
    per axis: an exchanged pair of axes shows); the (p1, p2, C) split gives other values."""
    import mlx.core as mx
    from diffusers.pipelines.ltx2.latent_upsampler import PixelShuffleND as Reference

    from vidport.runtime.ltx2.upsampler import PixelShuffleND

    channels = 2 * int(np.prod(factors))
    shape = (1, channels, 2, 3, 4) if dims != 2 else (1, channels, 3, 4)
    x = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    expected = Reference(dims, factors).forward(torch.from_numpy(x)).numpy()
    ours = np.moveaxis(np.array(PixelShuffleND(dims, factors)(mx.array(np.moveaxis(x, 1, -1)))), -1, 1)
    np.testing.assert_array_equal(ours, expected)
    if dims == 2:
        simplified = np.moveaxis(np.array(_simplified(mx.array(np.moveaxis(x, 1, -1)), factors)), -1, 1)
        assert simplified.shape == expected.shape and not np.array_equal(simplified, expected)


def test_simplified_shuffle_fails_verify(converted, monkeypatch):
    """The port with the (p1, p2, C) shuffle: verify names the shuffle as the first failure."""
    from vidport.runtime.ltx2 import upsampler

    monkeypatch.setattr(upsampler.PixelShuffleND, "__call__", lambda self, x: _simplified(x, self.factors))
    report = verify(converted)
    assert not report.passed and report.first_failure == "upsampler.pixel_shuffle"


@pytest.mark.parametrize("variant, size", [("x2", (3, 8, 12)), ("x1.5", (3, 6, 9)), ("temporal-x2", (5, 4, 6))])
def test_output_shape_and_values(sources, variant, size, tmp_path):
    """(F, H, W) = (3, 4, 6) latents come out 2x wider and higher (x2), 1.5x (x1.5), or with
    2F - 1 frames (temporal), equal to ltx_core's output on the same file."""
    from safetensors.torch import load_file

    path = sources["original" if variant == "x2" else variant]
    convert(plan_conversion(path, "mlx"), tmp_path / "out")
    latents = _latents(4, seed=3)
    ours = _mlx_run(tmp_path / "out", latents)
    official = official_model(variant)
    official.load_state_dict(load_file(str(path)), strict=True)
    with torch.no_grad():
        expected = official(torch.from_numpy(latents)).numpy()
    assert ours.shape == expected.shape == (1, 4, *size)
    np.testing.assert_allclose(ours, expected, atol=1e-4)


def test_banded_convolutions_equal_whole(converted, monkeypatch):
    """The Conv3d layers run in bands of rows past the unfold budget: same output."""
    import vidport.runtime.wan_vae_conv as conv

    latents = _latents(4, seed=4)
    whole = _mlx_run(converted, latents)
    monkeypatch.setattr(conv, "UNFOLD_BUDGET_BYTES", 1)
    np.testing.assert_allclose(_mlx_run(converted, latents), whole, atol=1e-5)


# ---------------------------------------------------------------- bad input, and the command line


def _convert_cli(source: Path, out: Path, *extra: str):
    return runner.invoke(app, ["convert", "ltx2-upsampler", str(source), "--target", "mlx", "--out", str(out), *extra])


@pytest.mark.parametrize("edit, named", [
    (lambda s: s.pop("post_upsample_res_blocks.0.norm2.bias"), "post_upsample_res_blocks.0.norm2.bias"),
    (lambda s: s.__setitem__("final_conv.weight", torch.zeros(4, 32, 3, 3)), "final_conv.weight"),
    (lambda s: s.__setitem__("vae.per_channel_statistics.mean-of-means", torch.zeros(4)),
     "vae.per_channel_statistics.mean-of-means"),
])
def test_bad_files_are_refused(edit, named, tmp_path):
    """A missing tensor, a wrong shape, another model's tensor: one line naming it, nothing written."""
    state = original_state(0)
    edit(state)
    write_original(tmp_path / "bad.safetensors", state=state)
    result = _convert_cli(tmp_path / "bad.safetensors", tmp_path / "out")
    assert result.exit_code == 1, result.output
    assert named in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_unsupported_scale_and_bad_latents_are_refused(sources, converted, tmp_path):
    import mlx.core as mx

    from vidport.runtime.loading import load_model

    result = _convert_cli(sources["original"], tmp_path / "out", "--set", "rational_spatial_scale=3.0")
    assert result.exit_code == 1 and "rational_spatial_scale" in result.output
    assert not (tmp_path / "out").exists()
    with pytest.raises(VidportError, match="channels last"):
        load_model(converted)(mx.zeros((1, 4, 3, 4, 6)))  # channels first


def test_cli_convert_and_verify(sources, tmp_path):
    result = _convert_cli(sources["original"], tmp_path / "out")
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["verify", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "LatentUpsampler" in result.output
