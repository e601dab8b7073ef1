"""Weights that match no known release (a fine-tune, a custom training run): one policy for every
family. What shapes cannot tell takes the canonical library's own default, named in a note and
recorded in the manifest as assumed; a value with no such default (a head count that depends on
the width) is asked for with `--set NAME=VALUE`, every missing name at once."""
from __future__ import annotations

import importlib
import inspect
import json

import pytest
import torch
from typer.testing import CliRunner

from vidport.cli import app
from vidport.converter.convert import plan_conversion
from vidport.converter.core.errors import VidportError
from vidport.converter.spec import load_catalog
from fixtures.motion import motion_adapter_config, original_motion_state_dict, random_motion_adapter

runner = CliRunner()


def library_defaults(canonical: str) -> dict:
    """The canonical class's own defaults: a diffusers model's __init__ signature (and its
    forward's, for how it runs: LTX-2's use_cross_timestep), a transformers model's config class."""
    library, name = canonical.split(":")
    cls = getattr(importlib.import_module(library), name)
    if library == "transformers":
        return cls.config_class().to_dict()
    return {n: p.default for method in (cls.forward, cls.__init__) for n, p in inspect.signature(method).parameters.items()
            if p.default is not inspect.Parameter.empty}


def test_declared_defaults_are_the_libraries_own():
    catalog = load_catalog()
    declared = {name: family for name, family in catalog.families.items() if family.defaults}
    assert {"animatediff-motion", "sd15-unet", "sd-vae", "clip-text"} <= set(declared)
    for name, family in declared.items():
        theirs = library_defaults(family.canonical)
        for key, value in family.defaults.items():
            assert key in theirs, (name, key)
            assert json.loads(json.dumps(value)) == json.loads(json.dumps(theirs[key])), (name, key, theirs[key])
        # a default stands in for a variant's value, so some source's variant table sets each name
        told = {k for source in family.sources for variant in source.variants for k in variant.config}
        assert set(family.defaults) <= told, name


def write_motion_module(path, **config):
    state = original_motion_state_dict(random_motion_adapter(motion_adapter_config("v2", **config), seed=11))
    torch.save(state, path)
    return path


def test_motion_module_of_no_known_release_converts_with_a_note(tmp_path):
    """20 positions and widths no release has: converted with diffusers' defaults (8 heads, 32
    norm groups: what the module was trained with here), said on the console and in the manifest,
    and the port passes verify against diffusers."""
    from vidport.golden.verify import verify

    source = write_motion_module(tmp_path / "mm-finetune.ckpt", block_out_channels=[64, 96, 128, 128],
                                 motion_max_seq_length=20)
    out = tmp_path / "out"
    result = runner.invoke(app, ["convert", "animatediff-motion", str(source), "--target", "mlx", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "has no value in this conversion" not in result.output
    note = " ".join(result.output.split())
    assert "no known release matches these weights" in note
    assert "motion_num_attention_heads=8" in note and "motion_norm_num_groups=32" in note
    manifest = json.loads((out / "vidport_manifest.json").read_text())
    assert manifest["variant"] is None
    assert manifest["assumed"] == {"motion_num_attention_heads": 8, "motion_norm_num_groups": 32}
    assert manifest["config"]["motion_max_seq_length"] == 20
    report = verify(out, frames=8)
    assert report.passed, report.first_failure


def test_defaults_that_do_not_fit_name_what_was_assumed(tmp_path):
    """24-channel blocks cannot take 32 norm groups: the error says the groups were assumed and
    asks for each assumed value by name."""
    source = write_motion_module(tmp_path / "mm-odd.ckpt", block_out_channels=[24, 48, 48, 48],
                                 motion_max_seq_length=20, motion_norm_num_groups=8, motion_num_attention_heads=4)
    with pytest.raises(VidportError) as err:
        plan_conversion(source, "mlx")
    assert "no known release matched" in err.value.message and "motion_norm_num_groups=32" in err.value.message
    assert "--set motion_num_attention_heads=VALUE" in err.value.hint
    assert "--set motion_norm_num_groups=VALUE" in err.value.hint
    plan = plan_conversion(source, "mlx", overrides={"motion_norm_num_groups": 8, "motion_num_attention_heads": 4})
    assert plan.assumed == {} and plan.config["motion_norm_num_groups"] == 8


def test_wan_dit_of_unknown_width_asks_for_the_head_count(tmp_path):
    """No Wan release is 64 wide: the head count has no default that fits every width, so the
    error says no release matched, what was read, and which value to give."""
    from fixtures.wan_dit import write_native

    write_native(tmp_path / "wan.safetensors", "t2v", seed=1)
    result = runner.invoke(app, ["convert", "wan-dit", str(tmp_path / "wan.safetensors"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert "unknown placeholder" not in result.output and "cannot infer config" not in result.output
    text = " ".join(result.output.split())
    assert "no known release matches these weights (dim=64, in_channels=16" in text
    assert "cannot tell num_attention_heads" in text and "--set num_attention_heads=VALUE" in text
    assert not (tmp_path / "o").exists()
    plan = plan_conversion(tmp_path / "wan.safetensors", "mlx", overrides={"num_attention_heads": 4})
    assert plan.config["attention_head_dim"] == 16 and plan.assumed == {}


@pytest.fixture(scope="module")
def sd_file(tmp_path_factory):
    from fixtures.sd import write_sd_single_file

    return write_sd_single_file(tmp_path_factory.mktemp("sd") / "v1-5-small.safetensors")


def test_clip_text_of_unknown_width_asks_for_heads_and_assumes_the_rest(sd_file):
    """Before, a 64-wide CLIP converted silently with transformers' 8 heads; now the head count is
    asked for, and once given, the values transformers would default are assumed out loud."""
    with pytest.raises(VidportError, match="no known release matches.*cannot tell num_attention_heads") as err:
        plan_conversion(sd_file, "mlx", "clip-text")
    assert err.value.hint == "give --set num_attention_heads=VALUE"
    plan = plan_conversion(sd_file, "mlx", "clip-text", overrides={"num_attention_heads": 4})
    assert plan.assumed == {"hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 512,
                            "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1}


def test_a_pipeline_asks_with_the_component_prefix(sd_file, tmp_path):
    from fixtures.pipelines import write_tokenizer
    from vidport.converter.pipeline import plan_pipeline

    motion = write_motion_module(tmp_path / "mm.ckpt")
    with pytest.raises(VidportError, match=r"text_encoder \(clip-text\): .*no known release") as err:
        plan_pipeline("animatediff", {"sd": sd_file, "motion": motion}, tokenizer=write_tokenizer(tmp_path / "tok"))
    assert err.value.hint == "give --set text_encoder.num_attention_heads=VALUE"
