"""Experiment tracking. This is the only module that imports mlflow.

By default runs go to ``sqlite:///<root>/mlruns/mlflow.db`` with artifacts under ``<root>/mlruns/artifacts``
(root: the current folder). ``MLFLOW_TRACKING_URI`` overrides the store. Loops and pipelines receive a
:class:`Tracker` (or a :class:`NullTracker` when tracking is off) and never talk to mlflow themselves.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

DEFAULT_EXPERIMENT = "hagan-clinic"


def default_tracking_uri(root: str | Path = ".") -> str:
    root = Path(root).resolve()
    return f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'model': {'size': 64}} -> {'model.size': 64}; lists become strings."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value if isinstance(value, (int, float, str, bool)) or value is None else str(value)
    return out


class NullTracker:
    """Tracking switched off: every call is accepted and does nothing."""

    run_id: str | None = None

    @contextmanager
    def run(
        self, name: str, tags: Mapping[str, str] | None = None, nested: bool = False, run_id: str | None = None
    ) -> Iterator[NullTracker]:
        yield self

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: Mapping[str, str]) -> None: ...
    def register_model(self, name: str, artifact_path: str, tags: Mapping[str, Any]) -> str | None:
        return None

    def find_model_version(self, sha256: str) -> str | None:
        return None


class Tracker(NullTracker):
    """An MLflow experiment in a given store; ``run`` opens a (possibly nested) run as a context manager.

    A run left by an exception is marked FAILED (KILLED on Ctrl-C), never left RUNNING.
    """

    def __init__(self, uri: str | None = None, experiment: str = DEFAULT_EXPERIMENT, root: str | Path = ".") -> None:
        import logging

        import mlflow

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # keep store migrations off the console
        self._mlflow = mlflow
        self.uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(root)
        if self.uri.startswith("sqlite:///"):
            db = Path(self.uri.removeprefix("sqlite:///"))
            db.parent.mkdir(parents=True, exist_ok=True)
            artifacts = (db.parent / "artifacts").resolve().as_uri()
        else:
            artifacts = None
        mlflow.set_tracking_uri(self.uri)
        found = mlflow.get_experiment_by_name(experiment)
        self.experiment_id = (
            found.experiment_id if found else mlflow.create_experiment(experiment, artifact_location=artifacts)
        )
        self.run_id: str | None = None

    @contextmanager
    def run(
        self, name: str, tags: Mapping[str, str] | None = None, nested: bool = False, run_id: str | None = None
    ) -> Iterator[Tracker]:
        """Open a run (or reopen ``run_id``, e.g. when training resumes) for the duration of the block."""
        mlflow = self._mlflow
        nested = nested or self.run_id is not None  # a run opened inside another becomes its child
        if run_id is not None and not self._exists(run_id):
            run_id = None  # a resumed run logged elsewhere: start a new one here
        if run_id is not None:
            active = mlflow.start_run(run_id=run_id, nested=nested)
        else:
            active = mlflow.start_run(
                run_name=name, experiment_id=self.experiment_id, nested=nested, tags=dict(tags or {})
            )
        outer, self.run_id = self.run_id, active.info.run_id
        status = "FINISHED"
        try:
            yield self
        except (KeyboardInterrupt, SystemExit):
            status = "KILLED"
            raise
        except BaseException:
            status = "FAILED"
            raise
        finally:
            mlflow.end_run(status=status)
            self.run_id = outer

    def log_params(self, params: Mapping[str, Any]) -> None:
        flat = flatten(params)
        items = list(flat.items())
        for i in range(0, len(items), 100):  # the store caps a batch at 100 params
            self._mlflow.log_params(dict(items[i : i + 100]))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self._mlflow.log_artifacts(str(path), artifact_path=artifact_path)
        else:
            self._mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def _exists(self, run_id: str) -> bool:
        try:
            self._mlflow.get_run(run_id)
            return True
        except Exception:  # unknown id in this store
            return False

    def find_model_version(self, sha256: str) -> str | None:
        """'name/version' of the registered model whose file has this SHA-256 (tag set at registration)."""
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        try:
            found = MlflowClient(self.uri).search_model_versions(f"tags.sha256 = '{sha256}'")
        except MlflowException:
            return None
        return f"{found[0].name}/{found[0].version}" if found else None

    def register_model(self, name: str, artifact_path: str, tags: Mapping[str, Any]) -> str | None:
        """Register the active run's ``artifact_path`` as a new version of model ``name``; returns the version."""
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        client = MlflowClient(self.uri)
        with suppress(MlflowException):  # it exists already: add a version
            client.create_registered_model(name)
        source = self._mlflow.get_artifact_uri(artifact_path)
        version = client.create_model_version(
            name, source, run_id=self.run_id, tags={k: str(v) for k, v in tags.items()}
        )
        return str(version.version)
