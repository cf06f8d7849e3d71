"""Measured latency at equal accuracy, from an experiment store: for one model and seed, `bench` the dense,
2:4-only, filter-only and filter + 2:4 models of every filter ratio in the store (plain fine-tuning, one
metric), one round-robin run per ratio, and write one bench JSON per ratio with the store's test accuracies.
`hybridprune report --bench FILE...` then interpolates the filter-only latency at each hybrid model's
accuracy (the report's "Iso-accuracy, measured" table), labelled by the device it was measured on.

    python benchmarks/iso_latency.py --store runs/recipes-cifar10.sqlite --model alexnet --seed 0 \
        --out docs/results/recipes-cifar10/bench [--device cpu] [--batch-sizes 1,64]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hybridprune.deploy.bench import bench, parse_batch_sizes, parse_dtypes, variant_from_file
from hybridprune.errors import HybridPruneError
from hybridprune.experiments.store import Store
from hybridprune.outputs import write_json
from hybridprune.provenance import environment
from hybridprune.world import resolve_device


def variants_per_ratio(store: Store, model: str, seed: int, metric: str) -> dict[float, list]:
    """{ratio: [dense, nm, filter, hybrid]} with their test accuracies, for the plain runs of one model and seed."""
    runs = [
        r for r in store.rows() if (r["model"], r["seed"], r["metric"], r["recipe"]) == (model, seed, metric, "plain")
    ]
    nm = [r for r in store.nm_only_rows() if (r["model"], r["seed"]) == (model, seed)]
    if not runs or not nm:
        raise HybridPruneError(f"the store has no plain {metric} runs and 2:4-only model of {model}, seed {seed}")
    nm_stage = json.loads(nm[0]["result"])["nm"]
    out = {}
    for row in sorted(runs, key=lambda r: r["ratio"]):
        result = json.loads(row["result"])
        stages = {"dense": result["dense"], "nm": nm_stage, "filter": result["filter"], "hybrid": result["hybrid"]}
        out[row["ratio"]] = [
            variant_from_file(name, Path(stage["checkpoint"]), stage["accuracy"]) for name, stage in stages.items()
        ]
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", required=True)
    p.add_argument("--model", required=True, help="the model name in the store, e.g. alexnet or resnet20")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--metric", default="hybrid")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-sizes", default="1,64")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--out", required=True, help="folder for bench-MODEL-ratioR.json files")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    dtypes = parse_dtypes("float16" if device.type == "cuda" else "float32")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for ratio, variants in variants_per_ratio(
        Store(args.store, create=False), args.model, args.seed, args.metric
    ).items():
        sizes = parse_batch_sizes(args.batch_sizes)
        result = bench(
            variants, device, dtypes, sizes, rounds=args.rounds, calls=args.calls, choose="fastest", progress=False
        )
        result["environment"] = environment()
        result["command"] = "python benchmarks/iso_latency.py " + " ".join(argv)
        result["variants"] = {v.name: {"source": v.source, "accuracy": v.accuracy} for v in variants}
        result["model"], result["seed"], result["ratio"] = args.model, args.seed, ratio
        path = write_json(out / f"bench-{args.model}-ratio{ratio:g}-{device.type}.json", result)
        speed = {(s["batch_size"]): s["hybrid_over_filter"] for s in result["speedups"]}
        print(f"ratio {ratio:g}: wrote {path}; hybrid over filter (same ratio) by batch: {speed}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except HybridPruneError as e:
        print(f"iso_latency: {e}", file=sys.stderr)
        sys.exit(2)
