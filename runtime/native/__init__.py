"""vidport's own CPU kernels for MLX, a C++ extension built once into the environment.

MLX's CPU backend runs every operation but the matrix products on its one stream thread. Its
convolution unfolds the input (im2col) on that thread, then multiplies. `conv.cpp` is an MLX
primitive (MLX's supported extension mechanism) that hands stride-1 float32 convolutions to
oneDNN, the library torch's own CPU convolutions run on: a direct convolution with kernels for the
CPU's vector width, on every core, reading MLX's channels-last arrays in place. Measured on the
development machine (AMD EPYC Zen 5, 2 cores), a 3x3 convolution at 64x64x512 ran at 527 GFLOP/s
against MLX's 384 and torch's 488.

The extension is compiled with g++ against the mlx wheel's headers and libmlx, oneDNN from PyPI
(onednn-cpu-gomp and its headers, onednn-devel-cpu-gomp) and nanobind's sources (the `nanobind`
package), all pinned in requirements.txt. nanobind must share MLX's internals for `mx.array` to
pass through: the same internals version and MLX's domain (`NB_DOMAIN=mlx`); `load()` checks this
with a one-element convolution and warns and falls back to MLX's own convolution if anything
fails. The library is named after the mlx version it was built for, so upgrading mlx rebuilds it.

Nothing is built or loaded at import; `load()` does it on first use (`make venv` calls it, so
tests never race to build). VIDPORT_NATIVE=off keeps MLX's own kernels (for benchmarks).
"""
from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import subprocess
import sys
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

# How long an idle OpenMP thread of the kernels' team spins (loop iterations) before it sleeps.
# libgomp's default, 300000, keeps both cores busy between parallel regions: beside another busy
# process a quick-size UNet step took 3.6x diffusers' time (1.6x quiet). A user's GOMP_SPINCOUNT
# or OMP_WAIT_POLICY wins.
OPENMP_SPIN = "10000"

SOURCES = [Path(__file__).with_name(name) for name in ("module.cpp", "conv.cpp", "norms.cpp")]
HEADER = Path(__file__).with_name("native.h")
_state: dict[str, ModuleType | None] = {}
_limit = {"threads": 0}  # the cap vidport.runtime.cpu_load set (0: none), applied when the module loads


def library_path() -> Path:
    import mlx.core as mx
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    return Path(sys.prefix) / "lib" / "vidport" / f"_native-mlx{mx.__version__}{suffix}"


