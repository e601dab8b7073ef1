"""The output writer never destroys what the user did not ask to lose (issue 10): --out may not be,
hold or lie inside a source, nor be or hold the working directory; --overwrite replaces only what
vidport wrote; one run per --out (a lock); interrupted runs' temporary folders are removed (SIGTERM
at once, SIGKILL by the next run); copied folders give only regular files. And every CLI failure on
bad input is one line naming the file, exit 1, never a traceback."""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vidport.cli import INTERNAL_ERROR, app
from vidport.converter.core.errors import VidportError
from vidport.converter.output import _host, _owner, atomic_folder, remove_stale, source_files

runner = CliRunner()


def run_convert(source: Path, out: Path | str, *extra: str):
    return runner.invoke(app, ["convert", "animatediff-motion", str(source), "--target", "mlx", "--out", str(out), *extra])


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def error_line(result, *named: str) -> str:
    """Exit 1, no traceback, one `error:` line naming `named` (an optional hint line; progress bars aside)."""
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    progress = ("converting ", "comparing ", "animatediff-motion/")  # the plan and the bars printed before
    lines = [line for line in result.output.splitlines() if line.strip() and not line.startswith(progress)]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and all(line in errors or line.startswith("  hint: ") for line in lines), result.output
    for name in named:
        assert name in errors[0], errors[0]
    return errors[0]


@pytest.fixture()
def source(motion_sources, tmp_path) -> Path:
    """A motion module alone in its own folder (so the folder around it is the test's)."""
    folder = tmp_path / "models"
    folder.mkdir()
    copy = folder / "mm_v2.ckpt"
    shutil.copyfile(motion_sources["v2"], copy)
    return copy


# --out that is, holds or lies inside a source, or is the working directory


def test_out_is_the_source_file(source):
    before = digest(source)
    error_line(run_convert(source, source, "--overwrite-any"), str(source), "is the source")
    assert digest(source) == before


def test_out_holds_the_source(source):
    (source.parent / "notes.txt").write_text("mine")
    error_line(run_convert(source, source.parent, "--overwrite-any"), str(source.parent), "holds the source")
    assert (source.parent / "notes.txt").read_text() == "mine" and source.exists()


def test_out_inside_a_source_folder(motion_sources, tmp_path):
    folder = tmp_path / "adapter"
    shutil.copytree(motion_sources["diffusers"], folder)
    before = sorted(p.name for p in folder.iterdir())
    error_line(run_convert(folder, folder / "mlx"), str(folder / "mlx"), "lies inside the source")
    assert sorted(p.name for p in folder.iterdir()) == before  # not even a lock file


