"""Dependency direction, checked on the source: passes sit on top of the core, never under it.

- no module outside qgraph/passes imports a pass (the registry in qgraph.pipeline discovers
  them by importing the package, never a pass module by name);
- no pass imports another pass (what two passes share lives in the core: idioms, quant, ...);
- the reference interpreter imports neither passes nor lowering (it is the independent oracle).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "qgraph"


def _imports(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, module) of every import in a file of `package`, relative imports resolved."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def upward_imports(path: Path, name: str) -> list[str]:
    """The imports of module `name` (at `path`) that break the rules of the module docstring."""
    package = name.rsplit(".", 1)[0]
    own_pass = name.split(".")[2] if name.startswith("qgraph.passes.") else None
    bad = []
    for line, module in _imports(path, package):
        if _is_pass_module(module) and module.split(".")[2] != own_pass:
            bad.append(f"line {line}: {module}")
        if name.startswith("qgraph.interp") and module.startswith(("qgraph.lowering", "qgraph.passes")):
            bad.append(f"line {line}: {module}")
    return sorted(set(bad))


def _is_pass_module(module: str) -> bool:
    return module.startswith("qgraph.passes.") and module.count(".") >= 2


def _modules():
    return sorted(p for p in ROOT.rglob("*.py") if "__pycache__" not in p.parts)


def _name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)


@pytest.mark.parametrize("path", _modules(), ids=_name)
def test_imports_point_down(path):
    bad = upward_imports(path, _name(path))
    assert not bad, f"{_name(path)} imports upward: {bad}"


def test_the_check_finds_violations(tmp_path):
    fake = tmp_path / "fake.py"
    fake.write_text("from qgraph.passes.canonicalize import name_nodes\nfrom ..passes import insert_qdq\n"
                    "from qgraph.lowering import lower_model\nimport qgraph.passes\n")
    assert upward_imports(fake, "qgraph.lowering.fake") == ["line 1: qgraph.passes.canonicalize",
                                                           "line 1: qgraph.passes.canonicalize.name_nodes",
                                                           "line 2: qgraph.passes.insert_qdq"]
    assert len(upward_imports(fake, "qgraph.interp.fake")) == 7   # the lowering imports too
    assert upward_imports(fake, "qgraph.passes.canonicalize") == ["line 2: qgraph.passes.insert_qdq"]