def build() -> Path:
    """Compile the extension unless an up-to-date build exists; raises OSError or
    CalledProcessError (with the compiler's output) when it cannot."""
    import mlx.core as mx
    import nanobind
    target = library_path()
    if target.exists() and all(target.stat().st_mtime >= source.stat().st_mtime for source in (*SOURCES, HEADER)):
        return target
    mlx_dir = Path(mx.__file__).parent
    nb_dir = Path(nanobind.__file__).parent
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    prefix = Path(sys.prefix)  # where the onednn wheels put lib/libdnnl.so and include/oneapi
    command = ["g++", "-O3", "-std=c++20", "-shared", "-fPIC", "-fvisibility=hidden", "-fopenmp", "-DNDEBUG",
               "-DNB_DOMAIN=mlx", f"-I{nb_dir / 'include'}", f"-I{nb_dir / 'ext' / 'robin_map' / 'include'}",
               f"-I{sysconfig.get_paths()['include']}", f"-I{mlx_dir / 'include'}", f"-I{prefix / 'include'}",
               *map(str, SOURCES), str(nb_dir / "src" / "nb_combined.cpp"),
               f"-L{mlx_dir / 'lib'}", "-lmlx", f"-Wl,-rpath,{mlx_dir / 'lib'}",
               f"-L{prefix / 'lib'}", "-ldnnl", f"-Wl,-rpath,{prefix / 'lib'}", "-o", str(partial)]
    try:
        subprocess.run(command, check=True, capture_output=True, text=True)
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def load() -> ModuleType | None:
    """The extension module, built if needed; None (with one warning) where it cannot be built or
    loaded, or on a platform where MLX does not compute on the CPU by default, or when
    VIDPORT_NATIVE=off."""
    if "module" in _state:
        return _state["module"]
    _state["module"] = None
    if os.environ.get("VIDPORT_NATIVE", "").lower() in ("off", "0", "no") or sys.platform != "linux":
        return None
    import mlx.core as mx
    try:
        path = build()
        spec = importlib.util.spec_from_file_location("_native", path)
        module = importlib.util.module_from_spec(spec)
        spin = {} if "OMP_WAIT_POLICY" in os.environ else {"GOMP_SPINCOUNT": OPENMP_SPIN}
        with _environment(**spin):  # libgomp reads it once, as it loads
            spec.loader.exec_module(module)
        module.set_thread_limit(_limit["threads"])
        one = mx.ones((1, 1, 1, 1, 1))
        mx.eval(module.conv(one, one, None, ((0, 0), (0, 0), (0, 0))))
    except (ImportError, OSError, TypeError, RuntimeError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", "") or err
        warnings.warn(f"vidport: the native CPU kernels are off, MLX's own are used ({detail})",
                      RuntimeWarning, stacklevel=2)
        return None
    _state["module"] = module
    return module


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    """Set each variable the user has not set, for the block only (child processes see theirs)."""
    added = [name for name in values if name not in os.environ]
    os.environ.update({name: values[name] for name in added})
    try:
        yield
    finally:
        for name in added:
            del os.environ[name]


def _module_for(*arrays) -> ModuleType | None:
    """The extension when it applies to these arrays (all float32, or None, on the CPU), else None."""
    import mlx.core as mx
    module = load()
    if module is None or mx.default_device() != mx.cpu:
        return None
    return module if all(a is None or a.dtype == mx.float32 for a in arrays) else None


# oneDNN reorders the weights into its blocked layout on every call; with large weights over few
# output pixels that costs more than the convolution, and MLX's im2col product wins (16 x 4x4 x
# 1280 -> 1280: 42 ms against MLX's 19; 16 x 8x8: 76 against 71; 1 x 32x32 x 512: 9.9 against 13.4).
FEW_PIXELS, LARGE_WEIGHT = 2048, 4 * 1024 * 1024


def conv(x, weight, bias, padding: tuple[tuple[int, int], ...]):
    """The native convolution of 5-D channels-last `x` (see conv.cpp), or None when it does not
    apply here (no extension, another dtype or device, large weights over few pixels): the caller
    then uses MLX's."""
    module = _module_for(x, weight, bias)
    if module is None:
        return None
    pixels = x.shape[0] * math.prod(size + before + after - k + 1
                                    for size, (before, after), k in zip(x.shape[1:4], padding, weight.shape[1:4]))
    if pixels < FEW_PIXELS and weight.size > LARGE_WEIGHT:
        return None
    return module.conv(x, weight, bias, padding)


def silu(x):
    """x * sigmoid(x) on every core (norms.cpp), or None where it does not apply."""
    module = _module_for(x)
    return None if module is None else module.silu(x)


def group_norm(x, weight, bias, groups: int, eps: float):
    """Group norm of channels-last (N, ..., C) `x` on every core (norms.cpp), or None where it does
    not apply."""
    module = _module_for(x, weight, bias)
    return None if module is None else module.group_norm(x, weight, bias, groups, eps)


def rms_norm(x, gamma):
    """x / max(||x||, 1e-12) * gamma over the last axis on every core (norms.cpp), or None where it
    does not apply."""
    module = _module_for(x, gamma)
    return None if module is None else module.rms_norm(x, gamma)


def limit_threads(count: int) -> None:
    """Each native kernel that starts from now on uses at most `count` threads (0 lifts the cap;
    see vidport.runtime.cpu_load). Loads nothing: a module loaded later starts with the cap."""
    _limit["threads"] = count
    if _state.get("module") is not None:
        _state["module"].set_thread_limit(count)


@contextlib.contextmanager
def threads(count: int) -> Iterator[None]:
    """Each native kernel queued inside the block uses `count` threads (while several MLX streams
    compute at once)."""
    module = load()
    if module is None:
        yield
        return
    before = module.threads()
    module.set_threads(count)
    try:
        yield
    finally:
        module.set_threads(before)
