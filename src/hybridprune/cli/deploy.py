"""The inference-side commands: `bench` (time four variants), `convert` (sparse inference model), `export` (ONNX).

Registered by `cli.build_parser`; the shared flag helpers live in `cli.py`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from hybridprune.cli import _add_user_model, _check_json_target, _checkpoint_pattern, _ratio
from hybridprune.errors import HybridPruneError


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

    from hybridprune.deploy.bench import parse_batch_sizes, parse_dtypes
    from hybridprune.deploy.sparse import to_inference_model
    from hybridprune.experiments.report import markdown_table
    from hybridprune.models.sources import input_shape
    from hybridprune.outputs import write_json
    from hybridprune.pruning.checkpoint import load_checkpoint
    from hybridprune.world import resolve_device

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
    reference = model.to(device=device, dtype=dtype).eval()  # unconverted: BN folding is checked too
    with torch.inference_mode():
        out, ref = inference.model(x).float(), reference(x).float()
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
    from hybridprune.config import ONNX_OPSET as OPSET
    from hybridprune.config import dataset_names

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

    from hybridprune.deploy.export import check_onnx, export_onnx
    from hybridprune.outputs import check_output_file
    from hybridprune.pruning.checkpoint import load_checkpoint

    check_output_file(args.out, args.overwrite)
    model, masks, meta = load_checkpoint(args.checkpoint, args.model)
    pattern = _checkpoint_pattern(args.checkpoint, meta)
    if args.dataset is None:
        images = torch.rand(args.check_images, *model.input_shape, generator=torch.Generator().manual_seed(0))
        source = "random images (give --dataset for real test images)"
    else:
        from hybridprune.data.datasets import batches, load_dataset
        from hybridprune.experiments.job import check_fits

        data = load_dataset(args.dataset, args.data_dir)
        check_fits(model, data)
        images = next(batches(data.test, args.check_images))[0]  # in-memory or streamed alike
        source = f"{len(images)} {data.name} test images"
    out = Path(args.out)
    staged = out.with_name(f".{out.name}.unchecked")  # renamed over --out only once it passes the check
    try:
        check = check_onnx(export_onnx(model, staged, args.opset), model, masks, images, pattern)
        if check.ok:
            os.replace(staged, out)
    finally:
        staged.unlink(missing_ok=True)
    print(
        f"{'wrote' if check.ok else 'checked, did not write'} {out} (opset {args.opset}, dynamic batch, "
        "BatchNorm folded, normalisation inside)\n"
        f"check on {source}: largest logit difference {check.max_abs_diff:.2e} (largest logit "
        f"{check.max_abs_logit:.2f}), top-1 agreement {100 * check.top1_agreement:.2f}%\n"
        f"N:M layers found in the file: {check.nm_layers_found} of {check.nm_layers}; groups breaking {pattern}: "
        f"{check.broken_groups}"
    )
    if not check.ok:
        raise HybridPruneError(f"the exported graph does not match the checkpoint; {out} left as it was")


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from hybridprune.config import PruneConfig

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

    from hybridprune.deploy.bench import (
        bench,
        parse_batch_sizes,
        parse_dtypes,
        synthetic_variants,
        variants_from_checkpoints,
        variants_from_run,
    )
    from hybridprune.deploy.sparse import check_dtype
    from hybridprune.experiments.report import bench_tables, kernel_table
    from hybridprune.outputs import environment, write_json
    from hybridprune.world import resolve_device

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


def add_parsers(sub: argparse._SubParsersAction) -> None:
    _add_bench(sub)
    _add_convert(sub)
    _add_export(sub)
