"""Hostile input through the real `hybridprune` entry point (issue 10).

Bad values are generated per class (every numeric flag, every checkpoint header field, every data file
format, every output target, every experiment value) and each one must end as the README promises: exit
status 2, one line on stderr, no traceback, and the output folder (or file and its folder) unchanged, byte
for byte. Most cases run `hybridprune.cli.main` in-process and fail before any work; a few run the installed
command in a real process, to show a clean stderr. The data-loss bugs of the issue have their tests in
test_regressions.py.

A case that fails on the code as it stands goes in as `pytest.param(..., marks=pytest.mark.xfail(strict=True,
reason=...))` on the case itself: its fix then shows as an XPASS. None is open now.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import resource
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from helpers import (
    IDX_NAMES,
    TINY_RUN,
    TINY_TRAIN,
    Outcome,
    assert_refused,
    call,
    cifar_entry,
    good_npz,
    idx_bytes,
    npz_bytes,
    refused_unchanged,
    svhn_arrays,
    svhn_bytes,
    tree,
    write_cifar,
    write_idx,
    write_svhn,
)
from hybridprune.cli import build_parser
from hybridprune.cli.flags import Bound, numeric_flags
from hybridprune.config import NMPattern
from hybridprune.models.sources import build_model
from hybridprune.pruning.checkpoint import save_checkpoint
from hybridprune.pruning.nm import nm_prune_

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # the few cases that compute are tiny

AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0  # root writes through any mode bits
COMMAND = Path(sys.executable).with_name("hybridprune")  # the installed console script of this venv
BENCH_QUICK = ["--device", "cpu", "--batch-sizes", "1", "--rounds", "1", "--calls", "1", "--no-progress"]
TINY_PRUNE = [
    "--train-size", "64", "--test-size", "32", "--finetune-epochs", "0", "--round-to", "8", "--calib-batches", "1",
    "--bn-recalib-batches", "0", "--no-progress", "--metric", "l1",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A dense alexnet (width 0.125) for 1x32x32 images, as `train` would write it, untrained."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    torch.manual_seed(0)
    save_checkpoint(path, build_model("alexnet", in_channels=1, image_size=32, width=0.125), None, {"stage": "dense"})
    return path


# --- 1. every numeric flag of every subcommand ---------------------------------------------------------------


def subcommands() -> dict:
    parser = build_parser()
    return next(a for a in parser._actions if a.dest == "command").choices


# (subcommand, flag) -> the Bound that parses it: that command's own kind and range for the flag
NUMERIC = numeric_flags(build_parser())


def bad_numbers(bound: Bound) -> list[str]:
    """nan, inf, negative, zero where zero is invalid, huge, empty, a word, and just past the top of the range."""
    (low, high), kind = bound.limits, bound.kind
    zero = ["0"] if low > 0 else []
    past_top = str(int(high) + 1) if kind is int else repr(high * 1.5)
    return ["nan", "inf", "-inf", "-1", *zero, "1e30", str(10**20), "", "ten", past_top]


def fail_safe(command: str, root: Path, ckpt: Path) -> list[str]:
    """Arguments with which `command` fails at once on a missing input named 'absent', should a bad value
    get through; nothing else in them is wrong (`ckpt` is a good checkpoint: prune reads it first)."""
    absent = root / "absent"
    out = root / "out"
    return {
        "run": ["run", "--dataset", f"npz:{absent}.npz", "--out", out, "--no-progress"],
        "train": ["train", "--dataset", f"npz:{absent}.npz", "--out", out / "dense.safetensors", "--no-progress"],
        "prune": ["prune", ckpt, "--dataset", f"npz:{absent}.npz", "--out", out, "--no-progress"],
        "evaluate": ["evaluate", f"{absent}.safetensors", "--json", out / "e.json"],
        "bench": ["bench", "--dense", f"{absent}.safetensors", "--device", "cpu", "--json", out / "b.json"],
        "convert": ["convert", f"{absent}.safetensors", "--device", "cpu", "--json", out / "c.json"],
        "experiment": ["experiment", f"{absent}.yaml", "--store", out / "s.sqlite", "--list"],
        "export": ["export", f"{absent}.safetensors", "--out", out / "m.onnx"],
        "quantize": ["quantize", f"{absent}.safetensors", "--out", out / "m.onnx", "--dataset", "digits"],
        "profile": ["profile", "--model", "alexnet", "--latency-table", f"{absent}.json", "--out", out / "t.json"],
    }[command]


NUMERIC_CASES = [
    pytest.param(command, flag, value, id=f"{command} {flag} {value!r}")
    for (command, flag), bound in NUMERIC.items()
    for value in bad_numbers(bound)
]


@pytest.mark.parametrize("command,flag,value", NUMERIC_CASES)
def test_bad_number_in_a_numeric_flag(tmp_path, capsys, tiny_checkpoint, command, flag, value):
    argv = [*fail_safe(command, tmp_path, tiny_checkpoint), flag, value]
    refused_unchanged(argv, tmp_path, capsys, names=flag, not_names="absent")


# Flags that take text: numbers inside it (a ratio, an N:M pattern, a list of batch sizes) or names (dtypes,
# metrics, devices); each is checked before any work, so a bad one never meets the fail-safe.
TEXT_FLAGS = {
    "--filter-ratio": (["run", "prune", "bench"], ["nan", "inf", "-inf", "-0.1", "1", "1.5", "1e30", "", "ten"]),
    "--nm": (["run", "prune"], ["", "x", "2:0", "0:4", "4:2", "4:4", "-2:4", "nan:4", "2:4:8", "2:", ":4", "2.5:4"]),
    "--batch-sizes": (
        ["bench"],
        ["", ",", "0", "-1", "nan", "inf", "1e30", str(10**9), str(10**20), "ten", "1,,0", "1.5"],
    ),
    "--dtypes": (["bench"], ["", ",", "float64", "int8", "ten"]),
    "--dtype": (["convert"], ["", "float64", "ten"]),
    "--metric": (["run", "prune"], ["", ",", " , ", "nosuch", "l1,nosuch"]),
    "--device": (["run", "bench", "convert"], ["", "tpu", "cuda:x", "gpu"]),
}
TEXT_CASES = [
    pytest.param(command, flag, value, id=f"{command} {flag} {value!r}")
    for flag, (commands, values) in TEXT_FLAGS.items()
    for command in commands
    for value in values
]


@pytest.mark.parametrize("command,flag,value", TEXT_CASES)
def test_bad_value_in_a_text_flag(tmp_path, capsys, tiny_checkpoint, command, flag, value):
    base = fail_safe(command, tmp_path, tiny_checkpoint)
    if flag == "--device" and "--device" in base:
        base[base.index("--device") + 1] = value
        argv = base
    else:
        argv = [*base, flag, value]
    refused_unchanged(argv, tmp_path, capsys, not_names="absent")


# Flags whose bad values are generated in another module: malformed model strings in test_hostile_inputs.py.
ELSEWHERE = {"--model"}


def test_every_flag_that_converts_its_value_meets_bad_values():
    """A flag with a `type` (a number, a ratio) is parsed by a Bound, so the cases above feed it bad numbers, or
    is in TEXT_FLAGS for its command (or in ELSEWHERE): one added without either would escape every case."""
    escaped = [
        f"{name} {'/'.join(action.option_strings)} ({getattr(action.type, '__name__', action.type)})"
        for name, sub in subcommands().items()
        for action in sub._actions
        if action.option_strings
        and action.type is not None
        and not isinstance(action.type, Bound)
        and not set(action.option_strings) & ELSEWHERE
        and not any(name in TEXT_FLAGS.get(flag, ((),))[0] for flag in action.option_strings)
    ]
    assert escaped == []
    assert len(NUMERIC_CASES) > 300  # the walk above found the subcommands


# --- 2. every header field of a checkpoint ----------------------------------------------------------------------


@dataclass
class Base:
    """One valid checkpoint, held as its tensors and its parsed header."""

    tensors: dict
    header: dict
    first_conv: str
    first_out: int


def _base(path: Path, model, masks=None) -> Base:
    save_checkpoint(path, model, masks, {"stage": "test", "nm": "2:4"})
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["hybridprune"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    conv = next(n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d))
    return Base(tensors, header, conv, model.get_submodule(conv).out_channels)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Dense and N:M checkpoints of resnet20 (width 0.5) and alexnet (width 0.125) for the digits dataset."""
    folder = tmp_path_factory.mktemp("bases")
    result = {}
    for name, width in (("resnet20", 0.5), ("alexnet", 0.125)):
        torch.manual_seed(0)
        model = build_model(name, in_channels=1, image_size=32, width=width).eval()
        result[name, "dense"] = _base(folder / f"{name}-dense.safetensors", model)
        nm = copy.deepcopy(model)
        result[name, "nm"] = _base(folder / f"{name}-nm.safetensors", nm, nm_prune_(nm, NMPattern()))
    return result


