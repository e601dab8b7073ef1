"""Issue 10: files built to break the readers (or damaged by bad luck) are refused with one line
naming the file and what is wrong; never read outside a file, never converted silently wrong,
never a hang, a memory blow-up or a traceback. Each test here failed before its fix."""
from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fixtures.hostile import (Storage, View, deflated_zeros, state_pickle, stored, write_legacy, write_safetensors_header,
                              write_zip, write_zip_members, write_zip_tree)
from vidport.converter.checkpoint import read_checkpoint
from vidport.converter.core.errors import VidportError
from vidport.converter.convert import plan_conversion

ROOT = Path(__file__).resolve().parent.parent


def refused(path: Path, match: str) -> VidportError:
    """read_checkpoint and loading every tensor end in exactly one VidportError of one line."""
    with pytest.raises(VidportError, match=match) as caught:
        source = read_checkpoint(path)
        for ref in _refs(source.tree):
            ref.load()
    assert "\n" not in caught.value.message and str(path) in caught.value.message
    return caught.value


def _refs(tree):
    if hasattr(tree, "load"):
        yield tree
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from _refs(value)


def torch_refuses(path: Path) -> None:
    with pytest.raises(Exception):
        torch.load(path, weights_only=True)


# ---------------------------------------------------------------- memory safety


@pytest.mark.parametrize("k", [1, 64, 1 << 20])
def test_negative_strides_never_read_outside_the_storage(tmp_path, k):
    storage = Storage("0", np.arange(64 * 64, dtype=np.float32))
    path = write_zip_tree(tmp_path / "neg.pt", {"proj.weight": View(storage, 0, (64, 64), (-k, k + 1))})
    torch_refuses(path)
    refused(path, "tensor proj.weight does not lie inside its storage: negative stride")


def test_negative_storage_offset_is_refused(tmp_path):
    storage = Storage("0", np.arange(16, dtype=np.float32))
    path = write_zip_tree(tmp_path / "off.pt", {"w": View(storage, -8, (4, 4), (4, 1))})
    torch_refuses(path)
    refused(path, "tensor w does not lie inside its storage: negative storage offset -8")


def test_view_past_the_end_of_its_storage_is_refused(tmp_path):
    storage = Storage("0", np.arange(16, dtype=np.float32))
    path = write_zip_tree(tmp_path / "past.pt", {"w": View(storage, 4, (4, 4), (4, 1))})
    torch_refuses(path)
    refused(path, "tensor w does not lie inside its storage: .* reaches element 19 of a storage of 16")


@pytest.mark.parametrize("numel", [15, 17])
def test_zip_storage_of_another_size_than_declared_is_refused(tmp_path, numel):
    """torch reads uninitialised memory for a short storage; we refuse both directions."""
    storage = Storage("0", np.arange(16, dtype=np.float32), numel=numel)
    path = write_zip_tree(tmp_path / "size.pt", {"w": View(storage, 0, (2,), (1,))})
    refused(path, f"storage 0 holds 64 bytes, but the pickle declares {numel} x 4 bytes")


