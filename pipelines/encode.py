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

import hashlib
import hmac
import json
import time
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from hagan_clinic.config import Config
from hagan_clinic.errors import HaganError
from hagan_clinic.io.cohort import SeriesRecord, discover, load_series
from hagan_clinic.io.files import atomic_target

from .cohort import atomic_write_text, status_counts, write_csv

ID_COLUMNS = ["patient_id", "study_uid", "series_uid", "kernel", "slice_thickness_mm"]
QCT_COLUMNS = ["lung_volume_ml", "laa950_pct", "perc15_hu", "qct_warning"]
REPORT_COLUMNS = [
    "patient_id", "study_uid", "series_uid", "modality", "kernel", "slice_thickness_mm", "n_slices", "source",
    "status", "reason", "notes",
]  # fmt: skip
PSEUDONYMISED = ("patient_id", "study_uid", "series_uid", "source")


@dataclass
class EncodeOptions:
    checkpoint: Path
    out: Path
    fmt: str = "parquet"
    workers: int = 1
    batch_size: int = 2
    device: str = "cpu"
    precision: str = "fp32"
    pseudonymize: str | None = None
    qct: bool = False
    shard: tuple[int, int] = (0, 1)
    progress: bool = True


@dataclass
class EncodeResult:
    table: Path | None  # None when this shard finished but others have batches left
    report: Path | None
    counts: dict[str, int]
    seconds: dict[str, float] = field(default_factory=dict)


def pseudonym(salt: str, value: str) -> str:
    """A salted hash standing in for an identifier: same salt and value, same pseudonym; empty stays empty."""
    if value in ("", None):
        return ""
    return hmac.new(salt.encode(), str(value).encode(), hashlib.sha256).hexdigest()[:20]


# ---------------------------------------------------------------- listing the series
def _cache_records(src: Path, cfg: Config, qct: bool) -> tuple[list[SeriesRecord], list[dict]]:
    """The ok series of a preprocess cache, and the report rows of the others."""
    import pandas as pd

    from .preprocess import cache_settings

    settings = json.loads((src / "cache.json").read_text())
    if settings.get("contract") != cfg.data_contract():
        raise HaganError(
            f"{src} was preprocessed for {settings.get('contract')}, but the checkpoint's data contract is "
            f"{cfg.data_contract()}: preprocess again, or give the DICOM/NIfTI folder"
        )
    wanted = cache_settings(cfg)
    differ = sorted(k for k in wanted if k not in ("cache_dtype", "min_slices") and settings.get(k) != wanted[k])
    if differ:
        raise HaganError(
            f"{src} was preprocessed with other settings ({', '.join(differ)}) than the checkpoint's config: "
            "preprocess again with that config, or give the DICOM/NIfTI folder"
        )
    if qct:
        raise HaganError("--qct needs the scans themselves (a DICOM or NIfTI folder), not a preprocess cache")
    manifest = pd.read_csv(src / "manifest.csv", dtype=str, keep_default_na=False)
    ok, others = [], []
    for row in manifest.to_dict("records"):
        if row.get("status") != "ok":
            others.append(row)
            continue
        thickness = float(row["slice_thickness_mm"]) if row.get("slice_thickness_mm") else None
        ok.append(
            SeriesRecord(
                key=f"cache:{row['path']}",
                kind="cache",
                paths=(src / row["path"],),
                folder=row.get("source", ""),
                status="ok",
                patient_id=row["patient_id"],
                study_uid=row["study_uid"],
                series_uid=row["series_uid"],
                modality=row.get("modality", ""),
                kernel=row.get("kernel", ""),
                slice_thickness_mm=thickness,
                n_slices=int(row["n_slices"]) if row.get("n_slices") else 0,
            )  # fmt: skip
        )
    return ok, others


