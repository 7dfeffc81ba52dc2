"""The model registry: checkpoints registered as MLflow pyfunc models, and registry URIs resolved back to checkpoints.

:func:`register_checkpoint` logs, in a run, the encoder of a checkpoint as model ``NAME`` and its generator as
``NAME-generator``: models from code (the code files of :mod:`hagan_clinic.serving`, found by path: this layer may
not import that one) with the checkpoint as their artifact ``checkpoint``, a signature, an input example, a
description and the data contract as version tags. The checkpoint's SHA-256 is recorded twice: as the version's
tag ``sha256`` (what the registry checks) and as the model's artifact ``checkpoint_sha256`` (what the served model
checks when it loads: it cannot see the version's tags). A checkpoint registered before under the same name is
not registered again: its newest version is reused. ``models:/NAME@latest`` always names the newest version (the
registry resolves the alias ``latest`` itself); :func:`set_alias` sets others (``champion``).

:func:`resolve_checkpoint` turns ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` into a checkpoint file. With a
local artifact store (the ``sqlite:///`` store the commands create keeps its artifacts in a folder beside it) that
is the stored file itself, read in place: nothing is copied. From a remote artifact store it is downloaded into a
temporary folder that is removed when the process exits. Either way the file is checked against the version's
SHA-256: a checkpoint replaced in the store is refused, never used under the version's name.
"""

from __future__ import annotations

import atexit
import io
import logging
import re
import shutil
import tempfile
from collections.abc import Mapping
from contextlib import nullcontext, redirect_stderr
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from ..errors import HaganError, one_line, short_repr
from . import NO_PROGRESS_BARS, environment
from .served_models import EXAMPLE_PATH, LogWithoutServing, contract_tags, describe, signature

