"""The processes of one run under `mlx.launch`: the group, this process's rank, the parallel plan,
a watchdog over every wait on the other ranks, and `launch` (what `vidport generate --launch` runs).

Communication is MLX's own (`mx.distributed`: ring over TCP, MPI, JACCL); nothing here sends a byte.

Why a watchdog: over the ring backend a rank that dies closes its sockets, and the others fail at
their next collective with "[ring] connection to a peer was lost" within a few seconds (measured:
3 s with a rank SIGKILLed mid-run); that error is turned into one line here. But a rank that stops
without closing its sockets (SIGSTOP, a hung host, a cable pulled) leaves the others waiting
forever (measured: an all_sum waited until killed). So every evaluation that waits on the other
ranks runs under a deadline (`collective_timeout`, 300 s unless set): past it the process says so in
one line and exits 1, and `mlx.launch` then stops the rest.

Why `launch`: `mlx.launch` (mlx 0.32.4) exits 0 even when a rank failed (it only prints a warning
per failed rank), so `vidport generate --launch` runs it, passes its output through and turns
those warnings into a non-zero exit status.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from vidport.converter.core.errors import VidportError, closest

PLANS = ("cfg", "sequence", "tensor")
DEFAULT_TIMEOUT = 300.0
# mlx.launch's warning for a rank that exited non-zero or was killed (mlx/_distributed_utils/launch.py)
FAILED_RANK = re.compile(r"Node with rank (\d+) (exited with code (-?\d+)|was killed)")


class Watchdog:
    """A deadline over one wait at a time: `with watchdog.guard("step 3"):` exits the process with
    one line if the block has not finished within `timeout` seconds."""

    def __init__(self, rank: int, timeout: float = DEFAULT_TIMEOUT):
        self.rank = rank
        self.timeout = timeout
        self._deadline: tuple[float, str] | None = None
        self._cleanups: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @contextmanager
    def guard(self, what: str) -> Iterator[None]:
        with self._lock:
            self._deadline = (time.monotonic() + self.timeout, what)
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="vidport-watchdog", daemon=True)
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                self._deadline = None

    @contextmanager
    def cleanup(self, action: Callable[[], None]) -> Iterator[None]:
        """Run `action` (remove a partial output) if the deadline passes inside the block: the
        process then ends with os._exit, which runs no `finally` or `with` exit of the main thread."""
        self._cleanups.append(action)
        try:
            yield
        finally:
            self._cleanups.remove(action)

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, self.timeout / 4))
            with self._lock:
                expired = self._deadline is not None and time.monotonic() > self._deadline[0]
                what = self._deadline[1] if expired else ""
            if expired:
                sys.stderr.write(f"error: rank {self.rank}: no answer from the other ranks within {self.timeout:g} s "
                                 f"({what}): a rank died, hangs or cannot be reached; stopping\n")
                sys.stderr.flush()
                for action in list(self._cleanups):
                    try:
                        action()
                    except Exception as err:  # the exit goes ahead: say what was left behind
                        sys.stderr.write(f"rank {self.rank}: cleanup failed: {err}\n")
                os._exit(1)


@dataclass
class World:
    """This run's processes: `group` is MLX's (None in a process not launched by mlx.launch)."""

    group: Any
    rank: int
    size: int
    watchdog: Watchdog

    @property
    def is_main(self) -> bool:
        """Rank 0: it prints, decodes and writes the output; the others only compute."""
        return self.rank == 0

    def evaluate(self, *arrays: Any, what: str) -> None:
        """mx.eval of arrays whose graph waits on the other ranks, under the watchdog; a lost peer
        becomes one line."""
        import mlx.core as mx

        if self.size == 1:
            mx.eval(*arrays)
            return
        try:
            with self.watchdog.guard(what):
                mx.eval(*arrays)
        except RuntimeError as err:
            if "[ring]" not in str(err) and "[mpi]" not in str(err):
                raise
            raise VidportError(f"lost the connection to another rank during {what} ({err}): "
                               "a rank died or was stopped; no output written") from err

    def agree(self, value: int) -> int:
        """Rank 0's integer on every rank (a seed drawn on rank 0)."""
        import mlx.core as mx

        if self.size == 1:
            return value
        total = mx.distributed.all_sum(mx.array(value if self.is_main else 0, dtype=mx.int64), group=self.group)
        self.evaluate(total, what="agreeing on the seed")
        return int(total.item())


