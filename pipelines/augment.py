"""``hagan-clinic augment``: does adding synthetic volumes help a downstream 3D classifier? Measured honestly.

One split of the real volumes (grouped by patient, stratified by label, fixed by ``augment.split_seed``) serves
every arm and seed; synthetic volumes only ever join the training split. Arms:

- ``real``: the real training volumes;
- ``real+synthetic``: plus ``synthetic_ratio`` synthetic volumes per real training volume of each class, generated
  with that class by a conditional HA-GAN checkpoint (generated once, cached in the output folder);
- ``real+classical``: real volumes with classical augmentation (MONAI random transforms: a small affine, an
  optional elastic deformation, intensity scale and shift, Gaussian noise; left-right flips only when asked, since
  in a thorax the heart is on the left), drawn afresh for every volume and epoch (``augment.classical``);
- ``real+synthetic+classical``: both.

Each (arm, seed) trains the classifier from scratch, keeps the epoch with the best validation balanced accuracy,
and is scored once on the test split: accuracy, balanced accuracy, AUC. Every arm is compared with ``real`` seed by
seed (paired): mean difference and a 95 % t-interval over seeds (the spread of training); and by a patient
bootstrap of the test split (the sampling error of a small test set): 95 % interval of the seed-averaged
difference.

No leakage: the GAN behind the synthetic arms must not have seen a validation or test patient. A checkpoint
records its training set (hagan_clinic.data.VolumeFolder.training_record); a checkpoint without that record, or
whose training set holds any validation or test patient, is refused. The clean path: ``augment --write-split``
writes the split and the training part as a table, ``train`` learns the GAN from that table, ``augment`` runs.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hagan_clinic.config import Config
from hagan_clinic.errors import HaganError
from hagan_clinic.io.cache import Cache, looks_like_cache, open_cache
from hagan_clinic.io.files import Outputs, make_folder, read_csv_table, write_json, write_rows

from .augment_arms import METRICS, bootstrap_differences, compare, train_arm

log = logging.getLogger(__name__)


@dataclass
class Labelled:
    """The labelled real volumes: ok rows ``index`` of the cache, with their labels (N,) and patient IDs (N,)."""

    cache: Cache
    index: list[int]
    labels: np.ndarray
    groups: np.ndarray

    @property
    def paths(self) -> list[Path]:
        return [self.cache.path_of(i) for i in self.index]

    def volumes(self) -> np.ndarray:
        """(N, S, S, S) float16 in [-1, 1], each checked as the cache loads it (shape, dtype, finite values)."""
        return np.stack([self.cache.load(i).astype(np.float16) for i in self.index])


def load_real(cfg: Config) -> Labelled:
    """The ok series of ``augment.cache`` that have a label in ``augment.clinical``. The cache must have been made
    at the config's settings, and every ok row's volume be a regular file in it: HaganError in one line if not."""
    import pandas as pd

    a = cfg.augment
    if not a.cache or not looks_like_cache(Path(a.cache)):
        raise HaganError(f"augment.cache: no preprocess cache at '{a.cache}'")
    if not a.clinical or not Path(a.clinical).is_file():
        raise HaganError(f"augment.clinical: table not found: '{a.clinical}'")
    cache = open_cache(a.cache, cfg)
    cache.require_volumes()  # a manifest may be edited or damaged: a FIFO or a path out of the cache is never opened
    clinical = read_csv_table(a.clinical, "clinical table", dtype={a.id_column: str})
    for col in (a.id_column, a.label_column):
        if col not in clinical.columns:
            raise HaganError(f"{a.clinical}: no column '{col}'")
    ok = pd.DataFrame({"patient_id": [r.get("patient_id", "") for r in cache.rows], "_row": range(len(cache))})
    rows = ok.merge(clinical[[a.id_column, a.label_column]], left_on="patient_id", right_on=a.id_column)
    numeric = pd.to_numeric(rows[a.label_column], errors="coerce")
    rows, labels = rows[numeric.notna()], numeric[numeric.notna()].astype(int).to_numpy()
    if len(np.unique(labels)) < 2:
        raise HaganError("augment needs at least two classes among the labelled volumes")
    return Labelled(cache, [int(i) for i in rows["_row"]], labels, rows["patient_id"].to_numpy(str))


def split(labels: np.ndarray, groups: np.ndarray, cfg: Config) -> np.ndarray:
    """'train' / 'val' / 'test' per volume: grouped by patient, stratified by label, fixed by split_seed."""
    from sklearn.model_selection import StratifiedGroupKFold

    a = cfg.augment
    out = np.full(len(labels), "train", dtype=object)
    k_test = max(2, round(1 / a.test_fraction))
    k_val = max(2, round((1 - a.test_fraction) / a.val_fraction))
    _enough_patients(groups, k_test, "test")
    test = next(StratifiedGroupKFold(k_test, shuffle=True, random_state=a.split_seed).split(labels, labels, groups))[1]
    out[test] = "test"
    rest = np.flatnonzero(out == "train")
    _enough_patients(groups[rest], k_val, "validation")
    sgkf = StratifiedGroupKFold(k_val, shuffle=True, random_state=a.split_seed + 1)
    val = next(sgkf.split(rest, labels[rest], groups[rest]))[1]
    out[rest[val]] = "val"
    for part in ("train", "val", "test"):
        if len(np.unique(labels[out == part])) < 2:
            raise HaganError(f"the {part} split holds one class only: add labelled volumes or change the fractions")
    return out


def _enough_patients(groups: np.ndarray, k: int, part: str) -> None:
    n = len(np.unique(groups))
    if n < k:
        raise HaganError(f"{n} patients are too few to set a {part} part of 1/{k} apart: add labelled patients or "
                         "change augment.test_fraction / augment.val_fraction")  # fmt: skip


def _guard(cfg: Config, overwrite: bool) -> Outputs:
    a = cfg.augment
    return Outputs("augment", [a.cache and Path(a.cache) / "manifest.csv", a.checkpoint or None], overwrite)


def write_split(cfg: Config, out: Path, overwrite: bool = False) -> tuple[Path, Path]:
    """split.csv (every labelled volume's split) and train_table.csv (the training part: the cache manifest's rows
    with the label), to train the GAN on the training patients only. Returns their paths."""

    a = cfg.augment
    guard = _guard(cfg, overwrite)
    for name in ("split.csv", "train_table.csv"):
        guard.check(out / name)
    real = load_real(cfg)
    parts = split(real.labels, real.groups, cfg)
    make_folder(out)
    _write_split_csv(out / "split.csv", real, parts, guard)
    train = {i for i, part in zip(real.index, parts) if part == "train"}
    label_of = {i: int(y) for i, y in zip(real.index, real.labels)}
    rows = [{**row, a.label_column: label_of[i]} for i, row in enumerate(real.cache.rows) if i in train]
    columns = [c for c in (real.cache.manifest[0] if real.cache.manifest else {}) if c != a.label_column]
    columns.append(a.label_column)  # the label replaces a manifest column of that name
    write_rows(out / "train_table.csv", rows, columns, guard)
    return out / "split.csv", out / "train_table.csv"


def _write_split_csv(path: Path, real: Labelled, parts: np.ndarray, guard: Outputs) -> None:
    rows = [{"patient_id": g, "path": str(p), "label": int(y), "split": s}
            for p, y, g, s in zip(real.paths, real.labels, real.groups, parts)]  # fmt: skip
    write_rows(path, rows, ["patient_id", "path", "label", "split"], guard)


def _same_id(value) -> str:
    """Patient IDs as compared for leakage: case, surrounding blanks and leading zeros do not make a new patient."""
    return str(value).strip().casefold().lstrip("0") or "0"


def check_no_leak(checkpoint: str | None, real: Labelled, parts: np.ndarray) -> None:
    """Refuse a GAN that saw a validation or test patient, or that cannot say what it saw. Overlap is looked for
    three ways: patient IDs (as ``_same_id`` compares them), series UIDs, and the volume files themselves."""

    from hagan_clinic.models.hagan import training_record

    if not checkpoint or not Path(checkpoint).is_file():
        raise HaganError(f"augment.checkpoint: not found: '{checkpoint}'")
    record = training_record(checkpoint)
    how = "train it on the training part that 'augment --write-split' writes"
    if record is None:
        raise HaganError(f"augment.checkpoint has no training record, so its training patients are unknown: {how}")
    seen = {_same_id(p) for p in record.get("patient_ids") or []}
    if not seen:
        raise HaganError(f"augment.checkpoint's training record names no patients (no patient_id column): {how}")
    held = parts != "train"
    groups = real.groups
    overlap = sorted({g for g in groups[held] if _same_id(g) in seen})
    root = Path(record.get("data_dir", ""))
    seen_files = {str((root / f).resolve()) for f in record.get("files", [])}
    seen_series = set(record.get("series_uids") or []) - {""}
    held_rows = [i for i, h in zip(real.index, held) if h]
    volumes = [str(real.cache.path_of(i).resolve()) for i in held_rows]
    series = [real.cache.rows[i].get("series_uid", "") for i in held_rows]
    seen_volumes = [v for v, u in zip(volumes, series) if v in seen_files or (u and u in seen_series)]
    if overlap or seen_volumes:
        n_held = len(set(groups[held].tolist()))
        raise HaganError(
            f"the GAN was trained on {len(overlap)} of the {n_held} validation/test patients and on "
            f"{len(seen_volumes)} of their {len(volumes)} volumes (by file or series UID): {how}"
        )


def synthesize(
    cfg: Config, counts: dict[int, int], out: Path, guard: Outputs | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``counts[c]`` volumes of class c from the conditional checkpoint, cached in out/synthetic.npz."""
    import torch

    from hagan_clinic.models.hagan import load_checkpoint
    from hagan_clinic.sampling import sample_latent

    cache = out / "synthetic.npz"
    key = json.dumps({"checkpoint": cfg.augment.checkpoint, "counts": counts, "seed": cfg.seed}, sort_keys=True)
    guard = guard or Outputs("augment")
    guard.check(cache)
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as data:
                if str(data["key"]) == key:
                    return data["x"], data["y"]
        except (OSError, ValueError, KeyError):  # a damaged cache is made again
            pass
    if not cfg.augment.checkpoint or not Path(cfg.augment.checkpoint).is_file():
        raise HaganError(f"augment.checkpoint: not found: '{cfg.augment.checkpoint}'")
    model = load_checkpoint(cfg.augment.checkpoint)
    if model.config.model.num_classes < max(counts) + 1:
        raise HaganError("augment.checkpoint is not a conditional model with these classes (model.num_classes)")
    if model.config.data_contract() != cfg.data_contract():
        raise HaganError("augment.checkpoint's data contract differs from the config's: its volumes would not match")
    xs, ys, index = [], [], 0
    for c, n in sorted(counts.items()):
        for _ in range(n):
            z = sample_latent(cfg.seed + 7919, index, model.config.model.latent_dim)  # apart from evaluate's seeds
            index += 1
            with torch.no_grad():
                xs.append(model.generate(z, torch.tensor([c]))[0, 0].numpy().astype(np.float16))
            ys.append(c)
    x, y = np.stack(xs), np.asarray(ys)
    with guard.target(cache, ".npz") as tmp:
        np.savez(tmp, x=x, y=y, key=np.array(key))
    return x, y


