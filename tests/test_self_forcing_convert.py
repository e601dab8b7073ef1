"""Self-Forcing / CausVid checkpoints convert strictly: the generator or its EMA weights (the
default) out of the trainer's {generator, critic, generator_ema} file, the critic dropped with its
reason, every weight as diffusers' own conversion of the chosen state dict gives it, and per-layer
verify against diffusers' WanTransformer3DModel built from that state dict. A plain Wan DiT is not
taken for a causal one, nor the reverse; a Diffusers transformer/ folder is taken as causal only
where the family is named (the settings then recorded as asserted)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import vidport.runtime  # noqa: F401  (before mlx: the runtime gives MLX its fast BLAS)
from vidport.cli import app
from vidport.converter.convert import convert, plan_conversion
from vidport.converter.core.errors import VidportError
from vidport.converter.safetensors_io import read_safetensors
from vidport.converter.spec import SpecError, load_catalog
from vidport.golden.verify import verify
from fixtures.references import assert_names_reference
from fixtures.self_forcing import WRAPPER, write_causvid, write_release_shaped, write_self_forcing

runner = CliRunner()
HEADS = {"num_attention_heads": 4}  # shapes cannot tell heads; the small models have 4
SETTINGS = {"causal": True, "num_frame_per_block": 3, "local_attn_size": -1, "sink_size": 0}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict:
    from fixtures.wan_dit import random_wan_transformer, wan_config, write_native

    root = tmp_path_factory.mktemp("self-forcing")
    found = {"release": root / "self_forcing_dmd.pt", "causvid": root / "causvid.pt", "bare": root / "bare.pt",
             "wan": root / "wan.safetensors", "diffusers": root / "transformer"}
    found["parts"] = write_self_forcing(found["release"], seeds=(1, 2, 3))["_parts"]
    write_causvid(found["causvid"], seed=4)
    write_causvid(found["bare"], seed=5, nested=False)
    write_native(found["wan"], seed=6)
    random_wan_transformer(wan_config("t2v"), seed=3).save_pretrained(str(found["diffusers"]))  # generator_ema's
    return found


def _weights(folder) -> dict[str, np.ndarray]:
    refs, _ = read_safetensors(folder / "model.safetensors")
    return {k: np.array(r.load()) for k, r in refs.items()}


@pytest.mark.parametrize("ema", [True, False], ids=["ema", "no-ema"])
def test_convert_and_verify(sources, ema, tmp_path):
    """--ema takes generator_ema, --no-ema generator; the critic and the other generator are
    dropped with their reasons; per-layer verify builds diffusers' model from the chosen dict."""
    taken, other = ("generator_ema", "generator") if ema else ("generator", "generator_ema")
    manifest = convert(plan_conversion(sources["release"], "mlx", "self-forcing", overrides=HEADS, ema=ema),
                       tmp_path / "out")
    assert manifest["ema"] is ema and manifest["spec"]["name"] == "self-forcing/native"
    assert manifest["source_wrappers"] == [f"nested under '{taken}'", "key prefix 'model.'"]
    dropped = {d["key"]: d for d in manifest["dropped"]}
    assert set(dropped) == {"critic", other} and dropped["critic"]["tensors"] == len(sources["parts"]["critic"])
    assert "critic" in dropped["critic"]["why"] and "training" in dropped["critic"]["why"]
    assert manifest["settings"] == SETTINGS and "causal" not in manifest["config"]
    report = verify(tmp_path / "out")
    assert report.passed, report.first_failure
    assert_names_reference(report, tmp_path / "out")
    assert min(r.local["pcc"] for r in report.layers) >= 0.99999


def test_ema_is_the_default(sources, tmp_path):
    """Without --ema / --no-ema the release's EMA weights are taken (the official README and demo
    use them), and the manifest says so."""
    plan = plan_conversion(sources["release"], "mlx", "self-forcing", overrides=HEADS)
    assert plan.ema and plan.detected.tensors.wrappers[0] == "nested under 'generator_ema'"


def test_outputs_are_diffusers_own_conversion(sources, tmp_path):
    """Each output equals diffusers' own conversion (convert_wan_transformer_to_diffusers) of its
    state dict, tensor for tensor, loaded by from_pretrained; the two outputs differ."""
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    loaded = {}
    for entry, ema in (("generator_ema", True), ("generator", False)):
        folder = tmp_path / entry
        convert(plan_conversion(sources["release"], "diffusers", "self-forcing", overrides=HEADS, ema=ema), folder)
        assert "causal" not in json.loads((folder / "config.json").read_text())  # a clean diffusers config
        loaded[entry] = WanTransformer3DModel.from_pretrained(folder).state_dict()
        state = {k[len(WRAPPER):]: v for k, v in sources["parts"][entry].items()}
        expected = convert_wan_transformer_to_diffusers(state)
        assert set(loaded[entry]) == set(expected)
        assert all(torch.equal(loaded[entry][k], v) for k, v in expected.items()), entry
    assert not torch.equal(loaded["generator"]["proj_out.weight"], loaded["generator_ema"]["proj_out.weight"])


