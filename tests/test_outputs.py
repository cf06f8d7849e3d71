"""No data loss: output targets checked before any work, --overwrite deletes only what hybridprune wrote, and
one run per folder, held by a lock that dies with its process."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

import hybridprune
from helpers import holder
from hybridprune.errors import HybridPruneError
from hybridprune.lock import LOCK_NAME, FolderLock
from hybridprune.outputs import (
    MANIFEST_NAME,
    atomic_target,
    check_output_dir,
    check_output_file,
    remove_written_files,
    write_json,
    write_text,
    written_files,
)

SRC = os.path.dirname(os.path.dirname(hybridprune.__file__))  # the folder holding the package under test
AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0  # root writes through any mode bits


def tree(folder):
    """Every path under folder with its content, to show that a check changed nothing."""
    return {p.relative_to(folder): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def refusal(fn, *args, **kwargs):
    with pytest.raises(HybridPruneError) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


# --- the manifest and --overwrite -------------------------------------------------------------------------


def users_files(folder):
    files = {
        "settings.json": '{"lr": 0.1}',
        "labels.json": '["cat", "dog"]',
        "notes.txt": "mine",
        ".results.json.notes.tmp": "mine too",
    }
    for name, text in files.items():
        (folder / name).write_text(text)
    (folder / "plots").mkdir()
    (folder / "plots" / "a.json").write_text("{}")
    return files


def test_remove_written_files_deletes_exactly_what_hybridprune_wrote(tmp_path):
    mine = users_files(tmp_path)
    write_json(tmp_path / "results.json", {"accuracy": 0.5}, record=True)
    write_text(tmp_path / "report.md", "# report\n", record=True)
    with atomic_target(tmp_path / "dense.safetensors", record=True) as tmp:  # how checkpoints are written
        tmp.write_bytes(b"\0" * 64)
    write_json(tmp_path / "results.json", {"accuracy": 0.6}, record=True)  # written twice, listed once
    assert sorted(p.name for p in written_files(tmp_path)) == ["dense.safetensors", "report.md", "results.json"]

    removed = remove_written_files(tmp_path)

    assert sorted(p.name for p in removed) == ["dense.safetensors", "report.md", "results.json"]
    assert {n: (tmp_path / n).read_text() for n in mine} == mine
    assert (tmp_path / "plots" / "a.json").exists()
    assert not (tmp_path / MANIFEST_NAME).exists()
    assert remove_written_files(tmp_path) == []  # nothing listed any more: nothing more goes


def test_a_write_that_fails_leaves_no_file_and_no_listing(tmp_path):
    with pytest.raises(RuntimeError), atomic_target(tmp_path / "results.json", record=True) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert list(tmp_path.iterdir()) in ([], [tmp_path / MANIFEST_NAME])
    (tmp_path / "results.json").write_text("the user's, made later")
    remove_written_files(tmp_path)
    assert (tmp_path / "results.json").read_text() == "the user's, made later"


def test_a_failed_write_over_a_users_file_leaves_it_the_users(tmp_path):
    (tmp_path / "config.json").write_text("the user's")
    with pytest.raises(OSError), atomic_target(tmp_path / "config.json", record=True) as tmp:
        tmp.write_text("half")
        raise OSError("disk full")
    remove_written_files(tmp_path)
    assert (tmp_path / "config.json").read_text() == "the user's"


def test_a_rewrite_that_fails_keeps_the_old_file_listed(tmp_path):
    write_json(tmp_path / "results.json", {"v": 1}, record=True)
    with pytest.raises(KeyboardInterrupt), atomic_target(tmp_path / "results.json", record=True) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert json.loads((tmp_path / "results.json").read_text()) == {"v": 1}
    assert [p.name for p in remove_written_files(tmp_path)] == ["results.json"]


def test_record_false_writes_without_listing(tmp_path):
    write_json(tmp_path / "out.json", {}, record=False)
    assert (tmp_path / "out.json").exists() and not (tmp_path / MANIFEST_NAME).exists()


def test_leftovers_of_a_killed_write_go_with_the_files(tmp_path):
    write_json(tmp_path / "results.json", {}, record=True)
    for leftover in [".results.json.4242.1a2b3c4d.tmp", ".results.json.4242.tmp"]:
        (tmp_path / leftover).write_text("half")
    (tmp_path / ".notes.txt.4242.1a2b3c4d.tmp").write_text("not a file hybridprune wrote")
    remove_written_files(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".notes.txt.4242.1a2b3c4d.tmp"]


def test_an_edited_manifest_cannot_reach_outside_its_folder(tmp_path):
    run, outside = tmp_path / "run", tmp_path / "outside.txt"
    run.mkdir()
    outside.write_text("keep")
    (run / "sub").mkdir()
    (run / "sub" / "x").write_text("keep")
    (run / "link").symlink_to(outside)
    (run / LOCK_NAME).write_text("{}")
    names = ["../outside.txt", str(outside), "sub", "sub/x", "", ".", "..", LOCK_NAME, "link", "absent", 7, None]
    (run / MANIFEST_NAME).write_text(json.dumps({"files": [n for n in names if isinstance(n, str)]}))
    remove_written_files(run)
    assert outside.read_text() == "keep" and (run / "sub" / "x").read_text() == "keep"
    assert (run / LOCK_NAME).exists()
    assert not (run / "link").is_symlink()  # the link itself was listed: it goes, its target stays


@pytest.mark.parametrize("manifest", ["{not json", '{"files": "a.json"}', '{"files": [1, 2]}', "[]", "\xff"])
def test_an_unreadable_manifest_deletes_nothing(tmp_path, manifest):
    users_files(tmp_path)
    (tmp_path / "results.json").write_text("{}")
    (tmp_path / MANIFEST_NAME).write_text(manifest, encoding="latin-1")
    before = tree(tmp_path)
    assert MANIFEST_NAME in refusal(remove_written_files, tmp_path)
    assert tree(tmp_path) == before


def test_a_reader_always_sees_a_whole_manifest(tmp_path):
    write_text(tmp_path / "first.txt", "x", record=True)
    with open(tmp_path / MANIFEST_NAME) as reader:  # open while the list changes: it keeps its snapshot
        write_text(tmp_path / "second.txt", "x", record=True)
        assert json.loads(reader.read())["files"] == ["first.txt"]
    seen, done = [], threading.Event()

    def read():
        while not done.is_set():
            seen.append(json.loads((tmp_path / MANIFEST_NAME).read_text())["files"])

    thread = threading.Thread(target=read)
    thread.start()
    try:
        for i in range(100):
            write_text(tmp_path / f"f{i}.txt", "x", record=True)
    finally:
        done.set()
        thread.join()
    assert seen and all(isinstance(files, list) for files in seen)  # a torn read would raise in read()
    assert len(written_files(tmp_path)) == 102


# --- output targets -------------------------------------------------------------------------------------------


def test_check_output_file_accepts_what_can_be_written_and_creates_nothing(tmp_path):
    (tmp_path / "old.json").write_text("{}")
    before = tree(tmp_path)
    assert check_output_file(tmp_path / "new.json", overwrite=False) == tmp_path / "new.json"
    assert check_output_file(tmp_path / "old.json", overwrite=True) == tmp_path / "old.json"
    assert check_output_file(tmp_path / "a" / "b" / "new.json", overwrite=False) == tmp_path / "a" / "b" / "new.json"
    assert tree(tmp_path) == before


def bad_file_targets(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file.json").write_text("{}")
    (tmp_path / "dangling").symlink_to(tmp_path / "absent")
    os.mkfifo(tmp_path / "pipe")
    return [
        (tmp_path / "folder", True, "is a folder"),
        (tmp_path / "file.json", False, "--overwrite"),
        (tmp_path / "file.json" / "x.json", True, "is a file"),  # parent is a file
        (tmp_path / "file.json" / "a" / "b" / "x.json", True, "is a file"),  # an ancestor is a file
        (tmp_path / "pipe", True, "not a regular file"),
        (tmp_path / "dangling", True, "not a regular file"),
        (tmp_path / ("x" * 250 + ".json"), False, "too long"),
        (str(tmp_path / "a\0b.json"), False, "NUL"),
        ("", True, "is a folder"),
    ]


def test_check_output_file_refuses_targets_that_would_fail_after_the_work(tmp_path):
    for path, overwrite, why in bad_file_targets(tmp_path):
        before = tree(tmp_path)
        message = refusal(check_output_file, path, overwrite=overwrite)
        assert why in message, (path, message)
        assert tree(tmp_path) == before


READ_ONLY_CHECKS = r"""
import os, sys
sys.path.insert(0, sys.argv[2])  # the same hybridprune as the test; importing it costs no torch
from hybridprune.errors import HybridPruneError
from hybridprune.lock import FolderLock
from hybridprune.outputs import check_output_dir, check_output_file
ro = sys.argv[1]
if os.geteuid() == 0:  # root writes through any mode bits: check as nobody (python is already loaded)
    os.setgroups([])
    os.setresgid(65534, 65534, 65534)
    os.setresuid(65534, 65534, 65534)
