"""The MLX runtime. Importing it (or any module in it) changes no process setting: a program that
runs MLX models calls `configure_cpu()` once, first. This module imports no mlx, so
`from vidport.runtime import configure_cpu; configure_cpu()` is always early enough."""
from __future__ import annotations

from dataclasses import dataclass

from vidport.runtime import blas as _blas, malloc as _malloc


@dataclass(frozen=True)
class CpuSettings:
    """What is in force: the BLAS MLX multiplies with, and glibc malloc's settings."""

    blas: str
    malloc: str

    @property
    def fast_blas(self) -> bool:
        return self.blas.startswith(_blas.FAST_BLAS_PREFIX)


def configure_cpu(*, blas: bool = True, malloc: bool = True) -> CpuSettings:
    """Set this process up for MLX on the CPU: load the OpenBLAS shim MLX binds to (Linux; see
    vidport.runtime.blas) and keep freed memory in the process (glibc; see vidport.runtime.malloc).

    Call it before mlx is first imported: libmlx binds its BLAS when it loads, so a later call
    warns and leaves `fast_blas` False. `malloc=False` leaves glibc alone (for a process that also
    runs torch); `blas=False` leaves the BLAS alone. VIDPORT_BLAS=reference and VIDPORT_MALLOC=default
    turn each off for good. Calling it again is harmless."""
    if blas:
        _blas.use_fast_blas(stacklevel=2)
    if malloc:
        _malloc.tune_malloc()
    return cpu_settings()


def cpu_settings() -> CpuSettings:
    """The settings in force now (the process defaults until `configure_cpu` ran)."""
    return CpuSettings(blas=_blas.state["blas"], malloc=_malloc.state["malloc"])
