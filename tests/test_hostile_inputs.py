"""Hostile input, round two (issue 17): decompression bombs, non-finite numbers, malformed model strings, foreign
SQLite files, and the checks that must come before any file is written.

Each class of bad input has a generator below, and every generated case goes through the real `hybridprune`
entry point and must end as the README promises: exit status 2, exactly one line on stderr, no traceback, and
the folder it names (or the test's whole folder) unchanged, byte for byte. The images are written by the tests
in their real on-disk formats, from a small image saved by Pillow whose header is then made to claim an absurd
size; the SQLite files are made with sqlite3; the checkpoints and state dicts are the real formats.
"""

from __future__ import annotations

import io
import re
import sqlite3
import struct
import traceback
import warnings
import zlib
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from hybridprune.config import MAX_IMAGE_PIXELS
from hybridprune.data.batching import batches
from hybridprune.data.datasets import load_dataset
from hybridprune.errors import HybridPruneError
from hybridprune.experiments.store import SCHEMA, TABLES, Store, create_table
from hybridprune.models.sources import build_model
from hybridprune.pruning.checkpoint import load_checkpoint, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HAS_CUDA = torch.cuda.is_available()
QUICK = ["--train-size", "64", "--test-size", "32", "--no-progress"]  # flags run, train and prune all take


# --- the command, in-process, and how a refusal is judged ---------------------------------------------------------


@dataclass
class Outcome:
    code: object
    out: str
    err: str


def call(argv: list, capsys) -> Outcome:
    """`hybridprune ARGV` in this process; an exception escaping main is shown as the user's traceback."""
    from hybridprune.cli import main

    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    except Exception:  # noqa: BLE001 - a bug in the code under test: show it as the user would see it
        code = "exception"
        print(traceback.format_exc(), file=__import__("sys").stderr)
    out, err = capsys.readouterr()
    return Outcome(code, out, err)


def tree(folder: Path) -> dict:
    """Every path under `folder` with its bytes (None for a folder): what 'unchanged' compares."""
    if not folder.exists():
        return {}
    return {p.relative_to(folder): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def assert_refused(o: Outcome, *names: str) -> str:
    """Exit 2, exactly one line on stderr, no traceback anywhere, and the line names each of `names`."""
    shown = f"exit {o.code}\n--- stderr ---\n{o.err}--- stdout (end) ---\n{o.out[-1500:]}"
    lines = o.err.strip().splitlines()
    assert o.code == 2, shown
    assert len(lines) == 1, shown
    assert "Traceback" not in o.err + o.out, shown
    for name in names:
        assert name in lines[0], f"{name!r} not in the line\n{shown}"
    return lines[0]


def refused_unchanged(argv: list, root: Path, capsys, *names: str) -> str:
    """`hybridprune ARGV` is refused (see `assert_refused`) and leaves every byte under `root` as it was."""
    before = tree(root)
    line = assert_refused(call(argv, capsys), *names)
    assert tree(root) == before, f"{root} changed: {line}"
    return line


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A dense alexnet (width 0.125) for digits (1x32x32, 10 classes), as `train` writes it, untrained."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    torch.manual_seed(0)
    save_checkpoint(path, build_model("alexnet", in_channels=1, image_size=32, width=0.125), None, {"stage": "dense"})
    return path


# --- 1. image headers claiming absurd sizes, in every format the loader accepts ------------------------------------


def _small(fmt: str, mode: str = "RGB") -> bytes:
    pixels = (np.arange(20 * 24 * 3) % 251).astype(np.uint8).reshape(20, 24, 3)
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, fmt)
    return buf.getvalue()


