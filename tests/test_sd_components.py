"""Stable Diffusion 1.5's VAE (sd-vae) and CLIP text encoder (clip-text): the LDM single file and
the Diffusers pipeline folder are real (the reference libraries' own loaders read them exactly),
each family takes only its own part of the single file, and both sources of both families
convert to MLX and pass per-layer verification in float32 and bfloat16."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vidport.converter.convert import convert, plan_conversion
from vidport.converter.core.errors import VidportError
from vidport.golden.verify import verify
from fixtures.references import assert_names_reference

CLIP_HEADS = {"num_attention_heads": 4}  # an LDM file does not say; the small test model has 4


@pytest.fixture(scope="module")
def sd_sources(tmp_path_factory) -> dict[str, Path]:
    from fixtures.sd import write_sd_pipeline, write_sd_single_file, write_standalone_ldm_vae

    root = tmp_path_factory.mktemp("sd15")
    return {
        "ldm": write_sd_single_file(root / "v1-5-small.safetensors", seed=0),
        "ldm-ckpt": write_sd_single_file(root / "v1-5-small.ckpt", seed=0, fmt="ckpt"),
        "ldm-no-text-model": write_sd_single_file(root / "old.safetensors", seed=0, text_model_segment=False),
        "vae-alone": write_standalone_ldm_vae(root / "vae-ft-small.safetensors", seed=0),
        "pipeline": write_sd_pipeline(root / "pipeline", seed=3),
        "pipeline-old-vae": write_sd_pipeline(root / "pipeline-old", seed=0, deprecated_vae_attention=True),
    }


def config_dir(tmp_path: Path, name: str, config: dict) -> str:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def assert_same_tensors(loaded: dict, expected: dict) -> None:
    assert set(loaded) == set(expected)
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_ldm_single_file_is_real(sd_sources, tmp_path):
    """diffusers reads every component of the fixture, maps every key, and leaves nothing unloaded."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file import load_single_file_sub_model
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint)
    from safetensors.torch import load_file

    from fixtures.sd import CLIP_TEXT_CONFIG, SD_UNET_CONFIG, SD_VAE_CONFIG

    path = str(sd_sources["ldm"])
    state = load_file(path)
    vae = AutoencoderKL.from_single_file(path, config=config_dir(tmp_path, "vae", {"_class_name": "AutoencoderKL",
                                                                                  **SD_VAE_CONFIG}))
    assert_same_tensors(vae.state_dict(), convert_ldm_vae_checkpoint(state, SD_VAE_CONFIG))
    unet = UNet2DConditionModel.from_single_file(path, config=config_dir(tmp_path, "unet", SD_UNET_CONFIG))
    assert_same_tensors(unet.state_dict(), convert_ldm_unet_checkpoint(state, SD_UNET_CONFIG))
    # the text encoder goes the way StableDiffusionPipeline.from_single_file takes it
    clip = load_single_file_sub_model("transformers", "CLIPTextModel", "", state, None, False,
                                      config_dir(tmp_path, "clip", CLIP_TEXT_CONFIG), local_files_only=True)
    converted = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(state).items()}
    assert converted.pop("embeddings.position_ids").tolist() == [list(range(77))]  # a buffer transformers rebuilds
    assert_same_tensors(clip.state_dict(), converted)


def test_old_diffusers_vae_folder_is_real(sd_sources):
    """diffusers still reads VAE folders with the pre-0.14 attention names (query/key/value/proj_attn)."""
    from diffusers import AutoencoderKL

    old = AutoencoderKL.from_pretrained(sd_sources["pipeline-old-vae"] / "vae").state_dict()
    from fixtures.sd import sd_components

    assert_same_tensors(old, sd_components(0)[0].state_dict())


SOURCES = [("sd-vae", "ldm", {}), ("sd-vae", "pipeline/vae", {}),
           ("clip-text", "ldm", CLIP_HEADS), ("clip-text", "pipeline/text_encoder", {})]


def source_path(sd_sources, name: str) -> Path:
    head, _, sub = name.partition("/")
    return sd_sources[head] / sub if sub else sd_sources[head]


@pytest.mark.parametrize("family,source,overrides", SOURCES, ids=[f"{f}-{s}" for f, s, _ in SOURCES])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_convert_and_verify(sd_sources, family, source, overrides, dtype, tmp_path):
    plan = plan_conversion(source_path(sd_sources, source), "mlx", family, dtype, overrides)
    assert convert(plan, tmp_path / "out")["dtype"] == dtype
    report = verify(tmp_path / "out", frames=1)
    assert report.passed, report.first_failure
    assert_names_reference(report, tmp_path / "out")
    assert not report.not_in_port and len(report.layers) >= (200 if family == "sd-vae" else 30)
    worst = min(r.local["pcc"] for r in report.layers)
    assert worst >= (0.99999 if dtype == "float32" else 0.999)


