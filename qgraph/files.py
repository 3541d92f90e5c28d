"""The files a command reads and writes.

Three promises live here, for every command:

- an input is a regular file that exists (never a folder, FIFO or device: opening a FIFO for
  reading would hang);
- no output is one of the command's inputs or another of its outputs, compared by identity
  (``os.path.samefile`` when both exist, the fully resolved path otherwise, so symlinks,
  hard links and ``./x`` spellings are caught), and no output replaces a folder or a special
  file (as root, writing "to" /dev/full would otherwise replace the device node);
- outputs appear whole or not at all: each is written to an anonymous file in the target
  folder (Linux ``O_TMPFILE``: a kill -9 leaves nothing behind) or, where that is missing,
  to a hidden temporary file, synced, and renamed over the target only when every output of
  the command has been written (`write_files`). New files get the mode ``0o666 & ~umask``
  like any other file the user creates.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
import tempfile
from pathlib import Path
from typing import Mapping

from qgraph.errors import QGraphError

PathLike = str | os.PathLike


class FileError(QGraphError):
    """A path that cannot be read or written as the command asks."""


# -- inputs -------------------------------------------------------------------------------------

def check_input_file(path: PathLike, what: str = "input", error: type[QGraphError] = FileError) -> Path:
    """`path` as a Path if it is an existing regular file (links followed), else `error` naming it."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise error(f"{path}: no such {what} file") from None
    except OSError as exc:
        raise error(f"{path}: cannot read the {what} file ({_reason(exc)})") from None
    if stat.S_ISDIR(mode):
        raise error(f"{path}: is a folder, not a {what} file")
    if not stat.S_ISREG(mode):
        raise error(f"{path}: is a {_kind(mode)}, not a regular {what} file; give a file")
    if not os.access(path, os.R_OK):
        raise error(f"{path}: the {what} file is not readable; check its permissions")
    return path


# -- outputs ------------------------------------------------------------------------------------

def check_outputs(writes: Mapping[str, PathLike | None], reads: Mapping[str, PathLike | None] = {},  # noqa: B006
                  ) -> dict[str, Path]:
    """Check every output path before any work: each may be created or replaced (parent folder
    exists and is writable; an existing target is a regular file), and none is an input or
    another output. `writes` and `reads` map an option label (e.g. "-o", "--data") to a path
    (None entries are ignored). Returns the outputs as Paths."""
    outputs = {label: Path(p) for label, p in writes.items() if p is not None}
    inputs = {label: Path(p) for label, p in reads.items() if p is not None}
    for label, path in outputs.items():
        check_output_path(path, label)
    for label, path in outputs.items():
        for other, source in inputs.items():
            if same_file(path, source):
                raise FileError(f"{path}: {label} would overwrite the {other} file {source}; choose another {label} path")
    labels = list(outputs)
    for i, label in enumerate(labels):
        for other in labels[i + 1:]:
            if same_file(outputs[label], outputs[other]):
                raise FileError(f"{outputs[label]}: {label} and {other} name the same file; give them different paths")
    return outputs


def path_mode(path: PathLike, label: str, error: type[QGraphError] = FileError) -> int | None:
    """`os.stat(path).st_mode` (links followed), None when nothing is there; `error` naming
    `label` when the path cannot be examined (a symlink loop, a file used as a folder, ...)."""
    try:
        return os.stat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise error(f"{path}: cannot use it as {label} ({_reason(exc)}); choose another path") from None


def check_output_path(path: PathLike, label: str = "-o") -> Path:
    """`path` may be created or atomically replaced: not a folder or special file, in an
    existing writable folder."""
    path = Path(path)
    if str(path) in ("", "."):
        raise FileError(f"{label}: an empty path; give a file name")
    mode = path_mode(path, label)
    if mode is not None and stat.S_ISDIR(mode):
        raise FileError(f"{path}: {label} is a folder; give a file path")
    if mode is not None and not stat.S_ISREG(mode):
        raise FileError(f"{path}: {label} is a {_kind(mode)}; qgraph writes only regular files, choose another path")
    parent = path.parent
    if not parent.is_dir():
        raise FileError(f"{path}: the folder {parent} of {label} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise FileError(f"{path}: the folder {parent} of {label} is not writable; choose another path")
    _probe_writable(parent, path, label)
    return path


def _probe_writable(parent: Path, path: Path, label: str) -> None:
    """Create and drop a file in `parent`, so that a folder that refuses files (/proc, a
    read-only mount, a full quota) fails now, before any work, not after it."""
    try:
        fd, _ = _open_anonymous(parent)
        if fd >= 0:
            os.close(fd)
            return
        fd, name = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".qgraph-tmp")
        os.close(fd)
        os.unlink(name)
    except (OSError, FileError) as exc:
        reason = _reason(exc) if isinstance(exc, OSError) else str(exc)
        raise FileError(f"{path}: cannot write in {parent} ({reason}); choose another {label} path") from None


