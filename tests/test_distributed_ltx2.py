"""The LTX-2 pipeline on 2 processes over MLX's ring backend (`vidport generate --launch`), under its
parallel plans (cfg, sequence, tensor), against the same run in one process: every step's video and
audio latents (PCC), the decoded frames (PSNR) and the waveform, the tensor plan's per-rank weight
memory, and refusals (cfg without guidance passes to share; heads or video tokens that do not
divide) before any weight loads.

The single-process run is itself held to diffusers' LTX2Pipeline by tests/test_ltx2_generate.py.
The DiT here is wider than that file's (video 8 heads of 32, audio 8 of 16) so that weight memory is
dominated by the sharded matrices rather than by the whole modulation tables.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import vidport.runtime  # noqa: F401  (before mlx: the runtime gives MLX its fast BLAS)
from vidport.converter.core.errors import VidportError
from fixtures.ring import pcc, psnr, ring
from vidport.runtime.distributed import Watchdog, World
from vidport.runtime.parallel_ltx2 import ltx2_plan
from vidport.runtime.pipelines.protocol import Request, open_pipeline

VIDPORT = str(Path(sys.executable).with_name("vidport"))
WIDE = {"num_attention_heads": 8, "attention_head_dim": 32, "cross_attention_dim": 256,
        "audio_num_attention_heads": 8, "audio_attention_head_dim": 16, "audio_cross_attention_dim": 128}
ARGS = ["--prompt", "a red fox jumps", "--negative-prompt", "blurry", "--frames", "9", "--height", "64", "--width",
        "96", "--steps", "3", "--seed", "3", "--set", "max_sequence_length=16"]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """The chained small release (a Diffusers folder) with the wider DiT."""
    from fixtures import ltx2_dit
    from fixtures.ltx2_pipeline import configs, write_pipeline_folder

    source = write_pipeline_folder(tmp_path_factory.mktemp("ltx2-distributed") / "LTX-2-Diffusers")
    shutil.rmtree(source / "transformer")
    ltx2_dit.random_ltx2_transformer({**configs()["transformer"], **WIDE}, seed=7).save_pretrained(
        str(source / "transformer"))
    return source


def convert(source: Path, out: Path, dtype: str | None = None) -> Path:
    from vidport.converter.pipeline import convert_pipeline, plan_pipeline

    convert_pipeline(plan_pipeline("ltx2", {"ltx2": source}, "mlx", dtype=dtype), out)
    return out


@pytest.fixture(scope="module")
def folder(source) -> Path:
    return convert(source, source.parent / "mlx")


def generate(folder: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([VIDPORT, "generate", "t2v", "--model", str(folder), *ARGS, "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=240, env={**os.environ, "COLUMNS": "200"})


@pytest.fixture(scope="module")
def single(folder, tmp_path_factory) -> Path:
    """The single-process run's dump: (audio_)step_NNN.npy, frames.npy, audio.npy, rank0_weights.json."""
    dump = tmp_path_factory.mktemp("single")
    done = generate(folder, dump / "out.mp4", "--set", f"dump_steps={dump}")
    assert done.returncode == 0, done.stdout + done.stderr
    return dump



def assert_same_run(single: Path, dump: Path, steps: int, min_pcc: float = 0.99999, min_psnr: float = 60.0) -> None:
    """Every step's video and audio latents, the frames and the waveform equal the single process's."""
    for prefix in ("step_", "audio_step_"):
        names = sorted(p.name for p in single.glob(f"{prefix}*.npy"))
        assert len(names) == steps and names == sorted(p.name for p in dump.glob(f"{prefix}*.npy"))
        for name in names:
            assert pcc(np.load(single / name), np.load(dump / name)) >= min_pcc, name
    assert psnr(np.load(single / "frames.npy"), np.load(dump / "frames.npy")) >= min_psnr
    assert psnr(np.load(single / "audio.npy"), np.load(dump / "audio.npy"), peak=2.0) >= min_psnr


