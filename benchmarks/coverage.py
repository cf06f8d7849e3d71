"""Coverage: which CNN families hybridprune prunes, and what pruning buys on each.

For the smallest member of every CNN family in torchvision's classification registry and a dozen timm
families, at a small input: build (random init, 10 classes), prune 40% of every channel group with `l1`
(--round-to 16), apply 2:4, take one SGD step with the masks held, round-trip the checkpoint and convert to
the inference model, checking each step (the same chain as tests/test_coverage.py). Writes one row per model:
channel groups (pruned / kept whole because of grouped convs), parameters and MACs dense -> pruned, and whether
it is supported or the one line that refuses it.

    python benchmarks/coverage.py --out docs/results/coverage.md
    python benchmarks/coverage.py --models torchvision:regnet_x_400mf timm:resnet10t --out /tmp/c.md
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import hybridprune as hp
from hybridprune.deploy.sparse import to_inference_model
from hybridprune.errors import HybridPruneError
from hybridprune.experiments.tables import markdown_table
from hybridprune.outputs import write_json
from hybridprune.provenance import environment

# (model, input side): the smallest member of each family, at the smallest side its layers take
TORCHVISION = [
    ("torchvision:alexnet", 64),
    ("torchvision:vgg11_bn", 32),
    ("torchvision:resnet18", 32),
    ("torchvision:resnext50_32x4d", 32),
    ("torchvision:wide_resnet50_2", 32),
    ("torchvision:squeezenet1_0", 32),
    ("torchvision:densenet121", 32),
    ("torchvision:googlenet", 32),  # with its two auxiliary heads (pruned with the layers they read)
    ("torchvision:inception_v3", 75),  # too small for its auxiliary head: built without it
    ("torchvision:inception_v3", 299),  # with its auxiliary head
    ("torchvision:mobilenet_v2", 32),
    ("torchvision:mobilenet_v3_small", 32),
    ("torchvision:mnasnet0_5", 32),
    ("torchvision:shufflenet_v2_x0_5", 32),
    ("torchvision:efficientnet_b0", 32),
    ("torchvision:efficientnet_v2_s", 32),
    ("torchvision:regnet_x_400mf", 32),
    ("torchvision:regnet_y_400mf", 32),
    ("torchvision:convnext_tiny", 32),
]
# transformers: no conv channel groups to speak of; out of scope
EXCLUDED = ["vit_*", "swin_*", "swin_v2_*", "maxvit_t"]
TIMM = [
    ("timm:resnet10t", 32),  # residual
    ("timm:resnext26ts", 32),  # grouped
    ("timm:regnetx_002", 32),  # grouped
    ("timm:mobilenetv3_small_050", 32),  # depthwise, SE, hard-swish
    ("timm:tinynet_e", 32),  # EfficientNet family
    ("timm:lcnet_050", 32),  # depthwise
    ("timm:ghostnet_050", 32),  # ghost modules (concatenated cheap features)
    ("timm:densenet121", 32),  # dense
    ("timm:cspresnet50", 32),  # CSP (cross-stage split)
    ("timm:dla34", 32),  # deep layer aggregation
    ("timm:ese_vovnet19b_slim_dw", 32),  # one-shot aggregation, eSE
    ("timm:res2net50_14w_8s", 32),  # split into scales (res2net)
    ("timm:resnest14d", 32),  # split attention
    ("timm:convnext_atto", 32),  # LayerNorm, 7x7 depthwise
    ("timm:mixnet_s", 32),  # mixed depthwise kernels (channel splits)
]


def chain(name: str, size: int, folder: Path) -> dict:
    """Run the whole chain on one model, checking each step; returns its row (supported or the refusal)."""
    torch.manual_seed(0)
    row: dict = {"model": name, "input": f"{size}x{size}"}
    start = time.perf_counter()
    model = hp.build_model(name, image_size=size).eval()
    x = torch.rand(2, 3, size, size)
    dense = hp.model_stats(model)
    row.update(params_dense=dense["params"], macs_dense=dense["macs"])
    try:
        plan = hp.prune_filters_(model, hp.PruneConfig(metric="l1", filter_ratio=0.4, round_to=16), [x])
    except HybridPruneError as e:
        return {**row, "status": f"refused: {e}", "seconds": time.perf_counter() - start}
    masks = hp.nm_prune_(model)
    # the step runs in eval mode: BatchNorm on the 1x1 maps of a small input, over a batch of 2, normalises by
    # near-zero variances in training mode and one step blows the weights up (the pattern is what is checked)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    handle = hp.hold_masks(model, masks, opt)
    model(x).logsumexp(dim=1).mean().backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # a random deep net's logits can be huge
    opt.step()
    handle.remove()
    assert all(hp.satisfies_nm(model.get_submodule(n).weight) for n in masks), "2:4 pattern lost in the step"
    path = hp.save_checkpoint(folder / f"{name.replace(':', '-')}-{size}.safetensors", model, masks)
    loaded, loaded_masks, _ = hp.load_checkpoint(path)
    with torch.no_grad():
        logits = model(x)
        assert torch.equal(loaded(x), logits), "checkpoint round trip changed the logits"
        inference = to_inference_model(loaded, loaded_masks, torch.device("cpu"), torch.float32)
        assert torch.allclose(inference.model(x), logits, rtol=1e-3, atol=1e-3), "inference model differs"
    pruned = hp.model_stats(model, set(masks))
    whole = [g for g in plan.groups if g.kept == g.original and "grouped" in g.note]
    grouped = [g for g in plan.groups if "grouped" in g.note]
    return {
        **row,
        "groups": len(plan.groups),
        "grouped_groups": len(grouped),
        "grouped_kept_whole": len(whole),
        "nm_layers": len(masks),
        "params_pruned": pruned["params"],
        "macs_pruned": pruned["macs"],
        "effective_macs": pruned["effective_macs"],
        "status": "supported",
        "seconds": time.perf_counter() - start,
    }


def table(rows: list[dict]) -> str:
    def ratio(a: int, b: int) -> str:
        return f"{a / 1e6:.2f}M -> {b / 1e6:.2f}M ({b / a:.2f}x)"

    lines = []
    for r in rows:
        ok = r["status"] == "supported"
        grouped = f"{r['grouped_groups']} grouped ({r['grouped_kept_whole']} kept whole)" if ok else ""
        lines.append(
            [
                r["model"],
                r["input"],
                f"{r['groups']}" + (f", {grouped}" if ok and r["grouped_groups"] else "") if ok else "-",
                ratio(r["params_dense"], r["params_pruned"]) if ok else f"{r['params_dense'] / 1e6:.2f}M",
                ratio(r["macs_dense"], r["macs_pruned"]) if ok else f"{r['macs_dense'] / 1e6:.2f}M",
                f"{r['effective_macs'] / r['macs_dense']:.2f}x" if ok else "-",
                r["status"],
            ]
        )
    headers = ["model", "input", "channel groups", "params", "MACs", "with 2:4", "status"]
    return markdown_table(headers, lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=None, help="model names (default: every family listed here)")
    p.add_argument("--size", type=int, default=None, help="input side for --models (default: 32)")
    p.add_argument("--out", type=Path, default=Path("docs/results/coverage.md"), help="markdown table to write")
    args = p.parse_args()
    cases = [(m, args.size or 32) for m in args.models] if args.models else TORCHVISION + TIMM
    torch.set_num_threads(min(4, torch.get_num_threads()))
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name, size in cases:
            try:
                rows.append(chain(name, size, Path(folder)))
            except Exception as e:  # noqa: BLE001 - a failed check is a row of the table, not the end of the run
                rows.append({"model": name, "input": f"{size}x{size}", "status": f"FAILED: {e!r}"[:300], "seconds": 0})
                rows[-1].update(params_dense=0, macs_dense=0)
            r = rows[-1]
            print(f"{name}: {r['status'][:160]} ({r['seconds']:.1f} s)", flush=True)
    text = (
        "# Coverage: CNN families\n\n"
        f"`python benchmarks/coverage.py --out {args.out}`: 40% of every channel group pruned with l1 (--round-to "
        "16), then 2:4; one SGD step with the masks held, a checkpoint round trip (identical logits) and the "
        "inference model (equal outputs) checked on each. MACs per image at the input shown; 'with 2:4': the "
        "pruned model's MACs with 2:4 layers counted at half, over the dense model's. MACs are those of the "
        "inference pass; parameters include auxiliary heads (GoogLeNet's two, Inception-v3's at 299x299), which "
        "are pruned with the layers they read and run only in training. Transformers excluded: "
        f"{', '.join(EXCLUDED)}.\n\n" + table(rows) + "\n"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    write_json(args.out.with_suffix(".json"), {"environment": environment(), "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
