"""Issue 4: the TTNN target (layouts by role, three cache styles), the TTNN model on the host
emulator, and verify for it. Parts needing the real ttnn skip cleanly where it cannot be imported;
the reader/writer, the emulator and verify need only numpy (and torch for the reference)."""
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
from vidport.converter.ttnn_support import group_norm as packing
from vidport.converter.core.tensorbin import read_tensorbin, to_bfloat8_b, to_bfloat16
from vidport.golden.verify import verify

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


@pytest.fixture(scope="module")
def canonical(motion_sources) -> dict[str, np.ndarray]:
    """The v2 source in diffusers naming, by diffusers' own converter (independent of our specs)."""
    from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers

    state = convert_animatediff_checkpoint_to_diffusers(torch.load(motion_sources["v2"], weights_only=True))
    return {k: v.float().numpy() for k, v in state.items()}


@pytest.fixture(scope="module")
def outputs(motion_sources, tmp_path_factory) -> dict[str, Path]:
    """One conversion per cache style; bfloat8_b and a 8x4 grid on the tt_dit one."""
    root = tmp_path_factory.mktemp("ttnn")
    runs = {"as_tensor": {}, "model_cache": {}, "tt_dit": {"dtype": "bfloat8_b", "grid": "8x4"}}
    for style, options in runs.items():
        convert(plan_conversion(motion_sources["v2"], "ttnn", target_options={"cache_style": style, **options}),
                root / style)
    return {style: root / style for style in runs}


def manifest(folder: Path) -> dict:
    return json.loads((folder / "ttnn_manifest.json").read_text())


def invert(values: np.ndarray, entry: dict, shape: tuple[int, ...]) -> np.ndarray:
    """Undo a tensor's recorded layout transforms (the few the motion family's roles use)."""
    for step in reversed(entry["transforms"]):
        name, params = (step, None) if isinstance(step, str) else next(iter(step.items()))
        if name == "transpose":
            values = values.T
        elif name == "reshape":
            values = values.reshape(shape)
        elif name == "group_norm_weight_bias_rm":
            values = packing.unpack_weight_bias(values, shape[0], params["cores"])
        else:
            raise AssertionError(f"no inverse for {name}")
    return values


# --------------------------------------------------------------------------- (a) round trip


@pytest.mark.parametrize("style", ["as_tensor", "model_cache", "tt_dit"])
def test_round_trip(outputs, canonical, style):
    """Every file read back and layout-inverted equals the source within its dtype's rounding."""
    found = manifest(outputs[style])
    grid_y = found["grid"]["y"]
    masks = 0
    for name, entry in found["tensors"].items():
        values, info = read_tensorbin(outputs[style] / entry["file"])
        assert (info["dtype"], info["layout"], list(info["logical_shape"])) == (entry["dtype"], entry["layout"], entry["shape"])
        assert list(info["padded_shape"]) == entry["padded_shape"]
        if entry["role"] == "group_norm.weight:input_mask":
            channels = canonical[name.replace("input_mask", "weight")].shape[0]
            assert np.array_equal(values, packing.input_mask(channels, 32, grid_y))
            masks += 1
            continue
        source = canonical[name]
        back = invert(values, entry, source.shape)
        assert back.shape == source.shape, name
        if entry["dtype"] == "float32":
            assert np.array_equal(back, source), name
        elif entry["dtype"] == "bfloat16":
            assert np.array_equal(back, to_bfloat16(source)), name
        else:  # bfloat8_b blocks are 16 values of the stored row: round the stored layout, from float32
            assert entry["role"] == "linear.weight" and np.array_equal(values, to_bfloat8_b(source.T)), name
            assert np.abs(back - source).max() <= 2**-6 * np.abs(source).max()
    assert masks == 21 and len(found["tensors"]) == len(canonical) + masks


def test_float32_role_round_trips_exactly(motion_sources, canonical, tmp_path, monkeypatch):
    mappings = spec_copy(tmp_path, "  layer_norm: {transforms: [{reshape: [1, -1]}], layout: TILE, dtype: bfloat16}",
                         "  layer_norm: {transforms: [{reshape: [1, -1]}], layout: ROW_MAJOR, dtype: float32}")
    monkeypatch.setenv("VIDPORT_MAPPINGS", str(mappings))
    convert(plan_conversion(motion_sources["v2"], "ttnn"), tmp_path / "out")
    found = manifest(tmp_path / "out")["tensors"]
    norms = [n for n, e in found.items() if e["role"].startswith("layer_norm")]
    assert norms and all(found[n]["dtype"] == "float32" for n in norms)
    for name in norms:
        values, _ = read_tensorbin(tmp_path / "out" / found[name]["file"])
        assert np.array_equal(invert(values, found[name], canonical[name].shape), canonical[name])


