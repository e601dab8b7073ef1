"""The wan-vae family: every source layout is real (read by diffusers' own loader, or by the
official Wan code), converts to MLX, and passes per-layer verify against diffusers at float32 and
bfloat16; the MLX encode/decode loops reproduce diffusers' temporal feature cache exactly."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vidport.converter.convert import convert, plan_conversion
from vidport.converter.core.errors import VidportError
from vidport.golden.verify import verify
from fixtures.motion import write_config_folder
from fixtures.references import assert_names_reference
from fixtures.wan_vae import official_vae, wan_vae_config, write_diffusers_vae, write_native_vae

SOURCES = {"native-2.1": ("2.1", "Wan2.1_VAE.pth"), "native-2.2": ("2.2", "Wan2.2_VAE.pth"),
           "diffusers-2.1": ("2.1", "vae-2.1"), "diffusers-2.2": ("2.2", "vae-2.2")}


@pytest.fixture(scope="module")
def wan_vae_sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("wan_vae")
    found = {}
    for seed, (name, (version, file)) in enumerate(SOURCES.items()):
        found[name] = root / file
        writer = write_native_vae if name.startswith("native") else write_diffusers_vae
        writer(found[name], version, seed=seed)
    return found


@pytest.fixture(scope="module")
def mlx_models(wan_vae_sources, tmp_path_factory) -> dict[str, Path]:
    """Each source converted to MLX at float32 (the cache tests load these)."""
    root = tmp_path_factory.mktemp("wan_vae_mlx")
    for name, path in wan_vae_sources.items():
        convert(plan_conversion(path, "mlx"), root / name)
    return {name: root / name for name in wan_vae_sources}


# ---------------------------------------------------------------- the sources are real


def test_native_21_layout_is_real(wan_vae_sources, tmp_path):
    """diffusers' from_single_file reads every key of the native 2.1 file, misses none, and the
    tensors equal the file's under our mapping."""
    from diffusers import AutoencoderKLWan

    config = wan_vae_config("2.1")
    folder = write_config_folder(tmp_path, "AutoencoderKLWan", config)
    model = AutoencoderKLWan.from_single_file(str(wan_vae_sources["native-2.1"]), config=str(folder),
                                              local_files_only=True)
    plan = plan_conversion(wan_vae_sources["native-2.1"], "diffusers")
    loaded = model.state_dict()
    assert set(plan.final.recipes) == set(loaded)
    source = torch.load(wan_vae_sources["native-2.1"], weights_only=True)
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    assert set(convert_wan_vae_to_diffusers(dict(source))) == set(loaded)  # no missing, no unexpected keys
    for canonical, recipe in plan.canonical.recipes.items():
        assert torch.equal(loaded[canonical], source[recipe.inputs[0]]), canonical


def test_native_22_layout_is_real(wan_vae_sources, tmp_path):
    """The official Wan 2.2 module loads the native 2.2 file strictly; diffusers' loader cannot."""
    from diffusers import AutoencoderKLWan

    state = torch.load(wan_vae_sources["native-2.2"], weights_only=True)
    official_vae("2.2", wan_vae_config("2.2")).load_state_dict(state, strict=True)
    folder = write_config_folder(tmp_path, "AutoencoderKLWan", wan_vae_config("2.2"))
    with pytest.raises(ValueError, match="expected shape .* but got"):  # a shape error, not some other failure
        AutoencoderKLWan.from_single_file(str(wan_vae_sources["native-2.2"]), config=str(folder), local_files_only=True)


@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_reference_equals_official_code(wan_vae_sources, version):
    """The diffusers model built from the native file (verify's reference for 2.1, from_single_file;
    for 2.2, which diffusers cannot read, the self-mapped model of `verify --self-mapped` and of the
    cache tests below) encodes and decodes exactly as the official Wan code does on that file."""
    from vidport.reference.build import load_reference

    path = wan_vae_sources[f"native-{version}"]
    plan = plan_conversion(path, "mlx")
    loader = {"2.1": "from_single_file", "2.2": "from_mapping"}[version]
    assert plan.detected.spec.reference == {"2.1": "from_single_file", "2.2": "official"}[version]
    config = {"_class_name": "AutoencoderKLWan", **{k: v for k, v in plan.config.items() if not k.startswith("_")}}
    reference = load_reference("diffusers:AutoencoderKLWan", loader, path, config)
    official = official_vae(version, wan_vae_config(version))
    official.load_state_dict(torch.load(path, weights_only=True), strict=True)
    factor = plan.config["scale_factor_spatial"]
    generator = torch.Generator().manual_seed(0)
    video = torch.rand((1, 3, 5, 2 * factor, 3 * factor), generator=generator) * 2 - 1
    latents = torch.randn((1, plan.config["z_dim"], 3, 2, 3), generator=generator)
    with torch.no_grad():
        mean = reference.encode(video).latent_dist.mean
        assert torch.allclose(mean, official.encode(video, [0.0, 1.0]), atol=1e-5)
        decoded = reference.decode(latents).sample
        assert torch.allclose(decoded, official.decode(latents, [0.0, 1.0]).clamp(-1, 1), atol=1e-5)


