"""The ltx2-dit family on MLX: every source layout is real (diffusers' own loaders and the official
ltx_core LTXModel read the fixtures exactly), converts, and passes per-layer verify against the
real library in float32 and bfloat16; the detected version sets `use_cross_timestep`; the RoPE
grid is diffusers' SPLIT one on float64 frequencies, which a float32 grid or an interleaved
layout would not be."""
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

import vidport.runtime  # noqa: F401  (before mlx: the runtime gives MLX its fast BLAS)
from vidport.cli import app
from vidport.converter.convert import convert, plan_conversion
from vidport.converter.core.errors import VidportError
from vidport.converter.infer import public
from vidport.golden.verify import verify
from fixtures.sparse import sparse_safetensors
from fixtures.faults import perturbed_copy
from fixtures.ltx2_dit import (FOREIGN, PREFIX, SMALL_HEADS, ltx2_config, random_ltx2_transformer, to_original_key,
                               write_diffusers, write_original)
from fixtures.motion import write_config_folder
from fixtures.references import assert_names_reference

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()
# name -> (version, seed); the original files need the head counts (`--set`), as any release of
# widths the variant table does not know
SOURCES = {"original": ("2.0", 1), "original-2.3": ("2.3", 2), "diffusers": ("2.0", 3), "diffusers-2.3": ("2.3", 4)}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ltx2-dit")
    found = {}
    for name, (version, seed) in SOURCES.items():
        if name.startswith("original"):
            found[name] = root / f"ltx-{version}.safetensors"
            write_original(found[name], seed, version)
        else:
            found[name] = root / name
            write_diffusers(found[name], seed, version)
    return found


def _overrides(name: str) -> dict[str, int]:
    return SMALL_HEADS if name.startswith("original") else {}


# ---------------------------------------------------------------- the layouts are real


def test_original_layout_is_real(sources, tmp_path):
    """diffusers' from_single_file reads the LTX-2.0 file (connectors and the other parts left
    out) into exactly the model the fixture was made from; the official ltx_core LTXModel loads
    both versions' DiT sub-trees strictly."""
    from diffusers import LTX2VideoTransformer3DModel

    from vidport.reference.ltx2_dit import official_ltx2

    state = load_file(str(sources["original"]))
    assert set(FOREIGN) <= set(state) and all(k.startswith(PREFIX) or k in FOREIGN for k in state)
    config_dir = write_config_folder(tmp_path, "LTX2VideoTransformer3DModel", ltx2_config("2.0"))
    loaded = LTX2VideoTransformer3DModel.from_single_file(dict(state), config=str(config_dir),
                                                          local_files_only=True).state_dict()
    made = random_ltx2_transformer(ltx2_config("2.0"), SOURCES["original"][1]).state_dict()
    assert set(loaded) == set(made) and all(torch.equal(loaded[k], made[k]) for k in made)
    for name in ("original", "original-2.3"):
        version, seed = SOURCES[name]
        official = official_ltx2(load_file(str(sources[name])), ltx2_config(version)).model  # strict: load_strict
        made = random_ltx2_transformer(ltx2_config(version), seed).state_dict()
        assert {to_original_key(k)[len(PREFIX):] for k in made} == set(official.state_dict())


def test_diffusers_layout_is_real(sources):
    from diffusers import LTX2VideoTransformer3DModel

    for name in ("diffusers", "diffusers-2.3"):
        version, seed = SOURCES[name]
        loaded = LTX2VideoTransformer3DModel.from_pretrained(sources[name]).state_dict()
        made = random_ltx2_transformer(ltx2_config(version), seed).state_dict()
        assert set(loaded) == set(made) and all(torch.equal(loaded[k], made[k]) for k in made)


def test_official_code_computes_what_diffusers_does(sources):
    """ltx_core 1.0.0 always modulates the cross-modal attention by the other stream's sigma:
    diffusers' use_cross_timestep=True, on the same file, for both versions."""
    from vidport.reference.ltx2_dit import official_ltx2, probes

    for name in ("original", "original-2.3"):
        version, seed = SOURCES[name]
        config = {**ltx2_config(version), "use_cross_timestep": True}
        kwargs = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v
                  for k, v in probes(config, seed=0)[0].kwargs.items()}
        with torch.no_grad():
            expected = random_ltx2_transformer(ltx2_config(version), seed)(**kwargs, return_dict=False)
            got = official_ltx2(load_file(str(sources[name])), config).run(None, [], kwargs)
        for ours, theirs in zip(got, expected):
            np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=0, atol=1e-4)