for check, arg in [
    (lambda p: check_output_file(p, overwrite=False), ro + "/x.json"),
    (lambda p: check_output_file(p, overwrite=False), ro + "/new/x.json"),
    (check_output_dir, ro),
    (check_output_dir, ro + "/new/run"),
    (lambda p: FolderLock(p).acquire(), ro + "/run"),
]:
    try:
        check(arg)
        print("accepted", arg)
    except HybridPruneError as e:
        print("refused", e)
"""


def test_a_read_only_folder_is_refused_before_any_work(tmp_path):
    # as root, the checks run as nobody, who needs a way in: a world-readable folder outside pytest's (0700) one
    base = Path(tempfile.mkdtemp()) if AS_ROOT else tmp_path
    try:
        base.chmod(0o755)
        (base / "ro").mkdir()
        (base / "ro").chmod(0o555)
        run = [sys.executable, "-c", READ_ONLY_CHECKS, str(base / "ro"), SRC]
        lines = subprocess.run(run, capture_output=True, text=True, timeout=60, check=True).stdout.splitlines()
        assert len(lines) == 5 and all(line.startswith("refused ") for line in lines), lines
        assert all("permission denied" in line.lower() for line in lines), lines
        assert os.listdir(base / "ro") == []
    finally:
        (base / "ro").chmod(0o755)
        if AS_ROOT:
            shutil.rmtree(base)


def test_check_output_dir(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "run").mkdir()
    before = tree(tmp_path)
    assert check_output_dir(tmp_path / "run") == tmp_path / "run"
    assert check_output_dir(tmp_path / "new" / "run") == tmp_path / "new" / "run"
    assert "is a file" in refusal(check_output_dir, tmp_path / "file")
    assert "is a file" in refusal(check_output_dir, tmp_path / "file" / "run")
    assert "NUL" in refusal(check_output_dir, str(tmp_path / "a\0b"))
    assert tree(tmp_path) == before


# --- the folder lock --------------------------------------------------------------------------------------------


def held_by_another_process(folder):
    proc = holder(folder)
    assert proc.stdout.readline() == "held\n"
    return proc


def test_a_second_process_is_refused_until_the_first_releases(tmp_path):
    proc = held_by_another_process(tmp_path)
    try:
        lock_bytes = (tmp_path / LOCK_NAME).read_bytes()
        message = refusal(FolderLock(tmp_path).acquire)
        assert f"is in use by process {proc.pid} (started " in message and "wait for it" in message
        assert (tmp_path / LOCK_NAME).read_bytes() == lock_bytes  # the refused run left the lock alone
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
    assert not (tmp_path / LOCK_NAME).exists()
    with FolderLock(tmp_path) as lock:
        assert lock.replaced_stale is None


def test_a_killed_holder_leaves_a_stale_lock_that_is_replaced(tmp_path):
    proc = held_by_another_process(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == proc.pid  # no cleanup ran
    with FolderLock(tmp_path) as lock:
        assert lock.replaced_stale["pid"] == proc.pid
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK_NAME).exists()


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lock(folder, **info):
    (folder / LOCK_NAME).write_text(json.dumps(info))


def test_a_lock_file_naming_a_dead_process_is_stale(tmp_path):
    pid = dead_pid()
    write_lock(tmp_path, pid=pid, host=socket.gethostname(), started="yesterday")
    with FolderLock(tmp_path) as lock:
        assert lock.replaced_stale == {"pid": pid, "host": socket.gethostname(), "started": "yesterday"}


def test_a_lock_file_naming_a_live_process_on_this_host_is_respected(tmp_path):
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        write_lock(tmp_path, pid=sleeper.pid, host=socket.gethostname(), started="now")
        assert f"process {sleeper.pid}" in refusal(FolderLock(tmp_path).acquire)
    finally:
        sleeper.kill()
        sleeper.wait()
    with FolderLock(tmp_path) as lock:  # and once that process is gone, it is stale
        assert lock.replaced_stale["pid"] == sleeper.pid


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="tells zombies by /proc")
def test_a_lock_naming_a_killed_process_not_yet_reaped_is_stale(tmp_path):
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        sleeper.kill()
        while open(f"/proc/{sleeper.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":  # a zombie now
            time.sleep(0.01)
        write_lock(tmp_path, pid=sleeper.pid, host=socket.gethostname(), started="now")
        with FolderLock(tmp_path) as lock:
            assert lock.replaced_stale["pid"] == sleeper.pid
    finally:
        sleeper.wait()


@pytest.mark.parametrize("content", ["", "{", "[1]", '{"pid": "x"}', '{"pid": 0}', '{"pid": -1}', '{"pid": 1e99}'])
def test_an_old_damaged_lock_file_is_stale(tmp_path, content):
    (tmp_path / LOCK_NAME).write_text(content)
    os.utime(tmp_path / LOCK_NAME, (time.time() - 60, time.time() - 60))
    with FolderLock(tmp_path) as lock:
        assert lock.replaced_stale is not None


def test_a_young_empty_lock_is_being_written_and_is_respected(tmp_path):
    (tmp_path / LOCK_NAME).write_text("")  # a run on a file system without hard links, between create and write
    assert "in use" in refusal(FolderLock(tmp_path).acquire)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_the_lock_is_released_on_errors_and_ctrl_c(tmp_path, error):
    with pytest.raises(error), FolderLock(tmp_path):
        assert (tmp_path / LOCK_NAME).exists()
        raise error
    assert not (tmp_path / LOCK_NAME).exists()
    FolderLock(tmp_path).acquire().release()


def test_one_process_cannot_take_its_own_folder_twice(tmp_path):
    with FolderLock(tmp_path):
        assert f"process {os.getpid()}" in refusal(FolderLock(tmp_path).acquire)


def test_folders_made_for_the_lock_go_again_unless_something_was_written(tmp_path):
    with FolderLock(tmp_path / "a" / "b" / "run"):
        assert (tmp_path / "a" / "b" / "run" / LOCK_NAME).exists()
    assert list(tmp_path.iterdir()) == []
    with FolderLock(tmp_path / "a" / "run"):
        write_json(tmp_path / "a" / "run" / "config.json", {}, record=True)
    assert sorted(p.name for p in (tmp_path / "a" / "run").iterdir()) == [MANIFEST_NAME, "config.json"]


def test_a_lock_under_a_file_is_one_clear_line(tmp_path):
    (tmp_path / "file").write_text("x")
    assert "cannot lock" in refusal(FolderLock(tmp_path / "file" / "run").acquire)


@pytest.mark.parametrize("stale_first", [False, True])
def test_of_many_processes_starting_at_once_exactly_one_runs(tmp_path, stale_first):
    if stale_first:  # the hard case: every one of them finds a stale lock to break at the same moment
        write_lock(tmp_path, pid=dead_pid(), host=socket.gethostname(), started="yesterday")
    go = tmp_path.parent / f"{tmp_path.name}-go"
    procs = [holder(tmp_path, go=go, hold=1.5) for _ in range(4)]
    assert all(p.stdout.readline() == "ready\n" for p in procs)  # all imported, polling for the start
    go.write_text("")
    outcomes = [p.communicate(timeout=60)[0].split(" ")[0].strip() for p in procs]
    assert sorted(outcomes) == ["held", "refused", "refused", "refused"], outcomes
    assert not (tmp_path / LOCK_NAME).exists()
