"""Writing files that other processes and crashes cannot half-write, and folders with one owner.

``write_atomic`` writes through a uniquely named temporary file in the same folder, fsyncs it and renames it over the
target: a kill -9 leaves the old file or the new one, never half of either, and two writers never share a temporary
name. A write that fails (a full disk, a read-only folder, a name too long) raises :class:`WriteError` naming the path
and the reason: the caller decides what is kept, but a failed write never passes for a result.

``FolderLock`` gives a folder (a run directory, an evaluation's output) one owner at a time: an ``fcntl`` lock on
``FOLDER/.lock``, which the kernel releases when the process dies however it dies (kill -9 included), so a stale lock
never blocks a rerun. The lock file records who holds it, so a second writer is refused with the holder named.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Callable

from regdefense.base.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; folders are then unguarded (said in FolderLock's docstring)
    fcntl = None  # type: ignore[assignment]


class WriteError(UserError):
    """A file regdefense had to write could not be written (full disk, permissions, a bad path)."""


def why(exc: OSError) -> str:
    """An OS error in a few words: "the disk is full" for ENOSPC, its strerror otherwise."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full"
    if exc.errno == errno.ENAMETOOLONG:
        return "the file name is too long"
    return exc.strerror or str(exc) or type(exc).__name__


def write_atomic(path: str | os.PathLike, data: bytes | str | Callable[[IO[bytes]], Any], what: str = "") -> Path:
    """Write ``data`` (bytes, text, or a function that writes into a binary file object) to ``path`` atomically.

    :param what: what the file is, for the error message (e.g. "the evaluation's progress").
    :raises WriteError: the write failed; the temporary file is removed and an earlier ``path`` is untouched.
    """
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:80]}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        mode = 0o666 & ~_umask()
        os.chmod(tmp, mode)  # mkstemp's 0600 would hide a report from the user's group
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except OSError as exc:
        kept = f"; the previous {path.name} is intact" if path.is_file() else ""
        raise WriteError(f"could not write {what + ' ' if what else ''}{path}: {why(exc)}{kept}") from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return path


def _fsync_dir(folder: Path) -> None:
    """Make a rename itself durable (best effort: not every platform can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def try_lock(path: str | os.PathLike, timeout: float = 0.0) -> int | None:
    """Take the exclusive lock of the lock file ``path`` (created if need be), waiting up to ``timeout`` seconds.

    Returns the open descriptor that holds it (``os.close`` releases it; so does the process's death), or None when
    another process still holds it after ``timeout``. Raises OSError when the file cannot be opened. Without
    ``fcntl`` (Windows) nothing is locked and -1 is returned.
    """
    if fcntl is None:
        return -1
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)  # never through a link
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise IsADirectoryError(errno.EISDIR, "not a regular file", str(path))
    deadline, pause = time.monotonic() + timeout, 0.005
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                return None
        except OSError:
            os.close(fd)
            raise
        time.sleep(pause)
        pause = min(2 * pause, 0.1)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class FolderTaken(UserError):
    """Another live process holds the folder's lock."""


class FolderLock:
    """One owner for ``folder`` while the lock is held (see the module's docstring).

    ``acquire`` refuses with :class:`FolderTaken` naming the holder (pid, host, command, since when) when another
    process holds it. The same process may take the same folder's lock again (nested use), counted. Without
    ``fcntl`` (Windows) the lock is a no-op (see :func:`try_lock`).
    """

    _held: dict[str, tuple[int, int]] = {}  # this process's locks: folder -> (descriptor, depth)

    def __init__(self, folder: str | os.PathLike, purpose: str = "a run") -> None:
        self.folder = Path(folder)
        self.purpose = purpose
        self.path = self.folder / ".lock"

    def acquire(self) -> FolderLock:
        key = str(self.folder.resolve())
        if key in self._held:
            fd, depth = self._held[key]
            self._held[key] = (fd, depth + 1)
            return self
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            taken = try_lock(self.path)
        except OSError as exc:
            raise WriteError(
                f"cannot take the lock {self.path}: {why(exc)} (a link, a folder or an unwritable place where "
                f"regdefense keeps its lock file); remove it or choose another folder"
            ) from None
        if taken is None:
            raise FolderTaken(
                f"{self.folder} is in use by another process ({_describe(self.path)}); wait for it to finish, stop "
                f"it, or choose another folder"
            )
        fd = taken
        if fd >= 0:
            holder = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "command": " ".join(sys.argv)[:300],
                "purpose": self.purpose,
                "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            }
            try:  # who holds it, for a second writer's message (best effort: a full disk still locks)
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(holder).encode(), 0)
            except OSError:
                pass
        self._held[key] = (fd, 1)
        return self

    def release(self) -> None:
        key = str(self.folder.resolve())
        if key not in self._held:
            return
        fd, depth = self._held[key]
        if depth > 1:
            self._held[key] = (fd, depth - 1)
            return
        del self._held[key]
        if fd >= 0:
            try:  # no holder named any more; the file stays (removing it would race a new holder)
                os.ftruncate(fd, 0)
            except OSError:
                pass
            os.close(fd)  # releases the lock

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _describe(lock: Path) -> str:
    try:
        info = json.loads(lock.read_text())
        return f"{info['purpose']}, pid {info['pid']} on {info['host']} since {info['since']}: {info['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


def save_png(fig: Any, path: str | os.PathLike, what: str = "the plot") -> Path:
    """Write a matplotlib figure as a PNG atomically (never a 0-byte image on a full disk) and close it."""
    import matplotlib.pyplot as plt

    try:
        return write_atomic(path, lambda fh: fig.savefig(fh, dpi=110, format="png"), what)
    finally:
        plt.close(fig)
