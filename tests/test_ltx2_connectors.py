"""The ltx2-connectors family: the original single-file layout is real (ltx_core's own key
operations load it strictly into the official EmbeddingsProcessor) and the Diffusers folder is
diffusers' own; both convert to MLX and pass per-layer verify (the original against the official
code, the folder against diffusers) at float32 and bfloat16; the official code and diffusers
agree on the same weights; the MLX registers, returned mask and 1-D RoPE are diffusers' exactly."""
from __future__ import annotations

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
from vidport.golden.verify import verify
from fixtures.faults import perturbed_copy
from fixtures.ltx2_connectors import (FOREIGN, OVERRIDES, connectors_config, randomize, write_diffusers,
                                      write_original)
from fixtures.references import assert_names_reference

FAMILY = "ltx2-connectors"
SOURCES = {"original-2.0": ("2.0", "ltx-2-19b-dev.safetensors"), "original-2.3": ("2.3", "ltx-2.3.safetensors"),
           "diffusers-2.0": ("2.0", "connectors-2.0"), "diffusers-2.3": ("2.3", "connectors-2.3")}
runner = CliRunner()


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ltx2_connectors")
    found = {}
    for seed, (name, (version, file)) in enumerate(SOURCES.items()):
        found[name] = root / file
        writer = write_original if name.startswith("original") else write_diffusers
        writer(found[name], seed=seed, version=version)
    return found


def _overrides(name: str) -> dict:
    return OVERRIDES[SOURCES[name][0]] if name.startswith("original") else {}


@pytest.fixture(scope="module")
def mlx_models(sources, tmp_path_factory) -> dict[str, Path]:
    """Each source converted to MLX at float32."""
    root = tmp_path_factory.mktemp("ltx2_connectors_mlx")
    for name, path in sources.items():
        convert(plan_conversion(path, "mlx", FAMILY, overrides=_overrides(name)), root / name)
    return {name: root / name for name in sources}


def _official(path: Path, version: str):
    """ltx_core's EmbeddingsProcessor loaded from the file as the official loader renames it."""
    from ltx_core.text_encoders.gemma.encoders.encoder_configurator import EMBEDDINGS_PROCESSOR_KEY_OPS
    from vidport.reference.ltx2_connectors import official_processor

    state = load_file(str(path))
    selected = {EMBEDDINGS_PROCESSOR_KEY_OPS.apply_to_key(k): v for k, v in state.items()
                if EMBEDDINGS_PROCESSOR_KEY_OPS.apply_to_key(k) is not None}
    model = official_processor(connectors_config(version), device="cpu").float()  # its registers are made bf16
    model.load_state_dict(selected, strict=True)
    return model.eval(), set(state) - {k for k in state if EMBEDDINGS_PROCESSOR_KEY_OPS.apply_to_key(k)}


def _diffusers(folder: Path):
    from diffusers.pipelines.ltx2 import LTX2TextConnectors

    return LTX2TextConnectors.from_pretrained(folder).eval()


def _prompts(config: dict, lengths: list[int], tokens: int = 8, seed: int = 0, right: bool = False):
    """Stacked hidden states [B, T, C * L] and a 0/1 mask holding `lengths` tokens per prompt."""
    rng = np.random.default_rng(seed)
    states = rng.standard_normal((len(lengths), tokens, config["caption_channels"] * config["text_proj_in_factor"]),
                                 dtype=np.float32)
    mask = np.zeros((len(lengths), tokens), dtype=np.int64)
    for row, length in enumerate(lengths):
        mask[row, slice(0, length) if right else slice(tokens - length, tokens)] = 1
    return states, mask


def _mlx_run(folder: Path, states: np.ndarray, mask: np.ndarray, padding_side: str = "left"):
    import mlx.core as mx
    from vidport.runtime.loading import load_model

    model = load_model(folder)
    return [np.array(x) for x in model(mx.array(states), mx.array(mask), padding_side=padding_side)]


# ---------------------------------------------------------------- the sources are real


