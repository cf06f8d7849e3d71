"""Images per second of the two data paths, in one run: class folders streamed from disk (PNG decoded in
DataLoader workers, crop, flip) against the in-memory uint8 tensor path (random shift and flip), at 32x32
and at 224x224. Writes a JSON (with the command and environment) and prints a Markdown table.

    python benchmarks/loaders.py --out docs/results/loaders-cpu.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hybridprune.data.batching import batches
from hybridprune.data.folders import FolderSet
from hybridprune.data.images import ImageSet
from hybridprune.experiments.tables import markdown_table
from hybridprune.outputs import write_json
from hybridprune.provenance import environment


def write_images(root: Path, count: int, side: int, classes: int = 10) -> list[tuple[str, int]]:
    rng = np.random.default_rng(0)
    samples = []
    for i in range(count):
        folder = root / f"c{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i}.png"
        Image.fromarray((rng.random((side, side, 3)) * 255).astype(np.uint8)).save(path)
        samples.append((str(path), i % classes))
    return samples


def images_per_second(make_batches, count: int, repeats: int) -> list[float]:
    rates = []
    for _ in range(repeats):
        start, seen = time.perf_counter(), 0
        for x, _ in make_batches():
            seen += len(x)
        assert seen == count
        rates.append(seen / (time.perf_counter() - start))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000, help="images per size")
    parser.add_argument("--batch-size", type=int, default=128, help="batch size of both loaders")
    parser.add_argument("--workers", type=int, default=2, help="decoding processes of the folder loader")
    parser.add_argument("--repeats", type=int, default=3, help="epochs timed per loader (median reported)")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args()
    rows, results = [], []
    for side in (32, 224):
        with tempfile.TemporaryDirectory() as tmp:
            samples = write_images(Path(tmp), args.count, side)
            folder = FolderSet(samples, tuple(f"c{i}" for i in range(10)), side, args.workers)
            stream = lambda f=folder: batches(f, args.batch_size, shuffle=True, augment=True, hflip=True)  # noqa: E731
            folder_rates = images_per_second(stream, args.count, args.repeats)
        x = torch.randint(0, 256, (args.count, 3, side, side), dtype=torch.uint8)
        memory = ImageSet(x, torch.arange(args.count) % 10, 10)
        in_memory = lambda m=memory: batches(m, args.batch_size, shuffle=True, augment=True, hflip=True)  # noqa: E731
        memory_rates = images_per_second(in_memory, args.count, args.repeats)
        f, m = float(np.median(folder_rates)), float(np.median(memory_rates))
        results.append({"side": side, "folder_images_per_s": folder_rates, "memory_images_per_s": memory_rates})
        rows.append([f"{side}x{side}", f"{f:.0f}", f"{m:.0f}", f"{m / f:.1f}x"])
    print(markdown_table(["images", "folder (stream) img/s", "in-memory img/s", "in-memory / folder"], rows))
    if args.out:
        write_json(args.out, {"command": " ".join(["python", *sys.argv]), "environment": environment(),
                              "settings": vars(args), "results": results})  # fmt: skip


if __name__ == "__main__":
    main()
