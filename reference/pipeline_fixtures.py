"""Small AnimateDiff sources for tests and the demo: a complete Diffusers SD 1.5 pipeline folder
(unet/, vae/, text_encoder/, tokenizer/, scheduler/, model_index.json, as the Hub ships it), a
tokenizer folder to go with an LDM single file, and an input image. Random weights; nothing is
downloaded (the tokenizer is sd_fixtures' tiny BPE vocabulary)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json
SD15_SCHEDULER = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
                  "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
                  "clip_sample": False}


def write_tokenizer(folder: Path) -> Path:
    """The tiny CLIP tokenizer as save_pretrained writes it (the folder `--tokenizer` takes)."""
    from vidport.reference.sd_fixtures import tiny_clip_tokenizer

    tiny_clip_tokenizer().save_pretrained(str(folder))
    return Path(folder)


def write_sd_pipeline_folder(folder: Path, seed: int = 0) -> Path:
    """A whole Diffusers SD 1.5 pipeline folder holding the same models as
    `sd_fixtures.write_sd_single_file(seed=seed)`."""
    from vidport.reference.sd_fixtures import sd_components, write_sd_pipeline

    folder = Path(folder)
    write_sd_pipeline(folder, seed)
    _, _, unet = sd_components(seed)
    unet.save_pretrained(str(folder / "unet"))
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER, indent=2))
    index = json.loads((folder / "model_index.json").read_text())
    index.update({"unet": ["diffusers", "UNet2DConditionModel"], "scheduler": ["diffusers", "PNDMScheduler"],
                  "safety_checker": [None, None], "feature_extractor": [None, None]})
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def sample_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A deterministic RGB uint8 image (height, width, 3): smooth gradients plus a little seeded
    texture, so the VAE sees structure at every scale."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rng = np.random.default_rng(seed)
    channels = [0.5 + 0.5 * np.sin(x / width * 6.3 + 1.0), 0.5 + 0.5 * np.cos(y / height * 6.3),
                (x + y) / (height + width)]
    image = np.stack(channels, axis=-1) + 0.1 * rng.standard_normal((height, width, 3))
    return (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)


def write_sample_image(path: Path, height: int, width: int, seed: int = 0) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sample_image(height, width, seed)).save(path)
    return path