@pytest.mark.parametrize("version", ["2.0", "2.3"])
def test_original_layout_is_real(sources, version):
    """ltx_core's EMBEDDINGS_PROCESSOR_KEY_OPS select every connector key of the single file and
    nothing else, and the official model built at the config's widths loads them strictly."""
    _, unselected = _official(sources[f"original-{version}"], version)
    assert unselected == set(FOREIGN)
    plan = plan_conversion(sources[f"original-{version}"], "mlx", FAMILY, overrides=OVERRIDES[version])
    assert plan.detected.spec.name == f"{FAMILY}/original"
    assert set(plan.canonical.recipes) == set(_diffusers_state_keys(version))


def _diffusers_state_keys(version: str) -> set[str]:
    from diffusers.pipelines.ltx2 import LTX2TextConnectors

    return set(LTX2TextConnectors(**connectors_config(version)).state_dict())


@pytest.mark.parametrize("version", ["2.0", "2.3"])
def test_diffusers_layout_is_real(sources, version):
    from diffusers.pipelines.ltx2 import LTX2TextConnectors

    folder = sources[f"diffusers-{version}"]
    _, info = LTX2TextConnectors.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, unexpected or mismatched
    assert set(load_file(str(folder / "diffusion_pytorch_model.safetensors"))) == _diffusers_state_keys(version)
    plan = plan_conversion(folder, "mlx", FAMILY)
    assert plan.detected.spec.name == f"{FAMILY}/diffusers"


@pytest.mark.parametrize("version", ["2.0", "2.3"])
def test_config_from_shapes(sources, version):
    """What the shapes tell is inferred (projections, widths, layers, registers, gates; LTX-2.3's
    head counts from its gates); the rest is the variant's, the --set values, or the library's
    defaults, each named as assumed."""
    expected = connectors_config(version)
    plan = plan_conversion(sources[f"original-{version}"], "mlx", FAMILY, overrides=OVERRIDES[version])
    assert {k: plan.config[k] for k in expected} == expected
    assert plan.variant is None and "rope_theta" in plan.assumed
    if version == "2.3":  # heads come from the gates, not from --set
        assert "video_connector_num_attention_heads" not in OVERRIDES[version]
        assert plan.config["audio_connector_attention_head_dim"] == 4


def test_release_variants_fix_the_rest():
    """At the released widths (shapes only), the variant table names the release and gives
    ltx_core's configuration: 30 heads and split RoPE for LTX-2.0, 32 heads from LTX-2.3's gates."""
    from vidport.converter.infer import infer_config, match_variant
    from vidport.converter.spec import load_catalog

    catalog = load_catalog()
    family = catalog.families[FAMILY]
    spec = next(source for source in family.sources if source.name == f"{FAMILY}/original")
    width = 3840 * 49
    shapes = {"text_proj_in.weight": (3840, width)}
    for stream in ("video", "audio"):
        shapes.update({f"{stream}_connector.learnable_registers": (128, 3840),
                       f"{stream}_connector.transformer_blocks.0.attn1.to_q.weight": (3840, 3840),
                       f"{stream}_connector.transformer_blocks.1.attn1.to_q.weight": (3840, 3840)})
    config = infer_config(family.config, shapes, "test", {})
    variant = match_variant(spec.variants, config)
    assert variant.name == "LTX-2 (19B dev / distilled)" and config["text_proj_in_factor"] == 49
    assert variant.config["rope_type"] == "split" and variant.config["video_connector_num_attention_heads"] == 30
    shapes = {"video_text_proj_in.weight": (4096, width), "audio_text_proj_in.weight": (2048, width),
              "video_text_proj_in.bias": (4096,)}
    for stream, inner, heads in (("video", 4096, 32), ("audio", 2048, 32)):
        shapes.update({f"{stream}_connector.learnable_registers": (128, inner),
                       f"{stream}_connector.transformer_blocks.0.attn1.to_q.weight": (inner, inner),
                       f"{stream}_connector.transformer_blocks.0.attn1.to_gate_logits.weight": (heads, inner)})
    config = infer_config(family.config, shapes, "test", {})
    assert match_variant(spec.variants, config).name == "LTX-2.3"
    assert config["video_connector_num_attention_heads"] == 32 and config["audio_connector_num_attention_heads"] == 32


