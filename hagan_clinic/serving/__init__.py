"""The registered models as MLflow pyfunc models: what ``mlflow.pyfunc.load_model("models:/NAME@ALIAS")`` and
``mlflow models serve`` run.

The networks use spectral normalisation, which does not pickle, so each model is logged as code (MLflow's
"models from code"): the code file (:data:`ENCODER_CODE` or :data:`GENERATOR_CODE`, one model per file as MLflow
requires) is stored with the model version and names one class of this module; the checkpoint travels as the
version's artifact ``checkpoint`` and is read with ``weights_only`` like every checkpoint, after checking it against
the SHA-256 recorded beside it at registration (artifact ``checkpoint_sha256``): a checkpoint replaced in the store
is refused. Loading a version thus needs hagan-clinic installed (``mlflow models serve --env-manager local`` in the
environment that has it).

- :class:`EncoderModel`: a DataFrame with a ``path`` column (a DICOM series folder or a NIfTI file, read on the
  machine that runs the model) -> one row of latent features ``z0..z{L-1}`` per path, each scan read and
  preprocessed exactly as ``hagan-clinic encode`` does (the same functions). Or a ``volume`` column of at most
  :data:`MAX_VOLUMES` volumes (S, S, S) already on the model's scale [-1, 1]. The loaded pyfunc model takes
  DataFrames only (MLflow checks the input against the column signature first); a plain array (n, S, S, S) is
  taken by the model's own ``predict`` (``unwrap_python_model()``).
- :class:`GeneratorModel`: a DataFrame with a ``seed`` column (optional ``index`` and ``label``) -> the volumes
  (n, S, S, S) float32 in [-1, 1] that ``hagan-clinic generate --seed SEED`` writes as sample ``index``.

A ``path`` is checked before it is read, so that one request stays bounded: it must be a regular file or a folder
of at most :data:`MAX_SERIES_ENTRIES` files and folders (walked without following links: one series, not a
cohort), outside the system trees (/proc, /sys, /dev), and, when :data:`ROOT_ENV` (``HAGAN_CLINIC_SERVING_ROOT``)
is set, resolve under that folder, as every link inside the folder must.

Bad input is a :class:`ServingError`: one line, an MlflowException to the scoring server (HTTP 400 with the
message), a HaganError to the command line.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

from hagan_clinic.errors import HaganError, describe, one_line, short_repr

#: The models-from-code files (stored with each model version under these names).
ENCODER_CODE = Path(__file__).with_name("encoder.py")
GENERATOR_CODE = Path(__file__).with_name("generator.py")
#: Scans per request: a served request must end well within the scoring server's timeout (``encode`` reads cohorts).
MAX_PATHS = 64
#: Volumes sent or returned as arrays per request, and the largest grid that travels as an array: one 128^3 volume
#: is 2M values (about 20 MB of JSON); a 256^3 one would be eight times that, so its scans are sent as paths.
MAX_VOLUMES = 4
MAX_ARRAY_SIZE = 128
#: Where the served models run (cpu, cuda, cuda:N, mps or auto); cpu when unset.
DEVICE_ENV = "HAGAN_CLINIC_SERVING_DEVICE"
#: Values a model-scale volume may hold: [-1, 1] and float16 rounding.
_SCALE_LIMIT = 1.001
#: Files and folders (at any depth) a requested path may hold: a series is hundreds to a few thousand files; a
#: larger tree is a cohort or a system folder, and walking it would hold the request (and the memory) for minutes.
MAX_SERIES_ENTRIES = 4096
#: A folder that every requested path must resolve under (links followed); unset: any path the server can read.
ROOT_ENV = "HAGAN_CLINIC_SERVING_ROOT"
#: Trees of the kernel's own files, never scans: a walk through them can block, loop or never end.
SYSTEM_TREES = ("/proc", "/sys", "/dev")
log = logging.getLogger(__name__)


class ServingError(HaganError, MlflowException):
    """Input a served model refuses, in one line (the scoring server answers it with HTTP 400)."""

    def __init__(self, message: str) -> None:
        MlflowException.__init__(self, one_line(message), error_code=INVALID_PARAMETER_VALUE)


def serving_device() -> str:
    """The device of :data:`DEVICE_ENV` (cpu by default)."""
    from hagan_clinic.devices import resolve_device

    try:
        return str(resolve_device(os.environ.get(DEVICE_ENV) or "cpu", DEVICE_ENV))
    except HaganError as err:
        raise ServingError(str(err)) from None


def checked_checkpoint(context: Any) -> str:
    """The model's checkpoint artifact, checked against the SHA-256 recorded beside it when the version was
    registered: a checkpoint replaced in the store is refused, never served under the version's name. A version
    registered before the record existed has none: loaded as it is, with a warning."""
    from hagan_clinic.io.files import file_sha256, regular_file
    from hagan_clinic.tracking.registry import SHA256_ARTIFACT

    artifacts = dict(context.artifacts or {})
    path = artifacts["checkpoint"]
    if SHA256_ARTIFACT not in artifacts:
        log.warning(
            "%s: no recorded sha256 to check the checkpoint against (registered by an older hagan-clinic)", path
        )
        return path
    try:
        recorded = regular_file(artifacts[SHA256_ARTIFACT], "recorded sha256", 1024).read_text("ascii").strip()
        actual = file_sha256(path)
    except (HaganError, OSError, UnicodeDecodeError) as err:
        raise ServingError(f"the model's checkpoint cannot be checked ({describe(err)})") from None
    if actual != recorded:
        raise ServingError(
            f"the model's checkpoint {Path(path).name} does not match the sha256 {short_repr(recorded[:12])} recorded "
            "when it was registered (replaced?): not loaded"
        )
    return path


def _shown(text: str) -> str:
    """A requested path as a message names it (whole unless it is very long)."""
    return text if len(text) <= 200 and text.isprintable() else short_repr(text, 200)


def _under(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def serving_root() -> Path | None:
    """The folder of :data:`ROOT_ENV` (links resolved), or None when it is unset."""
    text = os.environ.get(ROOT_ENV, "")
    if not text:
        return None
    root = Path(os.path.realpath(text))
    if not os.path.isabs(text) or not root.is_dir():
        raise ServingError(f"{ROOT_ENV}={_shown(text)}: not the absolute path of a folder")
    return root


def checked_source(text: str, row: int) -> Path:
    """The path of row ``row`` with links resolved, once it is under :data:`ROOT_ENV` (when set), outside
    :data:`SYSTEM_TREES`, and a regular file or a folder of at most :data:`MAX_SERIES_ENTRIES` entries (see the
    module doc); ServingError otherwise, before anything is read."""
    shown, root = _shown(text), serving_root()
    try:
        real = Path(os.path.realpath(text))
    except (OSError, ValueError) as err:  # a NUL byte, a name too long
        raise ServingError(f"row {row}: {shown} is not a usable path ({one_line(err, 80)})") from None
    if root is not None and not _under(real, root):
        raise ServingError(f"row {row}: {shown} is not under {ROOT_ENV} ({root}): not read")
    tree = next((t for t in SYSTEM_TREES if _under(real, Path(t))), None)
    if tree is not None:
        raise ServingError(f"row {row}: {shown} is in {tree}, a system folder: give a series folder or a NIfTI file")
    try:
        info = os.stat(real)
    except FileNotFoundError:
        raise ServingError(f"row {row}: source not found: {shown}") from None
    except OSError as err:  # a loop of links, no permission
        raise ServingError(f"row {row}: {shown} cannot be read ({err.strerror or type(err).__name__})") from None
    if stat.S_ISDIR(info.st_mode):
        _walk(real, row, shown, root)
    elif not stat.S_ISREG(info.st_mode):
        raise ServingError(f"row {row}: {shown} is not a file or a folder (a FIFO, socket or device): not read")
    return real


def _walk(folder: Path, row: int, shown: str, root: Path | None) -> None:
    """Count the entries under ``folder`` without following links, up to :data:`MAX_SERIES_ENTRIES`; with a root,
    refuse a link that leads out of it (encode's reader follows links to files)."""
    count, stack = 0, [folder]
    while stack:
        try:
            listing = os.scandir(stack.pop())
        except OSError:  # an unreadable folder: encode's reader names it in its reason
            continue
        with listing:
            for entry in listing:
                count += 1
                if count > MAX_SERIES_ENTRIES:
                    raise ServingError(
                        f"row {row}: {shown} holds over {MAX_SERIES_ENTRIES} files and folders: give one series "
                        "folder (hagan-clinic encode reads cohorts)"
                    )
                try:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(Path(entry.path))
                        continue
                    link = entry.is_symlink()
                except OSError:  # vanished or unreadable: encode's reader says so
                    continue
                if link and root is not None and not _under(Path(os.path.realpath(entry.path)), root):
                    raise ServingError(f"row {row}: {shown} holds a link that leads out of {ROOT_ENV}: not read")


def _frame(model_input: Any, what: str) -> pd.DataFrame:
    """``model_input`` as a DataFrame (a dict of columns is one), or a ServingError naming what is expected."""
    if isinstance(model_input, pd.DataFrame):
        return model_input
    if isinstance(model_input, dict):
        try:
            return pd.DataFrame(model_input)
        except ValueError as err:
            raise ServingError(f"the input is not a table of columns ({err})") from None
    raise ServingError(f"expected {what}, got {type(model_input).__name__}")


def _present(frame: pd.DataFrame, column: str) -> bool:
    """Whether ``column`` holds a value in any row (schema enforcement may add an optional column as all None)."""
    return column in frame.columns and bool(frame[column].notna().any())


def _whole_numbers(frame: pd.DataFrame, column: str, low: int, high: int) -> list[int]:
    """The values of ``column`` as ints in [low, high], or a ServingError naming the first bad row."""
    out = []
    for row, value in enumerate(frame[column].tolist()):
        try:
            number = float(value)
            ok = number.is_integer() and low <= number <= high
        except (TypeError, ValueError, OverflowError):
            ok = False
        if not ok:
            raise ServingError(
                f"row {row}: '{column}' must be a whole number in [{low}, {high}], got {short_repr(value)}"
            )
        out.append(int(value))
    return out


# ---------------------------------------------------------------- the encoder
def model_scale_volumes(values: Any, size: int) -> list[np.ndarray]:
    """Volumes given as an array (n, S, S, S) or (n, 1, S, S, S) (or a list of (S, S, S)), checked to be at most
    :data:`MAX_VOLUMES`, finite and on the model's scale [-1, 1], and rounded to float16 as ``encode`` rounds its
    grids (the preprocess cache's type): the same scan gives the same features either way."""
    from hagan_clinic.io.cache import encode_grid

    if size > MAX_ARRAY_SIZE:
        raise ServingError(
            f"this model's grid is {size}^3: volumes over {MAX_ARRAY_SIZE}^3 are not taken as arrays (one would be "
            f"{size**3 * 10 / 1e6:.0f} MB of JSON); send the scan's 'path' instead"
        )
    if not (isinstance(values, (list, tuple)) or (isinstance(values, np.ndarray) and values.ndim > 0)):
        raise ServingError(f"volumes must be an array (n, {size}, {size}, {size}), got {type(values).__name__}")
    n = len(values)
    if n > MAX_VOLUMES:
        raise ServingError(f"{n} volumes: at most {MAX_VOLUMES} are taken as arrays per request; send paths instead")
    try:
        arr = np.asarray(values if isinstance(values, np.ndarray) else [np.asarray(v) for v in values], np.float32)
    except (TypeError, ValueError) as err:
        raise ServingError(f"volumes must be numeric arrays of the same shape ({one_line(err, 120)})") from None
    if arr.ndim == 5 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 4 or arr.shape[1:] != (size, size, size):
        s = size
        raise ServingError(f"volumes must be ({n}, {s}, {s}, {s}) or ({n}, 1, {s}, {s}, {s}), got {tuple(arr.shape)}")
    if not np.isfinite(arr).all():
        raise ServingError("volumes hold NaN or infinite values")
    if arr.size and np.abs(arr).max() > _SCALE_LIMIT:
        raise ServingError(
            f"volumes must be on the model's scale [-1, 1] (its data.window mapped to [-1, 1], as preprocess writes "
            f"them), got values in [{arr.min():.4g}, {arr.max():.4g}]: send the scan's 'path' for it to be read"
        )
    return [encode_grid(v, "float16") for v in arr]


def series_grid(text: Any, row: int, cfg: Any) -> np.ndarray:
    """The model grid (S, S, S) float16 of the one series at ``text`` (a DICOM series folder, a NIfTI file, or a
    preprocess cache of one series), read and preprocessed by ``encode``'s own functions."""
    from hagan_clinic.pipelines.encode_inputs import list_series, prepare_one

    if not isinstance(text, str) or not text.strip():
        raise ServingError(f"row {row}: 'path' must name a series folder or a NIfTI file, got {short_repr(text)}")
    src, real = _shown(text), checked_source(text, row)  # the path checked is the one read
    try:
        ok, others = list_series(real, cfg, False, False)
        if len(ok) > 1:
            raise ServingError(f"row {row}: {src} holds {len(ok)} series; give one series (encode reads cohorts)")
        if not ok:
            row_of = others[0][0]
            raise ServingError(f"row {row}: {src}: no usable series ({row_of.get('status')}: {row_of.get('reason')})")
        prepared = prepare_one(ok[0], cfg.to_dict(), False)
    except ServingError:
        raise
    except Exception as err:  # HaganError, or an unexpected failure of this scan: the request's failure, said once
        said = describe(err)
        raise ServingError(f"row {row}: {said}" if str(real) in said else f"row {row}: {src}: {said}") from None
    if prepared["grid"] is None:
        raise ServingError(f"row {row}: {src}: {prepared['row']['reason']}")
    return prepared["grid"]


class EncoderModel(PythonModel):
    """E^G(E^H(x)) of a checkpoint: scans (paths) or model-scale volumes to latent features (see the module doc).

    Artifacts: ``checkpoint``, a hagan-clinic checkpoint with E^H and E^G (loaded without the EMA generator, as
    ``encode`` loads it).
    """

    def load_context(self, context: Any) -> None:
        from hagan_clinic.models.hagan import load_checkpoint

        self.device = serving_device()
        self.model = load_checkpoint(checked_checkpoint(context), self.device, ema=False, require=("EH", "EG"))

    # model_input is hinted as a DataFrame, which is what MLflow passes (the loaded pyfunc refuses a plain array: its
    # schema check wants columns); the hint also keeps MLflow from inferring a signature from it. Called directly
    # (unwrap_python_model().predict), the model takes an array (n, S, S, S) as well.
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        """``path`` (n,) str or ``volume`` (n, S, S, S) -> a DataFrame (n, L) of float32 columns z0..z{L-1}."""
        cfg = self.model.config
        if isinstance(model_input, np.ndarray):
            grids = model_scale_volumes(model_input, cfg.model.size)
            return self._features(grids)
        frame = _frame(model_input, "a DataFrame with a 'path' column (or a 'volume' column)")
        by_path, by_volume = _present(frame, "path"), _present(frame, "volume")
        if by_path == by_volume:
            raise ServingError(
                "give one of the columns 'path' (a DICOM series folder or NIfTI file per row) or 'volume' "
                f"(arrays on the model's scale), not {'both' if by_path else 'neither'}"
            )
        if by_volume:
            return self._features(model_scale_volumes(frame["volume"].tolist(), cfg.model.size))
        paths = frame["path"].tolist()
        if len(paths) > MAX_PATHS:
            raise ServingError(
                f"{len(paths)} paths: at most {MAX_PATHS} per request (hagan-clinic encode reads cohorts)"
            )
        # read a batch, encode it, then the next: a request holds at most one batch of grids in memory
        step, parts = cfg.encode.batch_size, []
        for start in range(0, len(paths), step):
            grids = [series_grid(p, start + i, cfg) for i, p in enumerate(paths[start : start + step])]
            parts.append(self._features(grids, first=start))
        return pd.concat(parts, ignore_index=True)

    def _features(self, grids: list[np.ndarray], first: int = 0) -> pd.DataFrame:
        """The features of model grids, in batches of ``encode.batch_size`` with ``encode``'s batch function."""
        from hagan_clinic.pipelines.encode import NON_FINITE_FEATURES, encode_batch

        cfg = self.model.config
        step, latent = cfg.encode.batch_size, cfg.model.latent_dim
        z = np.zeros((0, latent), np.float32)
        for start in range(0, len(grids), step):
            z = np.concatenate([z, encode_batch(self.model, grids[start : start + step], self.device, "fp32")])
        bad = np.flatnonzero(~np.isfinite(z).all(axis=1))
        if bad.size:
            raise ServingError(f"row {first + int(bad[0])}: {NON_FINITE_FEATURES}")
        return pd.DataFrame(z.astype(np.float32), columns=[f"z{i}" for i in range(latent)])


# ---------------------------------------------------------------- the generator
class GeneratorModel(PythonModel):
    """G of a checkpoint (its EMA weights when it has them, as ``generate`` loads it): seeds to volumes.

    Artifacts: ``checkpoint``, a hagan-clinic checkpoint with G.
    """

    def load_context(self, context: Any) -> None:
        from hagan_clinic.models.hagan import load_checkpoint

        self.device = serving_device()
        self.model = load_checkpoint(checked_checkpoint(context), self.device)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict | None = None) -> np.ndarray:
        """``seed`` (n,), optional ``index`` (n,) and ``label`` (n,) -> volumes (n, S, S, S) float32 in [-1, 1]:
        row i is sample ``index`` of ``hagan-clinic generate --seed SEED`` (before its conversion to HU), with
        ``label`` for a conditional model (default: the classes in turn, as generate does)."""
        import torch

        from hagan_clinic.sampling import sample_latent

        cfg = self.model.config
        size, classes = cfg.model.size, cfg.model.num_classes
        frame = _frame(model_input, "a DataFrame with a 'seed' column")
        if not _present(frame, "seed"):
            raise ServingError("give a 'seed' column (one volume per row; optional 'index' and 'label')")
        n = len(frame)
        if size > MAX_ARRAY_SIZE or n > MAX_VOLUMES:
            raise ServingError(
                f"{n} volume(s) of {size}^3: at most {MAX_VOLUMES} volumes of up to {MAX_ARRAY_SIZE}^3 are returned "
                "per request; hagan-clinic generate writes more, and larger ones, to files"
            )
        seeds = _whole_numbers(frame, "seed", 0, 2**32 - 1)
        index = _whole_numbers(frame, "index", 0, 2**31 - 1) if _present(frame, "index") else [0] * n
        labels: list[int | None]
        if _present(frame, "label"):
            if classes == 0:
                raise ServingError("this model is unconditional: leave out the 'label' column")
            labels = list(_whole_numbers(frame, "label", 0, classes - 1))
        else:  # the class generate gives sample ``index`` (classes in turn), not this row's place in the request
            labels = [i % classes if classes else None for i in index]
        volumes = []
        for seed, i, label in zip(seeds, index, labels):
            z = sample_latent(seed, i, cfg.model.latent_dim)
            lab = None if label is None else torch.tensor([label])
            volumes.append(self.model.generate(z, lab)[0, 0].float().cpu().numpy())
        return np.stack(volumes).astype(np.float32) if volumes else np.zeros((0, size, size, size), np.float32)
