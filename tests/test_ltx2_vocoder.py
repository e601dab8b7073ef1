"""The LTX-2 vocoders (families ltx2-vocoder: LTX2Vocoder, LTX-2.0; ltx2-vocoder-bwe:
LTX2VocoderWithBWE, LTX-2.3): both source layouts are real (ltx_core's own loader reads the
original file, diffusers' from_pretrained the folder), diffusers' model loaded through diffusers'
own conversion rules sounds as the official one, both sources convert to MLX and pass per-layer
verify at float32 and bfloat16, a planted fault is named, the transposed convolutions' weight
layout is what MLX needs, and bad input is refused with nothing written."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from vidport.cli import app
from vidport.converter.convert import convert, plan_conversion
from vidport.converter.core.errors import VidportError
from vidport.golden.verify import verify
from fixtures.ltx2_vocoder import (FAMILIES, FOREIGN, diffusers_config, official_config, official_model,
                                   original_state, write_diffusers, write_original)
from fixtures.references import assert_names_reference

SOURCES = {"original-2.0": ("2.0", "ltx-2-19b-dev.safetensors"), "diffusers-2.0": ("2.0", "vocoder-2.0"),
           "original-2.3": ("2.3", "ltx-2.3.safetensors"), "diffusers-2.3": ("2.3", "vocoder-2.3")}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ltx2_vocoder")
    found = {}
    for seed, (name, (version, file)) in enumerate(SOURCES.items()):
        found[name] = root / file
        (write_original if name.startswith("original") else write_diffusers)(found[name], seed, version)
    return found


def _official_load(path: Path, version: str):
    """The file read as ltx_core's loader reads it: its configurator builds the model from the
    checkpoint config in the file's metadata, VOCODER_COMFY_KEYS_FILTER picks and renames keys,
    then a strict load."""
    import json

    from ltx_core.model.audio_vae.model_configurator import VOCODER_COMFY_KEYS_FILTER, VocoderConfigurator
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        config = json.loads(handle.metadata()["config"])
        state = {}
        for key in handle.keys():
            name = VOCODER_COMFY_KEYS_FILTER.apply_to_key(key)
            if name is not None:
                state.update(VOCODER_COMFY_KEYS_FILTER.apply_to_key_value(name, handle.get_tensor(key)))
    assert config == official_config(version)
    model = VocoderConfigurator.from_config(config)
    model.load_state_dict(state, strict=True)
    return model.eval(), state


# ---------------------------------------------------------------- the layouts are real


@pytest.mark.parametrize("version", ["2.0", "2.3"])
def test_layouts_are_real(sources, version):
    """ltx_core's loader takes every vocoder. key of the original file, strictly, and our plan uses
    each of them (the other parts' keys stay outside the family); diffusers' from_pretrained reads
    every tensor of the folder and misses none."""
    from diffusers.pipelines.ltx2 import LTX2Vocoder, LTX2VocoderWithBWE

    original = sources[f"original-{version}"]
    _model, state = _official_load(original, version)
    plan = plan_conversion(original, "diffusers", family=FAMILIES[version])
    used = {name for recipe in plan.canonical.recipes.values() for name in recipe.inputs}
    assert used == set(state) and not plan.canonical.dropped
    assert not set(FOREIGN) & {f"vocoder.{k}" for k in used}

    cls = LTX2Vocoder if version == "2.0" else LTX2VocoderWithBWE
    model, info = cls.from_pretrained(sources[f"diffusers-{version}"], output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert type(model) is cls


def _diffusers_rules(state: dict[str, torch.Tensor], version: str) -> dict[str, torch.Tensor]:
    """diffusers' own renaming of an original vocoder (scripts/convert_ltx2_to_diffusers.py: the
    `vocoder.` prefix taken off once, then its plain string replacements; for 2.3 `.ups.` only as a
    whole segment, since `upsample` contains `ups`), written here from the script's tables."""
    if version == "2.0":
        renames = [("ups", "upsamplers"), ("resblocks", "resnets"), ("conv_pre", "conv_in"), ("conv_post", "conv_out")]
    else:
        renames = [("resblocks", "resnets"), ("conv_pre", "conv_in"), ("conv_post", "conv_out"),
                   ("act_post", "act_out"), ("downsample.lowpass", "downsample"), (".ups.", ".upsamplers.")]
    renamed = {}
    for key, tensor in state.items():
        key = key.removeprefix("vocoder.")
        for old, new in renames:
            key = key.replace(old, new)
        renamed[key] = tensor
    return renamed


