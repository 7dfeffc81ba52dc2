"""The augment command on the tiny configuration: every arm runs on one split, and only real volumes are scored."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import pytest

from hagan_clinic.cli import main
from hagan_clinic.config import ConfigError
from hagan_clinic.models.hagan import HAGAN
from hagan_clinic.phantoms import write_cohort

from conftest import tiny_config

ARMS = "[real,real+synthetic,real+classical,real+synthetic+classical]"


def _settings(root) -> list[str]:
    return ["--config", "tiny", "--set", f"augment.cache={root / 'cache'}",
            "--set", f"augment.clinical={root / 'cohort' / 'clinical.csv'}"]  # fmt: skip


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from hagan_clinic.models.hagan import training_record

    root = tmp_path_factory.mktemp("augment")
    write_cohort(root / "cohort", n=24, seed=5, shape=(24, 48, 48), progress=False, extras=False)
    assert main(["preprocess", str(root / "cohort"), "--out", str(root / "cache"), "--config", "tiny"]) == 0
    # the documented clean path: the split first, then the GAN on its training part only
    assert main(["augment", *_settings(root), "--write-split", "--out", str(root / "split")]) == 0
    assert main(["train", "--config", "tiny", "--data", str(root / "cache"), "--out", str(root / "run"),
                 "--set", f"data.table={root / 'split' / 'train_table.csv'}", "--set", "data.label_column=label",
                 "--set", "model.num_classes=2", "--set", "train.iterations=2", "--no-tracking"]) == 0  # fmt: skip
    record = training_record(root / "run" / "model.pt")
    HAGAN.from_config(tiny_config()).save(root / "plain.pt", extra={"training_set": record})
    everyone = sorted(pd.read_csv(root / "split" / "split.csv", dtype=str)["patient_id"])
    leaky = {**record, "patient_ids": everyone}  # a GAN that saw every patient, test split included
    HAGAN.from_config(tiny_config("model.num_classes=2")).save(root / "leaky.pt", extra={"training_set": leaky})
    HAGAN.from_config(tiny_config("model.num_classes=2")).save(root / "norecord.pt")
    # the same leak under other names: IDs in another case, or other IDs for the same volume files
    case = {**record, "patient_ids": [p.lower().replace("ph", "Ph") for p in everyone]}
    HAGAN.from_config(tiny_config("model.num_classes=2")).save(root / "case.pt", extra={"training_set": case})
    files = sorted(str(p.relative_to(root / "cache")) for p in (root / "cache" / "volumes").glob("*.npy"))
    renamed = {**record, "patient_ids": ["X1"], "series_uids": [], "files": files, "data_dir": str(root / "cache")}
    HAGAN.from_config(tiny_config("model.num_classes=2")).save(root / "renamed.pt", extra={"training_set": renamed})
    return root


def _args(root, *extra):
    return ["augment", *_settings(root), "--set", f"augment.checkpoint={root / 'run' / 'model.pt'}",
            "--set", "augment.epochs=1", "--set", "augment.seeds=[0,1]", "--set", "augment.batch_size=8",
            "--set", "augment.bootstrap=200", *extra]  # fmt: skip


@pytest.mark.slow
def test_write_split_gives_the_gan_the_training_patients_only(cohort):
    split = pd.read_csv(cohort / "split" / "split.csv", dtype={"patient_id": str})
    table = pd.read_csv(cohort / "split" / "train_table.csv", dtype={"patient_id": str})
    train = set(split.loc[split["split"] == "train", "patient_id"])
    assert set(table["patient_id"]) == train and {"path", "series_uid", "label"} <= set(table.columns)
    from hagan_clinic.models.hagan import training_record

    record = training_record(cohort / "run" / "model.pt")
    assert set(record["patient_ids"]) == train and record["n_volumes"] == len(table)
    assert len(record["series_uids"]) == len(table) and len(record["table_sha256"]) == 64


@pytest.mark.parametrize(
    ("checkpoint", "message"),
    [
        ("leaky.pt", "the GAN was trained on"),
        ("norecord.pt", "has no training record"),
        ("case.pt", "the GAN was trained on"),
        ("renamed.pt", "by file or series UID"),
    ],
)
@pytest.mark.slow
def test_a_gan_that_saw_validation_or_test_patients_is_refused(cohort, tmp_path, capsys, checkpoint, message):
    args = _args(cohort, "--set", f"augment.checkpoint={cohort / checkpoint}")
    assert main([*args, "--out", str(tmp_path / "o"), "--no-tracking"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err
    if checkpoint == "leaky.pt":
        split = pd.read_csv(cohort / "split" / "split.csv")
        held = int((split.groupby("patient_id")["split"].first() != "train").sum())
        assert f"{held} of the {held} validation/test patients" in err


@pytest.mark.slow
def test_only_real_volumes_reach_scoring(cohort, tmp_path, monkeypatch):
    """Every volume the classifiers are scored on (validation and test) is a real cached volume of that split,
    and no synthetic volume is ever among them: checked on the arrays that reach the network in eval mode."""
    import hashlib

    import torch

    import hagan_clinic.pipelines.augment as aug
    import hagan_clinic.pipelines.augment_arms as arms
    from hagan_clinic.config import load_config
    from hagan_clinic.io.cache import decode_grid

    seen: list[str] = []

    def digest(v) -> str:
        return hashlib.sha1(np.ascontiguousarray(np.asarray(v, np.float32).astype(np.float16)).tobytes()).hexdigest()

    class Spy(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            if not self.training:
                seen.extend(digest(v[0]) for v in x.cpu().numpy())
            return self.inner(x)

    make = arms.make_classifier
    monkeypatch.setattr(arms, "make_classifier", lambda name, classes: Spy(make(name, classes)))
    overrides = _args(cohort)[4::2]  # the --set values of the common arguments
    cfg = load_config("tiny", [*overrides, "augment.arms=[real,real+synthetic,real+synthetic+classical]"])
    aug.run(cfg, tmp_path / "aug")
    split = pd.read_csv(tmp_path / "aug" / "split.csv")
    held = {digest(decode_grid(np.load(p))) for p in split.loc[split["split"] != "train", "path"]}
    train = {digest(decode_grid(np.load(p))) for p in split.loc[split["split"] == "train", "path"]}
    with np.load(tmp_path / "aug" / "synthetic.npz") as syn:
        synthetic = {digest(v) for v in syn["x"]}
    assert seen and set(seen) == held  # every val/test volume scored, nothing else
    assert not (set(seen) & synthetic) and not (set(seen) & train)


@pytest.mark.slow
def test_classical_augmentation_is_monai_seeded_and_flips_only_when_asked():
    import torch
    from monai.transforms import RandAffine, RandFlip

    from hagan_clinic.config import ClassicalConfig
    from hagan_clinic.pipelines.augment_arms import classical, classical_transform

    plain = classical_transform(ClassicalConfig(), 3)
    assert any(isinstance(t, RandAffine) for t in plain.transforms)
    assert not any(isinstance(t, RandFlip) for t in plain.transforms)  # the heart is on the left
    flips = classical_transform(ClassicalConfig(flip_lr=True), 3)
    assert any(isinstance(t, RandFlip) for t in flips.transforms)
    x = torch.linspace(-1, 1, 2 * 16**3).reshape(2, 1, 16, 16, 16)
    a = classical(x, classical_transform(ClassicalConfig(), 7))
    b = classical(x, classical_transform(ClassicalConfig(), 7))
    c = classical(x, classical_transform(ClassicalConfig(), 8))
    assert torch.equal(a, b) and not torch.equal(a, c) and a.min() >= -1 and a.max() <= 1


def test_device_is_honoured(cohort, tmp_path, capsys):
    assert main([*_args(cohort), "--device", "cuda:7", "--out", str(tmp_path / "o"), "--no-tracking"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.slow
def test_every_arm_runs_on_one_split_and_only_real_volumes_are_scored(cohort, tmp_path):
    out = tmp_path / "aug"
    code = main([*_args(cohort, "--set", f"augment.arms={ARMS}", "--set", "augment.synthetic_ratio=0.5"),
                 "--out", str(out)])  # fmt: skip
    assert code == 0
    split = pd.read_csv(out / "split.csv")
    clinical = pd.read_csv(cohort / "cohort" / "clinical.csv")
    assert len(split) == 24 and set(split["split"]) == {"train", "val", "test"}
    assert split.groupby("patient_id")["split"].nunique().max() == 1  # a patient sits in one split
    assert all(split.groupby("split")["label"].nunique() == 2)  # both classes everywhere
    assert dict(zip(split["patient_id"], split["label"])) == dict(zip(clinical["patient_id"], clinical["label"]))
    results = pd.read_csv(out / "results.csv")
    assert sorted(set(results["arm"])) == sorted(ARMS.strip("[]").split(",")) and len(results) == 8
    n_train = (split["split"] == "train").sum()
    train_counts = split[split["split"] == "train"]["label"].value_counts()
    with np.load(out / "synthetic.npz") as syn:
        per_class = pd.Series(syn["y"]).value_counts()
    # the class ratio is as configured: 0.5 synthetic per real training volume, per class
    assert all(per_class[c] == round(0.5 * train_counts[c]) for c in train_counts.index)
    for arm, rows in results.groupby("arm"):
        synthetic = per_class.sum() if "synthetic" in arm else 0
        assert (rows["train_volumes"] == n_train + synthetic).all() and (rows["synthetic_volumes"] == synthetic).all()
    assert results[["accuracy", "balanced_accuracy", "auc"]].apply(lambda c: c.between(0, 1)).all().all()
    table = json.loads((out / "comparison.json").read_text())
    assert [row["arm"] for row in table] == ARMS.strip("[]").split(",")
    assert "auc_diff" not in table[0] and all(len(row["auc_diff_ci"]) == 2 for row in table[1:])
    for row in table[1:]:  # the test split's sampling error beside the seeds' spread
        lo, hi = row["balanced_accuracy_diff_boot_ci"]
        assert lo <= row["balanced_accuracy_diff"] <= hi
    assert (out / "examples.png").stat().st_size > 0
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    parent = next(r for r in runs if r.info.run_name == "augment")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 8 and {r.data.tags["arm"] for r in children} == set(ARMS.strip("[]").split(","))


@pytest.mark.slow
def test_same_split_for_another_set_of_arms(cohort, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main([*_args(cohort, "--set", "augment.arms=[real]"), "--out", str(a), "--no-tracking"]) == 0
    assert main([*_args(cohort, "--set", "augment.arms=[real,real+classical]"), "--out", str(b), "--no-tracking"]) == 0
    assert (a / "split.csv").read_text() == (b / "split.csv").read_text()
    ra, rb = pd.read_csv(a / "results.csv"), pd.read_csv(b / "results.csv")
    pd.testing.assert_frame_equal(ra, rb[rb["arm"] == "real"].reset_index(drop=True))  # same seed, same model


def test_bad_settings_are_one_line_errors(cohort, tmp_path, capsys):
    cases = [
        (_args(cohort, "--set", f"augment.checkpoint={cohort / 'plain.pt'}"), "conditional"),
        (_args(cohort, "--set", "augment.cache=nowhere"), "augment.cache"),
        (_args(cohort, "--set", "augment.label_column=missing"), "missing"),
    ]
    for args, message in cases:
        assert main([*args, "--out", str(tmp_path / "o"), "--no-tracking"]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and message in err
    with pytest.raises(ConfigError, match="unknown arm"):
        tiny_config("augment.arms=[real,real+magic]")
    with pytest.raises(ConfigError, match="keep it"):
        tiny_config("augment.arms=[real+classical]")


def test_the_summary_is_what_the_command_prints(tmp_path):
    from hagan_clinic.pipelines.augment import AugmentResult

    base = {f"{m}_{k}": v for m in ("accuracy", "balanced_accuracy", "auc") for k, v in (("mean", 0.5), ("sd", 0.1))}
    other = {**base, "auc_diff": 0.0, "balanced_accuracy_diff": 0.125, "balanced_accuracy_diff_ci": [-0.25, 0.5],
             "balanced_accuracy_diff_boot_ci": [None, 0.75]}  # fmt: skip
    table = [{"arm": "real", **base}, {"arm": "real+classical", **other}]
    scores = "accuracy 0.500 +- 0.100, balanced_accuracy 0.500 +- 0.100, auc 0.500 +- 0.100"
    assert AugmentResult(table, tmp_path).summary() == (
        f"real: {scores}\nreal+classical: {scores}; balanced accuracy vs real +0.125 (seeds [-0.250, +0.500]; test "
        f"patients [n/a, +0.750])\nwritten to {tmp_path}"
    )
