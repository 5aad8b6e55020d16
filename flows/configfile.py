"""Config text read strictly, remembering where every key came from.

``yaml.safe_load`` is too forgiving for a file that steers a night's run: two ``train:`` blocks
keep the second and drop the first without a word, ``.inf`` and ``.nan`` are floats like any
other, an alias expanded a billion times (``&a [x, x]``, ``&b [*a, *a]``, ...) exhausts memory
before any check runs, and a byte that is not UTF-8 is a ``UnicodeDecodeError`` traceback.
:func:`parse_yaml` walks the node graph PyYAML composes before anything is constructed, refuses
each of these in one line with the file's line number, and records the line of every key, so
that an error pydantic finds later names the line (or the ``--set``) that set the value::

    configs/run.yaml:7: duplicate key 'train' (first at line 2): YAML keeps only the last; merge the two
    --set train.lr=inf: 'train.lr': Input should be a finite number, got 'inf'
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from data.errors import UserError

KeyPath = tuple[str, ...]
MAX_VALUES = 100_000  # a config holds hundreds; an alias bomb, millions
MAX_DEPTH = 64
MERGE_TAG = "tag:yaml.org,2002:merge"
FLOAT_TAG = "tag:yaml.org,2002:float"
_ORDER = itertools.count()  # later settings win, so "which came last" is a global order


class ConfigError(UserError):
    """A user mistake in a config file or override; its message is one line."""


@dataclass(frozen=True)
class Origin:
    """Where one key was set: ``where`` is ``file.yaml:LINE`` or ``--set key=value``."""

    where: str
    override: bool
    order: int = field(default_factory=lambda: next(_ORDER))


@dataclass
class Origins:
    """Where each key path of a config was set (files and overrides), to name it in errors."""

    by_path: dict[KeyPath, Origin] = field(default_factory=dict)

    def note(self, path: KeyPath, where: str, override: bool = False) -> None:
        self.by_path[path] = Origin(where, override)

    def forget_below(self, path: KeyPath) -> None:
        """Drop what was recorded under ``path`` (its value was replaced)."""
        for key in [k for k in self.by_path if len(k) > len(path) and k[: len(path)] == path]:
            del self.by_path[key]

    def update(self, top: Origins) -> None:
        self.by_path.update(top.by_path)

    def of(self, loc: KeyPath, default: str) -> str:
        """Who set the value at ``loc`` an error points to: the last override at or under it
        (a section's own check fails because of something set inside it), else the file line
        of ``loc`` or of the nearest section around it, else ``default``."""
        under = [o for p, o in self.by_path.items() if o.override and p[: len(loc)] == loc]
        if under:
            return max(under, key=lambda o: o.order).where
        for n in range(len(loc), 0, -1):
            if (origin := self.by_path.get(loc[:n])) is not None:
                return origin.where
        return default


def read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> tuple[dict[str, Any], Origins]:
    """A config file as a dict, its ``base:`` file (relative to it) merged underneath, and
    where each key was set.

    ``base:`` lets a method's config (``configs/on_policy.yaml``) say only how it differs from
    the default recipe, so tuning ``tiny.yaml`` tunes every mode.
    """
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'base:' files include each other")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        data, lines = parse_yaml(decode_utf8(raw, str(path)), str(path), show_lines=True)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({first_line(exc)})") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    origins = Origins()
    for key_path, line in lines.items():
        origins.note(key_path, f"{path}:{line}")
    base = data.pop("base", None)
    if base is None:
        return data, origins
    if not isinstance(base, str):
        raise ConfigError(f"{path}:{lines[('base',)]}: 'base' must be a file name, got {base!r}")
    below, below_origins = read_yaml(path.parent / base, (*seen, path.resolve()))
    below_origins.update(origins)
    return deep_merge(below, data), below_origins


def decode_utf8(raw: bytes, name: str) -> str:
    """``raw`` as text; a byte that is not UTF-8 is named by line and byte offset."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            f"{name}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
            f"{exc.start}): save the file as UTF-8"
        ) from None


