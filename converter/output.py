"""Output folders that never destroy what the user did not ask to lose.

A folder is built under a hidden temporary name beside the target (`.NAME.partial-HOST-PID-START-*`,
naming the writer process so a later run can tell a dead writer's leftovers from a live one's) and
moved into place only when complete; any failure, SIGTERM or SIGHUP removes it. One run at a time
writes a target (an `flock` on `.NAME.lock` beside it). The target is refused when it is, holds or
lies inside a source, or is the working directory or holds it; an existing target is replaced
only when asked (`overwrite`) and only when vidport wrote it (its manifest says so), unless
`overwrite_any`. Files copied from a source (a tokenizer folder) are regular files inside it.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import signal
import socket
import stat
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import FrameType

import psutil

from vidport.converter.core.errors import VidportError
from vidport.converter.core.manifest import read_manifest

Notice = Callable[[str], None]

# .NAME.partial-HOST-PID-START-RANDOM: HOST a hash of the host name, START the writer's start time (ms)
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?:partial|old)-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-(?P<start>\d+)-[^.]+$")
_LEGACY = re.compile(r"^\.(?P<name>.+)\.(?:partial|old)-[a-z0-9_]{8}$")  # before owners were recorded


class Terminated(VidportError):
    """SIGTERM or SIGHUP arrived while an output folder was being written."""


def _host() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _owner() -> str:
    """HOST-PID-START of this process, written into the names of its temporary folders."""
    started = psutil.Process(os.getpid()).create_time()
    return f"{_host()}-{os.getpid()}-{round(started * 1000)}"


def _writer_alive(pid: int, start_ms: int) -> bool:
    """Whether the process that recorded (pid, start) still runs; a reused pid has another start time."""
    try:
        started = psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True  # it exists and we cannot tell: keep its folder
    return abs(started * 1000 - start_ms) < 2000


def _size(folder: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def _human(size: int) -> str:
    if size < 1000:
        return f"{size} B"
    value = float(size)
    for unit in ("KB", "MB", "GB"):
        value /= 1000
        if value < 1000 or unit == "GB":
            break
    return f"{value:.1f} {unit}"


def remove_stale(parent: Path, name: str) -> list[str]:
    """Remove the temporary folders in `parent` whose writer (recorded in the name) is dead; say
    what was removed, and name the leftovers of older versions (no owner recorded) for `name`."""
    removed, lines, legacy = [], [], []
    host = _host()
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return []
    for entry in entries:
        found = _LEFTOVER.match(entry.name)
        if found is None:
            if _LEGACY.match(entry.name) and _LEGACY.match(entry.name)["name"] == name:
                legacy.append(entry.name)
            continue
        if found["host"] != host or not entry.is_dir(follow_symlinks=False):
            continue  # another machine's run (a shared disk), or not ours
        if _writer_alive(int(found["pid"]), int(found["start"])):
            continue
        size = _size(Path(entry.path))
        shutil.rmtree(entry.path, ignore_errors=True)
        if not os.path.lexists(entry.path):
            removed.append(f"{entry.name} ({_human(size)})")
    if removed:
        lines.append(f"removed what interrupted runs left in {parent}: {', '.join(removed)}")
    if legacy:
        lines.append(f"{parent}: {', '.join(legacy)} left by an older vidport run (no owner recorded); "
                     f"delete by hand once no run writes {name}")
    return lines


@contextlib.contextmanager
def _target_lock(out: Path) -> Iterator[Path]:
    """Hold `.NAME.lock` beside `out` for the run; a second run on the same `out` is refused."""
    path = out.parent / f".{out.name}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise VidportError(f"{out}: another vidport run is writing it (it holds {path})",
                               hint="wait for that run to end, or choose another --out") from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed the file as we opened it: lock the new one
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # while still held, so no later run locks a removed file
        os.close(fd)


def _lineage(path: Path) -> list[tuple[Path, tuple[int, int]]]:
    """`path` (symlinks resolved) and each of its parents that exists, with its (device, inode)."""
    resolved = Path(os.path.realpath(path))
    found = []
    for each in (resolved, *resolved.parents):
        with contextlib.suppress(OSError):
            status = os.stat(each)
            found.append((each, (status.st_dev, status.st_ino)))
    return found


def check_target(out: Path, sources: Iterable[Path] = ()) -> None:
    """Refuse an output path that is, holds or lies inside a source, or is or holds the working directory."""
    out_chain = _lineage(out)
    out_id = out_chain[0][1] if out_chain and out_chain[0][0] == Path(os.path.realpath(out)) else None
    inside = {identity for _path, identity in out_chain}  # out itself and every folder above it
    hint = "choose another --out: a new folder beside the source, not the source or a folder around it"
    for source in sources:
        source_chain = _lineage(Path(source))
        if not source_chain or source_chain[0][0] != Path(os.path.realpath(source)):
            continue  # a source that is not there holds nothing
        if out_id is not None and source_chain[0][1] == out_id:
            raise VidportError(f"{out}: is the source {source}; the output must be another path", hint=hint)
        if out_id is not None and out_id in {identity for _path, identity in source_chain[1:]}:
            raise VidportError(f"{out}: holds the source {source}; replacing it would delete the source", hint=hint)
        if source_chain[0][1] in inside:
            raise VidportError(f"{out}: lies inside the source {source}; vidport does not write into a source",
                               hint=hint)
    if out_id is not None:
        cwd_chain = _lineage(Path.cwd())
        if cwd_chain and cwd_chain[0][1] == out_id:
            raise VidportError(f"{out}: is the working directory; the output must be a folder of its own",
                               hint="choose another --out, e.g. a new folder name")
        if out_id in {identity for _path, identity in cwd_chain}:
            raise VidportError(f"{out}: holds the working directory {Path.cwd()}; replacing it would delete it",
                               hint="choose another --out, e.g. a new folder name")


def written_by_vidport(path: Path) -> bool:
    """Whether `path` is a folder vidport wrote: its manifest reads, says vidport, and names its target."""
    if not path.is_dir():
        return False
    try:
        manifest = read_manifest(path)
    except (VidportError, OSError):
        return False
    return manifest.get("tool") == "vidport" and isinstance(manifest.get("target"), dict)


def _check_replaceable(out: Path, overwrite: bool, overwrite_any: bool) -> bool:
    """Whether `out` exists now; refuse when it does and may not be replaced."""
    if not os.path.lexists(out):
        return False
    if not (overwrite or overwrite_any):
        raise VidportError(f"{out}: already exists", hint="pass --overwrite to replace it, or choose another --out")
    if not overwrite_any and not written_by_vidport(out):
        raise VidportError(f"{out}: exists and is not a folder vidport wrote (no vidport_manifest.json naming "
                           "its target); --overwrite replaces only vidport's output",
                           hint="choose another --out, or pass --overwrite-any to replace it all the same")
    return True


@contextlib.contextmanager
def _terminate_raises(out: Path) -> Iterator[None]:
    """SIGTERM / SIGHUP raise Terminated while the folder is written (main thread only), so the
    temporary folder is removed at once instead of left behind."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: FrameType | None) -> None:
        raise Terminated(f"{out}: interrupted by {signal.Signals(signum).name}")

    previous = {number: signal.signal(number, handler) for number in (signal.SIGTERM, signal.SIGHUP)
                if signal.getsignal(number) is not signal.SIG_IGN}  # nohup's ignored SIGHUP stays ignored
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


