"""The kernels' threads follow the machine's load (vidport.runtime.cpu_load): the arithmetic of
/proc/stat, the watcher seeing real busy processes, and the caps reaching OpenBLAS and the native
kernels."""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import mlx.core as mx
from vidport.runtime import blas, cpu_load, native

linux_only = pytest.mark.skipif(not Path("/proc/stat").exists(), reason="reads /proc (Linux)")
several_cores = pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: there is nothing to cap")


def test_proc_stat_busy_counts_steal_and_leaves_idle_and_iowait_out():
    # user nice system idle iowait irq softirq steal guest guest_nice (guest is already in user)
    text = "cpu  100 5 20 1000 7 1 2 3 40 0\ncpu0 50 2 10 500 3 0 1 1 20 0\n"
    assert cpu_load.busy_and_total(text) == (131, 1138)


def test_own_ticks_reads_past_a_command_name_with_spaces_and_parentheses():
    fields = ["S", "1", "2", "3", "0", "-1", "4194304", "10", "0", "0", "0", "250", "37", "0", "0"]
    assert cpu_load.own_ticks("4242 (my (odd) name) " + " ".join(fields)) == 287


@pytest.mark.parametrize("cores,others,threads", [(2, 0.0, 2), (2, 0.4, 2), (2, 0.6, 1), (2, 1.14, 1),
                                                  (2, 2.0, 1), (8, 3.0, 5), (8, 7.9, 1), (8, 0.2, 8)])
def test_threads_are_the_cores_others_leave_rounded_and_at_least_one(cores, others, threads):
    assert cpu_load.threads_for(cores, others) == threads


def test_others_busy_leaves_out_this_process_own_time():
    # 2 cores over 200 ticks in all: 150 busy, 100 of them this process's
    assert cpu_load.others_busy((1000, 5000, 300), (1150, 5200, 400), cores=2) == pytest.approx(0.5)
    assert cpu_load.others_busy((1000, 5000, 300), (1100, 5200, 400), cores=2) == 0.0  # ours only
    assert cpu_load.others_busy((1000, 5000, 300), (1000, 5000, 300), cores=2) == 0.0  # no time passed


@linux_only
@several_cores
def test_watch_caps_threads_at_one_while_every_core_is_busy():
    seen: list[int] = []
    stop = threading.Event()
    watcher = threading.Thread(target=cpu_load.watch, args=(seen.append, stop, 0.2))
    watcher.start()
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count())]
    try:
        deadline = time.monotonic() + 10
        while 1 not in seen and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
        stop.set()
        watcher.join()
    assert 1 in seen, seen


def openblas_threads() -> int:
    """The thread count MLX's OpenBLAS last ran a product with (the shim sets it per product)."""
    import scipy_openblas32

    lib = ctypes.CDLL(str(next(Path(scipy_openblas32.get_lib_dir()).glob("libscipy_openblas*.so*"))))
    return lib.scipy_openblas_get_num_threads()


@pytest.mark.skipif(not blas.state["blas"].startswith(blas.FAST_BLAS_PREFIX), reason="the OpenBLAS shim is not loaded")
@several_cores
def test_the_blas_cap_reaches_openblas_and_lifting_it_restores_every_thread():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((512, 512)).astype(np.float32)  # 134 M multiply-adds: threaded when free
    try:
        blas.limit_threads(1)
        np.testing.assert_allclose(np.array(mx.array(a) @ mx.array(a)), a.astype(np.float64) @ a, rtol=1e-3, atol=1e-3)
        assert openblas_threads() == 1
        blas.limit_threads(0)
        mx.eval(mx.array(a) @ mx.array(a))
        assert openblas_threads() > 1
    finally:
        blas.limit_threads(0)


@pytest.mark.skipif(native.load() is None, reason="the native extension is not built here")
def test_the_native_cap_is_set_lifted_and_still_computes_the_convolution():
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 32, 32, 64)).astype(np.float32)  # 75 M multiply-adds: threaded when free
    w = rng.standard_normal((64, 3, 3, 64)).astype(np.float32) / 24
    want = F.conv2d(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(w).permute(0, 3, 1, 2), padding=1)
    try:
        native.limit_threads(1)
        assert native.load().thread_limit() == 1
        got = native.conv(mx.array(x)[:, None], mx.array(w)[:, None], None, ((0, 0), (1, 1), (1, 1)))
        np.testing.assert_allclose(np.array(got)[:, 0], want.permute(0, 2, 3, 1).numpy(), rtol=1e-4, atol=1e-4)
    finally:
        native.limit_threads(0)
    assert native.load().thread_limit() == 0