# ---------------------------------------------------------------- convert and verify


CASES = [("original", "float32"), ("original", "bfloat16"), ("original-2.3", "float32"),
         ("original-2.3", "bfloat16"), ("diffusers", "float32"), ("diffusers-2.3", "bfloat16")]
VARIANTS = {"original": "LTX-2.0 architecture (other widths)", "original-2.3": "LTX-2.3 architecture (other widths)",
            "diffusers": "LTX-2.0 (dev or distilled)", "diffusers-2.3": "LTX-2.3"}


@pytest.mark.parametrize("name,dtype", CASES, ids=[f"{n}-{d}" for n, d in CASES])
def test_convert_and_verify(sources, name, dtype, tmp_path):
    version = SOURCES[name][0]
    plan = plan_conversion(sources[name], "mlx", "ltx2-dit", dtype, overrides=_overrides(name))
    assert plan.detected.spec.name == f"ltx2-dit/{name.replace('diffusers-2.3', 'diffusers')}"
    assert plan.variant == VARIANTS[name]
    made = ltx2_config(version)
    assert {k: public(plan.config).get(k, made[k]) for k in made} == made  # inferred = what made it
    # the detected version says how the model runs: LTX-2.0 on its own timestep, LTX-2.3 across
    assert plan.config["use_cross_timestep"] is (version == "2.3")
    manifest = convert(plan, tmp_path / "out")
    assert manifest["config"]["use_cross_timestep"] is (version == "2.3")
    report = verify(tmp_path / "out")
    assert report.passed, report.first_failure
    assert_names_reference(report, tmp_path / "out")
    assert not report.not_in_port and not report.uncompared_outputs
    kinds = {r.kind for r in report.layers}
    names = {r.name for r in report.layers}
    # every block's attentions and feed-forwards are compared (by the official model's names too)
    for n in range(2):
        for module in ("attn1.to_q", "audio_attn2.to_out.0", "audio_to_video_attn.to_k", "video_to_audio_attn.to_v",
                       "ff.net.2", "audio_ff"):
            assert f"transformer_blocks.{n}.{module}" in names
    if name.startswith("original-2.3"):
        assert {"LTXModel", "AdaLayerNormSingle", "GELUApprox"} <= kinds
        assert "transformer_blocks.1.attn2.to_gate_logits" in names and "prompt_adaln.linear" in names
    else:
        assert {"LTX2VideoTransformerBlock", "LTX2Attention", "LTX2AudioVideoRotaryPosEmbed",
                "LTX2AdaLayerNormSingle"} <= kinds
        assert {"rope", "audio_rope", "cross_attn_rope", "cross_attn_audio_rope"} <= names
    worst = min(r.local["pcc"] for r in report.layers)
    assert worst >= (0.99999 if dtype == "float32" else 0.999)


@pytest.mark.parametrize("name", ["original", "original-2.3"])
def test_original_to_diffusers_folder(sources, name, tmp_path):
    """Original -> Diffusers comes free, LTX-2.3 included (which diffusers' single-file loader cannot
    read): from_pretrained loads the folder, every tensor the model the file was made from."""
    from diffusers import LTX2VideoTransformer3DModel

    version, seed = SOURCES[name]
    convert(plan_conversion(sources[name], "diffusers", "ltx2-dit", overrides=SMALL_HEADS), tmp_path / "transformer")
    loaded = LTX2VideoTransformer3DModel.from_pretrained(tmp_path / "transformer").state_dict()
    made = random_ltx2_transformer(ltx2_config(version), seed).state_dict()
    assert set(loaded) == set(made) and all(torch.equal(loaded[k], made[k]) for k in made)


def test_connectors_are_dropped_with_their_family(sources):
    plan = plan_conversion(sources["original"], "mlx", "ltx2-dit", overrides=SMALL_HEADS)
    dropped = dict(plan.canonical.dropped)
    assert sorted(dropped) == sorted(k[len(PREFIX):] for k in FOREIGN if k.startswith(PREFIX))
    assert all("ltx2-connectors" in why for why in dropped.values())
    # the other parts' keys are outside the prefix: neither mapped nor unmatched; the DiT's are all there
    assert set(plan.canonical.recipes) == set(random_ltx2_transformer(ltx2_config("2.0")).state_dict())