@pytest.mark.parametrize("version", ["2.0", "2.3"])
def test_diffusers_rules_sound_as_official(version):
    """diffusers' LTX2Vocoder / LTX2VocoderWithBWE loaded (strictly) through diffusers' conversion
    rules gives the official ltx_core model's waveform; and the canonical tensors our spec maps the
    file to are the ones diffusers' rules give. For 2.3, diffusers' conversion script's
    final_act_fn None for stage one differs from the official code (which clamps) wherever the
    first stage leaves [-1, 1]: the spec's variant says clamp."""
    from diffusers.pipelines.ltx2 import LTX2Vocoder, LTX2VocoderWithBWE

    official = official_model(version, seed=5)
    state = {f"vocoder.{k}": v for k, v in official.state_dict().items()}
    cls = LTX2Vocoder if version == "2.0" else LTX2VocoderWithBWE
    model = cls.from_config(diffusers_config(version)).eval()
    model.load_state_dict(_diffusers_rules(state, version), strict=True)
    mel = torch.randn((1, 2, 3, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = official(mel)
        assert torch.allclose(model(mel), expected, atol=1e-5)
        if version == "2.3":
            unclamped = cls.from_config({**diffusers_config(version), "final_act_fn": None}).eval()
            unclamped.load_state_dict(_diffusers_rules(state, version), strict=True)
            assert official.vocoder(mel).abs().max() >= 1.0  # the fixture's stage one does leave [-1, 1]
            assert (unclamped(mel) - expected).abs().max() > 1e-3


@pytest.mark.parametrize("version", ["2.0", "2.3"])
def test_spec_maps_as_diffusers_rules(sources, version):
    from safetensors.torch import load_file

    plan = plan_conversion(sources[f"original-{version}"], "diffusers", family=FAMILIES[version])
    file_state = {k: v for k, v in load_file(str(sources[f"original-{version}"])).items() if k not in FOREIGN}
    by_rules = _diffusers_rules(file_state, version)
    assert set(plan.canonical.recipes) == set(by_rules)
    for canonical, recipe in plan.canonical.recipes.items():
        assert torch.equal(by_rules[canonical], file_state[f"vocoder.{recipe.inputs[0]}"]), canonical


def test_detection_and_config(sources):
    """Each source is detected as its family's own format; the original file's config (widths from
    shapes, the rest from the release's variant) is the config of diffusers' own folder."""
    import json

    for name, (version, _file) in SOURCES.items():
        plan = plan_conversion(sources[name], "mlx", family=FAMILIES[version])
        assert plan.detected.spec.name == f"{FAMILIES[version]}/{name.split('-')[0]}"
        folder = json.loads((sources[f"diffusers-{version}"] / "config.json").read_text())
        expected = {k: v for k, v in folder.items() if not k.startswith("_")}
        assert {k: plan.config.get(k) for k in expected} == expected, name
        assert plan.variant == (None if name.startswith("diffusers") else plan.detected.spec.variants[0].name)
    with pytest.raises(VidportError):  # the LTX-2.3 file is not an LTX-2.0 vocoder, nor the reverse
        plan_conversion(sources["original-2.3"], "mlx", family="ltx2-vocoder")
    with pytest.raises(VidportError):
        plan_conversion(sources["original-2.0"], "mlx", family="ltx2-vocoder-bwe")


# ---------------------------------------------------------------- convert + verify per layer


@pytest.mark.parametrize("source", list(SOURCES))
def test_convert_and_verify(sources, source, tmp_path):
    """float32 against the live reference (the official ltx_core model for the original file,
    diffusers' from_pretrained for the folder), saved as a golden; bfloat16 against that golden."""
    version = SOURCES[source][0]
    golden = tmp_path / "vidport.golden.safetensors"
    for dtype, floor in (("float32", 0.99999), ("bfloat16", 0.99)):
        convert(plan_conversion(sources[source], "mlx", family=FAMILIES[version], dtype=dtype), tmp_path / dtype)
        report = (verify(tmp_path / dtype, frames=2, save_to=golden) if dtype == "float32"
                  else verify(tmp_path / dtype, golden=golden))
        assert report.passed, (dtype, report.first_failure)
        assert_names_reference(report, tmp_path / dtype)
        assert not report.not_in_port and not report.uncompared_outputs
        names = {r.name.split("#")[0] for r in report.layers}
        prefix = "" if version == "2.0" else "vocoder."
        assert {f"{prefix}upsamplers.4", f"{prefix}resnets.14.convs1.2", f"{prefix}conv_out", "(model)"} <= names
        if version == "2.3":
            assert {"bwe_generator.resnets.3.acts2.1.act", "mel_stft.stft_fn", "resampler",
                    "vocoder.act_out.downsample"} <= names
        assert min(r.local["pcc"] for r in report.layers) >= floor


@pytest.mark.parametrize("version, tensor, layer", [
    ("2.0", "upsamplers.2.weight", "upsamplers.2"),
    ("2.3", "bwe_generator.resnets.4.acts1.1.act.beta", "bwe_generator.resnets.4.acts1.1.act")])
def test_planted_fault_is_named(sources, tmp_path, version, tensor, layer):
    """One perturbed tensor in the converted output fails verify, and the report names its layer."""
    import mlx.core as mx

    convert(plan_conversion(sources[f"original-{version}"], "mlx", family=FAMILIES[version]), tmp_path / "mlx")
    weights = dict(mx.load(str(tmp_path / "mlx" / "model.safetensors")))
    weights[tensor] = weights[tensor] + 0.5 * mx.abs(weights[tensor]).max()
    mx.save_safetensors(str(tmp_path / "mlx" / "model.safetensors"), weights, metadata={"format": "mlx"})
    report = verify(tmp_path / "mlx", frames=1)
    assert not report.passed
    assert report.first_failure == layer


def test_wrong_rule_fails_against_the_official_code(sources, tmp_path, monkeypatch):
    """A planted rule the shapes cannot see (the first residual block's dilated and plain
    convolutions exchanged: equal shapes) still converts, and verify against the official ltx_core
    model fails at that layer."""
    import shutil

    mappings = tmp_path / "mappings"
    shutil.copytree(Path(__file__).resolve().parent.parent / "mappings", mappings)
    spec = mappings / "ltx2-vocoder" / "original.yaml"
    rule = '  - from: "resblocks.{j}.{conv:convs1|convs2}.{k}.{param}"\n'
    wrong = ('  - from: "resblocks.0.convs1.{k}.{param}"\n    to: "resnets.0.convs2.{k}.{param}"\n'
             '  - from: "resblocks.0.convs2.{k}.{param}"\n    to: "resnets.0.convs1.{k}.{param}"\n')
    text = spec.read_text()
    assert text.count(rule) == 1
    spec.write_text(text.replace(rule, wrong + rule))
    monkeypatch.setenv("VIDPORT_MAPPINGS", str(mappings))
    convert(plan_conversion(sources["original-2.0"], "mlx", family="ltx2-vocoder"), tmp_path / "bad")
    report = verify(tmp_path / "bad", frames=1)
    assert not report.passed
    assert report.first_failure == "resnets.0.convs1.0"
    assert report.info["reference"].startswith("official:ltx_core")


# ---------------------------------------------------------------- transposed convolutions


def test_transposed_conv_weights(sources, tmp_path):
    """The port's up-sampling layer (upsamplers.1 of the LTX-2.0 layout: 64 -> 32 channels, kernel
    15, stride 5: not square) equals torch's ConvTranspose1d with the file's weight. Stored as a
    plain convolution's weight (torch Conv1d [O, I, K] -> MLX [O, K, I], i.e. the file's [I, O, K]
    permuted [0, 2, 1]) the converted folder does not even load; with the kernel reversed (as if MLX's transposed
    convolution wanted a flipped kernel) it loads and is wrong."""
    import mlx.core as mx

    from vidport.runtime.loading import load_model

    convert(plan_conversion(sources["original-2.0"], "mlx", family="ltx2-vocoder"), tmp_path / "mlx")
    model = load_model(tmp_path / "mlx")
    layer = model.upsamplers[1]
    official = official_model("2.0", seed=0).ups[1]  # the file was written from this seed
    assert official.in_channels != official.out_channels
    reference = torch.nn.ConvTranspose1d(official.in_channels, official.out_channels, 15, stride=5, padding=5)
    reference.load_state_dict(official.state_dict())
    x = torch.randn((1, official.in_channels, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(x).numpy()
    ours = np.moveaxis(np.array(layer(mx.array(x.numpy().transpose(0, 2, 1)))), -1, 1)
    assert ours.shape == expected.shape == (1, official.out_channels, 45)
    np.testing.assert_allclose(ours, expected, atol=1e-5)

    torch_weight = official.weight.detach().numpy()  # [I, O, K] = [64, 32, 15]
    weights = dict(mx.load(str(tmp_path / "mlx" / "model.safetensors")))
    np.testing.assert_array_equal(np.array(weights["upsamplers.1.weight"]), torch_weight.transpose(1, 2, 0))
    weights["upsamplers.1.weight"] = mx.array(torch_weight.transpose(0, 2, 1))  # as a plain Conv1d's
    mx.save_safetensors(str(tmp_path / "mlx" / "model.safetensors"), weights, metadata={"format": "mlx"})
    with pytest.raises(VidportError, match="upsamplers.1.weight"):
        load_model(tmp_path / "mlx")
    flipped = mx.array(np.ascontiguousarray(torch_weight.transpose(1, 2, 0)[:, ::-1]))
    layer.load_weights([("weight", flipped)], strict=False)
    wrong = np.moveaxis(np.array(layer(mx.array(x.numpy().transpose(0, 2, 1)))), -1, 1)
    assert np.corrcoef(wrong.ravel(), expected.ravel())[0, 1] < 0.9


@pytest.mark.parametrize("stride, padding, output_padding, dilation", [(5, 2, 0, 1), (2, 1, 1, 1), (3, 0, 2, 2),
                                                                       (1, 2, 0, 3), (3, 4, 1, 1)])
def test_mlx_conv_transpose_is_torchs(stride, padding, output_padding, dilation):
    """MLX's conv_transpose1d with the weight stored [O, K, I] (the conv_transpose1d role: torch's
    [I, O, K] permuted [1, 2, 0]) is torch's conv_transpose1d: same length formula for stride,
    padding, output_padding and dilation, same values, except where stride > 1 and padding >
    dilation * (K - 1): there MLX's differs, and the port's layer refuses to be built so."""
    import mlx.core as mx

    from vidport.runtime.ltx2.vocoder_layers import ConvTranspose1d

    generator = torch.Generator().manual_seed(stride * 7 + padding)
    weight = torch.randn((6, 4, 5), generator=generator)  # [I, O, K]
    x = torch.randn((2, 6, 40), generator=generator)

    def both(padding: int) -> tuple[np.ndarray, np.ndarray]:
        expected = torch.nn.functional.conv_transpose1d(x, weight, stride=stride, padding=padding,
                                                        output_padding=output_padding, dilation=dilation).numpy()
        ours = mx.conv_transpose1d(mx.array(x.numpy().transpose(0, 2, 1)), mx.array(weight.numpy().transpose(1, 2, 0)),
                                   stride=stride, padding=padding, dilation=dilation, output_padding=output_padding)
        return np.array(ours).transpose(0, 2, 1), expected

    ours, expected = both(padding)
    np.testing.assert_allclose(ours, expected, atol=1e-5)
    beyond = dilation * 4 + 1
    ours, expected = both(beyond)
    if stride == 1:
        np.testing.assert_allclose(ours, expected, atol=1e-5)
        ConvTranspose1d(6, 4, 5, stride=stride, padding=beyond, dilation=dilation)
    else:
        assert ours.shape != expected.shape or not np.allclose(ours, expected, atol=1e-3)
        with pytest.raises(ValueError, match="MLX's differs"):
            ConvTranspose1d(6, 4, 5, stride=stride, padding=beyond, dilation=dilation)


# ---------------------------------------------------------------- bad input, the command line


def _edited(tmp_path: Path, edit) -> Path:
    from safetensors.torch import save_file

    state = original_state(0, "2.0")
    edit(state)
    path = tmp_path / "edited.safetensors"
    save_file(state, str(path))
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("vocoder.ups.3.bias"), "upsamplers.3.bias"),
    (lambda s: s.__setitem__("vocoder.ups.1.weight", torch.zeros(64, 16, 15)), "upsamplers.1.weight"),
    (lambda s: s.__setitem__("vocoder.resblocks.4.convs9.0.weight", torch.zeros(8, 8, 7)), "convs9")])
def test_bad_input_refused_nothing_written(tmp_path, edit, message):
    source = _edited(tmp_path, edit)
    result = CliRunner().invoke(app, ["convert", "ltx2-vocoder", str(source), "--target", "mlx",
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 1, result.output
    assert message in result.output and "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited.safetensors"]


def test_cli_convert_and_verify(sources, tmp_path):
    runner = CliRunner()
    out = tmp_path / "vocoder-mlx"
    result = runner.invoke(app, ["convert", "ltx2-vocoder", str(sources["original-2.0"]), "--target", "mlx",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["verify", str(out), "--frames", "2"])
    assert result.exit_code == 0, result.output
    assert "ltx_core" in result.output
