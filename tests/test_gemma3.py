"""Issue 11, gemma3-text: the Gemma 3 text tower LTX-2 encodes prompts with, on MLX.

The folders are real (transformers' Gemma3ForConditionalGeneration / Gemma3ForCausalLM load
every key of them, the tokenizer loads with AutoTokenizer), convert at float32 and bfloat16 and
pass per-layer verify against transformers' own model loaded from the same folder; the stacked
hidden states equal LTX-2's pipeline call on the full multimodal model; the sliding-window mask
is shown to matter; a planted fault is named; bad folders are refused with nothing written."""
from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from fixtures.sparse import sparse_safetensors
from fixtures.gemma3 import LAYER_TYPES, SLIDING_WINDOW, TEXT_CONFIG, write_causal_lm, write_original, write_transformers
from fixtures.references import assert_names_reference
from vidport.cli import app
from vidport.converter.convert import convert, plan_conversion
from vidport.converter.core.errors import VidportError
from vidport.converter.core.manifest import read_manifest
from vidport.golden.compare import compare_port
from vidport.golden.metrics import compare, threshold_for
from vidport.golden.store import load_golden
from vidport.golden.verify import verify
from vidport.runtime.loading import load_model

FAMILY = "gemma3-text"
SOURCES = {"transformers": write_transformers, "original": write_original, "causal-lm": write_causal_lm}
runner = CliRunner()


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gemma3")
    found = {}
    for seed, (name, write) in enumerate(SOURCES.items()):
        found[name] = root / name
        write(found[name], seed=seed)
    return found


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory):
    root = tmp_path_factory.mktemp("converted")
    made: dict[tuple[str, str], Path] = {}

    def get(name: str, dtype: str = "float32") -> Path:
        if (name, dtype) not in made:
            out = root / f"{name}-{dtype}"
            convert(plan_conversion(sources[name], "mlx", FAMILY, dtype), out)
            made[name, dtype] = out
        return made[name, dtype]

    return get


@pytest.fixture(scope="module")
def verified(converted, tmp_path_factory):
    """verify() of each conversion, once; float32 runs save a golden the fault test replays."""
    root = tmp_path_factory.mktemp("goldens")
    done: dict[tuple[str, str], tuple] = {}

    def get(name: str, dtype: str = "float32") -> tuple[Path, object, Path | None]:
        if (name, dtype) not in done:
            folder = converted(name, dtype)
            golden = root / f"{name}-golden" if dtype == "float32" else None
            done[name, dtype] = (folder, verify(folder, save_to=golden), golden)
        return done[name, dtype]

    return get


def _multimodal(folder: Path):
    from transformers import Gemma3ForConditionalGeneration

    return Gemma3ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)


@pytest.mark.parametrize("name", ["transformers", "original"])
def test_multimodal_folders_are_real(sources, name):
    """transformers reads every key of both layouts (4.57's and Google's names, 4.50's config),
    and builds the fixture's mixed sliding / global tower with a window shorter than the probes."""
    from transformers import AutoTokenizer

    from vidport.reference.gemma3 import probes

    model, info = _multimodal(sources[name])
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    text = model.config.text_config
    assert text.layer_types == LAYER_TYPES and text.sliding_window == SLIDING_WINDOW
    assert text.rope_parameters["full_attention"]["rope_type"] == "linear"
    assert probes(TEXT_CONFIG, seed=0)[0].args[0].shape[1] > SLIDING_WINDOW
    keys = set(load_file(str(sources[name] / "model.safetensors")))
    prefix = "model.language_model." if name == "transformers" else "language_model.model."
    assert f"{prefix}layers.1.self_attn.q_norm.weight" in keys and any("vision_tower.vision_model." in k for k in keys)
    tokenizer = AutoTokenizer.from_pretrained(sources[name])
    batch = tokenizer(["a red fox", "the camera pans slowly across a quiet lake"], padding=True)
    assert tokenizer.padding_side == "left" and batch["input_ids"][0][0] == tokenizer.pad_token_id
    assert max(max(ids) for ids in batch["input_ids"]) < TEXT_CONFIG["vocab_size"]