def write_checkpoint(path: Path, base: Base, field: str, value) -> Path:
    """The base checkpoint with header field `field` (a dotted path) set to `value` (MISSING deletes it);
    `raw:` fields replace the metadata itself, `tensor:` fields tamper with the tensors."""
    header, tensors = copy.deepcopy(base.header), dict(base.tensors)
    metadata = None
    if field == "raw:metadata":
        metadata = value
    elif field.startswith("tensor:"):  # tensor: and tensor:nm
        tensors = TENSOR_TAMPERING[value](tensors, base)
    else:
        *parents, key = field.split(".")
        node = header
        for p in parents:
            node = node[p]
        value = resolve(value, base)
        if value is MISSING:
            node.pop(key, None)
        else:
            node[key] = value
    metadata = {"hybridprune": json.dumps(header)} if metadata is None else metadata
    save_file(tensors, str(path), metadata=metadata)
    return path


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING = _Missing()
NAN, INF = float("nan"), float("inf")


def resolve(value, base: Base):
    """Values written against the model: FIRST is its first conv's name, ALL every one of its channels."""
    if value == "FIRST":
        return base.first_conv
    if value == "ALL":
        return list(range(base.first_out))
    if isinstance(value, list):
        return [resolve(v, base) for v in value]
    return value


