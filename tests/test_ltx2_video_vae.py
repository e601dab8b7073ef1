"""The ltx2-video-vae family: both source layouts are real (the original single file is what
Lightricks' ltx_core builds and loads, and diffusers' from_single_file reads; the Diffusers folder
is what from_pretrained reads), both convert to MLX and pass per-layer verify against diffusers at
float32 and bfloat16, and the flat-to-nested block mapping holds for any block count."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from vidport.cli import app
from vidport.converter.convert import convert, plan_conversion
from vidport.converter.core.errors import VidportError
from vidport.golden.verify import verify
from fixtures.faults import perturbed_copy
from fixtures.references import assert_names_reference
from fixtures.ltx2_video_vae import CONFIG, PREFIX, video_vae_config, write_diffusers, write_original
from fixtures.motion import write_config_folder

runner = CliRunner()
TIMESTEP = video_vae_config(timestep_conditioning=True, decoder_causal=True)
# statistics the model never reads: ltx_core's loader skips them, diffusers drops them
UNUSED_STATS = {"vae.per_channel_statistics.channel", "vae.per_channel_statistics.mean-of-stds"}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ltx2_video_vae")
    found = {"original": root / "ltx-2-19b-dev.safetensors", "diffusers": root / "vae", "timestep": root / "vae-t"}
    write_original(found["original"], seed=0)
    write_diffusers(found["diffusers"], seed=1)
    write_diffusers(found["timestep"], seed=2, config=TIMESTEP)
    return found


def _official(path: Path):
    """ltx_core's VideoEncoder / VideoDecoder as its own builder makes them from the file (config
    from the file's metadata, keys through its COMFY filters), and the state dicts it loaded."""
    from ltx_core.loader.registry import DummyRegistry
    from ltx_core.loader.single_gpu_model_builder import SingleGPUModelBuilder
    from ltx_core.model.video_vae import (VAE_DECODER_COMFY_KEYS_FILTER, VAE_ENCODER_COMFY_KEYS_FILTER,
                                          VideoDecoderConfigurator, VideoEncoderConfigurator)

    built = []
    for configurator, ops in ((VideoEncoderConfigurator, VAE_ENCODER_COMFY_KEYS_FILTER),
                              (VideoDecoderConfigurator, VAE_DECODER_COMFY_KEYS_FILTER)):
        builder = SingleGPUModelBuilder(model_class_configurator=configurator, model_path=str(path), model_sd_ops=ops)
        state = builder.load_sd([str(path)], DummyRegistry(), torch.device("cpu"), ops).sd
        built.append((builder.build(device=torch.device("cpu")).eval(), state))
    return built


# ---------------------------------------------------------------- the layouts are real


def test_original_layout_is_real(sources, tmp_path):
    """ltx_core builds its encoder and decoder from the file's own config and every tensor it
    loads fits (all it needs present, nothing else but two unused statistics); diffusers'
    from_single_file reads the file; our plan takes exactly diffusers' own conversion."""
    from diffusers import AutoencoderKLLTX2Video
    from diffusers.loaders.single_file_utils import convert_ltx2_vae_to_diffusers

    path = sources["original"]
    for model, state in _official(path):
        assert set(model.state_dict()) <= set(state)
        assert {f"vae.{k}" for k in set(state) - set(model.state_dict())} == UNUSED_STATS
        model.load_state_dict({k: v for k, v in state.items() if k in model.state_dict()}, strict=True)

    file = load_file(str(path))
    folder = write_config_folder(tmp_path, "AutoencoderKLLTX2Video", CONFIG)
    loaded = AutoencoderKLLTX2Video.from_single_file(dict(file), config=str(folder), local_files_only=True).state_dict()
    ours = plan_conversion(path, "diffusers")
    assert set(ours.final.recipes) == set(loaded)
    theirs = convert_ltx2_vae_to_diffusers({k: v for k, v in file.items() if k.startswith(PREFIX)})
    assert set(theirs) == set(loaded)
    for canonical, recipe in ours.canonical.recipes.items():
        assert torch.equal(theirs[canonical], file[PREFIX + recipe.inputs[0]]), canonical
    assert {PREFIX + k for k, _ in ours.canonical.dropped} == UNUSED_STATS


