"""YAML for config files and command-line overrides: plain data only, or a one-line UserError.

PyYAML's safe loader still accepts what a config cannot use and what later code trips over:

- aliases (`*a`) that refer to a node rather than copy it, so 400 bytes of nested aliases stand for billions of
  values, which any copy or validation expands (a "billion laughs" file); an alias may also refer to the
  node that holds it (a cycle);
- nesting thousands of levels deep, which overflows the recursive composer (and every later copy);
- a second `train:` at the same level, which silently replaces the first (YAML says keys are unique,
  PyYAML keeps the last);
- dates, `!!binary` and `!!set`, which are not JSON-like data.

`load_yaml` composes the node graph (with a depth limit), checks it (size with every alias expanded,
depth, cycles, duplicate keys, tags) and only then builds Python objects. An unquoted date is kept as the
text it was written as: `output_dir: 2024-01-01` is a folder name, not a date.
"""
from __future__ import annotations

from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from ..errors import UserError

# A config is a handful of sections a few levels deep (train.trainer_args.lr_scheduler_kwargs.x is 4);
# anything much deeper is a mistake or an attack, and would overflow the composer's recursion.
MAX_DEPTH = 32
# Values in the config with every alias expanded. The largest real configs (seed lists, blocklists) hold
# hundreds; a nested-alias bomb holds billions.
MAX_VALUES = 100_000

_MERGE = "tag:yaml.org,2002:merge"
_STR = "tag:yaml.org,2002:str"
_TIMESTAMP = "tag:yaml.org,2002:timestamp"
_REFUSED_TAGS = {
    "tag:yaml.org,2002:binary": "binary data (!!binary) is not a config value; write it as text",
    "tag:yaml.org,2002:set": "a set (!!set) is not a config value; write a list",
}


class _Loader(yaml.SafeLoader):
    """The safe loader, composing with a depth limit and without the implicit date type."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise _TooDeep(mark.line + 1)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


# An unquoted 2024-01-01 stays text: remove the implicit timestamp resolver from this loader's own table (the
# class attribute is copied, SafeLoader's is untouched).
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _TIMESTAMP]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _timestamp_as_text(loader: _Loader, node: ScalarNode) -> str:
    return str(loader.construct_scalar(node))


# An explicit !!timestamp is kept as its text too.
_Loader.add_constructor(_TIMESTAMP, _timestamp_as_text)


class YamlSyntaxError(UserError):
    """Text that is not YAML at all (an override falls back to taking it as a string)."""


class _TooDeep(Exception):
    def __init__(self, line: int) -> None:
        self.line = line


def printable(text: str, limit: int = 80) -> str:
    """`text` for an error line: control characters (a newline in a key, a NUL) escaped as Python writes them,
    cut to `limit` characters, so a message stays one line."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[:limit] + "..."


def _where(node: Node) -> str:
    return f"line {node.start_mark.line + 1}"


def _check_graph(root: Node, source: str) -> None:
    """Refuse what the node graph must not hold, before any Python object is built: cycles, nesting over
    MAX_DEPTH or more than MAX_VALUES values once aliases (and `<<` merges) are expanded, duplicate keys,
    refused tags. Each node is visited once (aliases share nodes), so this is linear in the file."""
    sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (values with aliases expanded, depth)
    open_nodes: set[int] = set()

    def visit(node: Node) -> tuple[int, int]:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise UserError(f"{source} {_where(node)}: an alias refers to the value that holds it (a cycle); "
                            "write the value out")
        if node.tag in _REFUSED_TAGS:
            raise UserError(f"{source} {_where(node)}: {_REFUSED_TAGS[node.tag]}")
        open_nodes.add(key)
        count, depth = 1, 0
        if isinstance(node, SequenceNode):
            children = node.value
        elif isinstance(node, MappingNode):
            _check_duplicate_keys(node, source)
            children = [n for pair in node.value for n in pair]
        else:
            children = []
        for child in children:
            c, d = visit(child)
            count, depth = count + c, max(depth, d + 1)
            if count > MAX_VALUES:
                raise UserError(f"{source} {_where(node)}: with its aliases (*name) expanded the config holds more "
                                f"than {MAX_VALUES} values; write the values out instead of nesting aliases")
            if depth > MAX_DEPTH:
                raise UserError(f"{source} {_where(node)}: nested more than {MAX_DEPTH} levels deep (with aliases "
                                "expanded); a config is a few levels of sections")
        open_nodes.discard(key)
        sizes[key] = (count, depth)
        return count, depth

    visit(root)


def _check_duplicate_keys(node: MappingNode, source: str) -> None:
    seen: dict[tuple[str, str], int] = {}
    for key_node, _ in node.value:
        if key_node.tag == _MERGE:
            continue  # a `<<` merge may give keys again: the mapping's own keys win, as YAML says
        if not isinstance(key_node, ScalarNode) or key_node.tag != _STR:
            what = (f"the key '{printable(key_node.value)}'" if isinstance(key_node, ScalarNode)
                    else "a list or mapping as a key")
            raise UserError(f"{source} {_where(key_node)}: {what} is not a name; config keys are "
                            "names (quote it if it must be a number, true/false or null)")
        line, key = key_node.start_mark.line + 1, (key_node.tag, key_node.value)
        if key in seen:
            raise UserError(f"{source} line {line}: duplicate key '{printable(key_node.value)}' (first at line "
                            f"{seen[key]}); the second would silently replace the first: merge them into one")
        seen[key] = line


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's error on one line: where, what, and the construct it was reading."""
    if not isinstance(e, yaml.MarkedYAMLError):
        return " ".join(str(e).split())
    text = ""
    if e.problem_mark is not None:
        text = f"line {e.problem_mark.line + 1}, column {e.problem_mark.column + 1}: "
    text += e.problem or e.context or "unreadable"
    if e.context and e.problem:
        text += f" ({e.context}" + (f" at line {e.context_mark.line + 1}" if e.context_mark is not None else "") + ")"
    return text


def load_yaml(text: str, source: str) -> Any:
    """The plain data (dict, list, str, int, float, bool, None) in `text`; `source` names the file or the
    override in errors."""
    loader = None
    try:
        loader = _Loader(text)  # reads (and checks) the characters at once
        root = loader.get_single_node()
        if root is None:
            return None
        _check_graph(root, source)
        return loader.construct_document(root)
    except _TooDeep as e:
        raise UserError(f"{source} line {e.line}: nested more than {MAX_DEPTH} levels deep; a config is a few "
                        "levels of sections") from None
    except yaml.reader.ReaderError as e:  # a control character YAML does not allow (NUL, ESC ...)
        line = text[: e.position].count("\n") + 1
        raise YamlSyntaxError(f"{source} line {line}: not valid YAML: the character U+{e.character:04X} is not "
                              "allowed in YAML text (write it escaped inside double quotes, e.g. \"\\x1b\")") from None
    except yaml.YAMLError as e:
        raise YamlSyntaxError(f"{source}: not valid YAML: {_yaml_problem(e)}") from None
    finally:
        if loader is not None:
            loader.dispose()
