"""``hagan-clinic encode``: every series of a cohort to one row of latent features, resumable and shardable.

Flow: discovery (or a preprocess cache's manifest) lists the series; worker processes read and preprocess them
exactly as the checkpoint's data contract says (the same code as ``preprocess``, values rounded to float16 like
the cache, so encoding a cache and encoding its DICOM source give the same features), while the main process
encodes fixed batches of them with E^H then E^G.

Nothing lost, nothing twice: batch k always holds the same series (the k-th run of ``batch_size`` usable series in
discovery order), and a finished batch is written atomically to a state folder beside the output
(``.<out name>.state/batch_<k>.npz``). A run killed at any moment and started again with the same arguments
encodes only the batches that are missing, with the same batch contents, so its table equals an uninterrupted
run's. ``--shard I/N`` (or torchrun's RANK/WORLD_SIZE) makes a process encode batches k with k % N == I into the
same state folder; whichever process finds every batch done writes the table and the report.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Iterator, Set
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from hagan_clinic.errors import HaganError
from hagan_clinic.io.cohort import SeriesRecord
from hagan_clinic.io.files import (
    Outputs,
    atomic_target,
    csv_safe_frame,
    make_folder,
    provenance_path,
    regular_file,
    to_parquet,
    write_json,
    write_rows,
    write_text,
)
from hagan_clinic.io.logs import progress_bar

from .cohort import WORKER_DIED, Task, WorkerDied, WorkerPool, status_counts
from .encode_inputs import QCT_COLUMNS, Others, list_series, prepare_one
from .privacy import Scrubber, command_line, keyed, pseudonym

__all__ = ["EncodeOptions", "EncodeResult", "encode_batch", "list_series", "prepare_one", "run"]
ID_COLUMNS = ["patient_id", "study_uid", "series_uid", "kernel", "slice_thickness_mm"]
REPORT_COLUMNS = [
    "patient_id", "study_uid", "series_uid", "modality", "kernel", "slice_thickness_mm", "n_slices", "source",
    "status", "reason", "notes",
]  # fmt: skip
PSEUDONYMISED = ("patient_id", "study_uid", "series_uid", "source")
NON_FINITE_FEATURES = "non-finite features (NaN or inf from the encoder: a damaged checkpoint?)"
#: Keys of the checkpoint's data section that name its training data (folders, tables, columns), not how a scan is
#: preprocessed: never in a feature table's provenance.
TRAINING_DATA_KEYS = ("dir", "table", "path_column", "label_column")
SALT_CHECK = "hagan-clinic pseudonym salt check"  # its keyed digest tells salts apart without storing one
log = logging.getLogger(__name__)


@dataclass
class EncodeOptions:
    checkpoint: Path
    out: Path
    fmt: str = "parquet"
    workers: int = 0
    batch_size: int = 2
    device: str = "cpu"
    precision: str = "fp32"
    pseudonymize: str | None = None
    qct: bool = False
    shard: tuple[int, int] = (0, 1)
    progress: bool = True
    overwrite: bool = False
    model_version: str | None = None  # 'name/version' when the checkpoint came from the registry (models:/...)
    argv: list[str] = field(default_factory=list)  # the command and its arguments, for the provenance record

    def outputs(self, src: Path) -> Outputs:
        """The guard of the table and the report: never over SRC (a file), the checkpoint, or a file that an
        earlier encode did not write, unless ``overwrite``."""
        return Outputs("encode", [src if src.is_file() else None, self.checkpoint], self.overwrite)

    @property
    def report_path(self) -> Path:
        return self.out.with_name(f"{self.out.stem}.report.csv")

    @property
    def provenance_path(self) -> Path:
        """What made the table (also in a parquet table's metadata), beside it."""
        return provenance_path(self.out)


@dataclass
class EncodeResult:
    table: Path | None  # None when this shard finished but others have batches left
    report: Path | None
    counts: dict[str, int]
    seconds: dict[str, float] = field(default_factory=dict)
    shard: tuple[int, int] = (0, 1)

    def summary(self) -> str:
        """What ``hagan-clinic encode`` prints: the counts, the table and the report; or that other shards are at
        work."""
        if self.table is None:
            return f"shard {self.shard[0]}/{self.shard[1]} done; the table is written by the last shard to finish"
        return f"{', '.join(f'{v} {k}' for k, v in self.counts.items())}: {self.table} (report: {self.report})"


def _safe_prepare(record: SeriesRecord, cfg_dict: dict, qct: bool) -> dict:
    try:
        return prepare_one(record, cfg_dict, qct)
    except Exception as err:  # an unexpected failure in one series is that series' failure
        reason = f"{type(err).__name__}: {' '.join(str(err).split())}"
        return {"grid": None, "row": {"status": "failed", "reason": reason, "notes": ""}}


def _collect(pool: WorkerPool, task: Task) -> dict:
    """A worker's prepared series; a worker that died while reading it fails that series only."""
    try:
        return pool.result(task)
    except WorkerDied as err:
        reason = str(err)
    except Exception as err:  # a result that could not be sent back
        reason = f"{type(err).__name__}: {' '.join(str(err).split())}"
    return {"grid": None, "row": {"status": "failed", "reason": reason, "notes": ""}}


# ---------------------------------------------------------------- the run
def _settings(opts: EncodeOptions, src: Path, checkpoint_sha: str, digests: list[str]) -> dict:
    """What a state folder's batches were made with. Series by their digests (content, not only UIDs: another
    cohort with the same UIDs must not reuse the batches). With a salt nothing here names the source: keyed digests
    only, and never the salt nor a plain hash of it."""
    salt = opts.pseudonymize or None
    source = str(src.resolve())
    return {
        "checkpoint_sha256": checkpoint_sha,
        "source": keyed(salt, source) if salt else source,
        "series": keyed(salt, "\n".join(digests)),
        "batch_size": opts.batch_size,
        "precision": opts.precision,
        "device": opts.device,
        "qct": opts.qct,
        "pseudonym_salt_check": keyed(salt, SALT_CHECK) if salt else "",
    }


def _check_state(state: Path, settings: dict) -> None:
    path = state / "settings.json"
    if path.exists():
        try:
            old = json.loads(regular_file(path, "state file", 2**20).read_text(encoding="utf-8"))
        except (OSError, ValueError):  # damaged: the settings its batches were made with are unknown
            old = None
        if old != settings and (state / "complete").exists():
            import shutil

            shutil.rmtree(state)  # a finished run's state: a new run with other settings starts afresh
        elif old != settings:
            diff = ", ".join(sorted(k for k in settings if old.get(k) != settings[k])) if isinstance(old, dict) else ""
            raise HaganError(
                f"{state} holds an unfinished encode with other settings ({diff or 'settings.json unreadable'}); "
                "use the same arguments, another --out, or delete that folder"
            )
    if not path.exists():
        make_folder(state)
        write_json(path, settings, sort_keys=False)


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


def _report_row(record_row: dict, result_row: dict, scrub: Scrubber, names: Set[str] = frozenset()) -> dict:
    """A report row; with a salt its identifiers pseudonymised and its free text rid of the series' file names
    (``names``) and of every path, without one its paths made relative to the source."""
    row = {k: _plain(record_row.get(k)) for k in REPORT_COLUMNS + QCT_COLUMNS if k in record_row}
    row.update({k: _plain(v) for k, v in result_row.items()})
    scrub.row(row, names)
    if scrub.salt:
        for k in PSEUDONYMISED:
            row[k] = pseudonym(scrub.salt, row.get(k) or "")
    return row


def _batch_rows(batch: list[SeriesRecord], results: list[dict], z: np.ndarray, scrub: Scrubber) -> list[dict]:
    """The report rows of an encoded batch, each with the index of its features in ``z`` (-1: none). Features
    that are not all finite (a damaged checkpoint) are never 'ok'."""
    rows, index = [], 0
    for record, res in zip(batch, results):
        result_row, z_index = res["row"], -1
        if res["grid"] is not None:
            if np.isfinite(z[index]).all():
                z_index = index
            else:
                result_row = {**result_row, "status": "failed", "reason": NON_FINITE_FEATURES}
            index += 1
        rows.append({**_report_row(record.row(), result_row, scrub, scrub.names(record)), "z_index": z_index})
    return rows


@contextmanager
def encoder_threads(readers: int, device: str) -> Iterator[None]:
    """While ``readers`` reader processes of one thread each are at work, an encoder on the CPU keeps the remaining
    cores (at least one); the thread count is restored afterwards, on every exit. On two cores an encoder of two
    threads beside a reader contends with it for both cores instead of overlapping it (benchmarks/encode_bench.py)."""
    import torch

    from hagan_clinic.devices import usable_cores

    if readers <= 0 or torch.device(device).type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, min(previous, usable_cores() - readers)))
    log.debug("encoder: %d thread(s) beside %d reader(s)", torch.get_num_threads(), readers)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def encode_batch(model, grids: list[np.ndarray], device: str, precision: str) -> np.ndarray:
    """z_hat (N, L) float32 of the preprocessed volumes ``grids`` (each (S, S, S)), with the model's inference copies
    of the encoders at ``precision`` (:meth:`HAGAN.inference_encoders`: weights cast once, channels-last; no autocast;
    the model's own weights untouched)."""
    import torch

    x = torch.from_numpy(np.stack(grids)).to(device=device)[:, None]
    with torch.inference_mode():
        z = model.encode(x, precision=precision)
    return z.float().cpu().numpy()