def _drop_first_weight(tensors, base):
    key = next(k for k in tensors if k.endswith(".weight"))
    return {k: v for k, v in tensors.items() if k != key}


def _grow_first_weight(tensors, base):
    key = f"{base.first_conv}.weight"
    w = tensors[key]
    return {**tensors, key: torch.cat([w, w[:1]])}


def _extra_tensor(tensors, base):
    return {**tensors, "net.evil.weight": torch.zeros(3)}


def _break_nm(tensors, base):
    """N:M masks kept, but the masked weights filled in: the pattern no longer holds."""
    mask_key = next(k for k in tensors if k.startswith("__nm_mask__."))
    key = mask_key.removeprefix("__nm_mask__.") + ".weight"
    return {**tensors, key: torch.ones_like(tensors[key])}


def _mask_of_unknown_layer(tensors, base):
    mask_key = next(k for k in tensors if k.startswith("__nm_mask__."))
    return {**tensors, "__nm_mask__.net.nothing": tensors[mask_key].clone()}


def _mask_of_wrong_shape(tensors, base):
    mask_key = next(k for k in tensors if k.startswith("__nm_mask__."))
    return {**tensors, mask_key: tensors[mask_key][:1].clone()}


NM_TAMPERING = {
    "weights that break 2:4": _break_nm,
    "a mask of no layer": _mask_of_unknown_layer,
    "a mask of the wrong shape": _mask_of_wrong_shape,
}
TENSOR_TAMPERING = {
    "drop a weight": _drop_first_weight,
    "a weight one filter too big": _grow_first_weight,
    "an extra tensor": _extra_tensor,
    **NM_TAMPERING,
}

WRONG_INT = [MISSING, 10**12, "3", 3.5, True, None, [3], -1, 0, 1e12, NAN]
# Each list starts with the values the other commands also get (see header_cases); the rest go through evaluate.
HEADER_FIELDS = {
    "format": ["other", MISSING, 1, None, ["hybridprune-checkpoint"], "HYBRIDPRUNE-CHECKPOINT"],
    "version": [MISSING, 10**12, "2", 2.0, 1.0, True, -1, 0, 3, None, [2], NAN],
    "spec": [MISSING, "x", [], None, 1],
    "spec.model": [MISSING, "resnet20", [], None],
    "spec.model.kind": ["exe", MISSING, "", 1, None, True, ["builtin"], "user", "torchvision"],
    "spec.model.name": ["os:system", MISSING, "", 1, None, ["alexnet"], "nosuch", "../../../etc/passwd", "x" * 5000],
    "spec.model.args": [{"num_classes": 5}, "x", {"depth": 3}, MISSING, [], 1, None, {"evil": "__import__('os')"}],
    "spec.model.args.width": [1e12, "wide", 10**12, -1, 0, NAN, INF, -INF, True, None, [0.5] * 100, {"a": 1}],
    **{f"spec.input.{key}": WRONG_INT for key in ("channels", "image_size", "num_classes", "net_channels")},
    "spec.history": [
        "x",
        [["FIRST", True, [10**12]]],
        {"a": 1},
        None,
        5,
        ["x"],
        [None],
        [["FIRST", True, [-1]]],
        [["FIRST", "yes", [0]]],
        [["FIRST", True]],
        [[1, True, [0]]],
        [["FIRST", True, [0.5]]],
        # these three get as far as replaying the history on the built model: evaluate on alexnet only
        [["net.nope", True, [0]]],
        [["FIRST", True, [999_999]]],
        [["FIRST", True, "ALL"]],
    ],
    "raw:metadata": [{}, {"hybridprune": "not json"}, {"hybridprune": "[]"}, {"hybridprune": "null"}],
    "tensor:": ["drop a weight", "an extra tensor", "a weight one filter too big"],
}
NM_FIELDS = {
    "meta.nm": [5, "1:4", None, "x", "2:0", "0:4", "4:2", "2:4:8", ["2:4"]],
    "tensor:nm": list(NM_TAMPERING),
}


