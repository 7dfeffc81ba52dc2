"""The model registry: checkpoints registered as MLflow pyfunc models, and registry URIs resolved back to checkpoints.

:func:`register_checkpoint` logs, in a run, the encoder of a checkpoint as model ``NAME`` and its generator as
``NAME-generator``: models from code (the code files of :mod:`hagan_clinic.serving`, found by path: this layer may
not import that one) with the checkpoint as their artifact ``checkpoint``, a signature, an input example, a
description and the data contract as version tags. ``models:/NAME@latest`` always names the newest version (the
registry resolves the alias ``latest`` itself); :func:`set_alias` sets others (``champion``).

:func:`resolve_checkpoint` turns ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` into a checkpoint file. With a
local artifact store (the ``sqlite:///`` store the commands create keeps its artifacts in a folder beside it) that
is the stored file itself, read in place: nothing is copied. From a remote artifact store it is downloaded into a
temporary folder that is removed when the process exits, and checked against the version's SHA-256.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from ..errors import HaganError, one_line, short_repr

GENERATOR_SUFFIX = "-generator"
#: The code files of the served models (hagan_clinic/serving/), by path.
SERVING = Path(__file__).resolve().parents[1] / "serving"
#: What a scan's input example looks like (the example is stored with the model, not run: see _LogWithoutServing).
EXAMPLE_PATH = "/data/cohort/PATIENT0001/CT_SERIES"
#: The generator's input columns ('seed' required).
GENERATOR_INPUTS = ("seed", "index", "label")
#: Volumes per request as arrays: hagan_clinic.serving.MAX_VOLUMES, named here for the descriptions (a test keeps
#: the two equal).
MAX_VOLUMES = 4


class RegistryError(HaganError):
    """A registry URI, model, version or alias that cannot be used (one line)."""


@dataclass(frozen=True)
class Resolved:
    """A checkpoint argument resolved: the file, and for a registered model its name and version."""

    path: Path
    name: str | None = None
    version: str | None = None


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """MLflow's artifact progress bars off (a copy of one local file is no progress to show); restored after."""
    key, before = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ[key] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


# ---------------------------------------------------------------- registering
def _contract_tags(contract: Mapping[str, Any]) -> dict[str, str]:
    """The data contract as version tags, written as the training run's tags are: ``data.modality`` 'CT',
    ``data.window`` '[-1024.0, 600.0]', ``data.spacing_mm`` '[1.0, 1.0, 1.0]' (or 'None'), ``data.size``, ..."""
    return {f"data.{k}": str(v) for k, v in contract.items()}


def _describe(kind: str, cfg: Any, sha: str, name: str) -> str:
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
            "a DICOM series folder or a NIfTI file on the machine that runs the model, read and preprocessed to this "
            f"contract; or a 'volume' column of up to {MAX_VOLUMES} arrays {s} already on the [-1, 1] scale. Call: "
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


def _signature(kind: str, cfg: Any) -> Any:
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


class _LogWithoutServing:
    """mlflow.pyfunc as the flavor of ``Model.log``, minus the serving check of the input example: that check runs
    the model on the example, which for a scan's path would read a file that exists only where the model is used
    (and load the checkpoint once more). The example is still checked against the signature when saved."""

    __name__ = "mlflow.pyfunc"

    @staticmethod
    def save_model(path: str, mlflow_model: Any, validate_serving_input: bool = False, **kwargs: Any) -> None:
        import mlflow.pyfunc

        mlflow.pyfunc.save_model(path=path, mlflow_model=mlflow_model, **kwargs)


def _log_and_register(kind: str, name: str, checkpoint: Path, cfg: Any, tags: dict[str, str], client: Any) -> str:
    """Log one served model in the active run, register it as a new version of ``name``; returns the version."""
    import mlflow
    import pandas as pd
    from mlflow.models import Model

    from .. import __version__

    example = pd.DataFrame({"path": [EXAMPLE_PATH]} if kind == "encoder" else {"seed": [0]})
    info = Model.log(
        None,  # artifact_path: replaced by name
        name=kind,
        flavor=_LogWithoutServing,
        flavor_name="pyfunc.ModelFromCode",
        python_model=str(SERVING / f"{kind}.py"),
        artifacts={"checkpoint": str(checkpoint)},
        signature=_signature(kind, cfg),
        input_example=example,
        validate_serving_input=False,
        # given, not inferred: inferring them loads the model in a subprocess (seconds, the checkpoint read twice)
        pip_requirements=[f"hagan-clinic=={__version__}", f"mlflow=={mlflow.__version__}"],
    )
    version = mlflow.register_model(info.model_uri, name, tags=tags)
    text = _describe(kind, cfg, tags["sha256"], name)
    client.update_model_version(name, version.version, description=text)
    client.update_registered_model(name, description=text.split(" Call:")[0])  # the model's part of it
    return str(version.version)