def _examples_png(path: Path, data: dict) -> None:
    from hagan_clinic.plots import mid_slices_png

    rows = []
    for c in np.unique(data["train_y"]):
        rows.append((f"real, class {c}", data["train_x"][data["train_y"] == c][0].astype(np.float32)))
        if data.get("syn_x") is not None and (data["syn_y"] == c).any():
            rows.append((f"synthetic, class {c}", data["syn_x"][data["syn_y"] == c][0].astype(np.float32)))
    mid_slices_png(rows, path, "real and synthetic training volumes per class")


@dataclass
class AugmentResult:
    table: list[dict]  # per arm: means, sds and differences from 'real' (comparison.json)
    out: Path

    def summary(self) -> str:
        """What ``hagan-clinic augment`` prints: each arm's scores, its difference from 'real', and the folder."""
        lines = []
        for row in self.table:
            text = ", ".join(f"{m} {row[m + '_mean']:.3f} +- {row[m + '_sd']:.3f}" for m in METRICS)
            if "auc_diff" in row:
                lo, hi = row["balanced_accuracy_diff_ci"]
                blo, bhi = row["balanced_accuracy_diff_boot_ci"]
                text += (f"; balanced accuracy vs real {row['balanced_accuracy_diff']:+.3f} (seeds [{lo:+.3f}, "
                         f"{hi:+.3f}]; test patients [{_signed(blo)}, {_signed(bhi)}])")  # fmt: skip
            lines.append(f"{row['arm']}: {text}")
        return "\n".join([*lines, f"written to {self.out}"])


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.3f}"