GENERATOR_SUFFIX = "-generator"
log = logging.getLogger(__name__)
#: The code files of the served models (hagan_clinic/serving/), by path.
SERVING = Path(__file__).resolve().parents[1] / "serving"
#: The artifact of each served model that holds its checkpoint's SHA-256 (64 hex digits), checked by load_context.
SHA256_ARTIFACT = "checkpoint_sha256"
#: The largest checkpoint read from a store. The checkpoint reader refuses a config of over MAX_PARAMETERS
#: (models.hagan) parameters; a checkpoint holds them as float32 plus at most as many again (the EMA copy of G).
MAX_CHECKPOINT_BYTES = 8 * 10**9
#: A version number as the registry stores it (an SQLite integer): ASCII digits only ('١' is no version).
_VERSION_NUMBER = re.compile(r"[0-9]{1,18}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class RegistryError(HaganError):
    """A registry URI, model, version or alias that cannot be used (one line)."""


@dataclass(frozen=True)
class Resolved:
    """A checkpoint argument resolved: the file, and for a registered model its name and version."""

    path: Path
    name: str | None = None
    version: str | None = None
    role: str | None = None  # 'encoder' or 'generator': which served model the URI named
    sibling: str | None = None  # NAME/VERSION of the other served model registered from the same checkpoint

    def as_used_by(self, role: str) -> str | None:
        """NAME/VERSION of the served model of ``role`` behind this checkpoint (the encoder's version for encode,
        even when the URI named the generator), or None for a plain file."""
        if self.name is None:
            return None
        if self.role is not None and self.role != role and self.sibling:
            return self.sibling
        return f"{self.name}/{self.version}"


# ---------------------------------------------------------------- registering
def _log_and_register(kind: str, name: str, checkpoint: Path, cfg: Any, tags: dict[str, str], client: Any) -> str:
    """Log one served model in the active run, register it as a new version of ``name``; returns the version."""
    import mlflow
    import pandas as pd
    from mlflow.models import Model

    from .. import __version__

    example = pd.DataFrame({"path": [EXAMPLE_PATH]} if kind == "encoder" else {"seed": [0]})
    with tempfile.TemporaryDirectory(prefix="hagan-clinic-sha256-") as folder:
        recorded = Path(folder) / "checkpoint.sha256"  # the served model checks its checkpoint against it
        recorded.write_text(tags["sha256"] + "\n", encoding="ascii")
        info = Model.log(
            None,  # artifact_path: replaced by name
            name=kind,
            flavor=LogWithoutServing,
            flavor_name="pyfunc.ModelFromCode",
            python_model=str(SERVING / f"{kind}.py"),
            artifacts={"checkpoint": str(checkpoint), SHA256_ARTIFACT: str(recorded)},
            signature=signature(kind, cfg),
            input_example=example,
            validate_serving_input=False,
            # given, not inferred: inferring them loads the model in a subprocess (seconds, the checkpoint read twice)
            pip_requirements=[f"hagan-clinic=={__version__}", f"mlflow=={mlflow.__version__}"],
        )
    with redirect_stderr(io.StringIO()):  # MLflow prints its own lines there, past logging and --quiet
        version = mlflow.register_model(info.model_uri, name, tags=tags)
    log.info("registered %s version %s (models:/%s@latest)", name, version.version, name)
    text = describe(kind, cfg, tags["sha256"], name)
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
    """Register ``checkpoint`` (a hagan-clinic checkpoint file) as a version of the encoder model ``name`` and, when
    it has a generator, of ``name-generator``; returns the encoder's version (the generator's when the checkpoint has
    no encoder). ``cfg_dict``: its config (the data contract and the grid); ``tags``: extra version tags (``sha256``,
    when given, must be the file's: it lets a command that reads the file name its version).

    Idempotent per served model: a model that already has a version registered from a file with this SHA-256 (a
    ``train --resume`` of a finished run, or one killed between the encoder's and the generator's registration)
    keeps its newest such version, which is returned as it is; only the missing ones are logged, in the active run,
    else in run ``run_id``, else in a new run ``register NAME``. ``models:/NAME@latest`` names a new version from now
    on (a reused one only while it is the newest)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from ..config import Config
    from ..io.files import file_sha256
    from ..models.hagan import read_checkpoint

    checkpoint = Path(checkpoint)
    cfg = Config.from_dict(cfg_dict)
    parts = read_checkpoint(checkpoint).get("parts") or []
    kinds = [k for k, need in (("encoder", {"EH", "EG"}), ("generator", {"G"})) if need <= set(parts)]
    if not kinds:
        raise RegistryError(f"{checkpoint}: the checkpoint has neither an encoder nor a generator to register")
    base = {str(k): str(v) for k, v in tags.items()}
    sha = file_sha256(checkpoint)  # always the file's own: the served model checks its checkpoint against it
    if base.setdefault("sha256", sha) != sha:
        raise RegistryError(f"{checkpoint}: the sha256 tag given does not match the file ({sha[:12]})")
    base.update(contract_tags(cfg.data_contract()))
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri)
    pair = {"encoder": name, "generator": name + GENERATOR_SUFFIX}
    try:
        versions = {kind: found for kind in kinds if (found := _registered(client, pair[kind], sha)) is not None}
    except MlflowException as err:
        raise RegistryError(f"registering {short_repr(name, 80)}: {one_line(err.message)}") from None
    for kind, found in versions.items():
        log.info("%s version %s holds this checkpoint already: reused", pair[kind], found)
    missing = [kind for kind in kinds if kind not in versions]
    active = mlflow.active_run()
    where: Any = nullcontext()  # nothing to log, or the run to log in is open
    if missing and (active is None or (run_id is not None and active.info.run_id != run_id)):
        where = mlflow.start_run(run_id, run_name=None if run_id else f"register {name}", nested=bool(active))
    with where, environment(**NO_PROGRESS_BARS):
        try:
            for kind in missing:
                versions[kind] = _log_and_register(kind, pair[kind], checkpoint, cfg, {**base, "role": kind}, client)
            if len(versions) == 2:  # each names the other, so that an alias moves both (set_alias)
                for kind, other in (("encoder", "generator"), ("generator", "encoder")):
                    client.set_model_version_tag(
                        pair[kind], versions[kind], "sibling", f"{pair[other]}/{versions[other]}"
                    )
        except MlflowException as err:
            raise RegistryError(f"registering {short_repr(name, 80)}: {one_line(err.message)}") from None
    return versions.get("encoder") or versions["generator"]


def _registered(client: Any, model: str, sha: str) -> str | None:
    """The newest version of ``model`` (a served model of ours: a ``role`` tag) registered from the checkpoint with
    this SHA-256, or None. The filter names only the digest (hex: nothing to quote), not the name."""
    found = client.search_model_versions(f"tags.sha256 = '{sha}'")
    ours = [v for v in found if v.name == model and (v.tags or {}).get("role") in ("encoder", "generator")]
    newest = max(ours, key=lambda v: int(v.version), default=None)
    return None if newest is None else str(newest.version)


# ---------------------------------------------------------------- looking up
def _client(tracking_uri: str) -> Any:
    """A client of the store at ``tracking_uri``, which must exist: looking up never creates a store."""
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
        elif not _VERSION_NUMBER.fullmatch(version):
            name = ""
    if not name or "/" in name or not (version or alias):
        raise RegistryError(f"{short_repr(text)}: give models:/NAME/VERSION or models:/NAME@ALIAS")
    return name, version, alias


def _quoted(text: str) -> str:
    """A URI, name or alias as a message quotes it: whole when short, cut when long (a message is one short line)."""
    return text if len(text) <= 100 and text.isprintable() else short_repr(text, 100)


def _version(client: Any, text: str, uri: str) -> Any:
    """The ModelVersion that ``text`` names, or a RegistryError that says which part is unknown."""
    from mlflow.exceptions import MlflowException

    name, version, alias = _parse(text)
    where, model_name = _quoted(text), short_repr(name, 80)
    try:
        model = client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise RegistryError(f"{where}: {one_line(err.message, 150)}") from None
        raise RegistryError(f"{where}: no registered model {model_name} in {_quoted(uri)}") from None
    if alias is not None and alias.lower() != "latest" and alias not in (model.aliases or {}):
        known = ", ".join(sorted(model.aliases or {}))[:80] or "none"
        raise RegistryError(
            f"{where}: model {model_name} has no alias {short_repr(alias, 40)} (its aliases: {known}; and @latest)"
        )
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, version)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST" or alias is not None:
            raise RegistryError(f"{where}: {one_line(err.message, 150)}") from None
    raise RegistryError(f"{where}: model {model_name} has no version {version}")


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
    """The checkpoint artifact of a model version: read in place from a local store, else downloaded; either way
    a regular file of at most :data:`MAX_CHECKPOINT_BYTES` whose SHA-256 is the version's tag ``sha256``."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    from ..io.files import file_sha256, regular_file

    where = client.get_model_version_download_uri(version.name, version.version)
    local = _local_path(where)
    not_ours = (
        f"{_quoted(text)}: version {version.version} of {short_repr(version.name, 80)} holds no hagan-clinic checkpoint"
    )
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
    expected = (version.tags or {}).get("sha256", "")
    if not _SHA256.fullmatch(expected):
        raise RegistryError(f"{not_ours} (no sha256 tag to check its checkpoint against)")
    if local is not None:
        path = local / rel
    else:
        try:
            path = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{where}/{rel}", dst_path=str(target)))
        except (OSError, MlflowException) as err:
            raise RegistryError(
                f"{_quoted(text)}: its checkpoint cannot be downloaded ({one_line(err, 150)})"
            ) from None
    try:
        regular_file(path, "registered checkpoint", MAX_CHECKPOINT_BYTES)
        actual = file_sha256(path)
    except OSError as err:
        raise RegistryError(f"{_quoted(text)}: its checkpoint cannot be read ({one_line(err, 150)})") from None
    except HaganError as err:  # not a regular file, or too large
        raise RegistryError(f"{_quoted(text)}: {one_line(err, 200)}") from None
    if actual != expected:
        raise RegistryError(
            f"{_quoted(text)}: its checkpoint does not match the version's sha256 {expected[:12]} (replaced?)"
        )
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
        raise RegistryError(f"{_quoted(text)}: {one_line(err.message, 150)}") from None
    tags = version.tags or {}
    return Resolved(path, version.name, str(version.version), tags.get("role"), tags.get("sibling") or None)


def set_alias(model: str, alias: str, tracking_uri: str) -> str:
    """Point ``alias`` (e.g. ``champion``) at the version ``model`` names (``models:/NAME/VERSION``,
    ``models:/NAME@OTHER`` or ``NAME/VERSION``), and at the version of the sibling model (the generator of an
    encoder, or the encoder of a generator) registered from the same checkpoint; returns ``NAME/VERSION``."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        version = _version(client, model, tracking_uri)
        if (version.tags or {}).get("role") not in ("encoder", "generator"):  # e.g. an old-style folder artifact
            raise RegistryError(
                f"{_quoted(model)}: version {version.version} of {short_repr(version.name, 80)} holds no hagan-clinic "
                "checkpoint (no 'role' tag): no alias set"
            )
        targets = [version, *_siblings(client, version)]
        for found in targets:
            client.set_registered_model_alias(found.name, alias, found.version)
    except MlflowException as err:  # e.g. a reserved alias ('latest', 'v1') or one with bad characters
        raise RegistryError(f"alias {short_repr(alias, 40)}: {one_line(err.message, 150)}") from None
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
