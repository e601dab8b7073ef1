"""The ltx2-audio-vae family: both source layouts are real (the original single file read by
Lightricks' ltx_core and by diffusers' own conversion function, the Diffusers folder by
from_pretrained), convert to MLX and pass per-layer verify against diffusers at float32 and
bfloat16; the port is causal in time as diffusers is, and its latents statistics are the file's."""
from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from vidport.cli import app
from vidport.converter.convert import convert, plan_conversion
from vidport.converter.core.errors import VidportError
from vidport.converter.spec import load_catalog
from vidport.golden.verify import verify
from fixtures.faults import perturbed_copy
from fixtures.ltx2_audio_vae import CONFIG, DIFFUSERS_CONFIG, PREFIX, official_models, write_diffusers, write_original
from fixtures.references import assert_names_reference

ROOT = Path(__file__).resolve().parent.parent
CANONICAL = "diffusers:AutoencoderKLLTX2Audio"
runner = CliRunner()


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ltx2_audio_vae")
    write_original(root / "ltx-2-19b-dev.safetensors", seed=0)
    write_diffusers(root / "audio_vae", seed=1)
    return {"original": root / "ltx-2-19b-dev.safetensors", "diffusers": root / "audio_vae"}


@pytest.fixture(scope="module")
def mlx_models(sources, tmp_path_factory) -> dict[str, Path]:
    """Each source converted to MLX at float32."""
    root = tmp_path_factory.mktemp("ltx2_audio_vae_mlx")
    for name, path in sources.items():
        convert(plan_conversion(path, "mlx"), root / name)
    return {name: root / name for name in sources}


@pytest.fixture(scope="module")
def goldens(mlx_models, tmp_path_factory) -> dict[str, tuple]:
    """Each float32 conversion verified against its live reference, the run saved as a golden
    (the bfloat16 conversions and the planted faults are compared with it)."""
    root = tmp_path_factory.mktemp("ltx2_audio_vae_goldens")
    return {name: (verify(folder, save_to=root / f"{name}.golden.safetensors"), root / f"{name}.golden.safetensors")
            for name, folder in mlx_models.items()}


def _reference(path: Path):
    """verify's reference for this source, built as verify builds it."""
    from vidport.reference.build import load_reference

    plan = plan_conversion(path, "mlx")
    spec = plan.detected.spec
    config = {"_class_name": "AutoencoderKLLTX2Audio", **{k: v for k, v in plan.config.items() if not k.startswith("_")}}
    return load_reference(CANONICAL, spec.reference, path, config, select=spec.select_prefixes)


def _official(path: Path):
    """ltx_core's AudioEncoder and AudioDecoder holding the original file's audio VAE, each loaded
    strictly through ltx_core's own key filters (the ones its model builder applies)."""
    from ltx_core.model.audio_vae.model_configurator import (AUDIO_VAE_DECODER_COMFY_KEYS_FILTER,
                                                             AUDIO_VAE_ENCODER_COMFY_KEYS_FILTER)

    state = load_file(str(path))
    encoder, decoder = official_models(CONFIG)
    used: set[str] = set()
    for model, ops in ((encoder, AUDIO_VAE_ENCODER_COMFY_KEYS_FILTER), (decoder, AUDIO_VAE_DECODER_COMFY_KEYS_FILTER)):
        mapped = {ops.apply_to_key(key): (key, tensor) for key, tensor in state.items() if ops.apply_to_key(key)}
        model.load_state_dict({name: tensor for name, (_, tensor) in mapped.items()}, strict=True)
        used |= {key for key, _ in mapped.values()}
    return encoder, decoder, used, state


def _mlx(folder: Path):
    from vidport.runtime.loading import load_model

    return load_model(folder)


def _channels_last(array: np.ndarray):
    import mlx.core as mx

    return mx.array(np.ascontiguousarray(np.moveaxis(array, 1, -1)))


