"""Done-means 3 and 4: strict conversion (unknown, missing, wrong-shape keys), refused pickles,
truncated and corrupted files: a non-zero exit, a message naming the key or file, no output."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from vidport.cli import app
from vidport.converter.core.errors import VidportError

runner = CliRunner()


def run_convert(source: Path, out: Path, *extra: str):
    return runner.invoke(app, ["convert", "animatediff-motion", str(source), "--target", "mlx", "--out", str(out), *extra])


def edited_checkpoint(source: Path, path: Path, edit) -> Path:
    state = torch.load(source, weights_only=True)
    edit(state)
    torch.save(state, path)
    return path


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith((".out", "out"))]


def test_unknown_extra_key(motion_sources, tmp_path):
    key = "down_blocks.0.motion_modules.0.temporal_transformer.bogus_layer.weight"
    source = edited_checkpoint(motion_sources["v2"], tmp_path / "extra.ckpt", lambda s: s.__setitem__(key, torch.zeros(3)))
    result = run_convert(source, tmp_path / "out")
    assert result.exit_code != 0
    assert key in result.output and "down_blocks.0.motion_modules.0.bogus_layer.weight" in result.output
    assert "hint: closest model key" in result.output
    assert leftovers(tmp_path) == []


def test_missing_key(motion_sources, tmp_path):
    key = "up_blocks.1.motion_modules.2.temporal_transformer.proj_out.bias"
    source = edited_checkpoint(motion_sources["v2"], tmp_path / "missing.ckpt", lambda s: s.pop(key))
    result = run_convert(source, tmp_path / "out")
    assert result.exit_code != 0
    assert "up_blocks.1.motion_modules.2.proj_out.bias" in result.output and "hint" in result.output
    assert leftovers(tmp_path) == []


def test_wrong_shape(motion_sources, tmp_path):
    key = "down_blocks.1.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.to_k.weight"
    source = edited_checkpoint(motion_sources["v2"], tmp_path / "shape.ckpt", lambda s: s.__setitem__(key, torch.zeros(64, 32)))
    result = run_convert(source, tmp_path / "out")
    assert result.exit_code != 0
    assert "down_blocks.1.motion_modules.0.transformer_blocks.0.attn1.to_k.weight" in result.output
    assert "[64, 32] != [64, 64]" in result.output
    assert leftovers(tmp_path) == []


def test_existing_output_is_kept(motion_sources, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep me")
    result = run_convert(motion_sources["v2"], tmp_path / "out")
    assert result.exit_code != 0 and "--overwrite" in result.output
    assert (tmp_path / "out" / "precious.txt").read_text() == "keep me"


def test_failure_mid_write_leaves_nothing(motion_sources, tmp_path, monkeypatch):
    from vidport.converter import convert as convert_module
    from vidport.converter.convert import convert, plan_conversion

    plan = plan_conversion(motion_sources["v2"], "mlx")
    real = convert_module._evaluate
    calls = {"n": 0}

    def explode(recipe, inputs):
        calls["n"] += 1
        if calls["n"] == 100:
            raise KeyboardInterrupt  # an interruption half-way through
        return real(recipe, inputs)

    monkeypatch.setattr(convert_module, "_evaluate", explode)
    with pytest.raises(KeyboardInterrupt):
        convert(plan, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


class RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("legacy", [False, True])
def test_pickle_that_runs_code_is_refused(motion_sources, tmp_path, legacy):
    marker = tmp_path / "code-ran"
    state = torch.load(motion_sources["v2"], weights_only=True)
    state["payload"] = RunsCode(marker)
    source = tmp_path / "evil.ckpt"
    torch.save(state, source, _use_new_zipfile_serialization=not legacy)
    for command in (["inspect", str(source)], ["convert", "animatediff-motion", str(source), "--out", str(tmp_path / "o")]):
        result = runner.invoke(app, command)
        assert result.exit_code != 0
        assert "refused" in result.output and "system" in result.output
    assert not marker.exists()
    assert not (tmp_path / "o").exists()


def test_plain_pickle_is_refused(tmp_path):
    source = tmp_path / "weights.pth"
    source.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    result = runner.invoke(app, ["inspect", str(source)])
    assert result.exit_code != 0 and "not a torch checkpoint" in result.output


@pytest.mark.parametrize("fraction", [0.5, 0.999])
def test_truncated_zip_checkpoint(motion_sources, tmp_path, fraction):
    data = motion_sources["v2"].read_bytes()
    source = tmp_path / "cut.ckpt"
    source.write_bytes(data[: int(len(data) * fraction)])
    result = run_convert(source, tmp_path / "out")
    assert result.exit_code != 0 and "cut.ckpt: zip archive is truncated or corrupted" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_truncated_legacy_checkpoint(motion_sources, tmp_path):
    state = torch.load(motion_sources["v2"], weights_only=True)
    full = tmp_path / "legacy.ckpt"
    torch.save(state, full, _use_new_zipfile_serialization=False)
    source = tmp_path / "legacy-cut.ckpt"
    source.write_bytes(full.read_bytes()[:-5000])
    result = run_convert(source, tmp_path / "out")
    assert result.exit_code != 0 and "legacy-cut.ckpt" in result.output and "truncated" in result.output


def test_corrupted_safetensors(tmp_path):
    from safetensors.torch import save_file

    source = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(4, 4)}, str(source))
    data = bytearray(source.read_bytes())
    data[10:20] = b"\xff" * 10  # break the JSON header
    source.write_bytes(bytes(data))
    result = runner.invoke(app, ["inspect", str(source)])
    assert result.exit_code != 0 and "w.safetensors" in result.output and "corrupted" in result.output


def test_unknown_file(tmp_path):
    source = tmp_path / "notes.ckpt"
    source.write_text("hello")
    result = runner.invoke(app, ["inspect", str(source)])
    assert result.exit_code != 0 and "unrecognized file format" in result.output


def test_error_shows_traceback_only_with_debug(tmp_path):
    """Without --debug: one line and exit 1 (a clean SystemExit, no traceback); with it, the error
    itself propagates, so its traceback shows."""
    result = runner.invoke(app, ["inspect", str(tmp_path / "nope.ckpt")])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert result.output == f"error: {tmp_path / 'nope.ckpt'}: no such file or folder\n"
    result = runner.invoke(app, ["--debug", "inspect", str(tmp_path / "nope.ckpt")])
    assert result.exit_code == 1 and isinstance(result.exception, VidportError)
    assert "no such file or folder" in str(result.exception) and "error:" not in result.output
