"""Low-memory mode (runtime.streamed_blocks): a converted LTX-2 DiT whose blocks are read from its
safetensors shards at each call computes exactly what the loaded model computes (and diffusers'
numbers), holds one block's weights at a time and none between calls, and names a missing or
truncated file before anything runs; Wan's DiT (`blocks`) streams the same way."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import vidport.runtime  # noqa: F401  (before mlx: the runtime gives MLX its fast BLAS)
from vidport.cli import app
from vidport.converter.core.errors import VidportError
from fixtures.ltx2_dit import ltx2_config, random_ltx2_transformer
from fixtures.wan_dit import write_diffusers as write_wan

CONFIG = ltx2_config("2.0", num_layers=3)
SEED = 21


def _convert(source: Path, out: Path, *options: str) -> Path:
    result = CliRunner().invoke(app, ["convert", "ltx2-dit" if "ltx" in out.name else "wan-dit", str(source),
                                      "--out", str(out), *options])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """The small DiT (3 blocks) converted in 1 MB shards, so that files split the blocks."""
    root = tmp_path_factory.mktemp("streamed")
    random_ltx2_transformer(CONFIG, SEED).save_pretrained(str(root / "transformer"))
    out = _convert(root / "transformer", root / "ltx2-mlx", "--shard-size", "1")
    assert len(list(out.glob("*.safetensors"))) >= 2
    return out


def _inputs(seed: int = 1) -> dict:
    from vidport.reference.ltx2_dit import probes

    return dict(probes(CONFIG, seed=seed)[0].kwargs)


def _run(model, kwargs: dict) -> list[np.ndarray]:
    import mlx.core as mx

    return [np.array(o) for o in model(**{k: mx.array(v) if isinstance(v, np.ndarray) else v
                                         for k, v in kwargs.items()})]


def _holds_weights(block) -> bool:
    from mlx.utils import tree_flatten

    return all(v.size > 0 for _, v in tree_flatten(block.parameters()))


def _is_empty(block) -> bool:
    from mlx.utils import tree_flatten

    return all(v.size == 0 for _, v in tree_flatten(block.parameters()))


def test_streamed_forward_is_the_loaded_forward(converted):
    """Bit for bit the normally loaded model's outputs, twice (each forward reads the blocks
    again), with STG on the last block; and diffusers' outputs as closely as the port's."""
    from vidport.runtime.loading import load_model
    from vidport.runtime.streamed_blocks import load_streamed

    kwargs = {**_inputs(), "spatio_temporal_guidance_blocks": [2], "perturbation_mask": np.array([0.0], np.float32)}
    loaded = _run(load_model(converted), kwargs)
    streamed = load_streamed(converted)
    for _ in range(2):
        outputs = _run(streamed, kwargs)
        for ours, theirs in zip(outputs, loaded):
            assert np.abs(ours - theirs).max() == 0
    reference = random_ltx2_transformer(CONFIG, SEED)
    with torch.no_grad():
        expected = reference(**{k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v
                                for k, v in kwargs.items()}, return_dict=False)
    for ours, theirs in zip(outputs, expected):
        np.testing.assert_allclose(ours, theirs.numpy(), rtol=0, atol=1e-4)


def test_one_block_is_resident_at_a_time(converted, monkeypatch):
    """While block i runs, block i alone holds weights, and MLX's peak stays below two blocks'
    worth above the other weights; after the forward no block holds weights, the other weights
    are the loaded model's, and MLX holds them and not a block's worth more."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from vidport.runtime.loading import load_model
    from vidport.runtime.ltx2.dit import LTX2VideoTransformerBlock
    from vidport.runtime.streamed_blocks import load_streamed

    reference = dict(tree_flatten(load_model(converted).parameters()))
    block_bytes = min(sum(v.nbytes for k, v in reference.items() if k.startswith(f"transformer_blocks.{i}."))
                      for i in range(CONFIG["num_layers"]))
    other_bytes = sum(v.nbytes for k, v in reference.items() if not k.startswith("transformer_blocks."))
    del reference
    before = mx.get_active_memory()
    model = load_streamed(converted)
    loaded_bytes = mx.get_active_memory() - before
    assert other_bytes <= loaded_bytes < other_bytes + block_bytes

    blocks = model.transformer_blocks
    holding = []
    call = LTX2VideoTransformerBlock.__call__

    def counted(self, *args, **kwargs):
        holding.append([i for i, b in enumerate(blocks) if _holds_weights(b)])
        assert all(_holds_weights(b) or _is_empty(b) for b in blocks)
        return call(self, *args, **kwargs)

    monkeypatch.setattr(LTX2VideoTransformerBlock, "__call__", counted)
    mx.reset_peak_memory()
    outputs = _run(model, _inputs())
    assert holding == [[0], [1], [2]]
    assert all(_is_empty(b) for b in blocks)
    # at most the other weights, one block's and this forward's activations (a third of a block)
    assert mx.get_peak_memory() - before < other_bytes + 2 * block_bytes
    assert mx.get_active_memory() - before < other_bytes + block_bytes
    expected = dict(tree_flatten(load_model(converted).parameters()))
    for name, value in tree_flatten(model.parameters()):
        if not name.startswith("transformer_blocks."):
            assert np.array_equal(np.array(value), np.array(expected[name])), name
    assert all(np.isfinite(o).all() for o in outputs)


def _copy(converted: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the folder and its shard that holds the most block tensors."""
    from vidport.runtime.loading import weight_files

    folder = tmp_path / "ltx2-mlx"
    shutil.copytree(converted, folder)
    files = [p for k, p in weight_files(folder).items() if k.startswith("transformer_blocks.")]
    return folder, max(set(files), key=files.count)


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_damaged_file_is_named_before_anything_runs(converted, tmp_path, damage):
    from vidport.runtime.streamed_blocks import load_streamed

    folder, shard = _copy(converted, tmp_path)
    if damage == "missing":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(VidportError, match=shard.name):
        load_streamed(folder)


def test_a_file_truncated_after_loading_is_named_at_its_block(converted, tmp_path):
    """The block reads its file at its call: a file damaged since is named, and the block stays empty."""
    from vidport.runtime.streamed_blocks import load_streamed

    folder, shard = _copy(converted, tmp_path)
    model = load_streamed(folder)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(VidportError, match=shard.name):
        _run(model, _inputs())
    assert all(_is_empty(b) for b in model.transformer_blocks)


def test_a_model_without_that_list_is_refused(converted):
    from vidport.runtime.streamed_blocks import load_streamed

    with pytest.raises(VidportError, match="no list of blocks named 'blocks'"):
        load_streamed(converted, blocks_attr="blocks")


def test_wan_blocks_stream_too(tmp_path):
    """Any list of blocks: Wan's DiT keeps them in `blocks`."""
    import mlx.core as mx

    from vidport.reference.wan_dit import probes
    from vidport.runtime.loading import load_model
    from vidport.runtime.streamed_blocks import load_streamed

    config = write_wan(tmp_path / "wan", "t2v", seed=5)
    out = _convert(tmp_path / "wan", tmp_path / "wan-mlx")
    inputs = probes(config, seed=2)[0].kwargs
    args = (mx.array(inputs["hidden_states"].transpose(0, 2, 3, 4, 1)), mx.array(inputs["timestep"]),
            mx.array(inputs["encoder_hidden_states"]))
    streamed = load_streamed(out, blocks_attr="blocks")
    got, expected = np.array(streamed(*args)), np.array(load_model(out)(*args))
    assert np.abs(got - expected).max() == 0
    assert all(_is_empty(b) for b in streamed.blocks)
