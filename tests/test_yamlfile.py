"""Pipeline YAML is read safely: bounded alias expansion, unique keys, UTF-8, no Python tags."""

from __future__ import annotations

import time

import pytest

from qgraph.errors import ConfigError
from qgraph.yamlfile import MAX_NODES, parse_yaml, read_yaml_file


def _bomb(levels: int) -> str:
    anchors = ["&a0 [x, x, x, x, x, x, x, x, x]"]
    anchors += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    return "passes:\n  - normalize:\n      skip: [" + ", ".join(anchors) + "]\n"


def test_an_alias_bomb_is_refused_quickly_wherever_it_sits():
    """Regression: 9 levels of aliases inside a pass parameter hung the tool (34 MB of warnings)."""
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=f"beyond {MAX_NODES} nodes"):
        parse_yaml(_bomb(9), "p.yaml")
    assert time.perf_counter() - start < 1.0
    assert parse_yaml(_bomb(2), "p.yaml")["passes"][0]["normalize"]["skip"][2][0][0] == ["x"] * 9  # small aliases work


def test_repeated_keys_and_recursive_aliases_are_refused():
    with pytest.raises(ConfigError, match="line 3: key 'passes' repeats the key of line 1"):
        parse_yaml("passes: [a]\nseed: 1\npasses: [b]\n", "p.yaml")
    with pytest.raises(ConfigError, match="refers to its own anchor|YAML"):
        parse_yaml("a: &x [*x]\n", "p.yaml")


def test_python_tags_are_never_constructed():
    with pytest.raises(ConfigError, match="could not determine a constructor"):
        parse_yaml("passes: !!python/object/apply:os.system ['false']\n", "p.yaml")


def test_non_utf8_and_deep_nesting_are_one_clear_error(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_bytes("passes: [canonicalize]\n# caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="line 2: not UTF-8"):
        read_yaml_file(path)
    with pytest.raises(ConfigError, match="nested too deeply"):
        parse_yaml("a: " + "[" * 5000 + "]" * 5000, "p.yaml")
