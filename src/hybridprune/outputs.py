"""What every run writes beside its results, and how it writes them without losing anything: versions, the
git commit, atomic files, a manifest of the files hybridprune wrote, output targets checked before any work,
and a lock so two runs never share one folder."""

from __future__ import annotations

import json
import os
import platform
import re
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import datetime
from pathlib import Path
from typing import Any

from hybridprune.errors import HybridPruneError

try:
    import fcntl  # POSIX: a lock held with flock dies with its process, which is how stale locks are told apart
except ImportError:  # pragma: no cover - Windows: stale locks are told by their pid alone
    fcntl = None

MANIFEST_NAME = ".hybridprune-written.json"  # the files hybridprune wrote into a folder, for --overwrite
LOCK_NAME = ".hybridprune.lock"  # held by the run writing into a folder
NAME_MAX = 255  # bytes in one file name on the usual file systems (ext4, xfs, btrfs, apfs, ntfs)
TMP_SUFFIX_MAX = 40  # what atomic_target adds to a name for its temporary file: ".", ".PID.HEX.tmp"


def git_commit() -> str | None:
    """The commit of the hybridprune source tree ('+dirty' when it has uncommitted changes), or None outside
    a git checkout."""
    here = Path(__file__).parent
    try:
        head = _git(["rev-parse", "HEAD"], here)
        dirty = _git(["status", "--porcelain", "--untracked-files=no", "."], here)
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}+dirty" if head and dirty else head or None


def _git(args: list[str], cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=5, check=True).stdout.strip()


