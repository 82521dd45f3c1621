""":func:`run_prepare`: one preparer over a raw folder, resumable, in parallel worker processes.

* **Checks first**: the source folder, ``--out`` (a folder, or creatable, and writable), the sources found, the
  parameters of an earlier run in ``--out`` and images there that ``fidmed prepare`` did not write are all checked
  before anything is deleted or written; a failed check is one :class:`~fidmed.errors.DataError` naming the fix.
* **Resume**: a source whose state record matches its files (sizes and mtimes) and whose outputs exist is kept;
  the others are redone (see :mod:`fidmed.data.prepare.output` for the folder's layout).
* **Parameters**: a folder prepared with other parameters is refused (the differences are listed) unless
  ``overwrite`` is set, which deletes the images the earlier run wrote (never other files).
* **Bad sources** (unreadable, truncated, NaN, wrong dimensionality, 16-bit where 8-bit is expected ...): the
  preparer raises :class:`~fidmed.data.prepare.preparer.BadSource`; by default the source is skipped and listed
  (on the console and in the manifest's ``skipped``), with ``strict`` the run stops with the file's name.
* **Parallelism**: sources are converted in worker processes (``spawn``; ITK uses one thread per worker) with a
  tqdm progress bar; ``workers=1`` converts in this process. The workers stop with this process, even when it is
  killed (SIGKILL): on Linux the kernel kills them (``PR_SET_PDEATHSIG``), elsewhere a thread in each worker
  waits on the pipe :mod:`multiprocessing` keeps to the parent and exits the worker when it closes.
* **Interruption** (Ctrl-C, or any error during the run): the workers are stopped, and the images and temporary
  files of the sources that were not finished are removed, so ``--out`` holds exactly the finished sources; the
  same call resumes. The exception is re-raised (``fidmed prepare`` turns Ctrl-C into a one-line message and exit
  status 130).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fidmed.data.prepare.output import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    TMP_PREFIX,
    Emitter,
    ResumeState,
    build_manifest,
    image_files,
    make_output_folder,
    recorded_outputs,
    remove_created,
    remove_temporaries,
    write_json_atomic,
)
from fidmed.data.prepare.preparer import BadSource, Preparer
from fidmed.data.prepare.sources import Source
from fidmed.errors import DataError

__all__ = ["TMP_PREFIX", "PrepareReport", "convert_source", "run_prepare"]

log = logging.getLogger("fidmed.prepare")


@dataclass
class PrepareReport:
    """What :func:`run_prepare` did."""

    out: Path
    manifest: dict[str, Any]
    converted: int  # sources converted in this run
    reused: int  # sources finished by an earlier run and skipped
    skipped: list[dict[str, Any]]  # every skipped source or slice: {"source", "where", "reason"}

    @property
    def num_images(self) -> int:
        return int(self.manifest["counts"]["images"])


# -- one source -------------------------------------------------------------------------------------------------


def _file_stats(src: Path, files: tuple[str, ...] | list[str]) -> list[list[Any]]:
    stats = []
    for rel in files:
        st = (src / rel).stat()
        stats.append([rel, st.st_size, st.st_mtime_ns])
    return stats


def convert_source(preparer: Preparer, src: Path, out: Path, source: Source) -> dict[str, Any]:
    """Convert one source (in a worker process or in this one) and return its state record."""
    emit = Emitter(out)
    status, reason = "ok", None
    try:
        stats = _file_stats(src, source.files)
        preparer.convert(src, source, emit)
    except BadSource as exc:
        emit.discard()
        status, reason = "bad", str(exc)
    except FileNotFoundError as exc:
        emit.discard()
        stats = []
        status, reason = "bad", f"file vanished during the run ({exc})"
    return {
        "key": source.key,
        "files": stats,
        "status": status,
        "reason": reason,
        "outputs": [list(o) for o in emit.outputs],
        "skipped": [list(s) for s in emit.skipped],
        "file_errors": emit.file_errors,
        "counts": dict(sorted(emit.counts.items())),
    }


def _record_is_current(record: dict[str, Any] | None, src: Path, source: Source, out: Path) -> bool:
    if record is None or [r[0] for r in record["files"]] != list(source.files):
        return False
    try:
        if record["files"] != _file_stats(src, source.files):
            return False
    except FileNotFoundError:
        return False
    return all((out / o[0]).is_file() for o in record["outputs"])


# -- worker processes -------------------------------------------------------------------------------------------


def _init_worker(parent_pid: int | None = None) -> None:
    """First thing in every worker process: stop with the parent (``parent_pid``, default: the current parent),
    leave Ctrl-C to the parent (which stops the workers), and use one ITK thread (the processes are the
    parallelism)."""
    _stop_with_parent(os.getppid() if parent_pid is None else parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    except ImportError:
        pass


def _stop_with_parent(parent_pid: int) -> None:
    """Make this process end when ``parent_pid``, its parent, ends: the kernel's parent-death signal on Linux,
    else a watcher thread (:func:`_watch_parent`)."""
    if sys.platform.startswith("linux") and _set_parent_death_signal(signal.SIGKILL):
        if os.getppid() != parent_pid:  # the parent died before the request was made
            os._exit(1)
        return
    _watch_parent(parent_pid)


def _set_parent_death_signal(signum: int) -> bool:
    """``prctl(PR_SET_PDEATHSIG, signum)`` through the C library; False where that is not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(1, int(signum), 0, 0, 0)) == 0  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError, TypeError):
        return False


