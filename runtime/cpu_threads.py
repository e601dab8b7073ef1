"""Independent parts of one computation on several CPU threads at once.

MLX's CPU backend runs a stream's operations one after another on that stream's one thread; only
the matrix products inside it use more cores (OpenBLAS's threads). Everything else (the unfolding
copies of convolutions, norms, activations, attention's exponentials, residual adds) uses one core,
while torch runs the same kernels on all of them. Work that splits into independent parts (the frames of
the SD VAE's sliced decode) can run faster as parts computed at the same time, each on a thread with
its own MLX stream, with the BLAS (and native kernel) threads shared out between them: on a 2-core
Zen 4 machine the SD VAE decode's 16 frames took 59-61 s on two threads against 67-77 s one frame
after another. vidport's native kernels (runtime.native) spread that work over the cores
themselves; where they are loaded, parts run in turn (`workers_for`).
Not every model gains: the motion UNet's two guidance halves on two threads took 31-35 s against
27-28 s as one batch (the threads used less CPU in all, 149% against 161%, so they wait on each
other somewhere in MLX; not found yet), so the UNet keeps its batch whole.

Only on the CPU device (a GPU stream already uses the whole device). Each worker thread creates
its stream and destroys it before it ends (`mx.clear_streams`): MLX streams belong to the thread
that made them, and one left behind can abort the process at exit.
"""
from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import mlx.core as mx

from vidport.runtime import native
from vidport.runtime.blas import fixed_threads

T = TypeVar("T")

# Parts in flight at once. Each holds its own activations, so more workers cost memory as well
# as giving speed; two already use every core of a 2-core machine for the single-threaded work,
# and on bigger machines each worker's matrix products get cpu_count / 2 BLAS threads.
MAX_WORKERS = 2


_one_at_a_time = 0  # > 0 inside `one_at_a_time()`


@contextlib.contextmanager
def one_at_a_time() -> Iterator[None]:
    """Parts run in turn inside the block: for code that records the model's calls in order (the
    golden harness's taps, the benchmark's per-category clock)."""
    global _one_at_a_time
    _one_at_a_time += 1
    try:
        yield
    finally:
        _one_at_a_time -= 1


def workers_for(parts: int) -> int:
    """How many threads `map_parts` uses for `parts` parts here (1: run them in turn).
    VIDPORT_CPU_THREADS=1 turns the threads off. With vidport's native kernels loaded
    (runtime.native: convolutions, SiLU and norms on every core) parts run in turn too: the work
    the threads were for is already spread over the cores, and two streams at once were slower
    (8 SD VAE frames: 11.5 s against 9.7 s in turn)."""
    if _one_at_a_time or mx.default_device() != mx.cpu or os.environ.get("VIDPORT_CPU_THREADS") == "1":
        return 1
    if native.load() is not None:
        return 1
    return max(1, min(MAX_WORKERS, parts, os.cpu_count() or 1))


def map_parts(fn: Callable[[T], mx.array], parts: Sequence[T], shared: Any = ()) -> list[mx.array]:
    """[fn(part) for part in parts], each evaluated; with workers_for(len(parts)) > 1 the parts are
    computed on that many threads at once (each takes the next part when it finishes one). An
    exception in any part is raised here once every thread has stopped.

    `shared`: the arrays (any tree: a model's parameters, the inputs) the parts read. They are
    evaluated here first: an array still lazy belongs to this thread's stream, which another
    thread cannot evaluate (weights loaded lazily by mx.load, say)."""
    workers = workers_for(len(parts))
    mx.eval(shared)
    results: list[mx.array | None] = [None] * len(parts)
    if workers == 1:
        for index, part in enumerate(parts):
            results[index] = fn(part)
            mx.eval(results[index])
        return results
    next_index, lock, errors = iter(range(len(parts))), threading.Lock(), []

    def worker() -> None:
        stream = mx.new_stream(mx.cpu)
        try:
            with mx.stream(stream):
                while not errors:
                    with lock:
                        index = next(next_index, None)
                    if index is None:
                        return
                    results[index] = fn(parts[index])
                    mx.eval(results[index])
        except BaseException as err:  # noqa: BLE001  (re-raised in the calling thread)
            errors.append(err)
        finally:
            mx.clear_streams()

    threads_each = max(1, (os.cpu_count() or 1) // workers)
    with fixed_threads(threads_each), native.threads(threads_each):
        threads = [threading.Thread(target=worker, name=f"vidport-part-{i}") for i in range(workers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    if errors:
        raise errors[0]
    return results
