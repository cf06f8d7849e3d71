"""The inference-side commands: `bench` (time four variants), `convert` (sparse inference model), `export` (ONNX).

Each builds its config (`BenchConfig`, `ConvertConfig`, `ExportConfig`) from its flags and calls `deploy/`;
torch is imported inside the commands, so `--help` imports none.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from hybridprune.cli.checks import check_json_target, checkpoint_pattern
from hybridprune.cli.flags import add_user_model, config_from_args, model_string, numeric, ratio
from hybridprune.config import (
    BenchConfig,
    ConvertConfig,
    ExportConfig,
    ModelConfig,
    PruneConfig,
    RunConfig,
    dataset_names,
)
from hybridprune.errors import HybridPruneError

VARIANT_FLAGS = ("dense", "filter", "nm", "hybrid")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """The `bench`, `convert` and `export` commands."""
    _add_bench(sub)
    _add_convert(sub)
    _add_export(sub)


# --- bench ----------------------------------------------------------------------------------------------------
def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="time dense, filter-pruned, 2:4-only and hybrid variants of one model")
    p.add_argument("run_dir", nargs="?", default=None, help="the --out folder of `hybridprune run` (trained variants)")
    p.add_argument("--metric", default=None, help="which metric's filter/hybrid models to take from RUN_DIR")
    for name in VARIANT_FLAGS:
        p.add_argument(f"--{name}", default=None, help=f"checkpoint of the {name} variant (instead of RUN_DIR)")
    _add_synthetic_flags(p)
    _add_timing_flags(p)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--overwrite", action="store_true", help="replace --json if it exists")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(handler=cmd_bench)


def _add_synthetic_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--synthetic", action="store_true", help="untrained variants of the given shape (speed only)")
    p.add_argument(
        "--model",
        default=None,
        type=model_string,
        help="model of the synthetic variants (default alexnet); for checkpoints of user code, its module:factory",
    )
    numeric(p, "--width", ModelConfig, "width", "width multiplier of synthetic built-in models")
    numeric(p, "--image-size", BenchConfig, "image_size", "input height and width of the synthetic variants")
    numeric(p, "--channels", BenchConfig, "channels", "input channels of the synthetic variants")
    p.add_argument(
        "--filter-ratio",
        type=ratio,
        default=PruneConfig.filter_ratio,
        help=f"filter ratio of the synthetic variants (default: {PruneConfig.filter_ratio})",
    )
    numeric(p, "--round-to", PruneConfig, "round_to", "round-to of the synthetic variants")
    numeric(p, "--seed", RunConfig, "seed", "seed of the synthetic variants")


def _add_timing_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--batch-size",
        "--batch-sizes",
        dest="batch_sizes",
        default="1,16,64,256,1024",
        help="batch size, or comma-separated batch sizes, to time (--batch-sizes: the older name; default "
        "1,16,64,256,1024)",
    )
    p.add_argument(
        "--dtypes",
        default=None,
        help="comma-separated: float16, bfloat16, float32 (default: float16 on GPU, float32 on CPU)",
    )
    p.add_argument(
        "--kernels",
        default="fastest",
        choices=["sparse", "fastest", "dense", "sparse-all"],
        help="sparse: linears and 1x1 convs on the 2:4 kernel, kxk convs dense; fastest: per layer, the faster of "
        "dense and sparse measured on its real input shape; dense: no sparse kernels; sparse-all: every eligible "
        "layer sparse (checks)",
    )
    numeric(p, "--rounds", BenchConfig, "rounds", "round-robin rounds (each times every variant)")
    numeric(p, "--calls", BenchConfig, "calls", "timed calls per variant per round")
    p.add_argument("--no-cuda-graphs", action="store_true", help="skip CUDA-graph replay timing on GPU")
    p.add_argument(
        "--onnxruntime",
        action="store_true",
        help="also time each variant exported to ONNX and run by ONNX Runtime (CPU, float32; needs [export])",
    )
    p.add_argument(
        "--runtimes",
        default=None,
        help="also time each variant in these RUNTIME:PRECISION pairs, e.g. onnxruntime:int8,openvino:bf16 "
        "(runtimes: torch, onnxruntime, openvino, tensorrt; precisions: fp32, bf16, fp16, int8; int8 is "
        "calibrated on random images, u8s8: speed only), or `installed` for every pair that runs here",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    numeric(p, "--threads", BenchConfig, "threads", "CPU threads for torch (default: torch's choice)")


def cmd_bench(args: argparse.Namespace) -> None:
    import torch

    from hybridprune.deploy.bench import bench, parse_batch_sizes
    from hybridprune.deploy.runtimes import parse_pairs
    from hybridprune.deploy.sparse import check_dtype
    from hybridprune.provenance import environment

    cfg = config_from_args(BenchConfig, args)
    batch_sizes = parse_batch_sizes(args.batch_sizes)
    device, dtypes = _device_and_dtypes(args.device, args.dtypes)
    check_json_target(args.json, args.overwrite)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    deployments = parse_pairs(args.runtimes, device) if args.runtimes else []  # before building any variant
    variants = _variants(args, cfg)
    for dtype in dtypes:
        check_dtype(dtype, device)  # before building anything: a dtype the device cannot run is bad input
    env = environment()
    result = bench(
        variants,
        device,
        dtypes,
        batch_sizes,
        rounds=cfg.rounds,
        calls=cfg.calls,
        choose=args.kernels,
        cuda_graphs=not args.no_cuda_graphs,
        onnxruntime=args.onnxruntime,
        progress=not args.no_progress,
        deployments=deployments,
        threads=cfg.threads,
    )
    result["environment"] = env
    result["command"] = "hybridprune " + " ".join(args.argv)
    if deployments:
        from hybridprune.deploy.runtimes import runtime_versions
        from hybridprune.hardware import cpu_isa

        result["runtimes"] = {"versions": runtime_versions(*dict.fromkeys(r for r, _ in deployments)), "cpu": cpu_isa()}
    result["variants"] = {v.name: {"source": v.source, "accuracy": v.accuracy} for v in variants}
    _print_bench(result, args.json)


def _device_and_dtypes(device_name: str, dtypes: str | None) -> tuple[Any, list[Any]]:
    """The device, and the dtypes to time on it (default: float16 on a GPU, float32 on a CPU)."""
    from hybridprune.deploy.bench import parse_dtypes
    from hybridprune.world import resolve_device

    device = resolve_device(device_name)
    return device, parse_dtypes(("float16" if device.type == "cuda" else "float32") if dtypes is None else dtypes)


def _variants(args: argparse.Namespace, cfg: BenchConfig) -> list[Any]:
    """The variants to time, from exactly one source: RUN_DIR, checkpoint files, or --synthetic."""
    from hybridprune.deploy.bench import synthetic_variants, variants_from_checkpoints, variants_from_run

    files = {n: getattr(args, n) for n in VARIANT_FLAGS if getattr(args, n)}
    if sum([bool(args.run_dir), bool(files), args.synthetic]) != 1:
        raise HybridPruneError("give exactly one source: RUN_DIR, --dense/--filter/--nm/--hybrid, or --synthetic")
    if args.run_dir:
        return variants_from_run(args.run_dir, args.metric, args.model)
    if files:
        return variants_from_checkpoints(files, args.model)
    return synthetic_variants(
        args.width,
        cfg.channels,
        cfg.image_size,
        filter_ratio=args.filter_ratio,
        round_to=args.round_to,
        model=args.model or "alexnet",
        seed=args.seed,
    )


def _print_bench(result: dict[str, Any], json_path: str | None) -> None:
    from hybridprune.experiments.tables import bench_tables, kernel_table
    from hybridprune.outputs import write_json

    for notice in result["notices"]:
        print(f"note: {notice}")
    print(bench_tables(result))
    print("\nkernels per layer (largest batch):")
    print(kernel_table(result))
    if json_path:
        write_json(json_path, result)
        print(f"\nwrote {json_path}")


# --- convert --------------------------------------------------------------------------------------------------
def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="build the sparse inference model of an N:M checkpoint and check it")
    p.add_argument("checkpoint", help="checkpoint with N:M masks (a *-hybrid or nm checkpoint of `run`)")
    add_user_model(p)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default=None, help="float16 or bfloat16 on GPU (default float16); float32 on CPU")
    p.add_argument(
        "--kernels",
        default="fastest",
        choices=["sparse", "fastest", "dense", "gemm", "sparse-all"],
        help="sparse: linears and 1x1 convs sparse, kxk convs dense; fastest: the faster per layer, measured; "
        "dense: none; gemm: dense GEMM lowering (checks it); sparse-all: every eligible layer sparse (checks)",
    )
    numeric(p, "--batch-size", ConvertConfig, "batch_size", "input batch the per-layer choice is measured on")
    p.add_argument("--json", default=None, help="also write the per-layer report to this JSON file")
    p.add_argument("--overwrite", action="store_true", help="replace --json if it exists")
    p.set_defaults(handler=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> None:
    import torch

    from hybridprune.deploy.bench import parse_batch_sizes
    from hybridprune.deploy.sparse import to_inference_model
    from hybridprune.models.sources import input_shape
    from hybridprune.pruning.checkpoint import load_checkpoint

    cfg = config_from_args(ConvertConfig, args)
    check_json_target(args.json, args.overwrite)
    device, dtypes = _device_and_dtypes(args.device, args.dtype)
    if len(dtypes) != 1:
        raise HybridPruneError(f"--dtype takes one dtype, got {args.dtype!r}")
    (dtype,) = dtypes
    (batch,) = parse_batch_sizes(str(cfg.batch_size))
    model, masks, meta = load_checkpoint(args.checkpoint, args.model)
    if not masks:
        raise HybridPruneError(f"{args.checkpoint} has no N:M masks; convert takes an N:M-pruned checkpoint")
    x = torch.rand(batch, *input_shape(model), device=device, dtype=dtype)
    pattern = checkpoint_pattern(args.checkpoint, meta)
    inference = to_inference_model(model, masks, device, dtype, choose=args.kernels, pattern=pattern, example=x)
    reference = model.to(device=device, dtype=dtype).eval()  # unconverted: BN folding is checked too
    with torch.inference_mode():
        out, ref = inference.model(x).float(), reference(x).float()
    diff = float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
    _print_conversion(inference, diff)
    if args.json:
        from hybridprune.outputs import write_json

        report = {"checkpoint": args.checkpoint, "device": str(device), "dtype": str(dtype)}
        report |= {"backend": inference.backend, "relative_max_diff": diff}
        report |= {"layers": [k.__dict__ for k in inference.layers], "notice": inference.notice}
        write_json(args.json, report)


def _print_conversion(inference: Any, diff: float) -> None:
    from hybridprune.experiments.tables import markdown_table

    if inference.notice:
        print(f"note: {inference.notice}")
    rows = [
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
    ]
    print(markdown_table(["layer", "kind", "GEMM weight", "kernel", "dense ms", "sparse ms", "why"], rows))
    print(
        f"{len(inference.sparse_layers)} of {len(inference.layers)} layers on sparse kernels; largest logit "
        f"difference from the dense masked model: {100 * diff:.3f}% of the largest logit"
    )


# --- export ---------------------------------------------------------------------------------------------------
def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="ONNX file of a checkpoint (dynamic batch), checked with ONNX Runtime")
    p.add_argument("checkpoint", help="any hybridprune checkpoint: dense, filter-pruned, 2:4 or hybrid")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    numeric(p, "--opset", ExportConfig, "opset", "ONNX opset")
    p.add_argument(
        "--dataset", default=None, help=f"test images for the check: {', '.join(dataset_names())} (default: random)"
    )
    p.add_argument("--data-dir", default=None, help="root of torchvision-layout datasets")
    numeric(p, "--check-images", ExportConfig, "check_images", "images run through both PyTorch and ONNX Runtime")
    add_user_model(p)
    p.set_defaults(handler=cmd_export)


def cmd_export(args: argparse.Namespace) -> None:
    from hybridprune.deploy.export import check_onnx, export_onnx
    from hybridprune.outputs import check_output_file
    from hybridprune.pruning.checkpoint import load_checkpoint

    cfg = config_from_args(ExportConfig, args)
    check_output_file(args.out, args.overwrite, example="model.onnx")
    model, masks, meta = load_checkpoint(args.checkpoint, args.model)
    pattern = checkpoint_pattern(args.checkpoint, meta)
    images, source = _check_images(model, args.dataset, args.data_dir, cfg.check_images)
    out = Path(args.out)
    staged = out.with_name(f".{out.name}.unchecked")  # renamed over --out only once it passes the check
    try:
        check = check_onnx(export_onnx(model, staged, cfg.opset), model, masks, images, pattern)
        if check.ok:
            os.replace(staged, out)
    finally:
        staged.unlink(missing_ok=True)
    print(
        f"{'wrote' if check.ok else 'checked, did not write'} {out} (opset {cfg.opset}, dynamic batch, "
        "BatchNorm folded, normalisation inside)\n"
        f"check on {source}: largest logit difference {check.max_abs_diff:.2e} (largest logit "
        f"{check.max_abs_logit:.2f}), top-1 agreement {100 * check.top1_agreement:.2f}%\n"
        f"N:M layers found in the file: {check.nm_layers_found} of {check.nm_layers}; groups breaking {pattern}: "
        f"{check.broken_groups}"
    )
    if not check.ok:
        raise HybridPruneError(f"the exported graph does not match the checkpoint; {out} left as it was")


def _check_images(model: Any, dataset: str | None, data_dir: str | None, count: int) -> tuple[Any, str]:
    """`count` images to check the export on, and where they came from: `dataset`'s test split, or random."""
    import torch

    if dataset is None:
        images = torch.rand(count, *model.input_shape, generator=torch.Generator().manual_seed(0))
        return images, "random images (give --dataset for real test images)"
    from hybridprune.data.batching import batches
    from hybridprune.data.datasets import load_dataset
    from hybridprune.experiments.inputs import check_fits

    data = load_dataset(dataset, data_dir)
    check_fits(model, data)
    images = next(batches(data.test, count))[0]  # in-memory or streamed alike
    return images, f"{len(images)} {data.name} test images"