def register_checkpoint(
    name: str,
    checkpoint: Path,
    cfg_dict: dict,
    tags: Mapping[str, Any],
    run_id: str | None = None,
    tracking_uri: str | None = None,
) -> str:
    """Register ``checkpoint`` (a hagan-clinic checkpoint file) as a new version of the encoder model ``name`` and,
    when it has a generator, of ``name-generator``; returns the encoder's version (the generator's when the
    checkpoint has no encoder). ``cfg_dict``: its config (the data contract and the grid); ``tags``: extra version
    tags (``sha256`` is computed when not given: it lets a command that reads the file name its version). The models
    are logged in the active run, else in run ``run_id``, else in a new run ``register NAME``. ``models:/NAME@latest``
    names the new version from now on."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from ..config import Config
    from ..io.torch_files import file_sha256
    from ..models.hagan import read_checkpoint

    checkpoint = Path(checkpoint)
    cfg = Config.from_dict(cfg_dict)
    parts = read_checkpoint(checkpoint).get("parts") or []
    kinds = [k for k, need in (("encoder", {"EH", "EG"}), ("generator", {"G"})) if need <= set(parts)]
    if not kinds:
        raise RegistryError(f"{checkpoint}: the checkpoint has neither an encoder nor a generator to register")
    base = {str(k): str(v) for k, v in tags.items()}
    base.setdefault("sha256", file_sha256(checkpoint))
    base.update(_contract_tags(cfg.data_contract()))
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri)
    active = mlflow.active_run()
    if active is None or (run_id is not None and active.info.run_id != run_id):
        where: Any = mlflow.start_run(run_id, run_name=None if run_id else f"register {name}", nested=bool(active))
    else:
        where = nullcontext()
    with where, _no_progress_bars():
        try:
            versions: dict[str, str] = {}
            for kind in kinds:
                model = name if kind == "encoder" else name + GENERATOR_SUFFIX
                versions[kind] = _log_and_register(kind, model, checkpoint, cfg, {**base, "role": kind}, client)
            if len(versions) == 2:  # each names the other, so that an alias moves both (set_alias)
                pair = {"encoder": name, "generator": name + GENERATOR_SUFFIX}
                for kind, other in (("encoder", "generator"), ("generator", "encoder")):
                    client.set_model_version_tag(
                        pair[kind], versions[kind], "sibling", f"{pair[other]}/{versions[other]}"
                    )
        except MlflowException as err:
            raise RegistryError(f"registering {name}: {one_line(err.message)}") from None
    return versions.get("encoder") or versions["generator"]


# ---------------------------------------------------------------- looking up
def _client(tracking_uri: str) -> Any:
    """A client of the store at ``tracking_uri``, which must exist: looking up never creates a store."""
    import logging

    import mlflow

    from . import sqlite_path

    db = sqlite_path(tracking_uri)
    # a file store: a file: URI or a folder's path ('databricks' and the like are names, not folders)
    folder = _local_path(tracking_uri) if db is None and ("/" in tracking_uri or "\\" in tracking_uri) else None
    if (db is not None and not db.is_file()) or (folder is not None and not folder.is_dir()):
        raise RegistryError(f"no tracking store at {tracking_uri}: nothing is registered there (--tracking-uri?)")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    return mlflow.MlflowClient(tracking_uri, registry_uri=tracking_uri)


def _parse(text: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME/VERSION``, ``models:/NAME/latest``, ``models:/NAME@ALIAS`` or ``NAME/VERSION`` as
    (name, version, alias); ``latest`` is an alias."""
    rest = text.removeprefix("models:/")
    if "@" in rest:
        name, _, alias = rest.rpartition("@")
        version = None
    else:
        name, _, version = rest.rpartition("/")
        alias = None
        if version.lower() == "latest":
            version, alias = None, "latest"
        elif not version.isdigit():
            name = ""
    if not name or "/" in name or not (version or alias):
        raise RegistryError(f"{short_repr(text)}: give models:/NAME/VERSION or models:/NAME@ALIAS")
    return name, version, alias


def _version(client: Any, text: str, uri: str) -> Any:
    """The ModelVersion that ``text`` names, or a RegistryError that says which part is unknown."""
    from mlflow.exceptions import MlflowException

    name, version, alias = _parse(text)
    try:
        model = client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise RegistryError(f"{text}: {one_line(err.message)}") from None
        raise RegistryError(f"{text}: no registered model '{name}' in {uri}") from None
    if alias is not None and alias.lower() != "latest" and alias not in (model.aliases or {}):
        known = ", ".join(sorted(model.aliases or {})) or "none"
        raise RegistryError(f"{text}: model '{name}' has no alias '{alias}' (its aliases: {known}; and @latest)")
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, version)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST" or alias is not None:
            raise RegistryError(f"{text}: {one_line(err.message)}") from None
    raise RegistryError(f"{text}: model '{name}' has no version {version}")


