"""One run per folder: a lock file, held with flock, so two runs never write into one output folder."""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from contextlib import suppress
from datetime import datetime
from pathlib import Path
from typing import Any

from hybridprune.errors import HybridPruneError
from hybridprune.parse import loads_json

try:
    import fcntl  # POSIX: a lock held with flock dies with its process, which is how stale locks are told apart
except ImportError:  # pragma: no cover - Windows: stale locks are told by their pid alone
    fcntl = None

LOCK_NAME = ".hybridprune.lock"  # held by the run writing into a folder


class FolderLock:
    """Hold `folder/.hybridprune.lock` while a run writes into `folder`, so a second run there is refused with
    one line. The lock file names the holder (pid, host, start time); it is removed on exit, also on an error
    or Ctrl-C. A lock left by a killed process is stale: it is replaced, and `replaced_stale` holds what it
    said. Folders the lock had to create are removed again on exit if nothing was written into them.

    The lock appears whole and at once (written aside, then hard-linked into place, which fails if one
    exists), and is held with flock on POSIX: the kernel drops it when its process dies, however it dies.

    Example:
        >>> tmp = getfixture("tmp_path")
        >>> with FolderLock(tmp / "run") as lock:  # doctest: +ELLIPSIS
        ...     FolderLock(tmp / "run").acquire()  # as would another process
        Traceback (most recent call last):
        ...
        hybridprune.errors.HybridPruneError: .../run is in use by process ... (started ...); wait for it or ...
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.replaced_stale: dict[str, Any] | None = None
        self._fd: int | None = None
        self._created: list[Path] = []

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> FolderLock:
        """Take the lock or raise HybridPruneError naming the process that holds it."""
        try:
            self._created = _make_folders(self.folder)
            self._take()
        except BaseException as e:
            self._remove_created()
            if isinstance(e, OSError):  # a parent that is a file, a folder we may not write in
                raise HybridPruneError(f"cannot lock {self.folder}: {e.strerror or e}") from None
            raise
        return self

    def _take(self) -> None:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": datetime.now().isoformat("T", "seconds")}
        tmp = self.folder / f"{LOCK_NAME}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        fd: int | None = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, json.dumps(info).encode())
            _try_flock(fd)  # taken before the lock is visible, so no one ever sees it unheld
            for _ in range(5):  # a stale lock removed, or one released meanwhile: try again, a few times
                if _link_or_create(tmp, self.path, fd, info):
                    self._fd, fd = fd, None
                    return
                holder = self._holder()
                if holder is not None:
                    raise HybridPruneError(_in_use(self.folder, self.path, holder))
            raise HybridPruneError(f"{self.path} keeps changing hands; try again")
        finally:
            tmp.unlink(missing_ok=True)
            if fd is not None:
                os.close(fd)

    def release(self) -> None:
        """Remove the lock (and folders it created that are still empty); safe to call twice."""
        if self._fd is None:
            return
        try:
            # unlink before closing: closing drops the flock, and then another run may replace the file
            with suppress(FileNotFoundError):
                if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                    os.unlink(self.path)
        finally:
            os.close(self._fd)
            self._fd = None
            self._remove_created()

    def _holder(self) -> dict[str, Any] | None:
        """What the current lock says when its holder lives; None when there is none (now) or it was stale and
        has been removed."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        except OSError:  # unreadable (another user's, mode 600): assume it is held
            return {}
        try:
            info = _parse_lock(os.read(fd, 4096))
            if not info and time.time() - os.fstat(fd).st_mtime < 5:
                return info  # being written by a run on a file system without hard links (see _link_or_create)
            held = _try_flock(fd)
            if held is False or (held is None and not _stale_by_pid(info)) or (held and _pid_here(info)):
                return info
            # the file is ours to remove only while it is still the one we inspected (and, with flock, hold)
            if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                os.unlink(self.path)
                self.replaced_stale = info
            return None
        except FileNotFoundError:
            return None
        finally:
            os.close(fd)

    def _remove_created(self) -> None:
        for folder in reversed(self._created):
            try:
                folder.rmdir()
            except OSError:  # not empty: the run wrote into it
                break
        self._created = []


def _make_folders(folder: Path) -> list[Path]:
    """Create folder and its missing parents; the ones this call created, outermost first."""
    missing = [p for p in [folder, *folder.parents] if not p.exists()][::-1]
    created = []
    for p in missing:
        try:
            p.mkdir()
            created.append(p)
        except FileExistsError:  # made meanwhile by another run: not ours to remove
            pass
    return created


def _link_or_create(tmp: Path, lock: Path, fd: int, info: dict[str, Any]) -> bool:
    """Make `lock` the file open as `fd` (written aside as `tmp`, so it appears whole); False if a lock exists.
    File systems without hard links (FAT, some network and FUSE mounts) get O_CREAT|O_EXCL, flock and write:
    for the moment the file is empty, `_holder` counts a young empty lock as held."""
    try:
        os.link(tmp, lock)
        return True
    except FileExistsError:
        return False
    except OSError:
        pass
    try:
        new = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    _try_flock(new)
    os.write(new, json.dumps(info).encode())
    os.dup2(new, fd)  # the caller keeps holding fd: make it this file, with its flock
    os.close(new)
    return True


def _try_flock(fd: int) -> bool | None:
    """Take flock on fd: True taken, False held by another process, None when flock is unavailable."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:  # e.g. ENOLCK on a network file system without lock support
        return None


MAX_LOCK_BYTES = 64 * 2**10  # a lock holds a pid, a host and a time


def _parse_lock(raw: bytes) -> dict[str, Any]:
    try:
        info = loads_json(raw, "lock file", max_bytes=MAX_LOCK_BYTES)
    except ValueError:  # HybridPruneError included: an unreadable lock tells nothing about its holder
        return {}
    return info if isinstance(info, dict) else {}


def _pid_here(info: dict[str, Any]) -> bool:
    """The lock names a process other than this one that is alive on this host (so we cannot tell a pid reused
    after a crash from a run that somehow holds no flock: be safe and call it held)."""
    pid = info.get("pid")
    return info.get("host") == socket.gethostname() and pid != os.getpid() and _pid_alive(pid)


def _stale_by_pid(info: dict[str, Any]) -> bool:
    """Without flock: stale only when the lock names a process on this host that is gone."""
    return info.get("host") == socket.gethostname() and not _pid_alive(info.get("pid"))


def _pid_alive(pid: object) -> bool:
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:  # os.kill(0, ...) means the process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, and another user's
        return True
    except (OverflowError, OSError):
        return False
    try:  # a killed process not yet reaped by its parent is a zombie: gone, for our purposes
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _in_use(folder: Path, lock: Path, info: dict[str, Any]) -> str:
    pid, host, started = info.get("pid", "?"), info.get("host"), info.get("started", "at an unknown time")
    where = f" on {host}" if host and host != socket.gethostname() else ""
    return (
        f"{folder} is in use by process {pid}{where} (started {started}); "
        f"wait for it or remove {lock} if that process is gone"
    )
