"""The communication bench/distributed.py counts and projects from: one guided step of a small Wan
DiT on ring processes under each plan (runtime.parallel_wan), with `mx.distributed.all_sum` /
`all_gather` wrapped in the ranks, issues exactly the collectives its shapes say, written out
here by hand; and the bench's formula for them (`wan_collectives`, what its projection to Wan 14B
uses) gives the same list.

The DiT: 4 heads x 12 (inner 48), FFN 96, 2 layers, text dim 24; 1 frame at 32x64 = 1x4x8 latents
= 8 patch tokens of 16 x 1x2x2 = 64 values; 16 text tokens.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from vidport.runtime.distributed import free_ports

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench" / "distributed.py"
TOKENS, TEXT, INNER, OUT, LAYERS, PASSES = 8, 16, 48, 64, 2, 2


@functools.cache
def bench():
    """bench/distributed.py as a module (as bench/run.py loads it)."""
    spec = importlib.util.spec_from_file_location("bench_distributed", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def counted(plan: str, ranks: int, tmp_path: Path) -> list[Counter]:
    """Each rank's collectives of one step: (op, shape, itemsize) -> calls."""
    launcher = Path(sys.executable).with_name("mlx.launch")
    port = str(free_ports(ranks))  # not mlx.launch's default: another ring job may be using it
    done = subprocess.run([str(launcher), "-n", str(ranks), "--backend", "ring", "--starting-port", port,
                           "--python", sys.executable, "--",
                           str(BENCH), "--rank-worker", "--plan", plan, "--size", "tiny", "--count-only", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=180, cwd=ROOT)
    reports = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]
    assert done.returncode == 0 and len(reports) == ranks, done.stdout + done.stderr
    assert all(r["tokens"] == TOKENS and r["ranks"] == ranks for r in reports)
    return [Counter((c["op"], tuple(c["shape"]), c["itemsize"]) for c in r["collectives"]) for r in reports]


def by_hand(plan: str, ranks: int) -> Counter:
    if plan == "cfg":  # each rank's prediction [1, batch 1, frames 1, 4, 8, 16 channels]
        return Counter({("all_gather", (1, 1, 1, 4, 8, 16), 4): 1})
    if plan == "sequence":  # K and V of the rank's tokens [tokens/N, 1, heads, 12] per layer; the head's output
        share = TOKENS // ranks
        return Counter({("all_gather", (share, 1, 4, 12), 4): 2 * LAYERS * PASSES,
                        ("all_gather", (share, 1, OUT), 4): PASSES})
    # tensor: attn1, attn2, FFN outputs [1, 8, 48]; q/k norm sums [1, 8, 1] (attn1 q k, attn2 q), attn2 k [1, 16, 1]
    return Counter({("all_sum", (1, TOKENS, INNER), 4): 3 * LAYERS * PASSES,
                    ("all_sum", (1, TOKENS, 1), 4): 3 * LAYERS * PASSES,
                    ("all_sum", (1, TEXT, 1), 4): LAYERS * PASSES})


@pytest.mark.parametrize("plan,ranks", [("cfg", 2), ("sequence", 2), ("tensor", 2), ("sequence", 4)])
def test_counted_traffic_is_the_shapes(plan, ranks, tmp_path):
    module = bench()
    want = by_hand(plan, ranks)
    for found in counted(plan, ranks, tmp_path):
        assert found == want
    config = {**module.WAN_1_3B, **module.SIZES["tiny"]["dit"], "num_layers": LAYERS}
    formula = module.wan_collectives(config, TOKENS, TEXT, plan, ranks, 4)
    assert module.expected(formula) == {f"{op} {math.prod(shape)} x {item} B": calls
                                        for (op, shape, item), calls in want.items()}


def test_ring_bytes():
    """Per rank under the ring algorithms: an all_gather sends its part to N-1 ranks; an all_sum
    (reduce-scatter + all-gather) sends 2 (N-1)/N of the buffer."""
    module = bench()
    assert module.Collective("all_gather", 100, 2, 3).sent(4) == 3 * 3 * 200
    assert module.Collective("all_sum", 100, 2, 3).sent(4) == 3 * 2 * 3 / 4 * 200
    assert module.Collective("all_sum", 100, 2, 3).steps(4) == 3 * 6
