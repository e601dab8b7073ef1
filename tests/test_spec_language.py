"""The spec language: patterns, index arithmetic, transforms, schema errors with file and line,
explicit drops, coverage both ways, gather and split."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vidport.converter.core.errors import VidportError
from vidport.converter.patterns import PatternError, compile_pattern, compile_template
from vidport.converter.plan import check_expected, map_keys
from vidport.converter.spec import SpecError, load_catalog, load_source_spec
from vidport.converter.transforms import parse_step, run_steps, shape_steps

HEADER = "spec: t/x\nversion: 1\nfamily: t\nsource: x\n"


def write_spec(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "x.yaml"
    path.write_text(HEADER + body)
    return path


def test_ldm_index_arithmetic():
    pattern = compile_pattern("input_blocks.{n}.0.{rest:.+}")
    template = compile_template("down_blocks.{(n-1)//3}.resnets.{(n-1)%3}.{rest}")
    assert template.render(pattern.match("input_blocks.5.0.in_layers.0.weight")) == "down_blocks.1.resnets.1.in_layers.0.weight"
    assert compile_pattern("{p}.to_{w:q|k|v}.weight").match("x.to_o.weight") is None


def test_templates_refuse_code():
    with pytest.raises(PatternError):
        compile_template("a.{__import__('os').system('x')}")
    with pytest.raises(PatternError):
        compile_template("a.{n ** 2}")


def test_transforms_compose_and_predict_shapes():
    steps = [parse_step({"permute": [0, 2, 3, 1]}), parse_step({"reshape": [-1, 4]})]
    array = np.arange(2 * 4 * 3 * 3, dtype=np.float32).reshape(2, 4, 3, 3)
    out = run_steps(steps, array)
    assert out.shape == shape_steps(steps, array.shape) == (18, 4)
    np.testing.assert_array_equal(out, array.transpose(0, 2, 3, 1).reshape(-1, 4))
    squeeze = parse_step({"squeeze": [2, 3]})
    assert shape_steps([squeeze], (8, 4, 1, 1)) == (8, 4)
    with pytest.raises(ValueError, match="not of size 1"):
        shape_steps([squeeze], (8, 4, 3, 3))
    # an axis past the rank is an error, never wrapped onto another axis ((1, 5) squeezed at 2 is not (5,))
    assert shape_steps([parse_step({"squeeze": [-2]})], (1, 5)) == (5,)
    for step, shape in (({"squeeze": [2]}, (1, 5)), ({"squeeze": [-3]}, (1, 5)), ({"unsqueeze": 3}, (1, 5)),
                        ({"split": {"axis": 2, "parts": 1}}, (1, 5))):
        with pytest.raises(ValueError, match="out of range"):
            shape_steps([parse_step(step)], shape)
    np.testing.assert_array_equal(run_steps([parse_step({"unsqueeze": -1})], np.ones((2, 3))), np.ones((2, 3, 1)))
    with pytest.raises(ValueError, match="unknown transform"):
        parse_step("flip_everything")


def test_schema_error_names_file_and_line(tmp_path):
    path = write_spec(tmp_path, "rules:\n  - from: 'a.{x}'\n    to: 'b.{x}'\n  - from: 'c'\n    tooo: 'd'\n")
    with pytest.raises(SpecError, match=r"x\.yaml:9: unknown field 'tooo'"):
        load_source_spec(path)
    path = write_spec(tmp_path, "rules:\n  - from: 'a.{x}'\n    drop: true\n")
    with pytest.raises(SpecError, match=r"x\.yaml:6: a drop rule must say why"):
        load_source_spec(path)
    path = write_spec(tmp_path, "rules:\n  - from: 'a.{x}'\n    to: 'b.{y}'\n")
    with pytest.raises(SpecError, match="x.yaml:6: 'to' uses placeholder"):
        load_source_spec(path)
    path = write_spec(tmp_path, "rules:\n  - from: 'a.{x}'\n    to: 'b.{x}'\n    transforms: [{permute: 3}]\n")
    with pytest.raises(SpecError, match="x.yaml:8: transforms"):
        load_source_spec(path)
    path = write_spec(tmp_path, "rules: [\n")
    with pytest.raises(SpecError, match="x.yaml:.*not valid YAML"):
        load_source_spec(path)


def rules_for(tmp_path, body: str):
    return load_source_spec(write_spec(tmp_path, body)).rules


def test_unmatched_keys_get_a_hint(tmp_path):
    rules = rules_for(tmp_path, "rules:\n  - from: 'blocks.{n}.attn.{p}'\n    to: 'layers.{n}.attention.{p}'\n")
    with pytest.raises(VidportError) as err:
        map_keys({"blocks.0.attn.weight": (4, 4), "blocks.0.atn.bias": (4,)}, rules, "x.yaml")
    assert "blocks.0.atn.bias" in str(err.value) and "closest rule: 'blocks.{n}.attn.{p}'" in str(err.value)


def test_drops_are_reported_with_reasons(tmp_path):
    rules = rules_for(tmp_path, "rules:\n  - from: '{p}.pe'\n    drop: true\n    why: recomputed\n  - from: '{k:.+}'\n    to: '{k}'\n")
    mapping = map_keys({"a.pe": (1, 4), "a.w": (4,)}, rules, "x")
    assert mapping.dropped == [("a.pe", "recomputed")] and set(mapping.recipes) == {"a.w"}


def test_split_and_gather(tmp_path):
    split = rules_for(tmp_path, "rules:\n  - from: '{p}.in_proj_weight'\n    to: ['{p}.q.weight', '{p}.k.weight', '{p}.v.weight']\n"
                                "    transforms: [{split: {axis: 0, parts: 3}}]\n")
    mapping = map_keys({"attn.in_proj_weight": (12, 4)}, split, "x")
    assert mapping.shapes == {"attn.q.weight": (4, 4), "attn.k.weight": (4, 4), "attn.v.weight": (4, 4)}
    gather = rules_for(tmp_path, "rules:\n  - from: '{p}.to_{w:q|k|v}.weight'\n    to: '{p}.qkv.weight'\n"
                                 "    transforms: [transpose]\n    gather: {over: w, order: [q, k, v], axis: 1}\n")
    mapping = map_keys({"a.to_k.weight": (4, 2), "a.to_q.weight": (4, 2), "a.to_v.weight": (4, 2)}, gather, "x")
    assert mapping.shapes == {"a.qkv.weight": (2, 12)}
    assert mapping.recipes["a.qkv.weight"].inputs == ("a.to_q.weight", "a.to_k.weight", "a.to_v.weight")


def test_expected_keys_both_ways():
    with pytest.raises(VidportError, match="not produced: b") as err:
        check_expected({"a": (1,)}, {"a": (1,), "b": (2,)}, "x")
    with pytest.raises(VidportError, match="does not have: c"):
        check_expected({"a": (1,), "c": (1,)}, {"a": (1,)}, "x")
    with pytest.raises(VidportError, match=r"a \[2\] != \[1\]"):
        check_expected({"a": (2,)}, {"a": (1,)}, "x")


def test_shipped_specs_load():
    catalog = load_catalog()
    family = catalog.family("animatediff-motion")
    assert {s.source for s in family.sources} >= {"original", "diffusers"}
    assert {"mlx", "diffusers"} <= set(catalog.targets)
    assert family.role_of("down_blocks.0.motion_modules.0.norm.weight", {}) == "group_norm.weight"
    assert catalog.target("mlx").steps_for("conv2d.weight")[0].name == "permute"
    with pytest.raises(VidportError, match="unknown model family"):
        catalog.family("animatedif")
