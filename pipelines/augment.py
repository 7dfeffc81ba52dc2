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
from pathlib import Path

import numpy as np

from hagan_clinic.config import Config
from hagan_clinic.errors import HaganError
from hagan_clinic.io.files import Outputs, make_folder, read_csv_table, write_rows, write_text

METRICS = ("accuracy", "balanced_accuracy", "auc")


def load_real(cfg: Config) -> tuple[list[Path], np.ndarray, np.ndarray]:
    """(volume paths, labels, patient ids) of the ok series of the cache that have a label."""
    import pandas as pd

    a = cfg.augment
    if not a.cache or not (Path(a.cache) / "manifest.csv").is_file():
        raise HaganError(f"augment.cache: no preprocess cache at '{a.cache}'")
    if not a.clinical or not Path(a.clinical).is_file():
        raise HaganError(f"augment.clinical: table not found: '{a.clinical}'")
    manifest = read_csv_table(Path(a.cache) / "manifest.csv", "manifest", dtype=str, keep_default_na=False)
    clinical = read_csv_table(a.clinical, "clinical table", dtype={a.id_column: str})
    for col in (a.id_column, a.label_column):
        if col not in clinical.columns:
            raise HaganError(f"{a.clinical}: no column '{col}'")
    rows = manifest[manifest["status"] == "ok"].merge(
        clinical[[a.id_column, a.label_column]], left_on="patient_id", right_on=a.id_column
    )
    labels = pd.to_numeric(rows[a.label_column], errors="coerce")
    rows, labels = rows[labels.notna()], labels[labels.notna()].astype(int).to_numpy()
    if len(np.unique(labels)) < 2:
        raise HaganError("augment needs at least two classes among the labelled volumes")
    from .preprocess import cached_file

    paths = [cached_file(Path(a.cache), p) for p in rows["path"]]
    bad = [p for p, path in zip(rows["path"], paths) if path is None]
    if bad:  # a manifest may be edited or damaged: a FIFO or a path out of the cache is never opened
        raise HaganError(f"{len(bad)} volume(s) of {a.cache}/manifest.csv are missing, not regular files or outside "
                         f"the cache, e.g. '{str(bad[0])[:80]}': preprocess again")  # fmt: skip
    return paths, labels, rows["patient_id"].to_numpy(str)


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
    paths, labels, groups = load_real(cfg)
    parts = split(labels, groups, cfg)
    make_folder(out)
    _write_split_csv(out / "split.csv", paths, labels, groups, parts, guard)
    manifest = read_csv_table(Path(a.cache) / "manifest.csv", "manifest", dtype=str, keep_default_na=False)
    train_paths = {str(p.relative_to(Path(a.cache))) for p, s in zip(paths, parts) if s == "train"}
    label_of = {str(p.relative_to(Path(a.cache))): int(y) for p, y in zip(paths, labels)}
    rows = manifest[manifest["path"].isin(train_paths)].copy()
    rows[a.label_column] = [label_of[p] for p in rows["path"]]
    write_rows(out / "train_table.csv", rows.to_dict("records"), list(rows.columns), guard)
    return out / "split.csv", out / "train_table.csv"


def _write_split_csv(path: Path, paths, labels, groups, parts, guard: Outputs) -> None:
    write_rows(path, [{"patient_id": g, "path": str(p), "label": int(y), "split": s}
                     for p, y, g, s in zip(paths, labels, groups, parts)],
              ["patient_id", "path", "label", "split"], guard)  # fmt: skip


def _same_id(value) -> str:
    """Patient IDs as compared for leakage: case, surrounding blanks and leading zeros do not make a new patient."""
    return str(value).strip().casefold().lstrip("0") or "0"


def check_no_leak(checkpoint: str | None, groups: np.ndarray, parts: np.ndarray, paths=(), cache=None) -> None:
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
    overlap = sorted({g for g in groups[held] if _same_id(g) in seen})
    root = Path(record.get("data_dir", ""))
    seen_files = {str((root / f).resolve()) for f in record.get("files", [])}
    seen_series = set(record.get("series_uids") or []) - {""}
    series_of: dict = {}
    if cache is not None and (Path(cache) / "manifest.csv").is_file():
        manifest = read_csv_table(Path(cache) / "manifest.csv", "manifest", dtype=str, keep_default_na=False)
        series_of = {str((Path(cache) / p).resolve()): u for p, u in zip(manifest["path"], manifest["series_uid"])}
    volumes = [str(Path(p).resolve()) for p, h in zip(paths, held) if h]
    seen_volumes = [v for v in volumes if v in seen_files or series_of.get(v, "") in seen_series]
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