def _save_batch(path: Path, z: np.ndarray, rows: list[dict]) -> None:
    with atomic_target(path, ".npz") as tmp:
        np.savez(tmp, z=z.astype(np.float32), rows=np.array(json.dumps(rows)))


def _load_batch(path: Path) -> tuple[np.ndarray, list[dict]]:
    with np.load(regular_file(path, "state file"), allow_pickle=False) as data:
        return data["z"], json.loads(str(data["rows"]))


def _batch_done(path: Path, latent: int) -> list[dict] | None:
    """The rows of a finished batch; None when there is none, or it is damaged (it is encoded again)."""
    try:
        z, rows = _load_batch(path)
        fits = z.ndim == 2 and z.shape[1] == latent
        fits = fits and all(r["status"] != "ok" or 0 <= r["z_index"] < len(z) for r in rows)
    except Exception:  # missing, truncated, not an archive, not JSON, not our rows: any of them means not done
        return None
    return rows if fits else None


def _to_encode(state: Path, batches: list[int], latent: int) -> list[int]:
    """The batches of ``batches`` to encode: those not done, and those where a series' worker process died (a
    re-run tries them again: the death may have been a lack of memory at the time)."""
    todo = []
    for k in batches:
        rows = _batch_done(state / f"batch_{k:06d}.npz", latent)
        if rows is None or any(r.get("reason") == WORKER_DIED for r in rows):
            todo.append(k)
    return todo