def environment() -> dict[str, Any]:
    """Versions of the stack and the accelerator, for every result file.

    Example:
        >>> "torch" in environment()
        True
    """
    import torch  # here, not at the top: writing files should not cost torch's import (lock test processes)
    import torch_pruning
    import torchvision

    from hybridprune.version import __version__

    env: dict[str, Any] = {
        "hybridprune": __version__,
        "commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "torch_pruning": torch_pruning.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cusparselt": _cusparselt_version(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "gpu": None,
        "compute_capability": None,
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    return env


def _cusparselt_version() -> int | None:
    import torch

    try:
        return int(torch.backends.cusparselt.version()) if torch.backends.cusparselt.is_available() else None
    except (AttributeError, RuntimeError):
        return None


def write_json(path: str | Path, obj: Any, *, record: bool = False) -> Path:
    """Write JSON atomically: readers see the old file or the new one, never half of one.

    Example:
        >>> tmp = getfixture("tmp_path")
        >>> write_json(tmp / "result.json", {"accuracy": 0.9}, record=True).name
        'result.json'
    """
    return write_text(path, json.dumps(obj, indent=2, default=str) + "\n", record=record)


def write_text(path: str | Path, text: str, *, record: bool = False) -> Path:
    """Write a text file atomically (and, with `record`, list it in its folder's manifest: run folders only,
    so a single --json or checkpoint file leaves no hidden file beside it)."""
    with atomic_target(path, record=record) as tmp:
        tmp.write_text(text)
    return Path(path)


@contextmanager
def atomic_target(path: str | Path, *, record: bool = False) -> Iterator[Path]:
    """A temporary path beside `path`, renamed onto it when the block succeeds and removed when it fails:
    readers see the old file or the new one, never half of one.

    With `record`, the name is listed in the folder's manifest before the file appears (so a run killed
    mid-write still owns it) and unlisted again if the block fails (what is there then is not ours):
    `remove_written_files` deletes exactly what hybridprune wrote.

    Example:
        >>> tmp = getfixture("tmp_path")
        >>> with atomic_target(tmp / "weights.bin", record=True) as t:
        ...     n = t.write_bytes(b"...")
        >>> (tmp / "weights.bin").read_bytes()
        b'...'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # pid and a random part: two processes, or two threads of one, never share a temporary file
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    listed = record and _update_manifest(path.parent, add=path.name)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        # the rename did not happen, so what is there (nothing, or a user's file) is not ours: unlist it
        if listed:
            with suppress(OSError):  # the original error matters more than a stale manifest entry
                _update_manifest(path.parent, remove=path.name)
        raise
    finally:
        tmp.unlink(missing_ok=True)


# --- the manifest of written files ----------------------------------------------------------------


def written_files(folder: str | Path) -> list[Path]:
    """The files hybridprune wrote into `folder` (from its manifest) that are still there.

    Example:
        >>> tmp = getfixture("tmp_path")
        >>> _ = write_json(tmp / "a.json", {}, record=True)
        >>> [p.name for p in written_files(tmp)]
        ['a.json']
    """
    folder = Path(folder)
    return [folder / n for n in _read_manifest(folder, strict=True) if (folder / n).is_file()]


def remove_written_files(folder: str | Path) -> list[Path]:
    """Delete the files hybridprune wrote into `folder` (as its manifest lists them, with any temporary files
    a killed write left behind) and the manifest; a user's other files stay. Returns the deleted files.

    Example:
        >>> tmp = getfixture("tmp_path")
        >>> _ = write_json(tmp / "results.json", {}, record=True), (tmp / "settings.json").write_text("{}")
        >>> [p.name for p in remove_written_files(tmp)], (tmp / "settings.json").exists()
        (['results.json'], True)
    """
    folder = Path(folder)
    names = _read_manifest(folder, strict=True)
    removed = []
    for name in names:
        target = folder / name
        if target.is_symlink() or target.is_file():  # a folder of that name was not written by atomic_target
            target.unlink()
            removed.append(target)
        leftover = re.compile(rf"\.{re.escape(name)}\.\d+(\.[0-9a-f]+)?\.tmp")
        for tmp in folder.iterdir():
            if tmp.name.startswith(f".{name}.") and leftover.fullmatch(tmp.name) and tmp.is_file():
                tmp.unlink(missing_ok=True)
    # the manifest goes last: a removal cut short by an interrupt can be run again
    (folder / MANIFEST_NAME).unlink(missing_ok=True)
    return removed


def _read_manifest(folder: Path, strict: bool) -> list[str]:
    """The names listed in folder's manifest; only plain names in that folder, so an edited manifest can never
    point outside it. An unreadable manifest is an error when deleting (strict) and empty when adding."""
    path = folder / MANIFEST_NAME
    try:
        data = json.loads(path.read_text())
        names = data["files"]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise TypeError("'files' is not a list of names")
    except FileNotFoundError:
        return []
    except (OSError, ValueError, TypeError, KeyError) as e:
        if strict:
            raise HybridPruneError(
                f"{path} is unreadable ({type(e).__name__}: {e}); it lists the files hybridprune wrote in {folder}, "
                "so delete those by hand and remove it"
            ) from None
        return []
    return [n for n in names if _plain_name(n)]


def _plain_name(name: str) -> bool:
    return (
        name not in ("", ".", "..", MANIFEST_NAME, LOCK_NAME)
        and "/" not in name
        and "\\" not in name
        and ("\0" not in name)
    )


def _update_manifest(folder: Path, add: str | None = None, remove: str | None = None) -> bool:
    """Add or remove one name; True when the list changed. Written atomically, so a reader sees a whole list.
    Runs in one folder are serialised by FolderLock; unlocked writers racing here can only drop an entry, so
    a file may be left behind by --overwrite but no user's file is ever listed."""
    names = _read_manifest(folder, strict=False)
    if add is not None and add not in names:
        names.append(add)
    elif remove is not None and remove in names:
        names.remove(remove)
    else:
        return False
    path = folder / MANIFEST_NAME
    tmp = folder / f"{MANIFEST_NAME}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        tmp.write_text(json.dumps({"written_by": "hybridprune", "files": sorted(names)}, indent=1) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return True


# --- output targets, checked before any work --------------------------------------------------------


def check_output_file(path: str | Path, overwrite: bool) -> Path:
    """Refuse, before any work starts, a file target that could not be written at the end: a folder, an
    existing file without overwrite, something that is not a regular file, a parent that is a file or is not
    writable or cannot be created. Creates nothing; returns the path.

    Example:
        >>> check_output_file("/etc", overwrite=True)
        Traceback (most recent call last):
        ...
        hybridprune.errors.HybridPruneError: /etc is a folder; give a file name to write to, e.g. /etc/result.json
    """
    path = _no_nul(Path(path).expanduser())
    try:
        if path.is_dir():
            raise HybridPruneError(f"{path} is a folder; give a file name to write to, e.g. {path / 'result.json'}")
        if path.exists() or path.is_symlink():
            if not overwrite:
                raise HybridPruneError(f"{path} exists; pass --overwrite to replace it")
            if not path.is_file():  # replacing /dev/null or a pipe by a rename would break the system
                raise HybridPruneError(f"{path} is not a regular file; give a file name to write to")
        if len(os.fsencode(path.name)) + TMP_SUFFIX_MAX > NAME_MAX:
            raise HybridPruneError(
                f"file name {path.name[:40]}... is too long; valid: at most {NAME_MAX - TMP_SUFFIX_MAX} bytes"
            )
        _check_can_write_in(path.parent, path)
    except (OSError, ValueError) as e:  # permission denied on a parent, a NUL byte in the name, a name too long
        if isinstance(e, HybridPruneError):
            raise
        raise HybridPruneError(f"cannot write {path}: {getattr(e, 'strerror', None) or e}") from None
    return path


def check_output_dir(path: str | Path) -> Path:
    """Refuse, before any work starts, a folder target that could not be written: an existing file, or a folder
    (or, when it does not exist yet, its nearest existing parent) that is not writable. Creates nothing.

    Example:
        >>> tmp = getfixture("tmp_path")
        >>> check_output_dir(tmp / "new" / "run") == tmp / "new" / "run"
        True
        >>> (tmp / "notes.txt").write_text("mine")
        4
        >>> check_output_dir(tmp / "notes.txt")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        hybridprune.errors.HybridPruneError: .../notes.txt is a file; give a folder for the results
    """
    path = _no_nul(Path(path).expanduser())
    try:
        if (path.exists() or path.is_symlink()) and not path.is_dir():
            raise HybridPruneError(f"{path} is a file; give a folder for the results")
        _check_can_write_in(path, path)
    except (OSError, ValueError) as e:
        if isinstance(e, HybridPruneError):
            raise
        raise HybridPruneError(f"cannot write in {path}: {getattr(e, 'strerror', None) or e}") from None
    return path


def _no_nul(path: Path) -> Path:
    # pathlib answers False to exists() and is_dir() for a name with a NUL byte; no file can have one
    if "\0" in str(path):
        raise HybridPruneError(f"{str(path)!r} holds a NUL byte; valid: a file system path")
    return path


def _check_can_write_in(folder: Path, target: Path) -> None:
    """`folder` is a writable folder, or can be made inside the nearest existing one."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise HybridPruneError(f"cannot write {target}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "write in" if existing == folder else f"create {folder} in"
        raise HybridPruneError(f"cannot {what} {existing}: permission denied; choose another place for {target}")


# --- one run per folder -------------------------------------------------------------------------------


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


def _parse_lock(raw: bytes) -> dict[str, Any]:
    try:
        info = json.loads(raw)
    except ValueError:
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
