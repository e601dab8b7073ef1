"""Issue 16, the SD demo: `--cache-style sd_demo` writes the model cache tt-metal's Stable Diffusion
1.4 demo (tenstorrent/tt-metal, models/demos/wormhole/stable_diffusion) builds, so its
`preprocess_model_parameters` call loads our files instead of rebuilding them from torch.

What the demo does, re-derived here from its code (not from our specs):

* `custom_preprocessing.py` `custom_preprocessor(model, name)` (the same rules, with a mesh mapper,
  in `tests/custom_preprocessing_dp.py` `custom_preprocessor`), dispatching on the torch module
  class: `nn.GroupNorm` weight and bias as they are; `nn.Conv2d` weight `torch.permute(w, (2, 3, 0,
  1))` and bias as it is; `nn.Linear` / `nn.LayerNorm` `weight.T.contiguous()` (a 1-D LayerNorm
  weight is its own transpose) and the bias, each unsqueezed in front to 4-D; every one
  `ttnn.from_torch(..., dtype=ttnn.bfloat16, layout=ttnn.TILE_LAYOUT)`.
* the name: `tests/test_unet_2d_condition_model.py` and `tests/sd_test_infra.py` `SDTestInfra`
  call `preprocess_model_parameters(model_name="CompVis/stable-diffusion-v1-4", ...)` with no
  version (demo/demo.py's call passes no model_name: no cache at all).
* ttnn `model_preprocessing.py` `from_torch`: the cache folder is `ttnn.CONFIG.model_cache_path /
  model_name.replace("/", "_")`, a hit when its `version.txt`'s first line equals `version` (the
  tt-metal checkout's `git_hash()` when none is given); `convert_torch_model_to_ttnn_model` keeps a
  module's dict from the custom preprocessor, else recurses, keeping every `nn.ModuleList` entry;
  `_dump_parameters` writes `<module path>/<param>.tensorbin`.
* the model files undo the conv permutation when they build
  (`tt/ttnn_functional_unet_2d_condition_model_new_conv.py` `permute_conv_weights`,
  `tt/ttnn_functional_transformer_2d_new_conv.py` `permute_conv_parameters` for the 1x1
  proj_in / proj_out) and pack group norms themselves (`create_group_norm_weight_bias_rm`), so the
  cache holds neither packed norms nor masks.

The checks run ttnn itself (mock cluster, no card): its own `preprocess_model_parameters` with the
rules above dumps the reference tree, and loads ours."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from vidport.converter.convert import convert, plan_conversion
from vidport.converter.core.errors import VidportError

ROOT = Path(__file__).resolve().parent.parent
DEMO_NAME = "CompVis/stable-diffusion-v1-4"  # tests/test_unet_2d_condition_model.py, tests/sd_test_infra.py
DEMO_FOLDER = DEMO_NAME.replace("/", "_")  # ttnn model_preprocessing.from_torch
DEMO_CLASSES = (nn.Conv2d, nn.GroupNorm, nn.Linear, nn.LayerNorm)  # what custom_preprocessor handles


def demo_layout(module: nn.Module, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """One parameter as custom_preprocessing.py custom_preprocessor leaves it (before from_torch)."""
    if isinstance(module, nn.Conv2d):
        return tensor.permute(2, 3, 0, 1) if name == "weight" else tensor
    if isinstance(module, nn.GroupNorm):
        return tensor
    if isinstance(module, (nn.Linear, nn.LayerNorm)):
        tensor = tensor.T.contiguous() if tensor.ndim == 2 else tensor
        while tensor.ndim < 4:
            tensor = tensor.unsqueeze(0)
        return tensor
    raise AssertionError(f"custom_preprocessor does not handle {type(module).__name__}")


def demo_preprocessor(ttnn):
    """custom_preprocessor's rules as the function preprocess_model_parameters calls per module."""

    def preprocess(model: nn.Module, name: str) -> dict:
        if not isinstance(model, DEMO_CLASSES):
            return {}
        return {p: ttnn.from_torch(demo_layout(model, p, t.detach()), dtype=ttnn.bfloat16, layout=ttnn.TILE_LAYOUT)
                for p, t in model.named_parameters(recurse=False)}

    return preprocess


