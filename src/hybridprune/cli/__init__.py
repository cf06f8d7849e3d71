"""The `hybridprune` command: a thin layer over the library; every name resolves through a registry."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hybridprune.errors import HybridPruneError

# Every numeric flag, its kind and inclusive bounds: checked where it is parsed (nan, inf, negative, huge
# and non-numbers are one line and exit 2), so no bad number reaches the work.
NUMERIC_FLAGS: dict[str, tuple[type, float, float]] = {
    "--seed": (int, 0, 2**32 - 1),
    "--train-size": (int, 1, 10**9),
    "--test-size": (int, 1, 10**9),
    "--width": (float, 1e-6, 16.0),
    "--epochs": (int, 0, 100_000),
    "--finetune-epochs": (int, 0, 100_000),
    "--lr": (float, 1e-12, 100.0),
    "--finetune-lr": (float, 1e-12, 100.0),
    "--batch-size": (int, 1, 65_536),
    "--round-to": (int, 1, 4096),
    "--calib-batches": (int, 1, 10_000),
    "--bn-recalib-batches": (int, 0, 10_000),
    "--workers": (int, 1, 256),
    "--image-size": (int, 8, 4096),
    "--channels": (int, 1, 16),
    "--rounds": (int, 1, 100_000),
    "--calls": (int, 1, 100_000),
    "--threads": (int, 1, 1024),
    "--opset": (int, 13, 20),
    "--prune-steps": (int, 1, 20),
    "--target-macs": (float, 0.01, 1.0),
    "--distill-weight": (float, 0.0, 1.0),
    "--distill-temperature": (float, 0.05, 100.0),
    "--check-images": (int, 1, 100_000),
}


def _bounded(flag: str) -> Callable[[str], float]:
    kind, low, high = NUMERIC_FLAGS[flag]

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or not (low <= value <= high):
            raise argparse.ArgumentTypeError(f"{flag} must be {kind.__name__ == 'int' and 'an integer' or 'a number'} "
                                             f"in [{low:g}, {high:g}], got {text!r}")  # fmt: skip
        return value

    return parse


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line, like every other bad input; numeric flags bounded by NUMERIC_FLAGS."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def add_argument(self, *names: str, **kwargs: Any) -> argparse.Action:  # type: ignore[override]
        if kwargs.get("type") in (int, float):
            flag = next(n for n in names if n.startswith("--"))
            if flag not in NUMERIC_FLAGS:
                raise KeyError(f"numeric flag {flag} has no bounds in NUMERIC_FLAGS")  # a bug, caught by the tests
            kwargs["type"] = _bounded(flag)
        return super().add_argument(*names, **kwargs)


def _ratio(text: str) -> float:
    from hybridprune.config import validate_ratio

    try:
        return validate_ratio(float(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            str(e) if isinstance(e, HybridPruneError) else f"not a number: {text!r}"
        ) from None


def _add_precision(p: argparse.ArgumentParser) -> None:
    from hybridprune.config import PRECISIONS

    p.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="training arithmetic: auto = bf16 autocast on GPUs that have it, else fp16 with a gradient scaler; "
        "fp32 on CPUs",
    )
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the model for training (falls back where it fails)"
    )
    p.add_argument(
        "--sync-bn", action="store_true", help="under torchrun on GPUs: BatchNorm statistics over every rank's batch"
    )


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="seed for model init, data order, subsets and random scores")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_data(p: argparse.ArgumentParser, default: str | None = "digits") -> None:
    from hybridprune.config import DEFAULT_DATA_DIR, dataset_names

    p.add_argument("--dataset", default=default, help=f"one of {', '.join(dataset_names())} (default: {default})")
    p.add_argument(
        "--data-dir", default=None, help=f"root of torchvision-layout datasets (default: {DEFAULT_DATA_DIR})"
    )
    p.add_argument("--download", action="store_true", help="download the dataset if it is missing (needs network)")
    p.add_argument("--train-size", type=int, default=None, help="use a seeded random subset of this many train images")
    p.add_argument("--test-size", type=int, default=None, help="use a seeded random subset of this many test images")
    p.add_argument("--image-size", type=int, default=None, help="folder:PATH only: crop side (default 224)")
    p.add_argument("--workers", type=int, default=None, help="folder:PATH only: decoding processes (default: CPUs-1)")
    p.add_argument("--strict", action="store_true", help="folder:PATH only: an unreadable image is an error")


def _add_model(p: argparse.ArgumentParser) -> None:
    from hybridprune.config import DEFAULT_MODEL, model_names

    p.add_argument(
        "--model", default=None, help=f"{model_names()} (default: {DEFAULT_MODEL.name} at width {DEFAULT_MODEL.width})"
    )
    p.add_argument(
        "--width", type=float, default=None, help="width multiplier of a built-in model's layers (default: 1.0)"
    )
    p.add_argument("--weights", default=None, help="trained weights of that model: a state dict in .safetensors or .pt")


def _add_user_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="for a checkpoint of user code: the module:factory that built it")


def _add_train(p: argparse.ArgumentParser) -> None:
    from hybridprune.config import TrainConfig

    _add_model(p)
    defaults = TrainConfig()
    p.add_argument("--epochs", type=int, default=defaults.epochs, help="epochs to train the dense model")
    p.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate of dense training (SGD)")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="training batch size")


def _add_prune(p: argparse.ArgumentParser, metric_help: str) -> None:
    from hybridprune.config import ALLOCATIONS, DEFAULT_FINETUNE, DEFAULT_ROUND_TO, RECIPES, PruneConfig, TrainConfig

    defaults = PruneConfig()

    p.add_argument(
        "--filter-ratio",
        type=_ratio,
        default=defaults.filter_ratio,
        help="fraction of channels removed from each channel group, in [0, 1)",
    )
    p.add_argument(
        "--round-to",
        type=int,
        default=DEFAULT_ROUND_TO,
        help="round kept filter counts to this multiple so the next layer stays 2:4 and cuSPARSELt eligible",
    )
    p.add_argument("--nm", default="2:4", help="N:M pattern, keep N of every M input-channel weights (default 2:4)")
    p.add_argument(
        "--finetune-epochs",
        type=int,
        default=DEFAULT_FINETUNE.epochs,
        help="epochs of each fine-tune (after filter and N:M pruning)",
    )
    p.add_argument("--finetune-lr", type=float, default=DEFAULT_FINETUNE.lr, help="peak learning rate of fine-tuning")
    p.add_argument(
        "--recipe",
        default="plain",
        choices=list(RECIPES),
        help="a named set of the recovery options below (plain: none of them; best: the combination measured "
        "best on CIFAR-10, see the README); options given explicitly win over the recipe's",
    )
    p.add_argument(
        "--distill",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fine-tune pruned stages against the dense model's logits (KD)",
    )
    p.add_argument(
        "--distill-weight", type=float, default=None, help="with --distill: weight of the KD term, rest CE (0.9)"
    )
    p.add_argument(
        "--distill-temperature",
        type=float,
        default=TrainConfig.distill_temperature,
        help="with --distill: softmax temperature",
    )
    p.add_argument(
        "--calib-batches", type=int, default=defaults.calib_batches, help="unlabeled batches for output_l1 scores"
    )
    p.add_argument(
        "--bn-recalib-batches",
        type=int,
        default=defaults.bn_recalib_batches,
        help="batches to recalibrate BatchNorm after pruning",
    )
    p.add_argument("--metric", default=None, help=metric_help)
    p.add_argument(
        "--prune-steps",
        type=int,
        default=None,
        help=f"remove the ratio in this many steps, rescoring and fine-tuning between them (same total epochs; "
        f"default {defaults.steps})",
    )
    p.add_argument(
        "--allocation",
        default=None,
        choices=list(ALLOCATIONS),
        help="uniform (default): the same fraction of every channel group; global: one ranking of all channels "
        "(scores normalised per group); sensitivity: per-group ratios from each group's measured one-shot "
        "accuracy drop, so groups that matter less lose more",
    )
    p.add_argument(
        "--permute",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="before N:M pruning, reorder each channel group's channels so more magnitude survives (same function)",
    )
    p.add_argument(
        "--target-macs",
        type=float,
        default=None,
        help="instead of --filter-ratio: keep this fraction of the dense model's MACs (e.g. 0.36)",
    )
    p.add_argument(
        "--ignore",
        default="",
        help="comma-separated module names whose output channels are never pruned (the head never is)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hybridprune", description="Hybrid pruning of CNNs: filter pruning ranked for 2:4, then N:M.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    from hybridprune.config import DEFAULT_METRICS

    p = sub.add_parser("run", help="train (or load), prune with every metric, fine-tune, print the comparison table")
    (
        _add_common(p),
        _add_data(p),
        _add_train(p),
        _add_precision(p),
        _add_prune(p, f"comma-separated metrics (default: {','.join(DEFAULT_METRICS)})"),
    )
    p.add_argument("--checkpoint", default=None, help="start from this dense checkpoint instead of training one")
    p.add_argument("--out", default=None, help="output folder (default: runs/DATASET-MODEL-wWIDTH-sSEED)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out, reusing finished steps")
    p.add_argument("--overwrite", action="store_true", help="redo a run whose --out folder exists")
    p.add_argument("--json", default=None, help="also write the result object to this JSON file")

    p = sub.add_parser("train", help="train a dense model and save it as a checkpoint")
    _add_common(p), _add_data(p), _add_train(p), _add_precision(p)
    p.add_argument("--out", default="runs/dense.safetensors", help="checkpoint file to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    p = sub.add_parser("prune", help="prune a dense checkpoint with one metric: filter-pruned and filter+N:M models")
    p.add_argument("checkpoint", help="dense checkpoint (from `hybridprune train`)")
    _add_common(p), _add_data(p), _add_prune(p, "metric (default: hybrid)"), _add_user_model(p), _add_precision(p)
    p.add_argument("--out", default=None, help="output folder (default: next to the checkpoint, named by metric)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted prune in --out")
    p.add_argument("--overwrite", action="store_true", help="redo a prune whose --out folder exists")
    p.add_argument("--json", default=None, help="also write the result object to this JSON file")

    p = sub.add_parser("evaluate", help="accuracy, size and N:M pattern of a checkpoint")
    p.add_argument("checkpoint", help="checkpoint file")
    _add_common(p), _add_data(p), _add_user_model(p)
    p.add_argument("--json", default=None, help="also write the evaluation to this JSON file")
    p.add_argument("--overwrite", action="store_true", help="replace --json if it exists")
    from hybridprune.cli import deploy as cli_deploy  # here: they import this module's flag helpers
    from hybridprune.cli import grid as cli_grid

    cli_deploy.add_parsers(sub)
    cli_grid.add_parsers(sub)
    return parser


_PRUNE_ARGS = ("filter_ratio", "round_to", "nm", "calib_batches", "bn_recalib_batches")


def _data_config(args: argparse.Namespace, dataset: str) -> Any:
    from hybridprune.config import DataConfig

    return DataConfig(
        dataset,
        args.data_dir,
        args.download,
        args.train_size,
        args.test_size,
        args.image_size,
        args.workers,
        args.strict,
    )


def _width(model: str | None, width: float | None) -> float | None:
    """--width as given; with neither --model nor --width, the default model's width."""
    from hybridprune.config import DEFAULT_MODEL

    return DEFAULT_MODEL.width if model is None and width is None else width


