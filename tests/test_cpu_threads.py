"""runtime.cpu_threads: independent parts computed on two threads at once give the parts' own
results, in order; a failing part's error reaches the caller; the BLAS thread count is given back;
and the two models that use it (the motion UNet's batch of videos, the SD VAE's slices of frames)
still equal diffusers."""
from __future__ import annotations

import ctypes
import threading

import numpy as np
import pytest

import vidport.runtime  # noqa: F401  (before mlx: the fast BLAS)
from vidport.runtime import cpu_settings
import mlx.core as mx

from vidport.runtime import cpu_threads


def blas_threads_after(m: int) -> int | None:
    """OpenBLAS's thread count after an m x m x m product, when the shim is loaded (it picks one
    thread for small products and all of them for large ones)."""
    if not cpu_settings().fast_blas:
        return None
    import scipy_openblas32
    from pathlib import Path

    mx.eval(mx.ones((m, m)) @ mx.ones((m, m)))
    lib = ctypes.CDLL(str(next(Path(scipy_openblas32.get_lib_dir()).glob("libscipy_openblas*.so*"))))
    return lib.scipy_openblas_get_num_threads()


def assert_blas_picks_by_size_again(all_threads: int | None) -> None:
    """After map_parts the shim's thread count is no longer fixed: small products one thread, large all."""
    assert blas_threads_after(8) in (None, 1)
    assert blas_threads_after(256) == all_threads


def two_cores_without_native_kernels(monkeypatch) -> None:
    """A 2-core machine where the native kernels could not be built: parts then run two at once."""
    monkeypatch.setattr(cpu_threads.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(cpu_threads.native, "load", lambda: None)


def test_native_kernels_keep_parts_in_turn(monkeypatch):
    """They already use every core, and two streams at once were slower with them."""
    if cpu_threads.native.load() is None:
        pytest.skip("the native extension is not built here")
    monkeypatch.setattr(cpu_threads.os, "cpu_count", lambda: 2)
    assert cpu_threads.workers_for(4) == 1


def test_parts_run_on_two_threads_in_order(monkeypatch):
    two_cores_without_native_kernels(monkeypatch)
    assert cpu_threads.workers_for(5) == 2
    rng = np.random.default_rng(0)
    a = [mx.array(rng.standard_normal((64, 96)).astype(np.float32)) for _ in range(5)]
    b = mx.array(rng.standard_normal((96, 48)).astype(np.float32))
    all_threads = blas_threads_after(256)
    threads_seen = set()
    both_started = threading.Barrier(2)  # the first two parts wait for each other: they must be on two threads

    def part(index):
        threads_seen.add(threading.current_thread().name)
        if index < 2:
            both_started.wait(timeout=30)
        return mx.tanh(a[index] @ b) + 1.0

    ours = cpu_threads.map_parts(part, list(range(len(a))))
    assert len(threads_seen) == 2 and not any(name == "MainThread" for name in threads_seen)
    for x, out in zip(a, ours):
        np.testing.assert_allclose(np.array(out), np.tanh(np.array(x) @ np.array(b)) + 1.0, atol=1e-5)
    assert_blas_picks_by_size_again(all_threads)


def test_a_failing_part_raises_in_the_caller(monkeypatch):
    two_cores_without_native_kernels(monkeypatch)
    all_threads = blas_threads_after(256)

    def part(i):
        if i == 2:
            raise ValueError("part 2 failed")
        return mx.ones((4,)) * i

    with pytest.raises(ValueError, match="part 2 failed"):
        cpu_threads.map_parts(part, list(range(4)))
    assert_blas_picks_by_size_again(all_threads)


def test_one_at_a_time_and_the_switch_keep_parts_in_the_calling_thread(monkeypatch):
    two_cores_without_native_kernels(monkeypatch)
    with cpu_threads.one_at_a_time():
        assert cpu_threads.workers_for(4) == 1
    assert cpu_threads.workers_for(4) == 2
    monkeypatch.setenv("VIDPORT_CPU_THREADS", "1")
    assert cpu_threads.workers_for(4) == 1
