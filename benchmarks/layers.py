"""Microbenchmark: single conv and linear layers, dense versus 2:4 sparse, over channel counts and batch sizes.

Draws the boundary where sparse tensor cores start to pay. A conv's sparse path is the unfold + sparse
GEMM of hybridprune.deploy.sparse; its dense baseline is cuDNN (`F.conv2d`, channels-last, the same dtype),
and the dense unfold + GEMM is timed too, so the cost of the lowering itself shows separately.

On a CPU there is no sparse kernel: the script times the dense paths only and says so.

    python benchmarks/layers.py --out docs/results/layers-gpu.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

from hybridprune.deploy.sparse import GemmConv2d, sparse_backend, sparse_module
from hybridprune.deploy.timing import median_ms
from hybridprune.experiments.tables import markdown_table
from hybridprune.outputs import write_json
from hybridprune.provenance import environment
from hybridprune.pruning.nm import nm_mask


def time_dense_and_sparse(layer: nn.Module, x: torch.Tensor, row: dict, backend, repeats: int) -> dict:
    """Time the 2:4-masked layer dense (cuDNN/cuBLAS) and, where the device has them, on sparse kernels."""
    with torch.no_grad():
        layer.weight.mul_(nm_mask(layer.weight))
    with torch.inference_mode():
        row["dense_ms"] = median_ms(lambda: layer(x), repeats, x.device, warmup=5)
        if isinstance(layer, nn.Conv2d):
            gemm = GemmConv2d.from_conv(layer)
            row["dense_gemm_ms"] = median_ms(lambda: gemm(x), repeats, x.device, warmup=5)
        if backend:
            sparse = sparse_module(layer, backend)
            row["sparse_ms"] = median_ms(lambda: sparse(x), repeats, x.device, warmup=5)
    return row


def conv_case(channels: int, batch: int, side: int, device, dtype, backend, repeats: int) -> dict:
    conv = nn.Conv2d(channels, channels, 3, padding=1, bias=True).to(device, dtype)
    conv = conv.to(memory_format=torch.channels_last)
    x = torch.randn(batch, channels, side, side, device=device, dtype=dtype).to(memory_format=torch.channels_last)
    row = {
        "layer": "conv3x3",
        "channels": channels,
        "batch_size": batch,
        "spatial": side,
        "gemm": f"{batch * side * side}x{9 * channels} @ {9 * channels}x{channels}",
    }
    return time_dense_and_sparse(conv, x, row, backend, repeats)


def linear_case(features: int, batch: int, device, dtype, backend, repeats: int) -> dict:
    lin = nn.Linear(features, features).to(device, dtype)
    x = torch.randn(batch, features, device=device, dtype=dtype)
    row = {
        "layer": "linear",
        "channels": features,
        "batch_size": batch,
        "spatial": None,
        "gemm": f"{batch}x{features} @ {features}x{features}",
    }
    return time_dense_and_sparse(lin, x, row, backend, repeats)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs/results/layers.json", help="JSON file to write")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--dtype", default=None, help="float16 or bfloat16 on GPU (default float16); float32 on CPU")
    p.add_argument("--conv-channels", default="64,128,256,512,1024", help="conv in = out channel counts")
    p.add_argument("--linear-features", default="1024,2048,4096,8192", help="linear in = out feature counts")
    p.add_argument("--batch-sizes", default="1,16,64,256", help="batch sizes for conv (linear uses x16 of them)")
    p.add_argument("--spatial", type=int, default=16, help="conv input height and width")
    p.add_argument("--repeats", type=int, default=30, help="timed calls per case")
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    backend = sparse_backend(device)
    if backend is None:
        print(f"note: {device.type} has no sparse tensor cores; timing the dense paths only", file=sys.stderr)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    rows = [
        conv_case(c, b, args.spatial, device, dtype, backend, args.repeats)
        for c in map(int, args.conv_channels.split(","))
        for b in batches
    ]
    rows += [
        linear_case(f, b * 16, device, dtype, backend, args.repeats)
        for f in map(int, args.linear_features.split(","))
        for b in batches
    ]
    for r in rows:
        r["sparse_speedup"] = r["dense_ms"] / r["sparse_ms"] if "sparse_ms" in r else None
    table = markdown_table(
        ["layer", "channels", "batch", "GEMM", "dense ms", "dense GEMM ms", "sparse ms", "sparse speedup"],
        [
            [
                r["layer"],
                r["channels"],
                r["batch_size"],
                r["gemm"],
                f"{r['dense_ms']:.4f}",
                f"{r['dense_gemm_ms']:.4f}" if "dense_gemm_ms" in r else "-",
                f"{r['sparse_ms']:.4f}" if "sparse_ms" in r else "-",
                f"{r['sparse_speedup']:.2f}x" if r["sparse_speedup"] else "-",
            ]
            for r in rows
        ],
    )
    print(table)
    write_json(
        args.out,
        {
            "command": "python " + " ".join(sys.argv),
            "device": str(device),
            "dtype": str(dtype),
            "backend": backend,
            "environment": environment(),
            "rows": rows,
        },
    )
    Path(args.out).with_suffix(".md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
