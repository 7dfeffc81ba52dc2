"""Every file the project writes goes through here: a temp file beside the target, renamed into place when complete
(so a crash never leaves half a file that a resumed run would trust), with the permissions a plain ``open`` gives.

:func:`atomic_target` is the one atomic writer; :func:`write_text`, :func:`write_json`, :func:`write_rows` and
:func:`write_table` are its common uses. :class:`Outputs` guards what a command may write over.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _umask()


def make_folder(path: str | os.PathLike) -> Path:
    """``path`` as a folder (with its parents); HaganError when it cannot be made (a read-only place, /proc, a file
    in the way): the environment's fault, said in one line."""
    from hagan_clinic.errors import HaganError

    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise HaganError(f"cannot create the folder {path}: {err.strerror or type(err).__name__}") from None
    return path


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename ``tmp`` to ``path`` atomically. ``tempfile.mkstemp`` creates files readable by their owner only;
    a cache or a model shared by a group must keep the usual umask-based mode."""
    os.chmod(tmp, 0o666 & ~UMASK)
    os.replace(tmp, path)


@contextmanager
def atomic_target(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[str]:
    """Yield a temp file name beside ``path``; publish it as ``path`` if the block succeeds, delete it if not.
    A crash never leaves a half-written ``path`` that a resumed run would trust."""
    target = Path(path)
    make_folder(target.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    os.close(fd)
    try:
        yield tmp
        publish(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str, guard: Outputs | None = None) -> None:
    """Write ``text`` atomically (checked and recorded by ``guard`` when given: a command's user-facing outputs)."""
    with guard.target(path) if guard is not None else atomic_target(path) as tmp:
        Path(tmp).write_text(text, newline="")


def write_json(path: str | os.PathLike, obj: object, guard: Outputs | None = None, **kwargs) -> None:
    """``obj`` as JSON (indented, keys sorted unless ``sort_keys=False``), written atomically."""
    import json

    kwargs.setdefault("indent", 2)
    kwargs.setdefault("sort_keys", True)
    write_text(path, json.dumps(obj, **kwargs) + "\n", guard)


def write_rows(path: str | os.PathLike, rows: list[dict], columns: list[str], guard: Outputs | None = None) -> None:
    """A CSV with exactly ``columns`` (missing values empty), written atomically. Text cells that a spreadsheet
    would run as a formula (an ID such as ``=HYPERLINK(...)``) are written with a leading apostrophe."""
    import csv
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: "" if row.get(c) is None else csv_safe(row.get(c)) for c in columns})
    write_text(path, buf.getvalue(), guard)


TABLE_FORMATS = ("csv", "parquet")


def table_format(path: str | os.PathLike, fmt: str | None = None, default: str | None = None) -> str:
    """The format a table is written in, by one rule for every command: ``fmt`` (``--format``) when given; else the
    name's (``.csv`` is CSV, ``.parquet`` or ``.pq`` parquet); else, for a name without a suffix, ``default`` (the
    command's usual format). A name that says the other format than ``fmt``, or any other suffix (``.tsv``,
    ``.txt``) without ``fmt``, is refused: a file whose name says one format and holds another fools every reader."""
    from hagan_clinic.errors import HaganError

    name = Path(path).name.lower()
    said = "csv" if name.endswith(".csv") else "parquet" if name.endswith((".parquet", ".pq")) else None
    suffix = Path(path).suffix or ("." if "." in name else "")  # ".csv" (a hidden file) and "x." have suffixes too
    if fmt is not None and fmt not in TABLE_FORMATS:
        raise HaganError(f"unknown table format '{fmt}' (use csv or parquet)")
    if fmt is not None and said is not None and said != fmt:
        raise HaganError(f"{path}: the name says {said} but --format is {fmt}; give them one format")
    chosen = fmt or said or (default if not suffix else None)
    if chosen is None:
        raise HaganError(f"{path}: name a table .csv or .parquet, or give --format csv|parquet")
    return chosen


PARQUET_MAGIC = b"PAR1"  # a parquet file starts (and ends) with these four bytes


def is_parquet(path: str | os.PathLike) -> bool:
    """Whether the file holds parquet, by its content, whatever its name."""
    with open(path, "rb") as f:
        return f.read(4) == PARQUET_MAGIC


