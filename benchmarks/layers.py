"""Microbenchmark: single 1x1 convs, kxk convs and linears, dense against 2:4 sparse, time split into kernel and host.

Draws the boundary where sparse tensor cores pay. A conv's dense baseline is cuDNN (`F.conv2d`, channels-last);
its sparse path is hybridprune's GEMM on the channels-last pixels (1x1) or on unfolded patches (kxk) with the
weight on cuSPARSELt, its algorithm chosen by timing with the output checked against dense. A linear's baseline
is cuBLAS. Per case:

- kernel ms: a CUDA graph of the call replayed (no host work), CUDA events; `sparse_alg0_ms` is the same with
  PyTorch's default algorithm 0, so the gain from choosing one shows;
- eager ms: wall time of back-to-back eager calls (what a deployment without graphs pays);
- host ms: eager minus kernel, i.e. what the Python and descriptor/plan set-up of each call costs where it is
  not hidden under the previous kernel.

On a CPU there is no sparse kernel: the dense paths are timed, and `--check-kernel` runs the whole sparse branch
with a dense GEMM in place of the sparse kernel, so this script is exercised without a GPU.

    python benchmarks/layers.py --out docs/results/gpu-h100/layers.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hybridprune.deploy.sparse import SparseKernel, as_kernel, no_sparse_reason, sparse_backend, sparse_module
from hybridprune.deploy.sparse_tuning import kernel_ms, relative_error, tune_cusparselt_alg
from hybridprune.experiments.tables import markdown_table
from hybridprune.outputs import write_json
from hybridprune.provenance import environment
from hybridprune.pruning.nm import nm_mask

RESNET50_SIDE = {64: 56, 128: 56, 256: 56, 512: 28, 1024: 14, 2048: 7}  # a 1x1 conv's input side in ResNet-50


def eager_ms(fn, repeats: int, device: torch.device) -> float:  # noqa: ANN001
    """Wall milliseconds per call of `repeats` back-to-back eager calls (launches queue; the clock stops when the
    device is done), after 3 warm-up calls.

    Example:
        >>> eager_ms(lambda: None, 3, torch.device("cpu")) >= 0
        True
    """
    for _ in range(3):
        fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) * 1e3 / repeats


def time_case(layer: nn.Module, x: torch.Tensor, row: dict, kernel: SparseKernel | None, repeats: int) -> dict:
    """Time the 2:4-masked layer dense and (where a sparse kernel is given) sparse: kernel, eager and host ms."""
    with torch.no_grad():
        layer.weight.mul_(nm_mask(layer.weight))
    with torch.inference_mode():
        row["dense_ms"], row["dense_note"] = kernel_ms(layer, x, repeats)
        row["dense_eager_ms"] = eager_ms(lambda: layer(x), repeats, x.device)
        row["dense_host_ms"] = max(0.0, row["dense_eager_ms"] - row["dense_ms"])
        if kernel is not None:
            _time_sparse(layer, x, row, kernel, repeats)
    return row


def _time_sparse(layer: nn.Module, x: torch.Tensor, row: dict, kernel: SparseKernel, repeats: int) -> None:
    sparse = sparse_module(layer, kernel)
    if kernel.tunable and x.device.type == "cuda":
        row["sparse_alg0_ms"] = kernel_ms(sparse, x, repeats)[0]  # PyTorch's default algorithm
        row["sparse_ms"], row["sparse_note"] = tune_cusparselt_alg(sparse, layer, x)
        row["alg_id"] = sparse.weight.alg_id_cusparselt
        if row["sparse_ms"] is None:
            return
    else:
        row["sparse_ms"], row["sparse_note"] = kernel_ms(sparse, x, repeats)
    row["sparse_eager_ms"] = eager_ms(lambda: sparse(x), repeats, x.device)
    row["sparse_host_ms"] = max(0.0, row["sparse_eager_ms"] - row["sparse_ms"])
    row["relative_error"] = relative_error(sparse(x), layer(x))
    row["kernel_speedup"] = row["dense_ms"] / row["sparse_ms"]
    row["eager_speedup"] = row["dense_eager_ms"] / row["sparse_eager_ms"]


def conv_case(channels: int, batch: int, ksize: int, side: int, device, dtype, kernel, repeats: int) -> dict:  # noqa: ANN001
    conv = nn.Conv2d(channels, channels, ksize, padding=ksize // 2).to(device, dtype)
    conv = conv.to(memory_format=torch.channels_last)
    x = torch.randn(batch, channels, side, side, device=device, dtype=dtype).to(memory_format=torch.channels_last)
    rows = batch * side * side
    gemm = f"{rows}x{ksize * ksize * channels} @ {ksize * ksize * channels}x{channels}"
    row = {"layer": f"conv{ksize}x{ksize}", "channels": channels, "batch_size": batch, "spatial": side, "gemm": gemm}
    return time_case(conv, x, row, kernel, repeats)


def linear_case(features: int, rows: int, device, dtype, kernel, repeats: int) -> dict:  # noqa: ANN001
    lin = nn.Linear(features, features).to(device, dtype)
    x = torch.randn(rows, features, device=device, dtype=dtype)
    row = {"layer": "linear", "channels": features, "batch_size": rows, "spatial": None,
           "gemm": f"{rows}x{features} @ {features}x{features}"}  # fmt: skip
    return time_case(lin, x, row, kernel, repeats)


def _ms(row: dict, key: str) -> str:
    return "-" if row.get(key) is None else f"{row[key]:.4f}"


def table(rows: list[dict]) -> str:
    head = ["layer", "ch", "batch", "side", "GEMM", "dense kernel", "dense host", "sparse kernel", "alg", "alg 0",
            "sparse host", "kernel speedup", "eager speedup", "rel err", "note"]  # fmt: skip
    body = [
        [r["layer"], r["channels"], r["batch_size"], r["spatial"] or "-", r["gemm"], _ms(r, "dense_ms"),
         _ms(r, "dense_host_ms"), _ms(r, "sparse_ms"), r.get("alg_id", "-"), _ms(r, "sparse_alg0_ms"),
         _ms(r, "sparse_host_ms"), f"{r['kernel_speedup']:.2f}x" if r.get("kernel_speedup") else "-",
         f"{r['eager_speedup']:.2f}x" if r.get("eager_speedup") else "-",
         f"{r['relative_error']:.1e}" if r.get("relative_error") is not None else "-",
         "; ".join(filter(None, [r.get("dense_note"), r.get("sparse_note")]))]
        for r in rows
    ]  # fmt: skip
    return markdown_table(head, body)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs/results/layers.json", help="JSON file to write (and a .md table beside)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--dtype", default=None, help="float16 or bfloat16 on GPU (default float16); float32 on CPU")
    p.add_argument("--conv1x1-channels", default="256,512,1024,2048", help="1x1 conv in = out channel counts")
    p.add_argument("--conv3x3-channels", default="", help="3x3 conv in = out channel counts (none by default)")
    p.add_argument("--linear-features", default="1024,2048,4096,8192", help="linear in = out feature counts")
    p.add_argument("--batch-sizes", default="64,128,256", help="conv batch sizes (a linear takes 16x as many rows)")
    p.add_argument("--spatial", type=int, default=0, help="conv input side (0: ResNet-50's side at that width)")
    p.add_argument("--repeats", type=int, default=30, help="timed calls per measurement")
    p.add_argument(
        "--check-kernel", action="store_true", help="the sparse branch with a dense GEMM as its kernel (a CPU check)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    backend = sparse_backend(device)
    kernel = as_kernel(backend)
    if args.check_kernel:
        kernel = SparseKernel("dense-check", {dtype: (16, 16)}, compress=lambda w: w.contiguous(), gemm=F.linear)
    elif kernel is None:
        print(f"note: {no_sparse_reason(device)}; timing the dense paths only", file=sys.stderr)
    batches, rows = _ints(args.batch_sizes), []
    cases = [(c, b, 1) for c in _ints(args.conv1x1_channels) for b in batches]
    cases += [(c, b, 3) for c in _ints(args.conv3x3_channels) for b in batches]
    for c, b, k in cases:
        side = args.spatial or RESNET50_SIDE.get(c, 14)
        rows.append(conv_case(c, b, k, side, device, dtype, kernel, args.repeats))
        print(table(rows[-1:]).splitlines()[-1], flush=True)  # a row as soon as it is measured
    for f in _ints(args.linear_features):
        for b in batches:
            rows.append(linear_case(f, b * 16, device, dtype, kernel, args.repeats))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    text = table(rows)
    print(text)
    command = "python benchmarks/layers.py " + " ".join(sys.argv[1:] if argv is None else argv)
    write_json(args.out, {"command": command, "device": str(device), "dtype": str(dtype), "backend": backend,
                          "environment": environment(), "rows": rows})  # fmt: skip
    Path(args.out).with_suffix(".md").write_text(f"`{command}`\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