@pytest.mark.parametrize("name", ["causvid", "bare"])
def test_causvid_layouts(sources, name, tmp_path):
    """{generator: ...} and the bare `model.` state dict convert (their generator: there is no EMA);
    --ema on them is refused in one line."""
    plan = plan_conversion(sources[name], "mlx", "causvid", overrides=HEADS)
    assert plan.detected.family.name == "self-forcing" and not plan.ema and not plan.detected.tensors.dropped
    convert(plan, tmp_path / "out")
    report = verify(tmp_path / "out")
    assert report.passed, report.first_failure
    with pytest.raises(VidportError, match="no EMA weights in this file") as err:
        plan_conversion(sources[name], "mlx", "self-forcing", overrides=HEADS, ema=True)
    assert "\n" not in err.value.message


def test_diffusers_form_converts_as_wan_dit(sources, tmp_path):
    """The same EMA weights as a Diffusers transformer/ folder convert through wan-dit/diffusers to
    exactly the tensors of the Self-Forcing file's conversion."""
    convert(plan_conversion(sources["diffusers"], "mlx", "wan-dit"), tmp_path / "diffusers")
    convert(plan_conversion(sources["release"], "mlx", "self-forcing", overrides=HEADS), tmp_path / "release")
    ours, theirs = _weights(tmp_path / "release"), _weights(tmp_path / "diffusers")
    assert set(ours) == set(theirs) and all(np.array_equal(ours[k], theirs[k]) for k in ours)


