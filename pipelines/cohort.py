"""Running one function over every series of a cohort: in worker processes, resumable, with a progress bar.

Each finished series leaves a small JSON result in a state folder (written atomically, after any output files the
function wrote), so a run that is killed at any moment and started again does each series once: finished ones are
read back, failed ones are tried again. One bad series is a row with status 'failed' and its reason; the rest go on.
Workers follow every command's rule: 0 works in this process, N >= 1 in N worker processes.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hagan_clinic.errors import HaganError, describe
from hagan_clinic.io.cohort import SeriesRecord
from hagan_clinic.io.files import make_folder, regular_file, write_text

log = logging.getLogger(__name__)
#: The key of a row under which ``fn`` may give its stages' seconds ({"read": 0.4, ...}); shown by --verbose, never
#: stored (a state file, and so a re-run's row, stays the same however long the series took).
SECONDS = "__seconds__"


def status_counts(rows: list[dict]) -> dict[str, int]:
    """Rows per status (ok, skipped, failed always present)."""
    counts = {"ok": 0, "skipped": 0, "failed": 0}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    return counts


def counts_text(counts: dict[str, int]) -> str:
    """'10 ok, 1 skipped, 0 failed': the counts as a command's summary line starts."""
    return ", ".join(f"{v} {k}" for k, v in counts.items())


def _init_worker(threads: int) -> None:
    from hagan_clinic.io.logs import quiet_readers

    quiet_readers()
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:  # a function that does not need torch
        pass


# ---------------------------------------------------------------- worker processes that survive a death
WORKER_DIED = "worker process died while reading it (killed or out of memory)"


def spawn_pool(workers: int, threads: int) -> ProcessPoolExecutor:
    """``workers`` fresh processes of ``threads`` torch threads each (spawned: no copy of the parent's threads)."""
    import multiprocessing as mp

    return ProcessPoolExecutor(workers, mp.get_context("spawn"), _init_worker, (threads,))


class WorkerDied(Exception):
    """The task killed the worker process that ran it, even alone (a signal, out of memory, a native crash)."""


@dataclass(eq=False)
class Task:
    """One call submitted to a :class:`WorkerPool`; ``future`` is None once a run on its own settled it."""

    fn: Callable
    args: tuple
    future: Future | None = None
    value: Any = None
    error: BaseException | None = None
    died: bool = False

    def outcome(self) -> Any:
        if self.future is not None:
            return self.future.result()
        if self.died:
            raise WorkerDied(WORKER_DIED)
        if self.error is not None:
            raise self.error
        return self.value


def _lost(future: Future) -> bool:
    """Whether a future of a broken pool holds no outcome of its own task (the task must run again)."""
    return not future.done() or future.cancelled() or isinstance(future.exception(), BrokenProcessPool)


class WorkerPool:
    """Worker processes that go on when one of them dies.

    A worker killed mid-task (out of memory, a signal, a crash in a native decoder) breaks a ProcessPoolExecutor:
    every unfinished future fails with BrokenProcessPool, so the pool cannot tell whose task killed it. Every
    unfinished task is therefore a suspect and runs again alone in a fresh one-worker pool: the one that kills that
    worker too raises :class:`WorkerDied` when collected, the others give their results, and a new pool takes the
    tasks submitted after. A task runs at most twice, so a cohort of killers ends.
    """

    def __init__(self, workers: int, threads: int) -> None:
        self.workers, self.threads = workers, threads
        self._pool: ProcessPoolExecutor | None = None
        self._live: dict[Task, None] = {}  # tasks on the current pool not yet collected, in submission order

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def submit(self, fn: Callable, *args: Any) -> Task:
        task = Task(fn, args)
        try:
            task.future = self._executor().submit(fn, *args)
        except BrokenProcessPool:  # a worker died since the last look
            self._recover()
            task.future = self._executor().submit(fn, *args)
        self._live[task] = None
        return task

    def wait(self, tasks: list[Task]) -> list[Task]:
        """Block until one of ``tasks`` is finished; the finished ones (collecting them does not block)."""
        futures = [t.future for t in tasks if t.future is not None]
        if len(futures) == len(tasks) and not any(f.done() for f in futures):
            wait(futures, return_when=FIRST_COMPLETED)
        if any(t.future is not None and t.future.done() and _lost(t.future) for t in tasks):
            self._recover()
        return [t for t in tasks if t.future is None or t.future.done()]

    def result(self, task: Task) -> Any:
        """What the task returned, or its exception raised; WorkerDied when it killed its worker even alone."""
        if task.future is not None:
            wait([task.future])
            if _lost(task.future):
                self._recover()
        self._live.pop(task, None)
        return task.outcome()

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = spawn_pool(self.workers, self.threads)
        return self._pool

    def _recover(self) -> None:
        """Close the broken pool, then settle each of its unfinished tasks alone in a fresh one-worker pool."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        suspects = [t for t in self._live if t.future is not None and _lost(t.future)]
        self._live = {}
        solo: ProcessPoolExecutor | None = None
        try:
            for task in suspects:
                task.future = None
                solo = solo or spawn_pool(1, self.threads)
                try:
                    task.value = solo.submit(task.fn, *task.args).result()
                except BrokenProcessPool:  # alone, it killed its worker again: its own input is the cause
                    task.died = True
                    solo.shutdown(wait=True)
                    solo = None
                except Exception as err:  # the task's own exception, raised when it is collected
                    task.error = err
        finally:
            if solo is not None:
                solo.shutdown(wait=True)


# ---------------------------------------------------------------- one function over a cohort
def _failure(record: SeriesRecord, err: BaseException) -> dict:
    return {**record.row(), "status": "failed", "reason": describe(err)}


class OutputFailed(HaganError):
    """An output could not be written (a full or read-only disk): the run stops, since every further series would
    fail the same way, and what is done is kept for the next run."""


_STOP = "__stop__"


def _call(fn: Callable[[SeriesRecord], dict], record: SeriesRecord) -> dict:
    start = time.perf_counter()
    try:
        row = {**record.row(), **fn(record)}
    except OutputFailed as err:  # not the series' fault: the whole run stops (in the main process)
        return {_STOP: str(err)}
    except Exception as err:  # one bad series is reported and the cohort goes on
        row = _failure(record, err)
    row[SECONDS] = {**(row.get(SECONDS) or {}), "total": time.perf_counter() - start}  # timed where it ran
    return row


def _log_series(desc: str, record: SeriesRecord, row: dict, seconds: dict, done: int, total: int) -> None:
    """One --verbose line per finished series. The terminal only, yet still no name, path or reason (a reason can
    quote a file name): the series' digest (what its state file is named by), its status and its seconds."""
    if not log.isEnabledFor(logging.DEBUG):
        return
    stages = ", ".join(f"{k} {v:.2f} s" for k, v in seconds.items() if k != "total")
    took = f" in {seconds['total']:.2f} s" if "total" in seconds else ""  # none from a worker that died
    log.debug("%s %d/%d: series %s %s%s%s", desc, done, total, record.digest, row["status"], took,
              f" ({stages})" if stages else "")  # fmt: skip