def test_native_to_diffusers_folder(wan_vae_sources, tmp_path):
    """Native 2.2 -> Diffusers folder (diffusers has no loader for it): from_pretrained reads it,
    and the model it builds decodes as the official Wan 2.2 code does on the native file."""
    from diffusers import AutoencoderKLWan

    convert(plan_conversion(wan_vae_sources["native-2.2"], "diffusers"), tmp_path / "vae")
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKLWan" and config["is_residual"] and config["patch_size"] == 2
    assert len(config["latents_mean"]) == 48
    model = AutoencoderKLWan.from_pretrained(tmp_path / "vae").eval()
    official = official_vae("2.2", wan_vae_config("2.2"))
    official.load_state_dict(torch.load(wan_vae_sources["native-2.2"], weights_only=True), strict=True)
    latents = torch.randn((1, 48, 2, 2, 3), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = official.decode(latents, [0.0, 1.0]).clamp(-1, 1)
        assert torch.allclose(model.decode(latents).sample, expected, atol=1e-5)


def test_detection_and_config(wan_vae_sources):
    specs = {name: plan_conversion(path, "mlx") for name, path in wan_vae_sources.items()}
    assert specs["native-2.1"].detected.spec.name == "wan-vae/native"
    assert specs["native-2.2"].detected.spec.name == "wan-vae/native-2.2"
    assert specs["diffusers-2.2"].detected.spec.name == "wan-vae/diffusers"
    for name, plan in specs.items():
        version = SOURCES[name][0]
        expected = wan_vae_config(version)
        assert {k: plan.config.get(k) for k in expected} == expected, name
    assert specs["native-2.1"].variant == "Wan 2.1 VAE" and specs["native-2.2"].variant == "Wan 2.2 VAE"


# ---------------------------------------------------------------- convert + verify per layer


@pytest.mark.parametrize("source", list(SOURCES))
def test_convert_and_verify(wan_vae_sources, source, tmp_path):
    """float32 against the live reference (saved as a golden, cache lists and all), then bfloat16
    against that golden: every chunk of every layer, local and global."""
    golden = tmp_path / "vidport.golden.safetensors"
    for dtype, floor in (("float32", 0.99999), ("bfloat16", 0.999)):
        convert(plan_conversion(wan_vae_sources[source], "mlx", dtype=dtype), tmp_path / dtype)
        report = (verify(tmp_path / dtype, frames=5, save_to=golden) if dtype == "float32"
                  else verify(tmp_path / dtype, golden=golden))
        assert report.passed, (dtype, report.first_failure)
        assert_names_reference(report, tmp_path / dtype)
        # the official 2.2 model is compared where its modules are diffusers' (320 of 556 calls)
        assert not report.not_in_port and len(report.layers) > (300 if source == "native-2.2" else 400)
        assert any(r.name.startswith("decoder.conv_in#1") for r in report.layers)  # the second latent frame
        assert min(r.local["pcc"] for r in report.layers) >= floor


# ---------------------------------------------------------------- the temporal cache


def _mlx(folder: Path):
    from vidport.runtime.loading import load_model

    return load_model(folder)


def _reference(path: Path):
    from vidport.reference.build import load_reference

    plan = plan_conversion(path, "mlx")
    config = {"_class_name": "AutoencoderKLWan", **{k: v for k, v in plan.config.items() if not k.startswith("_")}}
    loader = "from_mapping" if plan.detected.spec.reference == "official" else plan.detected.spec.reference
    return load_reference("diffusers:AutoencoderKLWan", loader, path, config), plan.config  # 2.2: proven equal above


def _channels_last(array: np.ndarray):
    import mlx.core as mx

    return mx.array(np.ascontiguousarray(np.moveaxis(array, 1, -1)))


def _numpy(array) -> np.ndarray:
    return np.moveaxis(np.array(array), -1, 1)


@pytest.mark.parametrize("source", ["native-2.1", "native-2.2"])
def test_chunked_loops_equal_diffusers(wan_vae_sources, mlx_models, source, monkeypatch):
    """Encode 9 frames (chunks of 1, 4, 4) and decode 4 latent frames (13 video frames) as
    diffusers does; a cache that forgets (one frame kept instead of CACHE_T = 2) breaks it, and
    the last chunk depends on the first latent frame only through the cache."""
    import vidport.runtime.wan_vae_blocks as blocks
    import vidport.runtime.wan_vae_conv as conv

    reference, config = _reference(wan_vae_sources[source])
    model = _mlx(mlx_models[source])
    factor, rgb = config["scale_factor_spatial"], model.rgb_channels
    rng = np.random.default_rng(1)
    video = rng.uniform(-1, 1, (1, rgb, 9, 2 * factor, 3 * factor)).astype(np.float32)
    latents = rng.standard_normal((1, config["z_dim"], 4, 2, 3)).astype(np.float32)
    with torch.no_grad():
        moments = reference.encode(torch.from_numpy(video)).latent_dist.parameters.numpy()
        decoded = reference.decode(torch.from_numpy(latents)).sample.numpy()
    assert decoded.shape[2] == 13 and moments.shape[2] == 3
    np.testing.assert_allclose(_numpy(model.encode(_channels_last(video))), moments, atol=1e-4)
    ours = _numpy(model.decode(_channels_last(latents)))
    np.testing.assert_allclose(ours, decoded, atol=1e-4)

    changed = latents.copy()
    changed[:, :, 0] += 1.0  # only the first latent frame
    later = _numpy(model.decode(_channels_last(changed)))[:, :, -4:]
    assert np.abs(later - ours[:, :, -4:]).max() > 1e-3  # information crosses chunks via the cache

    monkeypatch.setattr(conv, "CACHE_T", 1)
    monkeypatch.setattr(blocks, "CACHE_T", 1)
    forgetful = _numpy(model.decode(_channels_last(latents)))
    assert np.abs(forgetful - decoded)[:, :, 1:].max() > 1e-2


def test_uncached_decoder_is_not_the_decode(mlx_models):
    """One pass without the cache neither upsamples time nor equals the chunked decode."""
    import mlx.core as mx

    model = _mlx(mlx_models["diffusers-2.1"])
    latents = mx.array(np.random.default_rng(2).standard_normal((1, 3, 2, 3, 16)).astype(np.float32))
    assert model.decoder(model.post_quant_conv(latents)).shape[1] == 3
    assert model.decode(latents).shape[1] == 9


@pytest.mark.parametrize("frames, size, message", [(8, (16, 24), "1 \\+ 4k frames"), (6, (16, 24), "1 \\+ 4k"),
                                                   (5, (20, 24), "multiples of 8"), (5, (16, 30), "multiples of 8")])
def test_bad_video_refused_before_work(mlx_models, monkeypatch, frames, size, message):
    import mlx.core as mx

    model = _mlx(mlx_models["native-2.1"])

    def boom(*_args, **_kwargs):
        raise AssertionError("the encoder ran")

    monkeypatch.setattr(type(model.encoder), "__call__", boom)
    with pytest.raises(VidportError, match=message):
        model.encode(mx.zeros((1, frames, *size, 3)))


def test_wan22_spatial_factor_is_16(mlx_models):
    import mlx.core as mx

    with pytest.raises(VidportError, match="multiples of 16"):
        _mlx(mlx_models["native-2.2"]).encode(mx.zeros((1, 5, 16, 24, 3)))


@pytest.mark.parametrize("source", ["diffusers-2.1", "diffusers-2.2"])
def test_tiled_decode_equals_diffusers(wan_vae_sources, mlx_models, source):
    """Spatial tiling (tiles of 4 latent pixels every 3, blended) equals diffusers' tiled decode."""
    import mlx.core as mx
    from diffusers import AutoencoderKLWan
    from vidport.runtime.wan_vae_tiling import Tiling

    reference = AutoencoderKLWan.from_pretrained(wan_vae_sources[source]).eval()
    factor = reference.config.scale_factor_spatial
    reference.enable_tiling(4 * factor, 4 * factor, 3 * factor, 3 * factor)
    model = _mlx(mlx_models[source])
    model.enable_tiling(Tiling(4 * factor, 4 * factor, 3 * factor, 3 * factor))
    latents = np.random.default_rng(3).standard_normal((1, reference.config.z_dim, 2, 6, 9)).astype(np.float32)
    with torch.no_grad():
        expected = reference.decode(torch.from_numpy(latents)).sample.numpy()
    np.testing.assert_allclose(_numpy(model.decode(mx.array(np.moveaxis(latents, 1, -1)))), expected, atol=1e-4)


def test_banded_convolutions_equal_whole(mlx_models, monkeypatch):
    """Large convolutions run in bands of rows (bounded memory at 480p); forcing bands on a small
    model changes nothing."""
    import mlx.core as mx
    import vidport.runtime.wan_vae_conv as conv

    model = _mlx(mlx_models["native-2.2"])
    latents = mx.array(np.random.default_rng(4).standard_normal((1, 2, 2, 3, 48)).astype(np.float32))
    whole = np.array(model.decode(latents))
    monkeypatch.setattr(conv, "UNFOLD_BUDGET_BYTES", 4096)
    np.testing.assert_allclose(np.array(model.decode(latents)), whole, atol=1e-5)