def provenance(opts: EncodeOptions, cfg, checkpoint_sha: str, model_version: str) -> dict:
    """What made a feature table: the package, the checkpoint (digest, registered version), the data contract and
    preprocessing settings it was read with, the encode settings and the command line (never the salt; with a
    salt, no paths)."""
    from hagan_clinic import __version__

    return {
        "package": f"hagan-clinic {__version__}",
        "checkpoint_sha256": checkpoint_sha,
        "checkpoint": "<redacted>" if opts.pseudonymize else opts.checkpoint.name,
        "model_version": model_version,
        "data_contract": cfg.data_contract(),
        "preprocessing": {k: v for k, v in cfg.to_dict()["data"].items() if k not in TRAINING_DATA_KEYS},
        "encode": {
            "batch_size": opts.batch_size,
            "precision": opts.precision,
            "device": opts.device,
            "qct": opts.qct,
            "pseudonymized": bool(opts.pseudonymize),
        },  # fmt: skip
        "command_line": command_line(opts.argv, opts.pseudonymize or None) if opts.argv else "",
    }


def _write_outputs(
    opts: EncodeOptions,
    src: Path,
    state: Path,
    n_batches: int,
    others: Others,
    latent: int,
    scrub: Scrubber,
    made_by: dict,
):
    import pandas as pd

    table_rows, report, latents = [], [], []
    for k in range(n_batches):
        z, rows = _load_batch(state / f"batch_{k:06d}.npz")
        for row in rows:
            report.append(row)
            if row["status"] == "ok":
                table_rows.append({c: row.get(c) for c in ID_COLUMNS + (QCT_COLUMNS if opts.qct else [])})
                latents.append(z[row.pop("z_index")])
            row.pop("z_index", None)
    report += [_report_row(r, {}, scrub, names) for r, names in others]
    meta = pd.DataFrame(table_rows, columns=ID_COLUMNS + (QCT_COLUMNS if opts.qct else []))
    feats = pd.DataFrame(np.asarray(latents, np.float32).reshape(-1, latent), columns=[f"z{i}" for i in range(latent)])
    table = pd.concat([meta, feats], axis=1)
    out, guard = opts.out, opts.outputs(src)
    with guard.target(out, out.suffix) as tmp:
        if opts.fmt == "parquet":
            to_parquet(table, tmp, made_by)
        else:
            csv_safe_frame(table).to_csv(tmp, index=False, float_format="%.9g")
    report_path = opts.report_path
    write_rows(report_path, report, REPORT_COLUMNS + (QCT_COLUMNS if opts.qct else []), guard)
    write_json(opts.provenance_path, made_by, guard, sort_keys=False)
    counts = status_counts(report)
    return report_path, counts