def _numpy(array) -> np.ndarray:
    return np.moveaxis(np.array(array), -1, 1)


def _mel(frames: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 2, frames, 64)).astype(np.float32)


# ---------------------------------------------------------------- the sources are real


def test_original_layout_is_real(sources):
    """ltx_core's encoder and decoder load the file's `audio_vae.` tensors strictly through its own
    key filters, every one used; diffusers gives the class no from_single_file but registers a
    conversion function, through which its model loads the same sub-tree strictly; our mapping
    puts every tensor where that function does."""
    from diffusers import AutoencoderKLLTX2Audio
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES

    _, _, used, state = _official(sources["original"])
    assert used == {key for key in state if key.startswith(PREFIX)}
    assert not hasattr(AutoencoderKLLTX2Audio, "from_single_file")
    assert "AutoencoderKLLTX2Audio" in SINGLE_FILE_LOADABLE_CLASSES

    loaded = _reference(sources["original"]).state_dict()
    plan = plan_conversion(sources["original"], "diffusers")
    assert set(plan.final.recipes) == set(loaded)
    for canonical, recipe in plan.canonical.recipes.items():
        assert torch.equal(loaded[canonical], state[PREFIX + recipe.inputs[0]]), canonical


def test_diffusers_layout_is_real(sources):
    from diffusers import AutoencoderKLLTX2Audio

    model = AutoencoderKLLTX2Audio.from_pretrained(sources["diffusers"])
    plan = plan_conversion(sources["diffusers"], "diffusers")
    assert set(plan.final.recipes) == set(model.state_dict())
    assert plan.detected.spec.name == "ltx2-audio-vae/diffusers"
    assert {k: plan.config[k] for k in DIFFUSERS_CONFIG} == DIFFUSERS_CONFIG


def test_detection_config_and_defaults(sources):
    """The original sub-tree is found in the single file and detected as this family; the shapes
    give the widths, the rest is diffusers' own defaults (the release's), recorded as assumed."""
    from diffusers import AutoencoderKLLTX2Audio

    plan = plan_conversion(sources["original"], "mlx")
    assert plan.detected.spec.name == "ltx2-audio-vae/original"
    assert {k: plan.config[k] for k in CONFIG} == CONFIG
    family = load_catalog().family("ltx2-audio-vae")
    assert set(plan.assumed) == set(family.defaults)
    signature = inspect.signature(AutoencoderKLLTX2Audio.__init__).parameters
    for name, value in family.defaults.items():
        default = signature[name].default
        assert (list(default) if isinstance(default, tuple) else default) == value, name
    (release,) = plan.detected.spec.variants
    assert release.config == family.defaults  # every LTX-2 release is diffusers' default model
    assert plan_conversion(sources["original"], "mlx", overrides={"mel_bins": 32}).config["mel_bins"] == 32


def test_reference_equals_official_code(sources):
    """diffusers' model through its conversion function (verify's reference for the original file)
    computes what ltx_core computes on the file: ltx_core's encoder returns the latents normalized
    by the file's statistics (diffusers' pipeline normalizes the packed posterior mode with
    latents_mean / latents_std), its decoder takes normalized latents."""
    from diffusers.pipelines.ltx2.pipeline_ltx2 import LTX2Pipeline as P

    encoder, decoder, _, _ = _official(sources["original"])
    reference = _reference(sources["original"])
    mel = torch.from_numpy(_mel(17))
    with torch.no_grad():
        raw = reference.encode(mel).latent_dist.mode()
        packed = P._normalize_audio_latents(P._pack_audio_latents(raw), reference.latents_mean, reference.latents_std)
        normalized = P._unpack_audio_latents(packed, raw.shape[2], raw.shape[3])
        assert torch.allclose(normalized, encoder(mel), atol=1e-5)
        z = torch.randn(normalized.shape, generator=torch.Generator().manual_seed(3))
        denormalized = P._unpack_audio_latents(
            P._denormalize_audio_latents(P._pack_audio_latents(z), reference.latents_mean, reference.latents_std),
            z.shape[2], z.shape[3])
        assert torch.allclose(reference.decode(denormalized).sample, decoder(z), atol=1e-5)