def same_file(a: PathLike, b: PathLike) -> bool:
    """True when `a` and `b` are one file: by inode if both exist, else by resolved path."""
    try:
        if os.path.exists(a) and os.path.exists(b):
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def is_inside(path: PathLike, folder: PathLike) -> bool:
    """True when `path` (resolved) lies inside `folder` (resolved)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder and path != folder


# -- writing ------------------------------------------------------------------------------------

def write_files(payloads: Mapping[PathLike, bytes]) -> list[Path]:
    """Write every payload, all or nothing: each is staged in its target's folder first; only
    when all are staged are they renamed into place. A failure (disk full, permissions)
    leaves no new file behind and the targets as they were."""
    staged: list[_Staged] = []
    try:
        for path, payload in payloads.items():
            staged.append(_stage(check_output_path(path, str(path)), payload))
        for item in staged:
            item.commit()
    except BaseException:
        for item in staged:
            item.discard()
        raise
    return [item.path for item in staged]


def atomic_write_bytes(path: PathLike, payload: bytes) -> Path:
    return write_files({path: payload})[0]


def json_bytes(value) -> bytes:
    """JSON text of `value` (NumPy values converted); NaN or Inf is an error, not invalid JSON."""
    try:
        text = json.dumps(_finite(value), indent=2, default=_jsonable, allow_nan=False)
    except ValueError as exc:
        raise QGraphError(f"cannot write JSON: {exc}") from None
    return (text + "\n").encode()


def write_json(path: PathLike, value) -> Path:
    return atomic_write_bytes(path, json_bytes(value))


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _finite(value):
    """Non-finite floats become None (JSON has no NaN); only reports hold such values."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class _Staged:
    """One output written to an unnamed (O_TMPFILE) or hidden temporary file, not yet in place."""

    def __init__(self, path: Path, fd: int, temp_name: str | None):
        self.path, self.fd, self.temp_name = path, fd, temp_name

    def commit(self) -> None:
        try:
            if self.temp_name is None:
                self._link_into_place()
            else:
                os.replace(self.temp_name, self.path)
                self.temp_name = None
        except OSError as exc:
            raise FileError(f"{self.path}: cannot write ({_reason(exc)}); choose another path") from None
        finally:
            self._close()

    def _link_into_place(self) -> None:
        # linkat(AT_SYMLINK_FOLLOW) on /proc/self/fd/N gives the unnamed file a name; Python
        # calls linkat (not link, which would try to link the /proc symlink itself) only when
        # a dir_fd is given
        source = f"/proc/self/fd/{self.fd}"
        folder = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if not os.path.lexists(self.path):
                try:
                    os.link(source, self.path.name, dst_dir_fd=folder, follow_symlinks=True)
                    return                  # appears whole, atomically
                except FileExistsError:
                    pass
            for attempt in range(100):      # replace an existing file: link a hidden name, rename it
                temp = f".{self.path.name}.{os.getpid()}.{attempt}.qgraph-tmp"
                try:
                    os.link(source, temp, dst_dir_fd=folder, follow_symlinks=True)
                    break
                except FileExistsError:
                    continue
            else:
                raise FileError(f"{self.path}: cannot find a free temporary name beside it")
            try:
                os.replace(temp, self.path.name, src_dir_fd=folder, dst_dir_fd=folder)
            except BaseException:
                os.unlink(temp, dir_fd=folder)
                raise
        finally:
            os.close(folder)

    def discard(self) -> None:
        if self.temp_name is not None:
            try:
                os.unlink(self.temp_name)
            except OSError:
                pass
            self.temp_name = None
        self._close()

    def _close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _stage(path: Path, payload: bytes) -> _Staged:
    parent = path.parent
    fd, temp_name = _open_anonymous(parent)
    if fd < 0:
        try:
            fd, temp_name = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".qgraph-tmp")
            os.fchmod(fd, 0o666 & ~_umask())
        except OSError as exc:
            raise FileError(f"{path}: cannot write ({_reason(exc)}); choose another path") from None
    staged = _Staged(path, fd, temp_name)
    try:
        view = memoryview(payload)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except OSError as exc:
        staged.discard()
        raise FileError(f"{path}: cannot write ({_reason(exc)}); free some space or choose another path") from None
    except BaseException:
        staged.discard()
        raise
    return staged


def _open_anonymous(parent: Path) -> tuple[int, None]:
    """An unnamed file in `parent` (O_TMPFILE), or -1 where the system has none; it is linked
    into place through /proc/self/fd, so /proc must be there too."""
    flag = getattr(os, "O_TMPFILE", None)
    if flag is None or not os.path.isdir("/proc/self/fd"):
        return -1, None
    try:
        return os.open(parent, flag | os.O_WRONLY | os.O_CLOEXEC, 0o666), None
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
            return -1, None
        raise FileError(f"{parent}: cannot write there ({_reason(exc)}); choose another path") from None


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "special file"


def _reason(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "no space left on the device"
    if exc.errno == errno.ELOOP:
        return "too many levels of symbolic links"
    return exc.strerror or str(exc)