def _downsample(data: dict, f: int, size: int) -> None:
    """Every (N, S, S, S) array of ``data`` block-averaged by ``f`` in place: a coarser, cheaper classifier input."""
    if size % f:
        raise HaganError(f"augment.downsample {f} does not divide the grid size {size}")
    for key in [k for k in data if k.endswith("_x")]:
        x = data[key].astype(np.float32)
        n, s = x.shape[0], size // f
        data[key] = x.reshape(n, s, f, s, f, s, f).mean(axis=(2, 4, 6)).astype(np.float16)


def run(cfg: Config, out: Path, tracker=None, device: str = "cpu", overwrite: bool = False) -> AugmentResult:
    """Every (arm, seed) of ``cfg.augment`` on one split of the cache's labelled volumes; split.csv, results.csv,
    comparison.json, examples.png (and synthetic.npz) in ``out``."""
    from hagan_clinic.tracking import NullTracker

    tracker = tracker or NullTracker()
    a = cfg.augment
    guard = _guard(cfg, overwrite)
    for name in ("split.csv", "results.csv", "comparison.json", "examples.png", "synthetic.npz"):
        guard.check(out / name)  # before any work
    real = load_real(cfg)  # the cache checked before anything is created
    make_folder(out)
    labels, groups = real.labels, real.groups
    parts = split(labels, groups, cfg)
    if any("synthetic" in arm for arm in a.arms):
        check_no_leak(a.checkpoint, real, parts)  # before any work: a leak invalidates every number
    _write_split_csv(out / "split.csv", real, parts, guard)
    vols = real.volumes()
    data = {f"{s}_{k}": v[parts == s] for s in ("train", "val", "test") for k, v in (("x", vols), ("y", labels))}
    if any("synthetic" in arm for arm in a.arms):
        counts = {int(c): int(round(a.synthetic_ratio * (data["train_y"] == c).sum())) for c in np.unique(labels)}
        data["syn_x"], data["syn_y"] = synthesize(cfg, counts, out, guard)
    _examples_png(out / "examples.png", data)
    guard.record(out / "examples.png")
    if a.downsample > 1:
        _downsample(data, a.downsample, cfg.model.size)
    results = []
    with tracker.run("augment", tags={"stage": "augment"}, system_metrics=True):
        tracker.log_params({"arms": ",".join(a.arms), "seeds": ",".join(map(str, a.seeds)),
                            "classifier": a.classifier, "epochs": a.epochs, "synthetic_ratio": a.synthetic_ratio,
                            **{f"n_{s}": int((parts == s).sum()) for s in ("train", "val", "test")}})  # fmt: skip
        for arm in a.arms:
            for seed in a.seeds:
                log.info("augment: arm %s, seed %s", arm, seed)
                with tracker.run(f"{arm} seed {seed}", tags={"stage": "augment", "arm": arm, "seed": str(seed)}):
                    r = train_arm(arm, seed, data, cfg, device)
                    tracker.log_metrics({k: float(v) for k, v in r.items() if k != "test_prob"})
                results.append({"arm": arm, "seed": seed, **r})
        boot = bootstrap_differences(results, a.arms, data["test_y"], groups[parts == "test"], a.bootstrap,
                                     a.split_seed)  # fmt: skip
        table = compare(results, a.arms, boot)
        write_rows(out / "results.csv", results, ["arm", "seed", *METRICS, "val_balanced_accuracy", "train_volumes",
                                                  "synthetic_volumes"], guard)  # fmt: skip
        write_json(out / "comparison.json", table, guard, sort_keys=False)
        for row in table:
            name = row["arm"].replace("+", "_")  # MLflow metric names take no '+'
            tracker.log_metrics({f"{name}.{k}": v for k, v in row.items() if isinstance(v, float)})
            for k, v in row.items():  # intervals as two metrics each
                if k.endswith("_ci") and None not in v:
                    tracker.log_metrics({f"{name}.{k}_low": v[0], f"{name}.{k}_high": v[1]})
        for name in ("split.csv", "results.csv", "comparison.json", "examples.png"):
            tracker.log_artifact(out / name)
    return AugmentResult(table, out)