def write_table(
    path: str | os.PathLike,
    table,
    fmt: str | None = None,
    guard: Outputs | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> None:
    """A pandas DataFrame as CSV (spreadsheet-safe text cells, no index) or parquet, written atomically.
    ``provenance`` (JSON-able) goes into a parquet file's key-value metadata (a CSV file has no place for it)."""
    fmt = table_format(path, fmt)
    suffix = ".parquet" if fmt == "parquet" else ".csv"
    with guard.target(path, suffix) if guard is not None else atomic_target(path, suffix) as tmp:
        if fmt == "parquet":
            to_parquet(table, tmp, provenance)
        else:
            csv_safe_frame(table).to_csv(tmp, index=False)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's content (read in 1 MiB blocks): the identity of a checkpoint or a table."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def provenance_path(table: str | os.PathLike) -> Path:
    """The provenance record written beside a table (``<stem>.provenance.json``), for CSV and parquet alike."""
    table = Path(table)
    return table.with_name(f"{table.stem}.provenance.json")


#: The key of a parquet file's key-value metadata that holds what made it (JSON).
PROVENANCE_KEY = "hagan_clinic.provenance"


def to_parquet(table, path: str | os.PathLike, provenance: Mapping[str, Any] | None = None) -> None:
    """Write a DataFrame (no index) to ``path`` as parquet, with ``provenance`` as JSON under PROVENANCE_KEY."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrow = pa.Table.from_pandas(table, preserve_index=False)
    if provenance is not None:
        meta = dict(arrow.schema.metadata or {})
        meta[PROVENANCE_KEY.encode()] = json.dumps(provenance, sort_keys=True, default=str).encode()
        arrow = arrow.replace_schema_metadata(meta)
    pq.write_table(arrow, path)


def read_provenance(path: str | os.PathLike) -> dict | None:
    """The provenance a parquet file was written with (None: it has none, or it is not parquet)."""
    import pyarrow.parquet as pq

    try:
        meta = pq.read_schema(path).metadata or {}
        text = meta.get(PROVENANCE_KEY.encode())
        return None if text is None else json.loads(text)
    except (OSError, ValueError):  # not parquet, or damaged metadata
        return None


# ---------------------------------------------------------------- spreadsheet-safe text cells
#: Spreadsheets execute a cell that starts with one of these (CSV injection); a leading apostrophe makes it text.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def csv_safe(value):
    """``value`` as a CSV cell that no spreadsheet runs as a formula: text starting with = + - @ tab or CR gets a
    leading apostrophe (numbers, such as -1.5, are left as they are)."""
    if isinstance(value, str) and (value.startswith("'") or value.startswith(FORMULA_START) and not _is_number(value)):
        return "'" + value  # a leading apostrophe of the value itself is doubled, so reading back is exact
    return value


def csv_safe_frame(table):
    """A copy of a pandas DataFrame whose text cells pass through :func:`csv_safe`."""
    return _map_text(table.copy(), csv_safe)


def _map_text(table, fn):
    """``table`` with ``fn`` applied to every cell of its text columns (in place; returned)."""
    from pandas.api.types import is_object_dtype, is_string_dtype

    for column in table.columns:
        if is_object_dtype(table[column]) or is_string_dtype(table[column]):
            table[column] = table[column].map(fn)
    return table


def from_csv_cell(value):
    """The inverse of :func:`csv_safe` for tables this tool wrote: an ID ``'=x`` reads back as ``=x``, ``''x`` as
    ``'x``."""
    if isinstance(value, str) and len(value) > 1 and value[0] == "'" and value[1] in "".join(FORMULA_START) + "'":
        return value[1:]
    return value


# ---------------------------------------------------------------- input files that cannot block or flood memory
#: Tables and small JSON files read whole: far above any cohort's manifest or feature table.
MAX_TABLE_BYTES = 2**30


def regular_file(path: str | os.PathLike, what: str, limit: int = MAX_TABLE_BYTES) -> Path:
    """``path`` when it is a regular file (links followed) of at most ``limit`` bytes, else HaganError: a FIFO or
    a link to /dev/zero put where a table is expected would block the reader or fill the memory."""
    import stat

    from hagan_clinic.errors import HaganError

    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise HaganError(f"{what} not found: {path}") from None
    except OSError as err:
        raise HaganError(f"{what} {path} cannot be read ({err.strerror or type(err).__name__})") from None
    if not stat.S_ISREG(st.st_mode):
        raise HaganError(f"{what} {path} is not a regular file (a folder, FIFO or device): not read")
    if st.st_size > limit:
        raise HaganError(f"{what} {path} is {st.st_size / 2**20:.0f} MiB, over the {limit / 2**20:.0f} MiB read")
    return path


def read_csv_table(path: str | os.PathLike, what: str, **kwargs):
    """A CSV table as a pandas DataFrame, read after :func:`regular_file`, with the text cells that :func:`csv_safe`
    neutralised read back as they were (so IDs join). ``kwargs`` go to ``pandas.read_csv``."""
    import pandas as pd

    return _map_text(pd.read_csv(regular_file(path, what), **kwargs), from_csv_cell)


# ---------------------------------------------------------------- outputs that never replace what they should not
LEDGER_NAME = ".hagan-clinic-outputs.json"


def _ledger_path(path: Path) -> Path:
    return path.parent / LEDGER_NAME


def _read_ledger(folder_file: Path) -> dict:
    import json

    try:
        data = json.loads(folder_file.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


class Outputs:
    """The files one command writes, checked before they are written.

    A command never writes over one of its own inputs, nor over an existing file that it did not write itself,
    unless ``overwrite`` is set. What a command wrote is recorded (name, size, modification time) in a small ledger
    beside the file, so that running the same command again may replace its own earlier output, but not a file
    that was put there by anything else, or changed since.
    """

    def __init__(self, command: str, inputs=(), overwrite: bool = False) -> None:
        self.command = command
        self.inputs = [Path(p) for p in inputs if p]
        self.overwrite = overwrite

    def check(self, path: str | os.PathLike) -> None:
        """Raise HaganError when writing ``path`` is not allowed."""
        from hagan_clinic.errors import HaganError

        path = Path(path)
        if not self.overwrite and any(_same_file(path, p) for p in self.inputs):
            raise HaganError(f"{path} is an input of this command; it would be overwritten: write elsewhere")
        if not os.path.lexists(path):
            return
        if path.is_dir() or not path.is_file():
            raise HaganError(f"{path} exists and is not a regular file: write elsewhere")
        if self.overwrite or self._wrote(path):
            return
        raise HaganError(
            f"{path} exists and was not written by hagan-clinic {self.command}: "
            "give another output name, or --overwrite to replace it"
        )

    def _wrote(self, path: Path) -> bool:
        entry = _read_ledger(_ledger_path(path)).get(path.name)
        if not isinstance(entry, dict) or entry.get("command") != self.command:
            return False
        st = path.stat()
        return entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns

    def record(self, path: str | os.PathLike) -> None:
        """Note ``path`` (just written) in its folder's ledger."""
        import json

        path = Path(path)
        ledger = _ledger_path(path)
        entries = _read_ledger(ledger)
        st = path.stat()
        entries[path.name] = {"command": self.command, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        with atomic_target(ledger) as tmp:
            Path(tmp).write_text(json.dumps(entries, indent=1, sort_keys=True) + "\n")

    def adopt(self, path: str | os.PathLike) -> None:
        """Take an existing ``path`` as this command's own output (one its own state shows it wrote, e.g. before
        outputs were recorded, or copied along with that state); an input of the command never is."""
        path = Path(path)
        if path.name in _read_ledger(_ledger_path(path)):  # recorded already: changed since means not ours
            return
        if path.is_file() and not any(_same_file(path, p) for p in self.inputs):
            self.record(path)

    @contextmanager
    def target(self, path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[str]:
        """Like :func:`atomic_target`, after :meth:`check`, and recorded once published."""
        self.check(path)
        with atomic_target(path, suffix) as tmp:
            yield tmp
        self.record(path)

    def write_text(self, path: str | os.PathLike, text: str) -> None:
        with self.target(path) as tmp:
            Path(tmp).write_text(text, newline="")