# --------------------------------------------------------------------------- (b) ttnn loads them


def test_as_tensor_and_load_tensor_load_the_output(ttnn, outputs):
    folder = outputs["as_tensor"]
    layouts = {"TILE": ttnn.TILE_LAYOUT, "ROW_MAJOR": ttnn.ROW_MAJOR_LAYOUT}
    for name, entry in manifest(folder)["tensors"].items():
        ours, _ = read_tensorbin(folder / entry["file"])
        # a cache hit never reads the tensor argument: None proves the file was found and loaded
        hit = ttnn.as_tensor(None, dtype=getattr(ttnn, entry["dtype"]), layout=layouts[entry["layout"]],
                             cache_file_name=str(folder / name))
        loaded = ttnn.load_tensor(folder / entry["file"])
        for tensor in (hit, loaded):
            assert list(tensor.shape) == entry["shape"] and tensor.dtype == getattr(ttnn, entry["dtype"])
            assert np.array_equal(ttnn.to_torch(tensor).float().numpy(), ours), name


def test_group_norm_packing_is_ttnns(ttnn, outputs, canonical):
    """Gamma/beta and masks equal ttnn's own helpers, over the grid the conversion was given."""
    for style in ("as_tensor", "tt_dit"):  # grids 8x8 and 8x4
        found = manifest(outputs[style])
        cores = found["grid"]["y"]
        for name, entry in found["tensors"].items():
            values, _ = read_tensorbin(outputs[style] / entry["file"])
            if entry["role"] in ("group_norm.weight", "group_norm.bias"):
                source = torch.from_numpy(canonical[name])
                expected = ttnn.create_group_norm_weight_bias_rm(source, source.numel(), cores).float().numpy()
                assert np.array_equal(values, to_bfloat16(expected)), name
            elif entry["role"] == "group_norm.weight:input_mask":
                channels = canonical[name.replace("input_mask", "weight")].shape[0]
                mask = ttnn.create_group_norm_input_mask(channels, 32, cores, ttnn.bfloat8_b)
                assert mask.layout == ttnn.TILE_LAYOUT
                assert np.array_equal(values, ttnn.to_torch(mask).float().numpy()), name
    for channels, groups, cores in [(320, 32, 8), (640, 32, 4), (96, 32, 1), (40, 8, 2), (960, 8, 8), (1280, 32, 8)]:
        mask = ttnn.to_torch(ttnn.create_group_norm_input_mask(channels, groups, cores)).float().numpy()
        assert np.array_equal(packing.input_mask(channels, groups, cores), mask)


def test_model_cache_is_what_preprocess_model_parameters_reads(ttnn, outputs, tmp_path):
    """The folder tree equals ttnn's own dump of the diffusers model (plus our group-norm masks), and
    preprocess_model_parameters finds it: a cache hit with no model to initialize."""
    from ttnn.model_preprocessing import preprocess_model_parameters

    from vidport.reference.build import load_reference

    folder = outputs["model_cache"]
    style = manifest(folder)["cache_style"]
    saved = (ttnn.CONFIG.model_cache_path, ttnn.CONFIG.enable_model_cache)
    try:
        ttnn.CONFIG.enable_model_cache = True
        ttnn.CONFIG.model_cache_path = tmp_path
        source = json.loads((folder / "vidport_manifest.json").read_text())
        model = load_reference("diffusers:MotionAdapter", "from_single_file", Path(source["source"]),
                               {"_class_name": "MotionAdapter", **source["config"]})
        preprocess_model_parameters(model_name=style["model_name"], version="theirs", initialize_model=lambda: model)
        ttnn.CONFIG.model_cache_path = folder / style["model_cache_path"]
        parameters = preprocess_model_parameters(model_name=style["model_name"], version=style["version"])
    finally:
        ttnn.CONFIG.model_cache_path, ttnn.CONFIG.enable_model_cache = saved

    def tree(root: Path) -> set[str]:
        return {str(p.relative_to(root)) + ("/" if p.is_dir() else "") for p in root.rglob("*")}

    theirs, ours = tree(tmp_path / style["model_name"]), tree(folder / style["model_name"])
    assert ours - theirs == {p for p in ours if p.endswith("input_mask.tensorbin")} and theirs <= ours
    assert "down_blocks/0/motion_modules/0/transformer_blocks/0/ff/net/1/" in ours  # the Dropout keeps its index
    assert (folder / style["model_name"] / "version.txt").read_text() == style["version"]  # no newline
    block = parameters.down_blocks[0].motion_modules[0].transformer_blocks[0]
    assert list(block.ff.net[2].weight.shape) == [128, 32] and list(block.attn1.to_out[0].bias.shape) == [1, 32]


