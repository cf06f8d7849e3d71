"""Images per second of fine-tuning: hybridprune's `fit` (N:M masks held after every step) against a plain
PyTorch loop on the same model, batches and optimizer, timed round-robin in one run.

On a CPU: the plain loop, `fit` without masks and `fit` with masks, in float32: the cost of holding the masks.
On a GPU: the plain loop in float32 against `fit` with masks in each precision (fp32, bf16, fp16).

    python benchmarks/finetune.py --out docs/results/finetune-cpu.json            # here
    python benchmarks/finetune.py --device cuda --out docs/results/finetune-gpu.json   # on a GPU (not yet run)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from hybridprune.config import TrainConfig
from hybridprune.data.batching import batches
from hybridprune.data.images import Dataset, ImageSet
from hybridprune.experiments.tables import markdown_table
from hybridprune.models.sources import build_model
from hybridprune.outputs import write_json
from hybridprune.provenance import environment
from hybridprune.pruning.nm import nm_prune_
from hybridprune.training.loop import fit


def plain_loop(model: torch.nn.Module, data: Dataset, cfg: TrainConfig, device: torch.device) -> None:
    """One epoch of the textbook loop: SGD with Nesterov momentum, cross-entropy, no masks, no schedule."""
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    model.to(device).train()
    for x, y in batches(data.train, cfg.batch_size, shuffle=True, device=device):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def variants(device: torch.device, cfg: TrainConfig, data: Dataset, model_name: str) -> dict:
    def fresh(masked: bool):
        torch.manual_seed(0)
        model = build_model(model_name, image_size=32)
        return model, (nm_prune_(model) if masked else None)

    def run_fit(precision: str, masked: bool):
        model, masks = fresh(masked)
        epoch_cfg = TrainConfig(**{**cfg.to_dict(), "precision": precision})
        return lambda: fit(model, data, epoch_cfg, device, masks=masks, progress=False)

    plain_model, _ = fresh(False)
    table = {"plain loop, fp32": lambda: plain_loop(plain_model, data, cfg, device)}
    if device.type == "cpu":
        table["hybridprune fit, fp32, no masks"] = run_fit("fp32", False)
        table["hybridprune fit, fp32, 2:4 masks held"] = run_fit("fp32", True)
    else:
        for precision in ("fp32", "bf16", "fp16"):
            table[f"hybridprune fit, {precision}, 2:4 masks held"] = run_fit(precision, True)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--model", default="resnet20", help="any hybridprune model (32x32 inputs)")
    parser.add_argument("--images", type=int, default=1024, help="images per epoch")
    parser.add_argument("--batch-size", type=int, default=128, help="training batch size")
    parser.add_argument("--rounds", type=int, default=5, help="round-robin rounds, one epoch of each variant per round")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args()
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    images = ImageSet(torch.randint(0, 256, (args.images, 3, 32, 32), generator=gen, dtype=torch.uint8),
                      torch.randint(0, 10, (args.images,), generator=gen), 10)  # fmt: skip
    data = Dataset("random", images, images, hflip=True)
    cfg = TrainConfig(epochs=1, lr=0.01, warmup=0.0, batch_size=args.batch_size, augment=False)
    table = variants(device, cfg, data, args.model)
    for run in table.values():  # warm-up: first-call costs out of the timing
        run()
    seconds: dict[str, list[float]] = {name: [] for name in table}
    for _ in range(args.rounds):
        for name, run in table.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    plain = args.images / statistics.median(seconds["plain loop, fp32"])
    rows, results = [], []
    for name, times in seconds.items():
        rate = args.images / statistics.median(times)
        rows.append([name, f"{rate:.0f}", f"{rate / plain:.2f}x"])
        results.append({"variant": name, "seconds_per_epoch": times, "images_per_s": rate})
    print(markdown_table(["variant", "images/s (median)", "over the plain loop"], rows))
    if args.out:
        write_json(args.out, {"command": " ".join(["python", *sys.argv]), "environment": environment(),
                              "settings": vars(args), "results": results})  # fmt: skip


if __name__ == "__main__":
    main()
