"""The pruning commands: `run` (train or load, prune with every metric, compare), `train`, `prune`, `evaluate`.

Each command builds a `RunConfig` from its flags (`run_config_from_args`) and calls the library; the library
is imported inside the commands, so `--help` imports no torch.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from hybridprune.cli.checks import check_json_target, checkpoint_pattern
from hybridprune.cli.flags import (
    DISTILL_WEIGHT,
    add_common,
    add_data,
    add_precision,
    add_prune,
    add_train,
    add_user_model,
)
from hybridprune.cli.quantize import add_deploy_flags, deployed_accuracy, evaluate_onnx_file
from hybridprune.config import (
    DEFAULT_FINETUNE,
    DEFAULT_METRICS,
    DEFAULT_MODEL,
    LATENCY_ALLOCATION,
    METRIC_NAMES,
    RECIPES,
    DataConfig,
    DeployConfig,
    ModelConfig,
    PruneConfig,
    RunConfig,
    TrainConfig,
)
from hybridprune.errors import HybridPruneError


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """The `run`, `train`, `prune` and `evaluate` commands."""
    _add_run(sub)
    _add_train(sub)
    _add_prune(sub)
    _add_evaluate(sub)


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="train (or load), prune with every metric, fine-tune, print the comparison table")
    add_common(p), add_data(p), add_train(p), add_precision(p)
    add_prune(p, f"comma-separated metrics (default: {','.join(DEFAULT_METRICS)})")
    p.add_argument("--checkpoint", default=None, help="start from this dense checkpoint instead of training one")
    p.add_argument("--out", default=None, help="output folder (default: runs/DATASET-MODEL-wWIDTH-sSEED)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out, reusing finished steps")
    p.add_argument("--overwrite", action="store_true", help="redo a run whose --out folder exists")
    p.add_argument("--json", default=None, help="also write the result object to this JSON file")
    p.add_argument(
        "--nm-only",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also build the 2:4-only model (dense width, 2:4 masks, fine-tuned) for bench (default: when the run "
        "applies 2:4 anywhere; --nm-only builds it with every eligible layer masked even then)",
    )
    p.set_defaults(handler=cmd_run)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a dense model and save it as a checkpoint")
    add_common(p), add_data(p), add_train(p), add_precision(p)
    p.add_argument("--out", default="runs/dense.safetensors", help="checkpoint file to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(handler=cmd_train)


def _add_prune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="prune a dense checkpoint with one metric: filter-pruned and filter+N:M models")
    p.add_argument("checkpoint", help="dense checkpoint (from `hybridprune train`)")
    add_common(p), add_data(p, default=None), add_prune(p, "metric (default: hybrid)"), add_user_model(p)
    add_precision(p)
    p.add_argument("--out", default=None, help="output folder (default: next to the checkpoint, named by metric)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted prune in --out")
    p.add_argument("--overwrite", action="store_true", help="redo a prune whose --out folder exists")
    p.add_argument("--json", default=None, help="also write the result object to this JSON file")
    p.set_defaults(handler=cmd_prune)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="accuracy, size and N:M pattern of a checkpoint (or accuracy of an ONNX file)")
    p.add_argument("checkpoint", help="checkpoint file, or an .onnx file (accuracy in --runtime)")
    add_common(p), add_data(p, default=None), add_user_model(p), add_deploy_flags(p)
    p.add_argument("--json", default=None, help="also write the evaluation to this JSON file")
    p.add_argument("--overwrite", action="store_true", help="replace --json if it exists")
    p.set_defaults(handler=cmd_evaluate)


# --- flags -> configs -----------------------------------------------------------------------------------------
_PRUNE_ARGS = ("filter_ratio", "round_to", "nm", "calib_batches", "bn_recalib_batches")


def data_config_from_args(args: argparse.Namespace) -> DataConfig:
    """The dataset flags as a DataConfig (no --dataset and no checkpoint's to default to: digits)."""
    return DataConfig(
        args.dataset or DataConfig.dataset,
        args.data_dir,
        args.download,
        args.train_size,
        args.test_size,
        args.image_size,
        args.workers,
        args.strict,
    )


def run_config_from_args(args: argparse.Namespace, metrics: str | None = None) -> RunConfig:
    """The RunConfig of a `run`, `train` or `prune` command line; `metrics` is comma-separated (None: the
    default metrics). Flags a command lacks take the config defaults.

    Example:
        >>> from hybridprune.cli import build_parser
        >>> cfg = run_config_from_args(build_parser().parse_args(["run", "--epochs", "2", "--workers", "0"]), "l1")
        >>> cfg.train.epochs, cfg.data.workers, cfg.metrics
        (2, 0, ('l1',))
    """
    names = _metric_names(metrics)
    recipe_prune, recipe_finetune = recipe_settings(args)
    model = _model_config(args)  # before the data: a bad model is reported first, as it always was
    return RunConfig(
        data=data_config_from_args(args),
        model=model,
        train=_train_config(args, epochs=getattr(args, "epochs", 0), lr=getattr(args, "lr", TrainConfig.lr)),
        finetune=_train_config(
            args,
            epochs=getattr(args, "finetune_epochs", 0),
            lr=getattr(args, "finetune_lr", DEFAULT_FINETUNE.lr),
            warmup=0.0,
            distill_weight=recipe_finetune.get("distill_weight", 0.0),
            distill_temperature=getattr(args, "distill_temperature", TrainConfig.distill_temperature),
        ),
        prune=PruneConfig(
            metric=names[0],
            ignore=tuple(n.strip() for n in getattr(args, "ignore", "").split(",") if n.strip()),
            target_macs=getattr(args, "target_macs", None),
            **recipe_prune,
            **latency_settings(args),
            **{k: getattr(args, k) for k in _PRUNE_ARGS if getattr(args, k, None) is not None},
        ),
        metrics=names,
        seed=args.seed,
        recipe=getattr(args, "recipe", "plain"),
        deploy=deploy_config(args),
    )


def deploy_config(args: argparse.Namespace) -> DeployConfig:
    """The --deploy flags as a DeployConfig (a command without them deploys nothing).

    Example:
        >>> deploy_config(argparse.Namespace(deploy="int8, openvino:bf16")).targets
        ('int8', 'openvino:bf16')
    """
    return DeployConfig(
        targets=tuple(getattr(args, "deploy", "").split(",")),
        batch_sizes=deploy_batches(getattr(args, "deploy_batch", "64")),
        rounds=getattr(args, "deploy_rounds", DeployConfig.rounds),
        calibration_images=getattr(args, "calibration_images", DeployConfig.calibration_images),
        calibration_method=getattr(args, "calibration_method", DeployConfig.calibration_method),
        max_drop=getattr(args, "max_drop", None),
        validation_images=getattr(args, "validation_images", DeployConfig.validation_images),
        auto_tolerance=getattr(args, "auto_tolerance", DeployConfig.auto_tolerance),
    )


def latency_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The latency flags as PruneConfig settings; --target-latency replaces --filter-ratio and --target-macs, and
    brings LATENCY_ALLOCATION unless --allocation says otherwise (a recipe's allocation counts as said).

    Example:
        >>> s = latency_settings(argparse.Namespace(target_latency=0.5, allocation=None, filter_ratio=None))
        >>> s["target_latency"], s["allocation"]
        (0.5, 'sensitivity')
    """
    names = ("nm_where", "latency_runtime", "latency_batch", "latency_dtype", "latency_step", "latency_points",
             "latency_table")  # fmt: skip
    settings = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    target = getattr(args, "target_latency", None)
    if target is None:
        return settings
    if getattr(args, "filter_ratio", None) is not None or getattr(args, "target_macs", None) is not None:
        raise HybridPruneError("give one of --filter-ratio, --target-macs and --target-latency")
    settings["target_latency"] = target
    if getattr(args, "allocation", None) is None and "allocation" not in RECIPES[getattr(args, "recipe", "plain")].get(
        "prune", {}
    ):
        settings["allocation"] = LATENCY_ALLOCATION
    return settings


def _metric_names(metrics: str | None) -> tuple[str, ...]:
    names = tuple(m.strip() for m in (",".join(DEFAULT_METRICS) if metrics is None else metrics).split(","))
    names = tuple(m for m in names if m)
    if not names:
        raise HybridPruneError(f"--metric names no metric; give one or more of {', '.join(METRIC_NAMES)}")
    return names


def _model_config(args: argparse.Namespace) -> ModelConfig:
    """--model and --width; with neither, the default model at its default width."""
    model, width = getattr(args, "model", None), getattr(args, "width", None)
    return ModelConfig(
        DEFAULT_MODEL.name if model is None else model,  # an empty --model is bad input, not the default
        DEFAULT_MODEL.width if model is None and width is None else width,
        getattr(args, "weights", None),
    )


def _train_config(args: argparse.Namespace, **settings: Any) -> TrainConfig:
    """A TrainConfig with the flags that dense training and fine-tuning share, and `settings`."""
    return TrainConfig(
        batch_size=getattr(args, "batch_size", TrainConfig.batch_size),
        precision=getattr(args, "precision", "auto"),
        compile=getattr(args, "compile", False),
        sync_bn=getattr(args, "sync_bn", False),
        **settings,
    )


def recipe_settings(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """The prune and fine-tune settings of `--recipe`, with every recovery option given explicitly winning.

    Example:
        >>> args = argparse.Namespace(recipe="best", permute=None, prune_steps=3, allocation=None,
        ...     distill=True, distill_weight=0.5)
        >>> prune, finetune = recipe_settings(args)
        >>> prune["allocation"], prune["steps"], finetune["distill_weight"]
        ('sensitivity', 3, 0.5)
    """
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
    weight = finetune.get("distill_weight", DISTILL_WEIGHT) if weight is None else weight
    finetune["distill_weight"] = weight if distill else 0.0
    return prune, finetune


# --- the commands -------------------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> None:
    if args.checkpoint:
        _model_of_checkpoint(args)
    cfg = run_config_from_args(args, args.metric)
    slug = f"{cfg.data.dataset}-{cfg.model.label}".replace(":", "_").replace("/", "_")
    _run_and_print(args, cfg, Path(args.out or f"runs/{slug}-s{cfg.seed}"), include_nm_only=args.nm_only)


def cmd_prune(args: argparse.Namespace) -> None:
    metric = "hybrid" if args.metric is None else args.metric
    _model_of_checkpoint(args)
    _dataset_of_checkpoint(args)
    if "," in metric:
        raise HybridPruneError("prune takes one --metric; use `hybridprune run` to compare several")
    cfg = run_config_from_args(args, metric)
    out = Path(args.out or Path(args.checkpoint).with_suffix("").as_posix() + f"-{metric}")
    _run_and_print(args, cfg, out, include_nm_only=False)


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


def _dataset_of_checkpoint(args: argparse.Namespace, meta: dict[str, Any] | None = None) -> None:
    """Without --dataset, the dataset the checkpoint records (its name or spec, said in one line); digits, as
    before, for a checkpoint that records none. A folder: dataset is cropped to the side the model takes."""
    from hybridprune.experiments.inputs import recorded_dataset
    from hybridprune.pruning.checkpoint import checkpoint_meta

    if args.dataset is not None:
        return
    meta = checkpoint_meta(args.checkpoint) if meta is None else meta
    recorded = recorded_dataset(meta, args.checkpoint)
    args.dataset = recorded or "digits"
    if recorded:
        print(f"dataset: {recorded}, which {args.checkpoint} was trained on (--dataset to choose another)")
    side = meta.get("image_size")
    if recorded and recorded.startswith("folder:") and args.image_size is None and isinstance(side, int):
        args.image_size = side


def _run_and_print(args: argparse.Namespace, cfg: RunConfig, out: Path, include_nm_only: bool | None) -> None:
    from hybridprune.experiments.job import run
    from hybridprune.world import world_from_env

    check_json_target(args.json, args.overwrite)
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


def _print_result(result: dict[str, Any], json_path: str | None) -> None:
    from hybridprune.experiments.tables import latency_tables, layer_table, masked_layers, run_table
    from hybridprune.outputs import write_json

    nm = "" if masked_layers(result) else "; no layer took 2:4, so the final models are the filter-pruned ones"
    print(f"\nlayers (filters kept shown for the first metric; every metric keeps the same counts{nm}):")
    print(layer_table(result))
    print(f"\naccuracy (%) on {result['dataset']['name']} test, {result['dataset']['test']} images:")
    print(run_table(result))
    latency = latency_tables(result)
    if latency:
        print(f"\nlatency (kept channels and predicted savings per channel group):\n{latency}")
    if result.get("deployed"):
        _print_deployed(result["deployed"], result["dense"]["accuracy"])
    if json_path:
        write_json(json_path, result)
        print(f"\nwrote {json_path}")


def deploy_batches(text: str) -> tuple[int, ...]:
    """'1,64' -> (1, 64); anything but integers is one line (DeployConfig checks the bound).

    Example:
        >>> deploy_batches("64, 1")
        (64, 1)
    """
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise HybridPruneError(f"--deploy-batch takes integers separated by commas, got {text!r}") from None


def _print_deployed(deployed: dict[str, Any], dense_top1: float) -> None:
    from hybridprune.experiments.deployed import deployed_table, fastest_within

    base = deployed["baseline"]
    times = ", ".join(f"{ms:.3f} ms at batch {b}" for b, ms in base["latency_ms"].items())
    baseline = f"{base['runtime']} {base['precision']}, {times}"
    print(f"\ndeployed (top-1 measured in each runtime; speed against the dense model in {baseline}, timed in the "
          f"same rounds; {deployed['threads']} threads):")  # fmt: skip
    print(deployed_table(deployed))
    for failed in deployed.get("failed", []):
        print(f"not deployed: {failed['variant']} in {failed['runtime']} {failed['precision']}: {failed['error']}")
    best = fastest_within(deployed, dense_top1)
    if best is None:
        print("no deployed form is within 1 point of the dense model's top-1")
    else:
        batch = str(max(deployed["batch_sizes"]))
        print(f"fastest at batch {batch} within 1 point of dense top-1: {best['variant']} in {best['runtime']} "
              f"{best['precision']}, {best['latency'][batch]['speedup']:.2f}x, top-1 {best['top1']:.2f}")  # fmt: skip


def cmd_train(args: argparse.Namespace) -> None:
    from hybridprune.experiments.inputs import data_meta, new_model, prepare_data
    from hybridprune.outputs import check_output_file
    from hybridprune.provenance import environment
    from hybridprune.pruning.checkpoint import save_checkpoint
    from hybridprune.training.loop import check_device_settings, evaluate, fit
    from hybridprune.world import world_from_env

    check_output_file(args.out, args.overwrite, example="dense.safetensors")  # before the work, not after it
    cfg = run_config_from_args(args)
    world, device = world_from_env(args.device)
    note = check_device_settings(cfg.train, device, world)
    if note and world.main:
        print(note)
    env, data = environment(), prepare_data(cfg)
    progress = not args.no_progress and world.main
    model = fit(
        new_model(cfg, data), data, cfg.train, device, seed=cfg.seed, desc="train", progress=progress, world=world
    )
    acc = evaluate(model, data.test, device)
    if not world.main:
        return
    meta = {"stage": "dense", "dataset": data.name, "accuracy": acc, "config": cfg.to_dict(), "environment": env}
    save_checkpoint(args.out, model, None, meta | data_meta(data), overwrite=args.overwrite)
    print(f"test accuracy {acc:.2f}% on {data.name}; wrote {args.out}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from hybridprune.experiments.inputs import check_classes, check_fits, prepare_data_config
    from hybridprune.models.counts import model_stats
    from hybridprune.outputs import write_json
    from hybridprune.pruning.checkpoint import load_checkpoint
    from hybridprune.pruning.nm import satisfies_nm
    from hybridprune.training.loop import evaluate
    from hybridprune.world import resolve_device

    check_json_target(args.json, args.overwrite)
    if args.checkpoint.lower().endswith(".onnx"):
        return evaluate_onnx_file(args)
    model, masks, meta = load_checkpoint(args.checkpoint, args.model)
    _dataset_of_checkpoint(args, {**meta, "image_size": model.input_shape[-1]})
    pattern = checkpoint_pattern(args.checkpoint, meta)
    broken = [n for n in masks if not satisfies_nm(model.get_submodule(n).weight, pattern)]
    if broken:
        raise HybridPruneError(f"{args.checkpoint}: layer {broken[0]} has an N:M mask but its weights break {pattern}")
    data = prepare_data_config(data_config_from_args(args), args.seed)
    check_fits(model, data, meta.get("dataset"))
    check_classes(meta, data, args.checkpoint)
    result = {
        "checkpoint": args.checkpoint,
        "dataset": data.name,
        "test_images": len(data.test),
        "accuracy": evaluate(model, data.test, resolve_device(args.device)),
        **(deployed_accuracy(args, model, data) if args.runtime or args.deploy_precision else {}),
        **model_stats(model, set(masks), pattern),
        "nm_layers": sorted(masks),
        "nm_pattern_holds": True,  # checked above: a broken pattern is refused
    }
    for key, value in result.items():
        print(f"{key}: {_shown(key, value)}")
    if args.json:
        write_json(args.json, result)


def _shown(key: str, value: Any) -> str:
    """A value as printed: accuracies in percent with two decimals, other fractions to four significant digits,
    the rest as it is (the JSON keeps every digit).

    Example:
        >>> _shown("accuracy", 8.356545961002785), _shown("sparsity", 0.123456), _shown("params", 1200)
        ('8.36%', '0.1235', '1200')
    """
    if isinstance(value, float):
        return f"{value:.2f}%" if "accuracy" in key else f"{value:.4g}"
    return str(value)