# ---------------------------------------------------------------- convert + verify per layer


@pytest.mark.parametrize("source", ["original", "diffusers"])
def test_convert_and_verify(sources, mlx_models, goldens, source, tmp_path):
    """float32 against the live reference (saved as a golden), then bfloat16 against that golden:
    every layer, local and global."""
    live, golden = goldens[source]
    assert json.loads((mlx_models[source] / "vidport_manifest.json").read_text())["dtype"] == "float32"
    convert(plan_conversion(sources[source], "mlx", dtype="bfloat16"), tmp_path / "bfloat16")
    for folder, report, floor in ((mlx_models[source], live, 0.99999),
                                  (tmp_path / "bfloat16", verify(tmp_path / "bfloat16", golden=golden), 0.999)):
        assert report.passed, (folder.name, report.first_failure)
        assert_names_reference(report, folder)
        assert not report.not_in_port and len(report.layers) > 200
        assert min(r.local["pcc"] for r in report.layers) >= floor
        names = {r.name for r in report.layers}
        assert {"encoder.down.1.downsample", "decoder.up.1.upsample", "decoder.mid.attn_1"} <= names
        if source == "diffusers":  # the attention blocks (no release has them)
            assert {"encoder.down.2.attn.1", "decoder.up.2.attn.2", "encoder.mid.attn_1.q"} <= names


def test_perturbed_tensor_is_named(mlx_models, goldens, tmp_path):
    """One converted weight with 5% noise added: verify fails and names its layer."""
    key = "decoder.up.1.block.2.conv1.conv.weight"
    broken = perturbed_copy(mlx_models["original"], tmp_path / "broken", key)
    report = verify(broken, golden=goldens["original"][1])
    assert not report.passed
    assert report.first_failure == "decoder.up.1.block.2.conv1.conv"


def test_wrong_rule_is_caught(sources, goldens, tmp_path, monkeypatch):
    """A rule exchanging the encoder's two mid-block residual blocks (equal shapes) plans and
    converts; verify fails and names the first one."""
    mappings = tmp_path / "mappings"
    shutil.copytree(ROOT / "mappings", mappings)
    spec = mappings / "ltx2-audio-vae" / "original.yaml"
    marker = '  - from: "{side:encoder|decoder}.{rest:.+}"\n'
    text = spec.read_text()
    assert text.count(marker) == 1
    spec.write_text(text.replace(marker, '  - from: "encoder.mid.block_{n}.{rest:.+}"\n'
                                         '    to: "encoder.mid.block_{3-n}.{rest}"\n' + marker))
    monkeypatch.setenv("VIDPORT_MAPPINGS", str(mappings))
    convert(plan_conversion(sources["original"], "mlx"), tmp_path / "out")
    report = verify(tmp_path / "out", golden=goldens["original"][1])
    assert not report.passed
    assert report.first_failure == "encoder.mid.block_1.conv1.conv"


# ---------------------------------------------------------------- causal in time


