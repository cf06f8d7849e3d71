"""The job deploys what it prunes, measured on real data: `run --deploy` (through the Python API) for each model and
seed on a real CIFAR-10 subset; every variant (dense, 2:4-only, filter, filter+2:4) deployed at every target, its
top-1 measured in its runtime, its latency at each batch against the dense model in ONNX Runtime fp32 timed in the
same rounds. Writes each run's result, a Markdown summary over seeds (mean and spread), and the goals of issue 22
checked (INT8 within 0.5 points of the model it quantizes; the fastest deployed pruned model at least 8x faster
than dense ONNX Runtime fp32 at batch 64 within 1 point of dense fp32 top-1).

    python benchmarks/deploy_job.py --data npz:../shared/data/cifar10 --models alexnet:0.5,resnet20:1.0 \\
        --seeds 0,1,2 --epochs 5 --out docs/results/deploy-cifar10
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

import hybridprune as hp
from hybridprune.experiments.deployed import deployed_table, fastest_within
from hybridprune.experiments.tables import markdown_table
from hybridprune.outputs import write_json, write_text
from hybridprune.parse import read_json


def job_config(args: argparse.Namespace, model: str, width: float, seed: int) -> hp.RunConfig:
    """The run: dense training, the hybrid metric at 40% of each group (multiples of 8), 2:4 everywhere eligible."""
    train = hp.TrainConfig(epochs=args.epochs, batch_size=128, precision="fp32")
    return hp.RunConfig(
        data=hp.DataConfig(dataset=args.data, train_size=args.train_size, test_size=args.test_size),
        model=hp.ModelConfig(name=model, width=width),
        train=train,
        finetune=hp.TrainConfig(epochs=args.finetune_epochs, batch_size=128, lr=0.02, warmup=0.0, precision="fp32"),
        prune=hp.PruneConfig(metric="hybrid", filter_ratio=0.4, round_to=8),
        metrics=("hybrid",),
        seed=seed,
        # batch 64 first: it decides a bare precision's runtime (the batch the goal is stated at)
        deploy=hp.DeployConfig(targets=tuple(args.targets.split(",")), batch_sizes=(64, 1), rounds=args.rounds),
    )


def run_one(args: argparse.Namespace, spec: str, seed: int) -> dict:
    """One job, resumed where an earlier invocation stopped (its folder under --work)."""
    name, _, width = spec.partition(":")
    folder = Path(args.work) / f"{name}-w{width}-s{seed}"
    result_file = folder / "results.json"
    if result_file.is_file():
        return read_json(result_file)
    cfg = job_config(args, name, float(width or 1.0), seed)
    return hp.run(cfg, folder, torch.device("cpu"), resume=folder.exists(), progress=not args.no_progress)


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def summary(results: dict[str, list[dict]]) -> str:
    """Per model: each (variant, precision) over seeds (its runtime as each seed's measurement chose it): PyTorch and
    deployed top-1, change, speedups."""
    lines = []
    for spec, runs in results.items():
        keys = [(f["variant"], f["precision"]) for f in runs[0]["deployed"]["forms"]]
        rows = []
        for variant, precision in keys:
            forms = [next(f for f in r["deployed"]["forms"] if (f["variant"], f["precision"]) == (variant, precision))
                     for r in runs]  # fmt: skip
            runtimes = "/".join(dict.fromkeys(f["runtime"] for f in forms))
            rows.append([variant, runtimes, precision, spread([f["trained_top1"] for f in forms]),
                         spread([f["top1"] for f in forms]),
                         spread([f["top1"] - f["trained_top1"] for f in forms]),
                         *(spread([f["latency"][b]["speedup"] for f in forms]) for b in ("1", "64"))])  # fmt: skip
        base = [r["deployed"]["baseline"]["latency_ms"] for r in runs]
        lines += [f"### {spec} ({len(runs)} seed(s))", "",
                  f"Baseline (dense, ONNX Runtime fp32): {spread([b['1'] for b in base])} ms at batch 1, "
                  f"{spread([b['64'] for b in base])} ms at batch 64. Runtime choices: "
                  + "; ".join(f"seed {r['config']['seed']}: " + ", ".join(f"{c['target']} -> {c['runtime']}"
                                                                          for c in r["deployed"]["choices"])
                              for r in runs),
                  "", markdown_table(["variant", "runtime", "precision", "top-1 PyTorch", "top-1 deployed", "change",
                                      "x at batch 1", "x at batch 64"], rows), ""]  # fmt: skip
    return "\n".join(lines)


def goals(results: dict[str, list[dict]]) -> str:
    """The issue's goals, checked per run: INT8 change, and the fastest form within 1 point of dense fp32."""
    rows = []
    for spec, runs in results.items():
        for r in runs:
            d = r["deployed"]
            int8 = [f["top1"] - f["trained_top1"] for f in d["forms"] if f["precision"] == "int8"]
            best = fastest_within(d, r["dense"]["accuracy"])
            pruned = [f for f in d["forms"] if f["variant"] != "dense"]
            best_pruned = fastest_within({**d, "forms": pruned}, r["dense"]["accuracy"])
            rows.append([spec, str(r["config"]["seed"]), f"{r['dense']['accuracy']:.2f}",
                         f"{min(int8):+.2f} .. {max(int8):+.2f}" if int8 else "-",
                         _form(best), _form(best_pruned)])  # fmt: skip
    headers = ["model", "seed", "dense top-1", "INT8 change (all variants)", "fastest within 1 pt at batch 64",
               "fastest pruned within 1 pt"]  # fmt: skip
    return markdown_table(headers, rows)


def _form(f: dict | None) -> str:
    if f is None:
        return "none"
    return f"{f['variant']}, {f['runtime']} {f['precision']}: {f['latency']['64']['speedup']:.2f}x, {f['top1']:.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="npz:../shared/data/cifar10", help="dataset (a real CIFAR-10 copy)")
    p.add_argument("--models", default="alexnet:0.5,resnet20:1.0", help="comma-separated NAME:WIDTH")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--epochs", type=int, default=5, help="dense training epochs")
    p.add_argument("--finetune-epochs", type=int, default=2, help="fine-tuning epochs after each pruning step")
    p.add_argument("--train-size", type=int, default=10_000, help="seeded training subset")
    p.add_argument("--test-size", type=int, default=2_000, help="seeded test subset")
    p.add_argument("--targets", default="int8,bf16,fp32", help="--deploy targets")
    p.add_argument("--rounds", type=int, default=10, help="round-robin timing rounds")
    p.add_argument("--work", default="runs/deploy-bench", help="run folders (kept: a rerun resumes)")
    p.add_argument("--out", default="docs/results/deploy-cifar10", help="where the results go")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--finished-only", action="store_true", help="summarize the runs already finished, run none")
    args = p.parse_args()
    start = time.time()
    results: dict[str, list[dict]] = {}
    for spec in args.models.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            name, _, width = spec.partition(":")
            if args.finished_only and not (Path(args.work) / f"{name}-w{width}-s{seed}" / "results.json").is_file():
                continue
            result = run_one(args, spec, seed)
            results.setdefault(spec, []).append(result)
            write_json(Path(args.out) / f"{spec.replace(':', '-w')}-s{seed}.json", result)
            print(f"{spec} seed {seed}:\n{deployed_table(result['deployed'])}", flush=True)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    took = f"{time.time() - start:.0f} s in this invocation"
    text = (f"# `run --deploy` on real CIFAR-10\n\nCommand: `{command}` ({took})\n\n## Per model, over seeds\n\n"
            f"{summary(results)}\n## Goals, per run\n\n{goals(results)}\n")  # fmt: skip
    write_text(Path(args.out) / "summary.md", text)
    print(text)


if __name__ == "__main__":
    main()