def short(value) -> str:
    """repr(value) in at most 40 characters, keeping both ends: values that differ only at the end (a nested
    field's value) keep ids of their own."""
    text = repr(value)
    return text if len(text) <= 40 else text[:24] + "..." + text[-13:]


def header_cases(command: str, flavour: str, model: str, per_field: int | None = None) -> list:
    """The bad header values of every field for `command` on a `flavour` (dense, nm) checkpoint of `model`:
    all of them, or the first `per_field` of each field."""
    fields = {**HEADER_FIELDS, **(NM_FIELDS if flavour == "nm" else {})}
    cases = []
    for field, values in fields.items():
        for value in values[:per_field]:
            case_id = f"{command} {model} {field}={short(value)}"
            cases.append(pytest.param(command, model, flavour, field, value, id=case_id))
    return cases


def header_argv(command: str, ckpt: Path, root: Path) -> list:
    return {
        "evaluate": ["evaluate", ckpt, "--test-size", "32", "--json", root / "eval.json"],
        "convert": ["convert", ckpt, "--device", "cpu", "--batch-size", "8", "--json", root / "convert.json"],
        "bench": ["bench", "--dense", ckpt, *BENCH_QUICK, "--json", root / "bench.json"],
        "prune": ["prune", ckpt, *TINY_PRUNE, "--out", root / "pruned"],
    }[command]


# Every command reads a header through the same checks: all values through evaluate on alexnet, the first
# ones of each field through the others and on resnet20 (a residual net, slower to build and trace).
HEADER_CASES = [
    *header_cases("evaluate", "nm", "alexnet"),
    *header_cases("evaluate", "nm", "resnet20", per_field=3),
    *header_cases("convert", "nm", "alexnet", per_field=2),
    *header_cases("convert", "nm", "resnet20", per_field=1),
    *header_cases("bench", "dense", "alexnet", per_field=2),
    *header_cases("bench", "dense", "resnet20", per_field=1),
    *header_cases("prune", "dense", "alexnet", per_field=2),
    *header_cases("prune", "dense", "resnet20", per_field=1),
]


@pytest.mark.parametrize(
    "command,model",
    [(c, m) for m in ("alexnet", "resnet20") for c in ("evaluate", "convert", "bench", "prune")],
    ids=lambda v: v,
)
def test_the_untampered_checkpoints_work(tmp_path, capsys, bases, command, model):
    """The base of every header case is good: what fails below fails for the field that was changed."""
    flavour = "dense" if command in ("bench", "prune") else "nm"
    ckpt = tmp_path / "model.safetensors"
    save_file(
        bases[model, flavour].tensors, str(ckpt), metadata={"hybridprune": json.dumps(bases[model, flavour].header)}
    )
    o = call(header_argv(command, ckpt, tmp_path), capsys)
    assert o.code == 0, o.err


@pytest.mark.parametrize("command,model,flavour,field,value", HEADER_CASES)
def test_bad_checkpoint_header(tmp_path, capsys, bases, command, model, flavour, field, value):
    ckpt = write_checkpoint(tmp_path / "model.safetensors", bases[model, flavour], field, value)
    refused_unchanged(header_argv(command, ckpt, tmp_path), tmp_path, capsys)


# --- 3. every data file format ------------------------------------------------------------------------------
# Each case is a maker, called inside the test, of what write_bad_data writes under the test's tmp_path.


def cut(blob: bytes, point: int | str) -> bytes:
    """`blob` cut short: to `point` bytes, one byte short (-1), or to half its length ("half")."""
    end = len(blob) // 2 if point == "half" else point
    assert blob[:end] != blob, "a cut must leave the file shorter"
    return blob[:end]


def cut_cases(prefix: str, make: Callable[[], bytes], *points: int | str) -> dict[str, Callable[[], bytes]]:
    """Cases named `prefix` + where the file is cut: its start, a byte count, the middle, one byte short."""
    names = {"half": "cut in half", -1: "cut one byte short"}
    return {prefix + names.get(p, f"cut to {p} bytes"): lambda p=p: cut(make(), p) for p in points}


def npz_with_label(label: int) -> bytes:
    labels = np.arange(10) % 3
    labels[4] = label
    return npz_bytes(**good_npz() | {"y": labels})


