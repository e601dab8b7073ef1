"""LTX-2 pipeline on this CPU, MLX vs diffusers, random weights at the released widths:

- one denoising step of each stage, the DiT at LTX-2.0's real per-layer widths (bench/ltx2_forward.py's
  config) with `layers` of its 48 blocks, behind the text connectors at their real widths (30 heads x
  128 = 3840 per stream; the DiT's caption projections take 3840 to 4096 / 2048) with one layer per
  stream (release: 2) and an input projection from 3840 x `text_proj_in_factor` (release: 49 Gemma
  states; it runs once per generation, its 2.9 GB float32 weight would not let both sides stay
  resident): 128 text tokens, 24 fps, LTX-2's audio alongside.
  - dev: LTX2Pipeline's guided step at the full size (guidance 4, stg 1 on the last block,
    modality 3, rescale 0.7, audio 7): diffusers runs CFG as a batch of 2, STG's and modality
    isolation's passes, 4 DiT batch-passes; vidport skips STG's pass on LTX-2.0 (a DiT without
    the perturbed attention of LTX-2.3: that pass equals the conditional one and its term is
    zero), 3. The single-pass stages compare pass for pass;
  - distilled stage 1 (half the size) and stage 2 (the full size, from re-noised latents): one
    unguided pass each.
  diffusers: `LTX2Pipeline(...)(prompt_embeds=..., num_inference_steps=1, output_type="latent")`,
  the whole call timed (the connectors, latent and schedule set-up, the step, unpacking and
  denormalizing; its VAEs and vocoder are small and unused). MLX: the same work in vidport's
  pipeline: `LTX2Pipeline.connect` and `.schedulers` (on an instance holding these models), then
  `denoise` for the step. One extra instrumented step per side times the DiT blocks alone; the
  48-block projection is the measured step plus (48 - layers) x the per-block time (linear in
  blocks; what is not a block, measured as step minus blocks, stays as it is).
- the video VAE's tiled decode (released structure) with temporal runs: MLX `decode_stream`
  (frames handed out run by run; `enable_tiling(Tiling(temporal=True))` + `decode` where the
  runtime has no stream), diffusers `enable_tiling()` + `use_framewise_decoding`;
- LTX-2.0's vocoder (hidden 1024) on seconds of stereo mel.

Each model runs in a worker process per side, the sides alternating call by call (bench/_common.py);
medians of `--repeat` runs with their range, ratios MLX/diffusers (wall and CPU time) and peak RSS.
Where both sides would not fit in MEMORY_CAP at once (the float32 step and VAE), one side runs all
its rounds, then the other. The load average before and after each model is printed: on a shared
2-core machine, CPU time is the steadier comparison.

    .venv/bin/python bench/ltx2_pipeline.py                     # 2 blocks, 33 frames 384x512; tiled decode; vocoder
    .venv/bin/python bench/ltx2_pipeline.py --quick             # 1 block, 9 frames 256x384, smaller decode
    .venv/bin/python bench/ltx2_pipeline.py --models step --dtype bfloat16   # slow: see below

bfloat16: MLX multiplies bfloat16 matrices on this CPU some 60x slower than float32 (a 960 x 4096 by
4096 x 4096 product: 6.0 s against 0.10 s; torch 0.07 s), so a bfloat16 step takes tens of minutes.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402
from ltx2_forward import dit_config, vae_config  # noqa: E402

FPS = 24.0
RELEASE_BLOCKS = 48
MEMORY_CAP = 12 * common.GB  # this benchmark's own bound on both sides together
# peak GB per side in float32 (measured): the step 1.6 a block + 3.9 (the DiT's embeddings and
# projections, the connectors, the step's work), the VAE's 4.9 GB of weights + a tile's work
NEED_GB = {"step": lambda layers: 1.6 * layers + 3.9, "vae": lambda layers: 6.5, "vocoder": lambda layers: 1.0}
SIZES = {
    "full": {"layers": 2, "text_tokens": 128, "frames": 33, "height": 384, "width": 512,
             "decode": {"frames": 25, "height": 256, "width": 384, "tile": 256, "stride": 192},
             "mel_seconds": 2.0},
    "quick": {"layers": 1, "text_tokens": 128, "frames": 9, "height": 256, "width": 384,
              "decode": {"frames": 17, "height": 128, "width": 192, "tile": 256, "stride": 192},  # runs, no tiles
              "mel_seconds": 0.25},
}
# LTX-2.0's connectors at their real widths, fewer layers and a narrower input (module docstring)
CONNECTORS = {"caption_channels": 3840, "text_proj_in_factor": 1, "video_connector_num_layers": 1,
              "audio_connector_num_layers": 1, "rope_type": "split"}
RELEASE_CONNECTORS = {"text_proj_in_factor": 49, "video_connector_num_layers": 2, "audio_connector_num_layers": 2}
STAGES = ("dev", "stage1", "stage2")
MAX_REPEAT = {"vae": 2, "vocoder": 2}  # the long calls: at most 2 timed runs
TEMPORAL_TILE = {"frames": 16, "stride": 8}  # diffusers' defaults for framewise decoding
MEL_FRAMES_PER_S = 100  # the vocoder's 24 kHz out of 240x upsampling


def sides_fit(model: str, size: str, dtype: str) -> bool:
    """Whether both sides' workers fit at once within MEMORY_CAP and what the machine has free."""
    need = 2 * NEED_GB[model](SIZES[size]["layers"]) * common.GB * (0.5 if dtype == "bfloat16" else 1.0)
    return need <= min(MEMORY_CAP, common.available_memory())