def test_use_cross_timestep_changes_the_output(sources, tmp_path):
    """The two settings give different outputs, each diffusers' own for that setting, and the
    port runs the converted version's (LTX-2.0: False) when the call does not say."""
    import mlx.core as mx

    from vidport.reference.ltx2_dit import probes
    from vidport.runtime.loading import load_model

    convert(plan_conversion(sources["original"], "mlx", "ltx2-dit", overrides=SMALL_HEADS), tmp_path / "out")
    port = load_model(tmp_path / "out")
    reference = random_ltx2_transformer(ltx2_config("2.0"), SOURCES["original"][1])
    kwargs = dict(probes(ltx2_config("2.0"), seed=5)[0].kwargs)
    outputs = {}
    for setting in (False, True):
        kwargs["use_cross_timestep"] = setting
        with torch.no_grad():
            expected = reference(**{k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v
                                    for k, v in kwargs.items()}, return_dict=False)
        got = port(**{k: mx.array(v) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()})
        for ours, theirs in zip(got, expected):
            np.testing.assert_allclose(np.array(ours), theirs.numpy(), rtol=0, atol=1e-4)
        outputs[setting] = [np.array(o) for o in got]
    for off, on in zip(outputs[False], outputs[True]):
        assert np.abs(off - on).max() > 1e-2  # far beyond the agreement with diffusers
    kwargs.pop("use_cross_timestep")
    default = port(**{k: mx.array(v) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()})
    np.testing.assert_array_equal(np.array(default[0]), outputs[False][0])


def _per_token_timesteps(kwargs: dict) -> dict:
    """Image-to-video: the conditioning first frame's tokens at 0, the rest at the step's timestep."""
    tokens = kwargs["hidden_states"].shape[1]
    first = kwargs["height"] * kwargs["width"]
    timestep = np.full((1, tokens), kwargs["timestep"][0])
    timestep[:, :first] = 0
    return {"timestep": timestep}


OPTIONS = {
    "stg": lambda kwargs: {"spatio_temporal_guidance_blocks": [1], "perturbation_mask": np.array([0.0], np.float32)},
    "isolated": lambda kwargs: {"isolate_modalities": True},
    "per-token": _per_token_timesteps,
    "self-mask": lambda kwargs: {"video_self_attention_mask": np.tril(np.ones(
        (1, kwargs["hidden_states"].shape[1], kwargs["hidden_states"].shape[1]), np.float32))},
}


@pytest.mark.parametrize("option", list(OPTIONS))
def test_pipeline_options_match_diffusers(sources, option, tmp_path):
    """What LTX-2.3's pipelines pass besides the probe's inputs (STG's value shortcut, modality
    isolation, per-token timesteps, a video self-attention mask) gives diffusers' outputs, and
    changes them."""
    import mlx.core as mx

    from vidport.reference.ltx2_dit import probes
    from vidport.runtime.loading import load_model

    convert(plan_conversion(sources["diffusers-2.3"], "mlx"), tmp_path / "out")
    port = load_model(tmp_path / "out")
    reference = random_ltx2_transformer(ltx2_config("2.3"), SOURCES["diffusers-2.3"][1])
    plain = dict(probes({**ltx2_config("2.3"), "use_cross_timestep": True}, seed=6)[0].kwargs)
    kwargs = {**plain, **OPTIONS[option](plain)}

    def to_torch(args: dict) -> dict:
        return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in args.items()}

    with torch.no_grad():
        expected = reference(**to_torch(kwargs), return_dict=False)
        unchanged = reference(**to_torch(plain), return_dict=False)
    got = port(**{k: mx.array(v) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()})
    for ours, theirs in zip(got, expected):
        np.testing.assert_allclose(np.array(ours), theirs.numpy(), rtol=0, atol=1e-4)
    assert max(float((t - b).abs().max()) for t, b in zip(expected, unchanged)) > 1e-2


# ---------------------------------------------------------------- the RoPE grid


def _release_config(version: str) -> dict:
    """The published transformer config (diffusers' scripts/convert_ltx2_to_diffusers.py)."""
    return ltx2_config(version, in_channels=128, out_channels=128, num_attention_heads=32, attention_head_dim=128,
                       cross_attention_dim=4096, audio_in_channels=128, audio_out_channels=128,
                       audio_num_attention_heads=32, audio_attention_head_dim=64, audio_cross_attention_dim=2048,
                       num_layers=48, caption_channels=3840)


