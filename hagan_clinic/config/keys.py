"""The config's keys as a table, generated from the models: the README's key table is this output, and a test
keeps it so. ``python -m hagan_clinic.config --markdown`` prints it."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel

from ..errors import short_repr
from . import Config, ConfigError

#: The sections of the README's key table (the others are documented beside their commands: docs/training.md, ...).
README_SECTIONS = ("seed", "device", "model", "data", "encode", "regress", "evaluate")


def _cell(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_cell(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def config_keys(sections: Iterable[str] | None = None) -> list[tuple[str, Any, str]]:
    """Every key of :class:`Config` as (dotted key, default, description), nested sections walked, in the models'
    order; ``sections``: only these top-level names (a section or a top-level key such as ``seed``)."""
    rows: list[tuple[str, Any, str]] = []

    def walk(section: BaseModel, prefix: str) -> None:
        for name, info in type(section).model_fields.items():
            value = getattr(section, name)
            if isinstance(value, BaseModel):
                walk(value, f"{prefix}{name}.")
            else:
                rows.append((prefix + name, value, info.description or ""))

    default = Config()
    for name in sections or Config.model_fields:
        if name not in Config.model_fields:
            raise ConfigError(f"no config section '{short_repr(name)}'")
        value = getattr(default, name)
        if isinstance(value, BaseModel):
            walk(value, f"{name}.")
        else:
            rows.append((name, value, Config.model_fields[name].description or ""))
    return rows


def markdown_table(sections: Iterable[str] | None = README_SECTIONS) -> str:
    """The config keys of ``sections`` (None: all) as a Markdown table: key, default, meaning (no final newline)."""

    def escape(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| key | default | meaning |", "|---|---|---|"]
    lines += [f"| `{k}` | `{escape(_cell(v))}` | {escape(d)} |" for k, v, d in config_keys(sections)]
    return "\n".join(lines)
