"""The model file of ``regress``: the fitted scikit-learn models and what ``predict`` needs to apply them, as a skops
file (``model.skops``).

A pickle (joblib, cloudpickle) runs code when it is loaded, so a model file someone handed over could do anything.
skops stores the same objects as a zip of JSON and ``.npy`` arrays and constructs only the types it is told to
trust. A model file is read as untrusted input, in this order:

1. its size, its zip directory (entries, unpacked bytes) and its schema are bounded, so a zip bomb cannot fill the
   memory; a pickle (e.g. an old ``model.joblib``) is recognised and refused, never unpickled;
2. the file may name only the types skops trusts by itself (scikit-learn's estimators, numpy's and scipy's data
   types and ufuncs, plain containers) and those of :data:`TRUSTED_EXTRA`; anything else it names, even from
   scikit-learn, numpy or scipy, is refused before it is imported. A prefix rule (any ``sklearn.``, ``numpy.`` or
   ``scipy.`` name) is not safe: skops calls a trusted name with arguments from the file for some of its nodes, so
   a file naming ``numpy.save`` or ``numpy.memmap`` writes a file while it loads. It is then loaded with exactly the
   checked list as ``trusted``;
3. the loaded bundle must have the structure :func:`save_bundle` writes, and hold data only: no function, class or
   other callable anywhere (skops trusts numpy's ufuncs, which a crafted ``FunctionTransformer`` would call on the
   features).

The file is read into memory once (at most :data:`MAX_MODEL_BYTES`): what is checked is what is loaded, and its
SHA-256 names exactly those bytes.

Features are only comparable when one encoder made them: every encoder writes columns z0, z1, ... A bundle records
the encoder of the table it was fitted on (the checkpoint's SHA-256 and the data contract, from the table's
provenance: see :func:`table_encoder`), and :func:`check_encoder` refuses a table made by another checkpoint.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import HaganError, describe, one_line, short_repr
from .files import Outputs, atomic_target, provenance_path, read_provenance, regular_file

#: The bundle's layout; a file of another layout is refused (run regress again). 2: the encoder of the training
#: features is recorded (checkpoint_sha256, data_contract).
FORMAT = "hagan-clinic-regress/2"
#: A model file on disk; a bundle of ridge models and PCAs for thousands of features is a few MiB.
MAX_MODEL_BYTES = 256 * 2**20
#: Bytes of the zip's central directory, checked before zipfile builds an object per entry.
MAX_DIRECTORY_BYTES = 2**20
#: Entries of the zip (skops writes one per array, and schema.json).
MAX_MEMBERS = 10_000
#: All entries unpacked together (skops stores them uncompressed: about the file's size).
MAX_UNPACKED_BYTES = 512 * 2**20
#: schema.json, parsed whole by skops (a few KiB for a bundle of regress).
MAX_SCHEMA_BYTES = 8 * 2**20
#: Values walked when the loaded bundle is checked for callables (arrays count once).
MAX_VALUES = 1_000_000
#: Types a model file may name beyond those skops trusts by itself: plain data that scikit-learn's estimators may
#: hold, and harmless to call with any arguments (skops calls some trusted names with arguments from the file).
TRUSTED_EXTRA = frozenset({"builtins.frozenset", "numpy.dtype"})
#: A feature table's ``<stem>.provenance.json`` (a few KiB as encode writes it).
MAX_PROVENANCE_BYTES = 2**20
#: The data contract as JSON (modality, window, spacing, size: under 1 KiB as the config gives it).
MAX_CONTRACT_CHARS = 64 * 2**10

_ZIP_MAGIC = b"PK\x03\x04"
_END_RECORD = b"PK\x05\x06"  # the zip's end of central directory record: 22 bytes and a comment
_ZIP64_LOCATOR = b"PK\x06\x07"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_KEYS = {"format", "models", "feature_columns", "id_column", "targets", "log_targets", "features_sha256",
         "checkpoint_sha256", "data_contract"}  # fmt: skip


class ModelFileError(HaganError):
    """A file that is not a model file of hagan-clinic regress, or one that would not be safe to load."""


class EncoderMismatch(HaganError):
    """A feature table made by another encoder than the one whose features the models were fitted on."""


@dataclass
class RegressionBundle:
    """What ``regress`` fitted and ``predict`` applies.

    ``models``: target name (and ``"gold"`` for the GOLD classifier) -> fitted scikit-learn estimator whose
    ``predict`` takes the feature columns as floats (N, len(feature_columns)); a model of a ``log_targets`` target
    predicts the log of its target. ``features_sha256``: SHA-256 of the feature table file the models were fitted
    on. ``checkpoint_sha256`` and ``data_contract``: the encoder that made that table, as its provenance says (None
    when it says nothing: a table made by hand). ``sha256`` is not stored: it is the digest of the file the bundle
    was loaded from ('' when not loaded).
    """

    models: dict[str, Any]
    feature_columns: list[str]
    id_column: str
    targets: list[str]
    log_targets: list[str]
    features_sha256: str
    checkpoint_sha256: str | None = None
    data_contract: dict[str, Any] | None = None
    sha256: str = ""

    def as_dict(self) -> dict[str, Any]:
        """The bundle as stored: plain containers and the estimators (no dataclass, which skops would not trust)."""
        return {
            "format": FORMAT,
            "models": dict(self.models),
            "feature_columns": list(self.feature_columns),
            "id_column": self.id_column,
            "targets": list(self.targets),
            "log_targets": list(self.log_targets),
            "features_sha256": self.features_sha256,
            "checkpoint_sha256": self.checkpoint_sha256,
            "data_contract": None if self.data_contract is None else dict(self.data_contract),
        }


def save_bundle(bundle: RegressionBundle, path: str | Path, guard: Outputs | None = None) -> None:
    """Write ``bundle`` as a skops file, atomically (through ``guard`` when given)."""
    import skops.io

    with guard.target(path, ".skops") if guard is not None else atomic_target(path, ".skops") as tmp:
        skops.io.dump(bundle.as_dict(), tmp)


def load_bundle(path: str | Path, shown_as: str | None = None) -> RegressionBundle:
    """Read a model file written by :func:`save_bundle`, refusing anything that is not one (see the module's
    docstring): ModelFileError (a HaganError, one line) before any of its content is constructed. Messages name
    the file ``shown_as`` when given (a run's model URI rather than the temporary file it was downloaded to)."""
    regular_file(path, "model file", MAX_MODEL_BYTES)
    with open(path, "rb") as f:
        data = f.read(MAX_MODEL_BYTES + 1)  # a file that grew since the size check is still read bounded
    path = Path(shown_as) if shown_as else Path(path)
    if len(data) > MAX_MODEL_BYTES:
        raise ModelFileError(f"{path} is over the {MAX_MODEL_BYTES // 2**20} MiB a model file may have")
    if not data.startswith(_ZIP_MAGIC):
        raise ModelFileError(_not_skops(path, data))
    _check_zip(path, data)
    untrusted = _untrusted_types(path, data)
    refused = [t for t in untrusted if not trusted_type(t)]
    if refused:
        more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
        raise ModelFileError(
            f"{path} names {short_repr(refused[0], 80)}{more}, which is no scikit-learn estimator, numpy or scipy "
            "data type: not loaded"
        )
    obj = _load(path, data, untrusted)
    bundle = _bundle(path, obj)
    bundle.sha256 = hashlib.sha256(data).hexdigest()
    return bundle


def trusted_type(name: str) -> bool:
    """Whether a model file may name ``name`` (a type, function or method as skops spells it, 'module.qualname')
    that skops does not trust by itself."""
    return name in TRUSTED_EXTRA


# ---------------------------------------------------------------- before anything is constructed
def _not_skops(path: Path, data: bytes) -> str:
    if path.suffix == ".joblib":
        return f"{path} is not a skops model file; run regress again (it writes model.skops: a pickle is never loaded)"
    if data[:1] == b"\x80":  # the PROTO opcode that starts every pickle of protocol 2 or later
        return f"{path} is a pickle, not a skops model file: never loaded (a pickle can run code); run regress again"
    return f"{path} is not a skops model file (model.skops, written by hagan-clinic regress)"


def _check_zip(path: Path, data: bytes) -> None:
    """Bound the zip before zipfile or skops unpack anything: zipfile creates an object per directory entry and
    unpacks an entry up to the size the directory declares, so both are checked here first."""
    # zipfile takes the end record in the last 22 bytes when there is no comment, else the last one within reach
    tail = data[-(22 + 65535) :]
    at = len(tail) - 22 if tail[-22:-18] == _END_RECORD and tail[-2:] == b"\0\0" else tail.rfind(_END_RECORD)
    if at < 0 or len(tail) - at < 22:
        raise ModelFileError(f"{path} is not a skops model file (no zip directory)")
    if tail[max(0, at - 20) : max(0, at - 16)] == _ZIP64_LOCATOR:
        raise ModelFileError(f"{path} is a zip64 archive, which no model file needs: not loaded")
    (directory_bytes,) = struct.unpack_from("<I", tail, at + 12)
    if directory_bytes > MAX_DIRECTORY_BYTES:
        raise ModelFileError(f"{path}: its zip directory is {directory_bytes} bytes, over {MAX_DIRECTORY_BYTES}")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        raise ModelFileError(f"{path} is not a readable zip ({describe(err, 100)})") from None
    if len(members) > MAX_MEMBERS:
        raise ModelFileError(f"{path} holds {len(members)} entries, over the {MAX_MEMBERS} a model file may have")
    unpacked = sum(m.file_size for m in members)
    if unpacked > MAX_UNPACKED_BYTES:
        raise ModelFileError(
            f"{path} unpacks to {unpacked / 2**20:.0f} MiB, over {MAX_UNPACKED_BYTES // 2**20} MiB: not loaded"
        )
    schema = [m for m in members if m.filename == "schema.json"]
    if not schema:
        raise ModelFileError(f"{path} is not a skops model file (a zip without schema.json)")
    if max(m.file_size for m in schema) > MAX_SCHEMA_BYTES:
        raise ModelFileError(f"{path}: its schema.json is over {MAX_SCHEMA_BYTES // 2**20} MiB: not loaded")


def _untrusted_types(path: Path, data: bytes) -> list[str]:
    import skops.io

    try:
        return skops.io.get_untrusted_types(data=data)
    except Exception as err:  # a damaged schema: skops raises many types (KeyError, JSON, recursion, ...)
        raise ModelFileError(f"{path}: not a readable skops model file ({describe(err, 100)})") from None


def _load(path: Path, data: bytes, trusted: list[str]) -> Any:
    """The file's object, built by skops from ``trusted`` (the checked list) and the types skops trusts itself."""
    import skops.io

    try:
        return skops.io.loads(data, trusted=trusted)
    except Exception as err:  # damaged arrays or states; MemoryError of an array header's claimed shape
        raise ModelFileError(f"{path}: not a readable skops model file ({describe(err, 100)})") from None


# ---------------------------------------------------------------- after loading: the structure
def _bundle(path: Path, obj: Any) -> RegressionBundle:
    """The loaded object as a RegressionBundle, when it has the structure :meth:`RegressionBundle.as_dict` gives."""

    def bad(what: str) -> ModelFileError:
        return ModelFileError(f"{path} is not a model file of hagan-clinic regress: {what}")

    if isinstance(obj, dict) and obj.get("format", FORMAT) != FORMAT:  # an earlier layout has other keys too
        raise bad(f"format {short_repr(obj['format'])}, this version reads {FORMAT!r}; run regress again")
    if not isinstance(obj, dict) or set(obj) != _KEYS:
        found = sorted(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise bad(f"it holds {short_repr(found, 80)}")
    columns, targets, logs = obj["feature_columns"], obj["targets"], obj["log_targets"]
    for name, value in (("feature_columns", columns), ("targets", targets), ("log_targets", logs)):
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value) and len(set(value)) == len(value)):
            raise bad(f"{name} is not a list of distinct names")
    if not columns or not targets or not set(logs) <= set(targets):
        raise bad("no feature columns or targets, or a log target that is no target")
    if not isinstance(obj["id_column"], str) or not isinstance(obj["features_sha256"], str):
        raise bad("id_column or features_sha256 is not text")
    if not _SHA256.fullmatch(obj["features_sha256"]):
        raise bad("features_sha256 is not a SHA-256")
    checkpoint, contract = obj["checkpoint_sha256"], obj["data_contract"]
    if checkpoint is not None and not (isinstance(checkpoint, str) and _SHA256.fullmatch(checkpoint)):
        raise bad("checkpoint_sha256 is neither a SHA-256 nor None")
    if contract is not None and _plain_mapping(contract) is None:
        raise bad("data_contract is neither a mapping of plain values nor None")
    models = obj["models"]
    if not isinstance(models, dict) or set(models) - {"gold"} != set(targets):
        raise bad("its models are not one per target (and GOLD)")
    _data_only(models, "models", [MAX_VALUES], path)
    from sklearn.base import BaseEstimator

    for name, model in models.items():
        if not isinstance(model, BaseEstimator) or getattr(model, "n_features_in_", None) != len(columns):
            raise bad(f"the model of {short_repr(name)} is no estimator fitted on {len(columns)} features")
    return RegressionBundle(
        models, columns, obj["id_column"], targets, logs, obj["features_sha256"], checkpoint, contract
    )


