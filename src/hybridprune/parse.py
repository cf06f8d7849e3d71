"""Reading the JSON and YAML files a user hands us, with bounds on size and nesting.

Python's JSON and YAML parsers recurse once per nesting level, so a file nested a few thousand levels deep
(`[[[[...]]]]`) ends in a RecursionError traceback, and a file of gigabytes ends in memory exhaustion. Every
file hybridprune reads (latency tables, experiment files, checkpoint headers, results, store rows, manifests,
quantization reports) goes through here and is refused in one line when it breaks a bound. No file we write
comes near them: the deepest nests 6 levels, the largest (a latency table) holds about 100 bytes an entry.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from hybridprune.errors import HybridPruneError

MAX_DEPTH = 64  # nesting levels of arrays and objects (mappings and sequences in YAML)
MAX_JSON_BYTES = 256 * 2**20  # a latency table of two million entries
MAX_YAML_BYTES = 2**20  # an experiment file is a page of settings
MAX_YAML_NODES = 100_000  # scalars, sequences and mappings composed, aliases counted each time they are used

_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_NOT_A_BRACKET = re.compile(r"[^\[\]{}]+")


def json_depth(text: str) -> int:
    """How deep arrays and objects nest in JSON text (brackets inside strings do not count), found without
    recursing, so any depth can be measured.

    Example:
        >>> json_depth('{"a": [1, [2, "[[["]]}'), json_depth("3")
        (3, 0)
    """
    brackets = _NOT_A_BRACKET.sub("", _JSON_STRING.sub('""', text))
    depth = deepest = 0
    for char in brackets:
        depth += 1 if char in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def loads_json(text: str | bytes, where: str, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Parse JSON text from `where` (a file, a header, a store row), refusing what breaks the bounds in one line.

    Example:
        >>> loads_json('{"a": [1, 2]}', "demo.json")
        {'a': [1, 2]}
        >>> loads_json("[" * 100 + "]" * 100, "deep.json")
        Traceback (most recent call last):
        ...
        hybridprune.errors.HybridPruneError: deep.json nests 100 levels deep; hybridprune reads at most 64
    """
    if len(text) > max_bytes:
        raise HybridPruneError(f"{where} holds {len(text):,} bytes of JSON; hybridprune reads at most {max_bytes:,}")
    if isinstance(text, bytes):
        try:
            text = text.decode()
        except UnicodeDecodeError as e:
            raise HybridPruneError(f"{where} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    depth = json_depth(text)
    if depth > MAX_DEPTH:
        raise HybridPruneError(f"{where} nests {depth} levels deep; hybridprune reads at most {MAX_DEPTH}")
    try:
        return json.loads(text)
    except ValueError as e:
        raise HybridPruneError(f"{where} is not readable JSON ({e})") from None


def read_json(path: str | Path, what: str = "file", max_bytes: int = MAX_JSON_BYTES) -> Any:
    """The JSON value in a file, with the bounds of `loads_json`; `what` names the file in messages.

    Example:
        >>> tmp = getfixture("tmp_path")
        >>> _ = (tmp / "t.json").write_text('{"format": "x"}')
        >>> read_json(tmp / "t.json", "latency table")
        {'format': 'x'}
    """
    path = Path(path)
    _check_size(path, what, max_bytes)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise HybridPruneError(f"{what} {path} does not exist") from None
    except OSError as e:
        raise HybridPruneError(f"{what} {path} cannot be read ({e.strerror or e})") from None
    return loads_json(raw, f"{what} {path}", max_bytes)


def read_yaml(path: str | Path, what: str = "file", max_bytes: int = MAX_YAML_BYTES) -> Any:
    """The YAML value in a file (safe types only), refusing in one line a file too large, nested deeper than
    `MAX_DEPTH` or composed of more than `MAX_YAML_NODES` nodes.

    Example:
        >>> tmp = getfixture("tmp_path")
        >>> _ = (tmp / "grid.yaml").write_text("metrics: [l1, hybrid]\\nseeds: [0]\\n")
        >>> read_yaml(tmp / "grid.yaml", "experiment config")
        {'metrics': ['l1', 'hybrid'], 'seeds': [0]}
    """
    path = Path(path)
    _check_size(path, what, max_bytes)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise HybridPruneError(f"{what} {path} cannot be read as text ({e})") from None
    loader = _BoundedLoader(text, f"{what} {path}")
    try:
        return loader.get_single_data()
    except yaml.YAMLError as e:
        raise HybridPruneError(f"{what} {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    finally:
        loader.dispose()


def _check_size(path: Path, what: str, max_bytes: int) -> None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise HybridPruneError(f"{what} {path} does not exist") from None
    except OSError as e:
        raise HybridPruneError(f"{what} {path} cannot be read ({e.strerror or e})") from None
    if size > max_bytes:
        raise HybridPruneError(f"{what} {path} is {size:,} bytes; hybridprune reads at most {max_bytes:,}")


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that bounds nesting and size while composing: the composer is the part that recurses. An alias
    (`*a` repeating `&a`) counts as every node of what it repeats, so a few lines of aliases of aliases cannot
    stand for billions of values."""

    def __init__(self, stream: str, where: str) -> None:
        super().__init__(stream)
        self.where, self.depth, self.nodes = where, 0, 0
        self.sizes: dict[int, int] = {}  # id of an anchored node -> nodes it stands for

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            node = super().compose_node(parent, index)
            self._count(self.sizes.get(id(node), 1))
            return node
        start = self.nodes
        self._count(1)
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise HybridPruneError(f"{self.where} nests deeper than {MAX_DEPTH} levels; hybridprune reads at most that")
        try:
            node = super().compose_node(parent, index)
        finally:
            self.depth -= 1
        self.sizes[id(node)] = self.nodes - start
        return node

    def _count(self, nodes: int) -> None:
        self.nodes += nodes
        if self.nodes > MAX_YAML_NODES:
            raise HybridPruneError(
                f"{self.where} stands for more than {MAX_YAML_NODES:,} values (aliases counted in full); "
                "hybridprune reads at most that"
            )
