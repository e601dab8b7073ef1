"""Issue 9 part 3: verify never trusts vidport's own mapping. Where diffusers / transformers read
no such file, the reference is the official Wan code reading it, so a wrong rule planted in the
spec of each such format makes verify fail (and would pass against the self-mapped fallback,
which is built only on request and labelled). Issue 9 part 4: a checkpoint vidport unwraps but
diffusers cannot read as is (a `module.` prefix) verifies against diffusers, from its tensors."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from vidport.cli import app
from vidport.converter.convert import convert, plan_conversion
from vidport.converter.core.errors import VidportError
from vidport.converter.spec import load_catalog
from vidport.golden.verify import verify
from fixtures.references import REFERENCES, assert_names_reference
from fixtures.wan_encoders import write_native_clip, write_native_umt5
from fixtures.wan_vae import write_native_vae

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()
pytestmark = pytest.mark.skipif(importlib.util.find_spec("wan") is None,
                                reason="the official Wan code: pip install --no-deps wan22==2.2.11")

# (spec file, the rule's text, the same rule with a planted mistake the shapes cannot see)
FAULTS = {
    "wan-vae/native-2.2": (  # a residual block's two RMS norms exchanged (equal widths in level 0)
        "wan-vae/native-2.2.yaml",
        '  - from: "encoder.downsamples.{l}.downsamples.{k}.residual.{i:[03]}.gamma"\n',
        '  - from: "encoder.downsamples.0.downsamples.{k}.residual.{i:[03]}.gamma"\n'
        '    to: "encoder.down_blocks.0.resnets.{k}.norm{2-i//3}.gamma"\n'
        '  - from: "encoder.downsamples.{l}.downsamples.{k}.residual.{i:[03]}.gamma"\n'),
    "umt5/native": (  # the gate and the linear half of the gated GELU exchanged
        "umt5/native.yaml",
        '  - from: "blocks.{i}.ffn.gate.0.weight"\n    to: "encoder.block.{i}.layer.1.DenseReluDense.wi_0.weight"\n'
        '  - from: "blocks.{i}.ffn.fc1.weight"\n    to: "encoder.block.{i}.layer.1.DenseReluDense.wi_1.weight"\n',
        '  - from: "blocks.{i}.ffn.gate.0.weight"\n    to: "encoder.block.{i}.layer.1.DenseReluDense.wi_1.weight"\n'
        '  - from: "blocks.{i}.ffn.fc1.weight"\n    to: "encoder.block.{i}.layer.1.DenseReluDense.wi_0.weight"\n'),
    "clip-vision/native": (  # each layer's two LayerNorms exchanged
        "clip-vision/native.yaml",
        '    to: "encoder.layers.{i}.layer_norm{n}.{param}"\n',
        '    to: "encoder.layers.{i}.layer_norm{3-n}.{param}"\n'),
}
FIRST_FAILURE = {"wan-vae/native-2.2": "encoder.down_blocks.0.resnets.0.norm1",
                 "umt5/native": "encoder.block.0.layer.1.DenseReluDense.wi_1",  # the official fc1 runs first
                 "clip-vision/native": "encoder.layers.0.layer_norm1"}


@pytest.fixture(scope="module")
def native_sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("native")
    found = {"wan-vae/native-2.2": root / "Wan2.2_VAE.pth", "umt5/native": root / "models_t5_umt5-xxl-enc-bf16.pth",
             "clip-vision/native": root / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"}
    write_native_vae(found["wan-vae/native-2.2"], "2.2", seed=11)
    write_native_umt5(found["umt5/native"], seed=12)
    write_native_clip(found["clip-vision/native"], seed=13)
    return found


def _frames(spec: str) -> int | None:
    return 5 if spec.startswith("wan-vae") else None


def test_every_source_spec_names_a_reference_that_reads_its_files():
    """Each source spec of every family is listed in fixtures/references.py (which each family's
    verify test checks its report against); none loads its reference through vidport's mapping,
    and those with an official reference name an importable builder."""
    from vidport.converter.core.named import named_object

    specs = {s.name: s for family in load_catalog().families.values() for s in family.sources}
    assert set(specs) == set(REFERENCES)
    assert all(s.reference in ("from_single_file", "from_pretrained", "single_file_mapping", "official")
               for s in specs.values())
    official = {name for name, s in specs.items() if s.official is not None}
    assert official == {name for name, ref in REFERENCES.items() if ref.startswith("official:")}
    for name in official:
        assert callable(named_object(specs[name].official.build)), name


@pytest.mark.parametrize("spec", list(FAULTS))
def test_planted_mapping_fault_fails_against_the_official_code(native_sources, spec, tmp_path, monkeypatch):
    """The clean conversion passes against the official code; with one wrong rule in a copy of
    mappings/ the conversion still plans (shapes agree) and verify fails, naming the layer; the
    self-mapped reference, which shares the mistake, passes it and says what it is."""
    source = native_sources[spec]
    convert(plan_conversion(source, "mlx"), tmp_path / "good")
    report = verify(tmp_path / "good", frames=_frames(spec))
    assert report.passed, report.first_failure
    assert_names_reference(report, tmp_path / "good")

    mappings = tmp_path / "mappings"
    shutil.copytree(ROOT / "mappings", mappings)
    file, rule, wrong = FAULTS[spec]
    text = (mappings / file).read_text()
    assert text.count(rule) == 1
    (mappings / file).write_text(text.replace(rule, wrong))
    monkeypatch.setenv("VIDPORT_MAPPINGS", str(mappings))
    convert(plan_conversion(source, "mlx"), tmp_path / "bad")
    report = verify(tmp_path / "bad", frames=_frames(spec))
    assert not report.passed
    assert report.first_failure == FIRST_FAILURE[spec]
    assert report.info["reference"].startswith("official:wan22")

    self_mapped = verify(tmp_path / "bad", frames=_frames(spec), self_mapped=True)
    assert self_mapped.passed  # why it is never chosen silently
    assert self_mapped.as_json()["reference"] == "self-mapped"
    assert any("SELF-MAPPED" in w for w in self_mapped.as_json()["warnings"])


def test_self_mapped_is_loud_in_the_table_and_json(native_sources, tmp_path):
    convert(plan_conversion(native_sources["umt5/native"], "mlx"), tmp_path / "out")
    result = runner.invoke(app, ["verify", str(tmp_path / "out"), "--self-mapped", "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert "SELF-MAPPED" in result.output and "not an independent check" in result.output
    assert json.loads((tmp_path / "r.json").read_text())["reference"] == "self-mapped"
    result = runner.invoke(app, ["verify", str(tmp_path / "out"), "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert "SELF-MAPPED" not in result.output and "official:wan22 wan/modules/t5.py" in result.output


def test_missing_official_code_is_an_error_not_a_fallback(native_sources, tmp_path, monkeypatch):
    import vidport.reference.wan_official as wan_official

    def missing(name: str):
        raise ModuleNotFoundError(f"the official Wan code is not installed: {wan_official.INSTALL_HINT}")

    convert(plan_conversion(native_sources["umt5/native"], "mlx"), tmp_path / "out")
    monkeypatch.setattr(wan_official, "official_module", missing)
    with pytest.raises(VidportError, match="official code is missing") as caught:
        verify(tmp_path / "out")
    assert "--self-mapped" in caught.value.hint and "wan22" in caught.value.hint


def test_module_prefixed_checkpoint_verifies_against_diffusers(motion_sources, tmp_path):
    """A DataParallel run's `module.`-prefixed AnimateDiff checkpoint, under `state_dict`: diffusers'
    from_single_file cannot read the file as is, vidport converts it, and verify builds diffusers'
    reference from its unwrapped tensors and passes."""
    from diffusers import MotionAdapter

    from fixtures.motion import motion_adapter_config, write_config_folder

    state = torch.load(motion_sources["v2"], weights_only=True)
    wrapped = tmp_path / "mm_v2_dataparallel.ckpt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, wrapped)
    folder = write_config_folder(tmp_path, "MotionAdapter", motion_adapter_config("v2"))
    with pytest.raises(Exception):
        MotionAdapter.from_single_file(str(wrapped), config=str(folder), local_files_only=True)
    convert(plan_conversion(wrapped, "mlx"), tmp_path / "out")
    report = verify(tmp_path / "out", frames=8)
    assert report.passed, report.first_failure
    assert len(report.layers) > 100 and not report.not_in_port
    assert_names_reference(report, tmp_path / "out")


def test_official_reference_spec_is_checked(tmp_path):
    """A pair whose canonical name uses a placeholder its official pattern does not capture, or an
    unknown field, is refused with the spec's file and line."""
    from vidport.converter.spec import SpecError, load_source_spec

    header = "spec: t/x\nversion: 1\nfamily: t\nsource: x\nrules: [{from: '{k:.+}', to: '{k}'}]\n"
    path = tmp_path / "x.yaml"
    path.write_text(header + "reference:\n  official: 'm:f'\n  layers:\n    - {official: 'a.{i}', canonical: 'b.{j}'}\n")
    with pytest.raises(SpecError, match=r"x.yaml:9: 'canonical' uses placeholder\(s\) \['j'\]"):
        load_source_spec(path)
    path.write_text(header + "reference:\n  official: 'm:f'\n  pairs: []\n")
    with pytest.raises(SpecError, match="x.yaml:7: .*unknown field 'pairs' in spec.reference"):
        load_source_spec(path)
    path.write_text(header + "reference:\n  official: 'm:f'\n  layers:\n    - {official: 'a.{i}', canonical: 'b.{i}'}\n")
    spec = load_source_spec(path)
    assert spec.reference == "official" and spec.official.build == "m:f"
    (pattern, template), = spec.official.layers
    assert template.render(pattern.match("a.3")) == "b.3"
