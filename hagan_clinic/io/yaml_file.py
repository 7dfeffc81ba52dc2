"""Reading YAML config files within bounds: size, values after alias expansion, nesting, and chains of ``extends``.

A config file may name a parent with ``extends: other.yaml`` (relative to the file; an absolute name replaces the
folder); :func:`read_yaml` merges the child's keys over the parent's, mapping by mapping. Every refusal is a
:class:`YamlFileError` with a one-line message naming the file; what the values mean is the config's business
(:mod:`hagan_clinic.config`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from ..errors import HaganError, one_line, short_repr

#: Bounds on what reading a config may cost. A small YAML file can expand through aliases to gigabytes (the
#: "billion laughs"), so the composed node graph is measured before anything is built from it.
MAX_CONFIG_BYTES = 1 << 20
MAX_YAML_VALUES = 100_000
MAX_EXTENDS_DEPTH = 16


class YamlFileError(HaganError):
    """A YAML file or text that cannot be read within the bounds, with a one-line message."""


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader with the cost of aliases bounded.

    An alias makes the composed node graph share a node instead of copying it, so a few hundred bytes can stand for
    billions of values that only blow up later (validation, error messages, dumping). Before anything is
    constructed, the values the document stands for are counted with aliases expanded (each shared node is counted
    once per use, at the cost of one visit) and a document over MAX_YAML_VALUES is refused.
    """

    aliases = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
        return super().compose_node(parent, index)

    def compose_document(self) -> yaml.Node | None:
        node = super().compose_document()
        if node is not None and _expanded_size(node, {}, set()) > MAX_YAML_VALUES:
            if self.aliases:
                raise YamlFileError(f"too many YAML aliases: they expand to over {MAX_YAML_VALUES} values (the limit)")
            raise YamlFileError(f"too many YAML values: over {MAX_YAML_VALUES} (the limit)")
        return node


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """Values under ``node`` with every alias expanded, counted up to just past MAX_YAML_VALUES (the walk stops
    there); raises YamlFileError on an alias inside the node it names (a cycle)."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:
        raise YamlFileError("a YAML alias refers to a node that contains it")
    open_nodes.add(key)
    children: list[yaml.Node] = []
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    size = 1
    for child in children:
        size += _expanded_size(child, sizes, open_nodes)
        if size > MAX_YAML_VALUES:
            break
    open_nodes.discard(key)
    sizes[key] = size
    return size


def parse_yaml(text: str) -> Any:
    """YAML text to plain Python values (never objects); raises yaml.YAMLError on bad syntax and YamlFileError
    (naming no source) on a document too large, too deep or with numbers too long to read."""
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # a SafeLoader: plain data only, never objects
    except RecursionError:
        raise YamlFileError("YAML nested too deeply") from None
    except ValueError as err:  # e.g. an integer of more digits than Python converts
        if isinstance(err, YamlFileError):
            raise
        raise YamlFileError(f"a YAML value cannot be read ({one_line(err, 80)})") from None


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` merged into a copy of ``base``: mappings present in both are merged key by key, anything else in
    ``over`` replaces what ``base`` holds."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _read_text(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as err:
        raise YamlFileError(f"{path.name}: cannot read ({err.strerror})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise YamlFileError(f"{path.name}: larger than {MAX_CONFIG_BYTES >> 20} MiB; a config file is a few kB of text")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = "\0"
    if "\0" in text:
        raise YamlFileError(f"{path.name}: not a text YAML file")
    return text


def read_yaml(path: str | Path, seen: tuple[Path, ...] = (), shipped: Path | None = None) -> dict[str, Any]:
    """The mapping a YAML config file holds, its ``extends`` chain followed and merged (the key itself removed).

    ``extends`` names a file relative to the config's folder; where there is none, ``shipped`` (a folder of
    configs that come with the package) is looked in, by file name or by bare name (``extends: tiny``), so that a
    user's config can build on a shipped one wherever the package is installed. ``seen``: the files already open in
    this chain (for loops and depth). Raises YamlFileError, naming the file, on a file too large, not text, not
    valid YAML, not a mapping, or an ``extends`` that is no file or loops.
    """
    path = Path(path).resolve()
    if path in seen:
        raise YamlFileError(f"{path.name}: 'extends' loops back to itself")
    if len(seen) >= MAX_EXTENDS_DEPTH:
        raise YamlFileError(f"{path.name}: more than {MAX_EXTENDS_DEPTH} files in one chain of 'extends'")
    text = _read_text(path)
    try:
        data = parse_yaml(text) or {}
    except yaml.YAMLError as err:
        raise YamlFileError(f"{path.name}: not valid YAML ({one_line(str(err).splitlines()[0], 120)})") from None
    except YamlFileError as err:
        raise YamlFileError(f"{path.name}: {err}") from None
    if not isinstance(data, dict):
        raise YamlFileError(f"{path.name}: top level must be a mapping of sections")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str) or not parent.strip():
        raise YamlFileError(f"{path.name}: extends must be a config file name, got {short_repr(parent)}")
    parent = parent.strip()
    candidates = [path.parent / parent]  # an absolute name replaces the folder
    if shipped is not None and "/" not in parent and "\\" not in parent:
        candidates += [shipped / parent, shipped / f"{parent}.yaml"]
    # a file never extends itself: a local tiny.yaml that says "extends: tiny.yaml" builds on the shipped one
    found = [c for c in candidates if _is_file(c)]
    parent_path = next((c for c in found if c.resolve() != path), None)
    if parent_path is None and found:  # only the file itself: no shipped config of that name either
        raise YamlFileError(f"{path.name}: 'extends' loops back to itself")
    if parent_path is None:
        where = " (beside the config, nor a shipped config)" if shipped is not None else ""
        raise YamlFileError(f"{path.name}: extends {short_repr(parent)}, which is not a file{where}")
    return deep_merge(read_yaml(parent_path, (*seen, path), shipped), data)


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name too long for the file system, or with a NUL byte
        return False
