"""Issue 5: Wan's text encoder (umt5) and image encoder (CLIP vision) on MLX.

Every source layout is real (the official Wan modules load the native fixtures strictly;
transformers writes the Diffusers folders), converts, and passes per-layer verify against
transformers; the native files also match the official Wan code end to end. The checks that
make the parity tests bite: per-layer position tables, and the order of the fused qkv split."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from vidport.converter.convert import convert, plan_conversion
from vidport.golden.compare import compare_port
from vidport.golden.metrics import compare, threshold_for
from vidport.golden.store import load_golden
from vidport.golden.verify import verify
from fixtures.wan_encoders import (CLIP_VISION_SMALL, UMT5_SMALL, write_diffusers_clip_vision,
                                            write_diffusers_umt5, write_native_clip, write_native_umt5)
from vidport.converter.core.manifest import read_manifest
from fixtures.references import assert_names_reference
from vidport.runtime.loading import load_model

HAS_WAN = importlib.util.find_spec("wan") is not None
needs_wan = pytest.mark.skipif(not HAS_WAN, reason="the official Wan code: pip install --no-deps wan22==2.2.11")

SOURCES = {  # name -> (family, needs the official code to write)
    "umt5-native": ("umt5", True),
    "umt5-diffusers": ("umt5", False),
    "clip-native": ("clip-vision", True),
    "clip-diffusers": ("clip-vision", False),
    "clip-diffusers-t4": ("clip-vision", False),  # keys as transformers 4 wrote them (published folders)
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("wan-encoders")
    found = {"umt5-diffusers": root / "text_encoder", "clip-diffusers": root / "image_encoder",
             "clip-diffusers-t4": root / "image_encoder_t4"}
    write_diffusers_umt5(found["umt5-diffusers"], seed=1)
    write_diffusers_clip_vision(found["clip-diffusers"], seed=2)
    write_diffusers_clip_vision(found["clip-diffusers-t4"], seed=3, transformers4_keys=True)
    if HAS_WAN:
        found["umt5-native"] = root / "models_t5_umt5-xxl-enc-bf16.pth"
        found["clip-native"] = root / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
        write_native_umt5(found["umt5-native"], seed=4)
        write_native_clip(found["clip-native"], seed=5)
    return found


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory):
    """MLX conversions, made once per (source, dtype)."""
    root = tmp_path_factory.mktemp("converted")
    made: dict[tuple[str, str], Path] = {}

    def get(name: str, dtype: str = "float32") -> Path:
        if SOURCES[name][1] and not HAS_WAN:
            pytest.skip("the official Wan code is not installed")
        if (name, dtype) not in made:
            out = root / f"{name}-{dtype}"
            convert(plan_conversion(sources[name], "mlx", SOURCES[name][0], dtype), out)
            made[name, dtype] = out
        return made[name, dtype]

    return get


@pytest.fixture(scope="module")
def verified(converted, tmp_path_factory):
    """verify() of each conversion, run once; float32 runs save their golden, which the fault
    checks below replay against deliberately broken ports (no second reference run)."""
    root = tmp_path_factory.mktemp("goldens")
    done: dict[tuple[str, str], tuple] = {}

    def get(name: str, dtype: str = "float32") -> tuple[Path, object, Path | None]:
        if (name, dtype) not in done:
            folder = converted(name, dtype)
            golden = root / f"{name}-golden" if dtype == "float32" else None
            done[name, dtype] = (folder, verify(folder, save_to=golden), golden)
        return done[name, dtype]

    return get


@needs_wan
def test_native_fixtures_load_into_the_official_modules(sources):
    """The native layouts are the official ones: wan/modules/t5.py's T5Encoder and clip.py's
    XLMRobertaCLIP (both towers) take our fixtures with strict loading."""
    from fixtures.wan_encoders import official_clip, official_umt5_encoder

    t5_state = torch.load(sources["umt5-native"], weights_only=True)
    official_umt5_encoder(UMT5_SMALL, seed=99).load_state_dict(t5_state, strict=True)
    assert {"token_embedding.weight", "blocks.1.pos_embedding.embedding.weight", "blocks.0.ffn.gate.0.weight",
            "norm.weight"} <= set(t5_state) and t5_state["norm.weight"].dtype == torch.bfloat16
    clip_state = torch.load(sources["clip-native"], weights_only=True)
    official_clip(CLIP_VISION_SMALL, seed=99).load_state_dict(clip_state, strict=True)
    assert {"visual.transformer.0.attn.to_qkv.weight", "visual.cls_embedding", "visual.head", "log_scale",
            "textual.token_embedding.weight"} <= set(clip_state)


CASES = [(s, d) for s in SOURCES for d in ("float32", "bfloat16") if not (s == "clip-diffusers-t4" and d == "bfloat16")]


@pytest.mark.parametrize("name,dtype", CASES)
def test_convert_and_verify(verified, name, dtype):
    out, report, _golden = verified(name, dtype)
    assert report.passed, report.first_failure
    assert_names_reference(report, out)
    # a native file's reference is the official model: compared where its modules are transformers'
    assert len(report.layers) > (20 if name.endswith("native") else 40) and not report.not_in_port
    worst = min(r.local["pcc"] for r in report.layers)
    assert worst >= (0.99999 if dtype == "float32" else 0.999)
    manifest = read_manifest(out)
    assert manifest["dtype"] == dtype and all(d["why"] for d in manifest["dropped"])


@needs_wan
def test_native_configs_are_inferred(sources):
    umt5 = plan_conversion(sources["umt5-native"], "mlx").config
    assert {k: umt5[k] for k in UMT5_SMALL} == UMT5_SMALL
    clip = plan_conversion(sources["clip-native"], "mlx").config
    assert {k: clip[k] for k in CLIP_VISION_SMALL} == CLIP_VISION_SMALL
    dropped = {key for key, _why in plan_conversion(sources["clip-native"], "mlx").canonical.dropped}
    assert {"log_scale", "visual.head", "textual.token_embedding.weight"} <= dropped


def _official_outputs_match(ours: np.ndarray, official: np.ndarray) -> None:
    metrics = compare(official, ours)
    assert metrics["pcc"] >= 0.99999 and metrics["max_abs"] <= 1e-4 * max(1.0, metrics["ref_rms"]), metrics


@needs_wan
def test_umt5_matches_official_code_end_to_end(sources, converted, tmp_path):
    """Same tokens and padding mask through the official T5Encoder, transformers'
    UMT5EncoderModel loaded from our native -> Diffusers output, and our MLX model."""
    import mlx.core as mx
    from transformers import UMT5EncoderModel

    from vidport.reference.umt5 import probes
    from fixtures.wan_encoders import official_umt5_encoder

    (probe,) = probes(UMT5_SMALL, seed=3)
    ids, mask = probe.args[0], probe.kwargs["attention_mask"]
    official = official_umt5_encoder(UMT5_SMALL)
    official.load_state_dict(torch.load(sources["umt5-native"], weights_only=True))
    with torch.no_grad():
        expected = official(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    convert(plan_conversion(sources["umt5-native"], "diffusers"), tmp_path / "text_encoder")
    with torch.no_grad():
        hf = UMT5EncoderModel.from_pretrained(tmp_path / "text_encoder", dtype=torch.float32)(
            torch.from_numpy(ids), torch.from_numpy(mask))
    _official_outputs_match(hf.last_hidden_state.numpy(), expected)
    ours = load_model(converted("umt5-native"))(mx.array(ids), mx.array(mask))
    _official_outputs_match(np.array(ours), expected)


@needs_wan
def test_clip_vision_matches_official_code_end_to_end(sources, converted, tmp_path):
    """The official visual tower (with a float32 CPU attention in place of flash attention)
    against transformers' CLIPVisionModel from our Diffusers output and our MLX model: the
    penultimate hidden states Wan conditions on, and the last layer's."""
    import mlx.core as mx
    from transformers import CLIPVisionModel

    from vidport.reference.clip_vision import probes
    from fixtures.wan_encoders import official_clip
    from vidport.reference.wan_official import cpu_attention, official_module

    official_module("animate.clip").flash_attention = cpu_attention
    (probe,) = probes(CLIP_VISION_SMALL, seed=4)
    pixels = probe.args[0]
    visual = official_clip(CLIP_VISION_SMALL).eval()
    visual.load_state_dict(torch.load(sources["clip-native"], weights_only=True))
    with torch.no_grad():
        penultimate = visual.visual(torch.from_numpy(pixels), use_31_block=True).numpy()
        last = visual.visual(torch.from_numpy(pixels)).numpy()
    convert(plan_conversion(sources["clip-native"], "diffusers"), tmp_path / "image_encoder")
    with torch.no_grad():
        hf = CLIPVisionModel.from_pretrained(tmp_path / "image_encoder", dtype=torch.float32)(
            torch.from_numpy(pixels), output_hidden_states=True)
    _official_outputs_match(hf.hidden_states[-2].numpy(), penultimate)
    model = load_model(converted("clip-native"))
    states = model.hidden_states(mx.array(pixels))
    _official_outputs_match(np.array(states[-2]), penultimate)
    _official_outputs_match(np.array(model(mx.array(pixels)).last_hidden_state), last)