@pytest.mark.parametrize("source", ["diffusers", "timestep"])
def test_diffusers_layout_is_real(sources, source):
    from diffusers import AutoencoderKLLTX2Video

    model = AutoencoderKLLTX2Video.from_pretrained(sources[source])
    plan = plan_conversion(sources[source], "diffusers")
    assert set(plan.final.recipes) == set(model.state_dict())
    assert plan.config["timestep_conditioning"] is (source == "timestep")


def test_detection_and_config(sources):
    """The original file's config comes from its shapes and the release table alone; the other
    parts of the single file are not taken."""
    plan = plan_conversion(sources["original"], "mlx")
    assert plan.detected.spec.name == "ltx2-video-vae/original" and plan.variant == "LTX-2 video VAE"
    assert {k: plan.config.get(k) for k in CONFIG} == CONFIG
    assert not any(k.startswith(("audio_vae", "model.", "vocoder")) for k in plan.canonical.recipes)
    assert plan_conversion(sources["diffusers"], "mlx").detected.spec.name == "ltx2-video-vae/diffusers"


# ---------------------------------------------------------------- convert + verify per layer


@pytest.mark.parametrize("source, frames", [("original", 9), ("diffusers", 1), ("timestep", 1)])
def test_convert_and_verify(sources, source, frames, tmp_path):
    """float32 against the live reference, then bfloat16 (against the saved golden where the
    calls can be stored: the timestep embedders are passed a torch dtype, so that one runs live).
    Nine frames run the temporal samplers on several frames; one frame keeps the others quick."""
    golden = tmp_path / "vidport.golden.safetensors" if source != "timestep" else None
    for dtype, floor in (("float32", 0.99999), ("bfloat16", 0.999)):
        convert(plan_conversion(sources[source], "mlx", dtype=dtype), tmp_path / dtype)
        if dtype == "float32" or golden is None:
            report = verify(tmp_path / dtype, frames=frames, save_to=golden)
        else:
            report = verify(tmp_path / dtype, golden=golden)
        assert report.passed, (dtype, report.first_failure)
        assert_names_reference(report, tmp_path / dtype)
        assert not report.not_in_port and not report.uncompared_outputs and len(report.layers) > 150
        names = {r.name.split("#")[0] for r in report.layers}
        assert {"encoder.mid_block.resnets.1.conv2.conv", "decoder.up_blocks.2.upsamplers.0",
                "encoder.down_blocks.1.downsamplers.0", "encoder", "decoder"} <= names
        if source == "timestep":
            assert {"decoder.time_embedder", "decoder.mid_block.time_embedder"} <= names
        assert min(r.local["pcc"] for r in report.layers) >= floor


def test_planted_fault_is_named(sources, tmp_path):
    convert(plan_conversion(sources["original"], "mlx"), tmp_path / "ok")
    broken = perturbed_copy(tmp_path / "ok", tmp_path / "broken", "decoder.up_blocks.1.resnets.0.conv1.conv.weight")
    report = verify(broken, frames=1)
    assert not report.passed
    assert report.first_failure == "decoder.up_blocks.1.resnets.0.conv1.conv"
    names = [r.name for r in report.layers]
    assert all(r.passed for r in report.layers[: names.index(report.first_failure)])


def test_wrong_rule_is_named(sources, tmp_path, monkeypatch):
    """A rule that reverses the encoder mid block's resnets passes every shape check (they are
    alike); verify names the first layer that got the other one's weights."""
    import shutil

    mappings = tmp_path / "mappings"
    shutil.copytree(Path(__file__).resolve().parent.parent / "mappings", mappings)
    spec = mappings / "ltx2-video-vae" / "original.yaml"
    right = '    to: "encoder.mid_block.resnets.{i}.{rest}"'
    assert spec.read_text().count(right) == 1
    spec.write_text(spec.read_text().replace(right, '    to: "encoder.mid_block.resnets.{1-i}.{rest}"'))
    monkeypatch.setenv("VIDPORT_MAPPINGS", str(mappings))
    convert(plan_conversion(sources["original"], "mlx"), tmp_path / "out")
    report = verify(tmp_path / "out", frames=1)
    assert not report.passed
    assert report.first_failure == "encoder.mid_block.resnets.0.conv1.conv"