def current_umask() -> int:
    """The process umask (set and put back): new files' modes, for temporary files made 0600/0700."""
    current = os.umask(0o022)
    os.umask(current)
    return current


@contextlib.contextmanager
def atomic_folder(out: Path, overwrite: bool = False, *, overwrite_any: bool = False, sources: Iterable[Path] = (),
                  notice: Notice | None = None) -> Iterator[Path]:
    """A temporary folder to fill; moved to `out` when the block ends, removed on any failure.
    `sources`: the paths the run reads, which `out` must not be, hold or lie in. `notice` hears
    one line for each cleanup of what interrupted runs left."""
    out = Path(os.path.abspath(out))
    tell = notice or logging.getLogger(__name__).warning
    check_target(out, list(sources))
    _check_replaceable(out, overwrite, overwrite_any)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _target_lock(out):
        for line in remove_stale(out.parent, out.name):
            tell(line)
        existed = _check_replaceable(out, overwrite, overwrite_any)
        owner = _owner()
        temp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{owner}-", dir=out.parent))
        try:
            with _terminate_raises(out):
                os.chmod(temp, 0o777 & ~current_umask())
                yield temp
                if os.path.lexists(out) and not existed:
                    raise VidportError(f"{out}: appeared while this run wrote it (not by vidport: it locks "
                                       f"{out.parent / ('.' + out.name + '.lock')}); left as it is",
                                       hint="run again once nothing else writes there, or choose another --out")
                if os.path.lexists(out) and _check_replaceable(out, overwrite, overwrite_any):
                    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{owner}-", dir=out.parent))
                    os.replace(out, old / "replaced")
                    os.replace(temp, out)
                    shutil.rmtree(old)
                else:
                    os.replace(temp, out)
        except Terminated as err:
            shutil.rmtree(temp, ignore_errors=True)
            raise Terminated(f"{err.message}; removed its partial output {temp.name}",
                             hint=f"{out} is as it was before the run") from None
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise


