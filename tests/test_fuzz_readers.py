"""Issue 10, done-means 1: the readers' fuzzer. Small valid files of every reader (torch zip,
legacy torch, safetensors, a sharded index, a Diffusers folder's config.json) are mutated from
fixed seeds (bit flips, truncation, inserted and deleted blocks, header lies about offsets, dtypes
and shapes, damaged indexes, zip members removed, doubled, compressed, resized, pickle opcodes
replaced, deleted, repeated, swapped, their arguments changed). For every case, run in a worker
process with a time limit and a capped address space: vidport reads what the official parser
(`torch.load(weights_only=True)`, `safetensors.safe_open`) reads, bit for bit, or refuses with one
VidportError line naming the file, where the official parser refuses too or a documented stricter
rule applies (fixtures/fuzz.py STRICTER). Never another exception, a signal, a hang or a blow-up."""
from __future__ import annotations

import pytest

from fixtures.fuzz import make_cases, run_pool, write_bases

DEFAULT = {"torch-zip": 200, "torch-legacy": 150, "safetensors": 170, "index": 50, "folder": 24}
SLOW = {"torch-zip": 1500, "torch-legacy": 1000, "safetensors": 1500, "index": 300, "folder": 150}


@pytest.fixture(scope="module")
def bases(tmp_path_factory, motion_sources):
    return write_bases(tmp_path_factory.mktemp("fuzz-bases"), motion_sources["diffusers"])


def _fuzz(bases, root, counts: dict[str, int], seed: int) -> None:
    cases = make_cases(bases, root, counts, seed)
    assert len(cases) == sum(counts.values())
    failures, outcomes = run_pool(cases)
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures[:40])
    # the mutations reach past the first check: many cases still read, many are refused for cause
    assert outcomes["same"] > len(cases) // 8 and outcomes["both refuse"] > len(cases) // 4, outcomes


def test_fuzz_readers(bases, tmp_path):
    _fuzz(bases, tmp_path, DEFAULT, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_fuzz_readers_thoroughly(bases, tmp_path, seed):
    _fuzz(bases, tmp_path, SLOW, seed=seed)