def expected_files(model: nn.Module, folder: str) -> dict[str, tuple[nn.Module, str, torch.Tensor]]:
    """`<folder>/<module path>/<param>.tensorbin` -> (module, param, tensor) for every parameter
    (_dump_parameters' naming); every parameter belongs to a module custom_preprocessor handles."""
    found = {}
    for path, module in model.named_modules():
        for param, tensor in module.named_parameters(recurse=False):
            assert isinstance(module, DEMO_CLASSES), f"{path}.{param}: {type(module).__name__}"
            found[f"{folder}/{path.replace('.', '/')}/{param}.tensorbin"] = (module, param, tensor.detach())
    return found


def rule_problems(ttnn, out: Path, model: nn.Module, folder: str) -> list[str]:
    """What in `out` differs from the rules: missing or extra files, dtype, layout, shape, values
    (the diffusers tensor through the demo's layout, rounded to bfloat16 as from_torch does)."""
    expected = expected_files(model, folder)
    found = {str(p.relative_to(out)) for p in (out / folder).rglob("*.tensorbin")}
    problems = [f"missing {p}" for p in sorted(set(expected) - found)]
    problems += [f"extra {p}" for p in sorted(found - set(expected))]
    for relative in sorted(set(expected) & found):
        module, param, tensor = expected[relative]
        want = demo_layout(module, param, tensor).to(torch.bfloat16)
        loaded = ttnn.load_tensor(str(out / relative))
        if loaded.dtype != ttnn.bfloat16 or loaded.layout != ttnn.TILE_LAYOUT:
            problems.append(f"{relative}: {loaded.dtype} {loaded.layout}, not bfloat16 TILE")
        elif list(loaded.shape) != list(want.shape):
            problems.append(f"{relative}: shape {list(loaded.shape)}, the demo's is {list(want.shape)}")
        elif not torch.equal(ttnn.to_torch(loaded), want):
            problems.append(f"{relative}: values differ from the demo's layout of the diffusers tensor")
    return problems


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) + ("/" if p.is_dir() else "") for p in root.rglob("*")}


def manifest(out: Path) -> dict:
    return json.loads((out / "ttnn_manifest.json").read_text())


def same_parameters(ttnn, a, b, where: str = "") -> list[str]:
    """Differences between two preprocessed parameter trees (an empty dict and an empty list alike:
    ttnn reloads an empty folder, a Dropout's, as an empty list)."""
    if isinstance(a, ttnn.Tensor) or isinstance(b, ttnn.Tensor):
        if not (isinstance(a, ttnn.Tensor) and isinstance(b, ttnn.Tensor)):
            return [f"{where}: {type(a).__name__} vs {type(b).__name__}"]
        same = a.dtype == b.dtype and a.layout == b.layout and torch.equal(ttnn.to_torch(a), ttnn.to_torch(b))
        return [] if same else [where]
    keys_a = list(a.keys()) if hasattr(a, "keys") else list(range(len(a)))
    keys_b = list(b.keys()) if hasattr(b, "keys") else list(range(len(b)))
    if sorted(map(str, keys_a)) != sorted(map(str, keys_b)):
        return [f"{where}: {sorted(map(str, keys_a))} vs {sorted(map(str, keys_b))}"]
    return [p for k in keys_a for p in same_parameters(ttnn, a[k], b[k], f"{where}.{k}")]


class NotCalled(Exception):
    pass


def no_model():
    raise NotCalled("preprocess_model_parameters wanted the torch model: the cache was not a hit")