def _png(width: int, height: int) -> bytes:
    data = bytearray(_small("PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # a valid chunk: only its claim is absurd
    return bytes(data)


def _jpeg(width: int, height: int) -> bytes:
    data = bytearray(_small("JPEG"))
    sof = data.index(b"\xff\xc0")  # baseline frame header: length, precision, height, width
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _bmp(width: int, height: int) -> bytes:
    data = bytearray(_small("BMP"))
    data[18:26] = struct.pack("<ii", width, height)  # BITMAPINFOHEADER
    return bytes(data)


def _netpbm(mode: str) -> callable:
    def write(width: int, height: int) -> bytes:
        return re.sub(rb"^(P[56])\s+\d+\s+\d+", b"\\1\n%d %d" % (width, height), _small("PPM", mode), count=1)

    return write


def _tiff(width: int, height: int) -> bytes:
    data = bytearray(_small("TIFF"))
    assert data[:4] == b"II*\x00"
    ifd = struct.unpack("<I", data[4:8])[0]
    for k in range(struct.unpack("<H", data[ifd : ifd + 2])[0]):
        entry = ifd + 2 + 12 * k
        tag = struct.unpack("<H", data[entry : entry + 2])[0]
        if tag in (256, 257):  # ImageWidth, ImageLength, rewritten as LONGs
            data[entry + 2 : entry + 12] = struct.pack("<HII", 4, 1, width if tag == 256 else height)
    return bytes(data)


def _webp(width: int, height: int) -> bytes:
    data = bytearray(_small("WEBP"))
    start = data.index(b"\x9d\x01\x2a")  # VP8 key frame: 14-bit width and height follow the start code
    data[start + 3 : start + 7] = struct.pack("<HH", width, height)
    return bytes(data)


IMAGE_WRITERS = {
    "png": _png,
    "jpg": _jpeg,
    "bmp": _bmp,
    "ppm": _netpbm("RGB"),
    "pgm": _netpbm("L"),
    "tiff": _tiff,
    "webp": _webp,
}
# over our bound only; over Pillow's warning bound (89 MP); over Pillow's error bound (179 MP); VP8 holds 14 bits
ABSURD_SIZES = {"over-ours": (8000, 8000), "pillow-warns": (10000, 10000), "pillow-fails": (16000, 16000)}


def test_the_generated_headers_claim_their_sizes_and_are_real_files():
    """The generator is right: Pillow reads each header as the claimed size (the files are real formats)."""
    for ext, write in IMAGE_WRITERS.items():
        with Image.open(io.BytesIO(write(24, 20))) as img:
            assert img.size == (24, 20), ext
            img.load()  # the unmodified size decodes
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(write(*ABSURD_SIZES["over-ours"]))) as img:
                assert img.size == ABSURD_SIZES["over-ours"], ext
    assert 8000 * 8000 > MAX_IMAGE_PIXELS and MAX_IMAGE_PIXELS < Image.MAX_IMAGE_PIXELS


def image_folder(root: Path, bombs: dict[str, bytes], split: str = "val") -> tuple[Path, list[str]]:
    """train/{a,b}/ and val/{a,b}/ with good PNGs, and each of `bombs` (file name -> bytes) in SPLIT/b/."""
    for part in ("train", "val"):
        for label, name in enumerate("ab"):
            folder = root / part / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(2):
                pixels = np.full((20, 24, 3), 40 + 120 * label + i, np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    paths = []
    for file_name, data in bombs.items():
        (root / split / "b" / file_name).write_bytes(data)
        paths.append(str(root / split / "b" / file_name))
    return root, paths


@pytest.fixture(scope="module")
def folder_checkpoint(tmp_path_factory) -> Path:
    """A resnet20 for 3x16x16 images of the classes a and b, as `train` on such a folder writes it."""
    path = tmp_path_factory.mktemp("fckpt") / "ab.safetensors"
    torch.manual_seed(0)
    model = build_model("resnet20", in_channels=3, image_size=16, num_classes=2, width=0.5)
    save_checkpoint(path, model, None, {"stage": "dense", "classes": ["a", "b"]})
    return path


BOMB_CASES = [(ext, size) for ext in IMAGE_WRITERS for size in ABSURD_SIZES]


@pytest.mark.parametrize("ext,size", BOMB_CASES, ids=[f"{e}-{s}" for e, s in BOMB_CASES])
def test_strict_refuses_a_bomb_in_one_line_naming_the_file(tmp_path, capsys, folder_checkpoint, ext, size):
    width, height = ABSURD_SIZES[size]
    root, [bomb] = image_folder(tmp_path / "data", {f"bomb.{ext}": IMAGE_WRITERS[ext](width, height)})
    workers = "1" if size == "pillow-warns" else "0"  # the check runs in DataLoader workers and in this process
    argv = ["evaluate", folder_checkpoint, "--dataset", f"folder:{root}", "--image-size", "16", "--strict"]
    line = refused_unchanged([*argv, "--workers", workers], tmp_path, capsys, bomb, "pixels")
    assert "DecompressionBomb" not in line and f"{MAX_IMAGE_PIXELS:,}" in line


@pytest.mark.parametrize("workers", [0, 1])
def test_without_strict_every_bomb_is_skipped_counted_and_never_decoded(tmp_path, capfd, monkeypatch, workers):
    from PIL import ImageFile

    bombs = {f"{size}.{ext}": IMAGE_WRITERS[ext](*ABSURD_SIZES[size]) for ext, size in BOMB_CASES}
    root, paths = image_folder(tmp_path / "data", bombs)
    decoded = []
    real_load = ImageFile.ImageFile.load

    def load(self):  # records what this process decodes (workers=0: all of it)
        decoded.append(self.filename)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    ds = load_dataset(f"folder:{root}", image_size=16, workers=workers)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning of Pillow's that reached this process would fail here
        got = [y for _, y in batches(ds.test, 8)]
    assert sorted(torch.cat(got).tolist()) == [0, 0, 1, 1]  # the good images all came through
    assert ds.test.skipped.paths == set(paths)
    assert not set(decoded) & set(paths)
    err = capfd.readouterr().err
    assert "DecompressionBomb" not in err and "Traceback" not in err
    assert Image.MAX_IMAGE_PIXELS == 89478485  # Pillow's own setting, untouched


def test_a_file_of_another_format_under_an_accepted_name_is_skipped(tmp_path):
    gif = io.BytesIO()
    Image.new("RGB", (20, 24)).save(gif, "GIF")
    root, [fake] = image_folder(tmp_path / "data", {"not-a.png": gif.getvalue()})
    ds = load_dataset(f"folder:{root}", image_size=16, workers=0)
    list(batches(ds.test, 8))
    assert ds.test.skipped.paths == {fake}


# --- 2. NaN and infinity in each tensor of a checkpoint and of a state dict ------------------------------------


def _poisoned(tensors: dict[str, torch.Tensor], name: str, value: float) -> dict[str, torch.Tensor]:
    out = {k: v.clone() for k, v in tensors.items()}
    out[name].view(-1)[out[name].numel() // 2] = value
    return out


def _float_names(path: Path) -> list[str]:
    with safe_open(str(path), framework="pt") as f:
        return [k for k in f.keys() if f.get_slice(k).get_dtype().startswith(("F", "BF"))]


@pytest.fixture(scope="module")
def checkpoint_tensors(tiny_checkpoint) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(str(tiny_checkpoint), framework="pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


CHECKPOINT_TENSORS = 33  # float tensors of the tiny alexnet (its masks would be bool: not numbers)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("index", range(CHECKPOINT_TENSORS))
def test_a_checkpoint_holding_a_non_finite_number_is_refused_naming_the_tensor(
    tmp_path, capsys, tiny_checkpoint, checkpoint_tensors, index, value
):
    metadata, tensors = checkpoint_tensors
    names = _float_names(tiny_checkpoint)
    assert len(names) == CHECKPOINT_TENSORS
    name = names[index]
    bad = tmp_path / "dense.safetensors"
    save_file(_poisoned(tensors, name, value), str(bad), metadata=metadata)
    argv = ["prune", bad] if index % 2 else ["run", "--checkpoint", bad]  # both read it before anything else
    what = "NaN" if value != value else "infinity"
    refused_unchanged([*argv, "--out", tmp_path / "out", *QUICK], tmp_path, capsys, str(bad), repr(name), what)


@pytest.fixture(scope="module")
def digits_state(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The plain state dict of the network `--model alexnet --width 0.125` builds for digits."""
    torch.manual_seed(1)
    net = build_model("alexnet", in_channels=1, image_size=32, width=0.125).net
    return {k: v.clone() for k, v in net.state_dict().items()}


STATE_TENSORS = 31


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("index", range(STATE_TENSORS))
def test_weights_holding_a_non_finite_number_are_refused_before_any_file(tmp_path, capsys, digits_state, index, value):
    names = [k for k, v in digits_state.items() if v.is_floating_point()]
    assert len(names) == STATE_TENSORS
    name, fmt = names[index], "pt" if index % 2 else "safetensors"  # .pt is read with weights_only=True
    weights = tmp_path / f"trained.{fmt}"
    state = _poisoned(digits_state, name, value)
    save_file(state, str(weights)) if fmt == "safetensors" else torch.save(state, weights)
    flags = ["--dataset", "digits", "--model", "alexnet", "--width", "0.125", "--weights", weights]
    out = tmp_path / "out"
    argv = ["train", *flags, "--out", out / "dense.safetensors"] if index % 3 == 0 else ["run", *flags, "--out", out]
    what = "NaN" if value != value else "infinity"
    refused_unchanged([*argv, *QUICK], tmp_path, capsys, str(weights), repr(name), what)


def test_the_issue_case_torchvision_resnet18_weights_with_nan(tmp_path, capsys):
    """`--weights` holding NaN in one tensor of torchvision:resnet18: one line before anything runs (it used to
    train, then report an internal bug and leave 7 files behind)."""
    torch.manual_seed(0)
    state = build_model("torchvision:resnet18", in_channels=1, image_size=32).net.state_dict()
    state["layer3.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    weights = tmp_path / "resnet18.pt"
    torch.save(state, weights)
    argv = ["run", "--dataset", "digits", "--model", "torchvision:resnet18", "--weights", weights]
    refused_unchanged([*argv, "--out", tmp_path / "out", *QUICK], tmp_path, capsys, "'layer3.0.conv1.weight'", "NaN")


def test_save_checkpoint_refuses_non_finite_numbers_and_writes_nothing(tmp_path):
    model = build_model("alexnet", in_channels=1, image_size=32, width=0.125)
    model.net.features[0].bn.running_var[3] = float("inf")
    with pytest.raises(HybridPruneError, match="'net.features.0.bn.running_var' holds infinity") as err:
        save_checkpoint(tmp_path / "m.safetensors", model)
    assert "\n" not in str(err.value) and list(tmp_path.iterdir()) == []


# --- 3. a diverging learning rate -----------------------------------------------------------------------------------

DIVERGING = ["--dataset", "digits", "--epochs", "2", "--train-size", "256", "--test-size", "64", "--batch-size", "32"]
DIVERGING += ["--no-progress"]
# (model, learning rate) pairs whose training leaves finite numbers within 2 epochs, seeded: some end in a NaN
# loss, others in a BatchNorm variance that overflows while the loss still reads finite
DIVERGERS = [("alexnet", "0.125", "100"), ("alexnet", "0.125", "60"), ("resnet20", "0.5", "100"),
             ("resnet20", "0.5", "60"), ("vgg16", "0.125", "100")]  # fmt: skip


@pytest.mark.parametrize("model,width,lr", DIVERGERS, ids=["-".join(d) for d in DIVERGERS])
def test_dense_training_that_diverges_stops_naming_stage_epoch_and_learning_rate(tmp_path, capsys, model, width, lr):
    argv = ["train", *DIVERGING, "--model", model, "--width", width, "--lr", lr]
    line = refused_unchanged([*argv, "--out", tmp_path / "out" / "d.safetensors"], tmp_path, capsys, "train, epoch")
    assert re.search(r"epoch \d/2", line) and f"lower learning rate than {lr}" in line
    assert re.search(r"the loss became NaN or infinite|tensor '[\w.]+' holds (NaN|infinity)", line)


def test_fine_tuning_that_diverges_stops_and_keeps_every_finished_step_whole(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["run", *DIVERGING, "--model", "alexnet", "--width", "0.125", "--finetune-lr", "100", "--metric", "l1"]
    argv += ["--finetune-epochs", "2"]
    argv += ["--round-to", "8", "--calib-batches", "1", "--bn-recalib-batches", "1", "--out", out]
    line = assert_refused(call(argv, capsys), "fine-tune l1", "epoch", "lower learning rate than 100")
    assert "N:M pattern broken" not in line
    # the dense step is finished and kept for --resume, whole; nothing of the step that diverged was written
    assert sorted(p.name for p in out.iterdir()) == [".hybridprune-written.json", "config.json", "dense.json",
                                                     "dense.safetensors"]  # fmt: skip
    model, _, _ = load_checkpoint(out / "dense.safetensors")
    assert all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point())


def test_nan_that_reaches_the_nm_check_is_the_users_numbers_not_an_internal_bug(tmp_path, capsys, monkeypatch):
    """However NaN gets into a fine-tuned 2:4 model (here a fine-tune made to leave one where a mask holds a zero,
    past the loop's own checks), the run stops naming the stage and the tensor, never 'N:M pattern broken'."""
    import hybridprune.experiments.job as job

    real_fit = job.fit

    def poisoning_fit(model, *args, masks=None, **kwargs):
        real_fit(model, *args, masks=masks, **kwargs)
        for name, mask in (masks or {}).items():
            weight = model.get_submodule(name).weight.data.view(-1)
            weight[int((mask.reshape(-1) == 0).nonzero()[0, 0])] = float("nan")
            break
        return model

    monkeypatch.setattr(job, "fit", poisoning_fit)
    out = tmp_path / "run"
    argv = ["run", *DIVERGING, "--model", "alexnet", "--width", "0.125", "--epochs", "1", "--finetune-epochs", "1"]
    argv += ["--metric", "l1", "--round-to", "8", "--calib-batches", "1", "--bn-recalib-batches", "1", "--out", out]
    line = assert_refused(call(argv, capsys), "fine-tune l1 hybrid", "holds NaN", "learning rate")
    assert "N:M pattern broken" not in line and not list(out.glob("l1-hybrid*"))


# --- 4. malformed model strings ------------------------------------------------------------------------------------

MALFORMED_MODELS = [
    "", " ", ":", "::", "a:", ":b", "a:b:c", "torchvision:", "torchvision: ", "torchvision:a.b", "torchvision:res net",
    "a..b:f", ".a:f", "a.:f", "a b:f", "a:f g", "a:1f", "pkg.:make", "\t:\t",
]  # fmt: skip


def _model_argv(command: str, model: str, root: Path, ckpt: Path) -> list:
    out = root / "out"
    return {
        "run": ["run", "--model", model, "--out", out, *QUICK],
        "train": ["train", "--model", model, "--out", out / "dense.safetensors", *QUICK],
        "prune": ["prune", ckpt, "--model", model, "--out", out, *QUICK],
        "evaluate": ["evaluate", ckpt, "--model", model, "--json", out / "e.json"],
        "export": ["export", ckpt, "--model", model, "--out", out / "m.onnx"],
        "bench": ["bench", "--synthetic", "--model", model, "--json", out / "b.json"],
    }[command]


@pytest.mark.parametrize("command", ["run", "train", "prune", "evaluate", "export", "bench"])
@pytest.mark.parametrize("model", MALFORMED_MODELS, ids=[repr(m) for m in MALFORMED_MODELS])
def test_a_malformed_model_string_is_one_line_naming_the_valid_forms(tmp_path, capsys, tiny_checkpoint, command, model):
    argv = _model_argv(command, model, tmp_path, tiny_checkpoint)
    refused_unchanged(argv, tmp_path, capsys, "torchvision:NAME", "module.path:factory")


@pytest.mark.parametrize("model", ["", "  "])
def test_an_empty_model_is_never_the_default_model(model):
    """Past the flag's own check too (a caller that builds the namespace itself), '' is not 'no --model'."""
    from hybridprune.cli import build_parser
    from hybridprune.cli.run import run_config_from_args

    args = build_parser().parse_args(["run"])
    args.model = model
    with pytest.raises(HybridPruneError, match="is empty; valid: alexnet"):
        run_config_from_args(args)


@pytest.mark.parametrize("model", [":", "", "a..b:f"])
def test_a_malformed_model_in_an_experiment_grid_is_one_line(tmp_path, capsys, model):
    grid = {"name": "g", "datasets": [{"dataset": "digits"}], "models": [{"name": model}], "metrics": ["l1"]}
    grid |= {"ratios": [0.4], "seeds": [0]}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    argv = ["experiment", tmp_path / "grid.yaml", "--store", tmp_path / "s.sqlite", "--list"]
    refused_unchanged(argv, tmp_path, capsys, "torchvision:NAME")


# --- 5. every check that can fail before work does so before any file is written -----------------------------------


def _nan_weights(root: Path) -> Path:
    torch.manual_seed(0)
    state = build_model("alexnet", in_channels=1, image_size=32, width=0.125).net.state_dict()
    state[[k for k in state if k.endswith("weight")][-1]].view(-1)[0] = float("nan")  # the classifier's
    save_file(state, str(root / "nan.safetensors"))
    return root / "nan.safetensors"


PREFLIGHT = {
    "fp16 on a CPU": (["--precision", "fp16", "--device", "cpu"], "fp16"),
    "sync-bn on a CPU": (["--sync-bn", "--device", "cpu"], "--sync-bn needs GPUs"),
    "cuda without CUDA": (["--device", "cuda"], "no CUDA GPU"),
    "malformed model": (["--model", "a:"], "malformed"),
    "weights with NaN": (["--weights", "NAN", "--width", "0.125"], "NaN"),
}


@pytest.mark.parametrize("existing", [False, True], ids=["absent", "existing"])
@pytest.mark.parametrize("command", ["run", "train", "prune"])
@pytest.mark.parametrize("case", list(PREFLIGHT))
def test_each_refusal_leaves_the_output_folder_absent_or_unchanged(tmp_path, capsys, tiny_checkpoint, case, command,
                                                                   existing):  # fmt: skip
    flags, names = PREFLIGHT[case]
    if case == "cuda without CUDA" and HAS_CUDA:
        pytest.skip("this machine has CUDA")
    if command == "prune" and case == "weights with NaN":
        pytest.skip("prune takes no --weights; its checkpoint's numbers are checked above")
    flags = [str(_nan_weights(tmp_path)) if f == "NAN" else f for f in flags]
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "notes.txt").write_text("the user's")
    target = out / "dense.safetensors" if command == "train" else out
    head = {"run": ["run"], "train": ["train"], "prune": ["prune", tiny_checkpoint]}[command]
    argv = [*head, "--dataset", "digits", *flags, "--out", target, *QUICK]
    refused_unchanged(argv, tmp_path, capsys, names)
    assert out.exists() == existing


# --- 6. SQLite files that are not hybridprune stores ---------------------------------------------------------------

_V2 = SCHEMA
_V1_RUNS = create_table("runs", tuple(c for c in TABLES["runs"] if c[0] != "recipe"))
_META = create_table("meta", TABLES["meta"])
FOREIGN_STORES = {
    "another program's tables": "CREATE TABLE users (id INTEGER, name TEXT);",
    "meta only, version 1": f"{_META} INSERT INTO meta VALUES ('version', '1');",
    "meta only, version 2": f"{_META} INSERT INTO meta VALUES ('version', '2');",
    "meta saying 1 beside other tables": f"{_META} INSERT INTO meta VALUES ('version', '1'); CREATE TABLE runs (x);",
    "meta of other columns": "CREATE TABLE meta (key TEXT, value TEXT, extra); "
    "INSERT INTO meta VALUES ('version', '1', 0);",
    "meta without a version": f"{_META} INSERT INTO meta VALUES ('owner', 'someone');",
    "a store's tables and one more": f"{_V2} INSERT INTO meta VALUES ('version', '2'); CREATE TABLE mine (x);",
    "a store's tables and a view": f"{_V2} INSERT INTO meta VALUES ('version', '2'); CREATE VIEW v AS SELECT 1;",
    "a store's tables and a trigger": f"{_V2} INSERT INTO meta VALUES ('version', '2'); "
    "CREATE TRIGGER t AFTER INSERT ON runs BEGIN DELETE FROM meta; END;",
    "version 2 tables saying version 1": f"{_V2} INSERT INTO meta VALUES ('version', '1');",
    "version 1 tables saying version 2": f"{_META} {_V1_RUNS} INSERT INTO meta VALUES ('version', '2');",
    "runs missing a column": f"{_META} INSERT INTO meta VALUES ('version', '2'); "
    + create_table("runs", TABLES["runs"][:-1]) + create_table("nm_only", TABLES["nm_only"]),
    "a store in write-ahead-log mode": "PRAGMA journal_mode=WAL; " + f"{_V2} INSERT INTO meta VALUES ('version', '2');",
}  # fmt: skip


def _foreign(path: Path, script: str | None) -> None:
    if script is None:
        path.write_bytes(b"")
        return
    with closing(sqlite3.connect(path)) as db:
        db.executescript(script)
        db.commit()
        if "WAL" in script:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")


GRID = {"name": "g", "datasets": [{"dataset": "digits", "train_size": 64, "test_size": 32}]}
GRID |= {"models": [{"name": "alexnet", "width": 0.125}], "metrics": ["l1"], "ratios": [0.4], "seeds": [0]}


@pytest.mark.parametrize("command", ["experiment --list", "experiment", "report"])
@pytest.mark.parametrize("kind", list(FOREIGN_STORES))
def test_a_foreign_sqlite_file_is_refused_and_left_byte_identical(tmp_path, capsys, kind, command):
    store = tmp_path / "other.sqlite"
    _foreign(store, FOREIGN_STORES[kind])
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(GRID))
    argv = {
        "experiment --list": ["experiment", tmp_path / "grid.yaml", "--store", store, "--list"],
        "experiment": ["experiment", tmp_path / "grid.yaml", "--store", store, "--no-progress"],
        "report": ["report", "--store", store, "--out", tmp_path / "report"],
    }[command]
    refused_unchanged(argv, tmp_path, capsys, str(store), "left untouched")


def test_a_real_store_of_each_version_still_opens(tmp_path):
    """The refusals above are not a refusal of everything: the store's own schemas open (version 1 upgraded)."""
    Store(tmp_path / "new.sqlite")
    assert Store(tmp_path / "new.sqlite", create=False).rows() == []
    _foreign(tmp_path / "v1.sqlite", f"{_META} {_V1_RUNS} INSERT INTO meta VALUES ('version', '1');")
    assert Store(tmp_path / "v1.sqlite", create=False).rows() == []


def test_an_empty_file_is_no_store_to_report_on_and_becomes_one_for_a_grid(tmp_path, capsys):
    """An empty file holds nothing to lose (it is also what a store looks like the instant another process
    creates it): `report` refuses it unchanged, `experiment --list` reads it as no runs done and leaves it empty,
    and a grid makes it a store."""
    store = tmp_path / "s.sqlite"
    _foreign(store, None)
    refused_unchanged(["report", "--store", store, "--out", tmp_path / "r"], tmp_path, capsys, "empty", str(store))
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(GRID))
    listed = call(["experiment", tmp_path / "grid.yaml", "--store", store, "--list"], capsys)
    assert listed.code == 0 and "todo" in listed.out and store.stat().st_size == 0
    assert Store(store).rows() == []  # what `experiment` opens to run the grid


# --- 7. messages name the right kind of file ------------------------------------------------------------------------


@pytest.mark.parametrize("command,kind", [("export", "model.onnx"), ("train", "dense.safetensors")])
def test_an_output_file_given_as_a_folder_is_told_the_kind_of_file(tmp_path, capsys, tiny_checkpoint, command, kind):
    (tmp_path / "folder").mkdir()
    head = ["export", tiny_checkpoint] if command == "export" else ["train", *QUICK]
    line = refused_unchanged([*head, "--out", tmp_path / "folder"], tmp_path, capsys, f"folder/{kind}")
    assert "result.json" not in line
