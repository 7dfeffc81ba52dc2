"""The augment command on the tiny configuration: every arm runs on one split, and only real volumes are scored."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import tiny_config

from hagan_clinic.cli import main
from hagan_clinic.config import ConfigError
from hagan_clinic.models.hagan import HAGAN
from hagan_clinic.phantoms import write_cohort

ARMS = "[real,real+synthetic,real+classical,real+synthetic+classical]"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("augment")
    write_cohort(root / "cohort", n=24, seed=5, shape=(24, 48, 48), progress=False, extras=False)
    assert main(["preprocess", str(root / "cohort"), "--out", str(root / "cache"), "--config", "tiny"]) == 0
    HAGAN.from_config(tiny_config("model.num_classes=2")).save(root / "cond.pt")
    HAGAN.from_config(tiny_config()).save(root / "plain.pt")
    return root


def _args(root, *extra):
    return ["augment", "--config", "tiny", "--set", f"augment.cache={root / 'cache'}",
            "--set", f"augment.clinical={root / 'cohort' / 'clinical.csv'}",
            "--set", f"augment.checkpoint={root / 'cond.pt'}", "--set", "augment.epochs=1",
            "--set", "augment.seeds=[0,1]", "--set", "augment.batch_size=8", *extra]  # fmt: skip


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
    # every path scored is a real cached volume; synthetic volumes exist only in the training arms
    assert all(p.startswith(str(cohort / "cache")) for p in split["path"])
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
    assert (out / "examples.png").stat().st_size > 0
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    parent = next(r for r in runs if r.info.run_name == "augment")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 8 and {r.data.tags["arm"] for r in children} == set(ARMS.strip("[]").split(","))


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
