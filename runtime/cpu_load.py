"""Thread counts that follow the machine's load: threads only on the cores other processes leave free.

The CPU kernels split their work across threads that meet at the end of every product or
convolution. When another process keeps the cores busy, one of those threads is often
descheduled for a whole time slice while the others spin waiting for it. Profiled on a 2-core
machine beside a busy process, a quick-size UNet step spent 37% of all CPU samples in those waits
(OpenBLAS's `inner_thread` and `exec_blas_async_wait`, libgomp's barrier) against 5% in the
products themselves, and took 2.9x diffusers' time; the full-size step took 30-35 s on two threads
and 27-28 s on one.

So a daemon thread samples /proc/stat every `INTERVAL` seconds, subtracts this process's own CPU
time, and caps the threads of MLX's BLAS (the OpenBLAS shim) and of vidport's native kernels at
the cores left (`threads_for`). Quiet, nothing changes. VIDPORT_FOLLOW_LOAD=off turns it off.
Linux only (elsewhere `follow_load` does nothing).
"""
from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

INTERVAL = 0.5  # seconds between samples: a new load is followed within about a second
_state: dict[str, threading.Thread] = {}


def busy_and_total(proc_stat: str) -> tuple[int, int]:
    """Busy and total clock ticks of all CPUs since boot, from the text of /proc/stat. Busy counts
    steal time: a hypervisor running something else on our CPUs is load like any other."""
    fields = [int(value) for value in proc_stat.split("\n", 1)[0].split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields + [0] * (8 - len(fields))
    return user + nice + system + irq + softirq + steal, sum(fields)


def own_ticks(self_stat: str) -> int:
    """This process's user + system clock ticks (all its threads), from /proc/self/stat."""
    fields = self_stat.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def threads_for(cores: int, others: float) -> int:
    """Threads for the kernels when other processes keep `others` cores busy: the cores left,
    rounded, at least one."""
    return max(1, min(cores, int(cores - others + 0.5)))


def others_busy(before: tuple[int, int, int], after: tuple[int, int, int], cores: int) -> float:
    """Cores other processes kept busy between two samples of (busy, total, own) ticks."""
    busy, total, own = (b - a for a, b in zip(before, after))
    if total <= 0:
        return 0.0
    return max(0.0, (busy - own) / total * cores)


def sample() -> tuple[int, int, int]:
    busy, total = busy_and_total(Path("/proc/stat").read_text())
    return busy, total, own_ticks(Path("/proc/self/stat").read_text())


def apply_limit(threads: int) -> None:
    """Cap the BLAS and native kernel threads (each call sets the cap afresh)."""
    from vidport.runtime import blas, native

    blas.limit_threads(threads)
    native.limit_threads(threads)


def watch(apply: Callable[[int], None], stop: threading.Event, interval: float = INTERVAL,
          cores: int | None = None) -> None:
    """Until `stop` is set: every `interval` seconds, apply(threads) when the free cores changed."""
    cores = cores or os.cpu_count() or 1
    before, current = sample(), cores
    while not stop.wait(interval):
        now = sample()
        threads = threads_for(cores, others_busy(before, now, cores))
        if threads != current:
            apply(threads)
            current = threads
        before = now


def follow_load() -> bool:
    """Start the daemon thread that keeps the kernels' thread caps on the free cores (once per
    process); False where it cannot run (no /proc/stat: not Linux) or VIDPORT_FOLLOW_LOAD=off."""
    if os.environ.get("VIDPORT_FOLLOW_LOAD", "").lower() in ("off", "0", "no"):
        return False
    if "watch" not in _state:
        try:
            sample()
        except (OSError, ValueError, IndexError):
            return False
        _state["watch"] = threading.Thread(target=watch, args=(apply_limit, threading.Event()),
                                           name="vidport-cpu-load", daemon=True)
        _state["watch"].start()
    return True