def _run_config(args: argparse.Namespace, metrics: str | None, dataset: str) -> Any:
    from hybridprune.config import (
        DEFAULT_FINETUNE,
        DEFAULT_METRICS,
        DEFAULT_MODEL,
        METRIC_NAMES,
        ModelConfig,
        PruneConfig,
        RunConfig,
        TrainConfig,
    )

    recipe_prune, recipe_finetune = _recipe_settings(args)
    names = tuple(
        m.strip() for m in (",".join(DEFAULT_METRICS) if metrics is None else metrics).split(",") if m.strip()
    )
    if not names:
        raise HybridPruneError(f"--metric names no metric; give one or more of {', '.join(METRIC_NAMES)}")
    ignore = tuple(n.strip() for n in getattr(args, "ignore", "").split(",") if n.strip())
    model = ModelConfig(
        getattr(args, "model", None) or DEFAULT_MODEL.name,
        _width(getattr(args, "model", None), getattr(args, "width", None)),
        getattr(args, "weights", None),
    )
    return RunConfig(
        data=_data_config(args, dataset),
        model=model,
        train=TrainConfig(
            epochs=getattr(args, "epochs", 0),
            lr=getattr(args, "lr", TrainConfig.lr),
            batch_size=getattr(args, "batch_size", TrainConfig.batch_size),
            precision=getattr(args, "precision", "auto"),
            compile=getattr(args, "compile", False),
            sync_bn=getattr(args, "sync_bn", False),
        ),
        finetune=TrainConfig(
            epochs=getattr(args, "finetune_epochs", 0),
            lr=getattr(args, "finetune_lr", DEFAULT_FINETUNE.lr),
            warmup=0.0,
            distill_weight=recipe_finetune.get("distill_weight", 0.0),
            distill_temperature=getattr(args, "distill_temperature", TrainConfig.distill_temperature),
            batch_size=getattr(args, "batch_size", TrainConfig.batch_size),
            precision=getattr(args, "precision", "auto"),
            compile=getattr(args, "compile", False),
            sync_bn=getattr(args, "sync_bn", False),
        ),
        prune=PruneConfig(
            metric=names[0],
            ignore=ignore,
            target_macs=getattr(args, "target_macs", None),
            **recipe_prune,
            **{k: getattr(args, k) for k in _PRUNE_ARGS if hasattr(args, k)},
        ),
        metrics=names,
        seed=args.seed,
        recipe=getattr(args, "recipe", "plain"),
    )