@pytest.mark.parametrize("plan, described", [
    ("cfg", "cfg over 2 ranks: the 3 guidance passes of each step shared (rank 0 conditional + isolated; "
            "rank 1 unconditional)"),
    ("tensor", "tensor over 2 ranks: each rank 4 of 8 video heads, 4 of 8 audio heads"),
    ("sequence", "sequence over 2 ranks: video tokens split (1/2 each), keys and values all-gathered in each of 2 "
                 "video self-attentions and 2 video-to-audio attentions; audio tokens whole on every rank"),
])
def test_plan_equals_single_process(folder, single, plan, described, tmp_path):
    """Two ranks under the plan, the dev recipe (CFG and modality isolation: 3 passes a step): the
    same latents after every step and the same frames and sound as one process; rank 0 alone
    writes; the plan is printed before the run. Tensor: each rank holds half the blocks' weights.
    Sequence: 6 of the 12 video tokens each, the audio tokens whole."""
    out = tmp_path / "out.mp4"
    done = generate(folder, out, "--set", f"parallel={plan}", "--set", f"dump_steps={tmp_path}", "--launch", ring(2))
    assert done.returncode == 0, done.stdout + done.stderr
    said = " ".join(done.stdout.split()).find(f"parallel: {described}")
    assert 0 <= said < " ".join(done.stdout.split()).find("denoising"), done.stdout
    assert_same_run(single, tmp_path, 3)
    assert out.exists()
    alone = json.loads((single / "rank0_weights.json").read_text())
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}_weights.json").read_text())
        share = report["block_bytes"] / alone["block_bytes"]
        if plan == "tensor":  # heads and FFN split; the blocks' modulation tables and out biases whole
            assert 0.5 <= share < 0.51, share
            held = report["block_bytes"] + report["other_bytes"]
            assert report["active_memory"] < 1.05 * held, (report, held)  # no whole tensor kept behind a slice
        else:
            assert share == 1.0


@pytest.mark.slow  # 3 more processes on a 2-core machine; CI runs it (make test under CI=true)
def test_cfg_on_three_ranks(folder, single, tmp_path):
    """The dev recipe's 3 passes on 3 ranks, one each: the same run."""
    done = generate(folder, tmp_path / "out.mp4", "--set", "parallel=cfg", "--set", f"dump_steps={tmp_path}",
                    "--launch", ring(3))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "rank 2 isolated" in " ".join(done.stdout.split())
    assert_same_run(single, tmp_path, 3)


@pytest.mark.slow  # 3 more runs; CI runs it (make test under CI=true)
def test_distilled_recipe_under_tensor(folder, tmp_path):
    """The distilled recipe's two stages (half size, the latent upsampler, full size) under the
    tensor plan: every step of both stages as one process runs them."""
    distilled = ["--set", "recipe=distilled", "--width", "128", "--steps", "8"]
    done = generate(folder, tmp_path / "one" / "out.mp4", *distilled, "--set", f"dump_steps={tmp_path / 'one'}")
    assert done.returncode == 0, done.stdout + done.stderr
    done = generate(folder, tmp_path / "two" / "out.mp4", *distilled, "--set", "parallel=tensor",
                    "--set", f"dump_steps={tmp_path / 'two'}", "--launch", ring(2))
    assert done.returncode == 0, done.stdout + done.stderr
    assert_same_run(tmp_path / "one", tmp_path / "two", 8 + 3)


@pytest.mark.slow  # 4 more processes on a 2-core machine; CI runs it (make test under CI=true)
def test_tensor_on_four_ranks(folder, single, tmp_path):
    """2 of 8 video and audio heads on each of 4 ranks: the same run, a quarter of the blocks each."""
    done = generate(folder, tmp_path / "out.mp4", "--set", "parallel=tensor", "--set", f"dump_steps={tmp_path}",
                    "--launch", ring(4))
    assert done.returncode == 0, done.stdout + done.stderr
    assert_same_run(single, tmp_path, 3)
    alone = json.loads((single / "rank0_weights.json").read_text())["block_bytes"]
    for rank in range(4):
        share = json.loads((tmp_path / f"rank{rank}_weights.json").read_text())["block_bytes"] / alone
        assert 0.25 <= share < 0.26, share


