"""The `hybridprune` command: a thin layer over the library; every name resolves through a registry."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import HybridPruneError

# Every numeric flag, its kind and inclusive bounds: checked where it is parsed (nan, inf, negative, huge
# and non-numbers are one line and exit 2), so no bad number reaches the work.
NUMERIC_FLAGS: dict[str, tuple[type, float, float]] = {
    "--seed": (int, 0, 2**32 - 1),
    "--train-size": (int, 1, 10**9),
    "--test-size": (int, 1, 10**9),
    "--width": (float, 1e-6, 16.0),
    "--epochs": (int, 0, 100_000),
    "--finetune-epochs": (int, 0, 100_000),
    "--lr": (float, 1e-12, 100.0),
    "--finetune-lr": (float, 1e-12, 100.0),
    "--batch-size": (int, 1, 65_536),
    "--round-to": (int, 1, 4096),
    "--calib-batches": (int, 1, 10_000),
    "--bn-recalib-batches": (int, 0, 10_000),
    "--workers": (int, 1, 256),
    "--image-size": (int, 8, 4096),
    "--channels": (int, 1, 16),
    "--rounds": (int, 1, 100_000),
    "--calls": (int, 1, 100_000),
    "--threads": (int, 1, 1024),
    "--opset": (int, 13, 20),
    "--distill-weight": (float, 0.0, 1.0),
    "--distill-temperature": (float, 0.05, 100.0),
    "--check-images": (int, 1, 100_000),
}


def _bounded(flag: str) -> Callable[[str], float]:
    kind, low, high = NUMERIC_FLAGS[flag]

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or not (low <= value <= high):
            raise argparse.ArgumentTypeError(f"{flag} must be {kind.__name__ == 'int' and 'an integer' or 'a number'} "
                                             f"in [{low:g}, {high:g}], got {text!r}")  # fmt: skip
        return value

    return parse


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line, like every other bad input; numeric flags bounded by NUMERIC_FLAGS."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def add_argument(self, *names: str, **kwargs: Any) -> argparse.Action:  # type: ignore[override]
        if kwargs.get("type") in (int, float):
            flag = next(n for n in names if n.startswith("--"))
            if flag not in NUMERIC_FLAGS:
                raise KeyError(f"numeric flag {flag} has no bounds in NUMERIC_FLAGS")  # a bug, caught by the tests
            kwargs["type"] = _bounded(flag)
        return super().add_argument(*names, **kwargs)


def _ratio(text: str) -> float:
    from .prune import validate_ratio

    try:
        return validate_ratio(float(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            str(e) if isinstance(e, HybridPruneError) else f"not a number: {text!r}"
        ) from None


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="seed for model init, data order, subsets and random scores")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_data(p: argparse.ArgumentParser, default: str | None = "digits") -> None:
    from .data import DEFAULT_DATA_DIR, dataset_names

    p.add_argument("--dataset", default=default, help=f"one of {', '.join(dataset_names())} (default: {default})")
    p.add_argument(
        "--data-dir", default=None, help=f"root of torchvision-layout datasets (default: {DEFAULT_DATA_DIR})"
    )
    p.add_argument("--download", action="store_true", help="download the dataset if it is missing (needs network)")
    p.add_argument("--train-size", type=int, default=None, help="use a seeded random subset of this many train images")
    p.add_argument("--test-size", type=int, default=None, help="use a seeded random subset of this many test images")


def _add_model(p: argparse.ArgumentParser) -> None:
    from .config import DEFAULT_MODEL
    from .models import model_names

    p.add_argument(
        "--model", default=None, help=f"{model_names()} (default: {DEFAULT_MODEL.name} at width {DEFAULT_MODEL.width})"
    )
    p.add_argument(
        "--width", type=float, default=None, help="width multiplier of a built-in model's layers (default: 1.0)"
    )
    p.add_argument("--weights", default=None, help="trained weights of that model: a state dict in .safetensors or .pt")


def _add_user_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="for a checkpoint of user code: the module:factory that built it")


def _add_train(p: argparse.ArgumentParser) -> None:
    from .config import TrainConfig

    _add_model(p)
    defaults = TrainConfig()
    p.add_argument("--epochs", type=int, default=defaults.epochs, help="epochs to train the dense model")
    p.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate of dense training (SGD)")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="training batch size")


def _add_prune(p: argparse.ArgumentParser, metric_help: str) -> None:
    from .config import DEFAULT_FINETUNE, PruneConfig
    from .prune import DEFAULT_ROUND_TO

    defaults = PruneConfig()

    p.add_argument(
        "--filter-ratio",
        type=_ratio,
        default=defaults.filter_ratio,
        help="fraction of channels removed from each channel group, in [0, 1)",
    )
    p.add_argument(
        "--round-to",
        type=int,
        default=DEFAULT_ROUND_TO,
        help="round kept filter counts to this multiple so the next layer stays 2:4 and cuSPARSELt eligible",
    )
    p.add_argument("--nm", default="2:4", help="N:M pattern, keep N of every M input-channel weights (default 2:4)")
    p.add_argument(
        "--finetune-epochs",
        type=int,
        default=DEFAULT_FINETUNE.epochs,
        help="epochs of each fine-tune (after filter and N:M pruning)",
    )
    p.add_argument("--finetune-lr", type=float, default=DEFAULT_FINETUNE.lr, help="peak learning rate of fine-tuning")
    p.add_argument(
        "--distill", action="store_true", help="fine-tune pruned stages against the dense model's logits (KD)"
    )
    p.add_argument("--distill-weight", type=float, default=0.9, help="with --distill: weight of the KD term (rest: CE)")
    p.add_argument("--distill-temperature", type=float, default=4.0, help="with --distill: softmax temperature")
    p.add_argument(
        "--calib-batches", type=int, default=defaults.calib_batches, help="unlabeled batches for output_l1 scores"
    )
    p.add_argument(
        "--bn-recalib-batches",
        type=int,
        default=defaults.bn_recalib_batches,
        help="batches to recalibrate BatchNorm after pruning",
    )
    p.add_argument("--metric", default=None, help=metric_help)
    p.add_argument(
        "--ignore",
        default="",
        help="comma-separated module names whose output channels are never pruned (the head never is)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hybridprune", description="Hybrid pruning of CNNs: filter pruning ranked for 2:4, then N:M.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    from .config import DEFAULT_METRICS

    p = sub.add_parser("run", help="train (or load), prune with every metric, fine-tune, print the comparison table")
    (
        _add_common(p),
        _add_data(p),
        _add_train(p),
        _add_prune(p, f"comma-separated metrics (default: {','.join(DEFAULT_METRICS)})"),
    )
    p.add_argument("--checkpoint", default=None, help="start from this dense checkpoint instead of training one")
    p.add_argument("--out", default=None, help="output folder (default: runs/DATASET-MODEL-wWIDTH-sSEED)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out, reusing finished steps")
    p.add_argument("--overwrite", action="store_true", help="redo a run whose --out folder exists")
    p.add_argument("--json", default=None, help="also write the result object to this JSON file")

    p = sub.add_parser("train", help="train a dense model and save it as a checkpoint")
    _add_common(p), _add_data(p), _add_train(p)
    p.add_argument("--out", default="runs/dense.safetensors", help="checkpoint file to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    p = sub.add_parser("prune", help="prune a dense checkpoint with one metric: filter-pruned and filter+N:M models")
    p.add_argument("checkpoint", help="dense checkpoint (from `hybridprune train`)")
    _add_common(p), _add_data(p), _add_prune(p, "metric (default: hybrid)"), _add_user_model(p)
    p.add_argument("--out", default=None, help="output folder (default: next to the checkpoint, named by metric)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted prune in --out")
    p.add_argument("--overwrite", action="store_true", help="redo a prune whose --out folder exists")
    p.add_argument("--json", default=None, help="also write the result object to this JSON file")

    p = sub.add_parser("evaluate", help="accuracy, size and N:M pattern of a checkpoint")
    p.add_argument("checkpoint", help="checkpoint file")
    _add_common(p), _add_data(p), _add_user_model(p)
    p.add_argument("--json", default=None, help="also write the evaluation to this JSON file")
    p.add_argument("--overwrite", action="store_true", help="replace --json if it exists")
    _add_bench(sub)
    _add_convert(sub)
    _add_export(sub)
    _add_experiment(sub)
    return parser


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="build the sparse inference model of an N:M checkpoint and check it")
    p.add_argument("checkpoint", help="checkpoint with N:M masks (a *-hybrid or nm checkpoint of `run`)")
    _add_user_model(p)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default=None, help="float16 or bfloat16 on GPU (default float16); float32 on CPU")
    p.add_argument(
        "--kernels",
        default="fastest",
        choices=["sparse", "fastest", "dense", "gemm"],
        help="sparse wherever eligible, the faster per layer, none, or dense unfold+GEMM (checks the lowering)",
    )
    p.add_argument("--batch-size", type=int, default=256, help="input batch the per-layer choice is measured on")
    p.add_argument("--json", default=None, help="also write the per-layer report to this JSON file")
    p.add_argument("--overwrite", action="store_true", help="replace --json if it exists")


def cmd_convert(args: argparse.Namespace) -> None:
    import torch

    from .bench import parse_batch_sizes, parse_dtypes
    from .checkpoint import load_checkpoint
    from .models import input_shape
    from .outputs import write_json
    from .report import markdown_table
    from .sparse import to_inference_model
    from .train import resolve_device

    _check_json_target(args.json, args.overwrite)
    device = resolve_device(args.device)
    default_dtype = "float16" if device.type == "cuda" else "float32"
    (dtype,) = parse_dtypes(default_dtype if args.dtype is None else args.dtype)
    (batch,) = parse_batch_sizes(str(args.batch_size))
    model, masks, meta = load_checkpoint(args.checkpoint, args.model)
    if not masks:
        raise HybridPruneError(f"{args.checkpoint} has no N:M masks; convert takes an N:M-pruned checkpoint")
    x = torch.rand(batch, *input_shape(model), device=device, dtype=dtype)
    pattern = _checkpoint_pattern(args.checkpoint, meta)
    inference = to_inference_model(model, masks, device, dtype, choose=args.kernels, pattern=pattern, example=x)
    reference = to_inference_model(model, masks, device, dtype, choose="dense", pattern=pattern)
    with torch.inference_mode():
        out, ref = inference.model(x).float(), reference.model(x).float()
    diff = float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
    if inference.notice:
        print(f"note: {inference.notice}")
    print(
        markdown_table(
            ["layer", "kind", "GEMM weight", "kernel", "dense ms", "sparse ms", "why"],
            [
                [
                    k.name,
                    k.kind,
                    "x".join(map(str, k.gemm_shape)),
                    k.kernel,
                    "-" if k.dense_ms is None else f"{k.dense_ms:.3f}",
                    "-" if k.sparse_ms is None else f"{k.sparse_ms:.3f}",
                    k.reason,
                ]
                for k in inference.layers
            ],
        )
    )
    print(
        f"{len(inference.sparse_layers)} of {len(inference.layers)} layers on sparse kernels; largest logit "
        f"difference from the dense masked model: {100 * diff:.3f}% of the largest logit"
    )
    if args.json:
        write_json(
            args.json,
            {
                "checkpoint": args.checkpoint,
                "device": str(device),
                "dtype": str(dtype),
                "backend": inference.backend,
                "relative_max_diff": diff,
                "layers": [k.__dict__ for k in inference.layers],
                "notice": inference.notice,
            },
        )


def _add_export(sub: argparse._SubParsersAction) -> None:
    from .data import dataset_names
    from .export import OPSET

    p = sub.add_parser("export", help="ONNX file of a checkpoint (dynamic batch), checked with ONNX Runtime")
    p.add_argument("checkpoint", help="any hybridprune checkpoint: dense, filter-pruned, 2:4 or hybrid")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset (default {OPSET})")
    p.add_argument(
        "--dataset", default=None, help=f"test images for the check: {', '.join(dataset_names())} (default: random)"
    )
    p.add_argument("--data-dir", default=None, help="root of torchvision-layout datasets")
    p.add_argument("--check-images", type=int, default=256, help="images run through both PyTorch and ONNX Runtime")
    _add_user_model(p)


def cmd_export(args: argparse.Namespace) -> None:
    import torch

    from .checkpoint import load_checkpoint
    from .export import check_onnx, export_onnx
    from .outputs import check_output_file

    check_output_file(args.out, args.overwrite)
    model, masks, meta = load_checkpoint(args.checkpoint, args.model)
    pattern = _checkpoint_pattern(args.checkpoint, meta)
    if args.dataset is None:
        images = torch.rand(args.check_images, *model.input_shape, generator=torch.Generator().manual_seed(0))
        source = "random images (give --dataset for real test images)"
    else:
        from .data import load_dataset
        from .pipeline import check_fits

        data = load_dataset(args.dataset, args.data_dir)
        check_fits(model, data)
        images = data.test.x[: args.check_images].float() / 255
        source = f"{len(images)} {data.name} test images"
    path = export_onnx(model, args.out, args.opset)
    check = check_onnx(path, model, masks, images, pattern)
    print(
        f"wrote {path} (opset {args.opset}, dynamic batch, BatchNorm folded, normalisation inside)\n"
        f"check on {source}: largest logit difference {check.max_abs_diff:.2e} (largest logit "
        f"{check.max_abs_logit:.2f}), top-1 agreement {100 * check.top1_agreement:.2f}%\n"
        f"N:M layers found in the file: {check.nm_layers_found} of {check.nm_layers}; groups breaking {pattern}: "
        f"{check.broken_groups}"
    )
    if not check.ok:
        path.unlink(missing_ok=True)
        raise HybridPruneError(f"the exported file does not match the checkpoint; {path} removed")


def _add_experiment(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("experiment", help="run a grid of datasets x models x metrics x ratios x seeds into a store")
    p.add_argument("config", help="experiment YAML (see experiments/)")
    p.add_argument("--store", default=None, help="SQLite result store (default: runs/NAME.sqlite)")
    p.add_argument("--workers", type=int, default=1, help="runs in parallel (processes, or Ray tasks)")
    p.add_argument(
        "--backend",
        default="process",
        choices=["process", "ray"],
        help="process: a local process pool; ray: Ray tasks (RAY_ADDRESS for a cluster)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--list", action="store_true", help="list the grid's runs and whether each is done, then stop")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")

    p = sub.add_parser("report", help="tables and plots from an experiment store (never re-runs anything)")
    p.add_argument("--store", required=True, help="SQLite result store written by `hybridprune experiment`")
    p.add_argument("--out", required=True, help="folder for report.md, CSV tables and PNG plots")
    p.add_argument("--bench", action="append", default=[], help="bench JSON with accuracies, for a Pareto plot")


def cmd_experiment(args: argparse.Namespace) -> None:
    from .experiment import Store, load_grid, pending_summary, run_grid
    from .outputs import check_output_dir
    from .train import resolve_device

    grid = load_grid(args.config)
    device = resolve_device(args.device)
    store_path = Path(args.store or f"runs/{grid.name}.sqlite")
    check_output_dir(store_path.parent)
    if store_path.is_dir():
        raise HybridPruneError(f"--store {store_path} is a folder; give the SQLite file to write")
    store = Store(store_path)
    if args.list:
        print("\n".join(pending_summary(grid, store)))
        return
    counts = run_grid(
        grid, store, workers=args.workers, device=device.type, backend=args.backend, progress=not args.no_progress
    )
    print(
        f"{counts['done']} runs finished now, {counts['skipped']} earlier, {counts['failed']} failed; "
        f"store: {store.path}"
    )
    if counts["failed"]:
        raise HybridPruneError(f"{counts['failed']} runs failed (see above); rerun the command to retry them")


def cmd_report(args: argparse.Namespace) -> None:
    from .experiment import Store
    from .outputs import check_output_dir
    from .report import write_grid_report

    check_output_dir(Path(args.out))
    rows = Store(args.store, create=False).rows()
    if not rows:
        raise HybridPruneError(f"{args.store} holds no finished runs yet")
    for path in write_grid_report(rows, args.out, args.bench):
        print(f"wrote {path}")


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from .config import PruneConfig

    p = sub.add_parser("bench", help="time dense, filter-pruned, 2:4-only and hybrid variants of one model")
    p.add_argument("run_dir", nargs="?", default=None, help="the --out folder of `hybridprune run` (trained variants)")
    p.add_argument("--metric", default=None, help="which metric's filter/hybrid models to take from RUN_DIR")
    for name in ("dense", "filter", "nm", "hybrid"):
        p.add_argument(f"--{name}", default=None, help=f"checkpoint of the {name} variant (instead of RUN_DIR)")
    p.add_argument("--synthetic", action="store_true", help="untrained variants of the given shape (speed only)")
    p.add_argument(
        "--model",
        default=None,
        help="model of the synthetic variants (default alexnet); for checkpoints of user code, its module:factory",
    )
    p.add_argument("--width", type=float, default=None, help="width multiplier of synthetic built-in models")
    p.add_argument("--image-size", type=int, default=32, help="input height and width of the synthetic variants")
    p.add_argument("--channels", type=int, default=3, help="input channels of the synthetic variants")
    p.add_argument(
        "--filter-ratio", type=_ratio, default=PruneConfig.filter_ratio, help="filter ratio of the synthetic variants"
    )
    p.add_argument("--round-to", type=int, default=PruneConfig.round_to, help="round-to of the synthetic variants")
    p.add_argument("--batch-sizes", default="1,16,64,256,1024", help="comma-separated batch sizes")
    p.add_argument(
        "--dtypes",
        default=None,
        help="comma-separated: float16, bfloat16, float32 (default: float16 on GPU, float32 on CPU)",
    )
    p.add_argument(
        "--kernels",
        default="fastest",
        choices=["sparse", "fastest", "dense"],
        help="sparse: every eligible layer on the 2:4 kernel; fastest: per layer, the faster of dense and "
        "sparse measured on its real input shape; dense: no sparse kernels",
    )
    p.add_argument("--rounds", type=int, default=10, help="round-robin rounds (each times every variant)")
    p.add_argument("--calls", type=int, default=5, help="timed calls per variant per round")
    p.add_argument("--no-cuda-graphs", action="store_true", help="skip CUDA-graph replay timing on GPU")
    p.add_argument(
        "--onnxruntime",
        action="store_true",
        help="also time each variant exported to ONNX and run by ONNX Runtime (CPU, float32; needs [export])",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic variants")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--overwrite", action="store_true", help="replace --json if it exists")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def cmd_bench(args: argparse.Namespace) -> None:
    import torch

    from .bench import (
        bench,
        parse_batch_sizes,
        parse_dtypes,
        synthetic_variants,
        variants_from_checkpoints,
        variants_from_run,
    )
    from .outputs import environment, write_json
    from .report import bench_tables, kernel_table
    from .sparse import check_dtype
    from .train import resolve_device

    batch_sizes = parse_batch_sizes(args.batch_sizes)
    device = resolve_device(args.device)
    dtypes = parse_dtypes(("float16" if device.type == "cuda" else "float32") if args.dtypes is None else args.dtypes)
    _check_json_target(args.json, args.overwrite)
    if args.rounds < 1 or args.calls < 1:
        raise HybridPruneError("--rounds and --calls must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)
    files = {n: getattr(args, n) for n in ("dense", "filter", "nm", "hybrid") if getattr(args, n)}
    if sum([bool(args.run_dir), bool(files), args.synthetic]) != 1:
        raise HybridPruneError("give exactly one source: RUN_DIR, --dense/--filter/--nm/--hybrid, or --synthetic")
    if args.synthetic:
        variants = synthetic_variants(
            args.width,
            args.channels,
            args.image_size,
            filter_ratio=args.filter_ratio,
            round_to=args.round_to,
            model=args.model or "alexnet",
            seed=args.seed,
        )
    elif args.run_dir:
        variants = variants_from_run(args.run_dir, args.metric, args.model)
    else:
        variants = variants_from_checkpoints(files, args.model)
    for dtype in dtypes:
        check_dtype(dtype, device)  # before building anything: a dtype the device cannot run is bad input
    env = environment()
    result = bench(
        variants,
        device,
        dtypes,
        batch_sizes,
        rounds=args.rounds,
        calls=args.calls,
        choose=args.kernels,
        cuda_graphs=not args.no_cuda_graphs,
        onnxruntime=args.onnxruntime,
        progress=not args.no_progress,
    )
    result["environment"] = env
    result["command"] = "hybridprune " + " ".join(args.argv)
    result["variants"] = {v.name: {"source": v.source, "accuracy": v.accuracy} for v in variants}
    for notice in result["notices"]:
        print(f"note: {notice}")
    print(bench_tables(result))
    print("\nkernels per layer (largest batch):")
    print(kernel_table(result))
    if args.json:
        write_json(args.json, result)
        print(f"\nwrote {args.json}")


_PRUNE_ARGS = ("filter_ratio", "round_to", "nm", "calib_batches", "bn_recalib_batches")


def _width(model: str | None, width: float | None) -> float | None:
    """--width as given; with neither --model nor --width, the default model's width."""
    from .config import DEFAULT_MODEL

    return DEFAULT_MODEL.width if model is None and width is None else width


