"""Reading the YAML and JSON documents users hand to wb (recipes, configs, ED2 files) safely.

One loader for every such file, so each refusal is one line naming the file and where in it:
- only a regular file of at most MAX_DOCUMENT_BYTES, in UTF-8;
- YAML: plain values only (mappings, lists, strings, numbers, booleans, null). Explicit tags other
  than those of plain values (`!!binary`, `!!set`, `!!timestamp`, `!!python/...`, custom `!x`)
  are refused; dates are not converted (`2024-01-01` stays a string, as in YAML 1.2's core
  schema, so nothing later fails turning it into JSON);
- nesting at most MAX_DEPTH deep; a key given twice in one mapping is refused;
- anchors and aliases are allowed, but the document they expand to is bounded (MAX_VALUES values):
  a "billion laughs" file is refused in milliseconds instead of expanding to gigabytes;
- no NUL character in any string (a path with one cannot be opened).
"""

from __future__ import annotations

import json
import os
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.events import (
    DocumentEndEvent,
    DocumentStartEvent,
    MappingEndEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
    StreamEndEvent,
)
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.resolver import Resolver

from workbench.checkpoint.files import read_text_file
from workbench.errors import WorkbenchError

MAX_DOCUMENT_BYTES = 4 * 1024 * 1024
MAX_DEPTH = 64
MAX_VALUES = 1_000_000  # values in the document once aliases are expanded

Y = "tag:yaml.org,2002:"
PLAIN_TAGS = {Y + t for t in ("str", "int", "float", "bool", "null", "seq", "map", "merge", "value")}

try:  # the C scanner and parser, with wb's composer (depth, alias bound) on top
    from yaml._yaml import CParser as _Parser
except ImportError:  # pragma: no cover - libyaml is part of every PyYAML wheel
    from yaml.parser import Parser
    from yaml.reader import Reader
    from yaml.scanner import Scanner

    class _Parser(Reader, Scanner, Parser):  # type: ignore[no-redef]
        def __init__(self, stream):
            Reader.__init__(self, stream)
            Scanner.__init__(self)
            Parser.__init__(self)


class _Refused(Exception):
    def __init__(self, message: str, node: Node | None = None):
        super().__init__(message)
        self.line = node.start_mark.line + 1 if node is not None and node.start_mark else None


class _Resolver(Resolver):
    pass


# YAML 1.1's implicit resolvers, without timestamps: a date stays the string it was written as.
_Resolver.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != Y + "timestamp"]
    for first, resolvers in Resolver.yaml_implicit_resolvers.items()
}


class _Composer(Composer):
    def compose_document(self):
        self._depth = 0
        return super().compose_document()

    def compose_node(self, parent, index):
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(f"nested deeper than {MAX_DEPTH} levels", self.peek_event())
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class _Constructor(SafeConstructor):
    def construct_object(self, node, deep=False):
        if node.tag not in PLAIN_TAGS:
            raise _Refused(f"tag {node.tag.replace(Y, '!!')} is not allowed (plain values only)", node)
        try:
            return super().construct_object(node, deep)
        except (ValueError, KeyError, TypeError, OverflowError):
            if not isinstance(node, ScalarNode):
                raise
            tag = node.tag.replace(Y, "!!")
            raise _Refused(f"{node.value!r} cannot be read as {tag}", node) from None

    def construct_mapping(self, node, deep=False):
        if isinstance(node, MappingNode):
            self.flatten_mapping(node)
            seen = set()
            for key_node, _ in node.value:
                if isinstance(key_node, ScalarNode):
                    if key_node.value in seen:
                        raise _Refused(f"key {key_node.value!r} is given twice", key_node)
                    seen.add(key_node.value)
        return super().construct_mapping(node, deep)

    def construct_yaml_str(self, node):
        value = super().construct_yaml_str(node)
        if "\x00" in value:
            raise _Refused("a NUL character in a value", node)
        return value


_Constructor.add_constructor(Y + "str", _Constructor.construct_yaml_str)


class _Loader(_Composer, _Parser, _Constructor, _Resolver):
    def __init__(self, stream):
        _Parser.__init__(self, stream)
        _Composer.__init__(self)
        _Constructor.__init__(self)
        _Resolver.__init__(self)


def _expanded_size(root: Node) -> int:
    """How many values the node graph holds once every alias is expanded (memoised per node, so
    the count itself is fast whatever the expansion)."""
    sizes: dict[int, int] = {}
    order: list[Node] = []
    stack = [root]
    while stack:  # iterative post-order: no recursion whatever the shape
        node = stack.pop()
        if id(node) in sizes:
            continue
        sizes[id(node)] = -1
        order.append(node)
        if isinstance(node, SequenceNode):
            stack.extend(node.value)
        elif isinstance(node, MappingNode):
            for k, v in node.value:
                stack.extend((k, v))
    for node in reversed(order):
        n = 1
        if isinstance(node, SequenceNode):
            n += sum(sizes[id(c)] for c in node.value)
        elif isinstance(node, MappingNode):
            n += sum(sizes[id(k)] + sizes[id(v)] for k, v in node.value)
        sizes[id(node)] = min(n, MAX_VALUES + 1)
    return sizes[id(root)]


_UNSURE = object()
_SCALARS = _Constructor.yaml_constructors
_PLAIN_SCALARS = {Y + t for t in ("str", "int", "float", "bool", "null")}


