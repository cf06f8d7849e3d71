"""How well a latency table predicts a pruned model's measured latency, on this machine's CPU (ONNX Runtime).

For each model, input size and batch: profile it (`hybridprune profile`'s library call), then compare the
predicted latency (rest of the network + sum of layer entries) with the measured one for the dense model and
for copies pruned uniformly at several ratios. Writes docs/results/latency-prediction-cpu.{json,md}.

    python benchmarks/latency_prediction.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from hybridprune.deploy.profile import new_table, profile_report, resolve_settings
from hybridprune.experiments.tables import markdown_table
from hybridprune.models.sources import build_model
from hybridprune.outputs import write_json, write_text
from hybridprune.provenance import environment

CASES = [  # model, width, image size, batches (224x224 at batch 1 only: batch 64 takes minutes per call here)
    ("resnet20", 1.0, 32, (1, 64)),
    ("alexnet", 1.0, 32, (1, 64)),
    ("torchvision:resnet18", None, 32, (1, 64)),
    ("torchvision:mobilenet_v2", None, 32, (1, 64)),
    ("torchvision:resnet18", None, 224, (1,)),
    ("torchvision:mobilenet_v2", None, 224, (1,)),
]
RATIOS = (0.25, 0.5, 0.75)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the first two cases at batch 1 only (a smoke run)")
    parser.add_argument("--out", default="docs/results/latency-prediction-cpu", help="output path without suffix")
    parser.add_argument("--step", type=int, default=8, help="candidate count step of the tables")
    args = parser.parse_args()
    cpu = torch.device("cpu")
    rows, started = [], time.time()
    cases = [(m, w, s, (1,)) for m, w, s, _ in CASES[:2]] if args.quick else CASES
    for name, width, size, batches in cases:
        for batch in batches:
            torch.manual_seed(0)
            model = build_model(name, in_channels=3, num_classes=10, image_size=size, width=width).eval()
            settings = resolve_settings("onnxruntime", batch, "float32", cpu, step=args.step)
            report = profile_report(model, new_table(cpu), settings, cpu, RATIOS, progress=False)
            whole = report["checks"][0]["measured_ms"]  # the dense model: rest + sum of its dense entries
            for check in report["checks"]:
                # the same entries read proportionally: the dense model's latency scaled by the layers' sum
                scaled = whole * (check["predicted_ms"] - report["rest_ms"]) / (whole - report["rest_ms"])
                setup = {"network": name, "image_size": size, "batch": batch, "entries": report["entries"]}
                rows.append({**setup, **check, "rest_ms": report["rest_ms"],
                             "scaled_error": scaled / check["measured_ms"] - 1})  # fmt: skip
            print(f"{name} {size}x{size} batch {batch}: " + ", ".join(
                f"{r['model']} {100 * r['error']:+.1f}% (scaled {100 * r['scaled_error']:+.1f}%)"
                for r in rows[-len(report["checks"]):]), flush=True)  # fmt: skip
    command = "python benchmarks/latency_prediction.py" + (" --quick" if args.quick else "")
    result = {"command": command, "environment": environment(), "seconds": time.time() - started, "rows": rows}
    write_json(Path(args.out).with_suffix(".json"), result)
    write_text(Path(args.out).with_suffix(".md"), _markdown(result))


def _markdown(result: dict) -> str:
    table = markdown_table(
        ["model", "input", "batch", "pruned", "predicted ms", "measured ms", "p10-p90 ms", "error", "scaled error"],
        [[r["network"], f"{r['image_size']}x{r['image_size']}", str(r["batch"]), r["model"],
          f"{r['predicted_ms']:.3f}", f"{r['measured_ms']:.3f}",
          f"{r['measured_p10_ms']:.3f}-{r['measured_p90_ms']:.3f}", f"{100 * r['error']:+.1f}%",
          f"{100 * r['scaled_error']:+.1f}%"]
         for r in result["rows"]],
    )  # fmt: skip
    env = result["environment"]
    return (
        "# Latency prediction error on the CPU (ONNX Runtime)\n\n"
        "Predicted = the rest of the network (the dense model measured, minus its dense layer entries) + the pruned "
        "layers' entries; scaled error: the same entries read proportionally (dense latency x pruned sum / dense "
        f"sum), for comparison.\n\n`{result['command']}` ({result['seconds']:.0f} s; "
        f"{env['cpu']}, {env['threads']} threads, torch {env['torch']})\n\n{table}\n"
    )


if __name__ == "__main__":
    sys.exit(main())
