"""The deployment-precision commands: `quantize` (an INT8 QDQ file of a checkpoint, measured in the runtime that
will run it), and what `evaluate` does with an ONNX file or a `--runtime` (accuracy where the model is deployed).

`hybridprune quantize runs/dense.safetensors --out model-int8.onnx --dataset cifar10 --runtime openvino`

Builds a `QuantizeConfig` from its flags and calls `deploy.quantize`; torch is imported inside the commands, so
`--help` imports none.
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Any

from hybridprune.cli.checks import check_json_target, checkpoint_pattern
from hybridprune.cli.flags import add_data, add_user_model, config_from_args, numeric
from hybridprune.config import (
    CALIBRATION_METHODS,
    DEPLOY_PRECISIONS,
    QUANT_FORMATS,
    QUANT_RUNTIMES,
    RUNTIME_NAMES,
    BenchConfig,
    DataConfig,
    QuantizeConfig,
    RunConfig,
)
from hybridprune.errors import HybridPruneError


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """The `quantize` command."""
    p = sub.add_parser("quantize", help="post-training static INT8 (ONNX QDQ) of a checkpoint, measured in a runtime")
    p.add_argument("checkpoint", help="any hybridprune checkpoint: dense, filter-pruned, 2:4 or hybrid")
    p.add_argument("--out", required=True, help="the INT8 .onnx file to write (e.g. model-int8.onnx)")
    p.add_argument("--overwrite", action="store_true", help="replace --out and --json if they exist")
    add_data(p, default=None)
    add_user_model(p)
    numeric(p, "--calibration-images", QuantizeConfig, "calibration_images",
            "training images the activation ranges are calibrated on (seeded subset)")  # fmt: skip
    p.add_argument("--calibration-method", default=QuantizeConfig.calibration_method, choices=CALIBRATION_METHODS,
                   help="how ranges come from the calibration activations (default: minmax)")  # fmt: skip
    p.add_argument("--format", default=QuantizeConfig.format, choices=QUANT_FORMATS,
                   help="activations uint8 (u8s8) or int8 (s8s8), weights int8 symmetric per channel; auto: both are "
                   "made and timed in --runtime, the faster is kept (default: auto)")  # fmt: skip
    p.add_argument("--runtime", default=QuantizeConfig.runtime, choices=QUANT_RUNTIMES,
                   help="the runtime that will run the file: accuracy and the auto format are measured there "
                   f"(default: {QuantizeConfig.runtime})")  # fmt: skip
    numeric(p, "--batch-size", QuantizeConfig, "batch_size", "batch of calibration, evaluation and format timing")
    numeric(p, "--rounds", QuantizeConfig, "rounds", "timed rounds of each graph (format choice and latencies)")
    numeric(p, "--seed", RunConfig, "seed", "seed of the calibration subset and of --train-size/--test-size")
    numeric(p, "--opset", QuantizeConfig, "opset", "ONNX opset of the exported graph")
    add_precision_per_layer(p)
    numeric(p, "--threads", BenchConfig, "threads", "runtime threads (default: as many as torch uses)")
    p.add_argument("--json", default=None, help="also write the report to this JSON file")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(handler=cmd_quantize)


def add_precision_per_layer(p: argparse.ArgumentParser) -> None:
    """`--max-drop` and `--validation-images`: precision per layer (`deploy.mixed_precision`)."""
    numeric(p, "--max-drop", QuantizeConfig, "max_drop", "precision per layer: keep the fewest layers in float (chosen "
            "by measured sensitivity per measured ms) that bring INT8 top-1 on validation images within this many "
            "points of fp32 (default: every layer INT8)")  # fmt: skip
    numeric(p, "--validation-images", QuantizeConfig, "validation_images",
            "training images (never test images) that --max-drop's choice is measured on")  # fmt: skip


def add_deploy_flags(p: argparse.ArgumentParser) -> None:
    """`--runtime` and `--deploy-precision`: where `evaluate` measures accuracy (an ONNX file needs them)."""
    p.add_argument("--runtime", default=None, choices=RUNTIME_NAMES,
                   help="measure accuracy in this runtime (an ONNX file: default onnxruntime; a checkpoint: "
                   "default PyTorch as trained)")  # fmt: skip
    p.add_argument("--deploy-precision", default=None, choices=DEPLOY_PRECISIONS,
                   help="precision the runtime computes in (default: int8 for a quantized file, else fp32); bf16 "
                   "needs a CPU with AMX or AVX512-BF16; int8 runs a file from `hybridprune quantize`")  # fmt: skip


def data_config(args: argparse.Namespace) -> DataConfig:
    """The dataset flags as a DataConfig (every DataConfig field the command has a flag for)."""
    return DataConfig(**{f.name: getattr(args, f.name) for f in fields(DataConfig) if hasattr(args, f.name)})


def cmd_quantize(args: argparse.Namespace) -> None:
    from hybridprune.deploy.quantize import quantize
    from hybridprune.deploy.runtimes import get_runtime
    from hybridprune.experiments.inputs import check_classes, check_fits, prepare_data_config, recorded_dataset
    from hybridprune.outputs import check_output_file, write_json
    from hybridprune.provenance import environment
    from hybridprune.pruning.checkpoint import load_checkpoint

    cfg = config_from_args(QuantizeConfig, args)
    check_output_file(args.out, args.overwrite, example="model-int8.onnx")
    check_json_target(args.json, args.overwrite)
    for precision in ("fp32", "int8"):  # before loading anything: the runtime runs here
        get_runtime(cfg.runtime).check(precision, "cpu")
    model, masks, meta = load_checkpoint(args.checkpoint, args.model)
    args.dataset = args.dataset or recorded_dataset(meta, args.checkpoint)
    if args.dataset is None:
        raise HybridPruneError(f"{args.checkpoint} records no dataset; give --dataset (calibration and test images)")
    data = prepare_data_config(data_config(args), args.seed)
    check_fits(model, data, meta.get("dataset"))
    check_classes(meta, data, args.checkpoint)
    report = quantize(
        model, data.train, data.test, args.out, cfg, masks=masks, pattern=checkpoint_pattern(args.checkpoint, meta),
        seed=args.seed, threads=args.threads, progress=not args.no_progress, data_name=data.name,
    )  # fmt: skip
    print(quantize_summary(report.to_dict(), data.name))
    if args.json:
        command = "hybridprune " + " ".join(args.argv)
        result = {"checkpoint": args.checkpoint, "dataset": data.name, **report.to_dict(), "config": cfg.to_dict(),
                  "environment": environment(), "command": command}  # fmt: skip
        write_json(args.json, result)
        print(f"wrote {args.json}")


def quantize_summary(r: dict[str, Any], data: str) -> str:
    """What `quantize` prints: the format and why, the weights, the accuracy in the runtime, the machine.

    Example:
        >>> r = {"calibration": {"images": 8, "method": "minmax"}, "format": "u8s8", "format_choice": "given",
        ...      "runtime": "onnxruntime", "timing_batch": 4, "latency_ms": {"fp32": 2.0, "u8s8": 1.0},
        ...      "weights": {"int8_layers": 3, "zeros_fp32": 10, "zeros_lost": 0, "nm_layers": 0,
        ...      "nm_layers_found": 0, "nm_broken_groups": 0, "pattern": "2:4"}, "batchnorm_nodes_left": 0,
        ...      "test_images": 9, "fp32_top1": 50.0, "int8_top1": 49.0, "top1_agreement": 90.0,
        ...      "max_logit_diff": 0.1, "max_abs_logit": 3.0, "versions": {"onnxruntime": "1"},
        ...      "cpu": {"name": "x", "avx512f": True, "amx_int8": False}, "out": "m.onnx"}
        >>> print(quantize_summary(r, "digits").splitlines()[-2])
        CPU x: avx512f yes, amx_int8 no
    """
    cal, w, rt = r["calibration"], r["weights"], r["runtime"]
    isa = {k: v for k, v in r["cpu"].items() if k != "name"}
    times = ", ".join(f"{k} {v:.3f} ms" for k, v in r["latency_ms"].items())
    why = "measured fastest" if r["format_choice"] == "measured" else "as given"
    speed = r["latency_ms"]["fp32"] / r["latency_ms"][r["format"]]
    lines = [
        f"calibrated on {cal['images']} {data} training images ({cal['method']}); activations {r['format']} ({why}; "
        f"{rt} at batch {r['timing_batch']}: {times}; int8 {speed:.2f}x fp32)",
        f"weights int8 symmetric per output channel in {w['int8_layers']} layers: {w['zeros_lost']} of "
        f"{w['zeros_fp32']} zero weights lost; N:M layers found {w['nm_layers_found']} of {w['nm_layers']}, "
        f"groups breaking {w['pattern']}: {w['nm_broken_groups']}",
        f"BatchNorm folded: {r['batchnorm_nodes_left']} BatchNormalization nodes left in the graph",
        *([mixed_summary(r["mixed_precision"])] if r.get("mixed_precision") else []),
        f"top-1 on {r['test_images']} {data} test images in {rt}: fp32 {r['fp32_top1']:.2f}%, int8 "
        f"{r['int8_top1']:.2f}% ({r['int8_top1'] - r['fp32_top1']:+.2f}); predictions agree on "
        f"{r['top1_agreement']:.2f}%; largest logit difference {r['max_logit_diff']:.4f} (largest logit "
        f"{r['max_abs_logit']:.2f})",
        "versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()),
        f"CPU {r['cpu']['name']}: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in isa.items()),
        f"wrote {r['out']}",
    ]
    return "\n".join(lines)


def mixed_summary(m: dict[str, Any]) -> str:
    """The precision-per-layer line of `quantize`.

    Example:
        >>> print(mixed_summary({"float_nodes": ["/conv1/Conv"], "max_drop": 1.0, "validation_images": 64,
        ...       "fp32_top1": 90.0, "int8_top1": 89.5, "all_int8_top1": 70.0, "probes": [{}, {}]}))
        ... # doctest: +NORMALIZE_WHITESPACE
        kept in float: /conv1/Conv (1 layer), within 1 points of fp32 on 64 validation images (training images):
        fp32 90.00%, all INT8 70.00%, this file 89.50% (2 measured probes)
    """
    nodes = m["float_nodes"]
    kept = f"{', '.join(nodes)} ({len(nodes)} layer{'s' * (len(nodes) > 1)})" if nodes else "none (every layer INT8)"
    return (f"kept in float: {kept}, within {m['max_drop']:g} points of fp32 on {m['validation_images']} validation "
            f"images (training images): fp32 {m['fp32_top1']:.2f}%, all INT8 {m['all_int8_top1']:.2f}%, this file "
            f"{m['int8_top1']:.2f}% ({len(m['probes'])} measured probes)")  # fmt: skip


def evaluate_onnx_file(args: argparse.Namespace) -> None:
    """`evaluate MODEL.onnx`: top-1 of the file in --runtime at --deploy-precision on the test split."""
    from hybridprune.deploy.accuracy import onnx_accuracy
    from hybridprune.deploy.runtimes import get_runtime, runtime_versions
    from hybridprune.deploy.runtimes.files import inspect_onnx
    from hybridprune.experiments.inputs import prepare_data_config
    from hybridprune.hardware import cpu_isa
    from hybridprune.outputs import write_json

    check_json_target(args.json, args.overwrite)
    runtime = args.runtime or "onnxruntime"
    info = inspect_onnx(args.checkpoint)  # before any data: the file is what it claims, its data stays inside
    precision = args.deploy_precision or ("int8" if info.quantized else "fp32")
    get_runtime(runtime).check(precision, "cpu")
    if args.dataset is None:
        raise HybridPruneError("an ONNX file records no dataset; give --dataset")
    data = prepare_data_config(data_config(args), args.seed)
    acc = onnx_accuracy(args.checkpoint, data.test, runtime, precision, data.name, progress=not args.no_progress)
    result = {"model": args.checkpoint, "dataset": data.name, "test_images": acc.images, "runtime": runtime,
              "precision": precision, "accuracy": acc.top1, "versions": runtime_versions(runtime),
              "cpu": cpu_isa()}  # fmt: skip
    for key, value in result.items():
        print(f"{key}: {f'{value:.2f}%' if key == 'accuracy' else value}")
    if args.json:
        write_json(args.json, result)


def deployed_accuracy(args: argparse.Namespace, model: Any, data: Any) -> dict[str, Any]:
    """`evaluate CHECKPOINT --runtime R`: the checkpoint's top-1 converted to R at --deploy-precision."""
    from hybridprune.deploy.accuracy import module_accuracy
    from hybridprune.deploy.runtimes import runtime_versions

    runtime, precision = args.runtime or "torch", args.deploy_precision or "fp32"
    acc = module_accuracy(model, data.test, runtime, precision, progress=not args.no_progress)
    return {"accuracy": acc.top1, "runtime": runtime, "precision": precision, "versions": runtime_versions(runtime)}