def parse_yaml(
    text: str, name: str, prefix: KeyPath = (), show_lines: bool = False
) -> tuple[Any, dict[KeyPath, int]]:
    """YAML ``text`` as plain data and the line of each mapping key (its path from ``prefix``).

    Raises :class:`ConfigError` (naming ``name``) for a duplicate key, a non-finite number, a
    recursive alias, more than :data:`MAX_VALUES` values once aliases are expanded or nesting
    deeper than :data:`MAX_DEPTH`; ``yaml.YAMLError`` for text that is not YAML at all.
    """
    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:
            raise ConfigError(f"{name}: nested more than {MAX_DEPTH} levels deep") from None
        if node is None:
            return None, {}
        walk = _Walk(loader, name if show_lines else None, name)
        walk.visit(node, prefix, 0, frozenset())
        return loader.construct_document(node), walk.lines
    finally:
        loader.dispose()


@dataclass
class _Walk:
    """One pass over the composed nodes, aliases followed, before anything is constructed."""

    loader: yaml.SafeLoader
    file: str | None  # a file's name (messages carry its line numbers), None for a --set
    name: str
    lines: dict[KeyPath, int] = field(default_factory=dict)
    count: int = 0

    def where(self, node: Node) -> str:
        return self.name if self.file is None else f"{self.file}:{node.start_mark.line + 1}"

    def visit(self, node: Node, path: KeyPath, depth: int, holders: frozenset[int]) -> None:
        self.count += 1
        if self.count > MAX_VALUES:
            raise ConfigError(
                f"{self.name}: more than {MAX_VALUES} values once aliases are expanded "
                "(an alias that repeats an alias?)"
            )
        if depth > MAX_DEPTH:
            raise ConfigError(f"{self.where(node)}: nested more than {MAX_DEPTH} levels deep")
        if id(node) in holders:
            raise ConfigError(f"{self.where(node)}: an alias refers to a value that contains it")
        if isinstance(node, ScalarNode):
            self.scalar(node, path)
        elif isinstance(node, SequenceNode):
            for item in node.value:
                self.visit(item, path, depth + 1, holders | {id(node)})
        elif isinstance(node, MappingNode):
            self.mapping(node, path, depth, holders | {id(node)})

    def scalar(self, node: ScalarNode, path: KeyPath) -> None:
        if node.tag != FLOAT_TAG:
            return
        value = self.loader.construct_object(node)
        if isinstance(value, float) and not math.isfinite(value):
            key = ".".join(path) or "(top level)"
            raise ConfigError(
                f"{self.where(node)}: '{key}': {node.value} is not a finite number "
                "(infinity and NaN are refused everywhere in a config)"
            )

    def mapping(self, node: MappingNode, path: KeyPath, depth: int, holders: frozenset) -> None:
        first: dict[Any, int] = {}
        # `<<: *defaults` first: the keys written here then record their own lines over them.
        for key_node, value_node in sorted(node.value, key=lambda kv: kv[0].tag != MERGE_TAG):
            if key_node.tag == MERGE_TAG:  # `<<: *defaults`: its keys lose to the explicit ones
                self.visit(value_node, path, depth + 1, holders)
                continue
            if not isinstance(key_node, ScalarNode):
                continue  # a list or mapping as a key: construction refuses it (not hashable)
            key = self.loader.construct_object(key_node)
            line = key_node.start_mark.line + 1
            child = (*path, str(key))
            if key in first:
                also = f"first at line {first[key]}" if self.file else "given twice"
                raise ConfigError(
                    f"{self.where(key_node)}: duplicate key '{'.'.join(child)}' ({also}): "
                    "YAML keeps only the last; merge the two"
                )
            first[key] = line
            self.lines[child] = line
            self.visit(value_node, child, depth + 1, holders)


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``, section by section (a scalar or list in ``top`` replaces)."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