def classical_transform(c, seed: int):
    """The classical augmentation as one MONAI Compose of random transforms on (1, D, H, W) volumes in [-1, 1],
    seeded: the same seed draws the same sequence. Areas moved in from outside are air (the border value)."""
    import math

    from monai.transforms import (
        Compose,
        Rand3DElastic,
        RandAffine,
        RandFlip,
        RandGaussianNoise,
        RandScaleIntensity,
        RandShiftIntensity,
    )

    rot = math.radians(c.rotate_deg)
    steps = [RandAffine(prob=1.0, rotate_range=(rot,) * 3, scale_range=(c.scale,) * 3,
                        translate_range=(c.translate_vox,) * 3, padding_mode="border")]  # fmt: skip
    if c.elastic:
        steps.append(Rand3DElastic(c.elastic_sigma, c.elastic_magnitude, prob=1.0, padding_mode="border"))
    if c.flip_lr:
        steps.append(RandFlip(prob=0.5, spatial_axis=2))  # W: the patient's right-left axis
    steps += [RandScaleIntensity(c.intensity_scale, prob=1.0), RandShiftIntensity(c.intensity_shift, prob=1.0),
              RandGaussianNoise(prob=1.0, std=c.noise_sd)]  # fmt: skip
    return Compose(steps).set_random_state(seed=seed)


def classical(x, transform):
    """Classical augmentation of a batch (N, 1, D, H, W), one random draw per volume, clamped to [-1, 1]."""
    import torch

    out = [torch.as_tensor(transform(v), dtype=torch.float32) for v in x]
    return torch.stack(out).clamp(-1, 1)


def make_classifier(name: str, classes: int):
    from monai.networks.nets import DenseNet121, resnet10, resnet18

    if name == "densenet121":
        return DenseNet121(spatial_dims=3, in_channels=1, out_channels=classes)
    # a strided first convolution: the stem at full resolution dominated the cost, for no gain at 32^3-128^3
    net = {"resnet10": resnet10, "resnet18": resnet18}[name]
    return net(spatial_dims=3, n_input_channels=1, num_classes=classes, conv1_t_stride=2)