def _data_only(value: Any, where: str, budget: list[int], path: Path, depth: int = 0) -> None:
    """Refuse any callable (function, class, ufunc, method) and any object of another library in ``value``: the
    estimators of scikit-learn are walked through their attributes, numpy values and plain containers through their
    items. ``budget`` (one count, shared) bounds the walk."""
    import numpy as np

    budget[0] -= 1
    if budget[0] < 0 or depth > 40:
        raise ModelFileError(f"{path}: its models nest too deeply or hold too many values: not used")
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes, np.generic, np.dtype, slice)):
        return
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            for k, item in enumerate(value.flat):
                _data_only(item, f"{where}[{k}]", budget, path, depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            _data_only(key, f"{where} key", budget, path, depth + 1)
            _data_only(item, f"{where}[{short_repr(key, 30)}]", budget, path, depth + 1)
        return
    if isinstance(value, (list, tuple, set, frozenset)):
        for k, item in enumerate(value):
            _data_only(item, f"{where}[{k}]", budget, path, depth + 1)
        return
    kind = f"{type(value).__module__}.{type(value).__qualname__}"
    if callable(value):
        shown = f"{getattr(value, '__module__', '')}.{getattr(value, '__name__', kind)}".lstrip(".")
        raise ModelFileError(
            f"{path}: {one_line(where, 120)} is the callable {short_repr(shown, 80)}; a model file holds data only"
        )
    if kind.startswith("sklearn.") and hasattr(value, "__dict__"):
        _data_only(vars(value), where, budget, path, depth + 1)
        return
    raise ModelFileError(f"{path}: {one_line(where, 120)} is a {short_repr(kind, 80)}, which no model of regress holds")


# ---------------------------------------------------------------- the encoder of a feature table
def table_provenance(path: str | Path) -> dict[str, Any] | None:
    """What made a feature table, as encode records it: a parquet table's key-value metadata, else the
    ``<stem>.provenance.json`` beside the table (CSV or parquet). None when neither exists (a table made by hand)
    or what is there is no readable JSON object."""
    made = read_provenance(path)
    if isinstance(made, dict):
        return made
    beside = provenance_path(path)
    if not beside.exists():
        return None
    try:  # bounded and never a FIFO: a record that cannot be read says nothing, and the check then warns
        regular_file(beside, "provenance record", MAX_PROVENANCE_BYTES)
        made = json.loads(beside.read_text(encoding="utf-8"))
    except (HaganError, OSError, ValueError, RecursionError):
        return None
    return made if isinstance(made, dict) else None


def table_encoder(path: str | Path) -> tuple[str | None, dict[str, Any] | None]:
    """(checkpoint SHA-256, data contract) of the encoder that made the feature table ``path``, from its provenance
    (see :func:`table_provenance`); each None when the provenance does not say it, or says it in another form."""
    made = table_provenance(path) or {}
    sha = made.get("checkpoint_sha256")
    return (sha if isinstance(sha, str) and _SHA256.fullmatch(sha) else None), _plain_mapping(made.get("data_contract"))


def check_encoder(bundle: RegressionBundle, features: str | Path, checkpoint_sha256: str | None) -> bool:
    """Whether the feature table ``features``, made by the checkpoint ``checkpoint_sha256`` (None: not known), was
    checked to come from the encoder of the bundle's training features: True when both checkpoints are known and
    the same, False when either is not known. Two known checkpoints that differ raise EncoderMismatch (one line):
    every encoder names its features z0, z1, ..., so the models would read other features under the same names."""
    trained = bundle.checkpoint_sha256
    if trained is None or checkpoint_sha256 is None:
        return False
    if checkpoint_sha256 != trained:
        raise EncoderMismatch(
            f"{features} was encoded by checkpoint {checkpoint_sha256[:12]}, but the models were fitted on features "
            f"of checkpoint {trained[:12]}: other features under the same names; encode with that checkpoint, or "
            "run regress on features of this one"
        )
    return True


def _plain_mapping(value: Any) -> dict[str, Any] | None:
    """``value`` when it is a JSON object of plain values (text keys; text, numbers, booleans, None, lists and such
    objects) of bounded size, else None."""
    if not isinstance(value, dict):
        return None
    try:
        text = json.dumps(value, allow_nan=False, sort_keys=True)
        same = len(text) <= MAX_CONTRACT_CHARS and json.loads(text) == value  # a tuple or a numpy value differs
    except (TypeError, ValueError, RecursionError):
        return None
    return value if same else None
