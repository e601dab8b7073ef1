"""Quantized outputs of every family, as each family's `quantize:` declaration says.

MLX: each family that declares linears converts with --quantize in MLX's formats, the runtime
builds nn.QuantizedLinear layers in exactly the manifest's format, and one forward on the family's
probes stays finite and close to the reference library's float32 output (PCC bounds below, set
from measurement with a margin; the small fixtures' 16-64-wide layers are worse than real widths).
A family with `roles: []` refuses --quantize; a manifest that disagrees with the packed weights is
refused at load; a Wan pipeline quantizes its transformer only.
TTNN: --quantize 8 / 4 writes the declared tensors as ttnn's bfloat8_b / bfloat4_b, byte for byte
as ttnn packs them, and refuses MLX's modes.
"""
from __future__ import annotations

import json
from pathlib import Path

import mlx.nn as nn
import numpy as np
import pytest
from typer.testing import CliRunner

from vidport.cli import app
from vidport.converter.convert import convert, plan_conversion
from vidport.converter.core.errors import VidportError
from vidport.converter.core.manifest import MANIFEST, read_manifest
from vidport.converter.quantize import QuantFormat, read_quantization
from vidport.converter.spec import load_catalog
from vidport.golden.compare import compare
from vidport.golden.port import open_port
from vidport.golden.verify import reference_calls
from vidport.runtime.loading import load_model

FORMATS = {"q8": (8, None, None), "q4": (4, None, None), "q4-g32": (4, 32, None), "mxfp8": (8, None, "mxfp8"),
           "mxfp4": (4, None, "mxfp4"), "nvfp4": (4, None, "nvfp4")}

# family -> {format: min whole-forward PCC against the reference library} (wan-dit runs every
# mode; the others one or two, to keep the file near two minutes).
# Measured (tests/fixtures seeds, float32 source): wan-dit q8 0.99999, q4 0.9963, mxfp8 0.9996,
# mxfp4 0.9932, nvfp4 0.9960; animatediff-motion q8 0.99996, nvfp4 0.989; sd15-unet q8 0.99996,
# mxfp4 0.957; sd-vae q4 0.9970; clip-text q8 0.99992, q4 0.979; clip-vision mxfp4 0.9948;
# umt5 q4 0.9886; ltx2-dit q8 0.99999, mxfp4 0.9915; ltx2-connectors mxfp8 0.9993, nvfp4 0.923
# (16-wide layers); gemma3-text q4-g32 0.9988, mxfp8 0.99986.
CASES: dict[str, dict[str, float]] = {
    "wan-dit": {"q8": 0.9995, "q4": 0.99, "mxfp8": 0.998, "mxfp4": 0.98, "nvfp4": 0.985},
    "animatediff-motion": {"q8": 0.999, "nvfp4": 0.97},
    "sd15-unet": {"mxfp4": 0.93},
    "sd-vae": {"q4": 0.99},
    "clip-text": {"q4": 0.95},
    "clip-vision": {"mxfp4": 0.98},
    "umt5": {"q4": 0.97},
    "ltx2-dit": {"q8": 0.9995, "mxfp4": 0.975},
    "ltx2-connectors": {"nvfp4": 0.88},
    "gemma3-text": {"q4-g32": 0.99},
}
PARAMS = [(family, name) for family, formats in CASES.items() for name in formats]