def list_series(src: Path, cfg: Config, qct: bool, progress: bool) -> tuple[list[SeriesRecord], list[dict]]:
    if not src.exists():
        raise HaganError(f"source not found: {src}")
    if (src / "cache.json").is_file() and (src / "manifest.csv").is_file():
        ok, others = _cache_records(src, cfg, qct)
    else:
        d = cfg.data
        found = discover(src, d.modality, d.min_slices, d.irregular, progress=progress)
        ok, others = found.ok, [r.row() for r in found.records if r.status != "ok"]
    if not ok and not others:
        raise HaganError(f"{src}: no DICOM series, NIfTI files or preprocess cache found")
    return ok, others


# ---------------------------------------------------------------- one series (in a worker process)
def prepare_one(record: SeriesRecord, cfg_dict: dict, qct: bool) -> dict:
    """Read and preprocess one series: {'grid': float16 (S, S, S) or None, 'row': ..., 'read_s', 'prep_s'}."""
    from hagan_clinic.preprocessing import decode_cache, encode_cache, to_model_grid

    cfg = Config.from_dict(cfg_dict)
    row = {"status": "ok", "reason": "", "notes": ""}
    t0 = time.perf_counter()
    try:
        if record.kind == "cache":
            grid = encode_cache(decode_cache(np.load(record.paths[0])), "float16")
            return {"grid": grid, "row": row, "read_s": time.perf_counter() - t0, "prep_s": 0.0}
        volume = load_series(record, cfg.data.modality, cfg.data.irregular)
        t1 = time.perf_counter()
        grid, info = to_model_grid(volume, cfg)
        t2 = time.perf_counter()
    except HaganError as err:
        return {"grid": None, "row": {**row, "status": "failed", "reason": " ".join(str(err).split())[:300]}}
    meta = volume.meta
    row.update(kernel=meta.get("kernel") or record.kernel, slice_thickness_mm=meta.get("slice_thickness_mm"))
    row["notes"] = "; ".join(n for n in (meta.get("notes", ""), *info.notes) if n)
    if qct:
        from hagan_clinic.qct import measure

        try:
            values = measure(volume.hu.astype(np.float32, copy=False), volume.spacing, volume.valid,
                             kernel=row["kernel"], slice_thickness_mm=row["slice_thickness_mm"])  # fmt: skip
            row.update({k: round(float(values[k]), 3) for k in QCT_COLUMNS[:3]}, qct_warning=values["warning"])
        except HaganError as err:  # no lung found: the features are still valid
            row["qct_warning"] = " ".join(str(err).split())[:200]
    return {"grid": encode_cache(grid, "float16"), "row": row, "read_s": t1 - t0, "prep_s": t2 - t1}


def _safe_prepare(record: SeriesRecord, cfg_dict: dict, qct: bool) -> dict:
    try:
        return prepare_one(record, cfg_dict, qct)
    except Exception as err:  # an unexpected failure in one series is that series' failure
        reason = f"{type(err).__name__}: {' '.join(str(err).split())}"[:300]
        return {"grid": None, "row": {"status": "failed", "reason": reason, "notes": ""}}


# ---------------------------------------------------------------- the run
def _settings(opts: EncodeOptions, src: Path, checkpoint_sha: str, keys: list[str]) -> dict:
    return {
        "checkpoint_sha256": checkpoint_sha,
        "source": str(src.resolve()),
        "series": hashlib.sha256("\n".join(keys).encode()).hexdigest(),
        "batch_size": opts.batch_size,
        "precision": opts.precision,
        "device": opts.device,
        "qct": opts.qct,
        "pseudonym_salt_sha256": hashlib.sha256(opts.pseudonymize.encode()).hexdigest() if opts.pseudonymize else "",
    }