def grids(size: str) -> dict[str, tuple[int, int, int]]:
    """Each stage's pixel size (frames, height, width): the full size, stage 1 at half of it."""
    s = SIZES[size]
    full = (s["frames"], s["height"], s["width"])
    return {"dev": full, "stage1": (s["frames"], s["height"] // 2, s["width"] // 2), "stage2": full}


def stage_grid(stage: str, size: str):
    from vidport.runtime.pipelines.ltx2_latents import Grid, audio_latent_frames

    frames, height, width = grids(size)[stage]
    return Grid((frames - 1) // 8 + 1, height // 32, width // 32, audio_latent_frames(frames, FPS, 16000, 160, 4))


def guidance_settings(stage: str, layers: int) -> dict:
    """diffusers' LTX2Pipeline arguments of a stage: the dev defaults (guidance 4, STG on the last
    block here) or the distilled recipe's (unguided); audio scales left to follow the video ones."""
    from vidport.runtime.pipelines.ltx2 import DISTILLED_GUIDANCE, GUIDANCE_DEFAULTS

    chosen = {**GUIDANCE_DEFAULTS, "guidance_scale": 4.0}
    if stage != "dev":
        chosen.update(DISTILLED_GUIDANCE, guidance_scale=1.0)
    return {"guidance_scale": chosen["guidance_scale"], "stg_scale": chosen["stg_scale"],
            "modality_scale": chosen["modality_scale"], "guidance_rescale": chosen["guidance_rescale"],
            "audio_guidance_scale": chosen["audio_guidance"], "audio_stg_scale": None, "audio_modality_scale": None,
            "audio_guidance_rescale": None, "spatio_temporal_guidance_blocks": [layers - 1]}


def stage_sigmas(stage: str) -> list[float]:
    """One sigma of the stage's schedule: the first of the distilled ones; for dev the second of the
    40-step schedule (a lone 1.0 turns NaN in the terminal stretch, in diffusers as in ours)."""
    from vidport.runtime.pipelines.ltx2_latents import DISTILLED_SIGMAS, STAGE_2_SIGMAS, dev_sigmas

    return [float(dev_sigmas(40)[1]) if stage == "dev" else DISTILLED_SIGMAS[0] if stage == "stage1"
            else STAGE_2_SIGMAS[0]]


def text_states(size: str):
    """Stacked Gemma states [negative, prompt] (2, S, 3840 x factor) and their mask (all tokens valid)."""
    tokens, width = SIZES[size]["text_tokens"], CONNECTORS["caption_channels"] * CONNECTORS["text_proj_in_factor"]
    rng = np.random.default_rng(0)
    return rng.standard_normal((2, tokens, width), dtype=np.float32), np.ones((2, tokens), np.int64)


def stage2_inputs(size: str):
    """Stage 2's starting latents (raw, unpacked: (1, 128, F, h, w)) and audio ((1, 8, L, 16))."""
    grid = stage_grid("stage2", size)
    rng = np.random.default_rng(1)
    return (rng.standard_normal((1, 128, grid.frames, grid.height, grid.width), dtype=np.float32),
            rng.standard_normal((1, 8, grid.audio_frames, 16), dtype=np.float32))


def decode_latents(size: str):
    d = SIZES[size]["decode"]
    shape = (1, (d["frames"] - 1) // 8 + 1, d["height"] // 32, d["width"] // 32, 128)
    return np.random.default_rng(2).standard_normal(shape, dtype=np.float32)


def mel_input(size: str):
    frames = int(SIZES[size]["mel_seconds"] * MEL_FRAMES_PER_S)
    return np.random.default_rng(3).standard_normal((1, 2, frames, 64), dtype=np.float32)


def vocoder_config() -> dict:
    """LTX-2.0's vocoder: diffusers' LTX2Vocoder defaults are the release's (hidden 1024)."""
    import inspect

    from diffusers.pipelines.ltx2 import LTX2Vocoder

    return {n: p.default for n, p in inspect.signature(LTX2Vocoder.__init__).parameters.items() if n != "self"}


# ---------------------------------------------------------------------------------------------
# MLX worker


def _mlx_blocks(run_stage, block_class) -> dict:
    """Each stage once more with every DiT block evaluated on its own (its inputs first, outside
    the clock): the step's seconds, the blocks' seconds and the block calls."""
    import mlx.core as mx

    original = block_class.__call__
    spent = {"blocks": 0.0, "calls": 0}

    def timed(self, *args, **kwargs):
        mx.eval([a for a in (*args, *kwargs.values()) if isinstance(a, mx.array)])
        began = time.perf_counter()
        out = original(self, *args, **kwargs)
        mx.eval(out)
        spent["blocks"] += time.perf_counter() - began
        spent["calls"] += 1
        return out

    block_class.__call__ = timed
    try:
        return _each_stage(run_stage, spent)
    finally:
        block_class.__call__ = original


def _each_stage(run_stage, spent: dict) -> dict:
    """Run every stage once: its step's seconds beside what the block timers in `spent` counted."""
    found = {}
    for stage in STAGES:
        spent.update(blocks=0.0, calls=0)
        began = time.perf_counter()
        run_stage(stage)
        found[stage] = {"step_s": time.perf_counter() - began, **spent}
    return found


def _mlx_step_setup(size: str, dtype: str):
    blas = common.start_mlx()
    from types import SimpleNamespace

    import mlx.core as mx
    from mlx.utils import tree_flatten

    from vidport.converter.pipeline_spec import pipeline_spec
    from vidport.runtime.ltx2.connectors import LTX2TextConnectors
    from vidport.runtime.ltx2.dit import LTX2VideoTransformer3DModel, LTX2VideoTransformerBlock
    from vidport.runtime.pipelines.ltx2 import LTX2Pipeline
    from vidport.runtime.pipelines.ltx2_denoise import Guidance, denoise
    from vidport.runtime.pipelines.ltx2_latents import pack_audio, pack_video

    layers = SIZES[size]["layers"]
    dit = LTX2VideoTransformer3DModel.from_config(dit_config(layers))
    connectors = LTX2TextConnectors.from_config(CONNECTORS)
    for model in (dit, connectors):
        model.set_dtype(getattr(mx, dtype))
    # vidport's pipeline without a converted folder: its models and scheduler config given
    pipe = LTX2Pipeline.__new__(LTX2Pipeline)
    pipe.folder = SimpleNamespace(scheduler_config=pipeline_spec("ltx2").scheduler_default)
    pipe._models = {"transformer": dit, "connectors": connectors}
    states, mask = (mx.array(a) for a in text_states(size))
    upsampled, stage1_audio = (mx.array(a) for a in stage2_inputs(size))
    mx.eval(dit.parameters(), connectors.parameters(), states, mask, upsampled, stage1_audio)

    def run_stage(stage: str) -> None:
        grid = stage_grid(stage, size)
        g = guidance_settings(stage, layers)
        guidance = Guidance(cfg=g["guidance_scale"], stg=g["stg_scale"], modality=g["modality_scale"],
                            rescale=g["guidance_rescale"], audio_cfg=g["audio_guidance_scale"],
                            stg_blocks=tuple(g["spatio_temporal_guidance_blocks"]))
        text = pipe.connect(states if guidance.uses_cfg else states[1:], mask if guidance.uses_cfg else mask[1:],
                            guidance.uses_cfg)
        keys = mx.random.split(mx.random.key(0))
        video = mx.random.normal((1, grid.tokens, 128), key=keys[0])
        audio = mx.random.normal((1, grid.audio_frames, 128), key=keys[1])
        sigma = stage_sigmas(stage)
        if stage == "stage2":  # the pipeline's re-noising of the upsampled latents
            video = sigma[0] * video + (1 - sigma[0]) * pack_video(upsampled)
            audio = sigma[0] * audio + (1 - sigma[0]) * pack_audio(stage1_audio)
        result = denoise(dit, video, audio, grid, text, guidance, pipe.schedulers(sigma, grid.tokens, stage == "dev"),
                         FPS)
        mx.eval(result.video, result.audio)

    calls = {stage: (lambda stage=stage: run_stage(stage)) for stage in STAGES}
    calls["profile"] = lambda: _mlx_blocks(run_stage, LTX2VideoTransformerBlock)
    release = LTX2TextConnectors.from_config({**CONNECTORS, **RELEASE_CONNECTORS})  # never evaluated: shapes only
    info = {"blas": blas, "parameters": sum(v.size for _, v in tree_flatten(dit.parameters())),
            "block_parameters": sum(v.size for _, v in tree_flatten(dit.transformer_blocks[0].parameters())),
            "release_connector_parameters": sum(v.size for _, v in tree_flatten(release.parameters()))}
    return calls, info


def _mlx_setup(model: str, size: str, dtype: str):
    if model == "step":
        return _mlx_step_setup(size, dtype)
    blas = common.start_mlx()
    import mlx.core as mx
    from mlx.utils import tree_flatten

    if model == "vae":
        from vidport.runtime.ltx2.video_vae import AutoencoderKLLTX2Video
        from vidport.runtime.ltx2.video_vae_tiling import Tiling

        d = SIZES[size]["decode"]
        net = AutoencoderKLLTX2Video.from_config(vae_config())
        net.enable_tiling(Tiling(min_height=d["tile"], min_width=d["tile"], stride_height=d["stride"],
                                 stride_width=d["stride"], min_num_frames=TEMPORAL_TILE["frames"],
                                 stride_num_frames=TEMPORAL_TILE["stride"], temporal=True))
        net.set_dtype(getattr(mx, dtype))
        z = mx.array(decode_latents(size)).astype(getattr(mx, dtype))
        streams = hasattr(net, "decode_stream")

        def call():
            if streams:  # each chunk evaluated and dropped, as a writer takes it
                for chunk in net.decode_stream(z):
                    mx.eval(chunk)
            else:
                mx.eval(net.decode(z))
        extra = {"route": "decode_stream" if streams else "enable_tiling + decode"}
    else:
        from vidport.runtime.ltx2.vocoder import LTX2Vocoder

        net = LTX2Vocoder.from_config(vocoder_config())
        net.set_dtype(getattr(mx, dtype))
        mel = mx.array(mel_input(size)).astype(getattr(mx, dtype))

        def call():
            mx.eval(net(mel))
        extra = {}
    mx.eval(net.parameters())
    params = sum(v.size for _, v in tree_flatten(net.parameters()))
    return {model: call}, {"blas": blas, "parameters": params, **extra}


# ---------------------------------------------------------------------------------------------
# diffusers worker


def _torch_blocks(run_stage, blocks) -> dict:
    """Each stage once more with forward hooks around every DiT block: the step's seconds, the
    blocks' seconds and the block calls (torch on the CPU runs synchronously)."""
    spent = {"blocks": 0.0, "calls": 0}
    began = {}

    def before(module, args, kwargs):
        began[id(module)] = time.perf_counter()

    def after(module, args, kwargs, output):
        spent["blocks"] += time.perf_counter() - began.pop(id(module))
        spent["calls"] += 1

    handles = [h for block in blocks for h in (block.register_forward_pre_hook(before, with_kwargs=True),
                                               block.register_forward_hook(after, with_kwargs=True))]
    try:
        return _each_stage(run_stage, spent)
    finally:
        for handle in handles:
            handle.remove()


def _small_codecs():
    """The pipeline's VAEs and vocoder, small (unused with output_type="latent") but with the
    release's latent widths: 128 video channels, audio 8 channels x 16 mel bins."""
    from diffusers import AutoencoderKLLTX2Audio, AutoencoderKLLTX2Video
    from diffusers.pipelines.ltx2 import LTX2Vocoder

    from fixtures import ltx2_audio_vae, ltx2_video_vae, ltx2_vocoder

    vae = AutoencoderKLLTX2Video(**ltx2_video_vae.video_vae_config(latent_channels=128))
    audio_vae = AutoencoderKLLTX2Audio(**{**ltx2_audio_vae.CONFIG, "latent_channels": 8, "base_channels": 128})
    return vae.eval(), audio_vae.eval(), LTX2Vocoder(**ltx2_vocoder.diffusers_config("2.0")).eval()


def _torch_step_setup(size: str, dtype: str):
    info = common.start_torch()
    import diffusers
    import torch
    from diffusers import LTX2VideoTransformer3DModel
    from diffusers.pipelines.ltx2 import LTX2Pipeline, LTX2TextConnectors

    from vidport.converter.pipeline_spec import pipeline_spec

    torch.manual_seed(0)
    layers, torch_dtype = SIZES[size]["layers"], getattr(torch, dtype)
    dit = LTX2VideoTransformer3DModel(**dit_config(layers)).to(torch_dtype).eval()
    connectors = LTX2TextConnectors(**CONNECTORS).to(torch_dtype).eval()
    vae, audio_vae, vocoder = _small_codecs()
    config = pipeline_spec("ltx2").scheduler_default
    scheduler = getattr(diffusers, config["_class_name"])
    schedulers = {"dev": scheduler.from_config(config),
                  "distilled": scheduler.from_config({**config, "use_dynamic_shifting": False, "shift_terminal": None})}
    pipe = LTX2Pipeline(scheduler=schedulers["dev"], vae=vae, audio_vae=audio_vae, text_encoder=None, tokenizer=None,
                        connectors=connectors, transformer=dit, vocoder=vocoder)
    pipe.set_progress_bar_config(disable=True)
    states, mask = (torch.from_numpy(a) for a in text_states(size))
    states = states.to(torch_dtype)
    upsampled, stage1_audio = (torch.from_numpy(a) for a in stage2_inputs(size))

    def run_stage(stage: str) -> None:
        frames, height, width = grids(size)[stage]
        pipe.scheduler = schedulers["dev" if stage == "dev" else "distilled"]
        sigmas = stage_sigmas(stage)
        extra = ({"latents": upsampled, "audio_latents": stage1_audio, "noise_scale": sigmas[0]}
                 if stage == "stage2" else {})
        with torch.no_grad():
            pipe(prompt_embeds=states[1:], prompt_attention_mask=mask[1:], negative_prompt_embeds=states[:1],
                 negative_prompt_attention_mask=mask[:1], height=height, width=width, num_frames=frames,
                 frame_rate=FPS, num_inference_steps=1, sigmas=sigmas, **guidance_settings(stage, layers),
                 use_cross_timestep=True, generator=torch.Generator().manual_seed(0), output_type="latent",
                 return_dict=False, **extra)

    calls = {stage: (lambda stage=stage: run_stage(stage)) for stage in STAGES}
    calls["profile"] = lambda: _torch_blocks(run_stage, dit.transformer_blocks)
    return calls, {"torch": info, "parameters": sum(p.numel() for p in dit.parameters()),
                   "block_parameters": sum(p.numel() for p in dit.transformer_blocks[0].parameters())}


def _torch_setup(model: str, size: str, dtype: str):
    if model == "step":
        return _torch_step_setup(size, dtype)
    info = common.start_torch()
    import torch

    torch.manual_seed(0)
    torch_dtype = getattr(torch, dtype)
    if model == "vae":
        from diffusers import AutoencoderKLLTX2Video

        d = SIZES[size]["decode"]
        net = AutoencoderKLLTX2Video(**vae_config())  # the release's ratios: its tiles are counted in them
        net.enable_tiling(tile_sample_min_height=d["tile"], tile_sample_min_width=d["tile"],
                          tile_sample_min_num_frames=TEMPORAL_TILE["frames"], tile_sample_stride_height=d["stride"],
                          tile_sample_stride_width=d["stride"], tile_sample_stride_num_frames=TEMPORAL_TILE["stride"])
        net.use_framewise_decoding = True
        net = net.to(torch_dtype).eval()
        z = torch.from_numpy(decode_latents(size)).permute(0, 4, 1, 2, 3).contiguous().to(torch_dtype)

        def call():
            with torch.no_grad():
                net.decode(z)
    else:
        from diffusers.pipelines.ltx2 import LTX2Vocoder

        net = LTX2Vocoder(**vocoder_config()).to(torch_dtype).eval()
        mel = torch.from_numpy(mel_input(size)).to(torch_dtype)

        def call():
            with torch.no_grad():
                net(mel)
    return {model: call}, {"torch": info, "parameters": sum(p.numel() for p in net.parameters())}


# ---------------------------------------------------------------------------------------------
# parent


def labels(size: str) -> dict[str, dict[str, str]]:
    s, d = SIZES[size], SIZES[size]["decode"]

    def step(stage: str, what: str) -> str:
        frames, height, width = grids(size)[stage]
        grid = stage_grid(stage, size)
        return f"{what}, {frames}x{height}x{width} ({grid.tokens}+{grid.audio_frames} tok)"

    return {"step": {"dev": step("dev", "dev step, 3 / 4 passes"), "stage1": step("stage1", "distilled stage 1"),
                     "stage2": step("stage2", "distilled stage 2")},
            "vae": {"vae": f"tiled VAE decode {d['frames']}x{d['height']}x{d['width']}"},
            "vocoder": {"vocoder": f"vocoder, {s['mel_seconds']:g} s of mel"}}


def project(results: dict, size: str, dtype: str) -> dict:
    """The release's 48 blocks from the measured step, linear in blocks: the median step split as
    the instrumented step splits (its blocks' share of it), the blocks' part scaled by 48 / L, the
    rest kept; peak RSS + (48 - L) x one block's weights."""
    layers, itemsize = SIZES[size]["layers"], 2 if dtype == "bfloat16" else 4
    out = {}
    for side in ("mlx", "torch"):
        blocks, block_bytes = results[side]["extra"]["profile"], results[side]["info"]["block_parameters"] * itemsize
        out[side] = {}
        for stage in STAGES:
            measured = results[side]["summary"][stage]
            share = min(blocks[stage]["blocks"] / blocks[stage]["step_s"], 1.0)
            per_block = share * measured["wall_s"] / layers
            out[side][stage] = {"measured_s": measured["wall_s"], "block_share": share, "per_block_s": per_block,
                                "non_block_s": (1 - share) * measured["wall_s"],
                                "projected_s": (1 - share) * measured["wall_s"] + RELEASE_BLOCKS * per_block,
                                "projected_peak": measured["peak_rss"] + (RELEASE_BLOCKS - layers) * block_bytes,
                                "block_bytes": block_bytes}
    rows = []
    for stage in STAGES:
        a, b = out["mlx"][stage], out["torch"][stage]
        rows.append([stage, f"{100 * a['block_share']:.0f}% / {100 * b['block_share']:.0f}%",
                     f"{a['per_block_s']:.2f}", f"{b['per_block_s']:.2f}", f"{a['non_block_s']:.2f}",
                     f"{b['non_block_s']:.2f}", f"{a['projected_s']:.0f}", f"{b['projected_s']:.0f}",
                     f"{a['projected_s'] / b['projected_s']:.2f}", f"{a['projected_peak'] / common.GB:.1f}",
                     f"{b['projected_peak'] / common.GB:.1f}"])
    common.table(f"Projected to the release's 48 blocks ({dtype}; one step, this machine)",
                 ["stage", "blocks' share MLX / torch", "MLX s/block", "torch s/block", "MLX non-block s",
                  "torch non-block s", "MLX 48-block s", "torch 48-block s", "MLX/torch", "MLX peak GB",
                  "torch peak GB"], rows)
    connectors = results["mlx"]["info"]["release_connector_parameters"] * itemsize / common.GB
    calls = {side: results[side]["extra"]["profile"]["dev"]["calls"] // layers for side in ("mlx", "torch")}
    print(f"  dev: {calls['mlx']} DiT calls a step on MLX, {calls['torch']} in diffusers (the CFG pair is one call).")
    print(f"  blocks' share: of one instrumented step (each block timed alone); s/block: that share of the median "
          f"/ {layers}; non-block: the rest (connectors, embeddings, guidance, scheduler, set-up), kept as is.\n"
          f"  peak: measured + {RELEASE_BLOCKS - layers} x {out['mlx']['dev']['block_bytes'] / common.GB:.2f} GB of "
          f"block weights; the release's connectors ({connectors:.1f} GB: 2 layers a stream, 49 Gemma states in; run "
          f"once per prompt) not counted. This machine: {common.total_memory() / common.GB:.0f} GB.")
    return out


def run(quick: bool = False, repeat: int = 3, models: list[str] | None = None, dtype: str = "float32") -> dict:
    size = "quick" if quick else "full"
    names = labels(size)
    report = {"size": size, "dtype": dtype, "shape": SIZES[size], "results": {}, "rows": [], "projection": {}}
    for model in models or ["step", "vae", "vocoder"]:
        print(f"LTX-2 {model}, {dtype}; load average {os.getloadavg()[0]:.1f}", flush=True)
        one_at_a_time = not sides_fit(model, size, dtype)
        if one_at_a_time:
            print(f"  both sides would not fit in {min(MEMORY_CAP, common.available_memory()) / common.GB:.1f} GB: "
                  "one side after the other")
        calls = list(names[model])
        runs = min(repeat, MAX_REPEAT.get(model, repeat))
        results = common.interleaved(__file__, ["mlx", "torch"], calls, runs,
                                     ["--size", size, "--model", model, "--dtype", dtype], one_at_a_time=one_at_a_time,
                                     extra_calls=["profile"] if model == "step" else [], side_after_side=True)
        mlx_info, torch_info = results["mlx"]["info"], results["torch"]["info"]
        print(f"  MLX: {mlx_info['blas']}, {mlx_info['parameters'] / 1e6:.0f} M parameters"
              + (f" ({mlx_info['route']})" if "route" in mlx_info else "")
              + f"; diffusers: {torch_info['torch']}, {torch_info['parameters'] / 1e6:.0f} M")
        report["results"][model] = {**results, "load_average_after": os.getloadavg()[0]}
        print(f"  load average after: {os.getloadavg()[0]:.1f} (this machine has {os.cpu_count()} cores)")
        report["rows"] += common.side_by_side(f"LTX-2 {model}, MLX vs diffusers ({size}, {dtype}; median of {runs})",
                                              results, names[model])
        if model == "step":
            report["projection"] = project(results, size, dtype)
    print("goal: MLX no slower than diffusers")
    report["goals_met"] = common.verdict(report["rows"])
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="1 block, 9 frames 256x384; a 17-frame 128x192 decode in runs, untiled; 0.25 s of mel")
    parser.add_argument("--repeat", type=int, default=3,
                        help="timed calls per side, median reported (the VAE and vocoder: at most 2)")
    parser.add_argument("--models", nargs="+", choices=["step", "vae", "vocoder"], help="what to run (default: all)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", choices=["mlx", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--model", choices=["step", "vae", "vocoder"], default="step", help=argparse.SUPPRESS)
    parser.add_argument("--size", choices=list(SIZES), default="full", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        setup = _mlx_setup if args.worker == "mlx" else _torch_setup
        common.serve(lambda: setup(args.model, args.size, args.dtype))
        return {}
    report = run(args.quick, args.repeat, args.models, args.dtype)
    common.write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
