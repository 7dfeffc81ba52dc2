"""What a registered hagan-clinic model says about itself in the registry: its description (what it is, the data
contract in words, how to call and serve it), its signature, its data-contract tags, and the flavor that logs it
without running it (see :mod:`hagan_clinic.tracking.registry`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: What a scan's input example looks like (the example is stored with the model, not run: see LogWithoutServing).
EXAMPLE_PATH = "/data/cohort/PATIENT0001/CT_SERIES"
#: The generator's input columns ('seed' required).
GENERATOR_INPUTS = ("seed", "index", "label")
#: Volumes per request as arrays: hagan_clinic.serving.MAX_VOLUMES, named here for the descriptions (a test keeps
#: the two equal).
MAX_VOLUMES = 4


def contract_tags(contract: Mapping[str, Any]) -> dict[str, str]:
    """The data contract as version tags, written as the training run's tags are: ``data.modality`` 'CT',
    ``data.window`` '[-1024.0, 600.0]', ``data.spacing_mm`` '[1.0, 1.0, 1.0]' (or 'None'), ``data.size``, ..."""
    return {f"data.{k}": str(v) for k, v in contract.items()}


def describe(kind: str, cfg: Any, sha: str, name: str) -> str:
    """The version's description: what it is, the data contract in words, how to call it."""
    from .. import __version__

    d, m = cfg.data, cfg.model
    spacing = "no fixed spacing (reference resize)" if d.spacing_mm is None else f"{list(d.spacing_mm)} mm voxels"
    contract = (
        f"Data contract: {d.modality}, intensities in the window {list(d.window)} mapped to [-1, 1], {spacing}, "
        f"a {m.size}^3 grid (resize: {d.resize})."
    )
    made = f"hagan-clinic {__version__}, checkpoint sha256 {sha}."
    serve = f"Serve: mlflow models serve -m models:/{name}@latest --env-manager local (with hagan-clinic installed)."
    s = f"({m.size}, {m.size}, {m.size})"
    if kind == "encoder":
        request = '{"dataframe_split": {"columns": ["path"], "data": [["/scans/P1/CT"]]}}'
        return (
            f"HA-GAN encoder (E^H then E^G): one row of {m.latent_dim} latent features (z0..z{m.latent_dim - 1}) per "
            f"scan, as hagan-clinic encode computes them. {contract} Input: a DataFrame with a 'path' column, each "
            "a DICOM series folder (one series) or a NIfTI file on the machine that runs the model (under the folder "
            "HAGAN_CLINIC_SERVING_ROOT when it is set), read and preprocessed to this contract; or a 'volume' column "
            f"of up to {MAX_VOLUMES} arrays {s} already on the [-1, 1] scale. Call: "
            f"mlflow.pyfunc.load_model('models:/{name}@latest').predict(pandas.DataFrame({{'path': [...]}})). "
            f"{serve} POST /invocations {request}. {made}"
        )
    label = f" and an optional 'label' (0..{m.num_classes - 1})" if m.num_classes else ""
    return (
        f"HA-GAN generator: volumes {s} float32 in [-1, 1] from seeds, sample 'index' of "
        f"hagan-clinic generate --seed SEED (before its conversion to scanner units). {contract} Input: a DataFrame "
        f"with a 'seed' column, an optional 'index'{label}; at most {MAX_VOLUMES} volumes per request. Call: "
        f"mlflow.pyfunc.load_model('models:/{name}@latest').predict(pandas.DataFrame({{'seed': [0]}})). {serve} {made}"
    )


def signature(kind: str, cfg: Any) -> Any:
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Schema, TensorSpec

    size = cfg.model.size
    if kind == "encoder":
        volume = Array(Array(Array("double")))  # (S, S, S) per row; JSON numbers are doubles
        inputs = Schema([ColSpec("string", "path", required=False), ColSpec(volume, "volume", required=False)])
        features: list[ColSpec | TensorSpec] = [ColSpec("float", f"z{i}") for i in range(cfg.model.latent_dim)]
        return ModelSignature(inputs, Schema(features))
    # 'label' also for an unconditional model: left out of the signature, MLflow would drop it with a warning
    # instead of the model refusing it
    seeds: list[ColSpec | TensorSpec] = [ColSpec("long", c, required=c == "seed") for c in GENERATOR_INPUTS]
    return ModelSignature(Schema(seeds), Schema([TensorSpec(np.dtype("float32"), (-1, size, size, size))]))


class LogWithoutServing:
    """mlflow.pyfunc as the flavor of ``Model.log``, minus the serving check of the input example: that check runs
    the model on the example, which for a scan's path would read a file that exists only where the model is used
    (and load the checkpoint once more). The example is still checked against the signature when saved."""

    __name__ = "mlflow.pyfunc"

    @staticmethod
    def save_model(path: str, mlflow_model: Any, validate_serving_input: bool = False, **kwargs: Any) -> None:
        import mlflow.pyfunc

        mlflow.pyfunc.save_model(path=path, mlflow_model=mlflow_model, **kwargs)