def _run_config(args: argparse.Namespace, metrics: str | None, dataset: str) -> Any:
    from .config import DEFAULT_METRICS, DEFAULT_MODEL, DataConfig, ModelConfig, PruneConfig, RunConfig, TrainConfig
    from .metrics import METRICS

    names = tuple(
        m.strip() for m in (",".join(DEFAULT_METRICS) if metrics is None else metrics).split(",") if m.strip()
    )
    if not names:
        raise HybridPruneError(f"--metric names no metric; give one or more of {', '.join(METRICS.names())}")
    ignore = tuple(n.strip() for n in getattr(args, "ignore", "").split(",") if n.strip())
    model = ModelConfig(
        getattr(args, "model", None) or DEFAULT_MODEL.name,
        _width(getattr(args, "model", None), getattr(args, "width", None)),
        getattr(args, "weights", None),
    )
    return RunConfig(
        data=DataConfig(dataset, args.data_dir, args.download, args.train_size, args.test_size),
        model=model,
        train=TrainConfig(
            epochs=getattr(args, "epochs", 0), lr=getattr(args, "lr", 0.05), batch_size=getattr(args, "batch_size", 128)
        ),
        finetune=TrainConfig(
            epochs=getattr(args, "finetune_epochs", 0),
            lr=getattr(args, "finetune_lr", 0.01),
            warmup=0.0,
            distill_weight=args.distill_weight if getattr(args, "distill", False) else 0.0,
            distill_temperature=getattr(args, "distill_temperature", 4.0),
            batch_size=getattr(args, "batch_size", 128),
        ),
        prune=PruneConfig(
            metric=names[0], ignore=ignore, **{k: getattr(args, k) for k in _PRUNE_ARGS if hasattr(args, k)}
        ),
        metrics=names,
        seed=args.seed,
    )