# ---------------------------------------------------------------- the flat-to-nested block mapping


def test_flat_lists_map_as_diffusers_converter_does(sources):
    """At the released block count every flat entry lands where diffusers' own table puts it:
    encoder entry 8 (the last res_x) is the mid block, odd entries the stage's downsampler, and
    decoder entry 0 the mid block, odd entries the *following* stage's upsampler. An index taken
    over as it is, or the parity read the other way round on either side, moves keys and fails."""
    plan = plan_conversion(sources["original"], "diffusers")
    source_of = {canonical: recipe.inputs[0] for canonical, recipe in plan.canonical.recipes.items()}
    assert source_of["encoder.mid_block.resnets.1.conv1.conv.weight"] == "encoder.down_blocks.8.res_blocks.1.conv1.conv.weight"
    assert source_of["encoder.down_blocks.3.downsamplers.0.conv.conv.weight"] == "encoder.down_blocks.7.conv.conv.weight"
    assert source_of["encoder.down_blocks.2.resnets.1.conv2.conv.bias"] == "encoder.down_blocks.4.res_blocks.1.conv2.conv.bias"
    assert source_of["decoder.mid_block.resnets.0.conv1.conv.weight"] == "decoder.up_blocks.0.res_blocks.0.conv1.conv.weight"
    assert source_of["decoder.up_blocks.0.upsamplers.0.conv.conv.weight"] == "decoder.up_blocks.1.conv.conv.weight"
    assert source_of["decoder.up_blocks.2.resnets.1.conv2.conv.weight"] == "decoder.up_blocks.6.res_blocks.1.conv2.conv.weight"


# Three encoder stages and two decoder stages: diffusers' hard-coded table (down_blocks.0..8,
# up_blocks.0..6) does not describe such a file; ltx_core builds it from its config like any other.
SMALL = video_vae_config(
    block_out_channels=[8, 16, 32], layers_per_block=[1, 2, 1, 2], spatio_temporal_scaling=[True, True, True],
    downsample_type=["spatial", "temporal", "spatiotemporal"], decoder_block_out_channels=[16, 32],
    decoder_layers_per_block=[2, 1, 1], decoder_spatio_temporal_scaling=[True, True],
    decoder_inject_noise=[False, False, False], upsample_type=["spatiotemporal", "spatiotemporal"],
    upsample_residual=[True, True], upsample_factor=[2, 2], down_block_types=["LTX2VideoDownBlock3D"] * 3,
    spatial_compression_ratio=16, temporal_compression_ratio=4)
STRUCTURE = ("spatio_temporal_scaling", "downsample_type", "decoder_spatio_temporal_scaling", "decoder_inject_noise",
             "upsample_type", "upsample_residual", "upsample_factor", "decoder_causal", "spatial_compression_ratio",
             "temporal_compression_ratio")


