"""Helpers shared by test modules (a plain module, not a test module: test modules never import each other).

- Dataset files as the loaders read them: IDX (MNIST), CIFAR-10 pickled batches, SVHN .mat, npz.
- The `hybridprune` command run in-process, and how a refusal is judged: exit 2, one line on stderr, no
  traceback, the output folder unchanged byte for byte.
- A second process holding a folder's lock, as a running `hybridprune run` does.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.io import savemat

RNG = np.random.default_rng(0)  # image contents only: no test depends on the values

# --- dataset files ----------------------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray, magic: int | None = None, dims: tuple | None = None) -> bytes:
    """An IDX file's bytes; `magic` and `dims` override the header (a header that lies about its data)."""
    magic = 0x800 + array.ndim if magic is None else magic
    dims = array.shape if dims is None else dims
    return struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in dims) + array.tobytes()


IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def write_idx(root: Path, folder: str = "MNIST", size: int = 28, n: tuple = (6, 3), **override: bytes):
    """The four IDX files; `override` replaces one file's bytes by name (train_images, test_labels, ...)."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    blobs = {}
    for split, count in zip(("train", "test"), n, strict=True):
        blobs[f"{split}_images"] = idx_bytes(RNG.integers(0, 256, (count, size, size), dtype=np.uint8))
        blobs[f"{split}_labels"] = idx_bytes(np.arange(count, dtype=np.uint8) % 10)
    blobs.update(override)
    for key, blob in blobs.items():
        (raw / IDX_NAMES[key]).write_bytes(blob)
    return raw, blobs


CIFAR_NAMES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def cifar_entry(n: int = 3, labels=None, data=None) -> dict:
    """One CIFAR-10 batch as its pickle holds it."""
    return {
        "batch_label": b"training batch",
        "labels": list(np.arange(n) % 10) if labels is None else labels,
        "data": RNG.integers(0, 256, (n, 3072), dtype=np.uint8) if data is None else data,
        "filenames": [b"x.png"] * n,
    }


def write_cifar(root: Path, **override: bytes) -> Path:
    """The six CIFAR-10 batch files; `override` replaces one file's bytes by name (data_batch_2, test_batch)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for name in CIFAR_NAMES:
        blob = override.get(name, pickle.dumps(cifar_entry(), protocol=2))
        (folder / name).write_bytes(blob)
    return folder


def svhn_arrays(n: int = 4, size: int = 32, channels: int = 3, y=None) -> dict:
    x = RNG.integers(0, 256, (size, size, channels, n), dtype=np.uint8)
    # the official files hold the labels as doubles 1..10, 10 standing for the digit 0
    return {"X": x, "y": (np.arange(n) % 10 + 1).astype(np.float64).reshape(n, 1) if y is None else y}


def svhn_bytes(arrays: dict, compress: bool = False) -> bytes:
    buf = io.BytesIO()
    savemat(buf, arrays, do_compression=compress)
    return buf.getvalue()


def write_svhn(root: Path, train=None, test=None, compress: bool = False) -> None:
    """The two SVHN .mat files; each split given as its bytes, its arrays, or None for a good one."""
    for split, mat in (("train", train), ("test", test)):
        path = root / f"{split}_32x32.mat"
        if isinstance(mat, bytes):
            path.write_bytes(mat)
        else:
            savemat(path, svhn_arrays() if mat is None else mat, do_compression=compress)


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def good_npz(n: int = 10, size: int = 16, channels: int | None = None, classes: int = 3) -> dict:
    shape = (n, size, size) if channels is None else (n, size, size, channels)
    return {"x": RNG.integers(0, 256, shape, dtype=np.uint8), "y": np.arange(n) % classes}


# --- the command, in-process, and how a refusal is judged ---------------------------------------------------------

# Only where a run must really happen; everything else fails before any work.
TINY_RUN = [
    "--train-size", "64", "--test-size", "32", "--epochs", "1", "--finetune-epochs", "1", "--batch-size", "32",
    "--round-to", "8", "--width", "0.125", "--calib-batches", "1", "--bn-recalib-batches", "1", "--no-progress",
    "--metric", "l1",
]  # fmt: skip
TINY_TRAIN = [*TINY_RUN[:6], "--batch-size", "32", "--width", "0.125", "--no-progress"]


