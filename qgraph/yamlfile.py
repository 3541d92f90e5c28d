"""Reading YAML that users write (pipelines), safely.

PyYAML's safe loader already refuses `!!python` tags. On top of it: the text must be UTF-8;
aliases may not expand the document beyond `MAX_NODES` nodes (a "billion laughs" document of
a few hundred bytes would otherwise expand to gigabytes), recursive aliases and nesting
deeper than Python's stack are refused, and a mapping may not repeat a key (YAML says keys
are unique; PyYAML would silently keep the last one).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from qgraph.errors import ConfigError
from qgraph.files import check_input_file

MAX_NODES = 100_000


def read_yaml_file(path: str | Path, what: str = "pipeline"):
    """The parsed document of a YAML file (see `parse_yaml`)."""
    path = check_input_file(path, what, ConfigError)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the {what} file ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}: line {line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); "
                          f"save the {what} file as UTF-8") from None
    return parse_yaml(text, str(path))


def parse_yaml(text: str, source: str = "yaml"):
    """Parse one YAML document with the checks of the module docstring; ConfigError names the line."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_tree(node, source)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f" line {mark.line + 1}:" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        kind = "YAML error" if isinstance(exc, yaml.constructor.ConstructorError) else "YAML syntax error"
        raise ConfigError(f"{source}:{where} {kind}: {problem}") from None
    except RecursionError:
        raise ConfigError(f"{source}: the YAML document is nested too deeply") from None
    finally:
        loader.dispose()


def _check_tree(root: yaml.Node, source: str) -> None:
    """Count the nodes of the expanded document without expanding it (aliases share node
    objects: each node's expanded size is computed once), and find repeated keys."""
    size: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            on_path.discard(key)
            size[key] = 1 + sum(size[id(c)] for c in _children(node))
            if size[key] > MAX_NODES:
                raise ConfigError(f"{source}: line {node.start_mark.line + 1}: aliases expand the document beyond "
                                  f"{MAX_NODES} nodes; write the values out instead of nesting aliases")
            continue
        if key in size:
            continue
        if key in on_path:
            raise ConfigError(f"{source}: line {node.start_mark.line + 1}: an alias refers to its own anchor")
        on_path.add(key)
        if isinstance(node, yaml.MappingNode):
            _check_unique_keys(node, source)
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node) if id(child) not in size)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [item for pair in node.value for item in pair]
    return []


def _check_unique_keys(node: yaml.MappingNode, source: str) -> None:
    seen: dict[tuple, int] = {}
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            continue
        key = (key_node.tag, key_node.value)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise ConfigError(f"{source}: line {line}: key '{key_node.value}' repeats the key of line {seen[key]}; "
                              "keep one")
        seen[key] = line