def test_legacy_block_of_zeros_is_refused(tmp_path):
    path = tmp_path / "zeros.pth"
    torch.save({"a": torch.randn(256), "b": torch.randn(256)}, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    first_storage_end = min(data.index(t.numpy().tobytes()) for t in torch.load(path, weights_only=True).values()) + 1024
    path.write_bytes(data[:first_storage_end] + bytes(4096) + data[first_storage_end:])  # the next storage shifts
    torch_refuses(path)
    refused(path, "records 0 elements where the pickle declares 256")


@pytest.mark.parametrize("tail, match", [(b"\0" * 8, "8 unexpected bytes after the last storage"),
                                         (None, "ends past the end of the file")])
def test_legacy_file_must_end_where_its_last_storage_ends(tmp_path, tail, match):
    main, storages = state_pickle({"w": View(Storage("0", np.ones(4, np.float32)), 0, (4,), (1,))}, legacy=True)
    raw = storages["0"].data.tobytes()
    path = write_legacy(tmp_path / "end.pth", main, [("0", 4, raw if tail is not None else raw[:-4])], tail or b"")
    refused(path, match)


def test_legacy_element_count_of_minus_one_is_one_line(tmp_path):
    main, _ = state_pickle({"w": View(Storage("0", np.ones(4, np.float32)), 0, (4,), (1,))}, legacy=True)
    path = write_legacy(tmp_path / "minus.pth", main, [("0", -1, np.ones(4, np.float32).tobytes())])
    torch_refuses(path)
    refused(path, "records -1 elements where the pickle declares 4")


# ---------------------------------------------------------------- safetensors headers

F32_64x64 = {"dtype": "F32", "shape": [64, 64]}


def _two_tensors(tmp_path: Path, a_offsets, b_offsets, data_size=2 * 16384, a_dtype="F32") -> Path:
    header = {"proj_in.weight": {**F32_64x64, "dtype": a_dtype, "data_offsets": a_offsets},
              "proj_out.weight": {**F32_64x64, "data_offsets": b_offsets}}
    return write_safetensors_header(tmp_path / "w.safetensors", header, np.random.rand(data_size // 4).astype(np.float32).tobytes())


def official_refuses(path: Path) -> None:
    from safetensors import safe_open

    with pytest.raises(Exception):
        with safe_open(str(path), framework="np") as handle:
            for key in handle.keys():
                handle.get_tensor(key)


@pytest.mark.parametrize("a, b, match", [
    ([0, 16384], [0, 16384], "overlaps the tensor before it"),  # proj_out would equal proj_in
    ([-8, 16376], [16384, 32768], "not two ordered non-negative integers"),  # would read the header as weights
    ([0, 16384], [16384, 49152], "needs 16,384 bytes, but data_offsets"),
    ([0, 16384], [20000, 36384], "leaves bytes 16384..20000 unused"),
])
def test_safetensors_offsets_are_checked_like_the_official_parser(tmp_path, a, b, match):
    path = _two_tensors(tmp_path, a, b, data_size=max(a[1], b[1]))
    official_refuses(path)
    refused(path, match)


def test_safetensors_f64_size_lie_is_refused(tmp_path):
    path = _two_tensors(tmp_path, [0, 16384], [16384, 32768], a_dtype="F64")  # F64 64x64 is 32 KB, given 16 KB
    official_refuses(path)
    refused(path, r"tensor proj_in.weight: F64 \[64, 64\] needs 32,768 bytes")


def test_safetensors_repeated_key_is_refused(tmp_path):
    entry = json.dumps({**F32_64x64, "data_offsets": [0, 16384]})
    text = f'{{"w": {entry}, "w": {entry}}}'
    path = write_safetensors_header(tmp_path / "dup.safetensors", text, bytes(16384))
    refused(path, "the key 'w' appears twice")


@pytest.mark.parametrize("entry, match", [
    ({"dtype": "F32", "shape": [2]}, "data_offsets None are not two"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8.0]}, "data_offsets .* are not two"),
    ({"dtype": "F32", "shape": [2], "data_offsets": "0-8"}, "data_offsets 0-8 are not two"),
    ({"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}, "shape .* is not a list of non-negative"),
    ({"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}, "unsupported dtype Q4"),
    ({"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}, "unsupported dtype"),
    ([1, 2], "header entry is a JSON list"),
])
def test_safetensors_malformed_entries_are_one_line(tmp_path, entry, match):
    path = write_safetensors_header(tmp_path / "bad.safetensors", {"w": entry}, bytes(8))
    official_refuses(path)
    refused(path, match)


def test_integer_weights_where_the_role_holds_floats_are_refused(tmp_path, motion_sources):
    state = torch.load(motion_sources["v2"], weights_only=True)
    key = next(k for k in state if k.endswith("proj_in.weight"))
    state[key] = state[key].to(torch.int32)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "int.safetensors"))
    with pytest.raises(VidportError, match=f"tensor {key} is int32, but .*proj_in.weight is a linear.weight and holds floats"):
        plan_conversion(tmp_path / "int.safetensors", "mlx")


# ---------------------------------------------------------------- resource exhaustion


def _shared_reference_bomb(levels: int) -> bytes:
    """(x, x) nested `levels` deep through the memo: 7 bytes a level, 2**levels leaves."""
    ops = bytearray(b"\x80\x02]q\x00")  # PROTO 2, EMPTY_LIST, BINPUT 0
    for level in range(1, levels + 1):  # BINGET, BINGET, TUPLE2, BINPUT
        ops += b"h" + bytes([level - 1]) + b"h" + bytes([level - 1]) + b"\x86q" + bytes([level])
    return bytes(ops + b".")


def test_shared_reference_pickle_bomb_is_refused_in_seconds(tmp_path):
    data = _shared_reference_bomb(60)
    assert len(data) < 1024
    path = write_zip(tmp_path / "bomb.pt", data, {})
    start = time.monotonic()
    refused(path, "expand to more than 5,000,000 entries")
    assert time.monotonic() - start < 10


def test_deeply_nested_pickle_is_refused(tmp_path):
    depth = 100_000
    data = b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b"."
    path = write_zip(tmp_path / "deep.pt", data, {})
    refused(path, "nests containers more than 64 deep")


def test_quadratic_set_pickle_is_refused(tmp_path):
    """One list of 100 000 items turned into a set 2 000 times: 200 million copies from 500 KB."""
    items = b"".join(b"J" + struct.pack("<i", n) for n in range(100_000))
    data = (b"\x80\x02cbuiltins\nset\nq\x00" + b"]q\x01(" + items + b"e"  # set; L = [...] (APPENDS)
            + b"h\x00h\x01\x85R" * 2000 + b".")  # set((L,)) again and again
    path = write_zip(tmp_path / "quadratic.pt", data, {})
    start = time.monotonic()
    refused(path, "more than 20,000,000 elements of copying")
    assert time.monotonic() - start < 10


def _run_limited(code: str, memory_bytes: int = 2 << 30, timeout: float = 60) -> subprocess.CompletedProcess:
    """Python code in a child whose address space is capped: a blow-up fails there, not here."""
    prelude = ("import resource; resource.setrlimit(resource.RLIMIT_AS, "
               f"({memory_bytes}, {memory_bytes}))\n")
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT / "tests")


def test_zip_bomb_is_refused_before_inflating(tmp_path):
    payload, crc = deflated_zeros(256 * 1024 * 1024)
    path = write_zip_members(tmp_path / "bomb.pt", [("archive/data.pkl", payload, zipfile.ZIP_DEFLATED, crc, 256 << 20),
                                                    stored("archive/version", b"3\n")])
    assert path.stat().st_size < 1 << 20
    refused(path, "data.pkl inflates to 268,435,456 bytes, over the 67,108,864-byte limit")


def test_zip_member_whose_directory_lies_about_its_size_is_read_no_further(tmp_path):
    payload, crc = deflated_zeros(256 * 1024 * 1024)
    path = write_zip_members(tmp_path / "liar.pt", [("archive/data.pkl", payload, zipfile.ZIP_DEFLATED, crc, 1000),
                                                    stored("archive/version", b"3\n")])
    result = _run_limited(f"from vidport.converter.checkpoint import read_checkpoint\n"
                          f"from vidport.converter.core.errors import VidportError\n"
                          f"try:\n    read_checkpoint({str(path)!r})\nexcept VidportError as err:\n    print(err.message)\n",
                          memory_bytes=3 << 30)
    assert result.returncode == 0, result.stderr
    assert "liar.pt: corrupted zip member archive/data.pkl" in result.stdout


def test_huge_config_value_is_refused_before_anything_is_built(tmp_path, motion_sources):
    import shutil

    folder = tmp_path / "adapter"
    shutil.copytree(motion_sources["diffusers"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["motion_max_seq_length"] = 5_000_000
    (folder / "config.json").write_text(json.dumps(config))
    result = _run_limited(f"from vidport.converter.inspect import describe\n"
                          f"print(describe({str(folder)!r})['family'])\n", memory_bytes=3 << 30)
    assert result.returncode == 0, result.stderr
    assert "motion_max_seq_length = 5000000; the family allows integers from 1 to 1024" in result.stdout
    with pytest.raises(VidportError, match="motion_max_seq_length = 5000000"):
        plan_conversion(folder, "mlx")


def test_config_value_the_weights_contradict_is_refused(tmp_path, motion_sources):
    import shutil

    folder = tmp_path / "adapter"
    shutil.copytree(motion_sources["diffusers"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["block_out_channels"] = [5_000_000] * len(config["block_out_channels"])
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(VidportError, match=r"config.json: block_out_channels = \[5000000.*but the weights' shapes say"):
        plan_conversion(folder, "mlx")


# ---------------------------------------------------------------- the allow-list cannot be changed


def test_refused_pickle_cannot_build_into_the_allowed_globals(tmp_path):
    """GLOBAL _rebuild_tensor_v2, then BUILD {'build': set}: once, this replaced the shared
    stand-in's function and every later load in the process called set() instead."""
    evil = (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nq\x00}X\x05\x00\x00\x00build"
            b"cbuiltins\nset\nsb.")
    path = write_zip(tmp_path / "evil.pt", evil, {})
    refused(path, "sets the state of a _Global")
    good = tmp_path / "good.pt"
    torch.save({"w": torch.arange(6.0).reshape(2, 3)}, good)
    np.testing.assert_array_equal(read_checkpoint(good).tree["w"].load(), np.arange(6.0, dtype=np.float32).reshape(2, 3))


# ---------------------------------------------------------------- one line, never a traceback


@pytest.fixture
def shards(tmp_path) -> Path:
    save_file({"a": torch.ones(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.zeros(2)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    return tmp_path


@pytest.mark.parametrize("weight_map, match", [
    ({"a": "model.safetensors.index.json"}, "is an index itself; refused"),
    ([["a", "model-00001-of-00002.safetensors"]], "its weight_map is a list"),
    ({"a": "../model-00001-of-00002.safetensors"}, "lies outside the index's folder"),
    ({"a": "/etc/passwd"}, "lies outside the index's folder"),
    ({"a": 7}, "names a shard '7'"),
    ({"a": "model-00002-of-00002.safetensors"}, "missing tensor a listed in"),
])
def test_bad_shard_index_is_one_line(shards, weight_map, match):
    index = shards / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(VidportError, match=match) as caught:
        read_checkpoint(index)
    assert "\n" not in caught.value.message


def test_shard_index_reads_linked_shards(shards, tmp_path):
    """A Hugging Face cache keeps shards as links into its blob store: names are checked, not targets."""
    linked = tmp_path / "snapshot"
    linked.mkdir()
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        (linked / name).symlink_to(shards / name)
    index = linked / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors",
                                                "b": "model-00002-of-00002.safetensors"}}))
    assert read_checkpoint(index).tree["a"].load().tolist() == [1.0, 1.0]


@pytest.mark.parametrize("text, match", [("{not json", "not valid JSON"), ("[1, 2]", "holds a JSON list, not an object"),
                                         ('{"a": 1, "a": 2}', "the key 'a' appears twice")])
def test_bad_config_json_is_one_line(tmp_path, motion_sources, text, match):
    import shutil

    folder = tmp_path / "adapter"
    shutil.copytree(motion_sources["diffusers"], folder)
    (folder / "config.json").write_text(text)
    with pytest.raises(VidportError, match=match):
        read_checkpoint(folder)


def test_zip_member_with_a_bad_crc_is_one_line(tmp_path):
    path = tmp_path / "crc.pt"
    torch.save({"w": torch.ones(3)}, path)
    data = bytearray(path.read_bytes())
    at = data.index(b"_rebuild_tensor_v2")
    data[at] ^= 0x20  # inside the stored data.pkl: its CRC no longer matches
    path.write_bytes(bytes(data))
    refused(path, "corrupted zip member .*data.pkl .*CRC")


def test_inspect_of_a_checkpoint_that_is_not_a_dict_names_the_file(tmp_path):
    from vidport.converter.inspect import describe

    torch.save([torch.ones(2)], tmp_path / "list.pt")
    with pytest.raises(VidportError, match=r"list.pt: holds a list, not a dict of tensors"):
        describe(tmp_path / "list.pt")
