"""The MLX runtime. Importing it (or any module in it) changes no process setting: a program that
runs MLX models calls `configure_cpu()` once, first. This module imports no mlx, so
`from vidport.runtime import configure_cpu; configure_cpu()` is always early enough."""
from __future__ import annotations

import os
from dataclasses import dataclass

from vidport.runtime import blas as _blas, cpu_load as _cpu_load, malloc as _malloc

# How long (2^n CPU cycles) an idle OpenBLAS worker thread spins before it sleeps. OpenBLAS's
# default, 2^28 (about 0.1 s here), keeps MLX's BLAS worker spinning through the elementwise work
# between two matrix products: on this 2-core machine under load that spin took 22% of the
# process's CPU time (a linear / SiLU / group norm loop: 565 ms of CPU with the default, 435-450
# ms with 2^4 to 2^20, the same as one thread), CPU the MLX stream thread and other processes
# then lack. 2^16 (about 25 us) still catches back-to-back products. MLX itself adds no pool on
# the CPU (its stream thread plus OpenBLAS's workers: 3 threads on 2 cores).
BLAS_THREAD_TIMEOUT = "16"


@dataclass(frozen=True)
class CpuSettings:
    """What is in force: the BLAS MLX multiplies with, and glibc malloc's settings."""

    blas: str
    malloc: str

    @property
    def fast_blas(self) -> bool:
        return self.blas.startswith(_blas.FAST_BLAS_PREFIX)


def configure_cpu(*, blas: bool = True, malloc: bool = True, follow_load: bool = True) -> CpuSettings:
    """Set this process up for MLX on the CPU: load the OpenBLAS shim MLX binds to (Linux; see
    vidport.runtime.blas), keep freed memory in the process (glibc; see vidport.runtime.malloc),
    and keep the kernels' threads on the cores other processes leave free (see
    vidport.runtime.cpu_load; `follow_load=False` or VIDPORT_FOLLOW_LOAD=off leaves them fixed).

    Call it before mlx is first imported: libmlx binds its BLAS when it loads, so a later call
    warns and leaves `fast_blas` False. `malloc=False` leaves glibc alone (for a process that also
    runs torch); `blas=False` leaves the BLAS alone. VIDPORT_BLAS=reference and VIDPORT_MALLOC=default
    turn each off for good. Calling it again is harmless.

    While the shim loads OpenBLAS, OPENBLAS_THREAD_TIMEOUT is BLAS_THREAD_TIMEOUT unless the
    user set it (OpenBLAS reads it once, at load; the environment is restored after, so numpy's
    own OpenBLAS and child processes see what the user set)."""
    if blas:
        user_timeout = os.environ.get("OPENBLAS_THREAD_TIMEOUT")
        os.environ["OPENBLAS_THREAD_TIMEOUT"] = user_timeout or BLAS_THREAD_TIMEOUT
        try:
            _blas.use_fast_blas(stacklevel=2)
        finally:
            if user_timeout is None:
                del os.environ["OPENBLAS_THREAD_TIMEOUT"]
    if malloc:
        _malloc.tune_malloc()
    if follow_load:
        _cpu_load.follow_load()
    return cpu_settings()


def cpu_settings() -> CpuSettings:
    """The settings in force now (the process defaults until `configure_cpu` ran)."""
    return CpuSettings(blas=_blas.state["blas"], malloc=_malloc.state["malloc"])
