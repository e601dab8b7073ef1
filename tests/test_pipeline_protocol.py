"""The pipeline protocol: a new pipeline is a YAML spec plus a runtime module, and `vidport convert`,
`generate` and `verify --pipeline` drive it with no edit to cli.py. The pipeline here is registered
only through a spec in a temporary copy of mappings/ (VIDPORT_MAPPINGS) and a module the test
writes; its one component is a real (small) motion module, its second input a file no CLI option
names. Every request check fires before a weight is read."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from vidport.cli import app
from vidport.converter.core.errors import VidportError

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()

SPEC = """\
pipeline: fake
version: 1
description: a test pipeline, one motion module and a settings file
diffusers_class: AnimateDiffPipeline
inputs:
  base:
    help: the motion module
    layouts:
      - {name: file, detect: {file: true}, parts: {motion_adapter: ""}}
  palette:
    help: a JSON file of default shades (an input no command-line option names)
    layouts:
      - {name: file, detect: {file: true}, parts: {palette: ""}}
components:
  - {name: motion_adapter, family: animatediff-motion, class: [diffusers, MotionAdapter]}
copy: [palette]
runtime: fake_runtime:FakePipeline
parity: fake_runtime:fake_case
"""

RUNTIME = '''\
"""A pipeline the CLI has never heard of: frames of one shade, scaled by the motion module's weights."""
import json
from dataclasses import replace
from types import SimpleNamespace

import numpy as np

from vidport.converter.core.errors import VidportError
from vidport.golden.pipeline_parity import ParityCase, synthetic_image
from vidport.runtime.pipelines.folder import PipelineFolder
from vidport.runtime.pipelines.protocol import Generation, Pipeline, Request, Step

OPENED = []  # weight files read, in order


class FakePipeline(Pipeline):
    name = "fake"
    decode_unit = "pictures"
    tasks = ("t2v", "i2v")

    def __init__(self, folder):
        self.folder = folder

    @classmethod
    def from_folder(cls, path):
        return cls(PipelineFolder.open(path))

    def settings(self, task):
        return {"prompt", "frames", "steps", "height", "width", "seed", "fps", "noise", "shade"} | (
            {"image"} if task == "i2v" else set())

    def defaults(self, task):
        shade = json.loads((self.folder.path / "palette").read_text())["shade"]
        return Request(task=task, frames=3, steps=2, height=16, width=24, fps=5, extra={"shade": shade})

    def validate(self, request):
        if request.frames > 4:
            raise VidportError(f"{request.frames} frames: the fake pipeline makes at most 4", hint="use --frames 4")
        if request.task == "i2v" and request.image is None:
            raise VidportError("i2v needs an image", hint="pass --image PATH")
        if not 0 <= request.extra["shade"] <= 1:
            raise VidportError(f"shade {request.extra['shade']}: must be in [0, 1]", hint="--set shade=0.5")

    def latents(self, request, index):
        return np.full((1, 1, request.frames, 2, 2), float(index + 1), np.float32)

    def run(self, request, on_step, on_decode):
        import mlx.core as mx

        path = self.folder.path / "motion_adapter" / "model.safetensors"
        OPENED.append(path)
        weights = mx.load(str(path))  # the weights are read here, after every check
        scale = 1.0 if weights else 0.0
        for index in range(request.steps):
            if on_step:
                on_step(Step(index, request.steps, float(request.steps - index), mx.array(self.latents(request, index))))
        frames = np.full((request.frames, request.height, request.width, 3), request.extra["shade"] * scale, np.float32)
        for done in range(1, request.frames + 1):
            if on_decode:
                on_decode(done, request.frames)
        return Generation(frames, None, request.seed, [float(request.steps - i) for i in range(request.steps)],
                          request.fps, "none")


