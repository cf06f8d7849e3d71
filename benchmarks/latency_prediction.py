"""How well a latency table predicts a pruned model's measured latency, on this machine's CPU.

For each model, input size, batch and runtime: profile it in context (`hybridprune profile`'s library call: the
step sweep, then the whole model with one group or one coupled pair pruned at a time), and compare the predicted
latency with the measured one for the dense model, copies pruned uniformly at several ratios, and non-uniform
copies (seeded random kept fractions per group, as an allocation makes them). Every check is measured
interleaved with the dense model. Beside it, the per-layer prediction of table version 2 (isolated layer
entries plus a rest-of-network constant) on the same models, from the same run.
Writes docs/results/latency-prediction-cpu.{json,md}.

    python benchmarks/latency_prediction.py [--cases resnet20-32,alexnet-32] [--batches 1,64] \
        [--runtimes onnxruntime,openvino:int8,openvino:bfloat16]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from hybridprune.deploy.profile import new_table, profile_report, resolve_settings
from hybridprune.experiments.tables import markdown_table
from hybridprune.models.sources import build_model
from hybridprune.outputs import write_json, write_text
from hybridprune.provenance import environment
from hybridprune.pruning.graph import channel_groups, dependency_graph

CASES = {  # name -> (model, width, image size)
    "resnet20-32": ("resnet20", 1.0, 32),
    "alexnet-32": ("alexnet", 1.0, 32),
    "resnet18-32": ("torchvision:resnet18", None, 32),
    "mobilenet_v2-32": ("torchvision:mobilenet_v2", None, 32),
    "resnet18-224": ("torchvision:resnet18", None, 224),
    "mobilenet_v2-224": ("torchvision:mobilenet_v2", None, 224),
}
RATIOS = (0.25, 0.5, 0.75)
RANDOM_MODELS = 3  # non-uniform copies per setup
WITHIN = 0.10


def random_fractions(groups: list, seed: int) -> dict[str, float]:
    """Each group's kept fraction drawn uniformly from [0.2, 1], seeded."""
    rng = random.Random(seed)
    return {g.name: rng.uniform(0.2, 1.0) for g in groups}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="resnet20-32,alexnet-32", help=f"comma-separated of {', '.join(CASES)}")
    parser.add_argument("--batches", default="1,64", help="comma-separated batch sizes (224x224 cases: batch 1 only)")
    parser.add_argument("--runtimes", default="onnxruntime", help="comma-separated RUNTIME[:DTYPE] (DTYPE float32, "
                        "bfloat16 or int8; e.g. onnxruntime,openvino:int8,openvino:bfloat16)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds per measurement")
    parser.add_argument("--out", default="docs/results/latency-prediction-cpu", help="output path without suffix")
    args = parser.parse_args()
    cpu = torch.device("cpu")
    rows, started = [], time.time()
    for case in args.cases.split(","):
        name, width, size = CASES[case]
        for setting in args.runtimes.split(","):
            runtime, _, dtype = setting.partition(":")
            for batch in (int(b) for b in args.batches.split(",")):
                if size >= 224 and batch > 1:
                    continue
                torch.manual_seed(0)
                model = build_model(name, in_channels=3, num_classes=10, image_size=size, width=width).eval()
                groups = channel_groups(model, dependency_graph(model))
                variants = tuple((f"random {s}", random_fractions(groups, s)) for s in range(RANDOM_MODELS))
                settings = resolve_settings(runtime, batch, dtype or "float32", cpu, rounds=args.rounds)
                runtime = f"{runtime} {settings.setup.dtype}"  # as the rows name the setup
                t0 = time.time()
                report = profile_report(model, new_table(cpu), settings, cpu, RATIOS, False, variants, layers=True)
                setup = {"network": name, "image_size": size, "batch": batch, "runtime": runtime,
                         "step": report["step"], "block": report["block"], "models_measured": report["models_measured"],
                         "seconds": time.time() - t0}  # fmt: skip
                rows += [{**setup, **{k: v for k, v in c.items() if k != "counts"}} for c in report["checks"]]
                dense = report["checks"][0]
                for r in rows[-len(report["checks"]):]:  # relative to the dense model of the same run (see _markdown)
                    measured = r["measured_ms"] / dense["measured_ms"]
                    for kind, base in (("", dense["predicted_ms"]), ("per_layer_", dense["per_layer_predicted_ms"]),
                                       ("expansion_", dense["expansion_predicted_ms"])):  # fmt: skip
                        r[f"{kind}relative_error"] = r[f"{kind}predicted_ms"] / base / measured - 1
                    r["expansion_error"] = r["expansion_predicted_ms"] / r["measured_ms"] - 1
                print(f"{name} {size}x{size} b{batch} {runtime} (block {report['block']}, "
                      f"{report['models_measured']} models, {time.time() - t0:.0f} s): " + ", ".join(
                          f"{r['model']} {100 * r['relative_error']:+.1f}% (expansion "
                          f"{100 * r['expansion_relative_error']:+.1f}%, per-layer "
                          f"{100 * r['per_layer_relative_error']:+.1f}%)"
                          for r in rows[-len(report["checks"]):]), flush=True)  # fmt: skip
    command = "python " + " ".join(sys.argv)
    result = {"command": command, "environment": environment(), "seconds": time.time() - started,
              "summary": summary(rows), "rows": rows}  # fmt: skip
    write_json(Path(args.out).with_suffix(".json"), result)
    write_text(Path(args.out).with_suffix(".md"), _markdown(result))


