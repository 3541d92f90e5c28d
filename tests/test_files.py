"""qgraph.files: outputs never alias inputs, appear whole or not at all, with ordinary modes."""

from __future__ import annotations

import os
import stat

import pytest

import qgraph.files as files
from qgraph.errors import QGraphError
from qgraph.files import check_input_file, check_outputs, write_files


def test_an_output_is_refused_when_it_is_an_input_by_any_spelling(tmp_path):
    source = tmp_path / "model.onnx"
    source.write_bytes(b"model")
    os.symlink(source, tmp_path / "link.onnx")
    os.link(source, tmp_path / "hard.onnx")
    for alias in (source, tmp_path / "link.onnx", tmp_path / "hard.onnx", tmp_path / "sub" / ".." / "model.onnx"):
        (tmp_path / "sub").mkdir(exist_ok=True)
        with pytest.raises(QGraphError, match="would overwrite the model file"):
            check_outputs({"-o": alias}, {"model": source})
    with pytest.raises(QGraphError, match="-o and --report name the same file"):
        check_outputs({"-o": tmp_path / "a.onnx", "--report": tmp_path / "a.onnx"})
    assert source.read_bytes() == b"model"


def test_special_files_are_neither_read_nor_written(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(QGraphError, match="FIFO"):
        check_input_file(tmp_path / "pipe", "data")       # opening it would block
    with pytest.raises(QGraphError, match="FIFO"):
        check_outputs({"-o": tmp_path / "pipe"})
    with pytest.raises(QGraphError, match="is a folder"):
        check_outputs({"-o": tmp_path})


def test_write_files_is_all_or_nothing(tmp_path, monkeypatch):
    """Regression: out.onnx stayed behind when writing --report failed."""
    (tmp_path / "old.json").write_text("previous report")
    stage = files._stage
    calls = []

    def failing_stage(path, payload):
        calls.append(path)
        if len(calls) == 2:
            raise files.FileError(f"{path}: cannot write (no space left on the device)")
        return stage(path, payload)

    monkeypatch.setattr(files, "_stage", failing_stage)
    with pytest.raises(QGraphError, match="no space left"):
        write_files({tmp_path / "out.onnx": b"model", tmp_path / "old.json": b"new report"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.json"]
    assert (tmp_path / "old.json").read_text() == "previous report"


def test_a_staged_output_has_no_name_until_it_is_committed(tmp_path):
    """An unnamed O_TMPFILE: a kill -9 before the rename leaves no hidden file behind."""
    staged = files._stage(tmp_path / "out.onnx", b"x" * 1000)
    try:
        if staged.temp_name is not None:
            pytest.skip("this file system has no O_TMPFILE; the hidden temporary file is the fallback")
        assert os.listdir(tmp_path) == []
    finally:
        staged.commit()
    assert (tmp_path / "out.onnx").read_bytes() == b"x" * 1000
    assert os.listdir(tmp_path) == ["out.onnx"]


def test_replacing_an_existing_output_is_atomic_and_leaves_no_temporary(tmp_path):
    (tmp_path / "out.onnx").write_bytes(b"old")
    write_files({tmp_path / "out.onnx": b"new"})
    assert (tmp_path / "out.onnx").read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["out.onnx"]


def test_new_files_get_the_mode_the_umask_gives(tmp_path):
    """Regression: exported .npz, history.json and progress.json were created 0600 under umask 022."""
    old = os.umask(0o022)
    try:
        write_files({tmp_path / "a.json": b"{}"})
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a.json").st_mode) == 0o644


def test_a_folder_that_refuses_files_fails_before_any_work():
    with pytest.raises(QGraphError, match="cannot write in /proc"):
        check_outputs({"-o": "/proc/qgraph-out.onnx"})