def _write(family: str, folder: Path) -> Path:
    """The family's small fixture, in the Diffusers / transformers layout its tests use."""
    from fixtures import (gemma3, ltx2_connectors, ltx2_dit, motion, sd, wan_dit, wan_encoders)

    writers = {
        "wan-dit": lambda: wan_dit.write_diffusers(folder, "t2v", 4),
        "animatediff-motion": lambda: motion.write_diffusers_motion_adapter(folder, "v2", 7),
        "sd15-unet": lambda: motion.write_sd15_unet_folder(folder),
        "sd-vae": lambda: sd.write_sd_pipeline(folder, seed=3),
        "clip-text": lambda: sd.write_sd_pipeline(folder, seed=3),
        "clip-vision": lambda: wan_encoders.write_diffusers_clip_vision(folder, seed=2),
        "umt5": lambda: wan_encoders.write_diffusers_umt5(folder, seed=1),
        "ltx2-dit": lambda: ltx2_dit.write_diffusers(folder),
        "ltx2-connectors": lambda: ltx2_connectors.write_diffusers(folder),
        "gemma3-text": lambda: gemma3.write_transformers(folder),
    }
    writers[family]()
    return folder / {"sd-vae": "vae", "clip-text": "text_encoder"}.get(family, "")


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """family -> {"source", "probes", "reference": call name -> the reference library's output};
    built on first use, then kept for the module."""
    root = tmp_path_factory.mktemp("quantize-families")
    found: dict[str, dict] = {}

    def get(family: str, manifest: dict | None = None) -> dict:
        if family not in found:
            found[family] = {"source": _write(family, root / family)}
        entry = found[family]
        if manifest is not None and "probes" not in entry:
            entry["probes"], calls, _ = reference_calls(manifest, entry["source"], 0, None)
            entry["reference"] = {call.name: call.output for call in calls}
        return entry

    return get


def quantized_layers(model: nn.Module) -> dict[str, nn.QuantizedLinear]:
    return {path: m for path, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)}


def assert_layers_match_manifest(folder: Path) -> dict[str, QuantFormat]:
    """Every layer the manifest quantizes is an nn.QuantizedLinear of exactly its mode, bits and
    group size, and no other layer is: the round trip manifest -> loader -> layers is exact."""
    manifest = read_manifest(folder)
    formats = read_quantization(manifest)
    assert formats and {p: f.as_json() for p, f in formats.items()} == \
        {p: {k: e[k] for k in ("mode", "bits", "group_size")} for p, e in manifest["quantization"]["tensors"].items()}
    layers = quantized_layers(load_model(folder))
    assert set(layers) == set(formats)
    for path, layer in layers.items():
        assert (layer.mode, layer.bits, layer.group_size) == (formats[path].mode, formats[path].bits,
                                                              formats[path].group_size), path
    return formats


@pytest.mark.parametrize("family,name", PARAMS, ids=[f"{f}-{n}" for f, n in PARAMS])
def test_family_quantizes_and_runs(families, family, name, tmp_path):
    fmt = QuantFormat.parse(*FORMATS[name])
    source = families(family)["source"]
    manifest = convert(plan_conversion(source, "mlx", family, "float32", quantize=fmt), tmp_path / "q")
    assert manifest["quantization"]["name"] == fmt.name
    formats = assert_layers_match_manifest(tmp_path / "q")
    declared = load_catalog().family(family).quantize
    assert all(declared.selects(f"{path}.weight", "linear.weight") for path in formats)

    entry = families(family, manifest)
    port = open_port(tmp_path / "q", read_manifest(tmp_path / "q"), False)
    outputs, finals = port.run(entry["probes"])
    assert finals
    for call in finals:
        assert np.isfinite(outputs[call]).all(), call
        pcc = compare(entry["reference"][call], outputs[call])["pcc"]
        assert pcc >= CASES[family][name], (call, pcc)


@pytest.mark.parametrize("bits,group", [(3, 32), (5, 64), (6, 128), (2, 64)])
def test_bits_and_group_survive_the_round_trip(families, bits, group, tmp_path):
    """Affine formats the family tests above do not run: the built layers have the manifest's
    bits and group size exactly (packed shapes alone could not tell them apart)."""
    fmt = QuantFormat(mode="affine", bits=bits, group_size=group)
    convert(plan_conversion(families("wan-dit")["source"], "mlx", "wan-dit", quantize=fmt), tmp_path / "q")
    formats = assert_layers_match_manifest(tmp_path / "q")
    assert set(formats.values()) == {fmt}