def test_other_block_counts_map_as_ltx_core_builds_them(tmp_path):
    """A file with three encoder / two decoder stages: diffusers' converter sends entry 6 (now the
    mid block) to down_blocks.3 and cannot load it; our rules (parity, and max_n for the encoder's
    last res_x) map it, the widths and depths come from its shapes, and the Diffusers model built
    from the conversion encodes and decodes exactly as ltx_core's own models on the file."""
    from diffusers import AutoencoderKLLTX2Video
    from diffusers.loaders.single_file_utils import convert_ltx2_vae_to_diffusers

    path = tmp_path / "small.safetensors"
    write_original(path, seed=5, config=SMALL)
    file = load_file(str(path))
    expected = set(AutoencoderKLLTX2Video(**SMALL).state_dict())
    theirs = convert_ltx2_vae_to_diffusers({k: v for k, v in file.items() if k.startswith(PREFIX)})
    assert "encoder.down_blocks.3.resnets.0.conv1.conv.weight" in theirs and set(theirs) != expected

    plan = plan_conversion(path, "diffusers", overrides={k: SMALL[k] for k in STRUCTURE})
    assert plan.variant is None
    assert {k: plan.config[k] for k in ("block_out_channels", "layers_per_block", "decoder_block_out_channels",
                                        "decoder_layers_per_block", "latent_channels")} == {
        k: SMALL[k] for k in ("block_out_channels", "layers_per_block", "decoder_block_out_channels",
                              "decoder_layers_per_block", "latent_channels")}
    convert(plan, tmp_path / "vae")
    ours = AutoencoderKLLTX2Video.from_pretrained(tmp_path / "vae").eval()

    (encoder, _), (decoder, _) = _official(path)
    mean, std = ours.latents_mean.view(1, -1, 1, 1, 1), ours.latents_std.view(1, -1, 1, 1, 1)
    generator = torch.Generator().manual_seed(0)
    video = torch.rand((1, 3, 9, 32, 48), generator=generator) * 2 - 1
    latents = torch.randn((1, SMALL["latent_channels"], 3, 2, 3), generator=generator)
    with torch.no_grad():
        encoded = (ours.encode(video).latent_dist.mean - mean) / std
        torch.testing.assert_close(encoded, encoder(video), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ours.decode(latents * std + mean).sample, decoder(latents), atol=1e-5, rtol=1e-4)


def test_timestep_conditioned_original_maps_as_ltx_core_builds_it(tmp_path):
    """A decoder with timestep conditioning (per-block time embedders and scale-shift tables, the
    last modulation as `last_time_embedder` / `last_scale_shift_table`): diffusers' single-file
    table has no rule for it; ours maps it, and the converted model decodes as ltx_core's decoder
    (its decode noise set to zero) at the same timestep."""
    from diffusers import AutoencoderKLLTX2Video

    config = video_vae_config(timestep_conditioning=True)
    path = tmp_path / "ltx-t.safetensors"
    write_original(path, seed=6, config=config)
    plan = plan_conversion(path, "diffusers")
    assert plan.config["timestep_conditioning"] is True and plan.variant == "LTX-2 video VAE"
    convert(plan, tmp_path / "vae")
    ours = AutoencoderKLLTX2Video.from_pretrained(tmp_path / "vae").eval()
    _, (decoder, _) = _official(path)
    decoder.decode_noise_scale = 0.0
    mean, std = ours.latents_mean.view(1, -1, 1, 1, 1), ours.latents_std.view(1, -1, 1, 1, 1)
    latents = torch.randn((1, config["latent_channels"], 2, 2, 3), generator=torch.Generator().manual_seed(1))
    timestep = torch.tensor([0.05])
    with torch.no_grad():
        expected = decoder(latents, timestep)
        torch.testing.assert_close(ours.decode(latents * std + mean, timestep).sample, expected, atol=1e-5, rtol=1e-4)
        assert (ours.decode(latents * std + mean, timestep * 4).sample - expected).abs().max() > 1e-3


def test_non_alternating_list_is_refused(tmp_path):
    """Two samplers in a row (a list the parity rule does not describe) leave keys no rule takes."""
    write_original(tmp_path / "a.safetensors")
    state = load_file(str(tmp_path / "a.safetensors"))
    moved = {k.replace("encoder.down_blocks.2.", "encoder.down_blocks.3x."): v for k, v in state.items()}
    moved = {k.replace("encoder.down_blocks.3.", "encoder.down_blocks.2."): v for k, v in moved.items()}
    moved = {k.replace("encoder.down_blocks.3x.", "encoder.down_blocks.3."): v for k, v in moved.items()}
    save_file(moved, str(tmp_path / "b.safetensors"))
    with pytest.raises(VidportError, match="match no rule"):
        plan_conversion(tmp_path / "b.safetensors", "mlx")