@pytest.mark.parametrize("fps", [25.0])
def test_rope_grid_is_diffusers_split_float64(fps):
    """All four tables of the released widths (video 4096 over 32 heads, audio and cross-modal
    2048) for a 121-frame 768 x 512 clip and its 5 s of audio equal diffusers' within 2e-6; the
    same grid with float32 frequencies, or in the interleaved layout, is off by far more."""
    import mlx.core as mx
    from diffusers import LTX2VideoTransformer3DModel as Reference
    from diffusers.models.transformers.transformer_ltx2 import apply_split_rotary_emb

    from vidport.runtime.ltx2.dit import LTX2VideoTransformer3DModel as Port
    from vidport.runtime.ltx2.rope import apply_interleaved_rotary, apply_split_rotary, rope_tables

    config = {**_release_config("2.0"), "num_layers": 0}
    with torch.device("meta"):
        reference = Reference(**config)
    port = Port(**config)
    frames, height, width, audio_frames = 16, 16, 24, 126  # 1 + 15 * 8 frames, 512 x 768 pixels
    video = reference.rope.prepare_video_coords(1, frames, height, width, "cpu", fps=fps)
    audio = reference.audio_rope.prepare_audio_coords(1, audio_frames, "cpu")
    np.testing.assert_array_equal(port.rope.prepare_video_coords(1, frames, height, width, fps), video.numpy())
    np.testing.assert_array_equal(port.audio_rope.prepare_audio_coords(1, audio_frames), audio.numpy())
    tolerance = 2e-6
    for module, coords in [("rope", video), ("audio_rope", audio), ("cross_attn_rope", video[:, 0:1]),
                           ("cross_attn_audio_rope", audio[:, 0:1])]:
        theirs = [t.numpy() for t in getattr(reference, module)(coords, device="cpu")]
        ours = [np.array(t) for t in getattr(port, module)(coords.numpy())]
        for a, b in zip(ours, theirs):
            assert a.shape == b.shape and np.abs(a - b).max() <= tolerance, module
    # the simplifications this test exists to catch, on the video self-attention grid
    ref_cos, ref_sin = (t.numpy() for t in reference.rope(video, device="cpu"))
    rope = port.rope
    float32_cos, _ = rope_tables(video.numpy(), rope.max_positions, rope.dim, rope.heads, rope.theta, False, "split")
    assert np.abs(float32_cos - ref_cos).max() > 100 * tolerance
    inter_cos, inter_sin = rope_tables(video.numpy(), rope.max_positions, rope.dim, rope.heads, rope.theta, True,
                                       "interleaved")
    # rotated queries: ours = diffusers', the interleaved layout's are not
    q = torch.randn(1, frames * height * width, config["num_attention_heads"] * config["attention_head_dim"],
                    generator=torch.Generator().manual_seed(0))
    expected = apply_split_rotary_emb(q, (torch.from_numpy(ref_cos), torch.from_numpy(ref_sin))).numpy()
    got = np.array(apply_split_rotary(mx.array(q.numpy()), mx.array(ref_cos), mx.array(ref_sin)))
    assert np.abs(got - expected).max() <= 1e-5
    interleaved = np.array(apply_interleaved_rotary(mx.array(q.numpy()), mx.array(inter_cos), mx.array(inter_sin)))
    assert np.abs(interleaved - expected).max() > 0.5


# ---------------------------------------------------------------- faults are caught and named


def test_perturbed_tensor_is_named(sources, tmp_path):
    convert(plan_conversion(sources["original"], "mlx", "ltx2-dit", overrides=SMALL_HEADS), tmp_path / "out")
    broken = perturbed_copy(tmp_path / "out", tmp_path / "broken",
                             "transformer_blocks.1.audio_to_video_attn.to_v.weight")
    report = verify(broken)
    assert not report.passed
    assert report.first_failure == "transformer_blocks.1.audio_to_video_attn.to_v"