_world: World | None = None


def world() -> World:
    """This process's world, initialised once: size 1 unless started by mlx.launch. Joining the
    group runs under the watchdog (a host that cannot be reached leaves the ring waiting)."""
    global _world
    if _world is None:
        import mlx.core as mx

        launched = "MLX_RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ
        rank = int(os.environ.get("MLX_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")))
        watchdog = Watchdog(rank)
        if not launched or not mx.distributed.is_available():
            _world = World(None, 0, 1, watchdog)
        else:
            with watchdog.guard("joining the group"):
                group = mx.distributed.init()
            _world = World(group, group.rank(), group.size(), watchdog)
            watchdog.rank = group.rank()
    return _world


def parse_plan(value: Any) -> str | None:
    """`--set parallel=PLAN`: one of PLANS, or None for a single process."""
    if value is None or value == "none":
        return None
    if value not in PLANS:
        near = closest(str(value), PLANS)
        raise VidportError(f"--set parallel={value}: no such plan" + (f" (did you mean {near}?)" if near else ""),
                           hint=f"plans: {', '.join(PLANS)}")
    return value


def parse_timeout(value: Any) -> float:
    """`--set collective_timeout=SECONDS`: how long a rank waits on the others before giving up."""
    if value is None:
        return DEFAULT_TIMEOUT
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise VidportError(f"--set collective_timeout={value}: expected a positive number of seconds")
    return float(value)


def strip_option(argv: list[str], option: str) -> list[str]:
    """argv without `option VALUE` / `option=VALUE`."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out


def free_ports(count: int) -> int:
    """A first port with `count` consecutive free ones after it on this machine."""
    import random
    import socket

    for _ in range(100):
        base = random.randint(20000, 60000)
        try:
            for port in range(base, base + count):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise VidportError("no free ports for the ring backend on this machine",
                       hint="pass mlx.launch's --starting-port PORT in --launch")


def local_ring_args(args: list[str]) -> list[str]:
    """mlx.launch's arguments, with free ports for a ring on this machine: its ring listens on
    32323 and up unless told, so two local runs at once (two users, two test files) would
    otherwise connect to each other's ranks. Runs on hosts, other backends, or a port already
    given are left as they are."""
    options = {a.split("=", 1)[0] for a in args if a.startswith("-")}
    backend = next((b for a, b in zip(args, args[1:]) if a == "--backend"), "ring")
    if options & {"--hosts", "--hostfile", "--starting-port", "-p"} or backend != "ring":
        return args
    ranks = next((b for a, b in zip(args, args[1:]) if a in ("-n", "--repeat-hosts")), "1")
    return [*args, "--starting-port", str(free_ports(int(ranks) if ranks.isdigit() else 1))]


def launch(launcher_args: str, argv: list[str], program: str | Path) -> int:
    """Run `program argv` on the processes `launcher_args` describes (mlx.launch's own options, e.g.
    "-n 2 --backend ring" or "--hostfile hosts.json"), with this interpreter named explicitly (as
    mlx.launch needs for a non-Python command) and free ports for a local ring; its output passes through. Returns 1 if any rank
    failed (mlx.launch itself returns 0 then), else mlx.launch's status. A rank that was killed
    cannot say so itself: that gets one line here."""
    launcher = Path(sys.executable).with_name("mlx.launch")
    if not launcher.exists():
        found = shutil.which("mlx.launch")
        if found is None:
            raise VidportError("--launch: mlx.launch is not installed beside this Python",
                               hint="pip install mlx (it ships mlx.launch)")
        launcher = Path(found)
    command = [str(launcher), *local_ring_args(shlex.split(launcher_args)), "--python", sys.executable, "--",
               str(program), *argv]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, errors="replace")
    failures = []
    for line in process.stderr:
        found = FAILED_RANK.search(line)
        if found:
            failures.append(found)
        sys.stderr.write(line)
        sys.stderr.flush()
    status = process.wait()
    first = failures[0] if failures else None
    if first is not None and (first[3] is None or int(first[3]) < 0):  # the rank could not say why itself
        how = f"was killed by signal {-int(first[3])}" if first[3] else "was killed"
        sys.stderr.write(f"error: rank {first[1]} {how}; mlx.launch stopped the other ranks; no output written\n")
    return status or int(bool(failures))