def _watch_parent(parent_pid: int) -> None:
    """Exit this process as soon as its parent is gone, from a daemon thread: it waits on the parent's sentinel
    (the pipe to the parent that :mod:`multiprocessing` keeps open in a spawned child, which becomes readable when
    the parent dies), or polls the parent pid where there is no sentinel."""
    parent = multiprocessing.parent_process()
    sentinel = getattr(parent, "sentinel", None)

    def watch() -> None:
        if sentinel is not None:
            multiprocessing.connection.wait([sentinel])
        else:
            while os.getppid() == parent_pid:
                time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="fidmed-prepare-parent-watch", daemon=True).start()


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Ignore SIGINT meanwhile (processes started now inherit that, so Ctrl-C never reaches a worker before its
    initializer runs); a no-op outside the main thread."""
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: the signal disposition is not ours to change
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _stop_pool(pool: cf.ProcessPoolExecutor) -> None:
    """Stop the workers now (an interrupted run): cancel what is queued, terminate what runs."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(5)
        if process.is_alive():
            process.kill()
            process.join()


def _iter_results(
    tasks: list[Source], workers: int, preparer: Preparer, src: Path, out: Path
) -> Iterator[dict[str, Any]]:
    """Records of ``tasks`` as they finish; at most ``4 * workers`` sources in flight. Closing the iterator
    before the end stops the workers."""
    if workers <= 1:
        for source in tasks:
            yield convert_source(preparer, src, out, source)
        return
    pending: set[cf.Future] = set()
    queue = iter(tasks)

    def fill() -> None:
        while len(pending) < 4 * workers:
            source = next(queue, None)
            if source is None:
                return
            pending.add(pool.submit(convert_source, preparer, src, out, source))

    pool, finished = None, False
    try:
        with _sigint_ignored():  # the first submissions start the worker processes
            pool = cf.ProcessPoolExecutor(
                workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(os.getpid(),),
            )
            fill()
        while pending:
            done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            pending.difference_update(done)
            for future in done:
                yield future.result()
            fill()
        finished = True
    finally:
        if pool is not None and finished:
            pool.shutdown(wait=True)
        elif pool is not None:
            _stop_pool(pool)


def _discard_unfinished(out: Path, state: ResumeState) -> None:
    """After an interrupted run: delete the images of unfinished sources (written, in no record) and temporary
    files, so that ``out`` holds exactly what the state file records."""
    _, records = state.load()
    for name in sorted(state.journaled() - recorded_outputs(records.values())):
        (out / name).unlink(missing_ok=True)
    remove_temporaries(out)
    state.clear_journals()


# -- the run ----------------------------------------------------------------------------------------------------


def _param_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    keys = sorted(set(old) | set(new))
    diffs = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
    return "; ".join(diffs)