NPZ_CASES = {
    **cut_cases("", lambda: npz_bytes(**good_npz()), 0, 30, "half", -1),
    "label 1000000": lambda: npz_with_label(1_000_000),
    "label -1": lambda: npz_with_label(-1),
    "label 2**40": lambda: npz_with_label(2**40),
    "32x40 images": lambda: npz_bytes(**good_npz() | {"x": np.zeros((10, 32, 40), np.uint8)}),
    "1x1 images": lambda: npz_bytes(**good_npz(size=1)),
    "5-channel images": lambda: npz_bytes(**good_npz(channels=5)),
}
IDX_IMAGES, IDX_LABELS = np.zeros((6, 28, 28), np.uint8), np.arange(6, dtype=np.uint8)
IDX_CASES = {  # each replaces one of the four files
    **{
        what: lambda make=make: {"train_images": make()}
        for what, make in cut_cases("train images ", lambda: idx_bytes(IDX_IMAGES), 0, 15, 116, -1).items()
    },
    **{
        what: lambda make=make: {"train_labels": make()}
        for what, make in cut_cases("train labels ", lambda: idx_bytes(IDX_LABELS), 7, -1).items()
    },
    "label 10": lambda: {"train_labels": idx_bytes(np.array([0, 1, 2, 10, 4, 5], np.uint8))},
    "label 255": lambda: {"test_labels": idx_bytes(np.array([255, 1, 2], np.uint8))},
    "label -1 as signed bytes": lambda: {"train_labels": idx_bytes(np.array([0, 1, -1, 3, 4, 5], np.int8), 0x0901)},
    "label 1000000 as int32": lambda: {"train_labels": idx_bytes(np.full(6, 1_000_000, ">i4"), 0x0C01)},
    "28x20 images": lambda: {"train_images": idx_bytes(np.zeros((6, 28, 20), np.uint8))},
    "1x1 images": lambda: {"train_images": idx_bytes(np.zeros((6, 1, 1), np.uint8))},
    "5-channel images": lambda: {"train_images": idx_bytes(np.zeros((6, 28, 28, 5), np.uint8))},
}


def cifar_bytes(**entry) -> bytes:
    return pickle.dumps(cifar_entry(**entry), protocol=2)


CIFAR_CASES = {
    **cut_cases("", cifar_bytes, 0, 50, "half", -1),
    **{f"labels {labels}": lambda labels=labels: cifar_bytes(labels=labels) for labels in ([0, 1, 10], [0, -1, 2])},
    "labels [0, 1, 1000000]": lambda: cifar_bytes(labels=[0, 1, 1_000_000]),
    "32x40 images": lambda: cifar_bytes(data=np.zeros((3, 3 * 32 * 40), np.uint8)),
    "1x1 images": lambda: cifar_bytes(data=np.zeros((3, 3), np.uint8)),
    "5-channel images": lambda: cifar_bytes(data=np.zeros((3, 5 * 32 * 32), np.uint8)),
}


def svhn_labels(y: float) -> dict:
    return svhn_arrays(y=np.array([[1.0], [y], [3.0], [4.0]]))


SVHN_CASES = {  # bytes, or the arrays of a well-formed file
    **cut_cases("", lambda: svhn_bytes(svhn_arrays()), 0, 127, "half", -1),
    **{f"label {y}": lambda y=y: svhn_labels(y) for y in (11, -3, 1e300)},
    "32x20 images": lambda: svhn_arrays() | {"X": np.zeros((32, 20, 3, 4), np.uint8)},
    "1x1 images": lambda: svhn_arrays(size=1),
    "5-channel images": lambda: svhn_arrays(channels=5),
}
DATA_CASES = {"npz": NPZ_CASES, "mnist": IDX_CASES, "cifar10": CIFAR_CASES, "svhn": SVHN_CASES}


def write_bad_data(root: Path, fmt: str, case) -> tuple[str, str, str]:
    """Writes one bad dataset under root; returns (--dataset, --data-dir, the file the line must name)."""
    data = root / "data"
    data.mkdir()
    if fmt == "npz":
        (data / "data.npz").write_bytes(case)
        return f"npz:{data / 'data.npz'}", str(data), "data.npz"
    if fmt == "mnist":
        write_idx(data, **case)
        return "mnist", str(data), IDX_NAMES[next(iter(case))]
    if fmt == "cifar10":
        write_cifar(data, data_batch_2=case)
        return "cifar10", str(data), "data_batch_2"
    write_svhn(data, train=case)
    return "svhn", str(data), "train_32x32.mat"


DATA_PARAMS = [
    pytest.param(command, fmt, what, id=f"{command} {fmt} {what}")
    for command in ("run", "evaluate")
    for fmt, cases in DATA_CASES.items()
    for what in cases
]


@pytest.mark.parametrize("command,fmt,what", DATA_PARAMS)
def test_bad_data_file(tmp_path, capsys, tiny_checkpoint, command, fmt, what):
    dataset, data_dir, name = write_bad_data(tmp_path, fmt, DATA_CASES[fmt][what]())
    common = ["--dataset", dataset, "--data-dir", data_dir]
    if command == "run":
        argv = ["run", *common, *TINY_RUN, "--out", tmp_path / "out"]
    else:
        argv = ["evaluate", tiny_checkpoint, *common, "--json", tmp_path / "eval.json"]
    refused_unchanged(argv, tmp_path, capsys, names=name)


