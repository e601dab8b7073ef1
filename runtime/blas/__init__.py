"""Give MLX an optimized BLAS on Linux.

The Linux `mlx[cpu]` wheel links the reference BLAS: a float32 2048^3 matmul runs at about
3.5 GFLOP/s on the development machine, 25x slower than OpenBLAS (measured: 89 GFLOP/s; a
320-channel 3x3 conv at 64x64 goes from 4.2 s to 0.18 s). `shim.c` re-exports OpenBLAS (from
the scipy-openblas32 wheel) under the CBLAS names libmlx imports; loading it RTLD_GLOBAL before
mlx makes libmlx bind to it. The shim is compiled once (gcc) into the environment.

OpenBLAS picks its kernels by CPU model and does not know every recent one: on the development
machine's AMD EPYC (Zen 5, with AVX-512) it falls back to its AVX2 "Haswell" kernels, and that
machine's environment also sets OPENBLAS_CORETYPE=Haswell (a common guard for CPUs OpenBLAS does
not recognise). Haswell kernels run a float32 GEMM at about 190 GFLOP/s there, its AVX-512
"SkylakeX" kernels at 350-450 (torch's MKL uses AVX-512 on the same machine). So the runtime
chooses the kernels of its own OpenBLAS copy itself: VIDPORT_BLAS_CORETYPE when set, else SkylakeX
on any CPU with the AVX-512 subsets those kernels use, else OpenBLAS's own choice (honouring
OPENBLAS_CORETYPE). The choice applies only while the shim loads; the environment is restored
after, so numpy's OpenBLAS and child processes see what the user set. `state["blas"]` names the
kernels in use.

Nothing here runs at import: `vidport.runtime.configure_cpu()` calls `use_fast_blas`.
Set VIDPORT_BLAS=reference to keep the wheel's own BLAS (for benchmarks).
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

SHIM_SOURCE = Path(__file__).with_name("shim.c")
state: dict[str, str] = {"blas": "mlx wheel default"}
FAST_BLAS_PREFIX = "OpenBLAS"  # how state["blas"] begins once the shim is loaded


def shim_path() -> Path:
    return Path(sys.prefix) / "lib" / "vidport" / "libvidport_blas.so"


def build_shim() -> Path | None:
    """Compile the shim against scipy-openblas32 if it is not built yet; None when impossible."""
    try:
        import scipy_openblas32
    except ImportError:
        return None
    target = shim_path()
    if target.exists() and target.stat().st_mtime >= SHIM_SOURCE.stat().st_mtime:
        return target
    lib_dir = scipy_openblas32.get_lib_dir()
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    command = ["gcc", "-O2", "-shared", "-fPIC", "-o", str(partial), str(SHIM_SOURCE),
               f"-L{lib_dir}", "-lscipy_openblas", f"-Wl,-rpath,{lib_dir}"]
    try:
        subprocess.run(command, check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    partial.replace(target)
    return target


# what OpenBLAS's SkylakeX kernels need (its own test for them)
AVX512_FLAGS = {"avx512f", "avx512dq", "avx512cd", "avx512bw", "avx512vl"}


def kernel_choice(cpuinfo: str | None = None) -> str | None:
    """The kernels for the runtime's OpenBLAS, or None to leave it to OpenBLAS: VIDPORT_BLAS_CORETYPE,
    else SkylakeX when the CPU (the first processor entry of /proc/cpuinfo) has AVX-512."""
    if os.environ.get("VIDPORT_BLAS_CORETYPE"):
        return os.environ["VIDPORT_BLAS_CORETYPE"]
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    first = cpuinfo.split("\n\n", 1)[0]
    fields = dict(line.split(":", 1) for line in first.splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    flags = set(fields.get("flags", "").split())
    if AVX512_FLAGS <= flags:
        return "SkylakeX"
    return None


def use_fast_blas(stacklevel: int = 1) -> str:
    """Load the OpenBLAS shim before mlx (Linux only); returns which BLAS MLX will use. Once mlx is
    imported it is too late (libmlx has bound its BLAS): it warns (at the caller `stacklevel` frames
    up) and changes nothing."""
    if sys.platform != "linux" or os.environ.get("VIDPORT_BLAS") == "reference":
        return state["blas"]
    if state["blas"].startswith(FAST_BLAS_PREFIX):
        return state["blas"]
    if "mlx.core" in sys.modules:
        warnings.warn("vidport: mlx was imported before the CPU setup, so MLX keeps the wheel's reference BLAS "
                      "(matrix products about 25x slower); call vidport.runtime.configure_cpu() first, before "
                      "importing mlx or any vidport.runtime model module", RuntimeWarning, stacklevel=stacklevel + 1)
        return state["blas"]
    core, before = kernel_choice(), os.environ.get("OPENBLAS_CORETYPE")
    if core:  # OpenBLAS reads it once, when it loads (importing scipy_openblas32 loads it)
        os.environ["OPENBLAS_CORETYPE"] = core
    try:
        shim = build_shim()
        if shim is not None:
            ctypes.CDLL(str(shim), mode=ctypes.RTLD_GLOBAL)
    finally:
        if core and before is None:
            del os.environ["OPENBLAS_CORETYPE"]
        elif core:
            os.environ["OPENBLAS_CORETYPE"] = before
    if shim is not None:
        state["blas"] = f"{FAST_BLAS_PREFIX} {corename() or ''} kernels (scipy-openblas32 via vidport shim)".replace("  ", " ")
    return state["blas"]


def _shim_function(name: str):
    """One of the shim's own thread controls (shim.c), or None while the shim is not loaded."""
    return getattr(ctypes.CDLL(str(shim_path())), name) if state["blas"].startswith(FAST_BLAS_PREFIX) else None


@contextlib.contextmanager
def fixed_threads(threads: int) -> Iterator[None]:
    """Every BLAS product made inside the block uses `threads` threads (nothing changes without
    the shim): for several MLX streams computing at once, see shim.c."""
    fix = _shim_function("vidport_blas_fix_threads")
    if fix is None:
        yield
        return
    fix(threads)
    try:
        yield
    finally:
        fix(0)


def limit_threads(threads: int) -> None:
    """Products use at most `threads` threads from now on (0 lifts the cap; see
    vidport.runtime.cpu_load); nothing changes without the shim."""
    limit = _shim_function("vidport_blas_limit_threads")
    if limit is not None:
        limit(threads)


def corename() -> str | None:
    """The kernel set OpenBLAS chose (after use_fast_blas loaded it), e.g. "SkylakeX"."""
    try:
        import scipy_openblas32

        lib = ctypes.CDLL(str(next(Path(scipy_openblas32.get_lib_dir()).glob("libscipy_openblas*.so*"))))
        lib.scipy_openblas_get_corename.restype = ctypes.c_char_p
        return lib.scipy_openblas_get_corename().decode()
    except (ImportError, OSError, StopIteration, AttributeError):
        return None