def test_diffusers_form_with_the_family_named(sources, tmp_path):
    """`vidport convert self-forcing transformer/` (or causvid): self-forcing/diffusers, the causal
    settings recorded as asserted by the naming (nothing in the folder says so), exactly the tensors
    of the trainer file's conversion; per-layer verify against diffusers' from_pretrained."""
    out = tmp_path / "named"
    result = runner.invoke(app, ["convert", "causvid", str(sources["diffusers"]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "vidport_manifest.json").read_text())
    assert manifest["family"] == "self-forcing" and manifest["spec"]["name"] == "self-forcing/diffusers"
    assert manifest["settings"] == SETTINGS and manifest["settings_source"] == "asserted by naming the family"
    assert manifest["ema"] is False and "causal" not in manifest["config"]
    convert(plan_conversion(sources["release"], "mlx", "self-forcing", overrides=HEADS), tmp_path / "release")
    assert "settings_source" not in json.loads((tmp_path / "release" / "vidport_manifest.json").read_text())
    ours, theirs = _weights(out), _weights(tmp_path / "release")
    assert set(ours) == set(theirs) and all(np.array_equal(ours[k], theirs[k]) for k in ours)
    report = verify(out)
    assert report.passed, report.first_failure
    assert_names_reference(report, out)
    assert min(r.local["pcc"] for r in report.layers) >= 0.99999


def test_diffusers_form_unnamed_stays_wan_dit(sources, tmp_path):
    """Detection without a family (inspect) and `wan-dit` read the same folder as a plain,
    bidirectional Wan DiT: no causal settings; another family named says it is wan-dit's alone."""
    from vidport.converter.checkpoint import read_checkpoint
    from vidport.converter.detect import detect
    from vidport.converter.inspect import describe

    catalog = load_catalog()
    assert detect(read_checkpoint(sources["diffusers"]), catalog).spec.name == "wan-dit/diffusers"
    rows = describe(sources["diffusers"])
    assert (rows["family"], rows["source spec"]) == ("wan-dit", "wan-dit/diffusers") and "settings" not in rows
    manifest = convert(plan_conversion(sources["diffusers"], "mlx", "wan-dit"), tmp_path / "wan")
    assert manifest["spec"]["name"] == "wan-dit/diffusers"
    assert "settings" not in manifest and "settings_source" not in manifest
    with pytest.raises(VidportError) as err:  # not "a self-forcing, wan-dit checkpoint"
        plan_conversion(sources["diffusers"], "mlx", "wan-vae")
    assert err.value.message.endswith("this is a wan-dit checkpoint (wan-dit/diffusers), not wan-vae")
    ours = catalog.family("self-forcing")
    assert {s.name: s.settings for s in ours.sources} == {"self-forcing/diffusers": SETTINGS, "self-forcing/native": SETTINGS}
    assert [s.name for s in ours.sources if s.only_when_named] == ["self-forcing/diffusers"]


def test_plain_wan_and_self_forcing_are_not_mistaken(sources):
    """A Wan DiT without the trainer's wrappers is wan-dit's, and the trainer's file is not wan-dit's:
    each refused in one line that names what it is."""
    with pytest.raises(VidportError, match=r"this is a wan-dit checkpoint \(wan-dit/native\), not self-forcing"):
        plan_conversion(sources["wan"], "mlx", "self-forcing", overrides=HEADS)
    with pytest.raises(VidportError, match=r"this is a self-forcing checkpoint \(self-forcing/native\), not wan-dit"):
        plan_conversion(sources["release"], "mlx", "wan-dit", overrides=HEADS)


def test_damaged_checkpoint_writes_nothing(sources, tmp_path):
    """A weight missing from the chosen state dict stops the CLI before anything is written; the
    same damage in the state dict left out does not matter."""
    damaged = dict(sources["parts"])
    damaged["generator_ema"] = {k: v for k, v in damaged["generator_ema"].items() if k != "model.blocks.1.ffn.2.weight"}
    path = tmp_path / "damaged.pt"
    torch.save(damaged, str(path))
    out = tmp_path / "out"
    result = runner.invoke(app, ["convert", "self-forcing", str(path), "--out", str(out), "--set", "num_attention_heads=4"])
    assert result.exit_code != 0 and "blocks.1.ffn.net.2.weight" in result.output
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    result = runner.invoke(app, ["convert", "self-forcing", str(path), "--no-ema", "--out", str(out),
                                 "--set", "num_attention_heads=4"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "vidport_manifest.json").read_text())["ema"] is False


def test_inspect_names_the_release(tmp_path):
    """`vidport inspect` on a release-shaped file (real 1.3B shapes, no bytes): Self-Forcing, the
    Wan 2.1 T2V 1.3B variant, how it runs, which weights and what is dropped."""
    from vidport.converter.inspect import describe

    path = tmp_path / "self_forcing_dmd.pt"
    write_release_shaped(path)
    rows = describe(path)
    assert (rows["family"], rows["source spec"], rows["variant"]) == ("self-forcing", "self-forcing/native",
                                                                      "Wan2.1 T2V 1.3B")
    assert rows["config"]["num_attention_heads"] == 12 and rows["settings"] == SETTINGS
    assert rows["weights"].startswith("EMA") and rows["tensors"] == 825
    assert rows["dropped entries"].startswith("generator (825 tensors") and "critic (825 tensors" in rows["dropped entries"]


def test_pickle_is_never_run(tmp_path):
    """A callable planted in the file is refused, not called."""
    import os

    canary = tmp_path / "ran"

    class Planted:
        def __reduce__(self):
            return os.mkdir, (str(canary),)

    path = tmp_path / "planted.pt"
    write_self_forcing(path, parts={"step": Planted()})
    with pytest.raises(VidportError, match="could run code"):
        plan_conversion(path, "mlx", "self-forcing", overrides=HEADS)
    assert not canary.exists()


def test_spec_reuses_wan_dit(tmp_path):
    """self-forcing extends wan-dit: the same rules (reported at wan-dit's lines), variants and roles;
    `extends` names a spec that must exist, one level deep."""
    catalog = load_catalog()
    ours, wan = catalog.family("self-forcing"), catalog.family("wan-dit")
    native = next(s for s in wan.sources if s.name == "wan-dit/native")
    trainer = next(s for s in ours.sources if s.name == "self-forcing/native")
    assert [r.where for r in trainer.rules.rules] == [r.where for r in native.rules.rules]
    assert trainer.rules.rules[0].where.startswith("wan-dit/native.yaml:")
    assert trainer.variants == native.variants and ours.roles == wan.roles
    assert ours.canonical == wan.canonical and catalog.family("causvid") is ours

    root = tmp_path / "mappings"
    (root / "a").mkdir(parents=True)
    (root / "a" / "family.yaml").write_text("family: a\nextends: missing\n")
    with pytest.raises(SpecError, match=r"a/family.yaml:2: extends 'missing': there is no"):
        load_catalog(root)
    (root / "b").mkdir()
    (root / "b" / "family.yaml").write_text("family: b\nextends: a\n")
    (root / "a" / "family.yaml").write_text("family: a\nextends: b\n")
    with pytest.raises(SpecError, match="one level only"):
        load_catalog(root)
