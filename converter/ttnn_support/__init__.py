"""Import ttnn without a Tenstorrent card, and the pure-numpy ``.tensorbin`` codec (see tensorbin.py).

ttnn 0.81.1 imports without a card, but its first tile-layout conversion opens the UMD cluster and
fails with "No chips detected in the cluster" unless ``TT_METAL_MOCK_CLUSTER_DESC_PATH`` names a
cluster descriptor.  ``import_ttnn()`` points it at ``mock_cluster_n150.yaml`` (one Wormhole B0 on
an n150) when the variable is not set.  On a machine with a real card, set the variable to an
empty string before calling: ttnn then treats it as unset and opens the hardware.

Environment set only when absent (measured on CPython 3.12, Linux, ttnn 0.81.1):

* ``LOGURU_LEVEL=INFO``: ttnn logs its whole config at DEBUG on import, and one DEBUG line per
  ``as_tensor`` cache file; loguru's default stderr sink shows DEBUG.  (Read by loguru when it is
  first imported; if the application already imported loguru, its own configuration stands.)
* ``TT_LOGGER_LEVEL=error``, only when the mock cluster is ours: the C++ side otherwise prints about
  ten info/warning lines ("Opening user mode device driver", "Currently using mock cluster
  descriptor", ...) around the first tile conversion and at exit.  Its level names are spdlog's
  (``warn``, not ``warning``; an unknown name is ignored).
Nothing else is needed: ttnn finds its runtime files itself and writes no cache on import.

Under the mock cluster, host-only work is real and exact:

* works: ``ttnn.Tensor(numpy_or_torch, dtype, layout=...)``, ``ttnn.from_torch(t, dtype=...,
  layout=...)`` (bfloat16/float32 in TILE or ROW_MAJOR, bfloat8_b and bfloat4_b in TILE only), ``ttnn.to_torch``,
  ``ttnn.to_layout`` on host tensors, ``ttnn.dump_tensor``, ``ttnn.load_tensor(path)`` and
  ``ttnn.as_tensor(..., cache_file_name=...)`` with no device (it writes
  ``<name>_dtype_<DTYPE>_layout_<LAYOUT>.tensorbin``, the same bytes as from_torch + dump_tensor).
* does not work: anything on a device.  ``ttnn.open_device`` raises (it tries to JIT-build
  firmware and finds no SFPI compiler), so no device ops, no ``to_device``, no programs.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from types import ModuleType

MOCK_CLUSTER_DESC = Path(__file__).with_name("mock_cluster_n150.yaml")
PINNED_TTNN_VERSION = "0.81.1"

_cached: list[ModuleType | None] = []  # one import attempt per process


def import_ttnn() -> ModuleType | None:
    """Import and return ``ttnn`` configured for card-less host use, or None if it cannot be imported.

    Never raises: a missing wheel (CPython 3.11, macOS) and import-time failures of the native
    library both give None.
    """
    if _cached:
        return _cached[0]
    if "TT_METAL_MOCK_CLUSTER_DESC_PATH" not in os.environ:
        os.environ["TT_METAL_MOCK_CLUSTER_DESC_PATH"] = str(MOCK_CLUSTER_DESC)
        os.environ.setdefault("TT_LOGGER_LEVEL", "error")
    if "loguru" not in sys.modules:
        os.environ.setdefault("LOGURU_LEVEL", "INFO")
    try:
        import ttnn
    except (Exception, SystemExit):  # ImportError, OSError from the .so, RuntimeError from init ...
        ttnn = None
    _cached.append(ttnn)
    return ttnn
