"""What every command's flags share: the parser, numeric flags bounded by their config field, shared flag groups.

A numeric flag declares the config field it sets (`numeric(p, "--epochs", TrainConfig, "epochs", ...)`) and
reads its kind, its default and its inclusive bound from there, so a bound lives only in the config class
(`config.py`, `RANGES`) and the CLI, YAML grids and the Python API refuse the same values. A bad number is one
line and exit 2 at parse time, before any work. No torch here: `--help` stays fast.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from hybridprune.config import (
    ALLOCATIONS,
    CALIBRATION_METHODS,
    DEFAULT_DATA_DIR,
    DEFAULT_FINETUNE,
    DEFAULT_MODEL,
    FOLDER_IMAGE_SIZE,
    LATENCY_DTYPES,
    LATENCY_RUNTIMES,
    NM_WHERE,
    PRECISIONS,
    RECIPES,
    AnalysisConfig,
    DataConfig,
    DeployConfig,
    ModelConfig,
    ModelSource,
    PruneConfig,
    RunConfig,
    TrainConfig,
    dataset_names,
    default_workers,
    model_names,
    validate_ratio,
)
from hybridprune.errors import HybridPruneError

C = TypeVar("C")

# The distillation weight --distill uses when neither --distill-weight nor the recipe sets one.
DISTILL_WEIGHT: float = RECIPES["distill"]["finetune"]["distill_weight"]


@dataclass(frozen=True)
class Bound:
    """The `type=` of a numeric flag: parses text as the kind of `config.field`, within `config.RANGES[field]`.

    Example:
        >>> Bound("--epochs", TrainConfig, "epochs")("3")
        3
    """

    flag: str
    config: type
    field: str

    @property
    def kind(self) -> type:
        declared = next(f.type for f in fields(self.config) if f.name == self.field)
        return float if "float" in str(declared) else int

    @property
    def limits(self) -> tuple[float, float]:
        return self.config.RANGES[self.field]

    def __call__(self, text: str) -> int | float:
        (low, high), kind = self.limits, self.kind
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or not (low <= value <= high):
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{self.flag} must be {what} in [{low:g}, {high:g}], got {text!r}")
        return value


class Parser(argparse.ArgumentParser):
    """Argument errors as one line, like every other bad input; a bare int or float flag is refused (a bug)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def add_argument(self, *names: str, **kwargs: Any) -> argparse.Action:  # type: ignore[override]
        if kwargs.get("type") in (int, float):
            raise TypeError(f"{names[0]} parses a bare number; declare it with numeric() so a config bounds it")
        return super().add_argument(*names, **kwargs)


def numeric(p: argparse.ArgumentParser, flag: str, source: Any, field: str, help: str, **kwargs: Any) -> None:
    """Add `flag`, bounded by the config field it sets; `source` is the config class, or an instance whose
    value is the default. The default is stated in the help unless the help already says it.

    Example:
        >>> p = Parser(prog="x")
        >>> numeric(p, "--epochs", TrainConfig, "epochs", "epochs to train")
        >>> p.parse_args(["--epochs", "2"]).epochs
        2
    """
    config = source if isinstance(source, type) else type(source)
    kwargs.setdefault("default", getattr(source, field))
    default = kwargs["default"]
    if default is not None and "default" not in help:
        help = f"{help} (default: {default})"
    p.add_argument(flag, type=Bound(flag, config, field), help=help, **kwargs)


def numeric_flags(parser: argparse.ArgumentParser) -> dict[tuple[str, str], Bound]:
    """(command, flag) -> its Bound, for every numeric flag of every command of `parser`."""
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    return {
        (name, flag): action.type
        for name, sub in commands.items()
        for action in sub._actions
        if isinstance(action.type, Bound)
        for flag in action.option_strings
    }


def config_from_args(config: type[C], args: argparse.Namespace) -> C:
    """`config` built from the flags that set its fields (each flag's dest is the field's name).

    Example:
        >>> from hybridprune.config import ExportConfig
        >>> config_from_args(ExportConfig, argparse.Namespace(opset=13, check_images=8, out="m.onnx"))
        ExportConfig(opset=13, check_images=8)
    """
    return config(**{f.name: getattr(args, f.name) for f in fields(config)})


def ratio(text: str) -> float:
    """The `type=` of --filter-ratio: a number in [0, 1) (validate_ratio's bound)."""
    try:
        return validate_ratio(float(text))
    except ValueError as e:
        message = str(e) if isinstance(e, HybridPruneError) else f"not a number: {text!r}"
        raise argparse.ArgumentTypeError(message) from None


def add_common(p: argparse.ArgumentParser) -> None:
    numeric(p, "--seed", RunConfig, "seed", "seed for model init, data order, subsets and random scores")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    numeric(p, "--analysis-timeout", AnalysisConfig, "analysis_timeout",
            "seconds after which tracing a model's channel groups stops with one line; 0: no limit")  # fmt: skip