def _broken_report(verified, name: str, mutate) -> object:
    """Compare a converted model, after `mutate(model)`, with its source's saved golden."""
    folder, _report, golden = verified(name, "float32")
    probes, calls, _info = load_golden(golden)
    model = load_model(folder)
    mutate(model)
    return compare_port(model, probes, calls, threshold_for("float32"), "float32")


def test_position_bias_is_per_layer(verified):
    """UMT5 learns a position table in every layer; a T5-style port sharing layer 0's table is
    caught at layer 1's table and is visible at the output."""
    folder, _report, _golden = verified("umt5-diffusers")
    blocks = load_model(folder).encoder.block
    tables = [np.array(b.layer[0].SelfAttention.relative_attention_bias.weight) for b in blocks]
    assert not np.allclose(tables[0], tables[1])

    def share_first_table(model) -> None:
        first = model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
        for block in model.encoder.block[1:]:
            block.layer[0].SelfAttention.relative_attention_bias.weight = first

    report = _broken_report(verified, "umt5-diffusers", share_first_table)
    assert not report.passed
    assert report.first_failure == "encoder.block.1.layer.0.SelfAttention.relative_attention_bias"
    final = next(r for r in report.layers if r.is_probe_output)
    assert final.global_passed is False


@needs_wan
def test_fused_qkv_split_is_q_k_v(sources, converted, verified):
    """The spec splits the official to_qkv into its three row blocks in q, k, v order; a port
    with two of them exchanged fails parity at the attention that uses them (the official fused
    to_qkv has no per-projection counterpart to compare with)."""
    state = torch.load(sources["clip-native"], weights_only=True)
    attention = load_model(converted("clip-native")).encoder.layers[1].self_attn
    fused = state["visual.transformer.1.attn.to_qkv.weight"].numpy()
    for index, proj in enumerate((attention.q_proj, attention.k_proj, attention.v_proj)):
        np.testing.assert_array_equal(np.array(proj.weight), np.split(fused, 3)[index])

    def exchange_q_k(model) -> None:
        layer = model.encoder.layers[0].self_attn
        layer.q_proj, layer.k_proj = layer.k_proj, layer.q_proj

    report = _broken_report(verified, "clip-native", exchange_q_k)
    assert report.first_failure == "encoder.layers.0.self_attn" and not report.passed


