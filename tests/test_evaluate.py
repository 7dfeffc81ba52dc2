"""Feature networks from local weights, and the evaluate command end to end on the tiny configuration."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hagan_clinic.cli import main
from hagan_clinic.feature_nets import FeatureNetError, medicalnet
from hagan_clinic.models.hagan import HAGAN
from hagan_clinic.models.medicalnet import MedicalNetResNet

from conftest import tiny_config, write_volumes


def _medicalnet_resnet(depth: int):
    """MedicalNet's ResNet with random weights (the loading, layout and features are tested in test_feature_nets)."""
    torch.manual_seed(depth)
    return MedicalNetResNet(depth).eval()


def test_unusable_feature_weights_are_refused(tmp_path):
    with pytest.raises(FeatureNetError, match="not found"):
        medicalnet(tmp_path / "missing.pth")
    torch.save({"conv1.weight": torch.zeros(3)}, tmp_path / "odd.pth")
    with pytest.raises(FeatureNetError, match="not a MedicalNet"):
        medicalnet(tmp_path / "odd.pth")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    HAGAN.from_config(tiny_config()).save(root / "tiny.pt")
    write_volumes(root / "real", n=6, size=32)
    return root


@pytest.mark.slow
def test_evaluate_writes_metrics_figures_and_an_mlflow_run(setup, tmp_path):
    import mlflow

    out = tmp_path / "eval"
    code = main(["evaluate", "--checkpoint", str(setup / "tiny.pt"), "--real", str(setup / "real"), "--n", "12",
                 "--measure", "mean_hu", "--out", str(out)])  # fmt: skip
    assert code == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["feature_net"] == "hagan-encoder" and len(m["feature_net_sha256"]) == 64
    assert m["n_generated"] == 12 and m["n_real"] == 6
    assert m["fid"] >= 0 and np.isfinite(m["mmd2"])
    assert 0 < m["ms_ssim_generated"] <= 1 and 0 < m["ms_ssim_real"] <= 1
    assert "no training record" in m["memorisation"]["skipped"]  # never silently against the wrong set
    assert m["reconstruction"]["n"] == 6 and m["reconstruction"]["mae"] > 0
    assert len(m["latent_direction"]["values"]) == 7
    assert (out / "samples.png").stat().st_size > 0 and (out / "latent_direction.png").stat().st_size > 0
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.mlflow.runName = 'evaluate'")
    assert len(runs) == 1 and runs.iloc[0]["params.feature_net"] == "hagan-encoder"
    assert "metrics.fid" in runs.columns


@pytest.mark.slow
def test_evaluate_with_a_medicalnet_file(setup, tmp_path):
    net = _medicalnet_resnet(10)
    torch.save(net.state_dict(), tmp_path / "resnet_10.pth")
    out = tmp_path / "eval"
    code = main(["evaluate", "--checkpoint", str(setup / "tiny.pt"), "--real", str(setup / "real"), "--n", "6",
                 "--feature-net", str(tmp_path / "resnet_10.pth"), "--measure", "mean_hu", "--out", str(out),
                 "--no-tracking"])  # fmt: skip
    assert code == 0
    assert json.loads((out / "metrics.json").read_text())["feature_net"] == "medicalnet-resnet10"


@pytest.mark.slow
def test_evaluate_bad_input_is_one_line(setup, tmp_path, capsys):
    wrong = tmp_path / "wrong"
    write_volumes(wrong, n=3, size=16)
    for args, message in (
        (["--checkpoint", "missing.pt", "--real", str(setup / "real")], "checkpoint not found"),
        (["--checkpoint", str(setup / "tiny.pt"), "--real", str(wrong)], "preprocess it first"),
        (["--checkpoint", str(setup / "tiny.pt"), "--real", str(tmp_path / "none")], "not found"),
    ):
        assert main(["evaluate", *args, "--n", "4", "--out", str(tmp_path / "o"), "--no-tracking"]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and message in err


def test_the_summary_is_what_the_command_prints(tmp_path):
    from hagan_clinic.pipelines.evaluate import EvaluateResult

    metrics = {"fid": 1.23456, "mmd2": 0.012345, "feature_net": "hagan-encoder", "ms_ssim_generated": 0.5,
               "ms_ssim_real": 0.25, "memorisation": {"skipped": "no record"}}  # fmt: skip
    assert EvaluateResult(metrics, tmp_path).summary() == (
        f"FID 1.235, MMD^2 0.0123 (hagan-encoder); MS-SSIM generated 0.500, real 0.250; written to {tmp_path}\n"
        "memorisation: not checked (no record)"
    )
    metrics["memorisation"] = {"flagged": True, "median_ratio": 0.5, "fraction_closer_than_heldout_p5": 0.75}
    assert EvaluateResult(metrics, tmp_path).summary().splitlines()[1] == (
        "memorisation vs the training set: median ratio 0.50, fraction closer than held-out p5 0.75: FLAGGED: "
        "generated volumes sit closer to the training set than held-out ones"
    )
