"""How to exercise an LTX-2 vocoder (families ltx2-vocoder and ltx2-vocoder-bwe): the whole model
on a seeded stereo mel spectrogram, as the audio VAE's decoder hands it over.

diffusers reads no original LTX-2 file for the vocoder: for the original single file the
reference is the official ltx_core model (`official_vocoder`)."""
from __future__ import annotations

from typing import Any

import numpy as np

from vidport.converter.core.errors import VidportError
from vidport.reference.official import Official, load_strict
from vidport.reference.probe import Probe

VOCODER_FILE = "ltx_core/model/audio_vae/vocoder.py"


def probes(config: dict[str, Any], seed: int, frames: int | None = None) -> list[Probe]:
    """`frames` mel frames (default 4) of the stereo spectrogram, (1, 2, frames, in_channels / 2):
    every upsampler, residual block and (with bandwidth extension) the STFT, the extender and the
    resampler run on it."""
    frames = frames or 4
    bins = config.get("in_channels", 128) // 2
    rng = np.random.default_rng(seed)
    mel = rng.standard_normal((1, 2, frames, bins)).astype(np.float32)
    return [Probe("", [mel])]


def _generator(config: dict[str, Any], prefix: str = "") -> Any:
    """ltx_core's Vocoder with the architecture of the diffusers (LTX2Vocoder) arguments under
    `prefix`; refuses what the official class cannot be (it is stereo: 128 mel channels in, 2 out)."""
    from ltx_core.model.audio_vae.resnet import LRELU_SLOPE
    from ltx_core.model.audio_vae.vocoder import Vocoder

    def get(name: str) -> Any:
        return config[prefix + name]

    act_fn, final = get("act_fn"), get("final_act_fn")
    amp = act_fn != "leaky_relu"
    unfit = {"in_channels": (get("in_channels"), 128), "out_channels": (get("out_channels"), 2),
             "antialias": (get("antialias"), amp)}
    if amp:
        unfit.update(antialias_ratio=(get("antialias_ratio"), 2), antialias_kernel_size=(get("antialias_kernel_size"), 12))
    else:
        unfit.update(leaky_relu_negative_slope=(get("leaky_relu_negative_slope"), LRELU_SLOPE))
    wrong = {name: given for name, (given, official) in unfit.items() if given != official}
    if wrong:
        raise VidportError(f"{VOCODER_FILE} Vocoder cannot be built with {prefix}{wrong} (its "
                           f"{'AMP1' if amp else 'resblock 1'} generator fixes them)",
                           hint="the config does not describe an official LTX-2 vocoder")
    return Vocoder(resblock_kernel_sizes=list(get("resnet_kernel_sizes")), upsample_rates=list(get("upsample_factors")),
                   upsample_kernel_sizes=list(get("upsample_kernel_sizes")),
                   resblock_dilation_sizes=[list(d) for d in get("resnet_dilations")],
                   upsample_initial_channel=get("hidden_channels"), resblock="AMP1" if amp else "1",
                   activation=act_fn, use_tanh_at_final=final == "tanh", apply_final_activation=final is not None,
                   use_bias_at_final=get("final_bias"))


def official_vocoder(state: dict[str, Any], config: dict[str, Any]) -> Official:
    """ltx_core's Vocoder (LTX-2) or VocoderWithBWE (LTX-2.3: the config has a bandwidth
    extender) built on the meta device at the config's widths, loaded strictly with the file's
    tensors as ltx_core's loader passes them (VOCODER_COMFY_KEYS_FILTER: the keys under vocoder.,
    that prefix removed once); a probe's mel spectrogram goes to its forward."""
    import torch
    from ltx_core.model.audio_vae.model_configurator import VOCODER_COMFY_KEYS_FILTER
    from ltx_core.model.audio_vae.vocoder import MelSTFT, VocoderWithBWE

    selected = {}
    for key, value in state.items():
        name = VOCODER_COMFY_KEYS_FILTER.apply_to_key(key)
        if name is not None:
            selected.update(VOCODER_COMFY_KEYS_FILTER.apply_to_key_value(name, value))
    with torch.device("meta"):
        if "bwe_hidden_channels" not in config:
            model, what = _generator(config), "Vocoder"
        else:
            what = "VocoderWithBWE"
            model = VocoderWithBWE(_generator(config), _generator(config, "bwe_"),
                                   MelSTFT(config["filter_length"], config["hop_length"], config["window_length"],
                                           config["num_mel_channels"]),
                                   input_sampling_rate=config["input_sampling_rate"],
                                   output_sampling_rate=config["output_sampling_rate"],
                                   hop_length=config["hop_length"])
    model = load_strict(model, selected, f"{VOCODER_FILE} {what}")

    def run(probe: Probe, args: list, kwargs: dict) -> Any:
        return model(args[0])

    return Official(model, f"official:ltx_core {VOCODER_FILE} {what}", run)
