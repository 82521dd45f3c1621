"""`fidmed prepare` as a command: one registration per preparer (a toy preparer registered from this module alone
becomes a sub-command), and the runs that go wrong (an --out that is a file or read-only, a foreign image with
--overwrite, Ctrl-C, a killed parent with worker processes): one line, exit status 2 (130 for Ctrl-C), nothing
half-written or left behind.

The toy preparer needs no medical-format library: each ``*.txt`` source holds integers, one image per integer.
The tests that interrupt or kill a run start ``fidmed prepare toy`` in a subprocess, which imports this module to
register the toy (its workers import it again to unpickle the preparer).
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from fidmed.cli import main
from fidmed.data.folder import ImageFolderDataset
from fidmed.data.prepare import PREPARERS, BadSource, Preparer, PreparerInfo
from fidmed.data.prepare.output import JOURNAL_PREFIX, STATE_DIRNAME, TMP_PREFIX
from fidmed.data.prepare.sources import Discovery, Source, list_files
from fidmed.errors import DataError

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TOY_INFO = PreparerInfo(
    help="text files of integers -> flat grey squares (a test's toy)",
    description="Every *.txt under --src: one SIDE x SIDE image per integer, of that grey value.",
    example="--src TXT/ --out OUT [--side 4]",
    version="toy-1",
)
DELAY_ENV = "FIDMED_TEST_TOY_DELAY"  # seconds per image: lets the subprocess tests interrupt a run half-way


@dataclass(frozen=True)
class ToyPreparer(Preparer):
    side: int = 4

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--side", type=int, default=4, help="image side (default 4)")

    def steps(self) -> list[str]:
        return [f"every *.txt: one {self.side}x{self.side} image per integer, of that grey value"]

    def discover(self, src: Path) -> Discovery:
        files = list_files(src, (".txt",))
        if not files:
            raise DataError(f"no .txt files under {src}")
        return Discovery([Source(rel, (rel,)) for rel in files])

    def convert(self, src: Path, source: Source, emit) -> None:
        delay = float(os.environ.get(DELAY_ENV, "0"))
        for i, word in enumerate((src / source.files[0]).read_text().split()):
            if not word.isdigit():
                raise BadSource(f"{src / source.files[0]}: {word!r} is not a grey value")
            time.sleep(delay)
            emit.image(f"{Path(source.key).stem}_{i}.png", np.full((self.side, self.side), int(word) % 256, np.uint8))


def register_toy() -> None:
    PREPARERS.add("toy", ToyPreparer, info=TOY_INFO)


@pytest.fixture
def toy():
    register_toy()
    yield ToyPreparer
    PREPARERS.remove("toy")


def _txt_src(root: Path, n: int = 3, per_file: int = 2) -> Path:
    src = root / "txt"
    src.mkdir(parents=True)
    for k in range(n):
        (src / f"s{k:03d}.txt").write_text(" ".join(str(10 * k + i) for i in range(per_file)))
    return src


def _expected(n: int, per_file: int) -> dict[str, int]:
    return {f"s{k:03d}_{i}.png": (10 * k + i) % 256 for k in range(n) for i in range(per_file)}


def _png_values(out: Path) -> dict[str, int]:
    """Every image in ``out`` by name, as its (single) grey value; a partial or mixed image fails."""
    values = {}
    for path in sorted(out.glob("*.png")):
        with PIL.Image.open(path) as image:
            pixels = np.asarray(image)
        assert (pixels == pixels.flat[0]).all(), path
        values[path.name] = int(pixels.flat[0])
    return values


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fidmed: error: "), err
    return err[0]


# == one registration per preparer =============================================================================


def test_a_preparer_registered_from_one_module_is_a_subcommand(toy, tmp_path, capsys):
    src = _txt_src(tmp_path)
    out = tmp_path / "out"
    assert (
        main(["prepare", "toy", "--src", str(src), "--out", str(out), "--side", "3", "--workers", "1", "--no-progress"])
        == 0
    )
    assert "fidmed prepare toy: 6 images (6 x 3x3)" in capsys.readouterr().out
    assert _png_values(out) == _expected(3, 2)
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["preparer"], manifest["preparer_version"], manifest["params"]) == ("toy", "toy-1", {"side": 3})
    assert manifest["steps"] == ["every *.txt: one 3x3 image per integer, of that grey value"]
    assert len(ImageFolderDataset(out)) == 6
    # the help of `fidmed prepare` and of `fidmed prepare toy` come from the registration
    with pytest.raises(SystemExit):
        main(["prepare", "--help"])
    listing = capsys.readouterr().out
    assert TOY_INFO.help in " ".join(listing.split()) and f"fidmed prepare toy     {TOY_INFO.example}" in listing
    with pytest.raises(SystemExit):
        main(["prepare", "toy", "--help"])
    usage = capsys.readouterr().out
    assert TOY_INFO.description in usage and "--side SIDE" in usage and "--overwrite" in usage


def test_unregistered_preparers_are_not_subcommands(capsys):
    assert "toy" not in PREPARERS
    with pytest.raises(SystemExit):
        main(["prepare", "toy", "--src", "a", "--out", "b"])
    assert "invalid choice: 'toy'" in capsys.readouterr().err


def test_every_preparer_has_one_option_per_parameter_and_its_facts():
    assert set(PREPARERS.names()) >= {"xray", "ct", "mri", "cardiac", "dicom"}
    for entry in PREPARERS.entries():
        parser = argparse.ArgumentParser()
        entry.obj.add_arguments(parser)
        defaults = parser.parse_args([])
        assert set(vars(defaults)) == {f.name for f in dataclasses.fields(entry.obj)}, entry.name
        assert entry.obj.from_args(defaults) == entry.obj(), entry.name  # the options' defaults are the fields'
        info = entry.info
        assert info.help and info.description and info.example and info.version, entry.name
        assert entry.obj().name == entry.name and "\n" not in info.help


# == --out checked before any work =============================================================================


@pytest.fixture
def no_discovery(monkeypatch):
    """The checks of --out come before the sources are looked for."""

    def refuse(self, src):
        raise AssertionError("discover() ran before --out was checked")

    monkeypatch.setattr(ToyPreparer, "discover", refuse)


def test_out_naming_a_file(toy, no_discovery, tmp_path, capsys):
    src = _txt_src(tmp_path)
    for out in (tmp_path / "taken.png", tmp_path / "taken.png" / "sub"):
        (tmp_path / "taken.png").write_bytes(b"mine")
        assert main(["prepare", "toy", "--src", str(src), "--out", str(out), "--no-progress"]) == 2
        line = _one_line_error(capsys)
        assert f"{tmp_path / 'taken.png'} is a file, not a folder" in line
        assert (tmp_path / "taken.png").read_bytes() == b"mine"


def test_read_only_out(toy, no_discovery, tmp_path, monkeypatch, capsys):
    """A folder this process cannot write into. Root ignores the mode bits, so for root the kernel's answer to
    creating a file in it is given by os.open, which the writability check uses."""
    src = _txt_src(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("kept")
    out.chmod(0o555)
    if os.geteuid() == 0:
        real_open = os.open

        def read_only(path, flags, *args, **kwargs):
            if Path(path).parent == out and flags & os.O_CREAT:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", read_only)
    try:
        assert main(["prepare", "toy", "--src", str(src), "--out", str(out), "--workers", "1", "--no-progress"]) == 2
    finally:
        out.chmod(0o755)
    line = _one_line_error(capsys)
    assert f"cannot write into {out} (Permission denied)" in line and "writable" in line
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


# == --overwrite =================================================================================================


@pytest.mark.parametrize("foreign", ["mine.png", "sub/mine.png"])
def test_overwrite_checks_for_foreign_images_before_deleting_anything(toy, tmp_path, capsys, foreign):
    src = _txt_src(tmp_path)
    out = tmp_path / "out"
    argv = ["prepare", "toy", "--src", str(src), "--out", str(out), "--workers", "1", "--no-progress"]
    assert main(argv) == 0
    (out / foreign).parent.mkdir(exist_ok=True)
    PIL.Image.fromarray(np.zeros((4, 4), np.uint8)).save(out / foreign)
    before = _tree(out)
    capsys.readouterr()
    for more in (["--side", "5", "--overwrite"], []):  # other parameters with --overwrite; the same parameters
        assert main(argv + more) == 2
        line = _one_line_error(capsys)
        assert f"did not write (e.g. {out / foreign})" in line and "move them away" in line
        assert _tree(out) == before  # nothing deleted, nothing written


# == Ctrl-C and a killed parent ================================================================================


def _start(src: Path, out: Path, workers: int, delay: float) -> subprocess.Popen:
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import test_prepare_cli; test_prepare_cli.register_toy(); "
        "from fidmed.cli import main; sys.exit(main(sys.argv[2:]))"
    )
    env = {**os.environ, DELAY_ENV: str(delay), "PYTHONPATH": os.pathsep.join([str(REPO), str(HERE)])}
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            code,
            str(HERE),
            "prepare",
            "toy",
            "--src",
            str(src),
            "--out",
            str(out),
            "--workers",
            str(workers),
            "--no-progress",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _records(out: Path) -> list[dict]:
    path = out / STATE_DIRNAME / "state.jsonl"
    if not path.is_file():
        return []
    lines = []
    for line in path.read_text().splitlines()[1:]:
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return lines


def _wait_for_records(proc: subprocess.Popen, out: Path, n: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while len(_records(out)) < n:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run did not get going"
        time.sleep(0.05)


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _wait_gone(pids: list[int], message: str, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while any(_alive(pid) for pid in pids):
        assert time.monotonic() < deadline, message
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped by its new parent, counts as gone)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


@linux_only
def test_ctrl_c_stops_cleanly_and_the_same_command_resumes(tmp_path):
    src = _txt_src(tmp_path, n=60)
    out = tmp_path / "out"
    proc = _start(src, out, workers=2, delay=0.1)
    _wait_for_records(proc, out, 2)
    workers = _children(proc.pid)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal does: the whole foreground process group
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        f"fidmed prepare toy: interrupted; {out} keeps the finished sources, run the same command again to resume."
    )
    _wait_gone(workers, "worker processes outlived the interrupted run")
    # exactly the recorded sources' images remain, each complete; no temporary file, no journal, no manifest
    recorded = {o[0] for record in _records(out) for o in record["outputs"]}
    assert 0 < len(recorded) < 120
    values = _png_values(out)
    assert set(values) == recorded and all(values[name] == _expected(60, 2)[name] for name in values)
    assert not list(out.rglob(f"{TMP_PREFIX}*")) and not list(out.rglob(f"{JOURNAL_PREFIX}*"))
    assert not (out / "manifest.json").exists()
    resumed = _start(src, out, workers=1, delay=0)
    stdout, stderr = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, stderr
    assert f"{60 - len(recorded) // 2} source(s) converted, {len(recorded) // 2} already done" in stdout
    assert _png_values(out) == _expected(60, 2)


@linux_only
def test_workers_stop_when_the_parent_is_killed(tmp_path):
    src = _txt_src(tmp_path, n=60)
    out = tmp_path / "out"
    proc = _start(src, out, workers=2, delay=0.1)
    _wait_for_records(proc, out, 2)
    workers = _children(proc.pid)
    assert len(workers) >= 2  # the two workers (and multiprocessing's resource tracker)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    _wait_gone(workers, "worker processes outlived their parent")
    written = _tree(out)
    time.sleep(1.0)
    assert _tree(out) == written  # nothing more is written
    # and the same command finishes the job from there (a killed run's left-overs are its own)
    resumed = _start(src, out, workers=1, delay=0)
    _, stderr = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, stderr
    assert _png_values(out) == _expected(60, 2) and not list(out.rglob(f"{TMP_PREFIX}*"))


WATCHED_CHILD = """
import multiprocessing, os, sys, time
from pathlib import Path

def child(parent_pid, ready):
    from fidmed.data.prepare import runner

    runner._watch_parent(parent_pid)  # the portable fallback alone, without the Linux parent-death signal
    Path(ready).write_text(str(os.getpid()))
    time.sleep(120)

if __name__ == "__main__":
    process = multiprocessing.get_context("spawn").Process(target=child, args=(os.getpid(), sys.argv[1]))
    process.start()
    time.sleep(120)
"""


@linux_only
def test_the_portable_parent_watch_ends_the_worker(tmp_path):
    script, ready = tmp_path / "watched.py", tmp_path / "ready"
    script.write_text(WATCHED_CHILD)
    parent = subprocess.Popen([sys.executable, str(script), str(ready)], env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert parent.poll() is None and time.monotonic() < deadline, "the child did not start"
        time.sleep(0.05)
    time.sleep(0.1)
    child = int(ready.read_text())
    assert _alive(child)
    parent.kill()
    parent.wait(timeout=30)
    _wait_gone([child], "the child outlived its parent")