def _require_picklable(fn: Callable) -> None:
    """Worker processes receive ``fn`` pickled: a lambda or a local function would fail in every series, and be
    recorded as each series' failure. A programming error, said once, before any series is tried."""
    import pickle

    try:
        pickle.dumps(fn)
    except Exception as err:
        raise TypeError(f"run_series with workers >= 1 needs a picklable fn (a module-level function): {err}") from None


def run_series(
    records: Iterable[SeriesRecord],
    fn: Callable[[SeriesRecord], dict],
    state_dir: Path,
    workers: int = 0,
    progress: bool = True,
    desc: str = "series",
) -> list[dict]:
    """Apply ``fn`` (picklable; returns a row dict) to each record; rows in the records' order.

    Rows start from ``record.row()``; ``fn`` adds or overrides columns (status 'ok' unless it says otherwise) and
    may give its stages' seconds under :data:`SECONDS`. An exception inside ``fn`` becomes status 'failed' with the
    message as the reason. workers: 0 calls ``fn`` in this process, N >= 1 in N worker processes (a single series
    to do runs in this process).
    """
    from hagan_clinic.io.logs import progress_bar

    records = list(records)
    make_folder(state_dir)
    rows: dict[str, dict] = {}  # by digest: the files and the state of a series are named by its content
    todo = []
    for r in records:
        row = _finished_row(state_dir / f"{r.digest}.json")
        if row is not None:
            rows[r.digest] = row
        else:
            todo.append(r)
    if workers >= 1 and len(todo) > 1:
        _require_picklable(fn)
    where = f"{workers} worker process(es)" if workers >= 1 and len(todo) > 1 else "this process"
    log.debug("%s: %d series, %d done by an earlier run, the rest in %s", desc, len(records), len(rows), where)
    # a bar on terminals only, none in logs nor under --quiet
    bar = progress_bar(len(records), desc, "series", initial=len(rows), **({} if progress else {"disable": True}))
    failed = 0

    def finish(record: SeriesRecord, row: dict) -> None:
        nonlocal failed
        if _STOP in row:
            raise OutputFailed(row[_STOP])
        seconds = row.pop(SECONDS, None) or {}
        row.setdefault("status", "ok")
        failed += row["status"] == "failed"
        write_text(state_dir / f"{record.digest}.json", json.dumps(row))
        rows[record.digest] = row
        bar.update(1)
        bar.set_postfix(failed=failed, refresh=False)
        _log_series(desc, record, row, seconds, len(rows), len(records))

    try:
        if workers < 1 or len(todo) <= 1:  # one series: a worker process would only add its start-up
            for r in todo:
                finish(r, _call(fn, r))
        else:
            _in_workers(todo, fn, workers, finish)
    finally:
        bar.close()
    return [rows[r.digest] for r in records if r.digest in rows]


def _finished_row(path: Path) -> dict | None:
    """The ok row a finished series left; None when there is none or the file is damaged (the series runs again)."""
    try:
        row = json.loads(regular_file(path, "state file", 2**20).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, unreadable, not UTF-8, not JSON, a FIFO (HaganError is a ValueError)
        return None
    return row if isinstance(row, dict) and row.get("status") == "ok" else None


def _in_workers(todo: list[SeriesRecord], fn: Callable, workers: int, finish: Callable) -> None:
    """``finish(record, row)`` for each record of ``todo``, read by ``workers`` processes; a worker that dies fails
    the series it held only (see :class:`WorkerPool`)."""
    queue = deque(todo)
    pending: dict[Task, SeriesRecord] = {}
    with WorkerPool(workers, max(1, (os.cpu_count() or 1) // workers)) as pool:
        while queue or pending:
            while queue and len(pending) < 2 * workers:  # a few in flight: few to run again after a death
                record = queue.popleft()
                pending[pool.submit(_call, fn, record)] = record
            for task in pool.wait(list(pending)):
                record = pending.pop(task)
                try:
                    row = pool.result(task)
                except WorkerDied as err:
                    row = {**record.row(), "status": "failed", "reason": str(err)}
                except Exception as err:  # e.g. a result that could not be sent back
                    row = _failure(record, err)
                finish(record, row)