@pytest.mark.slow  # a bfloat16 conversion and 3 more runs; CI runs it (make test under CI=true)
def test_bfloat16_plans_equal_single_process(source, tmp_path):
    """A bfloat16 folder under each plan on 2 ranks against its one-process run, at the project's
    bfloat16 pipeline thresholds (golden/metrics.py). Measured: worst step PCC 0.99968 (cfg: one
    process batches the CFG pair, the ranks run it at batch 1) and 0.99966 (tensor: sums over split
    heads and FFN columns round in another order); frames 41.6 and 39.8 dB; sound 70.9 and 69.0 dB."""
    from vidport.golden.metrics import pipeline_threshold_for

    bf16 = convert(source, tmp_path / "bf16", "bfloat16")
    limits = pipeline_threshold_for("bfloat16")
    done = generate(bf16, tmp_path / "one" / "out.mp4", "--set", f"dump_steps={tmp_path / 'one'}")
    assert done.returncode == 0, done.stdout + done.stderr
    for plan in ("cfg", "tensor"):
        done = generate(bf16, tmp_path / plan / "out.mp4", "--set", f"parallel={plan}",
                        "--set", f"dump_steps={tmp_path / plan}", "--launch", ring(2))
        assert done.returncode == 0, done.stdout + done.stderr
        assert_same_run(tmp_path / "one", tmp_path / plan, 3, limits.min_step_pcc, limits.min_psnr)


def test_refusal_on_launch(folder, tmp_path):
    """sequence under mlx.launch with 3 x 3 x 3 video tokens on 2 ranks: one error line from rank 0
    naming why, no output, no dump."""
    out = tmp_path / "never.mp4"
    done = generate(folder, out, "--frames", "17", "--height", "96", "--width", "96", "--set", "parallel=sequence",
                    "--set", f"dump_steps={tmp_path / 'dump'}", "--launch", ring(2))
    assert done.returncode == 1
    errors = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "27 video tokens (latent frames x rows x columns) do not split into 2" in errors[0], \
        done.stdout + done.stderr
    assert not out.exists() and not (tmp_path / "dump").exists()


def _world(size: int) -> World:
    return World(None, 0, size, Watchdog(0))


@pytest.mark.parametrize("plan, size, extra, message", [
    ("cfg", 2, {"recipe": "distilled"}, "one DiT pass a step"),
    ("cfg", 2, {"modality_scale": 1.0, "audio_modality_scale": 1.0, "audio_guidance": 1.0}, None),  # 2 passes
    ("cfg", 3, {"modality_scale": 1.0}, "3 ranks but 2 DiT passes a step (conditional, unconditional)"),
    ("cfg", 4, {}, "4 ranks but 3 DiT passes a step (conditional, unconditional, isolated)"),
    ("tensor", 3, {}, "num_attention_heads 8 does not split across 3 ranks"),
    ("tensor", 2, {"low_memory": True}, "with --low-memory"),
    ("sequence", 3, {}, "16 video tokens (latent frames x rows x columns) do not split into 3 equal parts"),
    ("sequence", 3, {"recipe": "distilled"}, "4 video tokens (latent frames x rows x columns) do not split into 3"),
    ("tensor", 1, {}, "not started by mlx.launch"),
    (None, 2, {}, "2 ranks but no parallel plan"),
])
def test_refusals_before_weights_load(folder, tmp_path, monkeypatch, plan, size, extra, message):
    """Every refusal from configs, guidance and the rank count alone: the weights are removed from a
    copy of the folder, and the plan sees `size` ranks."""
    from vidport.runtime import distributed

    copy = tmp_path / "no-weights"
    shutil.copytree(folder, copy)
    for weights in copy.rglob("*.safetensors"):
        weights.unlink()
    monkeypatch.setattr(distributed, "_world", _world(size))
    pipe = open_pipeline(copy)
    request = Request(task="t2v", prompt="a fox", frames=9, height=64, width=128,  # the distilled recipe halves it
                      extra={"parallel": plan, "max_sequence_length": 16, **extra})
    if message is None:
        assert pipe.describe_plan(pipe.check(request)).startswith("cfg over 2 ranks: the 2 guidance passes")
        return
    with pytest.raises(VidportError, match=re.escape(message)):
        pipe.check(request)