def add_data(p: argparse.ArgumentParser, default: str | None = "digits") -> None:
    """The dataset flags; `default` None: the checkpoint's recorded dataset (digits where it records none)."""
    said = default or "the dataset the checkpoint was trained on"
    p.add_argument("--dataset", default=default, help=f"one of {', '.join(dataset_names())} (default: {said})")
    p.add_argument(
        "--data-dir", default=None, help=f"root of torchvision-layout datasets (default: {DEFAULT_DATA_DIR})"
    )
    p.add_argument("--download", action="store_true", help="download the dataset if it is missing (needs network)")
    numeric(p, "--train-size", DataConfig, "train_size", "use a seeded random subset of this many train images")
    numeric(p, "--test-size", DataConfig, "test_size", "use a seeded random subset of this many test images")
    numeric(p, "--image-size", DataConfig, "image_size", f"folder:PATH only: crop side (default {FOLDER_IMAGE_SIZE})")
    numeric(
        p,
        "--workers",
        DataConfig,
        "workers",
        "folder:PATH only: image decoding processes, 0 to decode in the main process "
        f"(default: one per CPU but one, at most 8; here {default_workers()})",
    )
    p.add_argument("--strict", action="store_true", help="folder:PATH only: an unreadable image is an error")


def add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        type=model_string,
        help=f"{model_names()} (default: {DEFAULT_MODEL.name} at width {DEFAULT_MODEL.width})",
    )
    numeric(
        p,
        "--width",
        ModelConfig,
        "width",
        f"width multiplier of a built-in model's layers (default: 1.0; {DEFAULT_MODEL.width} for the default model)",
    )
    p.add_argument("--weights", default=None, help="trained weights of that model: a state dict in .safetensors or .pt")


def add_user_model(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        type=model_string,
        help="for a checkpoint of user code: the module:factory that built it",
    )


def model_string(text: str) -> str:
    """The `type=` of --model: the text as given, once it names a well-formed source (one line otherwise).

    Example:
        >>> model_string("torchvision:resnet18")
        'torchvision:resnet18'
    """
    try:
        ModelSource.parse(text)
    except HybridPruneError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_train(p: argparse.ArgumentParser) -> None:
    add_model(p)
    numeric(p, "--epochs", TrainConfig, "epochs", "epochs to train the dense model")
    numeric(p, "--lr", TrainConfig, "lr", "peak learning rate of dense training (SGD)")
    numeric(p, "--batch-size", TrainConfig, "batch_size", "training batch size")


def add_precision(p: argparse.ArgumentParser) -> None:
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


def add_prune(p: argparse.ArgumentParser, metric_help: str) -> None:
    """The pruning flags of `run` and `prune`: what is removed, how accuracy recovers, how channels are chosen."""
    _add_filter_flags(p)
    _add_finetune_flags(p)
    _add_distill_flags(p)
    _add_scoring_flags(p, metric_help)
    _add_allocation_flags(p)
    numeric(
        p,
        "--target-latency",
        PruneConfig,
        "target_latency",
        "instead of --filter-ratio: keep at most this fraction of the dense model's latency measured on this device "
        "(e.g. 0.5); kept counts and 2:4 per layer come from a latency table (see --latency-*)",
    )
    p.add_argument(
        "--nm-where",
        default=None,
        choices=list(NM_WHERE),
        help="which eligible layers take 2:4 masks: all (default; the paper's pipeline), auto (only where the "
        "latency table measures 2:4 faster than dense; default with --target-latency), none (filter pruning only)",
    )
    add_latency(p)
    add_deploy(p)


def add_latency(p: argparse.ArgumentParser) -> None:
    """How latency tables are measured: runtime, batch, dtype, candidate step, a table file to reuse."""
    p.add_argument(
        "--latency-runtime",
        default=PruneConfig.latency_runtime,
        choices=list(LATENCY_RUNTIMES),
        help="runtime the latencies are measured in; auto: TensorRT on a GPU where installed, else PyTorch with "
        "CUDA graphs; ONNX Runtime on a CPU where installed, else PyTorch (default auto)",
    )
    numeric(p, "--latency-batch", PruneConfig, "latency_batch", "batch size the latencies are measured at")
    p.add_argument(
        "--latency-dtype",
        default=PruneConfig.latency_dtype,
        choices=list(LATENCY_DTYPES),
        help="precision the latencies are measured at; auto: float16 on GPUs, float32 on CPUs; on a CPU also "
        "bfloat16 (openvino, torch; CPUs with AMX or AVX512-BF16) and int8 (onnxruntime, openvino: the graph "
        "quantized, its quantize/dequantize nodes timed with it), so --target-latency is a fraction of the dense "
        "model at that precision (default auto)",
    )
    numeric(
        p,
        "--latency-step",
        PruneConfig,
        "latency_step",
        "candidate kept counts are multiples of this (default: the device's block size, where latency moves, found "
        "by a sweep in the runtime)",
    )
    numeric(
        p,
        "--latency-points",
        PruneConfig,
        "latency_points",
        "channel counts measured per dimension of a layer's grid (evenly spaced, both ends); between them the "
        "table interpolates",
    )
    p.add_argument(
        "--latency-table", default=None, help="a latency table (JSON) to reuse; only its missing entries are measured"
    )