def test_tt_dit_cache_dict(outputs):
    folder = outputs["tt_dit"]
    cache_dict = json.loads((folder / "cache_dict.json").read_text())
    assert cache_dict == {name: f"{name}.tensorbin" for name in manifest(folder)["tensors"]}
    assert all((folder / f).is_file() for f in cache_dict.values())


# --------------------------------------------------------------------------- (c) verify on the emulator


@pytest.mark.parametrize("style,dtype,floor", [("as_tensor", "bfloat16", 0.999), ("tt_dit", "bfloat8_b", 0.99)])
def test_emulated_motion_module_passes_verify(outputs, style, dtype, floor):
    report = verify(outputs[style], frames=8)
    assert report.dtype == dtype and report.threshold.min_pcc == floor
    assert report.passed, report.first_failure
    assert len(report.layers) > 500 and not report.not_in_port
    assert min(r.local["pcc"] for r in report.layers) >= floor
    assert min(r.global_["pcc"] for r in report.layers if r.global_) >= floor


def test_cli_convert_and_verify(motion_sources, tmp_path):
    out = tmp_path / "mm-ttnn"
    result = runner.invoke(app, ["convert", "animatediff-motion", str(motion_sources["v3"]), "--target", "ttnn",
                                 "--ttnn-dtype", "bfloat8_b", "--ttnn-grid", "4x2", "--cache-style", "model_cache",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert manifest(out)["options"] == {"cache_style": "model_cache", "dtype": "bfloat8_b", "grid": "4x2"}
    result = runner.invoke(app, ["verify", str(out), "--frames", "8", "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r.json").read_text())["passed"] is True
    for extra, message in [(["--dtype", "bfloat16"], "--ttnn-dtype"), (["--ttnn-grid", "8by8"], "COLUMNSxROWS"),
                           (["--ttnn-grid", "8x3"], "do not split over 3 cores")]:
        result = runner.invoke(app, ["convert", "animatediff-motion", str(motion_sources["v3"]), "--target", "ttnn",
                                     "--out", str(tmp_path / "bad"), *extra])
        assert result.exit_code != 0 and message in result.output, result.output
    result = runner.invoke(app, ["convert", "animatediff-motion", str(motion_sources["v3"]), "--target", "mlx",
                                 "--cache-style", "tt_dit", "--out", str(tmp_path / "bad")])
    assert result.exit_code != 0 and "takes no option cache_style" in result.output
    assert not (tmp_path / "bad").exists()


# --------------------------------------------------------------------------- (d) a planted fault


def spec_copy(tmp_path: Path, old: str, new: str) -> Path:
    mappings = tmp_path / "mappings"
    shutil.copytree(ROOT / "mappings", mappings)
    target = mappings / "targets" / "ttnn.yaml"
    text = target.read_text()
    assert text.count(old) == 1
    target.write_text(text.replace(old, new))
    return mappings


def test_planted_transposition_is_named(motion_sources, tmp_path, monkeypatch):
    """A TTNN spec that forgets to transpose linear weights converts (its shapes are its own), but
    verify fails at the first linear in dataflow order; the non-square ones cannot even run."""
    mappings = spec_copy(tmp_path, "linear.weight: {transforms: [transpose],", "linear.weight: {transforms: [],")
    monkeypatch.setenv("VIDPORT_MAPPINGS", str(mappings))
    convert(plan_conversion(motion_sources["v2"], "ttnn"), tmp_path / "out")
    report = verify(tmp_path / "out", frames=8)
    assert not report.passed
    assert report.first_failure == "down_blocks.0.motion_modules.0.proj_in"
    names = [r.name for r in report.layers]
    assert all(r.passed for r in report.layers[: names.index(report.first_failure)])
    ff = next(r for r in report.layers if r.name.endswith("transformer_blocks.0.ff.net.0.proj"))
    assert not ff.passed and "error" in ff.local


def test_fused_qkv_by_a_family_gather_rule(motion_sources, canonical, tmp_path, monkeypatch):
    """A model wanting one [in, 3*out] QKV weight gets it from a `gather` rule in the family's
    TTNN extras; the expected tensors go through the same rule, so strictness still holds."""
    mappings = tmp_path / "mappings"
    shutil.copytree(ROOT / "mappings", mappings)
    family = mappings / "animatediff-motion" / "family.yaml"
    marker = "  ttnn:\n"
    rule = ('    rules:\n      - from: "{p:.+}.{a:attn[12]}.to_{w:q|k|v}.weight"\n'
            '        to: "{p}.{a}.to_qkv.weight"\n        gather: {over: w, order: [q, k, v], axis: 1}\n')
    assert family.read_text().count(marker) == 1
    family.write_text(family.read_text().replace(marker, marker + rule))
    monkeypatch.setenv("VIDPORT_MAPPINGS", str(mappings))
    convert(plan_conversion(motion_sources["v2"], "ttnn"), tmp_path / "out")
    found = manifest(tmp_path / "out")["tensors"]
    name = "down_blocks.1.motion_modules.0.transformer_blocks.0.attn2.to_qkv.weight"
    assert not any(".to_q." in n for n in found) and found[name]["shape"] == [64, 192]
    values, _ = read_tensorbin(tmp_path / "out" / found[name]["file"])
    parts = [canonical[name.replace("to_qkv", f"to_{w}")].T for w in "qkv"]
    assert np.array_equal(values, to_bfloat16(np.concatenate(parts, axis=1)))
    assert found[name]["gather_axis"] == 1 and len(found[name]["from"]) == 3


# --------------------------------------------------------------------------- (e) determinism


def test_converting_twice_gives_identical_bytes(motion_sources, tmp_path, monkeypatch):
    def files(folder: Path) -> dict[str, bytes]:
        return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
                if p.is_file() and p.name != "vidport_manifest.json"}  # that one records when and where

    options = {"cache_style": "model_cache", "dtype": "bfloat8_b"}
    convert(plan_conversion(motion_sources["v2"], "ttnn", target_options=options), tmp_path / "a")
    convert(plan_conversion(motion_sources["v2"], "ttnn", target_options=options), tmp_path / "b")
    first = files(tmp_path / "a")
    assert len(first) > 500 and first == files(tmp_path / "b")
    monkeypatch.setenv("VIDPORT_TENSORBIN_ENCODER", "numpy")  # vidport's codec: the same bytes as ttnn's
    convert(plan_conversion(motion_sources["v2"], "ttnn", target_options=options), tmp_path / "c")
    assert first == files(tmp_path / "c")


# --------------------------------------------------------------------------- spec and interface


def test_roles_for_later_families():
    """The conventions other families will need, from the spec alone: 1x1 convs as linears, convs
    kept OIHW, Wan's patch Conv3d and modulation table."""
    from vidport.converter.spec import load_catalog
    from vidport.converter.transforms import shape_steps

    target = load_catalog().target("ttnn")
    cases = {"conv2d_1x1.weight": ((64, 32, 1, 1), (32, 64)), "conv2d.weight": ((64, 32, 3, 3), (64, 32, 3, 3)),
             "conv2d.bias": ((64,), (1, 1, 1, 64)), "patch_conv3d.weight": ((1536, 16, 1, 2, 2), (64, 1536)),
             "scale_shift_table.scale_shift_table": ((1, 6, 1536), (1, 1, 6, 1536)), "embedding.weight": ((10, 4), (10, 4))}
    for role, (source, stored) in cases.items():
        assert shape_steps(target.steps_for(role), source) == stored, role
    assert target.format_for("conv2d.weight").layout == "ROW_MAJOR" and target.format_for("conv2d.weight").dtype == "float32"


def test_both_backends_implement_the_ops_interface():
    """The device backend is never run here (no card); it must at least offer every op."""
    from vidport.runtime.ttnn.device import DeviceOps
    from vidport.runtime.ttnn.emulator import EmulatorOps
    from vidport.runtime.ttnn.ops import Ops

    wanted = {n for n in vars(Ops) if not n.startswith("_")} - {"name"}
    for backend in (EmulatorOps, DeviceOps):
        assert wanted <= {n for n in dir(backend) if not n.startswith("_")}, backend