def _recipe_settings(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """The prune and fine-tune settings of `--recipe`, with every recovery option given explicitly winning.

    Example:
        >>> args = argparse.Namespace(recipe="best", permute=None, prune_steps=3, allocation=None,
        ...     distill=True, distill_weight=0.5)
        >>> prune, finetune = _recipe_settings(args)
        >>> prune["allocation"], prune["steps"], finetune["distill_weight"]
        ('sensitivity', 3, 0.5)
    """
    from hybridprune.config import RECIPES

    recipe = RECIPES[getattr(args, "recipe", "plain")]
    prune = dict(recipe.get("prune", {}))
    for key, flag in (("steps", "prune_steps"), ("allocation", "allocation"), ("permute", "permute")):
        if getattr(args, flag, None) is not None:
            prune[key] = getattr(args, flag)
    finetune = dict(recipe.get("finetune", {}))
    distill = getattr(args, "distill", None)
    if distill is None:
        distill = finetune.get("distill_weight", 0.0) > 0
    weight = getattr(args, "distill_weight", None)
    finetune["distill_weight"] = (finetune.get("distill_weight", 0.9) if weight is None else weight) if distill else 0.0
    return prune, finetune


def _print_result(result: dict[str, Any], json_path: str | None) -> None:
    from hybridprune.experiments.report import layer_table, run_table
    from hybridprune.outputs import write_json

    print("\nlayers (filters kept shown for the first metric; every metric keeps the same counts):")
    print(layer_table(result))
    print(f"\naccuracy (%) on {result['dataset']['name']} test, {result['dataset']['test']} images:")
    print(run_table(result))
    if json_path:
        write_json(json_path, result)
        print(f"\nwrote {json_path}")


def _model_of_checkpoint(args: argparse.Namespace) -> None:
    """With a dense checkpoint, the run's model is the checkpoint's (its config and output folder name it);
    a --model or --width that says otherwise is bad input, and user code must be named again."""
    from hybridprune.pruning.checkpoint import checkpoint_source

    source = checkpoint_source(args.checkpoint)
    if source.kind == "user" and args.model != source.name:
        raise HybridPruneError(f"{args.checkpoint} holds user code {source.name!r}; pass --model {source.name}")
    if args.model not in (None, source.name, source.label) or getattr(args, "width", None) is not None:
        raise HybridPruneError(f"{args.checkpoint} holds {source.label}; drop --model/--width, the checkpoint decides")
    args.model = source.label


def cmd_run(args: argparse.Namespace) -> None:
    if args.checkpoint:
        _model_of_checkpoint(args)
    cfg = _run_config(args, args.metric, args.dataset)
    slug = f"{cfg.data.dataset}-{cfg.model.label}".replace(":", "_").replace("/", "_")
    _run_and_print(
        args,
        cfg,
        Path(args.out or f"runs/{slug}-s{cfg.seed}"),
        include_nm_only=True,
    )


def cmd_prune(args: argparse.Namespace) -> None:
    metric = "hybrid" if args.metric is None else args.metric
    _model_of_checkpoint(args)
    if "," in metric:
        raise HybridPruneError("prune takes one --metric; use `hybridprune run` to compare several")
    cfg = _run_config(args, metric, args.dataset)
    out = Path(args.out or Path(args.checkpoint).with_suffix("").as_posix() + f"-{metric}")
    _run_and_print(args, cfg, out, include_nm_only=False)


def _run_and_print(args: argparse.Namespace, cfg: Any, out: Path, include_nm_only: bool) -> None:
    from hybridprune.experiments.job import run
    from hybridprune.world import world_from_env

    _check_json_target(args.json, args.overwrite)
    world, device = world_from_env(args.device)  # several ranks under torchrun, else this process alone
    result = run(
        cfg,
        out,
        device,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        dense_checkpoint=args.checkpoint,
        include_nm_only=include_nm_only,
        world=world,
    )
    if world.main:
        _print_result(result, args.json)
        print(f"checkpoints and results.json in {out}" + (f" ({world.size} processes)" if world.active else ""))


def cmd_train(args: argparse.Namespace) -> None:
    from hybridprune.experiments.job import data_meta, new_model, prepare_data
    from hybridprune.outputs import check_output_file, environment
    from hybridprune.pruning.checkpoint import save_checkpoint
    from hybridprune.training.loop import evaluate, fit
    from hybridprune.world import world_from_env

    check_output_file(args.out, args.overwrite)  # before the work, not after it
    cfg = _run_config(args, None, args.dataset)
    world, device = world_from_env(args.device)
    env, data = environment(), prepare_data(cfg)
    progress = not args.no_progress and world.main
    model = fit(
        new_model(cfg, data), data, cfg.train, device, seed=cfg.seed, desc="train", progress=progress, world=world
    )
    acc = evaluate(model, data.test, device)
    if not world.main:
        return
    save_checkpoint(
        args.out,
        model,
        None,
        {"stage": "dense", "dataset": data.name, "accuracy": acc, "config": cfg.to_dict(), "environment": env}
        | data_meta(data),
        overwrite=args.overwrite,
    )
    print(f"test accuracy {acc:.2f}% on {data.name}; wrote {args.out}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from hybridprune.experiments.job import check_classes, check_fits, prepare_data_config
    from hybridprune.models.counts import model_stats
    from hybridprune.outputs import write_json
    from hybridprune.pruning.checkpoint import load_checkpoint
    from hybridprune.pruning.nm import satisfies_nm
    from hybridprune.training.loop import evaluate
    from hybridprune.world import resolve_device

    _check_json_target(args.json, args.overwrite)
    model, masks, meta = load_checkpoint(args.checkpoint, args.model)
    pattern = _checkpoint_pattern(args.checkpoint, meta)
    broken = [n for n in masks if not satisfies_nm(model.get_submodule(n).weight, pattern)]
    if broken:
        raise HybridPruneError(f"{args.checkpoint}: layer {broken[0]} has an N:M mask but its weights break {pattern}")
    data = prepare_data_config(_data_config(args, args.dataset), args.seed)
    check_fits(model, data)
    check_classes(meta, data, args.checkpoint)
    result = {
        "checkpoint": args.checkpoint,
        "dataset": data.name,
        "test_images": len(data.test),
        "accuracy": evaluate(model, data.test, resolve_device(args.device)),
        **model_stats(model, set(masks), pattern),
        "nm_layers": sorted(masks),
        "nm_pattern_holds": True,  # checked above: a broken pattern is refused
    }
    for key, value in result.items():
        print(f"{key}: {value}")
    if args.json:
        write_json(args.json, result)


def _checkpoint_pattern(path: str, meta: dict[str, Any]) -> Any:
    """The N:M pattern a checkpoint records (2:4 when it records none); a malformed one is bad input."""
    from hybridprune.pruning.nm import NMPattern

    text = meta.get("nm", "2:4")
    if not isinstance(text, str):
        raise HybridPruneError(f"{path}: header meta.nm must be a pattern such as '2:4', got {text!r}")
    return NMPattern.parse(text)


def _check_json_target(path: str | None, overwrite: bool) -> None:
    """Before any work: a --json target must be a writable file path (existing only with --overwrite)."""
    from hybridprune.outputs import check_output_file

    if path:
        check_output_file(path, overwrite)


def _commands() -> dict[str, Callable[[argparse.Namespace], None]]:
    from hybridprune.cli import deploy as cli_deploy
    from hybridprune.cli import grid as cli_grid

    return {
        "run": cmd_run,
        "train": cmd_train,
        "prune": cmd_prune,
        "evaluate": cmd_evaluate,
        "bench": cli_deploy.cmd_bench,
        "convert": cli_deploy.cmd_convert,
        "export": cli_deploy.cmd_export,
        "experiment": cli_grid.cmd_experiment,
        "report": cli_grid.cmd_report,
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `hybridprune` command; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = list(argv)
    try:
        _commands()[args.command](args)
    except HybridPruneError as e:
        print(f"hybridprune {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"\nhybridprune {args.command}: interrupted; finished steps are saved, rerun with --resume", file=sys.stderr
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