def scores(y: np.ndarray, prob: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy (mean recall over the classes present) and AUC (NaN with one class present)."""
    pred = prob.argmax(1)
    classes = np.unique(y)
    balanced = float(np.mean([np.mean(pred[y == c] == c) for c in classes]))
    if len(classes) < 2:
        auc = float("nan")
    elif prob.shape[1] == 2:  # the Mann-Whitney form of the AUC, ties counted half
        pos, neg = prob[y == 1, 1], prob[y != 1, 1]
        auc = float(
            ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (pos.size * neg.size)
        )
    else:
        from sklearn.metrics import roc_auc_score

        auc = float(roc_auc_score(y, prob, multi_class="ovr", labels=list(range(prob.shape[1]))))
    return {"accuracy": float(np.mean(pred == y)), "balanced_accuracy": balanced, "auc": auc}


def train_arm(arm: str, seed: int, data: dict, cfg: Config, device: str = "cpu") -> dict:
    """Train one classifier on ``device``; the best validation epoch is scored on the test split. The result
    holds the test-split probabilities (``test_prob``) for the patient bootstrap."""
    import torch

    a = cfg.augment
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    transform = classical_transform(a.classical, seed) if "classical" in arm else None
    x, y = data["train_x"], data["train_y"]
    if "synthetic" in arm:
        x, y = np.concatenate([x, data["syn_x"]]), np.concatenate([y, data["syn_y"]])
    x, y = torch.from_numpy(x.astype(np.float32))[:, None], torch.from_numpy(y).long()
    classes = int(max(data["train_y"].max(), data["test_y"].max())) + 1
    net = make_classifier(a.classifier, classes).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=a.lr)

    def predict(vols: np.ndarray) -> np.ndarray:
        net.eval()
        with torch.no_grad():
            logits = torch.cat([net(torch.from_numpy(vols[i : i + a.batch_size].astype(np.float32))[:, None]
                                    .to(device)).float().cpu() for i in range(0, len(vols), a.batch_size)])  # fmt: skip
        return torch.softmax(logits, 1).numpy()

    best, best_state = -1.0, None
    for _ in range(a.epochs):
        net.train()
        order = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), a.batch_size):
            idx = order[i : i + a.batch_size]
            xb = classical(x[idx], transform) if transform is not None else x[idx]
            loss = torch.nn.functional.cross_entropy(net(xb.to(device)), y[idx].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
        val = scores(data["val_y"], predict(data["val_x"]))["balanced_accuracy"]
        if val > best:
            best, best_state = val, {k: v.clone() for k, v in net.state_dict().items()}
    net.load_state_dict(best_state)
    prob = predict(data["test_x"])
    return {"val_balanced_accuracy": best, **scores(data["test_y"], prob),
            "train_volumes": int(len(y)), "synthetic_volumes": int(len(y) - len(data["train_y"])),
            "test_prob": prob}  # fmt: skip


def bootstrap_differences(results: list[dict], arms, test_y, test_groups, n_boot: int, seed: int) -> dict:
    """{arm: {metric: [lo, hi]}}: 95 % patient-bootstrap interval, over the test split, of the seed-averaged
    difference of each arm from 'real' (same resampled patients for both; resamples where the AUC is undefined,
    one class only, are left out of the AUC's interval)."""
    rng = np.random.default_rng(seed)
    seeds = sorted({r["seed"] for r in results})
    prob = {(r["arm"], r["seed"]): r["test_prob"] for r in results}
    uniq, inverse = np.unique(test_groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(uniq))]
    diffs: dict = {arm: {m: [] for m in METRICS} for arm in arms if arm != "real"}
    for _ in range(n_boot):
        rows = np.concatenate([members[g] for g in rng.integers(0, len(uniq), len(uniq))])
        y = test_y[rows]
        base = [scores(y, prob[("real", s)][rows]) for s in seeds]
        for arm in diffs:
            other = [scores(y, prob[(arm, s)][rows]) for s in seeds]
            for m in METRICS:
                d = np.mean([o[m] - b[m] for o, b in zip(other, base)])
                if np.isfinite(d):
                    diffs[arm][m].append(d)
    return {arm: {m: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if v else [None, None]
                  for m, v in per.items()} for arm, per in diffs.items()}  # fmt: skip


def compare(results: list[dict], arms, boot: dict | None = None) -> list[dict]:
    """Per arm: mean and sd over seeds; the paired difference from 'real' with a 95 % t-interval over seeds, and
    (``boot``) the patient-bootstrap interval of the test split."""
    from scipy import stats

    table = []
    by = {(r["arm"], r["seed"]): r for r in results}
    seeds = sorted({r["seed"] for r in results})
    for arm in arms:
        row = {"arm": arm, "seeds": len(seeds)}
        for m in METRICS:
            values = np.array([by[(arm, s)][m] for s in seeds])
            row[f"{m}_mean"] = float(values.mean())
            row[f"{m}_sd"] = float(values.std(ddof=1)) if len(seeds) > 1 else 0.0
            if arm != "real":
                diff = values - np.array([by[("real", s)][m] for s in seeds])
                half = float("nan")
                if len(diff) > 1:
                    half = float(stats.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / np.sqrt(len(diff)))
                row[f"{m}_diff"] = float(diff.mean())
                row[f"{m}_diff_ci"] = [float(diff.mean() - half), float(diff.mean() + half)]
                if boot is not None:
                    row[f"{m}_diff_boot_ci"] = boot[arm][m]
        table.append(row)
    return table


def _examples_png(path: Path, data: dict) -> None:
    from hagan_clinic.plots import mid_slices_png

    rows = []
    for c in np.unique(data["train_y"]):
        rows.append((f"real, class {c}", data["train_x"][data["train_y"] == c][0].astype(np.float32)))
        if data.get("syn_x") is not None and (data["syn_y"] == c).any():
            rows.append((f"synthetic, class {c}", data["syn_x"][data["syn_y"] == c][0].astype(np.float32)))
    mid_slices_png(rows, path, "real and synthetic training volumes per class")


def run(cfg: Config, out: Path, tracker=None, device: str = "cpu", overwrite: bool = False) -> list[dict]:
    from hagan_clinic.preprocessing import decode_cache
    from hagan_clinic.tracking import NullTracker

    tracker = tracker or NullTracker()
    a = cfg.augment
    guard = _guard(cfg, overwrite)
    for name in ("split.csv", "results.csv", "comparison.json", "examples.png", "synthetic.npz"):
        guard.check(out / name)  # before any work
    make_folder(out)
    paths, labels, groups = load_real(cfg)
    parts = split(labels, groups, cfg)
    if any("synthetic" in arm for arm in a.arms):
        check_no_leak(a.checkpoint, groups, parts, paths, a.cache)  # before any work: a leak invalidates every number
    _write_split_csv(out / "split.csv", paths, labels, groups, parts, guard)
    vols = np.stack([decode_cache(np.load(p)).astype(np.float16) for p in paths])
    data = {f"{s}_{k}": v[parts == s] for s in ("train", "val", "test") for k, v in (("x", vols), ("y", labels))}
    if any("synthetic" in arm for arm in a.arms):
        counts = {int(c): int(round(a.synthetic_ratio * (data["train_y"] == c).sum())) for c in np.unique(labels)}
        data["syn_x"], data["syn_y"] = synthesize(cfg, counts, out, guard)
    _examples_png(out / "examples.png", data)
    guard.record(out / "examples.png")
    f = a.downsample
    if f > 1:  # a coarser classifier input: the same volumes, block-averaged (cheaper on a CPU)
        if cfg.model.size % f:
            raise HaganError(f"augment.downsample {f} does not divide the grid size {cfg.model.size}")
        for key in [k for k in data if k.endswith("_x")]:
            x = data[key].astype(np.float32)
            n, s = x.shape[0], cfg.model.size // f
            data[key] = x.reshape(n, s, f, s, f, s, f).mean(axis=(2, 4, 6)).astype(np.float16)
    results = []
    with tracker.run("augment", tags={"stage": "augment"}):
        tracker.log_params({"arms": ",".join(a.arms), "seeds": ",".join(map(str, a.seeds)),
                            "classifier": a.classifier, "epochs": a.epochs, "synthetic_ratio": a.synthetic_ratio,
                            **{f"n_{s}": int((parts == s).sum()) for s in ("train", "val", "test")}})  # fmt: skip
        for arm in a.arms:
            for seed in a.seeds:
                print(f"augment: arm {arm}, seed {seed}", flush=True)
                with tracker.run(f"{arm} seed {seed}", tags={"arm": arm, "seed": str(seed)}):
                    r = train_arm(arm, seed, data, cfg, device)
                    tracker.log_metrics({k: float(v) for k, v in r.items() if k != "test_prob"})
                results.append({"arm": arm, "seed": seed, **r})
        boot = bootstrap_differences(results, a.arms, data["test_y"], groups[parts == "test"], a.bootstrap,
                                     a.split_seed)  # fmt: skip
        table = compare(results, a.arms, boot)
        write_rows(out / "results.csv", results, ["arm", "seed", *METRICS, "val_balanced_accuracy", "train_volumes",
                                                  "synthetic_volumes"], guard)  # fmt: skip
        write_text(out / "comparison.json", json.dumps(table, indent=2) + "\n", guard)
        for row in table:
            name = row["arm"].replace("+", "_")  # MLflow metric names take no '+'
            tracker.log_metrics({f"{name}.{k}": v for k, v in row.items() if isinstance(v, float)})
            for k, v in row.items():  # intervals as two metrics each
                if k.endswith("_ci") and None not in v:
                    tracker.log_metrics({f"{name}.{k}_low": v[0], f"{name}.{k}_high": v[1]})
        for name in ("split.csv", "results.csv", "comparison.json", "examples.png"):
            tracker.log_artifact(out / name)
    return table