class FakeReference:
    """Calls the step callback as diffusers' pipelines do; `off` perturbs one step's latents."""

    def __init__(self, ours, off=None):
        self.ours, self.off = ours, off

    def __call__(self, request, callback_on_step_end):
        import torch

        for index in range(request.steps):
            latents = self.ours.latents(request, index) + (0.5 * np.arange(4 * request.frames).reshape(
                1, 1, request.frames, 2, 2) if index == self.off else 0)
            callback_on_step_end(self, index, float(request.steps - index), {"latents": torch.from_numpy(latents)})
        frames = np.full((request.frames, request.height, request.width, 3), request.extra["shade"], np.float32)
        return SimpleNamespace(frames=[frames])


def fake_case(ours, request, source, note):
    if "image" in ours.settings(request.task) and request.image is None:
        request = replace(request, image=synthetic_image(16, 24))
    request = ours.check(request)
    off = json.loads((ours.folder.path / "palette").read_text()).get("off")
    return ParityCase(FakeReference(ours, off), {"request": request}, request, settings={"source": str(source)})
'''


@pytest.fixture()
def fake(tmp_path, monkeypatch, motion_sources):
    """A mappings copy with pipelines/fake.yaml, the runtime module on sys.path, the sources."""
    mappings = tmp_path / "mappings"
    shutil.copytree(ROOT / "mappings", mappings)
    (mappings / "pipelines" / "fake.yaml").write_text(SPEC)
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "fake_runtime.py").write_text(RUNTIME)
    monkeypatch.setenv("VIDPORT_MAPPINGS", str(mappings))
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    monkeypatch.delitem(sys.modules, "fake_runtime", raising=False)  # this test's module, its own OPENED
    palette = tmp_path / "palette.json"
    palette.write_text(json.dumps({"shade": 0.25}))
    return {"motion": motion_sources["v2"], "palette": palette, "root": tmp_path}


def convert_fake(fake, out) -> None:
    result = runner.invoke(app, ["convert", "fake", str(fake["motion"]), "--input", f"palette={fake['palette']}",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "wrote the fake pipeline (motion_adapter" in result.output


def test_a_pipeline_from_yaml_and_a_module_converts_and_generates(fake):
    from vidport.runtime.video import read_video

    # an input the spec declares without an option comes by name; leaving it out names it
    result = runner.invoke(app, ["convert", "fake", str(fake["motion"]), "--out", str(fake["root"] / "never")])
    assert result.exit_code == 1 and "--input palette=PATH" in result.output
    result = runner.invoke(app, ["convert", "fake", str(fake["motion"]), "--motion", str(fake["motion"]),
                                 "--out", str(fake["root"] / "never")])
    assert result.exit_code == 1 and "no input motion" in result.output and "--input palette=PATH" in result.output
    folder = fake["root"] / "fake-mlx"
    convert_fake(fake, folder)
    assert json.loads((folder / "palette").read_text()) == {"shade": 0.25}

    out = fake["root"] / "frames"  # PNG frames: a GIF writer merges equal frames
    result = runner.invoke(app, ["generate", "t2v", "--model", str(folder), "--prompt", "grey", "--out", f"{out}/"])
    assert result.exit_code == 0, result.output
    assert "fake t2v" in result.output and "frames 3, size 24x16, steps 2, fps 5, shade 0.25" in result.output
    assert "pictures 3/3" in result.output and "time per step" in result.output
    frames = read_video(out)
    assert frames.shape == (3, 16, 24, 3) and abs(int(frames.mean()) - round(0.25 * 255)) <= 1

    # a model-specific setting by name, into the request's extra
    result = runner.invoke(app, ["generate", "t2v", "--model", str(folder), "--prompt", "grey", "--set", "shade=0.75",
                                 "--frames", "2", "--out", str(fake["root"] / "again") + "/"])
    assert result.exit_code == 0, result.output
    frames = read_video(fake["root"] / "again")
    assert frames.shape[0] == 2 and abs(int(frames.mean()) - round(0.75 * 255)) <= 1


@pytest.mark.parametrize("args,message", [
    (["t2v", "--frames", "9"], "9 frames: the fake pipeline makes at most 4"),
    (["t2v", "--strength", "0.5"], "t2v on this fake pipeline takes no strength (--strength)"),
    (["t2v", "--set", "tint=1"], "takes no tint (--set tint=...)"),
    (["t2v", "--set", "shade=2"], "shade 2: must be in [0, 1]"),
    (["t2v", "--image", "IMAGE"], "t2v on this fake pipeline takes no image"),
    (["i2v"], "i2v needs an image"),
    (["ti2v"], "this fake pipeline runs t2v or i2v, not ti2v"),
])
def test_every_request_check_comes_before_the_weights(fake, args, message):
    """With the weights deleted, each bad request gets its own error; a good one then fails on the
    weights, so the checks above did not depend on them."""
    import fake_runtime

    folder = fake["root"] / "fake-mlx"
    convert_fake(fake, folder)
    (folder / "motion_adapter" / "model.safetensors").unlink()
    image = fake["root"] / "image.png"
    from PIL import Image

    Image.fromarray(np.zeros((16, 24, 3), np.uint8)).save(image)
    args = [str(image) if a == "IMAGE" else a for a in args]
    out = fake["root"] / "never.gif"
    result = runner.invoke(app, ["generate", *args, "--model", str(folder), "--prompt", "grey", "--out", str(out)])
    assert result.exit_code == 1 and message in result.output and "hint:" in result.output, result.output
    assert fake_runtime.OPENED == []
    result = runner.invoke(app, ["generate", "t2v", "--model", str(folder), "--prompt", "grey", "--out", str(out)])
    assert result.exit_code != 0 and fake_runtime.OPENED == [folder / "motion_adapter" / "model.safetensors"]
    assert not out.exists()


def test_verify_pipeline_runs_the_parity_the_spec_names(fake):
    """`verify --pipeline` takes the tasks from the runtime and the model's part from `parity:`; the
    shared comparison finds a step that differs."""
    folder = fake["root"] / "fake-mlx"
    convert_fake(fake, folder)
    report_file = fake["root"] / "parity.json"
    result = runner.invoke(app, ["verify", str(folder), "--pipeline", "--json", str(report_file)])
    assert result.exit_code == 0, result.output
    reports = json.loads(report_file.read_text())["tasks"]
    assert [r["task"] for r in reports] == ["t2v", "i2v"] and all(r["passed"] for r in reports)
    assert len(reports[0]["steps"]) == 2 and reports[0]["settings"]["reference"] == "FakeReference"
    assert reports[0]["settings"]["source"] == "None"  # --source passes through to the model's part

    (folder / "palette").write_text(json.dumps({"shade": 0.25, "off": 1}))
    result = runner.invoke(app, ["verify", str(folder), "--pipeline", "--task", "t2v", "--json", str(report_file)])
    assert result.exit_code == 2 and "first failing step: 1" in result.output
    result = runner.invoke(app, ["verify", str(folder), "--pipeline", "--strength", "0.5"])
    assert result.exit_code == 1 and "takes no --strength" in result.output


def test_a_spec_without_runtime_or_parity_is_named(fake, tmp_path):
    from vidport.converter.pipeline_spec import load_pipeline_specs
    from vidport.converter.spec import SpecError
    from vidport.runtime.pipelines.protocol import open_pipeline

    mappings = fake["root"] / "mappings" / "pipelines"
    (mappings / "fake.yaml").write_text(SPEC.replace("runtime: fake_runtime:FakePipeline\n", ""))
    with pytest.raises(SpecError, match=r"fake.yaml:\d+: parity compares a runtime"):
        load_pipeline_specs()
    (mappings / "fake.yaml").write_text(SPEC.replace("runtime: fake_runtime:FakePipeline\nparity: fake_runtime:fake_case\n", ""))
    folder = tmp_path / "fake-mlx"
    convert_fake(fake, folder)
    with pytest.raises(VidportError, match="the fake pipeline has no runtime") as err:
        open_pipeline(folder)
    assert "animatediff" in err.value.hint and "wan" in err.value.hint
    (mappings / "fake.yaml").write_text(SPEC.replace("fake_runtime:FakePipeline", "fake_runtime:fake_case"))
    with pytest.raises(VidportError, match="is not a vidport Pipeline class"):
        open_pipeline(folder)
