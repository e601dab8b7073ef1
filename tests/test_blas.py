"""MLX gets an optimized BLAS on Linux, and the shim computes exactly what the reference BLAS does."""
from __future__ import annotations

import sys

import numpy as np
import pytest

import vidport.runtime
import mlx.core as mx


@pytest.mark.skipif(sys.platform != "linux", reason="the shim is for the Linux mlx[cpu] wheel")
def test_fast_blas_is_active():
    assert runtime.blas.state["blas"].startswith("OpenBLAS")


@pytest.mark.parametrize("transpose_a,transpose_b", [(False, False), (True, False), (False, True), (True, True)])
def test_matmul_through_shim_is_correct(transpose_a, transpose_b):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((37, 53)).astype(np.float32)
    b = rng.standard_normal((53, 29)).astype(np.float32)
    ma, mb = mx.array(a.T.copy()).T if transpose_a else mx.array(a), mx.array(b.T.copy()).T if transpose_b else mx.array(b)
    np.testing.assert_allclose(np.array(ma @ mb), a.astype(np.float64) @ b, rtol=1e-4, atol=1e-4)
    batched = rng.standard_normal((3, 16, 8)).astype(np.float32)
    np.testing.assert_allclose(np.array(mx.array(batched) @ mx.array(batched).transpose(0, 2, 1)),
                               batched @ batched.transpose(0, 2, 1), rtol=1e-4, atol=1e-4)


CPU_AVX2 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx avx2 fma\n\nprocessor\t: 1\n"
CPU_AVX512 = ("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2 avx512f avx512dq avx512cd avx512bw "
              "avx512vl avx512_bf16\n\n")


def test_kernel_choice_takes_avx512_kernels_when_the_cpu_has_them(monkeypatch):
    monkeypatch.delenv("VIDPORT_BLAS_CORETYPE", raising=False)
    assert runtime.blas.kernel_choice(CPU_AVX512) == "SkylakeX"
    assert runtime.blas.kernel_choice(CPU_AVX2) is None  # OpenBLAS's own detection decides
    assert runtime.blas.kernel_choice(CPU_AVX512.replace(" avx512vl", "")) is None
    monkeypatch.setenv("VIDPORT_BLAS_CORETYPE", "Zen")
    assert runtime.blas.kernel_choice(CPU_AVX512) == "Zen"


@pytest.mark.skipif(sys.platform != "linux", reason="the shim is for the Linux mlx[cpu] wheel")
def test_loaded_kernels_are_named_and_the_environment_is_left_as_it_was():
    import os
    import subprocess

    code = ("import os, runtime, runtime.blas as b; "
            "print(os.environ.get('OPENBLAS_CORETYPE')); print(b.state['blas']); print(b.kernel_choice())")
    env = {**os.environ, "OPENBLAS_CORETYPE": "Haswell"}
    env.pop("VIDPORT_BLAS_CORETYPE", None)
    seen, state, choice = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                         check=True).stdout.splitlines()
    assert seen == "Haswell"  # what the user set is what numpy and child processes still see
    assert f"OpenBLAS {choice if choice != 'None' else 'Haswell'} kernels" in state