# --- 4. bad output targets --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_nm_checkpoint(tmp_path_factory, tiny_checkpoint):
    from hybridprune.pruning.checkpoint import load_checkpoint

    model = load_checkpoint(tiny_checkpoint)[0]
    path = tmp_path_factory.mktemp("ckpt") / "tiny-nm.safetensors"
    save_checkpoint(path, model, nm_prune_(model, NMPattern()), {"stage": "nm", "nm": "2:4"})
    return path


def target_argv(command: str, ckpt: Path, nm_ckpt: Path) -> list:
    """A command that would do real (tiny) work: only its output target is wrong."""
    return {
        "run": ["run", *TINY_RUN],
        "train": ["train", *TINY_TRAIN],
        "prune": ["prune", ckpt, *TINY_PRUNE],
        "evaluate": ["evaluate", ckpt, "--test-size", "32"],
        "convert": ["convert", nm_ckpt, "--device", "cpu", "--batch-size", "8"],
        "bench": ["bench", "--dense", ckpt, *BENCH_QUICK],
    }[command]


def users_things(root: Path) -> None:
    """A user's file and a user's folder with a file in it: targets that must be left alone."""
    (root / "notes.json").write_text('{"mine": true}')
    (root / "folder").mkdir()
    (root / "folder" / "keep.txt").write_text("mine")


# (command, flag, target relative to root, extra flags, what the line must name)
TARGETS = [
    *[(c, "--out", "notes.json", [], "notes.json") for c in ("run", "prune")],
    *[(c, "--out", "notes.json/run", [], "notes.json") for c in ("run", "prune")],
    ("run", "--out", "a\0b", [], "NUL"),
    ("train", "--out", "folder", [], "folder"),
    ("train", "--out", "folder", ["--overwrite"], "folder"),
    ("train", "--out", "notes.json", [], "notes.json"),
    ("train", "--out", "notes.json/dense.safetensors", ["--overwrite"], "notes.json"),
    ("train", "--out", "x" * 250 + ".safetensors", [], "too long"),
    *[(c, "--json", "folder", [], "folder") for c in ("run", "prune", "evaluate", "convert", "bench")],
    *[(c, "--json", "folder", ["--overwrite"], "folder") for c in ("run", "prune", "evaluate", "convert", "bench")],
    *[(c, "--json", "notes.json", [], "notes.json") for c in ("run", "prune", "evaluate", "convert", "bench")],
    *[(c, "--json", "notes.json/r.json", [], "notes.json") for c in ("run", "evaluate", "bench")],
]
TARGET_CASES = [
    pytest.param(c, flag, target, extra, names, id=f"{c} {flag} {short(target)} {' '.join(extra)}".strip())
    for c, flag, target, extra, names in TARGETS
]


@pytest.mark.parametrize("command,flag,target,extra,names", TARGET_CASES)
def test_bad_output_target(tmp_path, capsys, tiny_checkpoint, tiny_nm_checkpoint, command, flag, target, extra, names):
    users_things(tmp_path)
    argv = [*target_argv(command, tiny_checkpoint, tiny_nm_checkpoint), flag, str(tmp_path / target), *extra]
    if flag == "--json" and command in ("run", "prune"):
        argv += ["--out", tmp_path / "run"]  # a good folder: only --json is wrong
    refused_unchanged(argv, tmp_path, capsys, names=names)


@pytest.mark.parametrize("case", ["experiment --store folder", "experiment --store under a file", "report --out file"])
def test_bad_store_and_report_targets(tmp_path, capsys, case):
    users_things(tmp_path)
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(GOOD_GRID))
    (tmp_path / "store.sqlite").write_bytes(b"")
    grid = ["experiment", tmp_path / "grid.yaml", "--list", "--store"]
    argv, names = {
        "experiment --store folder": ([*grid, tmp_path / "folder"], "folder"),
        "experiment --store under a file": ([*grid, tmp_path / "notes.json" / "s.sqlite"], "notes.json"),
        "report --out file": (["report", "--store", tmp_path / "store.sqlite", "--out", tmp_path / "notes.json"],
                              "notes.json"),
    }[case]  # fmt: skip
    refused_unchanged(argv, tmp_path, capsys, names=names)


# --- 5. bad experiment YAML values ---------------------------------------------------------------------------

