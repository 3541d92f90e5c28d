"""The training work folder: checkpoints, artifacts and progress of one `qgraph train` run.

A work folder holds only what qgraph put there. A marker file says a folder is one; a
folder that exists, is not empty and has no marker is refused, so cleaning up old
checkpoints can never touch a user's files (and only names qgraph writes are ever removed).
A lock (``flock`` on a file inside, released by the kernel even after kill -9) refuses a
second concurrent run on the same folder. When a run fails, what it created and cannot
resume from is removed again; completed checkpoints stay for `--resume`.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import stat
from pathlib import Path

from qgraph.errors import TrainError
from qgraph.files import is_inside, path_mode, same_file

MARKER = ".qgraph-workdir"
LOCK = ".qgraph-lock"
PROGRESS_FILE = "progress.json"
ARTIFACTS = "artifacts"
HISTORY = "history.json"
_CHECKPOINT = re.compile(r"^epoch(\d+)\.(ckpt|velocity\.npz|best\.npz)$")


class Workdir:
    """An opened, locked work folder. Use as a context manager: `with Workdir.open(...) as wd:`."""

    def __init__(self, path: Path, created: Path | None, lock_fd: int, entries_before: set[str]):
        self.path, self.created, self._lock_fd = path, created, lock_fd   # created: the top folder made
        self._entries_before = entries_before

    @classmethod
    def open(cls, path: str | os.PathLike, reads: dict[str, str | os.PathLike | None] = {},  # noqa: B006
             writes: dict[str, str | os.PathLike | None] = {}) -> "Workdir":  # noqa: B006
        """Create or adopt `path` and lock it; TrainError when it is a file, holds foreign files,
        is one of the `reads`/`writes`, contains an output, or is in use by another run."""
        path = Path(path)
        label = "--workdir"
        for name, other in {**reads, **writes}.items():
            if other is not None and same_file(path, other):
                raise TrainError(f"{path}: {label} is the {name} file; give a folder of its own")
        for name, other in writes.items():
            if other is not None and is_inside(other, path):
                raise TrainError(f"{other}: {name} lies inside the work folder {path}; write it elsewhere")
        mode = path_mode(path, label, TrainError)
        if mode is not None and not stat.S_ISDIR(mode):
            raise TrainError(f"{path}: {label} exists and is not a folder; give a folder path")
        created = None
        if mode is None:
            created = _topmost_missing(path)
            try:
                path.mkdir(parents=True)
            except OSError as exc:
                if created.exists():
                    shutil.rmtree(created, ignore_errors=True)
                raise TrainError(f"{path}: cannot create the work folder ({exc.strerror or exc}); "
                                 "choose another --workdir") from None
        try:
            before = set(os.listdir(path))
            entries = sorted(before - {LOCK})
            if entries and MARKER not in entries:
                raise TrainError(f"{path}: the work folder holds files qgraph did not create ({entries[0]}, ...); "
                                 "give a new or empty folder as --workdir")
            lock_fd = _lock(path)
            if MARKER not in entries:
                (path / MARKER).write_text(json.dumps({"created_by": "qgraph train"}) + "\n")
        except BaseException:
            if created:
                shutil.rmtree(created, ignore_errors=True)
            raise
        return cls(path, created, lock_fd, before)

    def __enter__(self) -> "Workdir":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None:
                self._clean_after_failure()
        finally:
            os.close(self._lock_fd)

    def completed_checkpoint(self) -> str | None:
        """The checkpoint file `progress.json` points at, if both exist."""
        progress = self.path / PROGRESS_FILE
        if not progress.is_file():
            return None
        try:
            name = json.loads(progress.read_text()).get("checkpoint")
        except (OSError, ValueError, AttributeError):
            return None
        return name if isinstance(name, str) and (self.path / name).exists() else None

    def remove_stale_checkpoints(self, keep: set[str]) -> None:
        """Delete checkpoint files qgraph wrote (by their exact name pattern) except `keep`."""
        for entry in os.listdir(self.path):
            if _CHECKPOINT.match(entry) and entry not in keep:
                os.unlink(self.path / entry)

    def _clean_after_failure(self) -> None:
        """A failed run leaves what can be resumed; anything else it created goes."""
        if self.completed_checkpoint() is None:
            if self.created:
                shutil.rmtree(self.created, ignore_errors=True)
                return
            for entry in set(os.listdir(self.path)) - self._entries_before - {LOCK}:
                _remove(self.path / entry)
            return
        artifacts = self.path / ARTIFACTS
        if ARTIFACTS not in self._entries_before and artifacts.exists():
            shutil.rmtree(artifacts, ignore_errors=True)   # rebuilt by every run, resume included


def _topmost_missing(path: Path) -> Path:
    """The outermost folder of `path` that does not exist yet (what creating it would make)."""
    top = path
    while not top.parent.exists() and top.parent != top:
        top = top.parent
    return top


def _lock(path: Path) -> int:
    try:
        fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        raise TrainError(f"{path}: cannot write in the work folder ({exc.strerror or exc}); "
                         "choose another --workdir") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise TrainError(f"{path}: another qgraph train is using this work folder; wait for it to finish "
                         "or give another --workdir") from None
    return fd


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except OSError:
            pass