@pytest.mark.parametrize("version", ["2.0", "2.3"])
def test_official_code_equals_diffusers(sources, version, tmp_path):
    """The original file converted to a Diffusers folder (diffusers has no loader for it):
    from_pretrained reads it, and that model gives the official ltx_core outputs, mask included,
    on a full and a left-padded prompt (the official registers take one prompt at a time)."""
    path = sources[f"original-{version}"]
    convert(plan_conversion(path, "diffusers", FAMILY, overrides=OVERRIDES[version]), tmp_path / "connectors")
    model = _diffusers(tmp_path / "connectors")
    official, _ = _official(path, version)
    config = connectors_config(version)
    states, mask = _prompts(config, [8, 3])
    with torch.no_grad():
        for row in range(2):
            x, m = torch.from_numpy(states[row:row + 1]), torch.from_numpy(mask[row:row + 1])
            video, audio, binary = model(x, m)
            expected = official.process_hidden_states(x.unflatten(2, (config["caption_channels"], -1)), m)
            assert torch.allclose(video, expected.video_encoding, atol=1e-5)
            assert torch.allclose(audio, expected.audio_encoding, atol=1e-5)
            assert torch.equal(binary, expected.attention_mask)


# ---------------------------------------------------------------- convert + verify per layer


@pytest.mark.parametrize("source", list(SOURCES))
def test_convert_and_verify(sources, source, tmp_path):
    """float32 against the live reference (saved as a golden), then bfloat16 against that golden:
    every paired layer, local and global, and both probes' outputs."""
    golden = tmp_path / "vidport.golden.safetensors"
    for dtype, floor in (("float32", 0.99999), ("bfloat16", 0.99)):
        convert(plan_conversion(sources[source], "mlx", FAMILY, dtype, overrides=_overrides(source)), tmp_path / dtype)
        report = (verify(tmp_path / dtype, save_to=golden) if dtype == "float32"
                  else verify(tmp_path / dtype, golden=golden))
        assert report.passed, (dtype, report.first_failure)
        assert_names_reference(report, tmp_path / dtype)
        names = {r.name for r in report.layers}
        assert not report.not_in_port and {"(model)", "(model)#1", "audio_connector#1"} <= names
        assert "video_connector.transformer_blocks.1.ff.net.2" in names
        assert min(r.local["pcc"] for r in report.layers) >= floor


@pytest.mark.parametrize("source, key", [
    ("original-2.0", "audio_connector.transformer_blocks.1.attn1.to_v.weight"),
    ("original-2.3", "video_connector.transformer_blocks.0.attn1.to_gate_logits.weight"),
    ("diffusers-2.0", "text_proj_in.weight")])
def test_planted_fault_is_named(mlx_models, source, key, tmp_path):
    report = verify(perturbed_copy(mlx_models[source], tmp_path / "broken", key))
    assert not report.passed
    assert report.first_failure == key.rsplit(".", 1)[0]


def test_swapped_registers_rule_is_caught(sources, tmp_path, monkeypatch):
    """A spec that gives each stream the other's registers (same shapes in LTX-2.0) passes every
    shape check; verify against the official code catches it in the video connector."""
    root = Path(__file__).resolve().parent.parent / "mappings"
    mappings = tmp_path / "mappings"
    shutil.copytree(root, mappings)
    spec = mappings / FAMILY / "original.yaml"
    rule = ('  - from: "model.diffusion_model.{m:video|audio}_embeddings_connector.learnable_registers"\n'
            '    to: "{m}_connector.learnable_registers"\n')
    swapped = ('  - from: "model.diffusion_model.video_embeddings_connector.learnable_registers"\n'
               '    to: "audio_connector.learnable_registers"\n'
               '  - from: "model.diffusion_model.audio_embeddings_connector.learnable_registers"\n'
               '    to: "video_connector.learnable_registers"\n')
    assert rule in spec.read_text()
    spec.write_text(spec.read_text().replace(rule, swapped))
    monkeypatch.setenv("VIDPORT_MAPPINGS", str(mappings))
    convert(plan_conversion(sources["original-2.0"], "mlx", FAMILY, overrides=OVERRIDES["2.0"]), tmp_path / "out")
    report = verify(tmp_path / "out")
    # the full prompt (first probe) has no padding to fill: the padded one (#1) is where it shows
    assert not report.passed and report.first_failure == "video_connector#1"


