"""Read a YAML document that a hostile user may have written, with limits on what it can cost.

``yaml.safe_load`` alone accepts a duplicated key (the last one silently wins), recurses once per
nesting level (3,000 nested ``[`` end in a RecursionError), lets aliases expand a small file into
billions of nodes, and hands a 5,000-digit integer to ``int()`` (a ValueError past Python's
4,300-digit limit). Here the composer, which sees every node once, with its position and the
path of keys above it, refuses each of those with an :class:`YamlInputError` that names the line
and the field. Construction then runs on a tree known to be small, acyclic and shallow.

libyaml's parser (``yaml._yaml.CParser``) does the scanning when it is installed; the composer
stays the Python one, because that is where the limits live (libyaml's own composer recurses in C
and has no depth limit).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.error import Mark
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, Node, ScalarNode
from yaml.resolver import Resolver

__all__ = ["FAST", "MAX_DEPTH", "MAX_INT_CHARS", "MAX_NODES", "YamlInputError", "field_path", "load"]

MAX_DEPTH = 64  # a topology needs about 6 levels
MAX_NODES = 1_000_000  # after alias expansion; a 1,000-pod topology has about 15,000
MAX_INT_CHARS = 32  # ports and counts need 5 digits
_INT_TAG = "tag:yaml.org,2002:int"
_MERGE_TAG = "tag:yaml.org,2002:merge"


class YamlInputError(Exception):
    """A document the reader refuses: ``field`` (dotted path) and ``mark`` say where."""

    def __init__(self, problem: str, field: str, mark: Mark | None) -> None:
        super().__init__(problem)
        self.problem, self.field, self.mark = problem, field, mark


def field_path(parts: Iterable[int | str]) -> str:
    """``("pods", 0, "ports")`` -> ``pods[0].ports``; keys that are not printable are quoted."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            text = part if part.isprintable() else repr(part)
            out += ("." if out else "") + (text if len(text) <= 60 else text[:60] + "..")
    return out


class _LimitedComposer(Composer):
    """Composer with a depth limit, an expansion budget, no duplicate keys and no huge integers."""

    if TYPE_CHECKING:  # the parser half of the loader (yaml.Parser or libyaml's CParser)
        def peek_event(self) -> Any: ...
        def check_event(self, *choices: Any) -> bool: ...

    def _init_limits(self) -> None:
        self._path: list[int | str] = []
        self._depth = 0
        self._expanded = 0  # nodes composed so far, an alias counting as the whole tree it names
        self._sizes: dict[int, int] = {}  # id(node) -> its expanded size, once it is complete
        self._paths: dict[int, tuple[int | str, ...]] = {}  # id(node) -> where it stands, for errors

    def _fail(self, problem: str, mark: Mark | None, path: list[int | str] | None = None) -> YamlInputError:
        return YamlInputError(problem, field_path(self._path if path is None else path), mark)

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        # index: a sequence position, the key node of a mapping value, None for a key or the root
        part = index if isinstance(index, int) else (
            index.value if isinstance(index, ScalarNode) else None if index is None else "?")
        if part is not None:
            self._path.append(part)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise self._fail(f"nested deeper than {MAX_DEPTH} levels", self.peek_event().start_mark,
                                 self._path[:4] + ["..."])
            start = self._expanded
            if self.check_event(AliasEvent):
                mark = self.peek_event().start_mark
                node = super().compose_node(parent, index)
                assert node is not None  # an alias names a node composed before (or raises)
                size = self._sizes.get(id(node))
                if size is None:
                    raise self._fail("an alias refers to a node that contains it", mark)
                self._expanded += size
            else:
                self._expanded += 1
                node = super().compose_node(parent, index)
                assert node is not None  # None only for an empty stream, never below the root
                self._sizes[id(node)] = self._expanded - start
                self._paths[id(node)] = tuple(self._path)
                if isinstance(node, ScalarNode) and node.tag == _INT_TAG and len(node.value) > MAX_INT_CHARS:
                    raise self._fail(f"integer of {len(node.value)} characters is too long (at most {MAX_INT_CHARS})",
                                     node.start_mark)
            if self._expanded > MAX_NODES:
                raise self._fail(f"more than {MAX_NODES} values once aliases are expanded", node.start_mark)
            return node
        finally:
            self._depth -= 1
            if part is not None:
                self._path.pop()

    def compose_mapping_node(self, anchor: Any) -> MappingNode:
        node: MappingNode = super().compose_mapping_node(anchor)
        first: dict[tuple[str, str], Mark] = {}
        for key, _ in node.value:
            if not isinstance(key, ScalarNode) or key.tag == _MERGE_TAG:
                continue
            at = first.setdefault((key.tag, key.value), key.start_mark)
            if at is not key.start_mark:
                raise self._fail(f"duplicate key (first at line {at.line + 1})", key.start_mark, [*self._path, key.value])
        return node

    def construct_object(self, node: Node, deep: bool = False) -> Any:
        """A value the constructor cannot build (``2001-13-45`` as a timestamp) is one error
        naming the field, not a ValueError from deep inside PyYAML."""
        try:
            return super().construct_object(node, deep)  # type: ignore[misc]
        except (ValueError, ArithmeticError) as e:
            if isinstance(e, YamlInputError):
                raise
            raise YamlInputError(f"cannot read this value: {e}", field_path(self._paths.get(id(node), ())),
                                 node.start_mark) from None


class _PureLoader(_LimitedComposer, yaml.SafeLoader):
    def __init__(self, stream: str) -> None:
        yaml.SafeLoader.__init__(self, stream)
        self._init_limits()


_Loader: type[Any] = _PureLoader
FAST = False
try:
    from yaml._yaml import CParser

    class _FastLoader(_LimitedComposer, CParser, SafeConstructor, Resolver):
        def __init__(self, stream: str) -> None:
            CParser.__init__(self, stream)
            Composer.__init__(self)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)
            self._init_limits()

    _Loader, FAST = _FastLoader, True
except ImportError:  # PyYAML built without libyaml
    pass


def load(text: str, *, fast: bool | None = None) -> Any:
    """The one document in ``text`` as Python objects. Raises :class:`YamlInputError` for what
    the limits refuse and ``yaml.YAMLError`` for what is not YAML. ``fast=False`` forces the pure
    Python scanner (tests run both)."""
    cls = _PureLoader if fast is False else _Loader
    loader = cls(text)
    try:
        node = loader.get_single_node()
        return None if node is None else loader.construct_document(node)
    finally:
        loader.dispose()
