"""Reading recipe YAML and plan JSON written by hand: bounded in size, depth and expansion.

A recipe or a plan is small (a few kB; a plan of a 70B model some hundred kB), so anything far
larger, nested far deeper or expanding far wider than that is refused with one clear error
before it can take minutes, exhaust the stack or the memory:

- the file's size is checked before it is read (and no more than the limit is ever read);
- the bytes must be UTF-8;
- YAML: nesting deeper than `YAML_MAX_DEPTH` levels or more than `YAML_MAX_NODES` nodes are
  refused while the document is composed, and a document whose node graph, with every alias
  expanded, holds more than `YAML_MAX_NODES` nodes (a "billion laughs" alias bomb) or refers to
  itself is refused before any Python object is built; a mapping may not repeat a key; a value Python cannot represent (a timestamp like
  2001-13-45, an integer of thousands of digits) is an error at its line;
- JSON: nesting deeper than `JSON_MAX_DEPTH` levels and repeated keys are refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, ScalarNode, SequenceNode

from compressor.errors import CompressorError, one_line, shorten

# A shipped recipe is about 2 kB and 4 levels deep.
RECIPE_MAX_BYTES = 256 * 1024
YAML_MAX_DEPTH = 32
YAML_MAX_NODES = 50_000
# A plan of an 80-layer model with every section is a few hundred kB and 6 levels deep.
PLAN_MAX_BYTES = 16 * 1024 * 1024
JSON_MAX_DEPTH = 64

MERGE_TAG = "tag:yaml.org,2002:merge"


def read_text(path: str | Path, what: str, limit: int) -> str:
    """The UTF-8 text of a regular file of at most `limit` bytes (a byte-order mark is dropped)."""
    path = Path(path)
    if not path.is_file():
        raise CompressorError(f"{what} not found: {path}")
    try:
        size = path.stat().st_size
        if size > limit:
            raise CompressorError(f"{path}: {size} bytes, more than the {limit} bytes a {what} may have")
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)  # the file may have grown since stat()
    except OSError as exc:
        raise CompressorError(f"{path}: cannot read the {what}: {one_line(exc.strerror or exc)}") from None
    if len(data) > limit:
        raise CompressorError(f"{path}: more than the {limit} bytes a {what} may have")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CompressorError(f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                              f"a {what} must be UTF-8") from None


# --- YAML ---------------------------------------------------------------------------------------

class _Refused(yaml.MarkedYAMLError):
    """A document over one of the limits (reported with its position)."""


class BoundedSafeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses nesting deeper than `max_depth` and more than `max_nodes` nodes
    while composing, repeated keys, and values Python cannot represent (as errors with their line)."""

    max_depth = YAML_MAX_DEPTH
    max_nodes = YAML_MAX_NODES

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = self._nodes = 0

    def compose_node(self, parent, index):
        if not self.check_event(yaml.AliasEvent):
            if self._depth >= self.max_depth:
                raise _Refused(None, None, f"nested more than {self.max_depth} levels deep",
                               self.peek_event().start_mark)
            self._nodes += 1  # stop composing a document that is too large already, aliases aside
            if self._nodes > self.max_nodes:
                raise _Refused(None, None, f"more than {self.max_nodes} values", self.peek_event().start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError, TypeError) as exc:
            value = f" {shorten(node.value, 40)}" if isinstance(node, ScalarNode) else ""
            raise ConstructorError(None, None, f"cannot read the value{value}: {one_line(exc, 120)}",
                                   node.start_mark) from None

    def construct_mapping(self, node, deep=False):
        if isinstance(node, MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == MERGE_TAG or not isinstance(key_node, ScalarNode):
                    continue
                key = self.construct_object(key_node)
                if key in seen:
                    raise ConstructorError("while constructing a mapping", node.start_mark,
                                           f"found the key {shorten(key, 40)} twice", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


def _children(node):
    if isinstance(node, SequenceNode):
        return node.value
    if isinstance(node, MappingNode):
        return [item for pair in node.value for item in pair]
    return ()


def check_node_graph(root, max_nodes: int = YAML_MAX_NODES, max_depth: int = YAML_MAX_DEPTH) -> None:
    """Refuses a composed document that, with its aliases expanded, holds more than `max_nodes`
    nodes or is deeper than `max_depth`, or that contains itself. Each node is visited once (the
    sizes of shared subgraphs are memoized), so an alias bomb costs no more than its text."""
    sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (nodes with aliases expanded, height)
    active: set[int] = set()

    def visit(node, level: int) -> tuple[int, int]:
        key = id(node)
        if key in active:
            raise _Refused(None, None, "an alias refers to a node that contains it (a recursive structure)",
                           node.start_mark)
        known = sizes.get(key)
        if known is None:
            if level > max_depth:
                raise _Refused(None, None, f"nested more than {max_depth} levels deep (aliases expanded)",
                               node.start_mark)
            active.add(key)
            count, height = 1, 1
            for child in _children(node):
                child_count, child_height = visit(child, level + 1)
                count += child_count
                height = max(height, child_height + 1)
                if count > max_nodes:
                    break
            active.discard(key)
            known = sizes[key] = (count, height)
        if known[0] > max_nodes:
            raise _Refused(None, None, f"more than {max_nodes} values once its aliases are expanded",
                           node.start_mark)
        if level + known[1] - 1 > max_depth:
            raise _Refused(None, None, f"nested more than {max_depth} levels deep (aliases expanded)",
                           node.start_mark)
        return known

    visit(root, 1)


def _yaml_error(exc: yaml.YAMLError, where: str) -> CompressorError:
    if isinstance(exc, yaml.reader.ReaderError):
        character = f"#x{exc.character:04x}" if isinstance(exc.character, int) else shorten(exc.character, 20)
        return CompressorError(f"{where}: malformed YAML at character {exc.position}: "
                               f"unacceptable character {character} ({exc.reason})")
    mark = getattr(exc, "problem_mark", None)
    at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    if context and problem.startswith("but "):  # "expected a single document ... but found another document"
        problem = f"{context} {problem}"
    problem = one_line(problem, 160)
    if isinstance(exc, _Refused):
        return CompressorError(f"{where}: YAML refused{at}: {problem}")
    return CompressorError(f"{where}: malformed YAML{at}: {problem}")


def load_yaml(text: str, where: str, max_nodes: int = YAML_MAX_NODES, max_depth: int = YAML_MAX_DEPTH):
    """One YAML document as Python data (None for an empty document), within the limits."""
    loader = None
    try:
        loader = BoundedSafeLoader(text)  # the reader refuses control characters here already
        loader.max_depth, loader.max_nodes = max_depth, max_nodes
        node = loader.get_single_node()
        if node is None:
            return None
        check_node_graph(node, max_nodes, max_depth)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, where) from None
    except (ValueError, OverflowError, TypeError, RecursionError) as exc:
        raise CompressorError(f"{where}: malformed YAML: {one_line(exc, 160)}") from None
    finally:
        if loader is not None:
            loader.dispose()


def read_yaml(path: str | Path, what: str, limit: int = RECIPE_MAX_BYTES):
    return load_yaml(read_text(path, what, limit), str(path))


# --- JSON ---------------------------------------------------------------------------------------

def _pairs_without_repeats(pairs):
    result = {}
    for key, value in pairs:
        if key in result:
            raise _RepeatedKey(key)
        result[key] = value
    return result


class _RepeatedKey(Exception):
    pass


def json_depth_exceeds(data, limit: int) -> bool:
    """True when `data` (parsed JSON) nests containers more than `limit` levels deep (no recursion)."""
    stack = [(data, 1)]
    while stack:
        value, level = stack.pop()
        if isinstance(value, dict):
            children = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        if level > limit:
            return True
        stack.extend((child, level + 1) for child in children if isinstance(child, (dict, list)))
    return False


def load_json(text: str, where: str, max_depth: int = JSON_MAX_DEPTH):
    """JSON text as Python data; repeated keys and nesting deeper than `max_depth` are refused."""
    try:
        data = json.loads(text, object_pairs_hook=_pairs_without_repeats)
    except json.JSONDecodeError as exc:
        raise CompressorError(f"{where}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    except _RepeatedKey as exc:
        raise CompressorError(f"{where}: an object repeats the key {shorten(exc.args[0], 40)}; "
                              "each key may appear once") from None
    except RecursionError:
        raise CompressorError(f"{where}: JSON nested more than {max_depth} levels deep") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise CompressorError(f"{where}: not valid JSON ({one_line(exc, 160)})") from None
    if json_depth_exceeds(data, max_depth):
        raise CompressorError(f"{where}: JSON nested more than {max_depth} levels deep")
    return data


def read_json(path: str | Path, what: str, limit: int = PLAN_MAX_BYTES, max_depth: int = JSON_MAX_DEPTH):
    return load_json(read_text(path, what, limit), str(path), max_depth)