def test_manifest_that_disagrees_with_the_weights_is_refused(families, tmp_path):
    """The misreading the issue names: 4-bit weights whose manifest says 2 bits (same group)."""
    out = tmp_path / "q"
    convert(plan_conversion(families("wan-dit")["source"], "mlx", "wan-dit", quantize=QuantFormat.parse(4)), out)
    manifest = json.loads((out / MANIFEST).read_text())
    planted = "blocks.1.ffn.net.2"
    assert manifest["quantization"]["tensors"][planted] == {"mode": "affine", "bits": 4, "group_size": 64}
    manifest["quantization"]["tensors"][planted]["bits"] = 2
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(VidportError) as err:
        load_model(out)
    assert f"{planted}.weight" in err.value.message and "2 bits" in err.value.message
    assert "[64, 16]" in err.value.message  # what it holds: 128 inputs at 4 bits, not 2


def test_every_family_declares_what_quantizes():
    """Each MLX family has a declaration; the denoisers quantize in pipelines, nothing else does;
    a family with nothing to quantize says why."""
    catalog = load_catalog()
    denoisers = {"wan-dit", "self-forcing", "ltx2-dit", "sd15-unet", "animatediff-motion"}
    for name, family in catalog.families.items():
        assert family.quantize is not None, name
        assert family.quantize.pipeline == (name in denoisers), name
        assert family.quantize.why, name
    tested = set(CASES) | {"self-forcing"}
    empty = {n for n, f in catalog.families.items() if not f.quantize.roles}
    assert empty == set(catalog.families) - tested  # every family that quantizes is run above