def run_prepare(
    preparer: Preparer,
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    workers: int | None = None,
    strict: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> PrepareReport:
    """Prepare every source under ``src`` into ``out`` (see the module docstring).

    Args:
        preparer: what to do (e.g. :class:`fidmed.data.prepare.ct.CTPreparer`).
        src: the raw dataset folder.
        out: the output folder (created); must not hold images that this tool did not write.
        workers: worker processes (default: the CPU count, at most 8); 1 converts in this process. Workers are
            spawned (each imports fidmed, a few seconds), so a script calling this with workers > 1 needs the
            usual ``if __name__ == "__main__":`` guard.
        strict: stop at the first bad source instead of skipping and listing it.
        overwrite: when ``out`` was prepared with other parameters, delete that run's images and start over.
        progress: show a progress bar.
    """
    src, out = Path(src).expanduser(), Path(out).expanduser()
    if not src.is_dir():
        what = "is not a folder" if src.exists() else "does not exist"
        raise DataError(f"source folder {src} {what}; pass the raw dataset's folder with --src.")
    if src.resolve() == out.resolve():
        raise DataError(f"--out {out} is the source folder; prepare into a separate folder.")

    # 1. checks: nothing in --out is deleted or written before they pass
    created = make_output_folder(out)
    try:
        discovery = preparer.discover(src)
        if src.resolve() in out.resolve().parents:  # an output folder inside the raw folder: never read it back
            out_rel = out.resolve().relative_to(src.resolve()).as_posix() + "/"
            discovery.sources = [s for s in discovery.sources if not any(f.startswith(out_rel) for f in s.files)]
        if not discovery.sources:
            raise DataError(
                f"no sources for `fidmed prepare {preparer.name}` in {src}; point --src at the raw dataset folder."
            )
        if strict and discovery.skipped:
            raise DataError(f"{discovery.skipped[0][1]} (--strict; without it the file is skipped and listed)")
        header = {
            "format": FORMAT_VERSION,
            "preparer": preparer.name,
            "version": preparer.info.version,
            "params": preparer.params(),
        }
        state = ResumeState(out)
        old_header, records = state.load()
        ours = recorded_outputs(records.values()) | state.journaled()  # every image an earlier run wrote
        restart = old_header is not None and old_header != header
        if restart and not overwrite:
            differences = [
                d
                for d in (
                    _param_diff(old_header.get("params", {}), header["params"]),
                    _param_diff(
                        {"preparer": old_header.get("preparer"), "version": old_header.get("version")},
                        {"preparer": header["preparer"], "version": header["version"]},
                    ),
                )
                if d
            ]
            raise DataError(
                f"{out} was prepared by `fidmed prepare {old_header.get('preparer')}` with other "
                f"parameters ({'; '.join(differences)}); choose another --out, or pass --overwrite to "
                f"delete its images and start over."
            )
        foreign = [rel for rel in image_files(out) if rel not in ours]
        if foreign:
            raise DataError(
                f"{out} holds {len(foreign)} image(s) that `fidmed prepare` did not write (e.g. "
                f"{out / foreign[0]}); prepare into an empty folder, or move them away"
                f"{' (--overwrite deletes only the images it wrote)' if overwrite else ''}."
            )
        if restart:
            records = {}
        current_keys = {s.key for s in discovery.sources}
        tasks = [s for s in discovery.sources if not _record_is_current(records.get(s.key), src, s, out)]
        task_keys = {s.key for s in tasks}
        if strict:
            bad = next(
                (
                    records[s.key]
                    for s in discovery.sources
                    if s.key in records
                    and s.key not in task_keys
                    and (records[s.key]["status"] == "bad" or records[s.key]["file_errors"])
                ),
                None,
            )
            if bad is not None:
                raise DataError(f"{bad['reason'] or bad['file_errors'][0]} (--strict; recorded by an earlier run)")
    except BaseException:
        remove_created(created)
        raise

    workers = min(8, os.cpu_count() or 1) if workers is None else max(1, int(workers))
    workers = min(workers, max(1, len(tasks)))
    from tqdm.auto import tqdm

    bar = tqdm(
        total=len(tasks),
        desc=f"prepare {preparer.name}",
        unit="src",
        disable=not progress or not tasks,
        file=sys.stderr,
    )
    try:
        # 2. what this run redoes or drops goes first (with --overwrite: everything the earlier run wrote)
        if restart:
            for name in sorted(ours):
                (out / name).unlink(missing_ok=True)
            (out / MANIFEST_NAME).unlink(missing_ok=True)
            state.path.unlink(missing_ok=True)
            state.clear_journals()
        remove_temporaries(out)
        for key in sorted(k for k in records if k not in current_keys or k in task_keys):
            for name, *_ in records.pop(key)["outputs"]:  # sources gone from --src, or redone from scratch
                (out / name).unlink(missing_ok=True)
        if tasks:
            (out / MANIFEST_NAME).unlink(missing_ok=True)
            state.rewrite(header, [records[s.key] for s in discovery.sources if s.key in records])

        # 3. the conversions
        names_seen = {o[0]: key for key, record in records.items() for o in record["outputs"]}
        images_this_run = 0
        with contextlib.closing(_iter_results(tasks, workers, preparer, src, out)) as results:
            for record in results:
                for name, *_ in record["outputs"]:
                    other = names_seen.setdefault(name, record["key"])
                    if other != record["key"]:
                        raise DataError(
                            f"sources {other} and {record['key']} both produce {name}; rename one of "
                            f"them or prepare them into separate folders."
                        )
                if record["status"] == "bad" or record["file_errors"]:
                    reason = record["reason"] or record["file_errors"][0]
                    log.warning("skipped: %s", reason)
                    if strict:
                        raise DataError(f"{reason} (--strict; without it the file is skipped and listed)")
                state.append(record)
                records[record["key"]] = record
                images_this_run += len(record["outputs"])
                bar.update(1)
                bar.set_postfix(images=images_this_run, refresh=False)
    except BaseException:
        with _sigint_ignored():
            _discard_unfinished(out, state)
        raise
    finally:
        bar.close()

    # 4. the state of every source, the manifest
    final = [records[s.key] for s in discovery.sources]
    state.rewrite(header, final)
    produced = recorded_outputs(final)
    for name in sorted(state.journaled() - produced):  # written by a run stopped before it recorded the source
        if (out / name).is_file():
            log.info("removing %s (left over by an interrupted run)", out / name)
            (out / name).unlink()
    state.clear_journals()
    manifest = build_manifest(preparer, header, final, discovery.skipped, src)
    if manifest["counts"]["images"] == 0:
        reasons = "; ".join(f"{s['source']}: {s['reason']}" for s in manifest["skipped"][:3])
        raise DataError(
            f"`fidmed prepare {preparer.name}` wrote no images from {src}"
            f"{' (' + reasons + ')' if reasons else ''}; check --src and the options."
        )
    write_json_atomic(out / MANIFEST_NAME, manifest)
    return PrepareReport(
        out=out,
        manifest=manifest,
        converted=len(tasks),
        reused=len(discovery.sources) - len(tasks),
        skipped=manifest["skipped"],
    )