def summary(rows: list[dict]) -> dict:
    """Fraction within 10% and median absolute error, in context and per layer, over the pruned checks."""
    pruned = [r for r in rows if r["model"] != "dense"]
    out = {}
    for kind in ("uniform", "random"):
        sel = [r for r in pruned if r["model"].startswith(kind)]
        if not sel:
            continue
        out[kind] = {"checks": len(sel)}
        for name, prefix in (("fitted", ""), ("expansion", "expansion_"), ("per_layer", "per_layer_")):
            for scale in ("", "relative_"):
                errors = [abs(r[f"{prefix}{scale}error"]) for r in sel]
                out[kind][f"{name}_{scale}within_10pct"] = sum(e <= WITHIN for e in errors)
                out[kind][f"{name}_{scale}median_abs_error"] = statistics.median(errors)
            out[kind][f"{name}_negative"] = sum(r[f"{prefix}predicted_ms"] < 0 for r in sel)
    return out


def _markdown(result: dict) -> str:
    table = markdown_table(
        ["model", "input", "batch", "runtime", "block", "pruned", "measured ms", "p10-p90 ms", "fitted", "expansion",
         "per-layer", "fitted rel.", "expansion rel.", "per-layer rel."],
        [[r["network"], f"{r['image_size']}x{r['image_size']}", str(r["batch"]), r["runtime"], str(r["block"]),
          r["model"], f"{r['measured_ms']:.3f}", f"{r['measured_p10_ms']:.3f}-{r['measured_p90_ms']:.3f}",
          *(f"{100 * r[k]:+.1f}%" for k in ("error", "expansion_error", "per_layer_error", "relative_error",
                                            "expansion_relative_error", "per_layer_relative_error"))]
         for r in result["rows"]],
    )  # fmt: skip
    lines = []
    for kind, s in result["summary"].items():
        parts = [f"{name} {s[f'{name}_relative_within_10pct']} ({s[f'{name}_within_10pct']} absolute), median "
                 f"|error| {100 * s[f'{name}_relative_median_abs_error']:.1f}%, {s[f'{name}_negative']} negative"
                 for name in ("fitted", "expansion", "per_layer")]  # fmt: skip
        lines.append(f"- {kind} ({s['checks']} checks) within 10%: " + "; ".join(parts))
    env = result["environment"]
    return (
        "# Latency prediction error on the CPU\n\n"
        "Three predictors from one run on the same models. Fitted (table version 3, the default): the dense model "
        "measured, plus each fused unit's in-context cost (fitted to every whole-model measurement of the profile: "
        "groups pruned alone and coupled pairs) times its change of block-padded work, floored at the smallest "
        "model's measured latency. Expansion: the dense model plus each group's measured saving alone plus each "
        "coupled pair's measured interaction (exact for a sum of units, but one noisy difference per term). "
        "Per-layer (table version 2): the rest of the network (dense minus its isolated layer entries) plus the "
        "isolated entries. Error: predicted / measured - 1; relative: both as fractions of the dense model "
        "(predicted over predicted dense, measured over the dense model measured interleaved with it), which is "
        "what `--target-latency` uses and which removes the machine's drift between profiling and checking. "
        "Measured = median of interleaved rounds beside the dense model, with p10-p90.\n\n"
        f"`{result['command']}` ({result['seconds']:.0f} s; {env['cpu']}, {env['threads']} threads, torch "
        f"{env['torch']})\n\n" + "\n".join(lines) + f"\n\n{table}\n"
    )


if __name__ == "__main__":
    sys.exit(main())