def test_convolution_family_refuses_quantize(tmp_path):
    from fixtures.ltx2_vocoder import write_diffusers

    write_diffusers(tmp_path / "vocoder", version="2.0")
    result = CliRunner().invoke(app, ["convert", "ltx2-vocoder", str(tmp_path / "vocoder"), "--quantize", "4",
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code != 0
    assert "the ltx2-vocoder family has nothing to quantize: a 1-D convolution network" in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()


def test_wan_pipeline_quantizes_the_transformer_only(tmp_path):
    from vidport.converter.pipeline import convert_pipeline, plan_pipeline
    from fixtures.wan_pipelines import write_wan_pipeline

    source = write_wan_pipeline(tmp_path / "wan", "t2v", seed=0)
    convert_pipeline(plan_pipeline("wan", {"wan": source}, "mlx", quantize=QuantFormat.parse(4)), tmp_path / "out")
    sections = {name: read_manifest(tmp_path / "out" / name).get("quantization")
                for name in ("transformer", "vae", "text_encoder")}
    assert sections["vae"] is None and sections["text_encoder"] is None
    assert sections["transformer"]["name"] == "affine-q4-g64"
    assert_layers_match_manifest(tmp_path / "out" / "transformer")


# --------------------------------------------------------------------------- TTNN block formats


@pytest.fixture(scope="module")
def motion_folder(tmp_path_factory) -> Path:
    from fixtures.motion import write_diffusers_motion_adapter

    folder = tmp_path_factory.mktemp("ttnn-quantize") / "motion"
    write_diffusers_motion_adapter(folder, "v2", seed=7)
    return folder


@pytest.mark.parametrize("bits,dtype,floor", [(8, "bfloat8_b", 0.999), (4, "bfloat4_b", 0.96)])
def test_ttnn_block_formats(ttnn, motion_folder, bits, dtype, floor, tmp_path, monkeypatch):
    """The declared tensors (and only they) are written as `dtype`, by vidport's own codec, with
    the bytes ttnn itself writes for the same tensor; the host emulator runs the folder close to
    the reference (measured: bfloat8_b 0.99991, bfloat4_b 0.982)."""
    import torch
    from safetensors.numpy import load_file

    monkeypatch.setenv("VIDPORT_TENSORBIN_ENCODER", "numpy")
    out = tmp_path / "ttnn"
    manifest = convert(plan_conversion(motion_folder, "ttnn", quantize=QuantFormat.parse(bits)), out)
    assert manifest["ttnn"]["encoder"] == "vidport"
    section = manifest["ttnn"]["quantize"]
    assert (section["bits"], section["dtype"], section["unquantized"]) == (bits, dtype, {})
    declared = load_catalog().family("animatediff-motion").quantize
    tensors = json.loads((out / "ttnn_manifest.json").read_text())["tensors"]
    selected = {k for k, e in tensors.items() if declared.selects(k, e["role"])}
    assert selected == set(section["tensors"]) and len(selected) == 210
    assert all(tensors[k]["dtype"] == dtype for k in selected)
    assert all(e["dtype"] == "bfloat16" for k, e in tensors.items() if e["role"] == "linear.weight" and k not in selected)
    assert dtype == "bfloat8_b" or all(e["dtype"] != dtype for k, e in tensors.items() if k not in selected)

    source = load_file(str(motion_folder / "diffusion_pytorch_model.safetensors"))
    reference = tmp_path / "ttnn_own.tensorbin"
    for key in sorted(selected)[:12]:
        stored = torch.from_numpy(np.ascontiguousarray(source[key].astype(np.float32).T))
        ttnn.dump_tensor(str(reference), ttnn.from_torch(stored, dtype=getattr(ttnn, dtype), layout=ttnn.TILE_LAYOUT))
        assert (out / tensors[key]["file"]).read_bytes() == reference.read_bytes(), key

    probes, calls, _ = reference_calls(read_manifest(out), motion_folder, 0, None)
    expected = {call.name: call.output for call in calls}
    outputs, finals = open_port(out, read_manifest(out), False).run(probes)
    assert min(compare(expected[n], outputs[n])["pcc"] for n in finals) >= floor


@pytest.mark.parametrize("args,message", [((4, None, "mxfp4"), "MLX's formats"), ((8, 32, None), "MLX's formats"),
                                          ((2, None, None), "no 2-bit block format")])
def test_ttnn_refuses_mlx_formats(motion_folder, args, message):
    with pytest.raises(VidportError) as err:
        plan_conversion(motion_folder, "ttnn", quantize=QuantFormat.parse(*args))
    assert message in err.value.message and "--quantize 8 (bfloat8_b), 4 (bfloat4_b)" in err.value.hint


def test_mlx_formats_only_on_mlx(motion_folder):
    with pytest.raises(VidportError, match="MLX's formats are for the mlx target"):
        plan_conversion(motion_folder, "diffusers", quantize=QuantFormat.parse(4))


# Every family that declares linears, in each of MLX's modes, verified layer by layer at that format's
# thresholds (golden/metrics.py, measured on the Wan DiT fixtures). Measured outcomes that are not a
# pass, each asserted as it is: the Gemma 3 fixture's 48-wide layers fit no affine group of 64, and
# the LTX-2 connectors' 16-wide layers at nvfp4 (one group a row) end their connector at PCC 0.923,
# under nvfp4's 0.958 (the released connectors are 3840 wide).
MODES = ["q8", "q4", "mxfp8", "mxfp4", "nvfp4"]
REFUSED = {("gemma3-text", "q8"), ("gemma3-text", "q4")}
OVER_THRESHOLD = {("ltx2-connectors", "nvfp4")}
VERIFIED = [(family, mode) for family in CASES for mode in MODES]


@pytest.mark.slow
@pytest.mark.parametrize("family,name", VERIFIED, ids=[f"{f}-{n}" for f, n in VERIFIED])
def test_every_family_verifies_in_every_mode(families, family, name, tmp_path):
    from vidport.golden.verify import verify

    fmt = QuantFormat.parse(*FORMATS[name])
    source = families(family)["source"]
    if (family, name) in REFUSED:
        with pytest.raises(VidportError, match="is not a multiple of the group size"):
            plan_conversion(source, "mlx", family, "float32", quantize=fmt)
        return
    convert(plan_conversion(source, "mlx", family, "float32", quantize=fmt), tmp_path / "q")
    report = verify(tmp_path / "q")
    assert report.quantization == fmt.name
    if (family, name) in OVER_THRESHOLD:
        assert not report.passed and report.first_failure is not None
    else:
        assert report.passed, (report.first_failure, report.ranked()[0].local)