@pytest.mark.parametrize("rope_type", ["split", "interleaved"])
def test_plans_on_an_ltx23_dit(rope_type, tmp_path):
    """The LTX-2.3 block (per-head gates, STG's perturbed self-attention, prompt modulation) on 2
    ranks, its video tokens split (sequence: per-token timesteps, as i2v gives, and RoPE tables
    sliced by token) and its heads sharded (tensor: tables sliced per head and per channel): the
    DiT's video and audio outputs, plain and with STG on block 1, equal the whole DiT's on the same
    rank, for both RoPE layouts. The pipeline folder above is LTX-2.0 (no gates, no perturbed
    processor, SPLIT tables, one timestep for all tokens)."""
    from fixtures.ltx2_dit import ltx2_config

    config = ltx2_config("2.3", rope_type=rope_type, caption_channels=64)
    launcher = Path(sys.executable).with_name("mlx.launch")
    done = subprocess.run([str(launcher), *ring(2).split(), "--python", sys.executable, "--", __file__,
                           json.dumps(config), str(tmp_path / "result.json")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "WARN" not in done.stderr, done.stdout + done.stderr
    result = json.loads((tmp_path / "result.json").read_text())
    assert len(result) == 2 * 2 * 2, result  # plans x (plain, STG) x streams
    for name, value in result.items():
        assert value >= 0.99999, (name, result)


def _rank_main(config: dict, out: str) -> None:
    """One rank of test_plans_on_an_ltx23_dit: the same random DiT and inputs on every rank (one
    seed), its outputs whole, on this rank's video tokens, then sharded; rank 0 writes the PCCs."""
    import math

    import mlx.core as mx
    from mlx.utils import tree_map

    from vidport.runtime.distributed import world
    from vidport.runtime.ltx2.dit import LTX2VideoTransformer3DModel
    from vidport.runtime.parallel_causal_wan import RankTokens
    from vidport.runtime.parallel_ltx2 import shard_ltx2_block

    ranks = world()
    mx.random.seed(0)
    model = LTX2VideoTransformer3DModel.from_config(config)
    model.update(tree_map(lambda p: mx.random.normal(p.shape) / math.sqrt(p.shape[-1]) if p.ndim == 2
                          else 1.0 + 0.3 * mx.random.normal(p.shape), model.parameters()))
    frames, height, width, audio_frames, text = 2, 2, 3, 5, 7
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    audio_inner = config["audio_num_attention_heads"] * config["audio_attention_head_dim"]
    inputs = {"hidden_states": mx.random.normal((1, frames * height * width, config["in_channels"])),
              "audio_hidden_states": mx.random.normal((1, audio_frames, config["audio_in_channels"])),
              "encoder_hidden_states": mx.random.normal((1, text, inner)),
              "audio_encoder_hidden_states": mx.random.normal((1, text, audio_inner)),
              "timestep": mx.random.uniform(shape=(1, frames * height * width)) * 1000,  # per token, as i2v
              "audio_timestep": mx.array([600.0]), "sigma": mx.array([0.6]),
              "encoder_attention_mask": mx.array([[0, 0, 1, 1, 1, 1, 1]]), "num_frames": frames, "height": height,
              "width": width, "fps": 24.0, "audio_num_frames": audio_frames}
    calls = {"plain": {}, "stg": {"spatio_temporal_guidance_blocks": [1]}}
    whole = {name: model(**inputs, **switches) for name, switches in calls.items()}
    mx.eval(whole)
    split = RankTokens(ranks)
    plans = {"sequence": {name: model(**inputs, **switches, tokens=split) for name, switches in calls.items()}}
    mx.eval(plans)
    for block in model.transformer_blocks:
        shard_ltx2_block(block, ranks)
    plans["tensor"] = {name: model(**inputs, **switches) for name, switches in calls.items()}
    mx.eval(plans)
    if ranks.is_main:
        import numpy as np

        result = {f"{plan} {name} {stream}": float(np.corrcoef(np.array(whole[name][i]).ravel(),
                                                               np.array(outputs[name][i]).ravel())[0, 1])
                  for plan, outputs in plans.items() for name in calls for i, stream in enumerate(("video", "audio"))}
        Path(out).write_text(json.dumps(result))


def test_plan_lines():
    """The tensor plan at the release's widths (32 video heads, 32 audio heads)."""
    config = {"num_attention_heads": 32, "audio_num_attention_heads": 32}
    assert ltx2_plan("tensor", _world(4)).describe(config, ["conditional"]).startswith(
        "tensor over 4 ranks: each rank 8 of 32 video heads, 8 of 32 audio heads")
    passes = ["conditional", "unconditional", "perturbed", "isolated"]  # LTX-2.3's dev recipe
    assert "(rank 0 conditional + perturbed; rank 1 unconditional + isolated)" in ltx2_plan(
        "cfg", _world(2)).describe(config, passes)


if __name__ == "__main__":  # a rank under mlx.launch (test_plans_on_an_ltx23_dit)
    _rank_main(json.loads(sys.argv[1]), sys.argv[2])