def run(src: str | Path, opts: EncodeOptions, tracker=None) -> EncodeResult:
    from hagan_clinic.io.files import file_sha256
    from hagan_clinic.models.hagan import load_checkpoint
    from hagan_clinic.tracking import NullTracker

    tracker = tracker or NullTracker()
    src, out = Path(src), opts.out
    if not opts.checkpoint.is_file():
        raise HaganError(f"checkpoint not found: {opts.checkpoint}")
    guard = opts.outputs(src)
    state = out.parent / f".{out.name}.state"
    for target in (
        out,
        opts.report_path,
        opts.provenance_path,
    ):  # before any work: a refusal at the end would waste the run
        if (state / "settings.json").is_file():  # an earlier encode's state: the table beside it is its output
            guard.adopt(target)
        guard.check(target)
    model = load_checkpoint(opts.checkpoint, device=opts.device, ema=False, require=("EH", "EG"))
    cfg, latent = model.config, model.config.model.latent_dim
    ok, others = list_series(src, cfg, opts.qct, opts.progress)
    sha = file_sha256(opts.checkpoint)
    settings = _settings(opts, src, sha, [r.digest for r in ok])
    _check_state(state, settings)
    scrub = Scrubber(src, opts.pseudonymize or None)
    batches = [ok[i : i + opts.batch_size] for i in range(0, len(ok), opts.batch_size)]
    shard, n_shards = opts.shard
    mine = [k for k in range(len(batches)) if k % n_shards == shard]
    todo = _to_encode(state, mine, latent)
    done_series = sum(len(batches[k]) for k in mine if k not in todo)
    seconds = {"read": 0.0, "preprocess": 0.0, "encode": 0.0}
    name = "encode" if n_shards == 1 else f"encode shard {shard}/{n_shards}"
    with tracker.run(name, tags={"stage": "encode"}, system_metrics=True):
        if opts.model_version:
            model_version = opts.model_version
        elif tracker.uri is None:
            model_version = "not looked up (tracking off)"
        else:
            model_version = tracker.find_model_version(sha) or "unregistered"
        made_by = provenance(opts, cfg, sha, model_version)
        source = pseudonym(opts.pseudonymize, str(src)) if opts.pseudonymize else str(src)
        cohort = pseudonym(opts.pseudonymize, src.resolve().name) if opts.pseudonymize else src.resolve().name
        tracker.log_input(cohort, settings["series"], len(ok), source, "encode")
        tracker.log_params({
            "checkpoint": "<redacted>" if opts.pseudonymize else opts.checkpoint.name, "checkpoint_sha256": sha,
            "model_version": model_version, "source": source,
            "series_found": len(ok) + len(others), "batch_size": opts.batch_size, "precision": opts.precision,
            "device": opts.device, "workers": opts.workers, "qct": opts.qct, "shard": f"{shard}/{n_shards}",
            "pseudonymized": bool(opts.pseudonymize), "encode_mode": cfg.model.encode_mode,
        })  # fmt: skip
        hidden = {} if opts.progress else {"disable": True}
        bar = progress_bar(sum(len(batches[k]) for k in mine), "encoding", "series", initial=done_series, **hidden)
        start, encoded = time.perf_counter(), 0
        prepare = partial(_safe_prepare, cfg_dict=cfg.to_dict(), qct=opts.qct)
        readers = f"{opts.workers} reader process(es)" if opts.workers else "reading in this process"
        log.debug("%s: %d batch(es) of up to %d series, %d to encode (the rest done earlier), %s", name, len(mine),
                  opts.batch_size, len(todo), readers)  # fmt: skip
        pool = WorkerPool(opts.workers, 1) if opts.workers > 0 and todo else None  # a series is read serially
        with encoder_threads(opts.workers if pool else 0, opts.device):
            try:
                queue: deque = deque()

                def submit(k: int) -> None:
                    queue.append([pool.submit(prepare, r) if pool else None for r in batches[k]])

                for k in todo[:2]:  # reading one batch ahead of the encoder
                    submit(k)
                for i, k in enumerate(todo):
                    tasks = queue.popleft()
                    if i + 2 < len(todo):
                        submit(todo[i + 2])
                    t_read = time.perf_counter()
                    results = [_collect(pool, t) if pool and t else prepare(r) for t, r in zip(tasks, batches[k])]
                    waited = time.perf_counter() - t_read  # the encoder idle while series are read: too few --workers?
                    grids = [res["grid"] for res in results if res["grid"] is not None]
                    t = time.perf_counter()
                    z = encode_batch(model, grids, opts.device, opts.precision) if grids else np.zeros((0, latent))
                    took = {"read": 0.0, "preprocess": 0.0, "encode": time.perf_counter() - t}
                    for res in results:
                        took["read"] += res.get("read_s", 0.0)
                        took["preprocess"] += res.get("prep_s", 0.0)
                    for key, value in took.items():
                        seconds[key] += value
                    log.debug("encode batch %d (%d/%d here): %d series, %d encoded; read %.2f s, preprocess %.2f s, "
                              "encode %.2f s, waited %.2f s for the readers", k, i + 1, len(todo), len(results),
                              len(grids), *took.values(), waited)  # fmt: skip
                    rows = _batch_rows(batches[k], results, z, scrub)
                    _save_batch(state / f"batch_{k:06d}.npz", z, rows)
                    encoded += len(rows)
                    bar.update(len(rows))
                    bar.set_postfix_str(f"{60 * encoded / (time.perf_counter() - start):.1f} series/min", refresh=False)
            finally:
                bar.close()
                if pool is not None:
                    pool.close()
        if encoded:
            per = {f"{k}_s_per_series": v / encoded for k, v in seconds.items()}
            tracker.log_metrics({**per, "series_per_min": 60 * encoded / (time.perf_counter() - start)})
        if any(_batch_done(state / f"batch_{k:06d}.npz", latent) is None for k in range(len(batches))):
            return EncodeResult(
                None, None, {"encoded_here": encoded}, seconds, opts.shard
            )  # other shards still at work
        report, counts = _write_outputs(opts, src, state, len(batches), others, latent, scrub, made_by)
        write_text(state / "complete", "")
        tracker.log_metrics({f"series_{k}": float(v) for k, v in counts.items()})
        tracker.log_artifact(report)
        tracker.log_artifact(opts.provenance_path)
        if out.stat().st_size <= 50 * 2**20:
            tracker.log_artifact(out)
        else:  # too large for an artifact store: its place and identity instead
            where = "<redacted>" if opts.pseudonymize else str(out.resolve())
            tracker.log_params({"table_path": where, "table_sha256": file_sha256(out)})
    return EncodeResult(out, report, counts, seconds, opts.shard)
