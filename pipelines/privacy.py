"""Pseudonyms, keyed digests, and keeping file names and paths out of the free text a cohort run writes.

Readers name the file they fail on ("IM0005.dcm: pixel data cannot be decoded") and other libraries' messages
carry absolute paths; in a clinical archive those names are often the patient's. Reasons and notes therefore pass
through :class:`Scrubber`: without a salt it only makes paths relative to the source; with a salt every file name,
folder name and path of the series (and any absolute path at all) becomes ``file-<keyed hash>``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable
from pathlib import Path

from hagan_clinic.errors import one_line
from hagan_clinic.io.cohort import SeriesRecord
from hagan_clinic.tracking import hide_credentials

SCRUBBED = ("reason", "notes", "qct_warning", "warning")  # the free-text columns of the reports
_PATH_CHARS = r"[^\s'\"`(),;]*"  # a path's characters up to a space, quote, bracket or list separator
_ABSOLUTE = re.compile(rf"(?<![\w.~-])(?:/|[A-Za-z]:\\){_PATH_CHARS}")  # a POSIX or Windows absolute path
_SUFFIXES = (".nii.gz", ".nii", ".dcm", ".ima", ".npy")


def _bytes(text: str) -> bytes:
    """UTF-8, with the undecodable bytes that command lines pass as surrogates (surrogateescape) given back."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate no command line produces
        return text.encode("utf-8", "surrogatepass")


def keyed(salt: str | None, value: str) -> str:
    """HMAC-SHA256 (hex) of ``value`` keyed with ``salt``; its plain SHA-256 without a salt."""
    if salt is None:
        return hashlib.sha256(_bytes(value)).hexdigest()
    return hmac.new(_bytes(salt), _bytes(value), hashlib.sha256).hexdigest()


def pseudonym(salt: str, value: str) -> str:
    """A salted hash standing in for an identifier: same salt and value, same pseudonym; empty stays empty."""
    if value in ("", None):
        return ""
    return keyed(salt, str(value))[:20]


def series_names(paths: Iterable[Path], folder: str, root: Path) -> set[str]:
    """Every string that names a series' files: their paths as given and relative to ``root``, their file names
    with and without suffix, the folders between, and the series' ``folder`` (the report's ``source``)."""
    names: set[str] = set()
    rels = [folder.split(" (+")[0]]  # "a/b (+2 folders)" names two folders; the count is no name
    for path in paths:
        path = Path(path)
        names |= {str(path), str(path.absolute()), path.name, _stem(path.name)}
        if path.absolute().is_relative_to(root.absolute()):
            rels.append(str(path.absolute().relative_to(root.absolute())))
    for rel in rels:
        names |= {rel, *Path(rel).parts}
    return {n for n in names if len(n) > 1 and n not in (".", "..")}


def _stem(name: str) -> str:
    lower = name.lower()
    return next((name[: -len(s)] for s in _SUFFIXES if lower.endswith(s)), name)


class Scrubber:
    """Takes the names of a cohort's files out of free text (see the module)."""

    def __init__(self, root: Path, salt: str | None) -> None:
        root = Path(root)
        root = root.parent if root.is_file() else root  # one file given: names are relative to its folder
        self.root, self.salt = root, salt
        forms = {str(root), str(root.absolute()), str(root.resolve())}
        self._roots = sorted((f.rstrip("/\\") for f in forms if f not in (".", "/")), key=len, reverse=True)

    def alias(self, name: str) -> str:
        return f"file-{keyed(self.salt, name)[:12]}"

    def _aliased(self, match: re.Match) -> str:
        return self.alias(match.group(0)) if len(match.group(0)) > 1 else match.group(0)  # a lone '/' is no path

    def text(self, text: str, names: Iterable[str] = ()) -> str:
        """``text`` with the source root's prefix removed from paths; with a salt, also every one of ``names``
        (whole words only) and every absolute path replaced by its alias."""
        if not text:
            return text
        if self.salt is None:
            for root in self._roots:
                text = text.replace(root + "/", "").replace(root + "\\", "")
            return text
        roots = [r for r in self._roots if r in text]
        if roots:  # a path under the source, whole (its root may hold spaces; its end may be cut off)
            text = re.sub(f"(?:{'|'.join(map(re.escape, roots))})(?:[/\\\\]{_PATH_CHARS})?", self._aliased, text)
        present = sorted((n for n in set(names) if n in text), key=len, reverse=True)
        if present:  # longest first: a path before the folder names inside it
            words = "|".join(map(re.escape, present))
            text = re.sub(rf"(?<![\w.-])(?:{words})(?![\w-]|\.\w)", self._aliased, text)
        # what is left of an absolute path (another file, one cut short by a message's length limit) goes whole
        return _ABSOLUTE.sub(self._aliased, text)

    def names(self, record: SeriesRecord) -> set[str]:
        """The names of a discovered series' files (nothing to hide without a salt)."""
        return series_names(record.paths, record.folder, self.root) if self.salt is not None else set()

    def row(self, row: dict, names: Iterable[str] = ()) -> dict:
        """``row`` with its free-text columns scrubbed and cut to 300 characters (after, so that no name is cut
        into a piece that is no longer recognised)."""
        names = set(names)
        for column in SCRUBBED:
            value = row.get(column)
            if isinstance(value, str) and value:
                row[column] = one_line(self.text(value, names), 300)
        return row


#: Option values that name no file and no person: kept in a pseudonymised command line.
_PLAIN_VALUE = re.compile(r"^(?:[0-9][0-9./]*|fp32|bf16|fp16|cpu|cuda(?::[0-9]+)?|mps|auto|csv|parquet)$")


def command_line(argv: list[str], salt: str | None) -> str:
    """``hagan-clinic`` and ``argv`` (the command and its arguments) for a provenance record. The salt is never
    written; with a salt every other value that is not a plain number or choice (paths, names, config overrides)
    becomes ``<redacted>``. Credentials in a URI are never written."""
    words, hide_next = ["hagan-clinic", *argv[:1]], False
    for word in map(hide_credentials, argv[1:]):  # a --tracking-uri may carry a password
        flag, eq, value = word.partition("=")
        if hide_next or (eq and flag == "--pseudonymize"):
            words.append("<salt>" if hide_next else "--pseudonymize=<salt>")
            hide_next = False
            continue
        if word == "--pseudonymize":
            hide_next = True
            words.append(word)
        elif salt is not None and not word.startswith("-") and not _PLAIN_VALUE.match(word):
            words.append("<redacted>")
        elif salt is not None and eq and word.startswith("-") and not _PLAIN_VALUE.match(value):
            words.append(f"{flag}=<redacted>")
        else:
            words.append(word)
    return " ".join(words)