def _plain_document(text: str) -> Any:
    """The document in one pass over the C parser's events, for the common case of plain values:
    no anchor, alias or explicit tag, no merge key, no key given twice, no NUL, not too deep or
    large. Each scalar is resolved and constructed exactly as the full loader does. Anything else
    (errors included) gives _UNSURE, and the full loader reads the text: it has the last word on
    every refusal. A 1,500-step recipe reads in about a third of the full loader's time (its
    node graph and per-node calls in Python are what the fast path skips)."""
    parser = _Parser(text)
    resolve = _Resolver().resolve
    constructor = _Constructor()
    try:
        get = parser.get_event
        get()  # StreamStart
        event = get()
        if type(event) is StreamEndEvent:
            return None
        if type(event) is not DocumentStartEvent:
            return _UNSURE
        # Open collections: [value, is_mapping, pending key (mappings), raw keys seen (mappings)].
        stack: list[list] = []
        scalars: dict[tuple, tuple] = {}  # (text, implicit) -> (value,): recipes repeat their scalars
        done = _UNSURE
        count = 0
        while True:
            event = get()
            kind = type(event)
            if kind is ScalarEvent:
                if event.anchor is not None or event.tag is not None or len(stack) >= MAX_DEPTH:
                    return _UNSURE
                raw = event.value
                seen = scalars.get((raw, event.implicit))
                if seen is None:  # resolved and constructed once per distinct scalar
                    tag = resolve(ScalarNode, raw, event.implicit)
                    if tag not in _PLAIN_SCALARS or "\x00" in raw:
                        return _UNSURE
                    value = raw if tag == Y + "str" else _SCALARS[tag](constructor, ScalarNode(tag, raw))
                    scalars[(raw, event.implicit)] = (value,)
                else:
                    value = seen[0]
            elif kind is MappingStartEvent or kind is SequenceStartEvent:
                if event.anchor is not None or event.tag is not None or len(stack) >= MAX_DEPTH:
                    return _UNSURE
                count += 1
                mapping = kind is MappingStartEvent
                stack.append([{} if mapping else [], mapping, _UNSURE, set()])
                continue
            elif kind is MappingEndEvent or kind is SequenceEndEvent:
                value = stack.pop()[0]
                raw = None
            elif kind is DocumentEndEvent:
                break
            else:  # an alias, or anything unexpected
                return _UNSURE
            count += 1
            if not stack:
                done = value
                continue
            top = stack[-1]
            if not top[1]:
                top[0].append(value)
            elif top[2] is _UNSURE:  # a key: a scalar given once
                if raw is None or raw in top[3]:
                    return _UNSURE
                top[3].add(raw)
                top[2] = value
            else:
                top[0][top[2]] = value
                top[2] = _UNSURE
        if type(get()) is not StreamEndEvent or count > MAX_VALUES:
            return _UNSURE  # a second document, or too many values: the full loader says which
        return done
    except (yaml.YAMLError, ValueError, TypeError, OverflowError, RecursionError):
        return _UNSURE
    finally:
        parser.dispose()


def parse_yaml(text: str, where: str) -> Any:
    """Parse YAML text under the rules above; errors are one line naming `where` and the line."""
    plain = _plain_document(text)
    if plain is not _UNSURE:
        return plain
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node) > MAX_VALUES:
            raise _Refused(f"anchors and aliases expand to over {MAX_VALUES:,} values", node)
        return loader.construct_document(node)
    except _Refused as e:
        line = f" (line {e.line})" if e.line else ""
        raise WorkbenchError(f"{where}{line}: {e}") from None
    except ConstructorError as e:
        raise WorkbenchError(f"{where}{_line(e)}: {_problem(e)}") from None
    except yaml.YAMLError as e:
        raise WorkbenchError(f"{where}: not valid YAML{_line(e)}: {_problem(e)}") from None
    except (ValueError, TypeError, OverflowError) as e:  # e.g. !!float half, an unhashable key
        raise WorkbenchError(f"{where}: a value cannot be read ({e})") from None
    except RecursionError:
        raise WorkbenchError(f"{where}: nested too deep") from None
    finally:
        loader.dispose()


def _line(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    return f" (line {mark.line + 1})" if mark is not None else ""


def _problem(e: yaml.YAMLError) -> str:
    return str(getattr(e, "problem", None) or getattr(e, "context", None) or type(e).__name__)


def load_yaml_file(path: str | os.PathLike, what: str = "recipe") -> Any:
    """A YAML file as plain values; refuses a non-regular, oversized, non-UTF-8 or hostile file."""
    text = read_text_file(path, what, MAX_DOCUMENT_BYTES)
    return parse_yaml(text, f"{what} {path}" if what else str(path))


class _DuplicateKey(ValueError):
    pass


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_pairs)
    except _DuplicateKey as e:
        raise WorkbenchError(f"{where}: key {str(e)!r} is given twice") from None
    except json.JSONDecodeError as e:
        raise WorkbenchError(f"{where}: not valid JSON ({e.msg}, line {e.lineno})") from None
    except RecursionError:
        raise WorkbenchError(f"{where}: nested too deep") from None
    except ValueError as e:  # an integer longer than Python's digit limit
        raise WorkbenchError(f"{where}: not valid JSON ({str(e).splitlines()[0]})") from None


def load_json_file(path: str | os.PathLike, what: str = "file") -> Any:
    """A JSON file (regular, bounded, UTF-8, no duplicate keys), one line per refusal."""
    text = read_text_file(path, what, MAX_DOCUMENT_BYTES)
    return parse_json(text, f"{what} {path}" if what else str(path))