def test_each_family_takes_its_own_sub_tree(sd_sources):
    """The single file holds three models: a named family takes its sub-tree and says so; the
    rest is neither mapped nor reported as unmatched. Without a family the file is ambiguous."""
    from diffusers import AutoencoderKL

    vae = plan_conversion(sd_sources["ldm-ckpt"], "mlx", "sd-vae")
    assert vae.detected.spec.name == "sd-vae/ldm" and vae.variant.startswith("kl-f8")
    assert any("sub-tree 'first_stage_model.'" in w for w in vae.detected.tensors.wrappers)
    assert vae.detected.tensors.skipped == ["global_step (int)"]
    assert len(vae.canonical.recipes) == len(AutoencoderKL(**vae.config).state_dict())
    clip = plan_conversion(sd_sources["ldm"], "mlx", "clip-text", overrides=CLIP_HEADS)
    assert clip.detected.spec.name == "clip-text/ldm" and clip.config["hidden_size"] == 64
    assert [k for k, _ in clip.canonical.dropped] == ["text_model.embeddings.position_ids"]
    with pytest.raises(VidportError, match="ambiguous: fits .*clip-text/ldm.*sd-vae/ldm"):
        plan_conversion(sd_sources["ldm"], "mlx")


def mlx_weights(folder: Path) -> dict[str, np.ndarray]:
    import mlx.core as mx

    return {k: np.array(v) for k, v in mx.load(str(folder / "model.safetensors")).items()}


@pytest.mark.parametrize("family,variant", [("clip-text", "ldm-no-text-model"), ("sd-vae", "vae-alone"),
                                            ("sd-vae", "pipeline-old-vae")])
def test_other_layouts_give_the_same_weights(sd_sources, family, variant, tmp_path):
    """Old CLIP files without `text_model.`, a VAE released alone, and old VAE folders convert to
    exactly what the current layouts give."""
    source = sd_sources[variant] / "vae" if variant == "pipeline-old-vae" else sd_sources[variant]
    convert(plan_conversion(source, "mlx", family, overrides=CLIP_HEADS if family == "clip-text" else {}), tmp_path / "a")
    convert(plan_conversion(sd_sources["ldm"], "mlx", family, overrides=CLIP_HEADS if family == "clip-text" else {}),
            tmp_path / "b")
    a, b = mlx_weights(tmp_path / "a"), mlx_weights(tmp_path / "b")
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_ldm_to_diffusers_folders(sd_sources, tmp_path):
    """LDM -> Diffusers comes free: diffusers' and transformers' from_pretrained load the output,
    and every tensor equals what their own single-file loaders read from the source."""
    from diffusers import AutoencoderKL
    from transformers import AutoModel, CLIPTextModel

    from vidport.reference.build import load_reference

    source = sd_sources["ldm-ckpt"]
    vae_plan = plan_conversion(source, "diffusers", "sd-vae")
    convert(vae_plan, tmp_path / "vae")
    expected = load_reference("diffusers:AutoencoderKL", "from_single_file", source,
                              {"_class_name": "AutoencoderKL", **vae_plan.config}).state_dict()
    assert_same_tensors(AutoencoderKL.from_pretrained(tmp_path / "vae").state_dict(), expected)
    clip_plan = plan_conversion(source, "diffusers", "clip-text", overrides=CLIP_HEADS)
    convert(clip_plan, tmp_path / "text_encoder")
    expected = load_reference("transformers:CLIPTextModel", "from_single_file", source, clip_plan.config).state_dict()
    assert_same_tensors(CLIPTextModel.from_pretrained(tmp_path / "text_encoder").state_dict(), expected)
    assert type(AutoModel.from_pretrained(tmp_path / "text_encoder")).__name__ == "CLIPTextModel"


@pytest.fixture(scope="module")
def mlx_vae(sd_sources, tmp_path_factory):
    from vidport.runtime.loading import load_model

    out = tmp_path_factory.mktemp("vae") / "mlx"
    convert(plan_conversion(sd_sources["pipeline"] / "vae", "mlx", "sd-vae"), out)
    return load_model(out)


def test_vae_sliced_decode_equals_unsliced(mlx_vae):
    """Slices give the same frames, with peak memory set by the slice, not the whole video."""
    import mlx.core as mx

    def run(fn):
        """The output and the peak memory above what was resident before (the weights)."""
        mx.clear_cache()
        mx.reset_peak_memory()
        resident = mx.get_active_memory()
        out = fn()
        mx.eval(out)
        return np.array(out), mx.get_peak_memory() - resident

    z = mx.array(np.random.default_rng(0).standard_normal((5, 4, 4, 4), dtype=np.float32))
    (whole, whole_peak), (sliced, sliced_peak) = run(lambda: mlx_vae.decode(z)), run(lambda: mlx_vae.decode(z, 1))
    assert whole.shape == (5, 32, 32, 3)
    np.testing.assert_allclose(sliced, whole, rtol=0, atol=1e-5)
    assert sliced_peak < 0.5 * whole_peak
    np.testing.assert_allclose(np.array(mlx_vae.decode(z, slice_size=2)), whole, rtol=0, atol=1e-5)
    images = mx.array(np.random.default_rng(1).uniform(-1, 1, (3, 32, 32, 3)).astype(np.float32))
    np.testing.assert_allclose(np.array(mlx_vae.encode(images, slice_size=1).mean),
                               np.array(mlx_vae.encode(images).mean), rtol=0, atol=1e-5)


