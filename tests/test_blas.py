"""MLX gets an optimized BLAS on Linux, the shim computes exactly what the reference BLAS does, and
only the explicit `vidport.runtime.configure_cpu()` changes process settings, never an import."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import mlx.core as mx
from vidport.runtime import blas, cpu_settings

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="the shim and the malloc settings are Linux/glibc only")


@linux_only
def test_fast_blas_is_active():
    assert cpu_settings().fast_blas, cpu_settings()  # conftest calls configure_cpu() before mlx loads


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
    assert blas.kernel_choice(CPU_AVX512) == "SkylakeX"
    assert blas.kernel_choice(CPU_AVX2) is None  # OpenBLAS's own detection decides
    assert blas.kernel_choice(CPU_AVX512.replace(" avx512vl", "")) is None
    monkeypatch.setenv("VIDPORT_BLAS_CORETYPE", "Zen")
    assert blas.kernel_choice(CPU_AVX512) == "Zen"


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VIDPORT_BLAS", "VIDPORT_MALLOC", "VIDPORT_BLAS_CORETYPE")}
    return {**env, **extra}


@linux_only
def test_loaded_kernels_are_named_and_the_environment_is_left_as_it_was():
    code = ("import os; from vidport.runtime import configure_cpu; import vidport.runtime.blas as b; configure_cpu(); "
            "print(os.environ.get('OPENBLAS_CORETYPE')); print(b.state['blas']); print(b.kernel_choice())")
    seen, state, choice = subprocess.run([sys.executable, "-c", code], env=clean_env(OPENBLAS_CORETYPE="Haswell"),
                                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert seen == "Haswell"  # what the user set is what numpy and child processes still see
    assert f"OpenBLAS {choice if choice != 'None' else 'Haswell'} kernels" in state


# Runs `setup`, then asks glibc for a 64 MB block and reports where it lies: glibc's defaults serve a
# block that large from a mapping of its own (above the mmap threshold); tuned (M_MMAP_MAX = 0) it
# comes from the [heap]. Also whether the BLAS shim is mapped into the process, and what the runtime says.
PROBE = """
import ctypes, dataclasses, json, sys, warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
{setup}
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
pointer = libc.malloc(64 << 20)
maps = open("/proc/self/maps").read().splitlines()
region = [(line.split(maxsplit=5) + [""])[5] for line in maps
          if int(line.split("-")[0], 16) <= pointer < int(line.split()[0].split("-")[1], 16)]
from vidport.runtime import cpu_settings
settings = cpu_settings()
print(json.dumps({"block_in": region[0].strip(), "shim_mapped": any("libvidport_blas" in line for line in maps),
                  "mlx_loaded": "mlx.core" in sys.modules, "fast_blas": settings.fast_blas,
                  "warnings": [str(w.message) for w in caught], **dataclasses.asdict(settings)}))
"""


def probe(*setup: str, **env: str) -> dict:
    code = PROBE.replace("{setup}", "\n".join("    " + line for line in setup))
    done = subprocess.run([sys.executable, "-c", code], env=clean_env(**env), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def every_runtime_module() -> str:
    return ("import importlib, pkgutil, vidport.runtime as r; "
            "[importlib.import_module(m.name) for m in pkgutil.walk_packages(r.__path__, 'vidport.runtime.')]")


@linux_only
def test_importing_the_runtime_changes_no_process_setting():
    seen = probe("import vidport.runtime, vidport.runtime.loading", every_runtime_module())
    assert seen["mlx_loaded"]  # the imports did run MLX's own start-up
    assert seen["block_in"] != "[heap]"  # glibc still maps large blocks on their own
    assert not seen["shim_mapped"] and not seen["fast_blas"]
    assert (seen["blas"], seen["malloc"]) == ("mlx wheel default", "system default")
    assert seen["warnings"] == []


@linux_only
def test_configure_cpu_before_mlx_sets_both():
    seen = probe("from vidport.runtime import configure_cpu", "configure_cpu()", "import vidport.runtime.loading")
    assert seen["block_in"] == "[heap]" and seen["malloc"].startswith("glibc: one heap")
    assert seen["shim_mapped"] and seen["fast_blas"]
    assert seen["warnings"] == []


@linux_only
def test_configure_cpu_after_mlx_warns_and_says_the_fast_blas_is_off():
    seen = probe("import mlx.core", "from vidport.runtime import configure_cpu", "configure_cpu()")
    assert not seen["fast_blas"] and not seen["shim_mapped"] and seen["blas"] == "mlx wheel default"
    assert len(seen["warnings"]) == 1 and "reference BLAS" in seen["warnings"][0]
    assert "configure_cpu() first" in seen["warnings"][0]
    assert seen["block_in"] == "[heap]"  # malloc can still be tuned late


@linux_only
def test_configure_cpu_parts_and_knobs_turn_each_off():
    blas_only = probe("from vidport.runtime import configure_cpu", "configure_cpu(malloc=False)")
    assert blas_only["fast_blas"] and blas_only["block_in"] != "[heap]" and blas_only["malloc"] == "system default"
    knobs = probe("import mlx.core", "from vidport.runtime import configure_cpu", "configure_cpu()",
                  VIDPORT_BLAS="reference", VIDPORT_MALLOC="default")
    assert knobs["warnings"] == []  # the reference BLAS was asked for: nothing to warn about
    assert not knobs["shim_mapped"] and knobs["block_in"] != "[heap]"
    assert (knobs["blas"], knobs["malloc"]) == ("mlx wheel default", "system default")