def _print_result(result: dict[str, Any], json_path: str | None) -> None:
    from .outputs import write_json
    from .report import layer_table, run_table

    print("\nlayers (filters kept shown for the first metric; every metric keeps the same counts):")
    print(layer_table(result))
    print(f"\naccuracy (%) on {result['dataset']['name']} test, {result['dataset']['test']} images:")
    print(run_table(result))
    if json_path:
        write_json(json_path, result)
        print(f"\nwrote {json_path}")


def cmd_run(args: argparse.Namespace) -> None:
    cfg = _run_config(args, args.metric, args.dataset)
    slug = f"{cfg.data.dataset}-{cfg.model.label}".replace(":", "_").replace("/", "_")
    _run_and_print(
        args,
        cfg,
        Path(args.out or f"runs/{slug}-s{cfg.seed}"),
        include_nm_only=True,
    )


def cmd_prune(args: argparse.Namespace) -> None:
    from .checkpoint import checkpoint_source

    metric = "hybrid" if args.metric is None else args.metric
    source = checkpoint_source(args.checkpoint)
    if source.kind == "user" and args.model != source.name:
        raise HybridPruneError(f"{args.checkpoint} holds user code {source.name!r}; pass --model {source.name}")
    args.model = source.label  # the run's config names the checkpoint's model, whatever it is
    if "," in metric:
        raise HybridPruneError("prune takes one --metric; use `hybridprune run` to compare several")
    cfg = _run_config(args, metric, args.dataset)
    out = Path(args.out or Path(args.checkpoint).with_suffix("").as_posix() + f"-{metric}")
    _run_and_print(args, cfg, out, include_nm_only=False)