def test_vae_encode_decode_match_diffusers(sd_sources, mlx_vae):
    """The public API end to end: latent distribution and decoded frames equal diffusers'."""
    import mlx.core as mx
    from diffusers import AutoencoderKL

    reference = AutoencoderKL.from_pretrained(sd_sources["pipeline"] / "vae").eval()
    images = np.random.default_rng(2).uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        posterior = reference.encode(torch.from_numpy(images)).latent_dist
        decoded = reference.decode(posterior.mean).sample.numpy()
    ours = mlx_vae.encode(mx.array(images.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(np.array(ours.mean).transpose(0, 3, 1, 2), posterior.mean.numpy(), atol=1e-4)
    np.testing.assert_allclose(np.array(ours.logvar).transpose(0, 3, 1, 2), posterior.logvar.numpy(), atol=1e-4)
    np.testing.assert_allclose(np.array(mlx_vae.decode(ours.mean)).transpose(0, 3, 1, 2), decoded, atol=1e-4)


def test_vae_decode_on_two_threads_matches_diffusers(sd_sources, mlx_vae, monkeypatch):
    """Frames decoded one slice at a time, two slices at once on two threads (runtime.cpu_threads,
    as where the native kernels cannot be built), equal diffusers' decode of all of them."""
    import mlx.core as mx
    from diffusers import AutoencoderKL

    from vidport.runtime import cpu_threads

    monkeypatch.setattr(cpu_threads.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(cpu_threads.native, "load", lambda: None)
    assert cpu_threads.workers_for(4) == 2
    reference = AutoencoderKL.from_pretrained(sd_sources["pipeline"] / "vae").eval()
    z = np.random.default_rng(3).standard_normal((4, 4, 4, 4)).astype(np.float32)
    with torch.no_grad():
        decoded = reference.decode(torch.from_numpy(z)).sample.numpy()
    ours = mlx_vae.decode(mx.array(z.transpose(0, 2, 3, 1)), slice_size=1)
    np.testing.assert_allclose(np.array(ours).transpose(0, 3, 1, 2), decoded, atol=1e-4)


def test_clip_encodes_a_prompt_as_transformers_does(sd_sources, tmp_path):
    """Tokenized prompts through the pipeline's own tokenizer: hidden states and the pooled output
    (end-of-text state) equal transformers', with and without a padding mask."""
    import mlx.core as mx
    from transformers import CLIPTextModel, CLIPTokenizer

    from vidport.runtime.loading import load_model

    folder = sd_sources["pipeline"]
    convert(plan_conversion(folder / "text_encoder", "mlx", "clip-text"), tmp_path / "mlx")
    ours = load_model(tmp_path / "mlx")
    reference = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    tokens = CLIPTokenizer.from_pretrained(folder / "tokenizer")(["a cat", "a dog and a cat"], padding="max_length",
                                                                  max_length=77, return_tensors="np")
    ids, mask = tokens.input_ids, tokens.attention_mask
    for attention_mask in (None, mask):
        with torch.no_grad():
            expected = reference(torch.from_numpy(ids), attention_mask=None if attention_mask is None
                                 else torch.from_numpy(attention_mask))
        last, pooled = ours(mx.array(ids), attention_mask=None if attention_mask is None else mx.array(attention_mask))
        np.testing.assert_allclose(np.array(pooled), expected.pooler_output.numpy(), atol=1e-4)
        np.testing.assert_allclose(np.array(last), expected.last_hidden_state.numpy(), atol=1e-4)


def test_select_prefix_in_the_spec_language(tmp_path):
    from vidport.converter.checkpoint import unwrap
    from vidport.converter.spec import SpecError, load_source_spec

    class Ref:
        shape = (1,)

        def load(self):
            return np.zeros(1)

    tree = {"state_dict": {"vae.a": Ref(), "vae.b": Ref(), "unet.c": Ref()}, "epoch": 1}
    found = unwrap(tree, ["state_dict"], [], ["first_stage_model.", "vae."])
    assert set(found.refs) == {"a", "b"} and "sub-tree 'vae.' (1 other tensors left to other models)" in found.wrappers
    assert set(unwrap(tree, ["state_dict"], [], ["first_stage_model.", ""]).refs) == {"vae.a", "vae.b", "unet.c"}
    with pytest.raises(VidportError, match="no key starts with 'x.'"):
        unwrap(tree, ["state_dict"], [], ["x."])
    spec = tmp_path / "s.yaml"
    spec.write_text("spec: t/x\nversion: 1\nfamily: t\nsource: x\nunwrap:\n  select_prefix: 3\nrules: []\n")
    with pytest.raises(SpecError, match=r"s\.yaml:6: .*select_prefix"):
        load_source_spec(spec)
    spec.write_text("spec: t/x\nversion: 1\nfamily: t\nsource: x\nunwrap:\n  select_prefix: a.\nrules: []\n")
    assert load_source_spec(spec).select_prefixes == ["a."]
