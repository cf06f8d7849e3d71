"""The cost per training step of `hold_masks` against a plain step, on torchvision models built directly and
2:4-pruned: a whole step (forward, backward, SGD with momentum and weight decay) and the optimizer step alone
(where the hooks run), each timed round-robin on two copies of the model, one held and one not. Writes a
JSON (with the command and environment) and prints a Markdown table.

    python benchmarks/hold_masks.py --out docs/results/hold-masks-cpu.json
    python benchmarks/hold_masks.py --device cuda --batch-size 256 --out docs/results/hold-masks-gpu.json
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchvision

import hybridprune as hp
from hybridprune.experiments.tables import markdown_table
from hybridprune.outputs import write_json
from hybridprune.provenance import environment


def timed(fn: Callable[[], None], calls: int, device: torch.device) -> float:
    """Milliseconds per call of `fn`, over `calls` calls (waiting for the GPU before and after)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - start) / calls * 1e3


def measure(name: str, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    device = torch.device(args.device)
    net = getattr(torchvision.models, name)(num_classes=10).to(device)
    x = torch.rand(args.batch_size, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    masks = hp.nm_prune_(net, example_inputs=x[:1])
    copies = {"plain": net, "held": copy.deepcopy(net)}
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4) for k, m in copies.items()}
    hp.hold_masks(copies["held"], masks, opts["held"])

    def step(kind: str) -> Callable[[], None]:
        def run() -> None:
            opts[kind].zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                loss = F.cross_entropy(copies[kind](x), y)
            loss.backward()
            opts[kind].step()

        return run

    times: dict[str, list[float]] = {f"{what}_{kind}": [] for what in ("step", "optimizer") for kind in copies}
    for kind in copies:  # warm-up, and every optimizer gets its momentum buffers
        timed(step(kind), 2, device)
    for _ in range(args.rounds):
        for kind in copies:
            times[f"step_{kind}"].append(timed(step(kind), args.calls, device))
            times[f"optimizer_{kind}"].append(timed(opts[kind].step, args.calls * 4, device))
    masked = sum(m.numel() for m in masks.values())
    return {
        "model": name,
        "params": sum(p.numel() for p in net.parameters()),
        "masked_params": masked,
        "masked_layers": len(masks),
        **{f"{k}_ms": v for k, v in times.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet18,mobilenet_v2", help="torchvision model names, comma-separated")
    parser.add_argument("--batch-size", type=int, default=32, help="images per step")
    parser.add_argument("--image-size", type=int, default=32, help="side of the square input images")
    parser.add_argument("--rounds", type=int, default=5, help="round-robin rounds (median reported)")
    parser.add_argument("--calls", type=int, default=3, help="whole steps timed per round and variant")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--bf16", action="store_true", help="forward under bf16 autocast (weights stay float32)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = [measure(name, args) for name in args.models.split(",")]
    rows = []
    for r in results:
        med = {k.removesuffix("_ms"): statistics.median(v) for k, v in r.items() if k.endswith("_ms")}
        rows.append([
            r["model"], f"{r['params'] / 1e6:.2f}M", f"{r['masked_layers']} ({r['masked_params'] / r['params']:.0%})",
            f"{med['step_plain']:.1f}", f"{med['step_held']:.1f}", f"{med['step_held'] / med['step_plain']:.3f}x",
            f"{med['optimizer_plain']:.2f}", f"{med['optimizer_held']:.2f}",
            f"{med['optimizer_held'] - med['optimizer_plain']:+.2f}",
        ])  # fmt: skip
    header = ["model", "params", "2:4 layers (params)", "plain step ms", "held step ms", "held / plain",
              "plain opt.step ms", "held opt.step ms", "hooks ms/step"]  # fmt: skip
    print(markdown_table(header, rows))
    if args.out:
        command = " ".join(["python", *sys.argv])
        write_json(args.out, {"command": command, "environment": environment(), "threads": torch.get_num_threads(),
                              "settings": vars(args), "results": results})  # fmt: skip


if __name__ == "__main__":
    main()