def test_causal_in_time(sources, mlx_models, monkeypatch):
    """Decoding the first k latent frames gives the first 4k - 3 mel frames of a longer decode,
    and encoding the first 1 + 4k mel frames the first 1 + k latent frames, in diffusers and in
    the port alike (which equals diffusers); with the time padding split around each frame (a
    centred convolution) neither holds."""
    from vidport.runtime.ltx2.audio_vae import LTX2AudioCausalConv2d

    reference, model = _reference(sources["original"]), _mlx(mlx_models["original"])
    mel = _mel(17, seed=1)
    latents = np.random.default_rng(2).standard_normal((1, 2, 5, 16)).astype(np.float32)
    with torch.no_grad():
        decoded = reference.decode(torch.from_numpy(latents)).sample.numpy()
        prefix = reference.decode(torch.from_numpy(latents[:, :, :2])).sample.numpy()
        moments = reference.encode(torch.from_numpy(mel)).latent_dist.parameters.numpy()
    assert decoded.shape[2] == 17 and prefix.shape[2] == 5 and moments.shape[2] == 5
    np.testing.assert_allclose(prefix, decoded[:, :, :5], atol=1e-5)  # diffusers' own guarantee

    ours = _numpy(model.decode(_channels_last(latents)))
    np.testing.assert_allclose(ours, decoded, atol=1e-4)
    np.testing.assert_allclose(_numpy(model.decode(_channels_last(latents[:, :, :2]))), ours[:, :, :5], atol=1e-5)
    encoded = model.encode(_channels_last(mel))
    np.testing.assert_allclose(_numpy(encoded.mean), moments[:, :2], atol=1e-4)
    early = model.encode(_channels_last(mel[:, :, :9])).mean
    np.testing.assert_allclose(np.array(early), np.array(encoded.mean)[:, :3], atol=1e-5)

    for _, module in model.named_modules():
        if isinstance(module, LTX2AudioCausalConv2d) and module.padding[1][0]:
            monkeypatch.setattr(module, "padding", ((0, 0), (1, 1), (1, 1), (0, 0)), raising=False)
    centred = _numpy(model.decode(_channels_last(latents)))
    assert np.abs(centred - decoded).max() > 1e-2
    centred_prefix = _numpy(model.decode(_channels_last(latents[:, :, :2])))
    assert np.abs(centred_prefix - centred[:, :, :5]).max() > 1e-2


# ---------------------------------------------------------------- the latents statistics


def test_latents_statistics_are_the_files(sources, mlx_models):
    """The port's normalized latents are ltx_core's encoder output on the original file (which
    divides by its std-of-means after subtracting its mean-of-means), and diffusers' pipeline
    normalization on the Diffusers folder; denormalize_latents undoes it for decode."""
    import mlx.core as mx
    from diffusers import AutoencoderKLLTX2Audio
    from diffusers.pipelines.ltx2.pipeline_ltx2 import LTX2Pipeline as P

    encoder, _, _, _ = _official(sources["original"])
    mel = _mel(13, seed=4)
    model = _mlx(mlx_models["original"])
    normalized = model.normalize_latents(model.encode(_channels_last(mel)).mode())
    with torch.no_grad():
        expected = P._pack_audio_latents(encoder(torch.from_numpy(mel))).numpy()
    np.testing.assert_allclose(np.array(normalized), expected, atol=1e-4)
    raw = model.denormalize_latents(normalized)
    np.testing.assert_allclose(np.array(raw), np.array(model.encode(_channels_last(mel)).mode()), atol=1e-5)

    model = _mlx(mlx_models["diffusers"])
    reference = AutoencoderKLLTX2Audio.from_pretrained(sources["diffusers"])
    latents = np.random.default_rng(5).standard_normal((1, 2, 4, 16)).astype(np.float32)
    with torch.no_grad():
        expected = P._normalize_audio_latents(P._pack_audio_latents(torch.from_numpy(latents)),
                                              reference.latents_mean, reference.latents_std).numpy()
    np.testing.assert_allclose(np.array(model.normalize_latents(_channels_last(latents))), expected, atol=1e-5)
    assert isinstance(model.latents_std, mx.array) and float(model.latents_std.min()) >= 0.5


