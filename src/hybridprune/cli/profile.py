"""The `profile` command: measure a model's latency table on this device and check its predictions.

`hybridprune profile --model resnet20 --latency-runtime onnxruntime --latency-batch 64 --out table.json`
measures every prunable layer at each candidate kept count (dense, and 2:4 where the device has a kernel),
the rest of the network, and prints the predicted beside the measured latency of the dense model and of
uniformly pruned copies (`--check-ratios`). `--latency-table` reuses a table: only missing entries are measured.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hybridprune.cli.checks import check_json_target
from hybridprune.cli.flags import add_latency, numeric
from hybridprune.config import DEFAULT_DATA_DIR, BenchConfig, ModelConfig, PruneConfig, dataset_names, model_names
from hybridprune.errors import HybridPruneError


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """The `profile` command."""
    p = sub.add_parser("profile", help="measure a latency table of a model's layers on this device")
    p.add_argument("--checkpoint", default=None, help="a hybridprune checkpoint to profile (instead of --model)")
    p.add_argument("--model", default=None, help=f"{model_names()}; with --checkpoint of user code, its factory")
    numeric(p, "--width", ModelConfig, "width", "width multiplier of a built-in model")
    p.add_argument(
        "--dataset",
        default=None,
        help=f"shape --model for this dataset as `run --dataset` does (its channels, image size, classes): one of "
        f"{', '.join(dataset_names())}; instead of --channels and --image-size",
    )
    p.add_argument(
        "--data-dir", default=None, help=f"root of torchvision-layout datasets (default: {DEFAULT_DATA_DIR})"
    )
    numeric(p, "--channels", BenchConfig, "channels", "input channels of --model (default 3)", default=None)
    numeric(
        p,
        "--image-size",
        BenchConfig,
        "image_size",
        "input height and width of --model (default 32); with --dataset folder:PATH, the crop side as in `run`",
        default=None,
    )
    add_latency(p)
    p.add_argument(
        "--check-ratios",
        default="0.25,0.5",
        help="comma-separated filter ratios: uniformly pruned copies whose predicted and measured latency are "
        "compared (default 0.25,0.5; '' for none)",
    )
    p.add_argument("--out", required=True, help="the latency table to write (JSON); may be --latency-table itself")
    p.add_argument("--json", default=None, help="also write the check (predicted vs measured) to this JSON file")
    p.add_argument("--overwrite", action="store_true", help="replace --out or --json if they exist")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(handler=cmd_profile)


def _ratios(text: str) -> tuple[float, ...]:
    from hybridprune.config import validate_ratio

    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise HybridPruneError(f"--check-ratios must be comma-separated numbers in [0, 1), got {text!r}") from None
    return tuple(validate_ratio(v, "--check-ratios value") for v in values)


def cmd_profile(args: argparse.Namespace) -> None:
    from hybridprune.deploy.profile import new_table, profile_report, resolve_settings
    from hybridprune.deploy.runtimes import device_name
    from hybridprune.outputs import check_output_file, write_json
    from hybridprune.pruning.latency import load_table
    from hybridprune.world import resolve_device

    ratios = _ratios(args.check_ratios)
    device = resolve_device(args.device)
    batch = args.latency_batch or PruneConfig.latency_batch
    step = args.latency_step  # None: the device's block, found by the step sweep
    points = args.latency_points or PruneConfig.latency_points
    settings = resolve_settings(args.latency_runtime, batch, args.latency_dtype, device, step, points=points)
    reused = args.latency_table and Path(args.latency_table).resolve() == Path(args.out).resolve()
    check_output_file(args.out, args.overwrite or bool(reused))
    check_json_target(args.json, args.overwrite)
    table = load_table(args.latency_table, device_name(device)) if args.latency_table else new_table(device)
    model = profile_model(args)
    stepping = f"step {step}" if step else "step: the device's block"
    print(f"profiling on {table.device} ({settings.setup.runtime}, batch {batch}, {settings.setup.dtype}, {stepping})")
    report = profile_report(model, table, settings, device, ratios, progress=not args.no_progress)
    table.save(args.out)
    _print_checks(report)
    print(f"{report['models_measured']} whole-model measurements in context, {report['entries']} layer entries in "
          f"{args.out}")  # fmt: skip
    if args.json:
        write_json(args.json, report)


def profile_model(args: argparse.Namespace):  # noqa: ANN202 - a Classifier, imported lazily
    """The model `profile` measures: the checkpoint's, or --model shaped by --dataset (as `run` shapes it) or by
    --channels and --image-size."""
    from hybridprune.models.sources import build_model
    from hybridprune.pruning.checkpoint import load_checkpoint

    if args.checkpoint:
        if any(v is not None for v in (args.width, args.channels, args.image_size, args.dataset)):
            raise HybridPruneError(
                "--checkpoint decides the model's shape: drop --width, --channels, --image-size, --dataset"
            )
        return load_checkpoint(args.checkpoint, args.model)[0].eval()
    if args.model is None:
        raise HybridPruneError("give the model to profile: --model NAME or --checkpoint FILE")
    if args.dataset is not None:
        channels, size, classes = _dataset_shape(args)
        return build_model(args.model, in_channels=channels, num_classes=classes, image_size=size,
                           width=args.width).eval()  # fmt: skip
    channels = args.channels or BenchConfig.channels
    return build_model(args.model, in_channels=channels, image_size=args.image_size or BenchConfig.image_size,
                       width=args.width).eval()  # fmt: skip


def _dataset_shape(args: argparse.Namespace) -> tuple[int, int, int]:
    """Input channels, image side and class count of `--dataset`, as `run` shapes a model for it."""
    from hybridprune.config import DataConfig
    from hybridprune.experiments.inputs import prepare_data_config

    if args.channels is not None or (args.image_size is not None and not args.dataset.startswith("folder:")):
        raise HybridPruneError("--dataset decides the input shape: drop --channels and --image-size")
    data = prepare_data_config(DataConfig(args.dataset, args.data_dir, image_size=args.image_size), 0)
    return data.train.channels, data.train.image_size, data.train.num_classes


def _print_checks(report: dict) -> None:
    from hybridprune.experiments.tables import markdown_table

    rows = [[c["model"], f"{c['predicted_ms']:.3f}", f"{c['measured_ms']:.3f}",
             f"{c['measured_p10_ms']:.3f}-{c['measured_p90_ms']:.3f}", f"{100 * c['error']:+.1f}%"]
            for c in report["checks"]]  # fmt: skip
    forced = " (forced by --latency-step)" if report["forced_step"] else ""
    print(f"step structure: latency moves at multiples of {report['block']} channels here; candidate counts are "
          f"multiples of {report['step']}{forced}; the smallest model measured {report['floor_ms']:.3f} ms; "
          f"threads {report['threads']}")  # fmt: skip
    inside = report["indistinguishable"]
    if inside:
        g, ks = next(iter(inside.items()))
        print(f"note: {sum(map(len, inside.values()))} candidate counts lie inside the device's blocks (e.g. {ks[:3]} "
              f"of {g}): the table cannot tell them from the block's boundary and predicts them no saving")
    print(markdown_table(["model", "predicted ms", "measured ms", "p10-p90", "error"], rows))