GOOD_GRID = {
    "name": "hostile",
    "datasets": [{"dataset": "digits", "train_size": 64, "test_size": 32}],
    "models": [{"name": "alexnet", "width": 0.125}],
    "metrics": ["l1"],
    "ratios": [0.4],
    "seeds": [0],
    "train": {"epochs": 1, "batch_size": 32},
    "finetune": {"epochs": 1, "batch_size": 32},
    "prune": {"round_to": 8, "calib_batches": 1, "bn_recalib_batches": 1},
}
GRID_VALUES = {
    "seeds": [["one"], [0, "x"], "0", 0, [1.5], [-1], [True], [], [2**40], {"a": 1}, None, [NAN]],
    "ratios": [[NAN], ["half"], [INF], [1.5], [-0.1], [1.0], "0.4", [], [None], [True]],
    "metrics": [[], "l1", {"l1": 1}, [1], ["nope"], [None], [""], None],
    "train.epochs": ["ten", -1, 1.5, NAN, True, None, 10**12],
    "train.lr": ["fast", NAN, INF, -1, 0, 1e30],
    "train": ["fast", [1], {"bogus": 1}, {"batch_size": 0}],
    "finetune.epochs": ["ten", INF],
    "datasets": [[1], 5, [["digits"]], [{"dataset": 5}], [{"dataset": "digits", "train_size": "x"}],
                 [{"dataset": "digits", "train_size": -1}], [None], [{"dataset": "nosuch"}], [{"bogus": 1}]],
    "models": [[["alexnet"]], [1], [{"name": "alexnet", "width": "wide"}], [{"name": "alexnet", "width": NAN}],
               [{"name": 5}], [{"name": "alexnet", "width": 1e12}], [None], [{"name": "nosuch"}]],
    "prune": [[1], {"round_to": "8"}, {"calib_batches": 0}, {"nm": "2:0"}, {"metric": "l1"}, {"round_to": NAN}],
    "filter_finetune": ["no", 2, None],
    "name": [[1], 5, None],
    "recipes": [[], ["nosuch"], "plain", [1], {"kd": None}, {"kd": {"bogus": {}}}, {"kd": {"prune": {"steps": 0}}},
                {"kd": {"prune": {"metric": "l1"}}}, {"kd": {"finetune": {"epochs": 9}}}, {"kd": {"prune": [1]}},
                {"kd": {"finetune": {"distill_weight": NAN}}}, {"a b": {}}, {"kd": {"prune": {"allocation": "x"}}}],
}  # fmt: skip
GRID_TEXTS = {
    "a list, not a mapping": "- a\n- b\n",
    "a number": "5\n",
    "not YAML": "a: [1\n",
    "unknown key": "sed: 1\n",
}
GRID_CASES = [
    pytest.param(key, value, id=f"{key}={short(value)}") for key, values in GRID_VALUES.items() for value in values
] + [pytest.param("text", text, id=f"text: {what}") for what, text in GRID_TEXTS.items()]


def grid_text(key: str, value) -> str:
    if key == "text":
        return value
    grid = copy.deepcopy(GOOD_GRID)
    *parents, last = key.split(".")
    node = grid
    for p in parents:
        node = node[p]
    node[last] = value
    return yaml.safe_dump(grid)


def test_the_untampered_grid_is_accepted(tmp_path, capsys):
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(GOOD_GRID))
    o = call(["experiment", tmp_path / "grid.yaml", "--store", tmp_path / "s.sqlite", "--list"], capsys)
    assert o.code == 0 and o.err == "", o.err


@pytest.mark.parametrize("key,value", GRID_CASES)
def test_bad_experiment_value(tmp_path, capsys, key, value):
    (tmp_path / "grid.yaml").write_text(grid_text(key, value))
    argv = ["experiment", tmp_path / "grid.yaml", "--store", tmp_path / "store" / "s.sqlite", "--list"]
    refused_unchanged(argv, tmp_path, capsys)


# --- the same promise on a real stderr ---------------------------------------------------------------------


def run_command(argv) -> Outcome:
    """The installed `hybridprune` command in a process of its own."""
    proc = subprocess.run([str(COMMAND), *map(str, argv)], capture_output=True, text=True, timeout=300)
    return Outcome(proc.returncode, proc.stdout, proc.stderr)


def process_cases(root: Path, bases) -> dict:
    (root / "short.npz").write_bytes(npz_bytes(**good_npz())[:100])
    ckpt = write_checkpoint(root / "wide.safetensors", bases["alexnet", "dense"], "spec.model.args.width", 1e12)
    return {
        "numeric flag": ["run", "--seed", "nan", "--out", root / "out"],
        "header width 1e12": ["evaluate", ckpt, "--json", root / "out.json"],
        "data cut short": ["run", "--dataset", f"npz:{root / 'short.npz'}", *TINY_RUN, "--out", root / "out"],
    }


@pytest.mark.parametrize(
    "case", ["numeric flag", "header width 1e12", pytest.param("data cut short", marks=pytest.mark.slow)]
)
def test_in_a_real_process(tmp_path, bases, case):
    argv = process_cases(tmp_path, bases)[case]
    before = tree(tmp_path)
    assert_refused(run_command(argv))
    assert tree(tmp_path) == before


