"""Top-1 and latency of dense, filter-pruned and filter+2:4 models at every runtime and precision installed here:
fp32 and bf16 (PyTorch, OpenVINO), INT8 QDQ files from `quantize` with each calibration method, one per runtime
(its format measured fastest there, its accuracy measured there), latency at batch 1 and 64 (INT8: the minmax
files).
Trains briefly on real CIFAR-10 (a NumPy copy), then measures; writes JSON and a Markdown table.

    python benchmarks/quantize.py --data npz:../shared/data/cifar10 --models alexnet:0.5 --epochs 4 \\
        --out docs/results/quantize-cpu
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

import hybridprune as hp
from hybridprune.data.batching import batches, channel_stats
from hybridprune.data.images import Dataset
from hybridprune.deploy.accuracy import module_accuracy
from hybridprune.deploy.quantize import timing_session
from hybridprune.deploy.runtimes import available_pairs, interleaved_times, load_onnx, quantiles
from hybridprune.deploy.runtimes import runtime_versions as versions
from hybridprune.experiments.tables import markdown_table
from hybridprune.hardware import cpu_isa
from hybridprune.outputs import write_json, write_text
from hybridprune.provenance import environment

METHODS = ("minmax", "entropy", "percentile")


def train_variants(data: Dataset, name: str, width: float, epochs: int, seed: int) -> dict[str, tuple]:
    """dense, filter (hybrid metric, 40%, multiples of 8) and hybrid (filter + 2:4), each fine-tuned briefly."""
    mean, std = channel_stats(data.train)
    torch.manual_seed(seed)
    dense = hp.build_model(name, in_channels=3, num_classes=10, image_size=32, width=width, mean=mean, std=std)
    cpu = torch.device("cpu")
    train = hp.TrainConfig(epochs=epochs, batch_size=128, precision="fp32")  # fp32: the same arithmetic every run
    hp.fit(dense, data, train, cpu, seed=seed, desc=f"{name} dense")
    filtered = copy.deepcopy(dense)
    calib = [x for x, _ in batches(data.train.subset(512, seed), 128)]
    hp.prune_filters_(filtered, hp.PruneConfig(metric="hybrid", filter_ratio=0.4, round_to=8), calib, seed=seed)
    hp.recalibrate_bn_(filtered, data.train, cpu)
    tune = hp.TrainConfig(epochs=1, batch_size=128, lr=0.02, precision="fp32")
    hp.fit(filtered, data, tune, cpu, seed=seed, desc=f"{name} filter")
    hybrid = copy.deepcopy(filtered)
    masks = hp.nm_prune_(hybrid)
    hp.fit(hybrid, data, tune, cpu, seed=seed, masks=masks, desc=f"{name} hybrid")
    return {"dense": (dense, {}), "filter": (filtered, {}), "hybrid": (hybrid, masks)}


def accuracies(model, masks, data: Dataset, folder: Path, seed: int, threads: int) -> dict:
    """Top-1 at each precision and runtime; the INT8 files (one per calibration method) are kept in `folder`."""
    cpu = torch.device("cpu")
    out = {"fp32 torch": hp.evaluate(model, data.test, cpu)}
    for runtime, precision in (("torch", "bf16"), ("openvino", "fp32"), ("openvino", "bf16")):
        if (runtime, precision) in available_pairs(cpu):
            out[f"{precision} {runtime}"] = module_accuracy(model, data.test, runtime, precision, threads).top1
    int8 = {}
    for method in METHODS:  # each runtime gets its own file: the format measured fastest there
        int8[method] = {}
        for runtime in (r for r, p in available_pairs(cpu, onnx_only=True) if p == "int8"):
            cfg = hp.QuantizeConfig(calibration_images=256, calibration_method=method, runtime=runtime, rounds=3)
            path = folder / f"int8-{method}-{runtime}.onnx"
            report = hp.quantize(model, data.train, data.test, path, cfg, masks=masks, seed=seed, threads=threads)
            w = report.weights
            int8[method][runtime] = {
                "top1": report.int8_top1, "fp32_top1": report.fp32_top1, "format": report.format,
                "format_ms_b64": report.latency_ms, "zeros_lost": w["zeros_lost"],
                "nm_broken_groups": w["nm_broken_groups"], "agreement": report.top1_agreement,
            }  # fmt: skip
    out["int8"] = int8
    return out


def latencies(variants: dict, int8_files: dict, batch: int, rounds: int, threads: int) -> list[dict]:
    """Median ms of every variant in every (runtime, precision) installed, interleaved in one round-robin."""
    cpu = torch.device("cpu")
    calls = {}
    for name, (model, _) in variants.items():
        x = torch.rand(batch, *model.input_shape)
        for runtime, precision in available_pairs(cpu):
            if precision == "int8":
                session = load_onnx(int8_files[name] / f"int8-minmax-{runtime}.onnx", runtime, "int8", threads)[0]
            else:
                session = timing_session(model, x[:1], runtime, precision, threads)
            calls[(name, runtime, precision)] = session.bound(x)
    times = interleaved_times(list(calls.values()), rounds, cpu, warmup=3)
    rows = []
    for (n, r, p), t in zip(calls, times, strict=True):
        median, p10, p90 = quantiles(t)
        rows.append({"variant": n, "runtime": r, "precision": p, "batch": batch, "median_ms": median, "p10_ms": p10,
                     "p90_ms": p90})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="npz:../shared/data/cifar10", help="dataset spec (load_dataset)")
    parser.add_argument("--models", default="alexnet:0.5", help="comma-separated NAME:WIDTH")
    parser.add_argument("--epochs", type=int, default=4, help="dense training epochs (then 1 + 1 fine-tuning)")
    parser.add_argument("--train-size", type=int, default=10_000, help="seeded training subset")
    parser.add_argument("--test-size", type=int, default=2_000, help="seeded test subset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=10, help="round-robin rounds of the latency timing")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True, help="folder for quantize-cpu.json and README.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.time()
    ds = hp.load_dataset(args.data)
    data = Dataset(ds.name, ds.train.subset(args.train_size, args.seed), ds.test.subset(args.test_size, args.seed + 1),
                   ds.hflip)  # fmt: skip
    results = []
    for spec in args.models.split(","):
        name, _, width = spec.partition(":")
        variants = train_variants(data, name, float(width or 1), args.epochs, args.seed)
        with tempfile.TemporaryDirectory() as folder:
            for variant, (model, masks) in variants.items():
                acc = accuracies(model, masks, data, Path(folder) / variant, args.seed, args.threads)
                results.append({"model": spec, "variant": variant, "accuracy": acc})
            files = {v: Path(folder) / v for v in variants}
            for batch in (1, 64):
                for row in latencies(variants, files, batch, args.rounds, args.threads):
                    results.append({"model": spec, **row})
    report = {"command": "python " + " ".join(sys.argv), "seconds": round(time.time() - start), "results": results,
              "environment": environment(), "runtimes": versions(), "cpu": cpu_isa()}  # fmt: skip
    out = Path(args.out)
    write_json(out / "quantize-cpu.json", report)
    write_text(out / "tables.md", tables(results))
    print(tables(results))


def tables(results: list[dict]) -> str:
    acc = [r for r in results if "accuracy" in r]
    heads = ["model", "variant", "fp32 torch", "bf16 torch", "fp32 openvino", "bf16 openvino"]
    heads += [f"int8 {m}: ort, ov (format)" for m in METHODS]
    rows = []
    for r in acc:
        a = r["accuracy"]
        cells = [r["model"], r["variant"], *(f"{a[k]:.2f}" if k in a else "-" for k in heads[2:6])]
        for m in METHODS:
            cells.append(", ".join(f"{q['top1']:.2f} ({q['format']})" for q in a["int8"][m].values()))
        rows.append(cells)
    lat = [r for r in results if "median_ms" in r]
    base = {(r["model"], r["batch"]): r["median_ms"] for r in lat
            if r["variant"] == "dense" and r["runtime"] == "onnxruntime" and r["precision"] == "fp32"}  # fmt: skip
    lrows = [[r["model"], r["variant"], r["runtime"], r["precision"], str(r["batch"]), f"{r['median_ms']:.3f}",
              f"{r['p10_ms']:.3f}-{r['p90_ms']:.3f}", f"{base[(r['model'], r['batch'])] / r['median_ms']:.2f}x"]
             for r in lat]  # fmt: skip
    return (markdown_table(heads, rows) + "\n\n" + markdown_table(
        ["model", "variant", "runtime", "precision", "batch", "median ms", "p10-p90 ms", "vs dense ORT fp32"], lrows)
        + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