def _check_state(state: Path, settings: dict) -> None:
    path = state / "settings.json"
    if path.is_file() and (state / "complete").is_file() and json.loads(path.read_text()) != settings:
        import shutil

        shutil.rmtree(state)  # a finished run's state: a new run with other settings starts afresh
    if path.is_file():
        old = json.loads(path.read_text())
        if old != settings:
            diff = ", ".join(sorted(k for k in settings if old.get(k) != settings[k]))
            raise HaganError(
                f"{state} holds an unfinished encode with other settings ({diff}); "
                "use the same arguments, another --out, or delete that folder"
            )
    else:
        state.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(settings, indent=2) + "\n")


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


def _report_row(record_row: dict, result_row: dict, salt: str | None) -> dict:
    row = {k: _plain(record_row.get(k)) for k in REPORT_COLUMNS + QCT_COLUMNS if k in record_row}
    row.update({k: _plain(v) for k, v in result_row.items()})
    if salt:
        for k in PSEUDONYMISED:
            row[k] = pseudonym(salt, row.get(k) or "")
    return row


def _encode_batch(model, grids: list[np.ndarray], device: str, precision: str) -> np.ndarray:
    import torch

    x = torch.from_numpy(np.stack(grids)).to(device=device, dtype=torch.float32)[:, None]
    autocast = torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")
    with torch.inference_mode(), autocast:
        z = model.encode(x)
    return z.float().cpu().numpy()


def _save_batch(path: Path, z: np.ndarray, rows: list[dict]) -> None:
    with atomic_target(path, ".npz") as tmp:
        np.savez(tmp, z=z.astype(np.float32), rows=np.array(json.dumps(rows)))


def _load_batch(path: Path) -> tuple[np.ndarray, list[dict]]:
    with np.load(path, allow_pickle=False) as data:
        return data["z"], json.loads(str(data["rows"]))


def _write_outputs(opts: EncodeOptions, state: Path, n_batches: int, others: list[dict], latent: int):
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
    report += [_report_row(r, {}, opts.pseudonymize) for r in others]
    meta = pd.DataFrame(table_rows, columns=ID_COLUMNS + (QCT_COLUMNS if opts.qct else []))
    feats = pd.DataFrame(np.asarray(latents, np.float32).reshape(-1, latent), columns=[f"z{i}" for i in range(latent)])
    table = pd.concat([meta, feats], axis=1)
    out = opts.out
    with atomic_target(out, out.suffix) as tmp:
        if opts.fmt == "parquet":
            table.to_parquet(tmp, index=False)
        else:
            table.to_csv(tmp, index=False, float_format="%.9g")
    report_path = out.with_name(f"{out.stem}.report.csv")
    write_csv(report_path, report, REPORT_COLUMNS + (QCT_COLUMNS if opts.qct else []))
    counts = status_counts(report)
    return report_path, counts