def test_swapped_qk_norm_rule_is_caught(sources, tmp_path, monkeypatch):
    """A rule that swaps the q and k norms (same shapes) converts; verify names the first one."""
    mappings = tmp_path / "mappings"
    shutil.copytree(ROOT / "mappings", mappings)
    spec = mappings / "ltx2-dit" / "original.yaml"
    right = '    to: "transformer_blocks.{n}.{attn}.norm_{qk}.weight"'
    planted = ('  - from: "transformer_blocks.{n}.{attn:[a-z_]*attn[12]?}.q_norm.weight"\n'
               '    to: "transformer_blocks.{n}.{attn}.norm_k.weight"\n'
               '  - from: "transformer_blocks.{n}.{attn:[a-z_]*attn[12]?}.k_norm.weight"\n'
               '    to: "transformer_blocks.{n}.{attn}.norm_q.weight"\n')
    text = spec.read_text()
    start = text.index('  - from: "transformer_blocks.{n}.{attn:[a-z_]*attn[12]?}.{qk:q|k}_norm.weight"')
    end = text.index(right) + len(right) + 1
    spec.write_text(text[:start] + planted + text[end:])
    monkeypatch.setenv("VIDPORT_MAPPINGS", str(mappings))
    convert(plan_conversion(sources["original"], "mlx", "ltx2-dit", overrides=SMALL_HEADS), tmp_path / "out")
    report = verify(tmp_path / "out")
    assert not report.passed
    assert report.first_failure == "transformer_blocks.0.attn1.norm_q"


# ---------------------------------------------------------------- bad input, configs, the command line


def test_missing_or_misshapen_tensor_is_refused_with_nothing_written(sources, tmp_path):
    state = load_file(str(sources["original"]))
    missing_key = f"{PREFIX}transformer_blocks.1.video_to_audio_attn.to_k.bias"
    save_file({k: v for k, v in state.items() if k != missing_key}, str(tmp_path / "missing.safetensors"))
    save_file({**state, f"{PREFIX}scale_shift_table": torch.ones(3, 64)}, str(tmp_path / "misshapen.safetensors"))
    for name, message in (("missing", "video_to_audio_attn.to_k.bias"), ("misshapen", "scale_shift_table")):
        out = tmp_path / f"out-{name}"
        result = runner.invoke(app, ["convert", "ltx2-dit", str(tmp_path / f"{name}.safetensors"), "--target", "mlx",
                                     "--out", str(out), "--set", "num_attention_heads=4",
                                     "--set", "audio_num_attention_heads=4"])
        assert result.exit_code == 1, result.output
        assert message in result.output and "Traceback" not in result.output
        assert not out.exists()


def test_heads_are_asked_for_unknown_widths(sources):
    """The shapes cannot tell head counts: each stream's is asked for by name."""
    with pytest.raises(VidportError) as err:
        plan_conversion(sources["original"], "mlx", "ltx2-dit")
    assert err.value.hint == "give --set num_attention_heads=VALUE"
    with pytest.raises(VidportError) as err:
        plan_conversion(sources["original"], "mlx", "ltx2-dit", overrides={"num_attention_heads": 4})
    assert err.value.hint == "give --set audio_num_attention_heads=VALUE"


def test_cli_convert_and_verify(sources, tmp_path):
    out = tmp_path / "dit-mlx"
    result = runner.invoke(app, ["convert", "ltx2-dit", str(sources["diffusers"]), "--target", "mlx",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "vidport_manifest.json").read_text())
    assert manifest["spec"]["name"] == "ltx2-dit/diffusers" and manifest["config"]["use_cross_timestep"] is False
    result = runner.invoke(app, ["verify", str(out), "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passed"] and report["reference"] == "diffusers:LTX2VideoTransformer3DModel.from_pretrained"


@pytest.mark.parametrize("version,variant", [("2.0", "LTX-2 19B (dev or distilled)"), ("2.3", "LTX-2.3 22B")])
def test_release_config_from_shapes(version, variant, tmp_path):
    """A release-shaped single file (weights never read) is recognised by the variant table and
    planned to its published Diffusers config, with no flags; the rest are diffusers' defaults."""
    from diffusers import LTX2VideoTransformer3DModel

    from vidport.reference.canonical import canonical_shapes

    published = _release_config(version)
    shapes = canonical_shapes("diffusers:LTX2VideoTransformer3DModel", published)
    path = tmp_path / f"ltx-{version}.safetensors"
    sparse_safetensors(path, {to_original_key(k): s for k, s in shapes.items()})
    plan = plan_conversion(path, "mlx", "ltx2-dit")
    assert plan.variant == variant and not plan.assumed
    defaults = {k: p.default for k, p in inspect.signature(LTX2VideoTransformer3DModel.__init__).parameters.items()}
    config = public(plan.config)
    assert {k: config.get(k, defaults[k]) for k in published} == {
        k: tuple(v) if isinstance(defaults[k], tuple) else v for k, v in published.items()}
    assert config["use_cross_timestep"] is (version == "2.3")
