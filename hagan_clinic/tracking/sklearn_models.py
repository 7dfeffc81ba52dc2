"""The scikit-learn models of ``regress`` in MLflow: each fitted model logged with ``mlflow.sklearn`` (skops format)
into the active run, and a regress run's model file fetched back for ``predict``.

A logged model does not come back through ``mlflow.sklearn.load_model``: its MLmodel file lists the skops types it
wants trusted (and may add code paths to ``sys.path``), so a crafted run could have anything trusted. ``predict``
downloads the run's ``regress/model.skops`` instead and loads it with :mod:`hagan_clinic.io.model_file`, which
decides by itself what may be constructed.

Loaded with ``mlflow.pyfunc``, a logged model predicts on the scale it was fitted on: the log of a target regressed
on the log scale. Its signature's output name and its tags say which (see :func:`model_output`).
"""

from __future__ import annotations

import re
from collections.abc import Collection
from pathlib import Path

import numpy as np

from ..errors import one_line, short_repr
from ..io.model_file import MAX_MODEL_BYTES
from . import NO_PROGRESS_BARS, TrackingError, environment, sqlite_path

#: Where ``regress`` logs its model file in its run; ``runs:/RUN_ID`` means this artifact of the run.
BUNDLE_ARTIFACT = "regress/model.skops"
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+:/")  # two letters at least: C:/ is a Windows path
_RUN_URI = re.compile(r"runs:/(?P<run>[0-9A-Za-z_-]{1,64})(?:/(?P<path>[^\0]+))?")


def is_uri(text: str) -> bool:
    """Whether ``text`` is a URI (``scheme:/...``) rather than a file path."""
    return _SCHEME.match(text) is not None


