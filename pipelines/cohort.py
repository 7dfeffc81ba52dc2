"""Running one function over every series of a cohort: in worker processes, resumable, with a progress bar.

Each finished series leaves a small JSON result in a state folder (written atomically, after any output files the
function wrote), so a run that is killed at any moment and started again does each series once: finished ones are
read back, failed ones are tried again. One bad series is a row with status 'failed' and its reason; the rest go on.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

from hagan_clinic.errors import HaganError
from hagan_clinic.io.cohort import SeriesRecord
from hagan_clinic.io.files import atomic_target


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file in the same folder and a rename."""
    with atomic_target(path) as tmp:
        Path(tmp).write_text(text, newline="")


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    """A CSV with exactly ``columns`` (missing values empty), written atomically."""
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: "" if row.get(c) is None else row.get(c) for c in columns})
    atomic_write_text(path, buf.getvalue())


def status_counts(rows: list[dict]) -> dict[str, int]:
    """Rows per status (ok, skipped, failed always present)."""
    counts = {"ok": 0, "skipped": 0, "failed": 0}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    return counts


def _init_worker(threads: int) -> None:
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:  # a function that does not need torch
        pass


def _failure(record: SeriesRecord, err: BaseException) -> dict:
    reason = str(err) if isinstance(err, HaganError) else f"{type(err).__name__}: {err}"
    return {**record.row(), "status": "failed", "reason": " ".join(reason.split())[:300]}


def _call(fn: Callable[[SeriesRecord], dict], record: SeriesRecord) -> dict:
    try:
        return {**record.row(), **fn(record)}
    except Exception as err:  # one bad series is reported and the cohort goes on
        return _failure(record, err)


def run_series(
    records: Iterable[SeriesRecord],
    fn: Callable[[SeriesRecord], dict],
    state_dir: Path,
    workers: int = 1,
    progress: bool = True,
    desc: str = "series",
) -> list[dict]:
    """Apply ``fn`` (picklable; returns a row dict) to each record; rows in the records' order.

    Rows start from ``record.row()``; ``fn`` adds or overrides columns (status 'ok' unless it says otherwise).
    An exception inside ``fn`` becomes status 'failed' with the message as the reason.
    """
    from tqdm import tqdm

    records = list(records)
    state_dir.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict] = {}
    todo = []
    for r in records:
        done = state_dir / f"{r.digest}.json"
        row = json.loads(done.read_text()) if done.is_file() else None
        if row is not None and row.get("status") == "ok":
            rows[r.key] = row
        else:
            todo.append(r)
    quiet = None if progress else True  # None: a bar on terminals only, none in logs
    bar = tqdm(total=len(records), initial=len(rows), desc=desc, unit="series", file=sys.stderr, disable=quiet)
    failed = 0

    def finish(record: SeriesRecord, row: dict) -> None:
        nonlocal failed
        row.setdefault("status", "ok")
        failed += row["status"] == "failed"
        atomic_write_text(state_dir / f"{record.digest}.json", json.dumps(row))
        rows[record.key] = row
        bar.update(1)
        bar.set_postfix(failed=failed, refresh=False)

    try:
        if workers <= 1 or len(todo) <= 1:
            for r in todo:
                finish(r, _call(fn, r))
        else:
            import multiprocessing as mp

            threads = max(1, (os.cpu_count() or 1) // workers)
            with ProcessPoolExecutor(workers, mp.get_context("spawn"), _init_worker, (threads,)) as pool:
                pending = {pool.submit(_call, fn, r): r for r in todo}
                while pending:
                    finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        record = pending.pop(fut)
                        try:
                            finish(record, fut.result())
                        except Exception as err:  # a worker that died (memory) fails its series only
                            finish(record, _failure(record, err))
    finally:
        bar.close()
    return [rows[r.key] for r in records if r.key in rows]
