"""Experiment tracking. This package (and the served model, hagan_clinic.serving) is the only code that imports
mlflow.

One switchboard decides where every command logs (:func:`choose`): ``--no-tracking`` or the config's
``tracking.enabled: false`` switch it off; the store is ``--tracking-uri``, else the config's ``tracking.uri``, else
``MLFLOW_TRACKING_URI``, else ``sqlite:///<root>/mlruns/mlflow.db`` with artifacts under ``<root>/mlruns/artifacts``
(root: the current folder; the demo's --out folder for the demo); the experiment is ``--experiment``, else the
config's ``tracking.experiment``. Loops and pipelines receive a :class:`Tracker` (or a :class:`NullTracker` when
tracking is off) and never talk to mlflow themselves. A Tracker touches the store only when its first run opens:
a command that refuses its inputs creates nothing.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ..errors import HaganError, short_repr

#: MLflow 3 reports usage to its makers over the network, and keeps an installation id in the home folder, unless
#: told not to: runs of clinical cohorts stay on this machine. Set before any mlflow import of this package (a
#: value the user set wins).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
NO_TELEMETRY = "MLFLOW_DISABLE_TELEMETRY=true"

DEFAULT_EXPERIMENT = "hagan-clinic"
#: The MLflow UI opens an experiment in its model-training view (runs, metrics, models) when it carries this tag.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
#: Seconds between two samples of the system metrics (CPU, memory, disk, GPU) of train, encode and augment.
SYSTEM_METRICS_INTERVAL_S = 5.0


class TrackingError(HaganError):
    """A tracking store or experiment that cannot be used (one line)."""


def default_tracking_uri(root: str | Path = ".") -> str:
    root = Path(root).resolve()
    return f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"


def resolve_uri(flag: str | None = None, config_uri: str | None = None, root: str | Path = ".") -> str:
    """The store a command uses: ``--tracking-uri``, else the config's ``tracking.uri``, else the environment's
    ``MLFLOW_TRACKING_URI``, else the sqlite store under ``root``. A value given empty stays empty (and is refused
    by :func:`check_uri`), never silently replaced by the default."""
    for given in (flag, config_uri):
        if given is not None:
            return given
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(root)


#: The stores MLflow 3 can use: a sqlite file, a tracking server, or a database server (no plain folder: the file
#: store is retired).
_STORE = re.compile(
    r"(?:https?://[^/\s]+(?:/\S*)?|(?:postgresql|mysql|mssql)(?:\+\w+)?://\S+|databricks(?:-uc)?(?::\S*)?)",
    re.IGNORECASE,  # MLflow reads the scheme in any case
)
#: A URI's user and password (``http://user:secret@host``): never shown in a message.
_USERINFO = re.compile(r"(?<=://)[^/\s]*@")
#: MLflow's own bound on an experiment's name.
MAX_EXPERIMENT_NAME = 500
#: Seconds a tracking server has to accept a connection before a command gives up on it (MLflow itself retries
#: for minutes).
CONNECT_TIMEOUT_S = 5.0


def hide_credentials(text: str) -> str:
    """``text`` with the user and password of every URI in it (``scheme://user:secret@``) replaced."""
    return _USERINFO.sub("<credentials>@", text)


def shown(uri: str) -> str:
    """``uri`` for a message: its credentials hidden, its length bounded."""
    return short_repr(hide_credentials(uri))


def check_uri(uri: str) -> str:
    """``uri`` if it names a store MLflow 3 can use (``sqlite:///PATH``, ``http(s)://HOST[:PORT]``, a database
    server), else a TrackingError in one line. Nothing is opened or created."""
    if (uri.startswith("sqlite:///") and len(uri) > len("sqlite:///")) or _STORE.fullmatch(uri):
        return uri
    given = shown(uri) if uri else "an empty value"
    raise TrackingError(
        f"tracking store {given}: give sqlite:///PATH/mlflow.db or http(s)://HOST:PORT (MLflow 3 has no plain folder "
        "store)"
    )


def check_writable(uri: str) -> None:
    """Refuse, in one line and within seconds, a store a run could not be written to: a sqlite file (or the folder
    it would be made in) that is read-only or not a file, a tracking server that does not answer. Creates nothing."""
    db = sqlite_path(uri)
    if db is not None:
        if db.exists():
            ok = db.is_file() and os.access(db, os.R_OK | os.W_OK) and os.access(db.parent, os.W_OK)
        else:
            existing = next((p for p in db.parents if p.exists()), None)
            ok = existing is not None and existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)
        if not ok:
            raise TrackingError(
                f"tracking store {shown(uri)}: cannot write there (read-only, permissions, or not a file)"
            )
        return
    parsed = urlparse(uri)
    if parsed.scheme.lower() in ("http", "https") and parsed.hostname and not _through_proxy(parsed):
        import socket

        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            socket.create_connection((parsed.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
        except OSError as err:
            raise TrackingError(
                f"tracking store {shown(uri)}: no MLflow server answers ({err.strerror or err})"
            ) from None


def _through_proxy(parsed: Any) -> bool:
    """Whether requests to this server go through an HTTP(S) proxy (as MLflow's do when HTTP_PROXY and the like
    say so): a direct connection then proves nothing, and the first request answers instead."""
    import urllib.request

    return parsed.scheme.lower() in urllib.request.getproxies() and not urllib.request.proxy_bypass(parsed.hostname)


def check_experiment(name: str) -> str:
    if not name.strip() or len(name) > MAX_EXPERIMENT_NAME:
        what = "empty" if not name.strip() else f"{len(name)} characters long (at most {MAX_EXPERIMENT_NAME})"
        raise TrackingError(f"experiment name {short_repr(name)} is {what}: give another --experiment")
    return name


@contextmanager
def environment(**values: str) -> Iterator[None]:
    """Set environment variables (MLflow reads its settings there) for the block; their earlier values after."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


#: MLflow's progress bar of artifact transfers off (one local file is no progress to show).
NO_PROGRESS_BARS = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


def _check_not_deleted(uri: str, experiment: str) -> None:
    import mlflow
    from mlflow.exceptions import MlflowException

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    # a server that accepts connections but does not answer must not hold the command for MLflow's minutes of
    # retries: one try, CONNECT_TIMEOUT_S long (the run itself keeps MLflow's own settings)
    quick = {"MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(CONNECT_TIMEOUT_S)), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    try:
        with environment(**quick):
            found = mlflow.MlflowClient(uri).get_experiment_by_name(experiment)
    except MlflowException as err:
        raise TrackingError(f"tracking store {shown(uri)}: {' '.join(str(err).split())[:300]}") from None
    except Exception as err:  # the database driver's own errors (a damaged or foreign file)
        raise TrackingError(f"tracking store {shown(uri)}: cannot be read ({type(err).__name__})") from None
    if found is not None and found.lifecycle_stage == "deleted":
        raise TrackingError(f"experiment {short_repr(experiment)} is deleted in {shown(uri)}: restore it, or give "
                            "another --experiment")  # fmt: skip


@dataclass(frozen=True)
class Choice:
    """Where a command logs: ``enabled`` False means nowhere (a NullTracker)."""

    enabled: bool
    uri: str
    experiment: str

    def checked(self) -> Choice:
        """This choice after the checks that need no store: a usable URI, a writable place, an experiment name
        (tracking off: none). Commands call it before any work, so a bad tracking setting costs nothing."""
        if self.enabled:
            check_writable(check_uri(self.uri))
            check_experiment(self.experiment)
            db = sqlite_path(self.uri)
            if db is None or db.is_file():  # an existing store: a deleted experiment is refused now, not at the end
                _check_not_deleted(self.uri, self.experiment)
        return self

    def tracker(self) -> NullTracker:
        return Tracker(self.uri, self.experiment) if self.enabled else NullTracker()


def choose(
    section: Any = None,
    uri: str | None = None,
    experiment: str | None = None,
    off: bool = False,
    root: str | Path = ".",
) -> Choice:
    """The switchboard. ``section``: the config's tracking section (``enabled``, ``uri``, ``experiment``) or None for
    the defaults; ``uri``/``experiment``/``off``: the command's ``--tracking-uri``, ``--experiment`` and
    ``--no-tracking``, which win over the config."""
    enabled = not off and bool(getattr(section, "enabled", True))
    name = experiment if experiment is not None else getattr(section, "experiment", None) or DEFAULT_EXPERIMENT
    return Choice(enabled, resolve_uri(uri, getattr(section, "uri", None), root), name)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` store; None for any other kind of store."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def ui_command(uri: str) -> str:
    """The command that opens the MLflow UI on this store (with its artifacts)."""
    db = sqlite_path(uri)
    tail = f" --default-artifact-root {(db.parent / 'artifacts').resolve().as_uri()}" if db else ""
    return f"{NO_TELEMETRY} mlflow ui --backend-store-uri {uri}{tail}"


def runs_url(experiment_id: str, host: str = "http://127.0.0.1:5000") -> str:
    """The UI page of an experiment's runs in the model-training view. MLflow 3 opens on its GenAI overview and
    picks the view from the URL's ``workflowType`` (else the browser's last choice), not from the experiment."""
    return f"{host}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


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
    uri: str | None = None
    experiment_id: str | None = None

    @contextmanager
    def run(
        self,
        name: str,
        tags: Mapping[str, str] | None = None,
        nested: bool = False,
        run_id: str | None = None,
        system_metrics: bool = False,
    ) -> Iterator[NullTracker]:
        yield self

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: Mapping[str, str]) -> None: ...
    def log_table(self, frame: Any, artifact_file: str) -> None: ...
    def log_input(self, name: str, digest: str, rows: int, source: str, context: str) -> None: ...
    def register_model(self, name: str, checkpoint: Path, cfg_dict: dict, tags: Mapping[str, Any]) -> str | None:
        return None

    def log_sklearn_models(
        self, models: Mapping[str, Any], feature_columns: list[str], example: Any, log_targets: Sequence[str] = ()
    ) -> None: ...

    def find_model_version(self, sha256: str) -> str | None:
        return None


class Tracker(NullTracker):
    """An MLflow experiment in a given store; ``run`` opens a (possibly nested) run as a context manager.

    Nothing is imported, created or connected until the first run opens. A run left by an exception is marked
    FAILED (KILLED on Ctrl-C), never left RUNNING.
    """

    def __init__(self, uri: str | None = None, experiment: str = DEFAULT_EXPERIMENT, root: str | Path = ".") -> None:
        self.uri = resolve_uri(uri, None, root)
        self.experiment = experiment
        self.experiment_id: str | None = None
        self.run_id: str | None = None
        self._mlflow: Any = None

    def _connect(self) -> Any:
        """Import mlflow, create the store and the experiment if need be (once)."""
        if self._mlflow is not None:
            return self._mlflow

        import mlflow
        from mlflow.exceptions import MlflowException

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # keep store migrations off the console
        uri = str(self.uri)
        db = sqlite_path(uri)
        artifacts = None
        if db is not None:
            try:
                db.parent.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise TrackingError(f"tracking store {shown(uri)}: cannot create its folder ({err.strerror})") from None
            artifacts = (db.parent / "artifacts").resolve().as_uri()
        mlflow.set_tracking_uri(uri)
        try:
            found = mlflow.get_experiment_by_name(self.experiment)
            if found is not None and found.lifecycle_stage == "deleted":
                raise TrackingError(
                    f"experiment '{self.experiment}' is deleted in {shown(uri)}: restore it, or give another "
                    "--experiment"
                )
            self.experiment_id = (
                found.experiment_id
                if found
                else mlflow.create_experiment(self.experiment, artifact_location=artifacts, tags=EXPERIMENT_KIND)
            )
            if found is not None and not found.tags.get("mlflow.experimentKind"):
                mlflow.MlflowClient(self.uri).set_experiment_tag(
                    self.experiment_id, *next(iter(EXPERIMENT_KIND.items()))
                )
        except MlflowException as err:
            raise TrackingError(f"tracking store {shown(uri)}: {' '.join(str(err).split())[:300]}") from None
        except Exception as err:  # the database driver's own errors (a read-only or damaged file)
            raise TrackingError(f"tracking store {shown(uri)}: cannot be used ({type(err).__name__})") from None
        self._mlflow = mlflow
        return mlflow

    @contextmanager
    def run(
        self,
        name: str,
        tags: Mapping[str, str] | None = None,
        nested: bool = False,
        run_id: str | None = None,
        system_metrics: bool = False,
    ) -> Iterator[Tracker]:
        """Open a run (or reopen ``run_id``, e.g. when training resumes) for the duration of the block;
        ``system_metrics``: sample CPU, memory, disk (and GPU) use while it is open."""
        mlflow = self._connect()
        nested = nested or self.run_id is not None  # a run opened inside another becomes its child
        if run_id is not None and not self._exists(run_id):
            run_id = None  # a resumed run logged elsewhere: start a new one here
        mlflow.set_tracking_uri(str(self.uri))  # the fluent API follows one global store: this tracker's
        if system_metrics and "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL" not in os.environ:  # the user's value wins
            mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL_S)
        if run_id is not None:
            active = mlflow.start_run(run_id=run_id, nested=nested, log_system_metrics=system_metrics)
        else:
            active = mlflow.start_run(
                run_name=name,
                experiment_id=self.experiment_id,
                nested=nested,
                tags=dict(tags or {}),
                log_system_metrics=system_metrics,
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

    def log_table(self, frame: Any, artifact_file: str) -> None:
        """A table (a DataFrame) as a table artifact, shown as a table in the UI's artifact view."""
        self._mlflow.log_table(data=frame, artifact_file=artifact_file)

    def log_input(self, name: str, digest: str, rows: int, source: str, context: str) -> None:
        """Record a cohort or cache the run read: its name, digest, row count and where it is (no patient data:
        the rows themselves are not logged)."""
        import warnings

        import pandas as pd
        from mlflow.data.pandas_dataset import from_pandas

        with warnings.catch_warnings():  # mlflow's hints on ambiguous sources and integer schemas, on the console
            warnings.simplefilter("ignore", UserWarning)
            # a one-column frame of row numbers carries the row count into the dataset's profile, and nothing else
            dataset = from_pandas(pd.DataFrame({"row": range(rows)}), source=source, name=name, digest=digest[:36])
            self._mlflow.log_input(dataset, context=context)

    def log_sklearn_models(
        self, models: Mapping[str, Any], feature_columns: list[str], example: Any, log_targets: Sequence[str] = ()
    ) -> None:
        from .sklearn_models import log_sklearn_models

        log_sklearn_models(dict(models), feature_columns, example, log_targets)

    def _exists(self, run_id: str) -> bool:
        try:
            self._mlflow.get_run(run_id)
            return True
        except Exception:  # unknown id in this store
            return False

    def find_model_version(self, sha256: str) -> str | None:
        """'NAME/VERSION' of the newest encoder version registered from the file with this SHA-256, or None."""
        from .registry import find_version

        return find_version(sha256, str(self.uri))

    def register_model(self, name: str, checkpoint: Path, cfg_dict: dict, tags: Mapping[str, Any]) -> str | None:
        """Register ``checkpoint`` in the open run as a new version of the served encoder ``name`` (and of
        ``name-generator``), see :func:`~hagan_clinic.tracking.registry.register_checkpoint`; returns the encoder's
        version."""
        from .registry import register_checkpoint

        self._connect()
        return register_checkpoint(name, checkpoint, cfg_dict, tags, self.run_id, self.uri)