def model_name(target: str) -> str:
    """The name of a target's logged model: MLflow refuses / : . % and quotes in it."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", target)[:100] or "model"


#: The key of the GOLD classifier among the models of ``regress`` (the others are named after their targets).
GOLD_MODEL = "gold"
#: What the GOLD classifier's integer codes mean (those of ``hagan_clinic.regression.GOLD_CODES``).
GOLD_CODE_MEANING = "0, 1, 2, 3, 4: GOLD stage 0-4; -1: PRISm (preserved ratio, impaired spirometry)"


def model_output(target: str, log_targets: Collection[str] = ()) -> tuple[str, dict[str, str]]:
    """The name of a logged model's output and its tags: ``target`` (the name as given), ``scale`` (``log`` for a
    target of ``log_targets``, whose model predicts the natural log: ``inverse`` ``exp`` gives the target back;
    ``linear`` for another target; ``class`` for the GOLD classifier, whose ``codes`` say what it predicts)."""
    tags = {"target": str(target)[:250]}
    if target == GOLD_MODEL:
        return "gold_code", {**tags, "scale": "class", "codes": GOLD_CODE_MEANING}
    if target in log_targets:
        return f"log_{target}", {**tags, "scale": "log", "inverse": "exp"}
    return str(target), {**tags, "scale": "linear"}


def log_sklearn_models(
    models: dict, feature_columns: list[str], example: np.ndarray, log_targets: Collection[str] = ()
) -> None:
    """Log each fitted estimator of ``models`` (target name -> estimator taking (N, len(feature_columns)) floats;
    ``"gold"``: the GOLD classifier) into the active run as an MLflow sklearn model in the skops format, named after
    its target (see :func:`model_name`), with the first two rows of ``example`` (N >= 1, len(feature_columns)) as
    its input example, a DataFrame with the feature names.

    A model of a target in ``log_targets`` predicts the natural log of the target, and ``mlflow.pyfunc`` gives
    exactly that: its signature names the output ``log_<target>`` and its tags and metadata (see
    :func:`model_output`) say ``scale`` ``log`` and ``inverse`` ``exp``, so that no one reads a log as the value."""
    import warnings

    import mlflow.sklearn
    import pandas as pd
    from mlflow.models import ModelSignature, infer_signature
    from mlflow.types import ColSpec, Schema

    frame = pd.DataFrame(np.asarray(example, float)[:2], columns=list(feature_columns))
    inputs = infer_signature(frame).inputs
    # given requirements skip MLflow's inference, which loads each model again in a subprocess
    requirements = mlflow.sklearn.get_default_pip_requirements(include_skops=True)
    for target, model in models.items():
        output, tags = model_output(target, log_targets)
        # the output is declared, not inferred: a classifier's codes are integers and the name says the scale
        kind = "long" if tags["scale"] == "class" else "double"
        signature = ModelSignature(inputs=inputs, outputs=Schema([ColSpec(kind, output)]))
        with warnings.catch_warnings():
            # the models were fitted on arrays; MLflow checks the example, a DataFrame with names, against them
            warnings.filterwarnings("ignore", message="X has feature names", category=UserWarning)
            mlflow.sklearn.log_model(
                model,
                name=model_name(target),
                serialization_format="skops",
                signature=signature,
                input_example=frame,
                pip_requirements=requirements,
                metadata={"output": output, **tags},  # in the MLmodel file: what pyfunc's predict returns
                tags=tags,
            )


def download_bundle(uri: str, tracking_uri: str, dst: Path) -> Path:
    """Download the model file of a regress run into the folder ``dst``: ``runs:/RUN_ID`` (its
    ``regress/model.skops``) or ``runs:/RUN_ID/ARTIFACT_PATH``, from the store ``tracking_uri``. Returns the local
    file. An unknown run, a run without the file, a bad URI or a store that does not exist (none is created) is a
    TrackingError (one line)."""
    run_id, artifact = _parse(uri)
    _check_store(uri, tracking_uri)
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri)
    try:
        client.get_run(run_id)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise TrackingError(f"{uri}: no run {run_id} in the tracking store {tracking_uri}") from None
        raise TrackingError(f"{uri}: the tracking store {tracking_uri} cannot be read ({one_line(err, 120)})") from None
    folder, _, name = artifact.rpartition("/")
    try:
        listed = {Path(f.path).name: f for f in client.list_artifacts(run_id, folder or None)}
    except Exception as err:  # an artifact store that cannot be listed (gone, no permission)
        raise TrackingError(f"{uri}: the artifacts of run {run_id} cannot be listed ({one_line(err, 120)})") from None
    found = listed.get(name)
    if found is None or found.is_dir:
        raise TrackingError(f"{uri}: run {run_id} has no model file {artifact} (is it a regress run?)")
    if found.file_size is not None and found.file_size > MAX_MODEL_BYTES:
        raise TrackingError(f"{uri}: {artifact} is over the {MAX_MODEL_BYTES // 2**20} MiB a model file may have")
    try:
        with environment(**NO_PROGRESS_BARS):
            local = download_artifacts(
                run_id=run_id, artifact_path=artifact, dst_path=str(dst), tracking_uri=tracking_uri
            )
    except Exception as err:  # listed, yet not there (a store moved by hand), or a network failure
        raise TrackingError(f"{uri}: {artifact} cannot be downloaded ({one_line(err, 120)})") from None
    return Path(local)


def _parse(uri: str) -> tuple[str, str]:
    """(run id, artifact path) of a ``runs:/`` URI."""
    match = _RUN_URI.fullmatch(uri)
    path = (match.group("path") or BUNDLE_ARTIFACT).strip("/") if match else ""
    if match is None or not path or ".." in path.split("/"):
        raise TrackingError(
            f"--model {short_repr(uri, 80)} is not a run's model URI: give runs:/RUN_ID (the regress run) or a file"
        )
    return match.group("run"), path


def _check_store(uri: str, tracking_uri: str) -> None:
    """Refuse a local store (sqlite or file) that does not exist: opening it would create an empty one."""
    db = sqlite_path(tracking_uri)
    if tracking_uri.startswith("file:"):
        db = Path(re.sub(r"^file:(//)?", "", tracking_uri))
    if db is not None and not db.exists():
        raise TrackingError(f"{uri}: no tracking store at {tracking_uri} (give --tracking-uri, or run regress first)")