def tree(folder: Path) -> dict:
    """Every path under folder with its bytes (None for a folder): what 'unchanged' compares."""
    if not folder.exists():
        return {}
    return {p.relative_to(folder): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


@dataclass
class Outcome:
    code: object
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        return self.err.splitlines()


def call(argv: list, capsys) -> Outcome:
    """`hybridprune ARGV` in this process: argparse's SystemExit is its exit status, and an exception that
    escapes main is reported as the traceback the user would have seen."""
    from hybridprune.cli import main

    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    except Exception:  # noqa: BLE001 - a bug in the code under test: show it as the user would see it
        code = "exception"
        print(traceback.format_exc(), file=sys.stderr)
    out, err = capsys.readouterr()
    return Outcome(code, out, err)


def assert_refused(o: Outcome, names: str | None = None, not_names: str | None = None) -> str:
    """Exit 2, exactly one line on stderr, no traceback anywhere; the line names `names`, and not `not_names`
    (the fail-safe of the case: had the bad value been accepted, the command would have failed on it)."""
    shown = f"exit {o.code}\n--- stderr ---\n{o.err}--- stdout (end) ---\n{o.out[-2000:]}"
    assert "Traceback" not in o.out + o.err, shown
    assert o.code == 2, shown
    assert len(o.lines) == 1 and o.lines[0].strip(), shown
    if names is not None:
        assert names in o.lines[0], shown
    if not_names is not None:
        assert not_names not in o.lines[0], shown
    return o.lines[0]


def refused_unchanged(argv: list, root: Path, capsys, names: str | None = None, not_names: str | None = None) -> str:
    """`hybridprune ARGV` is refused (see `assert_refused`) and leaves every byte under `root` as it was."""
    before = tree(root)
    line = assert_refused(call(argv, capsys), names, not_names)
    assert tree(root) == before, f"{root} changed: {line}"
    return line


# --- a second process holding a folder's lock -------------------------------------------------------------------

HOLDER = r"""
import os, sys, time
sys.path.insert(0, sys.argv[4])  # the same hybridprune as the test; importing it costs no torch, so this starts fast
from hybridprune.errors import HybridPruneError
from hybridprune.lock import FolderLock
folder, go, hold = sys.argv[1], sys.argv[2], float(sys.argv[3])
if go != "-":
    print("ready", flush=True)
while go != "-" and not os.path.exists(go):
    time.sleep(0.001)
try:
    lock = FolderLock(folder).acquire()
except HybridPruneError as e:
    print("refused", e, flush=True)
    sys.exit(0)
print("held", flush=True)
sys.stdin.read() if hold < 0 else time.sleep(hold)
lock.release()
"""


def holder(folder: Path, go: str = "-", hold: float = -1.0) -> subprocess.Popen:
    """A real second process running FolderLock(folder): holds it until its stdin closes (hold < 0) or for
    `hold` seconds, starting when the file `go` exists."""
    import hybridprune

    src = os.path.dirname(os.path.dirname(hybridprune.__file__))  # the folder holding the package under test
    return subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder), str(go), str(hold), src],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


# --- numbers stored on another machine ---------------------------------------------------------------------------


def stored_logits_tolerance(reference, reduction: int = 1024) -> dict[str, float]:
    """`assert_close` tolerances for logits stored on another machine (another CPU's kernels, another thread
    count, another library build). Those sum the same products in another order; each dot product of K terms
    then differs by at most about K * eps of the sum of its terms' magnitudes, so `reduction` (the longest
    product summed, rounded up, times the layers it passes) times eps, at the logits' scale, bounds every honest
    difference. A load that is wrong (a weight, a BatchNorm statistic, a mask) moves logits by percent.

    Example:
        >>> import torch
        >>> stored_logits_tolerance(torch.tensor([0.5, -2.0]))["atol"] < 1e-3
        True
    """
    import torch  # here, so that helpers imported by a torch-free subprocess stay torch-free

    eps = torch.finfo(reference.dtype).eps
    return {"rtol": reduction * eps, "atol": reduction * eps * float(reference.abs().max())}
