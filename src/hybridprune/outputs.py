"""How hybridprune writes without losing anything: atomic files, a manifest of the files it wrote into a
folder (what --overwrite may remove), and output targets checked before any work starts. Provenance is in
`provenance`, the one-run-per-folder lock in `lock`."""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from hybridprune.errors import HybridPruneError
from hybridprune.lock import LOCK_NAME
from hybridprune.parse import read_json

try:
    import fcntl  # POSIX: a lock held with flock dies with its process, which is how stale locks are told apart
except ImportError:  # pragma: no cover - Windows: stale locks are told by their pid alone
    fcntl = None

MANIFEST_NAME = ".hybridprune-written.json"  # the files hybridprune wrote into a folder, for --overwrite
NAME_MAX = 255  # bytes in one file name on the usual file systems (ext4, xfs, btrfs, apfs, ntfs)
TMP_SUFFIX_MAX = 40  # what atomic_target adds to a name for its temporary file: ".", ".PID.HEX.tmp"


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
    if not (path.exists() or path.is_symlink()):
        return []
    try:
        data = read_json(path, "manifest")
        names = data["files"]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise TypeError("'files' is not a list of names")
    except (OSError, ValueError, TypeError, KeyError) as e:  # HybridPruneError too: too deep, too large, not JSON
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


def check_output_file(path: str | Path, overwrite: bool, example: str = "result.json") -> Path:
    """Refuse, before any work starts, a file target that could not be written at the end: a folder, an
    existing file without overwrite, something that is not a regular file, a parent that is a file or is not
    writable or cannot be created. Creates nothing; returns the path. `example` names the kind of file the
    caller writes, for the message about a folder.

    Example:
        >>> check_output_file("/etc", overwrite=True)
        Traceback (most recent call last):
        ...
        hybridprune.errors.HybridPruneError: /etc is a folder; give a file name to write to, e.g. /etc/result.json
    """
    path = _no_nul(Path(path).expanduser())
    try:
        if path.is_dir():
            raise HybridPruneError(f"{path} is a folder; give a file name to write to, e.g. {path / example}")
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