def add_deploy(p: argparse.ArgumentParser) -> None:
    """What `--deploy` adds to every model the job builds: its deployed forms, measured in their runtimes."""
    p.add_argument(
        "--deploy",
        default="",
        help="also deploy every model the job builds (dense, 2:4-only, filter, filter+2:4) at these comma-separated "
        "targets, each a precision (fp32, bf16, int8: the runtime measured fastest on the dense model among those "
        "installed), RUNTIME:PRECISION (e.g. openvino:int8), or auto (the fastest runtime and precision that keeps "
        "the dense model within --auto-tolerance points of top-1); top-1 is measured in the runtime on the "
        "test set and latency against the dense model in ONNX Runtime fp32 (default: none)",
    )
    p.add_argument("--deploy-batch", default="64", help="batch size, or comma-separated batch sizes, the deployed "
                   "forms are timed at (the first decides a bare precision's runtime; default 64)")  # fmt: skip
    numeric(p, "--deploy-rounds", DeployConfig, "rounds", "round-robin timing rounds of the deployed forms",
            dest="deploy_rounds")  # fmt: skip
    numeric(p, "--calibration-images", DeployConfig, "calibration_images",
            "training images INT8 forms are calibrated on (seeded subset)")  # fmt: skip
    p.add_argument("--calibration-method", default=DeployConfig.calibration_method, choices=CALIBRATION_METHODS,
                   help="how INT8 ranges come from the calibration activations (default: minmax)")  # fmt: skip
    numeric(p, "--max-drop", DeployConfig, "max_drop", "INT8 forms: precision per layer, the fewest layers kept in "
            "float (by measured sensitivity per measured ms) that bring top-1 on validation images within this many "
            "points of fp32 (default: every layer INT8)")  # fmt: skip
    numeric(p, "--validation-images", DeployConfig, "validation_images",
            "training images (never test images) that --max-drop's choice is measured on")  # fmt: skip
    numeric(p, "--auto-tolerance", DeployConfig, "auto_tolerance",
            "--deploy auto: top-1 points a runtime and precision may cost the dense model")  # fmt: skip


def _add_filter_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--filter-ratio",
        type=ratio,
        default=None,
        help=f"fraction of channels removed from each channel group, in [0, 1) (default: {PruneConfig.filter_ratio})",
    )
    numeric(
        p,
        "--round-to",
        PruneConfig,
        "round_to",
        "round kept filter counts to this multiple so the next layer stays 2:4 and cuSPARSELt eligible",
    )
    p.add_argument(
        "--nm",
        default=PruneConfig.nm,
        help=f"N:M pattern, keep N of every M input-channel weights (default {PruneConfig.nm})",
    )


def _add_finetune_flags(p: argparse.ArgumentParser) -> None:
    numeric(
        p, "--finetune-epochs", DEFAULT_FINETUNE, "epochs", "epochs of each fine-tune (after filter and N:M pruning)"
    )
    numeric(p, "--finetune-lr", DEFAULT_FINETUNE, "lr", "peak learning rate of fine-tuning")
    p.add_argument(
        "--recipe",
        default="plain",
        choices=list(RECIPES),
        help="a named set of the recovery options below (plain: none of them; best: the combination measured "
        "best on CIFAR-10, see docs/results.md); options given explicitly win over the recipe's",
    )


def _add_distill_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--distill",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fine-tune pruned stages against the dense model's logits (KD)",
    )
    numeric(
        p,
        "--distill-weight",
        TrainConfig,
        "distill_weight",
        f"with --distill: weight of the KD term, rest CE (default {DISTILL_WEIGHT}, or the recipe's)",
        default=None,
    )
    numeric(p, "--distill-temperature", TrainConfig, "distill_temperature", "with --distill: softmax temperature")


def _add_scoring_flags(p: argparse.ArgumentParser, metric_help: str) -> None:
    numeric(p, "--calib-batches", PruneConfig, "calib_batches", "unlabeled batches for output_l1 scores")
    numeric(
        p, "--bn-recalib-batches", PruneConfig, "bn_recalib_batches", "batches to recalibrate BatchNorm after pruning"
    )
    p.add_argument("--metric", default=None, help=metric_help)


def _add_allocation_flags(p: argparse.ArgumentParser) -> None:
    numeric(
        p,
        "--prune-steps",
        PruneConfig,
        "steps",
        "remove the ratio in this many steps, rescoring and fine-tuning between them (same total epochs; "
        f"default {PruneConfig.steps}, or the recipe's)",
        default=None,
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
    numeric(
        p,
        "--target-macs",
        PruneConfig,
        "target_macs",
        "instead of --filter-ratio: keep this fraction of the dense model's MACs (e.g. 0.36)",
    )
    p.add_argument(
        "--ignore",
        default="",
        help="comma-separated module names whose output channels are never pruned (the head never is)",
    )