def _local_path(uri: str) -> Path | None:
    """The folder of a local artifact location (``file:`` URI or plain path), None for a remote one."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    return Path(uri) if parsed.scheme in ("", "/") or len(parsed.scheme) == 1 else None  # a Windows drive letter


_downloads: list[str] = []


def _download_folder() -> Path:
    """A temporary folder for downloaded checkpoints, removed when the process exits."""
    if not _downloads:
        _downloads.append(tempfile.mkdtemp(prefix="hagan-clinic-models-"))
        atexit.register(shutil.rmtree, _downloads[0], True)
    return Path(_downloads[0])


def _checkpoint_of(version: Any, text: str, client: Any) -> Path:
    """The checkpoint artifact of a model version: read in place from a local store, else downloaded."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    from ..io.files import regular_file
    from ..io.torch_files import file_sha256

    where = client.get_model_version_download_uri(version.name, version.version)
    local = _local_path(where)
    not_ours = f"{text}: version {version.version} of '{version.name}' holds no hagan-clinic checkpoint"
    try:
        if local is not None:
            mlmodel = local / "MLmodel"
        else:
            target = Path(tempfile.mkdtemp(dir=_download_folder()))
            mlmodel = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{where}/MLmodel", dst_path=str(target)))
        artifacts = Model.load(str(mlmodel)).flavors.get("python_function", {}).get("artifacts", {})
        rel = artifacts["checkpoint"]["path"]
    except (OSError, MlflowException, KeyError, TypeError, AttributeError):
        raise RegistryError(
            f"{not_ours} (no MLmodel with a 'checkpoint' artifact: registered by an older version?)"
        ) from None
    if not isinstance(rel, str) or Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise RegistryError(f"{not_ours} (its checkpoint path {short_repr(rel)} is not inside the model)")
    if local is not None:
        return regular_file(local / rel, "registered checkpoint", 2**40)
    try:
        path = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{where}/{rel}", dst_path=str(target)))
    except (OSError, MlflowException) as err:
        raise RegistryError(f"{text}: its checkpoint cannot be downloaded ({one_line(err, 150)})") from None
    expected = (version.tags or {}).get("sha256")
    if expected and file_sha256(path) != expected:
        raise RegistryError(f"{text}: the downloaded checkpoint does not match the version's sha256 {expected[:12]}")
    return path


def resolve_checkpoint(text: str, tracking_uri: str) -> Resolved:
    """A checkpoint argument as a file: a plain path as it is; ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``
    (``@latest``: the newest version) looked up in the registry of the store at ``tracking_uri`` (which must exist:
    nothing is created) and its checkpoint artifact returned (see the module doc); encoder and generator versions
    of one checkpoint resolve to the same file. RegistryError (one line) for an unknown model, version or alias, a
    missing store, or a version without a checkpoint."""
    from mlflow.exceptions import MlflowException

    if not text.startswith("models:/"):
        return Resolved(Path(text))
    _parse(text)  # a malformed URI is refused before any store is opened
    client = _client(tracking_uri)
    try:
        version = _version(client, text, tracking_uri)
        path = _checkpoint_of(version, text, client)
    except MlflowException as err:  # the store itself failed (a damaged database, a server that refuses)
        raise RegistryError(f"{text}: {one_line(err.message)}") from None
    return Resolved(path, version.name, str(version.version))


def set_alias(model: str, alias: str, tracking_uri: str) -> str:
    """Point ``alias`` (e.g. ``champion``) at the version ``model`` names (``models:/NAME/VERSION``,
    ``models:/NAME@OTHER`` or ``NAME/VERSION``), and at the version of the sibling model (the generator of an
    encoder, or the encoder of a generator) registered from the same checkpoint; returns ``NAME/VERSION``."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        version = _version(client, model, tracking_uri)
        targets = [version, *_siblings(client, version)]
        for found in targets:
            client.set_registered_model_alias(found.name, alias, found.version)
    except MlflowException as err:  # e.g. a reserved alias ('latest', 'v1') or one with bad characters
        raise RegistryError(f"alias {short_repr(alias)}: {one_line(err.message)}") from None
    return f"{version.name}/{version.version}"


def _siblings(client: Any, version: Any) -> list[Any]:
    """The version of the other served model (encoder <-> generator) registered from the same checkpoint at the
    same time (its tag ``sibling``)."""
    sibling = (version.tags or {}).get("sibling", "")
    name, _, number = sibling.rpartition("/")
    return [client.get_model_version(name, number)] if name and number.isdigit() else []


def find_version(sha256: str, tracking_uri: str) -> str | None:
    """``NAME/VERSION`` of the newest encoder version registered from the checkpoint with this SHA-256, or None
    (no such version, or no store: nothing is created)."""
    from mlflow.exceptions import MlflowException

    try:
        found = _client(tracking_uri).search_model_versions(f"tags.sha256 = '{sha256}' and tags.role = 'encoder'")
    except (RegistryError, MlflowException):
        return None
    newest = max(found, key=lambda v: int(v.version), default=None)
    return None if newest is None else f"{newest.name}/{newest.version}"