def test_out_is_or_holds_the_working_directory(source, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("mine")
    monkeypatch.chdir(work)
    error_line(run_convert(source, ".", "--overwrite-any"), str(work), "is the working directory")
    outside = tmp_path / "elsewhere" / "mm.ckpt"  # a source that does not lie under the working directory's parent
    outside.parent.mkdir()
    shutil.copyfile(source, outside)
    nested = work / "inner"
    nested.mkdir()
    monkeypatch.chdir(nested)
    error_line(run_convert(outside, "..", "--overwrite-any"), str(work), "holds the working directory")
    assert (work / "keep.txt").read_text() == "mine"


# --overwrite replaces only vidport's output; --overwrite-any anything else


def test_overwrite_replaces_only_what_vidport_wrote(source, tmp_path):
    plain = tmp_path / "photos"
    plain.mkdir()
    (plain / "holiday.jpg").write_text("precious")
    error_line(run_convert(source, plain, "--overwrite"), str(plain), "not a folder vidport wrote")
    assert (plain / "holiday.jpg").read_text() == "precious"
    forged = tmp_path / "forged"
    forged.mkdir()
    (forged / "vidport_manifest.json").write_text("{not json")
    error_line(run_convert(source, forged, "--overwrite"), str(forged), "not a folder vidport wrote")

    out = tmp_path / "mlx"
    assert run_convert(source, out).exit_code == 0
    (out / "marker").write_text("old run")
    result = run_convert(source, out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (out / "marker").exists() and (out / "model.safetensors").is_file()

    result = run_convert(source, plain, "--overwrite-any")  # asked for: replaced
    assert result.exit_code == 0, result.output
    assert not (plain / "holiday.jpg").exists() and (plain / "vidport_manifest.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# one run per --out


def test_a_held_lock_refuses_a_second_run(source, tmp_path):
    out = tmp_path / "mlx"
    lock = tmp_path / ".mlx.lock"
    descriptor = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(descriptor, fcntl.LOCK_EX)  # as a running conversion holds it
    try:
        error_line(run_convert(source, out), str(out), "another vidport run is writing it", str(lock))
        assert not out.exists()
    finally:
        os.close(descriptor)
    assert run_convert(source, out).exit_code == 0
    assert not lock.exists()  # removed by the run that held it last


def test_two_racing_conversions_one_writes(source, tmp_path):
    from vidport.converter.convert import convert, plan_conversion

    out = tmp_path / "mlx"
    plan = plan_conversion(source, "mlx", "animatediff-motion")
    outcomes: list[str] = []
    start = threading.Barrier(2)

    def one() -> None:
        start.wait()
        try:
            convert(plan, out)
            outcomes.append("wrote")
        except VidportError as err:
            outcomes.append(err.message)

    threads = [threading.Thread(target=one) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes)[-1] == "wrote" and outcomes.count("wrote") == 1, outcomes
    refused = next(o for o in outcomes if o != "wrote")
    assert "another vidport run is writing it" in refused or "already exists" in refused


def test_a_target_that_appears_during_the_run_is_kept(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(VidportError, match="appeared while this run wrote it"):
        with atomic_folder(out) as temp:
            (temp / "ours").write_text("new")
            out.mkdir()
            (out / "theirs").write_text("someone else's")
    assert (out / "theirs").read_text() == "someone else's" and not (out / "ours").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# interrupted runs

WRITER = """
import sys, time
from pathlib import Path
from vidport.converter.core.errors import VidportError
from vidport.converter.output import atomic_folder

try:
    with atomic_folder(Path(sys.argv[1])) as temp:
        (temp / "model.safetensors").write_bytes(bytes(1 << 20))
        print(temp, flush=True)
        time.sleep(120)
except VidportError as err:
    print(err.message, flush=True)
    sys.exit(1)
"""


def start_writer(out: Path) -> tuple[subprocess.Popen, Path]:
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(out)], stdout=subprocess.PIPE, text=True)
    temp = Path(writer.stdout.readline().strip())
    assert temp.is_dir() and temp.name.startswith(".mlx.partial-"), temp
    return writer, temp


def test_sigkill_leaves_a_partial_folder_the_next_run_removes(source, tmp_path):
    out = tmp_path / "mlx"
    writer, temp = start_writer(out)
    writer.kill()
    writer.wait(timeout=30)
    writer.stdout.close()
    assert temp.is_dir()  # SIGKILL cannot be caught
    result = run_convert(source, out)
    assert result.exit_code == 0, result.output
    assert not temp.exists()
    note = next(line for line in result.output.splitlines() if line.startswith("note: "))
    assert "removed" in note and temp.name in note and "1.0 MB" in note
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "models") == ["mlx"]


def test_sigterm_removes_the_partial_folder_at_once(tmp_path):
    out = tmp_path / "mlx"
    writer, temp = start_writer(out)
    writer.send_signal(signal.SIGTERM)
    said = writer.stdout.read()
    assert writer.wait(timeout=30) == 1
    writer.stdout.close()
    assert "interrupted by SIGTERM" in said and f"removed its partial output {temp.name}" in said
    assert list(tmp_path.iterdir()) == []  # no partial folder, no lock file, no output


def test_an_ignored_sighup_stays_ignored(tmp_path):
    """Under nohup a closed terminal's SIGHUP must not stop the conversion."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with atomic_folder(tmp_path / "out") as temp:
            os.kill(os.getpid(), signal.SIGHUP)
            (temp / "weights").write_text("done")
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert (tmp_path / "out" / "weights").read_text() == "done"


def test_only_dead_writers_folders_are_removed(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)
    live = tmp_path / f".out.partial-{_owner()}-live0000"  # this process: still writing
    reused = tmp_path / f".out.partial-{_host()}-{os.getpid()}-123-reused00"  # our pid, another start time
    dead = tmp_path / f".out.partial-{_host()}-{dead_pid}-123-dead0000"
    remote = tmp_path / f".out.partial-00000000-{dead_pid}-123-remote00"  # another machine's (a shared disk)
    for folder in (live, reused, dead, remote):
        folder.mkdir()
    lines = remove_stale(tmp_path, "out")
    assert live.exists() and remote.exists() and not reused.exists() and not dead.exists()
    assert len(lines) == 1 and reused.name in lines[0] and dead.name in lines[0] and live.name not in lines[0]


# copied folders: regular files inside the source only


def test_a_symlink_in_the_tokenizer_folder_is_refused(tmp_path):
    from fixtures.pipelines import write_sd_pipeline_folder

    folder = write_sd_pipeline_folder(tmp_path / "sd15")
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    (folder / "tokenizer" / "special_tokens_map.json").symlink_to(secret)
    out = tmp_path / "out"
    result = runner.invoke(app, ["convert", "sd15", str(folder), "--target", "mlx", "--out", str(out)])
    line = error_line(result, str(folder / "tokenizer" / "special_tokens_map.json"), "symbolic link", str(secret))
    assert "outside" in line and not out.exists()


def test_source_files_follow_links_only_inside(tmp_path):
    root = tmp_path / "snapshots" / "rev"
    part = root / "tokenizer"
    part.mkdir(parents=True)
    (part / "vocab.json").write_text("{}")
    (part / "same.json").symlink_to(part / "vocab.json")  # inside: read as the file it names
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (blobs / "abc123").write_text("merges")
    (part / "merges.txt").symlink_to(blobs / "abc123")  # the Hugging Face cache layout
    listed = {str(relative): source for relative, source in source_files(part, root)}
    assert listed == {"merges.txt": blobs / "abc123", "same.json": part / "vocab.json", "vocab.json": part / "vocab.json"}

    (part / "sub").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(VidportError, match=r"sub: a symbolic link to .*not a regular file"):
        source_files(part, root)
    (part / "sub").unlink()
    os.mkfifo(part / "pipe")
    with pytest.raises(VidportError, match="pipe: not a regular file or folder"):
        source_files(part, root)
    (part / "pipe").unlink()
    elsewhere = tmp_path / "other"
    elsewhere.write_text("x")
    (part / "x.json").symlink_to(elsewhere)
    with pytest.raises(VidportError, match="x.json: a symbolic link to .*outside"):
        source_files(part, root)


# one line, never a traceback


@pytest.fixture(scope="module")
def converted(motion_sources, tmp_path_factory) -> Path:
    from vidport.converter.convert import convert, plan_conversion

    out = tmp_path_factory.mktemp("verify") / "mm-mlx"
    convert(plan_conversion(motion_sources["v2"], "mlx", "animatediff-motion"), out)
    return out


def damaged(converted: Path, tmp_path: Path, edit) -> Path:
    folder = tmp_path / "damaged"
    shutil.copytree(converted, folder)
    edit(folder)
    return folder


def edit_manifest(change):
    def edit(folder: Path) -> None:
        path = folder / "vidport_manifest.json"
        manifest = json.loads(path.read_text())
        change(manifest)
        path.write_text(json.dumps(manifest))
    return edit


@pytest.mark.parametrize("edit, named, what", [
    pytest.param(lambda f: (f / "vidport_manifest.json").write_text("{oops"), "vidport_manifest.json",
                 "not valid JSON", id="not JSON"),
    pytest.param(lambda f: (f / "vidport_manifest.json").write_text("[1]"), "vidport_manifest.json", "JSON object",
                 id="a list"),
    pytest.param(edit_manifest(lambda m: m.__setitem__("family", "no-such-family")), "vidport_manifest.json",
                 "unknown model family 'no-such-family'", id="unknown family"),
    pytest.param(edit_manifest(lambda m: m.pop("target")), "vidport_manifest.json", "no 'target'", id="no target"),
    pytest.param(edit_manifest(lambda m: m.__setitem__("target", "mlx")), "vidport_manifest.json",
                 "'target' must be a JSON object", id="target a string"),
    pytest.param(edit_manifest(lambda m: m["spec"].__setitem__("name", "nope")), "vidport_manifest.json",
                 "source spec 'nope'", id="unknown spec"),
    pytest.param(lambda f: (f / "model.safetensors").unlink(), "model.safetensors", "missing", id="missing weights"),
    pytest.param(lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:3000]),
                 "model.safetensors", "not a readable safetensors file", id="corrupt weights"),
])
def test_verify_bad_folder_is_one_line(converted, tmp_path, edit, named, what):
    folder = damaged(converted, tmp_path, edit)
    error_line(runner.invoke(app, ["verify", str(folder)]), str(folder / named), what)


def test_verify_source_folder_where_a_file_was_converted(converted, motion_sources):
    folder = motion_sources["v2"].parent
    error_line(runner.invoke(app, ["verify", str(converted), "--source", str(folder)]), str(folder),
               "a folder, but", "converted from a file")


def test_inspect_a_damaged_manifest_is_one_line(converted, tmp_path):
    folder = damaged(converted, tmp_path, edit_manifest(lambda m: m.__setitem__("config", [1, 2])))
    error_line(runner.invoke(app, ["inspect", str(folder)]), str(folder / "vidport_manifest.json"), "'config'")


def test_an_os_error_names_the_path(source, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    error_line(run_convert(source, blocker / "out"), str(blocker))


def test_an_unexpected_error_is_one_line_and_debug_shows_it(monkeypatch):
    import vidport.converter.spec as spec

    def broken(*_args, **_kwargs):
        raise KeyError("boom")

    monkeypatch.setattr(spec, "load_catalog", broken)
    result = runner.invoke(app, ["models"])
    assert result.exit_code == INTERNAL_ERROR and "Traceback" not in result.output
    assert result.output.splitlines()[0] == "internal error: KeyError: 'boom'"
    assert "--debug" in result.output
    debug = runner.invoke(app, ["--debug", "models"])
    assert isinstance(debug.exception, KeyError)