def run(src: str | Path, opts: EncodeOptions, tracker=None) -> EncodeResult:
    from tqdm import tqdm

    from hagan_clinic.checkpoint import file_sha256, load_checkpoint
    from hagan_clinic.tracking import NullTracker

    tracker = tracker or NullTracker()
    src, out = Path(src), opts.out
    if not opts.checkpoint.is_file():
        raise HaganError(f"checkpoint not found: {opts.checkpoint}")
    model = load_checkpoint(opts.checkpoint, device=opts.device, ema=False)
    cfg, latent = model.config, model.config.model.latent_dim
    ok, others = list_series(src, cfg, opts.qct, opts.progress)
    sha = file_sha256(opts.checkpoint)
    state = out.parent / f".{out.name}.state"
    _check_state(state, _settings(opts, src, sha, [r.key for r in ok]))
    batches = [ok[i : i + opts.batch_size] for i in range(0, len(ok), opts.batch_size)]
    shard, n_shards = opts.shard
    mine = [k for k in range(len(batches)) if k % n_shards == shard]
    todo = [k for k in mine if not (state / f"batch_{k:06d}.npz").is_file()]
    done_series = sum(len(batches[k]) for k in mine if k not in todo)
    seconds = {"read": 0.0, "preprocess": 0.0, "encode": 0.0}
    name = "encode" if n_shards == 1 else f"encode shard {shard}/{n_shards}"
    with tracker.run(name, tags={"stage": "encode"}):
        tracker.log_params({
            "checkpoint": opts.checkpoint.name, "checkpoint_sha256": sha,
            "model_version": tracker.find_model_version(sha) or "unregistered",
            "source": pseudonym(opts.pseudonymize, str(src)) if opts.pseudonymize else str(src),
            "series_found": len(ok) + len(others), "batch_size": opts.batch_size, "precision": opts.precision,
            "device": opts.device, "workers": opts.workers, "qct": opts.qct, "shard": f"{shard}/{n_shards}",
            "pseudonymized": bool(opts.pseudonymize), "encode_mode": cfg.model.encode_mode,
        })  # fmt: skip
        bar = tqdm(total=sum(len(batches[k]) for k in mine), initial=done_series, desc="encoding", unit="series",
                   disable=None if opts.progress else True)  # fmt: skip
        start, encoded = time.perf_counter(), 0
        prepare = partial(_safe_prepare, cfg_dict=cfg.to_dict(), qct=opts.qct)
        pool = None
        if opts.workers > 0 and todo:
            import multiprocessing as mp
            import os
            from concurrent.futures import ProcessPoolExecutor

            from .cohort import _init_worker

            threads = max(1, (os.cpu_count() or 1) // (opts.workers + 1))
            pool = ProcessPoolExecutor(opts.workers, mp.get_context("spawn"), _init_worker, (threads,))
        try:
            queue: deque = deque()

            def submit(k: int) -> None:
                queue.append([pool.submit(prepare, r) if pool else None for r in batches[k]])

            for k in todo[:2]:  # reading one batch ahead of the encoder
                submit(k)
            for i, k in enumerate(todo):
                futures = queue.popleft()
                if i + 2 < len(todo):
                    submit(todo[i + 2])
                results = [f.result() if f else prepare(r) for f, r in zip(futures, batches[k])]
                grids = [res["grid"] for res in results if res["grid"] is not None]
                t = time.perf_counter()
                z = _encode_batch(model, grids, opts.device, opts.precision) if grids else np.zeros((0, latent))
                seconds["encode"] += time.perf_counter() - t
                rows, index = [], 0
                for record, res in zip(batches[k], results):
                    row = _report_row(record.row(), res["row"], opts.pseudonymize)
                    row["z_index"] = index if res["grid"] is not None else -1
                    index += res["grid"] is not None
                    seconds["read"] += res.get("read_s", 0.0)
                    seconds["preprocess"] += res.get("prep_s", 0.0)
                    rows.append(row)
                _save_batch(state / f"batch_{k:06d}.npz", z, rows)
                encoded += len(rows)
                bar.update(len(rows))
                bar.set_postfix_str(f"{60 * encoded / (time.perf_counter() - start):.1f} series/min", refresh=False)
        finally:
            bar.close()
            if pool is not None:
                pool.shutdown(cancel_futures=True)
        if encoded:
            per = {f"{k}_s_per_series": v / encoded for k, v in seconds.items()}
            tracker.log_metrics({**per, "series_per_min": 60 * encoded / (time.perf_counter() - start)})
        if not all((state / f"batch_{k:06d}.npz").is_file() for k in range(len(batches))):
            return EncodeResult(None, None, {"encoded_here": encoded}, seconds)  # other shards still at work
        report, counts = _write_outputs(opts, state, len(batches), others, latent)
        atomic_write_text(state / "complete", "")
        tracker.log_metrics({f"series_{k}": float(v) for k, v in counts.items()})
        tracker.log_artifact(report)
        if out.stat().st_size <= 50 * 2**20:
            tracker.log_artifact(out)
        else:  # too large for an artifact store: its place and identity instead
            tracker.log_params({"table_path": str(out.resolve()), "table_sha256": file_sha256(out)})
    return EncodeResult(out, report, counts, seconds)