@pytest.fixture()
def model_cache(ttnn):
    """ttnn.CONFIG's cache settings, restored after the test."""
    saved = (ttnn.CONFIG.model_cache_path, ttnn.CONFIG.enable_model_cache)
    ttnn.CONFIG.enable_model_cache = True
    yield ttnn.CONFIG
    ttnn.CONFIG.model_cache_path, ttnn.CONFIG.enable_model_cache = saved


# --------------------------------------------------------------------------- the SD 1.5 UNet


@pytest.fixture(scope="module")
def unet():
    """The diffusers UNet the LDM single file below holds (fixtures.sd, seed 0)."""
    from fixtures.sd import sd_components

    return sd_components(0)[2]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    from fixtures.sd import write_sd_single_file

    return write_sd_single_file(tmp_path_factory.mktemp("sd-demo-src") / "v1-5.safetensors", seed=0)


@pytest.fixture(scope="module")
def ours(source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sd-demo") / "unet"
    convert(plan_conversion(source, "ttnn", family="sd15-unet", target_options={"cache_style": "sd_demo"}), out)
    return out


@pytest.fixture(scope="module")
def theirs(ttnn, unet, tmp_path_factory) -> Path:
    """ttnn's own dump of the diffusers UNet through the demo's rules (the cache the demo's test writes)."""
    from ttnn.model_preprocessing import preprocess_model_parameters

    root = tmp_path_factory.mktemp("sd-demo-theirs")
    saved = (ttnn.CONFIG.model_cache_path, ttnn.CONFIG.enable_model_cache)
    try:
        ttnn.CONFIG.model_cache_path, ttnn.CONFIG.enable_model_cache = root, True
        preprocess_model_parameters(model_name=DEMO_NAME, version="theirs", initialize_model=lambda: unet,
                                    custom_preprocessor=demo_preprocessor(ttnn))
    finally:
        ttnn.CONFIG.model_cache_path, ttnn.CONFIG.enable_model_cache = saved
    return root


def test_every_parameter_as_the_demo_leaves_it(ttnn, ours, unet):
    """Names, dtype, layout, shape and values of all 684 files, from the rules alone."""
    assert rule_problems(ttnn, ours, unet, DEMO_FOLDER) == []
    assert len(expected_files(unet, DEMO_FOLDER)) == len(manifest(ours)["tensors"]) == 684
    conv, proj, norm = (f"{DEMO_FOLDER}/{p}" for p in ("conv_in/weight.tensorbin",
                                                       "down_blocks/0/attentions/0/proj_in/weight.tensorbin",
                                                       "down_blocks/0/resnets/0/norm1/weight.tensorbin"))
    assert list(ttnn.load_tensor(str(ours / conv)).shape) == [3, 3, 32, 4]  # [kh, kw, O, I]
    assert list(ttnn.load_tensor(str(ours / proj)).shape) == [1, 1, 32, 32]  # a 1x1 conv, not a linear
    assert list(ttnn.load_tensor(str(ours / norm)).shape) == [32]  # raw, no packing and no mask


def test_tree_and_bytes_are_ttnns_own_dump(ours, theirs):
    """Folder for folder (empty Dropout folders included) and byte for byte, what ttnn writes."""
    assert tree(ours / DEMO_FOLDER) == tree(theirs / DEMO_FOLDER)
    assert "down_blocks/0/attentions/0/transformer_blocks/0/attn1/to_out/1/" in tree(ours / DEMO_FOLDER)
    different = [p for p in tree(theirs / DEMO_FOLDER) if p.endswith(".tensorbin")
                 and (ours / DEMO_FOLDER / p).read_bytes() != (theirs / DEMO_FOLDER / p).read_bytes()]
    assert different == []
    style = manifest(ours)["cache_style"]
    assert style["model_name"] == DEMO_NAME and style["folder"] == DEMO_FOLDER and style["model_cache_path"] == "."
    assert (ours / DEMO_FOLDER / "version.txt").read_text() == style["version"]  # no newline


def test_the_demos_call_is_a_cache_hit(ttnn, ours, unet, model_cache, monkeypatch):
    """preprocess_model_parameters with the demo's name and our version loads our files without the
    torch model, and gives what it gives from the torch model; with the version omitted it compares
    the tt-metal checkout's git hash (so writing that hash into version.txt needs no code change)."""
    import ttnn.model_preprocessing as preprocessing

    model_cache.enable_model_cache = False
    built = preprocessing.preprocess_model_parameters(initialize_model=lambda: unet,
                                                      custom_preprocessor=demo_preprocessor(ttnn))
    model_cache.enable_model_cache = True
    model_cache.model_cache_path = ours
    version = manifest(ours)["cache_style"]["version"]
    loaded = preprocessing.preprocess_model_parameters(model_name=DEMO_NAME, version=version, initialize_model=no_model,
                                                       custom_preprocessor=demo_preprocessor(ttnn))
    assert same_parameters(ttnn, loaded, built) == []
    assert list(loaded.down_blocks[0].attentions[0].transformer_blocks[0].ff.net[2].weight.shape) == [1, 1, 128, 32]
    monkeypatch.setattr(preprocessing, "git_hash", lambda: version)
    assert preprocessing.preprocess_model_parameters(model_name=DEMO_NAME, initialize_model=no_model).conv_in


def test_linear_projection_unet_gets_linears(ttnn, tmp_path):
    """With use_linear_projection (SD 2.x-style), diffusers builds proj_in / proj_out as nn.Linear, and
    custom_preprocessor makes them 4-D linears: [1, 1, in, out], the transpose of the conv layout."""
    from diffusers import UNet2DConditionModel

    from fixtures.sd import SD_UNET_CONFIG, randomize

    unet = randomize(UNet2DConditionModel(**{**SD_UNET_CONFIG, "use_linear_projection": True}), 5)
    unet.save_pretrained(str(tmp_path / "unet"))
    assert isinstance(unet.down_blocks[0].attentions[0].proj_in, nn.Linear)
    convert(plan_conversion(tmp_path / "unet", "ttnn", family="sd15-unet", target_options={"cache_style": "sd_demo"}),
            tmp_path / "out")
    assert rule_problems(ttnn, tmp_path / "out", unet, DEMO_FOLDER) == []


# --------------------------------------------------------------------------- planted faults


def test_planted_wrong_permutation_fails(ttnn, source, unet, tmp_path, monkeypatch):
    """The family's sd_demo table with (2, 3, 1, 0) in place of the demo's (2, 3, 0, 1)."""
    mappings = tmp_path / "mappings"
    shutil.copytree(ROOT / "mappings", mappings)
    family = mappings / "sd15-unet" / "family.yaml"
    text = family.read_text()
    assert text.count("{permute: [2, 3, 0, 1]}") == 2
    family.write_text(text.replace("{permute: [2, 3, 0, 1]}", "{permute: [2, 3, 1, 0]}"))
    monkeypatch.setenv("VIDPORT_MAPPINGS", str(mappings))
    out = tmp_path / "out"
    convert(plan_conversion(source, "ttnn", family="sd15-unet", target_options={"cache_style": "sd_demo"}), out)
    problems = rule_problems(ttnn, out, unet, DEMO_FOLDER)
    assert f"{DEMO_FOLDER}/conv_in/weight.tensorbin: shape [3, 3, 4, 32], the demo's is [3, 3, 32, 4]" in problems
    assert any(p.endswith("proj_in/weight.tensorbin: values differ from the demo's layout of the diffusers tensor")
               for p in problems)  # square 1x1 convs keep their shape: the values say it


def test_planted_missing_file_and_wrong_version_fail(ttnn, ours, unet, tmp_path, model_cache):
    out = tmp_path / "out"
    shutil.copytree(ours, out)
    (out / DEMO_FOLDER / "mid_block/attentions/0/proj_out/bias.tensorbin").unlink()
    assert rule_problems(ttnn, out, unet, DEMO_FOLDER) == [
        f"missing {DEMO_FOLDER}/mid_block/attentions/0/proj_out/bias.tensorbin"]
    from ttnn.model_preprocessing import preprocess_model_parameters

    model_cache.model_cache_path = out
    with pytest.raises(NotCalled):
        preprocess_model_parameters(model_name=DEMO_NAME, version="another", initialize_model=no_model)


def test_refusals_name_the_way_out(source, tmp_path):
    with pytest.raises(VidportError, match="family sd-vae declares no sd_demo layouts") as err:
        convert(plan_conversion(source, "ttnn", family="sd-vae", target_options={"cache_style": "sd_demo"}),
                tmp_path / "vae")
    assert "animatediff-motion, sd15-unet" in err.value.hint
    with pytest.raises(VidportError, match="stores every tensor bfloat16"):
        convert(plan_conversion(source, "ttnn", family="sd15-unet",
                                target_options={"cache_style": "sd_demo", "dtype": "bfloat8_b"}), tmp_path / "bf8")
    assert not (tmp_path / "vae").exists() and not (tmp_path / "bf8").exists()


def test_a_bad_style_entry_names_its_line(tmp_path):
    from vidport.converter.spec import SpecError, load_catalog

    mappings = tmp_path / "mappings"
    shutil.copytree(ROOT / "mappings", mappings)
    family = mappings / "sd15-unet" / "family.yaml"
    family.write_text(family.read_text().replace("conv2d.bias: {transforms: [], layout: TILE",
                                                 "conv2d.bias: {transforms: [], layot: TILE"))
    with pytest.raises(SpecError, match=r"sd15-unet/family.yaml:\d+: targets.ttnn.styles.sd_demo.roles.conv2d.bias: "
                                        r"unknown field\(s\) \['layot'\]"):
        load_catalog(mappings)


# --------------------------------------------------------------------------- AnimateDiff


def test_motion_modules_as_the_demos_rules_leave_them(ttnn, tmp_path, model_cache):
    """The same rules on diffusers' MotionAdapter: the temporal transformers' proj_in / proj_out are
    nn.Linear (4-D [1, 1, in, out], unlike the UNet's 1x1 convs), norms raw / 4-D, no position
    table (a buffer, not a parameter); cached under the family's name; ttnn's own dump again."""
    from fixtures.motion import motion_adapter_config, random_motion_adapter, write_original_motion_module
    from ttnn.model_preprocessing import preprocess_model_parameters

    write_original_motion_module(tmp_path / "mm.ckpt", "v2", seed=0)
    adapter = random_motion_adapter(motion_adapter_config("v2"), 0)
    out = tmp_path / "out"
    convert(plan_conversion(tmp_path / "mm.ckpt", "ttnn", target_options={"cache_style": "sd_demo"}), out)
    style = manifest(out)["cache_style"]
    assert style["model_name"] == style["folder"] == "animatediff-motion"
    assert rule_problems(ttnn, out, adapter, "animatediff-motion") == []
    proj_in = ttnn.load_tensor(str(out / "animatediff-motion/down_blocks/0/motion_modules/0/proj_in/weight.tensorbin"))
    assert list(proj_in.shape) == [1, 1, 32, 32] and not any("pos_embed" in p for p in tree(out))

    model_cache.model_cache_path = tmp_path / "theirs"
    preprocess_model_parameters(model_name="animatediff-motion", version="theirs", initialize_model=lambda: adapter,
                                custom_preprocessor=demo_preprocessor(ttnn))
    theirs = tmp_path / "theirs" / "animatediff-motion"
    assert tree(out / "animatediff-motion") == tree(theirs)
    model_cache.model_cache_path = out
    loaded = preprocess_model_parameters(model_name="animatediff-motion", version=style["version"],
                                         initialize_model=no_model)
    model_cache.model_cache_path = tmp_path / "theirs"
    reference = preprocess_model_parameters(model_name="animatediff-motion", version="theirs", initialize_model=no_model)
    assert same_parameters(ttnn, loaded, reference) == []
