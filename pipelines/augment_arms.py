"""The arms of ``hagan-clinic augment``: one downstream 3D classifier trained per (arm, seed), scored on the test
split, and the arms compared with ``real`` seed by seed and by a patient bootstrap of the test split.

An arm is a name: ``real``, plus ``+synthetic`` (the conditional GAN's volumes join the training split) and/or
``+classical`` (MONAI random transforms, drawn afresh for every volume and epoch). Volumes are (N, S, S, S) float16
in [-1, 1]; labels (N,) int.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from hagan_clinic.config import ClassicalConfig, Config

METRICS = ("accuracy", "balanced_accuracy", "auc")


def classical_transform(c: ClassicalConfig, seed: int):
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
    steps: list[Callable[..., Any]] = [RandAffine(prob=1.0, rotate_range=(rot,) * 3, scale_range=(c.scale,) * 3,
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