def test_exchanged_statistics_rules_are_caught(sources, tmp_path, monkeypatch):
    """mean-of-means and std-of-means have the same shape: a spec that exchanges them converts,
    and the normalized latents no longer match ltx_core's."""
    mappings = tmp_path / "mappings"
    shutil.copytree(ROOT / "mappings", mappings)
    spec = mappings / "ltx2-audio-vae" / "original.yaml"
    text = spec.read_text()
    assert text.count('to: "latents_mean"') == 1 and text.count('to: "latents_std"') == 1
    spec.write_text(text.replace('to: "latents_mean"', "to: SWAP").replace('to: "latents_std"', 'to: "latents_mean"')
                    .replace("to: SWAP", 'to: "latents_std"'))
    monkeypatch.setenv("VIDPORT_MAPPINGS", str(mappings))
    convert(plan_conversion(sources["original"], "mlx"), tmp_path / "out")
    encoder, _, _, _ = _official(sources["original"])
    mel = _mel(9, seed=6)
    model = _mlx(tmp_path / "out")
    with torch.no_grad():
        expected = _packed(encoder(torch.from_numpy(mel)))
    assert np.abs(np.array(model.normalize_latents(model.encode(_channels_last(mel)).mode())) - expected).max() > 0.1


def _packed(latents: torch.Tensor) -> np.ndarray:
    """(B, C, t, m) -> (B, t, C * m), as diffusers' pipeline packs audio latents."""
    from diffusers.pipelines.ltx2.pipeline_ltx2 import LTX2Pipeline

    return LTX2Pipeline._pack_audio_latents(latents).numpy()


# ---------------------------------------------------------------- bad input, the command line


def test_missing_or_misshapen_tensor_is_refused_with_nothing_written(sources, tmp_path):
    state = load_file(str(sources["original"]))
    missing = {k: v for k, v in state.items() if k != f"{PREFIX}decoder.conv_out.conv.bias"}
    save_file(missing, str(tmp_path / "missing.safetensors"))
    misshapen = {**state, f"{PREFIX}per_channel_statistics.std-of-means": torch.ones(31)}
    save_file(misshapen, str(tmp_path / "misshapen.safetensors"))
    for name, message in (("missing", "decoder.conv_out.conv.bias"), ("misshapen", "latents_std")):
        out = tmp_path / f"out-{name}"
        result = runner.invoke(app, ["convert", "ltx2-audio-vae", str(tmp_path / f"{name}.safetensors"),
                                     "--target", "mlx", "--out", str(out)])
        assert result.exit_code == 1, result.output
        assert message in result.output and "Traceback" not in result.output
        assert not out.exists()


def test_unimplemented_settings_are_refused(sources, tmp_path):
    """The port builds what every release is (pixel norms, causal in time) and says so otherwise."""
    for setting in ("norm_type=group", "causality_axis=width"):
        out = tmp_path / setting.split("=")[0]
        result = runner.invoke(app, ["convert", "ltx2-audio-vae", str(sources["original"]), "--target", "mlx",
                                     "--out", str(out), "--set", setting])
        assert result.exit_code == 1, result.output
        assert setting.split("=")[1] in result.output and "this port implements" in result.output
        assert not out.exists()


def test_bad_shapes_are_refused_by_the_port(mlx_models):
    import mlx.core as mx

    model = _mlx(mlx_models["original"])
    with pytest.raises(VidportError, match=r"mel spectrogram of shape \[1, 9, 64, 3\]: expected .* 2\), channels last"):
        model.encode(mx.zeros((1, 9, 64, 3)))
    with pytest.raises(VidportError, match=r"latents of shape \[1, 2, 3, 16\]: expected .* 2\), channels last"):
        model.decode(mx.zeros((1, 2, 3, 16)))  # channels first


def test_cli_convert_and_verify(sources, tmp_path):
    out = tmp_path / "audio-vae-mlx"
    result = runner.invoke(app, ["convert", "ltx2-audio-vae", str(sources["original"]), "--target", "mlx",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "vidport_manifest.json").read_text())
    assert manifest["spec"]["name"] == "ltx2-audio-vae/original"
    result = runner.invoke(app, ["verify", str(out), "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passed"] and report["reference"].endswith("via diffusers' convert_ltx2_audio_vae_to_diffusers")