# ---------------------------------------------------------------- registers, mask and RoPE


@pytest.mark.parametrize("version", ["2.0", "2.3"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_registers_replace_padding_as_diffusers(sources, mlx_models, version, padding_side):
    """A batch of a full and two padded prompts: the MLX outputs and the returned mask are
    diffusers'. The prompts' tokens move to the front and registers fill the rest, so what the
    padded positions held does not matter, and the registers do."""
    import mlx.core as mx
    from vidport.runtime.loading import load_model

    folder = sources[f"diffusers-{version}"]
    config = connectors_config(version)
    states, mask = _prompts(config, [8, 5, 2], seed=3, right=padding_side == "right")
    with torch.no_grad():
        expected = [t.numpy() for t in _diffusers(folder)(torch.from_numpy(states), torch.from_numpy(mask),
                                                           padding_side=padding_side)]
    ours = _mlx_run(mlx_models[f"diffusers-{version}"], states, mask, padding_side)
    for got, want in zip(ours[:2], expected[:2]):
        np.testing.assert_allclose(got, want, atol=2e-5)
    assert np.array_equal(ours[2], expected[2]) and ours[2].all()  # registers: every position is valid

    changed = states.copy()
    changed[mask == 0] += 5.0
    assert np.allclose(_mlx_run(mlx_models[f"diffusers-{version}"], changed, mask, padding_side)[0], ours[0],
                       atol=1e-5)
    model = load_model(mlx_models[f"diffusers-{version}"])
    model.video_connector.learnable_registers = model.video_connector.learnable_registers + 0.5
    moved = np.array(model(mx.array(states), mx.array(mask), padding_side=padding_side)[0])
    assert np.allclose(moved[0], ours[0][0], atol=1e-5)  # the full prompt has no register
    assert np.abs(moved[1] - ours[0][1]).max() > 1e-2


def test_without_registers_padding_is_masked(tmp_path):
    """Connectors without registers keep the padded tokens and mask them out of attention, as
    diffusers does; the mask returned is diffusers' too (all ones here as well: the official
    test `additive mask < 1e-6` holds for 0 and for -max alike)."""
    from diffusers.pipelines.ltx2 import LTX2TextConnectors

    config = {**connectors_config("2.0"), "video_connector_num_learnable_registers": None,
              "audio_connector_num_learnable_registers": None}
    randomize(LTX2TextConnectors(**config), 5).save_pretrained(str(tmp_path / "connectors"))
    convert(plan_conversion(tmp_path / "connectors", "mlx", FAMILY), tmp_path / "mlx")
    states, mask = _prompts(config, [6, 3], seed=4)
    with torch.no_grad():
        expected = [t.numpy() for t in _diffusers(tmp_path / "connectors")(torch.from_numpy(states),
                                                                          torch.from_numpy(mask))]
    ours = _mlx_run(tmp_path / "mlx", states, mask)
    np.testing.assert_allclose(ours[0], expected[0], atol=2e-5)
    np.testing.assert_allclose(ours[1], expected[1], atol=2e-5)
    assert np.array_equal(ours[2], expected[2])
    unmasked = _mlx_run(tmp_path / "mlx", states, np.ones_like(mask))
    valid = mask[1] == 1
    assert np.abs(unmasked[0][1][valid] - ours[0][1][valid]).max() > 1e-3


@pytest.mark.parametrize("rope_type", ["split", "interleaved"])
def test_rope_1d_matches_diffusers_and_ltx_core(rope_type):
    """At the released width (3840 channels, 30 heads, 4096 base positions, 256 tokens) the MLX
    tables are diffusers' and ltx_core's; computing the frequency ladder in float32 instead of
    float64 moves them by far more than the tolerance."""
    from diffusers.pipelines.ltx2.connectors import LTX2RotaryPosEmbed1d as DiffusersRope
    from ltx_core.model.transformer.rope import LTXRopeType, generate_freq_grid_np, precompute_freqs_cis
    from vidport.runtime.ltx2.connectors import LTX2RotaryPosEmbed1d

    dim, heads, base, tokens = 3840, 30, 4096, 256
    ours = [np.array(t) for t in LTX2RotaryPosEmbed1d(dim, base, 10000.0, True, rope_type, heads)(2, tokens)]
    theirs = [t.numpy() for t in DiffusersRope(dim, base, 10000.0, True, rope_type, heads)(2, tokens, "cpu")]
    grid = torch.arange(tokens, dtype=torch.float32)[None, None, :]
    official = [t.numpy() for t in precompute_freqs_cis(grid, dim, torch.float32, 10000.0, [base],
                                                         num_attention_heads=heads, rope_type=LTXRopeType(rope_type),
                                                         freq_grid_generator=generate_freq_grid_np)]
    expected_shape = (2, heads, tokens, dim // heads // 2) if rope_type == "split" else (2, tokens, dim)
    for got, want, core in zip(ours, theirs, official):
        assert got.shape == want.shape == expected_shape
        np.testing.assert_allclose(got, want, atol=2e-6)
        np.testing.assert_allclose(got[:1], core, atol=2e-6)
    single = np.array(LTX2RotaryPosEmbed1d(dim, base, 10000.0, False, rope_type, heads)(2, tokens)[0])
    assert np.abs(single - theirs[0]).max() > 1e-4


# ---------------------------------------------------------------- bad input, the CLI


def _edited(source: Path, dest: Path, edit) -> Path:
    state = load_file(str(source))
    edit(state)
    save_file(state, str(dest))
    return dest


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith((".out", "out"))]


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("model.diffusion_model.audio_embeddings_connector.transformer_1d_blocks.1.ff.net.2.bias"),
     "audio_connector.transformer_blocks.1.ff.net.2.bias"),
    (lambda s: s.__setitem__("model.diffusion_model.video_embeddings_connector.learnable_registers",
                             torch.zeros(4, 12)), "video_connector.learnable_registers"),
    (lambda s: s.__setitem__("model.diffusion_model.video_embeddings_connector.transformer_1d_blocks.0.attn1.bogus.weight",
                             torch.zeros(2)), "bogus")])
def test_bad_input_is_refused_and_nothing_written(sources, tmp_path, edit, message):
    broken = _edited(sources["original-2.0"], tmp_path / "broken.safetensors", edit)
    with pytest.raises(VidportError, match=message.replace(".", "[.]")):
        convert(plan_conversion(broken, "mlx", FAMILY, overrides=OVERRIDES["2.0"]), tmp_path / "out")
    assert _leftovers(tmp_path) == []


def test_prompt_length_must_fit_the_registers(mlx_models):
    """Registers tile the sequence: a length that is no multiple of their count is refused, as
    diffusers refuses it."""
    config = connectors_config("2.0")
    states, mask = _prompts(config, [6], tokens=6)
    with pytest.raises(ValueError, match="divisible by the number of learnable registers 4"):
        _mlx_run(mlx_models["diffusers-2.0"], states, mask)


def test_cli_convert_and_verify(sources, tmp_path):
    args = ["convert", FAMILY, str(sources["original-2.3"]), "--target", "mlx", "--out", str(tmp_path / "out"),
            "--set", "caption_channels=16"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["verify", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "official:ltx-core" in result.output