@contextmanager
def address_space_headroom(gib: float):
    """Let this process map at most `gib` GiB more than it has now: a model that should have been refused fails
    to allocate here, fast, instead of taking the machine's memory (the limit is lifted again after)."""
    status = Path("/proc/self/status")
    if not status.exists():
        pytest.skip("needs /proc/self/status to bound this process's memory")
    vm = next(int(line.split()[1]) * 1024 for line in status.read_text().splitlines() if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (vm + int(gib * 2**30), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


# Headers inside every bound the checker applies field by field, describing models of billions of parameters:
# refused before anything is allocated (with 2 GiB of headroom, an allocation attempt fails and shows here).
BIG_MODELS = {
    "evaluate alexnet width 16": ("evaluate", ("alexnet", "nm"), None, {"width": 16.0}),
    "bench alexnet widths 8192": ("bench", ("alexnet", "dense"), None, {"widths": [8192] * 5, "hidden": [8192] * 2}),
    "convert vgg16 width 16": ("convert", ("resnet20", "nm"), "vgg16", {"width": 16.0}),
    "prune alexnet width 16 on 4096x4096 images": ("prune", ("alexnet", "dense"), 4096, {"width": 16.0}),
}


@pytest.mark.parametrize("case", [pytest.param(case, id=case) for case in BIG_MODELS])
def test_a_header_describing_a_huge_model_is_refused_before_allocation(tmp_path, capsys, bases, case):
    command, key, other, args = BIG_MODELS[case]
    base = copy.deepcopy(bases[key])
    if other == "vgg16":
        base.header["spec"]["model"]["name"] = "vgg16"
    elif other == 4096:
        base.header["spec"]["input"]["image_size"] = 4096
    ckpt = write_checkpoint(tmp_path / "big.safetensors", base, "spec.model.args", args)
    argv = header_argv(command, ckpt, tmp_path)
    with address_space_headroom(2):
        before = tree(tmp_path)
        o = call(argv, capsys)
    assert_refused(o)
    assert tree(tmp_path) == before


# As root, the command runs as nobody; nobody cannot read this Python's installation (under /root), so the
# process loads every hybridprune module first and then drops its privileges, as tests/test_outputs.py does.
AS_NOBODY = r"""
import importlib, os, pkgutil, sys
import hybridprune
for module in pkgutil.walk_packages(hybridprune.__path__, "hybridprune."):  # every module, sub-packages' too
    importlib.import_module(module.name)
from hybridprune.cli import main
if os.geteuid() == 0:
    os.setgroups([])
    os.setresgid(65534, 65534, 65534)
    os.setresuid(65534, 65534, 65534)
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture
def read_only(tmp_path):
    """A folder holding a read-only folder `ro` (with a user's file) that the command's user can reach."""
    base = Path(tempfile.mkdtemp()) if AS_ROOT else tmp_path  # pytest's tmp_path is 0700: nobody gets no way in
    base.chmod(0o755)
    (base / "ro").mkdir()
    (base / "ro" / "mine.txt").write_text("mine")
    (base / "ro").chmod(0o555)
    yield base
    (base / "ro").chmod(0o755)
    if AS_ROOT:
        shutil.rmtree(base)


@pytest.mark.parametrize("target", ["run --out", "train --out", "evaluate --json"])
def test_a_read_only_folder_is_refused_in_a_real_process(read_only, tiny_checkpoint, target):
    ro = read_only / "ro"
    ckpt = read_only / "tiny.safetensors"
    shutil.copy(tiny_checkpoint, ckpt)
    ckpt.chmod(0o644)
    argv = {
        "run --out": ["run", *TINY_RUN, "--out", ro / "run"],
        "train --out": ["train", *TINY_TRAIN, "--out", ro / "dense.safetensors"],
        "evaluate --json": ["evaluate", ckpt, "--test-size", "32", "--json", ro / "eval.json"],
    }[target]
    before = tree(read_only)
    proc = subprocess.run(
        [sys.executable, "-c", AS_NOBODY, *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=read_only,
        # libraries imported up front (matplotlib, via Lightning) keep their caches out of the folder compared
        env={**os.environ, "HOME": str(read_only), "MPLCONFIGDIR": tempfile.mkdtemp()},
    )
    line = assert_refused(Outcome(proc.returncode, proc.stdout, proc.stderr))
    assert "permission denied" in line.lower() and str(ro) in line, line
    assert tree(read_only) == before


def test_every_case_has_an_id_of_its_own():
    """An id is how a case is selected (`-k`), reported and marked as a known failure: two cases sharing one
    (pytest would run both as ID0 and ID1) could not be told apart."""
    cases = [*NUMERIC_CASES, *TEXT_CASES, *HEADER_CASES, *DATA_PARAMS, *TARGET_CASES, *GRID_CASES]
    assert [i for i, n in Counter(p.id for p in cases).items() if n > 1] == []
