"""Atomic writes for everything qgraph outputs besides models (reports, JSON, npz)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from qgraph.errors import QGraphError


def check_output_path(path: str | os.PathLike, input_path: str | os.PathLike | None = None) -> Path:
    """Fail early (before any work) if `path` is the input or its folder is missing/unwritable."""
    path = Path(path)
    if input_path is not None:
        src = Path(input_path)
        if path.resolve() == src.resolve() or (path.exists() and src.exists() and path.samefile(src)):
            raise QGraphError(f"{path}: output path is the input file; choose another -o path")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise QGraphError(f"{path}: output directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise QGraphError(f"{path}: output directory {parent} is not writable; choose another -o path")
    return path


def atomic_write_bytes(path: str | os.PathLike, payload: bytes) -> Path:
    path = check_output_path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".", prefix=f".{path.name}.")
    except OSError as exc:
        raise QGraphError(f"{path}: cannot write ({exc.strerror or exc}); choose another path") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json(path: str | os.PathLike, value) -> Path:
    return atomic_write_bytes(path, (json.dumps(value, indent=2, default=_jsonable) + "\n").encode())


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