def _run_and_print(args: argparse.Namespace, cfg: Any, out: Path, include_nm_only: bool) -> None:
    from .pipeline import run
    from .train import resolve_device

    _check_json_target(args.json, args.overwrite)
    result = run(
        cfg,
        out,
        resolve_device(args.device),
        resume=args.resume,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        dense_checkpoint=args.checkpoint,
        include_nm_only=include_nm_only,
    )
    _print_result(result, args.json)
    print(f"checkpoints and results.json in {out}")


def cmd_train(args: argparse.Namespace) -> None:
    from .checkpoint import save_checkpoint
    from .outputs import check_output_file, environment
    from .pipeline import new_model, prepare_data
    from .train import evaluate, fit, resolve_device

    check_output_file(args.out, args.overwrite)  # before the work, not after it
    cfg = _run_config(args, None, args.dataset)
    device, env = resolve_device(args.device), environment()
    data = prepare_data(cfg)
    model = fit(
        new_model(cfg, data), data, cfg.train, device, seed=cfg.seed, desc="train", progress=not args.no_progress
    )
    acc = evaluate(model, data.test, device)
    save_checkpoint(
        args.out,
        model,
        None,
        {"stage": "dense", "dataset": data.name, "accuracy": acc, "config": cfg.to_dict(), "environment": env},
        overwrite=args.overwrite,
    )
    print(f"test accuracy {acc:.2f}% on {data.name}; wrote {args.out}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from .checkpoint import load_checkpoint
    from .config import DataConfig
    from .nm import satisfies_nm
    from .outputs import write_json
    from .pipeline import check_fits, prepare_data_config
    from .stats import model_stats
    from .train import evaluate, resolve_device

    _check_json_target(args.json, args.overwrite)
    model, masks, meta = load_checkpoint(args.checkpoint, args.model)
    pattern = _checkpoint_pattern(args.checkpoint, meta)
    broken = [n for n in masks if not satisfies_nm(model.get_submodule(n).weight, pattern)]
    if broken:
        raise HybridPruneError(f"{args.checkpoint}: layer {broken[0]} has an N:M mask but its weights break {pattern}")
    data = prepare_data_config(
        DataConfig(args.dataset, args.data_dir, args.download, args.train_size, args.test_size), args.seed
    )
    check_fits(model, data)
    result = {
        "checkpoint": args.checkpoint,
        "dataset": data.name,
        "test_images": len(data.test),
        "accuracy": evaluate(model, data.test, resolve_device(args.device)),
        **model_stats(model, set(masks), pattern),
        "nm_layers": sorted(masks),
        "nm_pattern_holds": True,  # checked above: a broken pattern is refused
    }
    for key, value in result.items():
        print(f"{key}: {value}")
    if args.json:
        write_json(args.json, result)


def _checkpoint_pattern(path: str, meta: dict[str, Any]) -> Any:
    """The N:M pattern a checkpoint records (2:4 when it records none); a malformed one is bad input."""
    from .nm import NMPattern

    text = meta.get("nm", "2:4")
    if not isinstance(text, str):
        raise HybridPruneError(f"{path}: header meta.nm must be a pattern such as '2:4', got {text!r}")
    return NMPattern.parse(text)


def _check_json_target(path: str | None, overwrite: bool) -> None:
    """Before any work: a --json target must be a writable file path (existing only with --overwrite)."""
    from .outputs import check_output_file

    if path:
        check_output_file(path, overwrite)


COMMANDS = {
    "run": cmd_run,
    "train": cmd_train,
    "prune": cmd_prune,
    "evaluate": cmd_evaluate,
    "bench": cmd_bench,
    "convert": cmd_convert,
    "export": cmd_export,
    "experiment": cmd_experiment,
    "report": cmd_report,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `hybridprune` command; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = list(argv)
    try:
        COMMANDS[args.command](args)
    except HybridPruneError as e:
        print(f"hybridprune {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"\nhybridprune {args.command}: interrupted; finished steps are saved, rerun with --resume", file=sys.stderr
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