def test_causal_lm_folder_is_real(sources):
    from transformers import Gemma3ForCausalLM

    _model, info = Gemma3ForCausalLM.from_pretrained(sources["causal-lm"], dtype=torch.float32,
                                                     output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info


CASES = [(s, d) for s in SOURCES for d in ("float32", "bfloat16") if not (s == "causal-lm" and d == "bfloat16")]


@pytest.mark.parametrize("name,dtype", CASES)
def test_convert_and_verify(verified, name, dtype):
    out, report, _golden = verified(name, dtype)
    assert report.passed, report.first_failure
    assert_names_reference(report, out)
    names = {r.name for r in report.layers}
    # every hidden state LTX-2 stacks is a compared module output: embeddings, each layer, the final norm
    assert {"embed_tokens", "norm", "rotary_emb", "rotary_emb#1"} | {f"layers.{i}" for i in range(len(LAYER_TYPES))} <= names
    assert not report.not_in_port
    worst = min(r.local["pcc"] for r in report.layers)
    assert worst >= (0.99999 if dtype == "float32" else 0.999)
    manifest = read_manifest(out)
    assert manifest["dtype"] == dtype and manifest["spec"]["name"] == f"{FAMILY}/{name}"
    assert all(d["why"] for d in manifest["dropped"])
    if name != "causal-lm":  # the image encoder and projector are dropped, each key with its reason
        dropped = {d["key"] if isinstance(d, dict) else d for d in manifest["dropped"]}
        assert any("vision_tower" in str(k) for k in dropped) and any("multi_modal_projector" in str(k) for k in dropped)


@pytest.mark.parametrize("name", ["transformers", "original"])
def test_stacked_hidden_states_match_ltx2_pipeline_call(sources, converted, name):
    """What LTX-2's pipeline does: the fixture tokenizer pads left to a fixed length, the full
    Gemma3ForConditionalGeneration runs with output_hidden_states, the states are stacked on a last
    axis. The MLX tower's stack equals it (every state, the padding rows included)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(sources[name])
    tokenizer.padding_side = "left"
    batch = tokenizer(["a cat sleeps", "waves crash on the rocks under a grey sky"], padding="max_length",
                      max_length=16, truncation=True, return_tensors="pt")
    model, _info = _multimodal(sources[name])
    with torch.no_grad():
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
    expected = torch.stack(out.hidden_states, dim=-1).numpy()
    ours = load_model(converted(name)).stacked_hidden_states(mx.array(batch.input_ids.numpy()),
                                                              mx.array(batch.attention_mask.numpy()))
    assert ours.shape == expected.shape == (2, 16, TEXT_CONFIG["hidden_size"], len(LAYER_TYPES) + 1)
    for index in range(expected.shape[-1]):
        metrics = compare(expected[..., index], np.array(ours[..., index]))
        assert metrics["pcc"] >= 0.99999 and metrics["max_abs"] <= 1e-4 * max(1.0, metrics["ref_rms"]), (index, metrics)


def test_sliding_window_mask_matters(sources, converted):
    """The window decides what the sliding layers see: with it the port matches transformers at
    every hidden state; with the sliding layers attending globally (the window widened past the
    sequence, nothing else changed) the first sliding layer's output already departs from
    transformers, and so does every state after it."""
    from vidport.reference.gemma3 import probes

    (probe,) = probes(TEXT_CONFIG, seed=5)
    ids, mask = probe.args[0], probe.kwargs["attention_mask"]
    model, _info = _multimodal(sources["transformers"])
    with torch.no_grad():
        expected = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                         output_hidden_states=True).hidden_states
    port = load_model(converted("transformers"))

    def pccs() -> list[float]:
        states = port.hidden_states(mx.array(ids), mx.array(mask))
        return [compare(e.numpy(), np.array(s))["pcc"] for e, s in zip(expected, states)]

    assert min(pccs()) >= 0.99999
    port.sliding_window = 10 ** 6
    global_everywhere = pccs()
    first_sliding = 1 + LAYER_TYPES.index("sliding_attention")
    assert global_everywhere[0] >= 0.99999  # the embeddings do not depend on the mask
    assert all(p < 0.999 for p in global_everywhere[first_sliding:]), global_everywhere


def test_planted_fault_is_named(verified):
    """One perturbed tensor in the converted model: verify fails and names that layer."""
    folder, _report, golden = verified("transformers")
    probes, calls, _info = load_golden(golden)
    model = load_model(folder)
    norm = model.layers[1].self_attn.k_norm
    norm.weight = norm.weight + 0.5
    report = compare_port(model, probes, calls, threshold_for("float32"), "float32")
    assert not report.passed
    assert report.first_failure == "layers.1.self_attn.k_norm"
    final = next(r for r in report.layers if r.is_probe_output)
    assert final.global_passed is False


def test_runtime_defaults_are_transformers(tmp_path):
    """What the port assumes for keys a config.json leaves out is Gemma3TextConfig's default."""
    from transformers import Gemma3TextConfig

    from vidport.runtime import gemma3

    reference = Gemma3TextConfig()
    for key, value in gemma3._DEFAULTS.items():
        assert getattr(reference, key) == value, key
    assert gemma3.layer_types({"num_hidden_layers": 12}) == reference.__class__(num_hidden_layers=12).layer_types
    params = gemma3.rope_parameters({})
    for kind in ("full_attention", "sliding_attention"):
        assert params[kind]["rope_theta"] == reference.rope_parameters[kind]["rope_theta"]


def _edited_copy(source: Path, folder: Path, edit) -> Path:
    """A copy of a fixture folder with its tensors (or its config) edited."""
    folder.mkdir()
    state = load_file(str(source / "model.safetensors"))
    config = json.loads((source / "config.json").read_text())
    edit(state, config)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _set(key: str, value):
    return lambda state, config: state.__setitem__(key, value)


@pytest.mark.parametrize("edit,message", [
    (lambda s, c: s.pop("model.language_model.layers.2.mlp.up_proj.weight"), "layers.2.mlp.up_proj.weight"),
    (_set("model.language_model.layers.0.self_attn.v_proj.weight", torch.zeros(24, 32)), "layers.0.self_attn.v_proj.weight"),
    (_set("model.language_model.layers.0.bogus.weight", torch.zeros(3)), "layers.0.bogus.weight"),
    (lambda s, c: c.pop("text_config"), "text_config"),
    (lambda s, c: c.__setitem__("architectures", None), "not a known gemma3-text checkpoint"),
    (lambda s, c: c["text_config"].__setitem__("rope_parameters", {"full_attention": {"rope_type": "yarn", "factor": 4.0}}),
     "yarn"),
])
def test_bad_folders_refused_with_nothing_written(sources, tmp_path, edit, message):
    source = _edited_copy(sources["transformers"], tmp_path / "bad", edit)
    out = tmp_path / "out"
    result = runner.invoke(app, ["convert", FAMILY, str(source), "--target", "mlx", "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_cli_convert_and_verify(sources, tmp_path):
    out = tmp_path / "text_encoder"
    result = runner.invoke(app, ["convert", FAMILY, str(sources["original"]), "--target", "mlx", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert read_manifest(out)["spec"]["name"] == f"{FAMILY}/original"
    result = runner.invoke(app, ["verify", str(out), "--json", str(tmp_path / "report.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["passed"] and report["reference"].startswith("transformers:Gemma3ForConditionalGeneration")


def test_detection_tells_the_layouts_apart(sources):
    for name in SOURCES:
        assert plan_conversion(sources[name], "mlx").detected.spec.name == f"{FAMILY}/{name}"
    with pytest.raises(VidportError):
        plan_conversion(sources["transformers"], "mlx", "umt5")


def test_ltx2_gemma_release_plans_to_its_config(tmp_path):
    """gemma-3-12b-it as LTX-2 uses it: Lightricks' own copy of its config (ltx_core's
    GEMMA3_CONFIG_FOR_LTX, transformers 4.50 keys) beside release-shaped weights in Google's layout
    (never read). The plan reads heads and widths off the shapes in agreement with the file, and the
    MLX tower builds the layers and RoPE tables transformers derives from the same config: every
    6th layer global with the linearly scaled 1e6 base, the rest sliding (1024) with the 1e4 base."""
    from ltx_core.text_encoders.gemma.config import GEMMA3_CONFIG_FOR_LTX
    from transformers import Gemma3Config, Gemma3TextConfig

    from vidport.converter.infer import public
    from vidport.reference.canonical import canonical_shapes
    from vidport.runtime import gemma3

    config = GEMMA3_CONFIG_FOR_LTX.to_dict()
    text = Gemma3Config(**config).text_config
    shapes = canonical_shapes("transformers:Gemma3TextModel", text.to_dict())
    folder = tmp_path / "gemma-3-12b-it"
    folder.mkdir()
    sparse_safetensors(folder / "model.safetensors",
                        {**{f"language_model.model.{k}": s for k, s in shapes.items()},
                         "vision_tower.vision_model.post_layernorm.weight": (1152,)})
    (folder / "config.json").write_text(json.dumps(config))
    plan = plan_conversion(folder, "mlx", FAMILY, "bfloat16")
    planned = public(plan.config)
    assert {k: planned[k] for k in ("num_attention_heads", "num_key_value_heads", "head_dim", "hidden_size",
                                    "num_hidden_layers", "vocab_size")} == {
        "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256, "hidden_size": 3840,
        "num_hidden_layers": 48, "vocab_size": 262208}
    reference = Gemma3TextConfig(**planned)
    assert gemma3.layer_types(planned) == reference.layer_types and reference.layer_types.count("full_attention") == 8
    ours = gemma3.rope_parameters(planned)
    for kind, params in reference.rope_parameters.items():
        assert {k: ours[kind].get(k) for k in params} == params, kind
    model = gemma3.Gemma3TextModel.from_config(planned)
    assert model.sliding_window == reference.sliding_window == 1024
    assert plan.final.shapes["layers.47.self_attn.k_norm.weight"] == (256,)


def test_canonical_folder_loads_in_transformers(sources, tmp_path):
    """--target diffusers writes the canonical Gemma3TextModel folder: transformers loads every key
    of it and computes what the source's own text tower does (from Google's 4.50 config too)."""
    from transformers import Gemma3TextModel

    convert(plan_conversion(sources["original"], "diffusers", FAMILY), tmp_path / "text_model")
    model, info = Gemma3TextModel.from_pretrained(tmp_path / "text_model", dtype=torch.float32,
                                                  output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    source, _info = _multimodal(sources["original"])
    ids = torch.from_numpy(np.arange(1, 15, dtype=np.int64)[None])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).last_hidden_state, source.model.language_model(ids).last_hidden_state)


def test_wrong_rule_fails_against_transformers(sources, tmp_path, monkeypatch):
    """The reference never goes through vidport's mapping: with q_norm and k_norm exchanged by a
    planted rule (equal shapes, so the plan cannot see it) the conversion still plans and verify
    fails at the first of them; the self-mapped reference, sharing the mistake, passes and says so."""
    import shutil

    mappings = tmp_path / "mappings"
    shutil.copytree(Path(__file__).resolve().parent.parent / "mappings", mappings)
    spec = mappings / FAMILY / "original.yaml"
    text = spec.read_text()
    assert text.count("rules:\n") == 1
    spec.write_text(text.replace("rules:\n", "rules:\n"
                                 '  - from: "language_model.model.layers.{i}.self_attn.q_norm.weight"\n'
                                 '    to: "layers.{i}.self_attn.k_norm.weight"\n'
                                 '  - from: "language_model.model.layers.{i}.self_attn.k_norm.weight"\n'
                                 '    to: "layers.{i}.self_attn.q_norm.weight"\n'))
    monkeypatch.setenv("VIDPORT_MAPPINGS", str(mappings))
    convert(plan_conversion(sources["original"], "mlx", FAMILY), tmp_path / "bad")
    report = verify(tmp_path / "bad")
    assert not report.passed and report.first_failure == "layers.0.self_attn.q_norm"
    assert report.info["reference"].startswith("transformers:Gemma3ForConditionalGeneration")
    self_mapped = verify(tmp_path / "bad", self_mapped=True)
    assert self_mapped.passed and self_mapped.as_json()["reference"] == "self-mapped"