# ---------------------------------------------------------------- bad input, the CLI, the runtime


@pytest.mark.parametrize("fault", ["missing", "shape"])
def test_bad_file_is_refused_with_nothing_written(sources, tmp_path, fault):
    state = load_file(str(sources["original"]))
    key = "vae.decoder.up_blocks.4.res_blocks.0.conv2.conv.weight"
    if fault == "missing":
        del state[key]
    else:
        state[key] = torch.zeros(3, 3, 3, 3, 3)
    save_file(state, str(tmp_path / "bad.safetensors"))
    result = runner.invoke(app, ["convert", "ltx2-video-vae", str(tmp_path / "bad.safetensors"), "--target", "mlx",
                                 "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "decoder.up_blocks.1.resnets.0.conv2.conv.weight" in result.output  # the nested name of flat entry 4
    assert ("not produced" if fault == "missing" else "from source key decoder.up_blocks.4.res_blocks.0") in result.output
    assert not (tmp_path / "out").exists()


def test_cli_convert_and_verify(sources, tmp_path):
    out = tmp_path / "mlx"
    result = runner.invoke(app, ["convert", "ltx2-video-vae", str(sources["original"]), "--target", "mlx",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["verify", str(out), "--frames", "1", "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passed"] and report["reference"] == "diffusers:AutoencoderKLLTX2Video.from_single_file"


def test_runtime_refuses_bad_video_and_needs_a_timestep(sources, tmp_path):
    import mlx.core as mx

    from vidport.runtime.loading import load_model

    convert(plan_conversion(sources["timestep"], "mlx"), tmp_path / "t")
    model = load_model(tmp_path / "t")
    with pytest.raises(VidportError, match="1 \\+ 8k frames"):
        model.encode(mx.zeros((1, 8, 32, 32, 3)))
    with pytest.raises(VidportError, match="multiples of 32"):
        model.encode(mx.zeros((1, 9, 32, 48, 3)))
    with pytest.raises(VidportError, match="timestep"):
        model.decode(mx.zeros((1, 2, 1, 1, 4)))
    assert model.encode(mx.zeros((1, 9, 32, 64, 3))).shape == (1, 2, 1, 2, 8)


@pytest.mark.parametrize("temporal", [False, True])
def test_tiled_decode_equals_diffusers(sources, tmp_path, temporal):
    """Spatial tiles of 3 latent pixels every 2 (96 / 64 pixels; every tile at least 2 wide, which
    the reflect padding needs), blended, and with framewise decoding runs of 2 + 1 latent frames
    every 1, blended in time: as diffusers' tiled decode."""
    import mlx.core as mx
    from diffusers import AutoencoderKLLTX2Video

    from vidport.runtime.loading import load_model
    from vidport.runtime.ltx2.video_vae_tiling import Tiling

    reference = AutoencoderKLLTX2Video.from_pretrained(sources["diffusers"]).eval()
    reference.enable_tiling(96, 96, 16, 64, 64, 8)
    reference.use_framewise_decoding = temporal
    convert(plan_conversion(sources["diffusers"], "mlx"), tmp_path / "mlx")
    model = load_model(tmp_path / "mlx")
    model.enable_tiling(Tiling(96, 96, 16, 64, 64, 8, spatial=True, temporal=temporal))
    latents = np.random.default_rng(3).standard_normal((1, 4, 3 if temporal else 2, 4, 4)).astype(np.float32)
    with torch.no_grad():
        expected = reference.decode(torch.from_numpy(latents)).sample.numpy()
        plain = reference.decoder(torch.from_numpy(latents)).numpy()
    ours = np.moveaxis(np.array(model.decode(mx.array(np.moveaxis(latents, 1, -1)))), -1, 1)
    assert ours.shape == expected.shape == plain.shape
    assert np.abs(expected - plain).max() > 1e-2  # tiling changes the result: the blend is what is compared
    np.testing.assert_allclose(ours, expected, atol=1e-4)