def test_relative_position_buckets_match_transformers():
    """Our float32 bucket arithmetic lands every offset in transformers' bucket."""
    from transformers import UMT5Config
    from transformers.models.umt5.modeling_umt5 import UMT5Attention

    from vidport.runtime.umt5 import relative_position_bucket

    offsets = torch.arange(-3000, 3001)[None]
    for buckets, distance in [(32, 128), (32, 64), (64, 256)]:
        config = UMT5Config(relative_attention_num_buckets=buckets, relative_attention_max_distance=distance)
        expected = UMT5Attention(config, has_relative_attention_bias=True)._relative_position_bucket(offsets)
        np.testing.assert_array_equal(relative_position_bucket(offsets.numpy(), buckets, distance), expected.numpy())


class _ShapeOnly:
    """A tensor reference that knows its shape and nothing else (never loaded)."""

    def __init__(self, shape, dtype=np.float32):
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)

    def load(self):
        raise AssertionError("planning must not read tensors")


@needs_wan
@pytest.mark.parametrize("family", ["umt5", "clip-vision"])
def test_full_size_files_plan_to_the_real_configs(family):
    """The real umt5-xxl and ViT-H/14 files (their shapes, from the official modules built on the
    meta device) detect, map, infer the published configs, and fit both MLX and transformers."""
    from vidport.converter.checkpoint import Source
    from vidport.converter.convert import expected_shapes, resolve_config
    from vidport.converter.detect import detect
    from vidport.converter.plan import check_expected, map_keys
    from vidport.converter.spec import load_catalog
    from vidport.reference.wan_official import official_module

    with torch.device("meta"):
        if family == "umt5":
            model = official_module("t5").umt5_xxl(encoder_only=True, device="meta")
            real = {"vocab_size": 256384, "d_model": 4096, "d_kv": 64, "num_heads": 64, "d_ff": 10240, "num_layers": 24,
                    "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128}
        else:
            model = official_module("animate.clip").clip_xlm_roberta_vit_h_14(device="meta")
            real = {"hidden_size": 1280, "num_hidden_layers": 32, "num_attention_heads": 16, "image_size": 224,
                    "patch_size": 14, "intermediate_size": 5120, "hidden_act": "gelu", "layer_norm_eps": 1e-5}
    tree = {k: _ShapeOnly(v.shape) for k, v in model.state_dict().items()}
    catalog = load_catalog()
    detected = detect(Source(Path("real.pth"), "torch-zip", [], tree), catalog)
    assert detected.spec.name == f"{family}/native"
    canonical = map_keys({k: r.shape for k, r in detected.tensors.refs.items()}, detected.spec.rules, "native")
    config = resolve_config(detected, Source(Path("real.pth"), "torch-zip", [], tree), canonical.shapes, {}).config
    assert {k: config[k] for k in real} == real
    public = {k: v for k, v in config.items() if not k.startswith("_")}
    check_expected(canonical.shapes, expected_shapes(detected.family, catalog.target("diffusers"), public), family)
    mlx_expected = expected_shapes(detected.family, catalog.target("mlx"), public)
    assert {k: s for k, s in canonical.shapes.items() if k != "embeddings.patch_embedding.weight"} == \
        {k: s for k, s in mlx_expected.items() if k != "embeddings.patch_embedding.weight"}


def test_config_expr_reads_earlier_values(tmp_path):
    """Spec language: `expr` computes a config value from others (integer arithmetic and isqrt),
    refuses anything else at load time, and names a value nothing gives."""
    from vidport.converter.core.errors import VidportError
    from vidport.converter.infer import finish_expressions, infer_config
    from vidport.converter.spec import SpecError, load_source_spec

    header = "spec: t/x\nversion: 1\nfamily: t\nsource: x\nrules: [{from: '{k:.+}', to: '{k}'}]\n"
    path = tmp_path / "x.yaml"
    path.write_text(header + "config:\n  infer:\n    rows: {shape: 'pos', dim: 0}\n"
                    "    side: {expr: 'isqrt(rows - 1) * 14'}\n    heads: {expr: 'width // 80'}\n")
    spec = load_source_spec(path)
    assert infer_config(spec.config, {"pos": (257, 8)}, "x", {"width": 1280}) == {"width": 1280, "rows": 257,
                                                                                  "side": 224, "heads": 16}
    with pytest.raises(VidportError, match="config 'heads' = width // 80 needs width, which the weights do not tell"):
        finish_expressions(spec.config, "x", infer_config(spec.config, {"pos": (257, 8)}, "x", {}))
    path.write_text(header + "config:\n  infer:\n    bad: {expr: '__import__(1)'}\n")
    with pytest.raises(SpecError, match="config.infer.bad"):
        load_source_spec(path)