def source_files(path: Path, root: Path) -> list[tuple[Path, Path]]:
    """The files to copy from `path` (a file, or a folder walked): (path inside it, file to read).
    Only regular files inside `root`: a symbolic link is followed only to a regular file inside
    `root` or to the blob of the Hugging Face cache snapshot holding it; anything else is refused by name."""
    root_real = Path(os.path.realpath(root))
    found: list[tuple[Path, Path]] = []

    def visit(each: Path, relative: Path) -> None:
        status = os.lstat(each)
        if stat.S_ISLNK(status.st_mode):
            found.append((relative, _followed(each, root_real)))
        elif stat.S_ISDIR(status.st_mode):
            for entry in sorted(os.scandir(each), key=lambda e: e.name):
                visit(Path(entry.path), relative / entry.name)
        elif stat.S_ISREG(status.st_mode):
            found.append((relative, each))
        else:
            raise VidportError(f"{each}: not a regular file or folder; vidport copies only regular files",
                               hint="remove it from the source folder")

    visit(Path(path), Path())
    return found


def _followed(link: Path, root_real: Path) -> Path:
    """The regular file a symlink in a source may point to; refuse every other link by name."""
    target = Path(os.path.realpath(link))
    refuse = f"{link}: a symbolic link to {target}"
    if not target.is_file():
        raise VidportError(f"{refuse}, which is not a regular file", hint="vidport copies only regular files")
    if target.is_relative_to(root_real) or _hub_blob(link, target):
        return target
    raise VidportError(f"{refuse}, outside {root_real}; vidport copies only files inside the source",
                       hint="replace the link by the file it should be, inside the source folder")


def _hub_blob(link: Path, target: Path) -> bool:
    """The Hugging Face cache layout: REPO/snapshots/REV/... links to REPO/blobs/HASH."""
    absolute = Path(os.path.abspath(link))
    for parent in absolute.parents:
        if parent.name == "snapshots":
            return target.parent == Path(os.path.realpath(parent.parent)) / "blobs"
    return False


def copy_files(files: list[tuple[Path, Path]], destination: Path) -> None:
    """Copy what `source_files` listed; a file swapped for a link since is refused (O_NOFOLLOW)."""
    for relative, source in files:
        target = destination / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(descriptor, "rb") as reader, open(target, "xb") as writer:
            if not stat.S_ISREG(os.fstat(reader.fileno()).st_mode):
                raise VidportError(f"{source}: not a regular file; vidport copies only regular files")
            shutil.copyfileobj(reader, writer, 1 << 20)
