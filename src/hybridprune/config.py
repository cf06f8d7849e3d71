"""Every knob of the library, its one default and its one bound: frozen dataclasses validated at construction.

A core module: it imports no torch, so `hybridprune --help` and config validation stay cheap. The names a knob
accepts (models, metrics, datasets, allocations, precisions) are declared here too; each registry that holds
the objects behind them (`models.sources.MODELS`, `pruning.metrics.METRICS`, `data.datasets.DATASETS`) is
built from these lists, and the CLI, YAML grids and the Python API all read the bounds in `RANGES`.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar

from hybridprune.errors import HybridPruneError

# --- the names each knob accepts ----------------------------------------------------------------------
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
METRIC_NAMES = ("l1", "l2", "hybrid", "output_l1", "hybrid_output", "random", "fpgm", "taylor")
BUILTIN_MODELS = ("alexnet", "resnet20", "resnet56", "vgg16")
DATASET_NAMES = ("digits", "mnist", "fashion-mnist", "svhn", "cifar10")
DATASET_PREFIXES = ("npz:", "folder:")  # a user's file or image folder: npz:PATH, folder:PATH
ALLOCATIONS = ("uniform", "global", "sensitivity")
SENSITIVITY_PROBES = (0.2, 0.4, 0.6, 0.8)  # per-group ratios tried; the largest bounds what a group can lose
TORCHVISION_PREFIX = "torchvision:"
TIMM_PREFIX = "timm:"  # any timm model by its architecture name, built with pretrained=False (the `timm` extra)
DEFAULT_ROUND_TO = 16
ONNX_OPSET = 17
DEFAULT_DATA_DIR = Path.home() / ".cache" / "hybridprune" / "data"  # torchvision-layout datasets
FOLDER_IMAGE_SIZE = 224  # folder:PATH datasets: the side images are cropped to when no image size is given
# folder:PATH datasets: an image whose header claims more pixels is unreadable (skipped, or refused with --strict)
# and never decoded; 40 MP is 120 MB as 8-bit RGB, far above any training image, well below Pillow's own bound
# (89 MP warns, 179 MP fails), which the loader neither relies on nor changes
MAX_IMAGE_PIXELS = 40_000_000
# deployment runtimes (one object each in deploy.runtimes.RUNTIMES) and the precisions they may run a model at
RUNTIME_NAMES = ("torch", "onnxruntime", "openvino", "tensorrt")
DEPLOY_PRECISIONS = ("fp32", "bf16", "fp16", "int8")
LATENCY_RUNTIMES = ("auto", *RUNTIME_NAMES)  # auto: see deploy.runtimes.resolve_runtime
QUANT_RUNTIMES = ("onnxruntime", "openvino")  # where an INT8 QDQ file is measured (tensorrt: build-only here)
QUANT_FORMATS = ("auto", "u8s8", "s8s8")  # activations uint8 or int8 (weights int8 symmetric); auto: measured
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
# auto: float16 on GPUs, float32 on CPUs; on a CPU bfloat16 and int8 are the runtime's precisions (the graph is fp32)
LATENCY_DTYPES = ("auto", "float32", "float16", "bfloat16", "int8")
NM_WHERE = ("all", "auto", "none")  # which eligible layers take 2:4 masks (auto: where the table says 2:4 pays)
# the allocation a latency target brings unless one is named: sensitivity kept more accuracy than global (l1
# scores) in every cell of docs/results/latency-cifar10/ (AlexNet and ResNet-20, targets 0.5 and 0.7, 3 seeds)
LATENCY_ALLOCATION = "sensitivity"
# the weight of each auxiliary classifier's loss for models that return (logits, *aux logits) in training mode
# (torchvision's GoogLeNet and Inception-v3): 0.3, as Szegedy et al. weighted GoogLeNet's (CVPR 2015)
AUX_LOSS_WEIGHT = 0.3
NM_PAYS_MARGIN = 0.05  # auto: a 2:4 entry must be at least 5% faster than the dense one to take a mask
LATENCY_TOLERANCE = 0.05  # --target-latency: a pruned model measured further off its target is solved again
LATENCY_CORRECTIONS = 3  # at most this many corrected solves
BACKENDS = ("process", "ray")  # where a grid's runs execute: a local process pool, or Ray tasks


def check_name(kind: str, name: object, valid: tuple[str, ...]) -> str:
    """`name` if it is one of `valid`, else one line listing them.

    Example:
        >>> check_name("metric", "l1", METRIC_NAMES)
        'l1'
    """
    if name not in valid:
        raise HybridPruneError(f"unknown {kind} {name!r}; valid names: {', '.join(valid)}")
    return name  # type: ignore[return-value]


def validate_ratio(ratio: float, what: str = "filter ratio") -> float:
    """`ratio` if it lies in [0, 1), else one line saying so."""
    if not (0 <= ratio < 1) or math.isnan(ratio):
        raise HybridPruneError(f"{what} {ratio} is outside [0, 1) (e.g. 0.4 removes 40% of filters)")
    return ratio


def default_workers() -> int:
    """Decoding processes of a folder:PATH dataset when none is given: one per CPU but one, at most 8.

    Example:
        >>> 1 <= default_workers() <= 8
        True
    """
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def model_names() -> str:
    """One line for --help: what --model accepts."""
    return (
        f"{', '.join(BUILTIN_MODELS)}, torchvision:NAME (e.g. torchvision:resnet18), timm:NAME (e.g. timm:resnet18) "
        "or a factory module:function"
    )


MODEL_FORMS = (
    f"{', '.join(BUILTIN_MODELS)}, torchvision:NAME (e.g. torchvision:resnet18), timm:NAME (e.g. timm:resnet18) "
    "or module.path:factory"
)
PREFIXES = {"torchvision": TORCHVISION_PREFIX, "timm": TIMM_PREFIX}  # source kind -> its --model prefix
# the only create_model arguments a timm:NAME source takes (from a grid, the Python API or a checkpoint's header):
# shape and width, numbers only; never pretrained, checkpoint_path, pretrained_cfg* or a path, so that no file can
# make the tool read or download anything
TIMM_ARGS = ("channel_multiplier", "depth_multiplier", "width_multiplier", "output_stride")


def dataset_names() -> list[str]:
    """What --dataset accepts, for --help."""
    return [*DATASET_NAMES, "npz:PATH", "folder:PATH"]


@dataclass(frozen=True)
class NMPattern:
    """Keep n of every m consecutive weights.

    Example:
        >>> NMPattern.parse("2:4")
        NMPattern(n=2, m=4)
    """

    n: int = 2
    m: int = 4

    def __post_init__(self) -> None:
        if not (0 < self.n < self.m):
            raise HybridPruneError(f"N:M pattern needs 0 < N < M, got {self.n}:{self.m} (e.g. 2:4)")

    @classmethod
    def parse(cls, text: str) -> NMPattern:
        try:
            n, m = (int(v) for v in text.split(":"))
        except ValueError:
            raise HybridPruneError(f"N:M pattern must look like 2:4, got {text!r}") from None
        return cls(n, m)

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def density(self) -> float:
        return self.n / self.m


@dataclass(frozen=True)
class ModelSource:
    """Where a network comes from: `kind` is builtin, torchvision, timm or user; `args` are its factory arguments.

    Example:
        >>> ModelSource.parse("torchvision:resnet18")
        ModelSource(kind='torchvision', name='resnet18', args={})
    """

    kind: str
    name: str
    args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        name = self.name
        if self.kind == "builtin" and name not in BUILTIN_MODELS:
            if not isinstance(name, str) or not name.strip():
                raise HybridPruneError(f"model {name!r} is empty; valid: {MODEL_FORMS}")
            raise HybridPruneError(f"unknown model {name!r}; valid names: {MODEL_FORMS}")
        module, _, factory = name.partition(":") if isinstance(name, str) else ("", "", "")
        well_formed = {
            "builtin": True,
            "torchvision": isinstance(name, str) and name.isidentifier(),
            "timm": isinstance(name, str) and name.isidentifier(),  # an architecture: no pretrained tag (.a1_in1k)
            "user": all(part.isidentifier() for part in module.split(".")) and factory.isidentifier(),
        }
        if not well_formed.get(self.kind, False):
            shown = PREFIXES.get(self.kind, "") + str(name)
            raise HybridPruneError(f"model {shown!r} is malformed; valid: {MODEL_FORMS}")

    @classmethod
    def parse(cls, text: str, args: dict[str, Any] | None = None) -> ModelSource:
        """The source a --model string names; a malformed one (empty, `:`, `a:`, `:b`, `a..b:f`) is one line.

        Example:
            >>> ModelSource.parse("pkg.nets:make").kind
            'user'
            >>> ModelSource.parse("pkg..nets:make")  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            hybridprune.errors.HybridPruneError: model 'pkg..nets:make' is malformed; valid: alexnet, ...
        """
        text = text.strip()
        for kind, prefix in PREFIXES.items():
            if text.startswith(prefix):
                return cls(kind, text[len(prefix) :], dict(args or {}))
        return cls("user" if ":" in text else "builtin", text, dict(args or {}))

    @property
    def label(self) -> str:
        return PREFIXES.get(self.kind, "") + self.name

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- the configs ---------------------------------------------------------------------------------------
_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "None": (type(None),)}


class _CheckedConfig:
    """The base of every config: checks each field's type and bound at construction (`_check_fields`) and
    converts to and from plain dicts. `RANGES` holds the inclusive (low, high) bounds of numeric fields: a value
    outside them is bad input, whether it comes from a flag, an experiment file or the Python API."""

    RANGES: ClassVar[dict[str, tuple[float, float]]] = {}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    def _check_fields(self) -> None:
        """Every field has its declared type, floats are finite, numbers lie in RANGES."""
        for f in fields(self):  # type: ignore[arg-type]
            value, allowed = getattr(self, f.name), [a.strip() for a in str(f.type).split("|")]
            if not any(_has_type(value, a) for a in allowed):
                raise HybridPruneError(f"{_flag(f.name)} must be {' or '.join(allowed)}, got {value!r}")
            if isinstance(value, float) and not math.isfinite(value):
                raise HybridPruneError(f"{_flag(f.name)} must be a finite number, got {value}")
            low, high = self.RANGES.get(f.name, (None, None))
            if low is not None and isinstance(value, (int, float)) and not (low <= value <= high):
                raise HybridPruneError(f"{_flag(f.name)} must be in [{low:g}, {high:g}], got {value!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]):  # noqa: ANN206 - returns cls
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(values) - known)
        if unknown:
            raise HybridPruneError(
                f"unknown {cls.__name__} key(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}"
            )
        return cls(**values)


def _has_type(value: Any, name: str) -> bool:
    if name.startswith("tuple"):
        kind = int if name.startswith("tuple[int") else str
        return isinstance(value, (tuple, list)) and all(isinstance(v, kind) and not isinstance(v, bool) for v in value)
    if name not in _TYPES:
        return True  # a nested config checks itself
    return isinstance(value, _TYPES[name]) and not (isinstance(value, bool) and name in ("int", "float"))


def _flag(name: str) -> str:
    return name.replace("_", "-")


@dataclass(frozen=True)
class TrainConfig(_CheckedConfig):
    """SGD with Nesterov momentum and a warm-up then linear-decay learning rate.

    Example:
        >>> TrainConfig(epochs=2).lr
        0.05
    """

    epochs: int = 10
    lr: float = 0.05
    batch_size: int = 128
    weight_decay: float = 5e-4
    momentum: float = 0.9
    warmup: float = 0.2
    label_smoothing: float = 0.1
    augment: bool = True
    # Knowledge distillation from the dense model (Hinton et al. 2015) while fine-tuning pruned stages:
    # loss = (1 - w) * CE + w * T^2 * KL(teacher || student at temperature T); w = 0 turns it off.
    distill_weight: float = 0.0
    distill_temperature: float = 4.0
    # auto: bf16 autocast on GPUs that have it, fp16 with a gradient scaler on other GPUs, fp32 on CPUs
    precision: str = "auto"
    compile: bool = False  # torch.compile the model for training; falls back to eager, with one line, where it fails
    sync_bn: bool = False  # under torchrun on GPUs: BatchNorm statistics over every rank's batch

    RANGES: ClassVar = {
        "epochs": (0, 100_000),
        "lr": (1e-12, 100.0),
        "batch_size": (1, 65_536),
        "weight_decay": (0.0, 1.0),
        "momentum": (0.0, 0.999),
        "distill_weight": (0.0, 1.0),
        "distill_temperature": (0.05, 100.0),
    }

    def __post_init__(self) -> None:
        self._check_fields()
        if self.precision not in PRECISIONS:
            raise HybridPruneError(f"unknown precision {self.precision!r}; valid: {', '.join(PRECISIONS)}")
        if self.epochs < 0 or self.batch_size < 1:
            raise HybridPruneError(f"epochs must be >= 0 and batch size >= 1, got {self.epochs} and {self.batch_size}")
        if self.lr <= 0 or not (0 <= self.warmup < 1) or not (0 <= self.label_smoothing < 1):
            raise HybridPruneError("lr must be > 0, warmup and label smoothing in [0, 1)")


DEFAULT_METRICS = ("l1", "output_l1", "hybrid", "hybrid_output", "random")


@dataclass(frozen=True)
class PruneConfig(_CheckedConfig):
    """How filters are chosen and removed, and the N:M pattern that follows.

    `ignore`: module names (as in `model.net.named_modules()`, or with the `net.` prefix) whose output
    channels are never pruned; the classifier head never is.
    """

    metric: str = "hybrid"
    filter_ratio: float = 0.4
    round_to: int = DEFAULT_ROUND_TO
    nm: str = "2:4"
    calib_batches: int = 4
    calib_batch_size: int = 128
    bn_recalib_batches: int = 8
    ignore: tuple[str, ...] = ()
    steps: int = 1  # remove the ratio in this many steps, rescoring and fine-tuning in between
    allocation: str = "uniform"  # uniform: the same fraction of every group; global: one ranking over all
    target_macs: float | None = None  # instead of the ratio: keep this fraction of the dense model's MACs
    permute: bool = False  # reorder channels before N:M so more weight magnitude survives (same function)
    # Instead of the ratio: keep at most this fraction of the dense model's measured latency on the device, with
    # kept counts and 2:4 chosen from a latency table (see pruning.latency and pruning.budget).
    target_latency: float | None = None
    nm_where: str | None = None  # all, auto or none; None: auto with target_latency, else all (the paper's)
    latency_runtime: str = "auto"
    latency_batch: int = 64
    latency_dtype: str = "auto"
    # candidate kept counts are multiples of this (and the group's full size); None: the device's block, which
    # `profile` finds by sweeping one layer's channel count in the runtime (pruning.latency_context)
    latency_step: int | None = None
    latency_points: int = 9  # counts measured per dimension of a layer's grid; the others are interpolated
    latency_table: str | None = None  # a table file to reuse; only missing entries are measured

    RANGES: ClassVar = {
        "target_latency": (0.05, 1.0),
        "latency_batch": (1, 65_536),
        "latency_step": (1, 4096),
        "latency_points": (2, 1024),
        "round_to": (1, 4096),
        "calib_batches": (1, 10_000),
        "calib_batch_size": (1, 65_536),
        "bn_recalib_batches": (0, 10_000),
        "steps": (1, 20),
        "target_macs": (0.01, 1.0),
    }

    def __post_init__(self) -> None:
        self._check_fields()
        if self.allocation not in ALLOCATIONS:
            raise HybridPruneError(f"unknown allocation {self.allocation!r}; valid: {', '.join(ALLOCATIONS)}")
        if self.allocation == "sensitivity" and self.target_macs is None and self.filter_ratio > SENSITIVITY_PROBES[-1]:
            raise HybridPruneError(
                f"--allocation sensitivity prunes a group by at most {SENSITIVITY_PROBES[-1]:g} (its largest probe), "
                f"so it cannot remove {self.filter_ratio:g} of all channels; use a ratio up to that, or uniform/global"
            )
        object.__setattr__(self, "ignore", tuple(self.ignore))
        if not all(isinstance(n, str) and n.strip() for n in self.ignore):
            raise HybridPruneError(f"ignore must list module names, got {list(self.ignore)}")

        check_name("metric", self.metric, METRIC_NAMES)
        self._check_latency()
        validate_ratio(self.filter_ratio)
        NMPattern.parse(self.nm)
        if self.round_to < 1 or self.calib_batches < 1 or self.calib_batch_size < 1 or self.bn_recalib_batches < 0:
            raise HybridPruneError("round-to, calibration batches and batch size must be positive")

    def _check_latency(self) -> None:
        check_name("latency runtime", self.latency_runtime, LATENCY_RUNTIMES)
        check_name("latency dtype", self.latency_dtype, LATENCY_DTYPES)
        if self.nm_where is not None:
            check_name("--nm-where choice", self.nm_where, NM_WHERE)
        if self.target_latency is None:
            return
        if self.target_macs is not None:
            raise HybridPruneError("give one of --target-latency and --target-macs, not both")

    @property
    def pattern(self) -> NMPattern:
        return NMPattern.parse(self.nm)

    @property
    def nm_rule(self) -> str:
        """Which eligible layers take N:M masks: `nm_where`, or its default (auto with a latency target)."""
        return self.nm_where or ("auto" if self.target_latency is not None else "all")

    def in_force(self) -> dict[str, Any]:
        """The settings that decided this pruning, for results: `nm_where` as the rule in force, and no
        `filter_ratio` where a MAC or latency target replaced it (`to_dict` keeps both: it keys stores and resumes).

        Example:
            >>> s = PruneConfig(target_latency=0.5).in_force()
            >>> "filter_ratio" in s, s["target_latency"], s["nm_where"]
            (False, 0.5, 'auto')
        """
        settings = {**self.to_dict(), "nm_where": self.nm_rule}
        if self.target_latency is not None or self.target_macs is not None:
            settings.pop("filter_ratio")
        return settings

    def to_dict(self) -> dict[str, Any]:
        # the latency fields at their defaults are left out, so configurations from before they existed keep
        # their keys in experiment stores (a key hashes this dict)
        values = asdict(self)
        defaults = PruneConfig.__dataclass_fields__
        return {k: v for k, v in values.items() if k not in _LATENCY_FIELDS or v != defaults[k].default}


_LATENCY_FIELDS = (
    "target_latency",
    "nm_where",
    "latency_runtime",
    "latency_batch",
    "latency_dtype",
    "latency_step",
    "latency_points",
    "latency_table",
)


@dataclass(frozen=True)
class DataConfig(_CheckedConfig):
    """Which dataset, where it lives, and optional seeded subsets (for quick runs on a CPU)."""

    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    train_size: int | None = None
    test_size: int | None = None
    image_size: int | None = None  # class folders only: the side images are cropped to (default 224)
    workers: int | None = None  # class folders only: decoding processes (default: from the CPU count)
    strict: bool = False  # class folders only: an undecodable file is an error, not skipped

    RANGES: ClassVar = {"train_size": (1, 10**9), "test_size": (1, 10**9), "image_size": (8, 4096), "workers": (0, 256)}

    def __post_init__(self) -> None:
        self._check_fields()
        if not self.dataset.startswith(DATASET_PREFIXES):
            check_name("dataset", self.dataset, DATASET_NAMES)
        for name in ("train_size", "test_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise HybridPruneError(f"{name.replace('_', '-')} must be a positive number of images, got {value}")


@dataclass(frozen=True)
class ModelConfig(_CheckedConfig):
    """Which network: a built-in name, `torchvision:NAME`, `timm:NAME` or a user's `module:factory` (see `models.py`);
    `width` scales a built-in model (None: its own default, 1.0); `weights` a trained state dict to start from."""

    name: str = "alexnet"
    width: float | None = None
    weights: str | None = None

    RANGES: ClassVar = {"width": (1e-6, 16.0)}

    def __post_init__(self) -> None:
        self._check_fields()
        source = ModelSource.parse(self.name)
        if self.width is not None and not (0 < self.width <= 16):
            raise HybridPruneError(f"width multiplier must be in (0, 16], got {self.width}")
        if self.width is not None and source.kind != "builtin":
            raise HybridPruneError(f"--width scales the built-in models only, not {self.name}")

    @property
    def label(self) -> str:
        return self.name if self.width is None else f"{self.name}-w{self.width:g}"


DEFAULT_FINETUNE = TrainConfig(epochs=3, lr=0.01, warmup=0.0)
DEFAULT_MODEL = ModelConfig("alexnet", 0.5)  # the job run with no --model: the paper's AlexNet at half width


@dataclass(frozen=True)
class DeployConfig(_CheckedConfig):
    """What `run --deploy` adds to every variant it builds: its deployed forms (`targets`: a precision, whose
    runtime is the one measured fastest on the dense model among those installed, or RUNTIME:PRECISION), each
    with top-1 measured in its runtime and latency measured at each of `batch_sizes` over `rounds` round-robin
    rounds; INT8 forms are calibrated as `hybridprune quantize` calibrates (activation format measured).

    Example:
        >>> DeployConfig(targets=("int8", "openvino:bf16")).batch_sizes
        (64,)
        >>> DeployConfig(targets=("int4",))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        hybridprune.errors.HybridPruneError: unknown deploy target 'int4'; valid: a precision (fp32, bf16, ...
    """

    targets: tuple[str, ...] = ()
    batch_sizes: tuple[int, ...] = (64,)  # the batches latency is measured at (the first decides a bare precision)
    rounds: int = 10  # round-robin rounds of timing, every form in each
    calibration_images: int = 256
    calibration_method: str = "minmax"
    max_drop: float | None = None  # INT8 forms: precision per layer within this drop (QuantizeConfig.max_drop)
    validation_images: int = 512
    auto_tolerance: float = 1.0  # `auto`: top-1 points a runtime and precision may cost the dense model

    RANGES: ClassVar = {"rounds": (1, 10_000), "calibration_images": (1, 1_000_000), "max_drop": (0, 100),
                        "validation_images": (1, 1_000_000), "auto_tolerance": (0, 100)}  # fmt: skip
    MAX_BATCH: ClassVar = 4096

    def __post_init__(self) -> None:
        self._check_fields()
        object.__setattr__(self, "batch_sizes", tuple(dict.fromkeys(self.batch_sizes)))
        if not self.batch_sizes or not all(1 <= b <= self.MAX_BATCH for b in self.batch_sizes):
            raise HybridPruneError(
                f"deploy batch sizes must be integers in [1, {self.MAX_BATCH}], got {list(self.batch_sizes)}"
            )
        object.__setattr__(self, "targets", tuple(dict.fromkeys(t.strip() for t in self.targets if t.strip())))
        for target in (t for t in self.targets if t != "auto"):  # auto: the fastest runtime and precision
            runtime, _, precision = target.rpartition(":")
            if precision not in DEPLOY_PRECISIONS or (runtime and runtime not in RUNTIME_NAMES):
                raise HybridPruneError(
                    f"unknown deploy target {target!r}; valid: a precision ({', '.join(DEPLOY_PRECISIONS)}), "
                    f"RUNTIME:PRECISION with a runtime of {', '.join(RUNTIME_NAMES)}, or auto"
                )
        check_name("calibration method", self.calibration_method, CALIBRATION_METHODS)


@dataclass(frozen=True)
class RunConfig(_CheckedConfig):
    """Everything `hybridprune run` needs: the dense model, the metrics to compare, fine-tuning."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=lambda: DEFAULT_MODEL)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: TrainConfig = field(default_factory=lambda: DEFAULT_FINETUNE)
    prune: PruneConfig = field(default_factory=PruneConfig)
    metrics: tuple[str, ...] = DEFAULT_METRICS
    seed: int = 0
    filter_finetune: bool = True  # fine-tune between filter pruning and N:M pruning (the paper does)
    recipe: str = "plain"  # the name of the recovery recipe these settings came from (a label only)
    deploy: DeployConfig = field(default_factory=DeployConfig)  # deployed forms of every variant (none: off)

    RANGES: ClassVar = {"seed": (0, 2**32 - 1)}

    def __post_init__(self) -> None:
        self._check_fields()
        object.__setattr__(self, "metrics", tuple(self.metrics))
        check_recipe_name(self.recipe)
        if not self.metrics:
            raise HybridPruneError("give at least one metric")
        for m in self.metrics:
            check_name("metric", m, METRIC_NAMES)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        parts = {
            "data": DataConfig,
            "model": ModelConfig,
            "train": TrainConfig,
            "finetune": TrainConfig,
            "prune": PruneConfig,
            "deploy": DeployConfig,
        }
        unknown = sorted(set(values) - set(parts) - {"metrics", "seed", "filter_finetune", "recipe"})
        if unknown:
            raise HybridPruneError(f"unknown RunConfig key(s) {', '.join(unknown)}")
        kwargs = {k: parts[k].from_dict(v) for k, v in values.items() if k in parts}
        if "metrics" in values:
            kwargs["metrics"] = tuple(values["metrics"])
        return cls(
            **kwargs,
            seed=values.get("seed", 0),
            filter_finetune=values.get("filter_finetune", True),
            recipe=values.get("recipe", "plain"),
        )

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain data; `deploy` only when it deploys something, so the keys of stores and runs
        made before deployment existed stay the same.

        Example:
            >>> "deploy" in RunConfig().to_dict(), "deploy" in RunConfig(deploy=DeployConfig(("int8",))).to_dict()
            (False, True)
        """
        values = asdict(self)
        if not self.deploy.targets:
            del values["deploy"]
        return values

    def with_recipe(self, name: str, recipe: dict[str, Any] | None = None) -> RunConfig:
        """These settings with a recipe's overrides (a named one from RECIPES, or `recipe` itself) applied.

        Example:
            >>> cfg = RunConfig().with_recipe("distill", {"finetune": {"distill_weight": 0.9}})
            >>> cfg.recipe, cfg.finetune.distill_weight, cfg.finetune.epochs
            ('distill', 0.9, 3)
        """
        recipe = check_recipe(name, RECIPES[name] if recipe is None and name in RECIPES else recipe)
        prune = PruneConfig.from_dict({**self.prune.to_dict(), **recipe.get("prune", {})})
        finetune = TrainConfig.from_dict({**self.finetune.to_dict(), **recipe.get("finetune", {})})
        return replace(self, prune=prune, finetune=finetune, recipe=name)

    def to_record(self) -> dict[str, Any]:
        """`to_dict` with the prune settings in force (`PruneConfig.in_force`): what a result records.

        Example:
            >>> RunConfig(prune=PruneConfig(target_latency=0.5)).to_record()["prune"]["nm_where"]
            'auto'
        """
        return {**self.to_dict(), "prune": self.prune.in_force()}


# Recovery recipes: named overrides of the pruning and fine-tuning settings, with the total fine-tuning
# epochs unchanged (so a recipe is compared with plain fine-tuning at the same cost in epochs). `best` is
# the combination measured best on CIFAR-10 (docs/results/recipes-cifar10/).
RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "plain": {},
    "distill": {"finetune": {"distill_weight": 0.9}},
    "steps2": {"prune": {"steps": 2}},
    "global": {"prune": {"allocation": "global"}},
    "sensitivity": {"prune": {"allocation": "sensitivity"}},
    "permute": {"prune": {"permute": True}},
    # sensitivity allocation alone: the only method that gained on both models over three seeds (ResNet-20 +3.17
    # points, AlexNet +0.32); adding distillation gained nothing more on ResNet-20 and lost 0.52 on AlexNet, and
    # distillation + global allocation + permutations gained +0.83 and lost 0.57 (docs/results/recipes-cifar10/)
    "best": {"prune": {"allocation": "sensitivity"}},
}
_RECIPE_PARTS = {"prune": PruneConfig, "finetune": TrainConfig}


def check_recipe_name(name: Any) -> str:
    if not isinstance(name, str) or not name.strip() or not all(c.isalnum() or c in "-_." for c in name):
        raise HybridPruneError(f"a recipe name must be a word of letters, digits, - _ or ., got {name!r}")
    return name


def check_recipe(name: str, recipe: Any) -> dict[str, dict[str, Any]]:
    """A recipe is a mapping with `prune` and/or `finetune` settings; the metric and ratio are not its to set."""
    check_recipe_name(name)
    if recipe is None:
        raise HybridPruneError(f"unknown recipe {name!r}; valid: {', '.join(RECIPES)}")
    if not isinstance(recipe, dict) or set(recipe) - set(_RECIPE_PARTS):
        raise HybridPruneError(f"recipe {name} must map prune and/or finetune to settings, got {recipe!r}")
    for part, settings in recipe.items():
        if not isinstance(settings, dict):
            raise HybridPruneError(f"recipe {name}: {part} must be a mapping of settings, got {settings!r}")
        bad = sorted(set(settings) & {"metric", "filter_ratio", "epochs"})
        if bad:
            raise HybridPruneError(
                f"recipe {name}: {part}.{bad[0]} is not a recipe's to set (it would change the comparison)"
            )
        _RECIPE_PARTS[part].from_dict({**_RECIPE_PARTS[part]().to_dict(), **settings})  # validates now
    return recipe


# --- the knobs of the commands that time, convert, export and run grids ----------------------------------
# Not settings of a pruning job, so no RunConfig holds them; declared here all the same, so that each flag's
# default and bound has one home, and the command builds one of these from its flags before any work.


@dataclass(frozen=True)
class BenchConfig(_CheckedConfig):
    """How `hybridprune bench` times its variants, and the input of synthetic ones.

    Example:
        >>> BenchConfig(rounds=2).calls
        5
    """

    image_size: int = 32  # synthetic variants: input height and width
    channels: int = 3  # synthetic variants: input channels
    rounds: int = 10  # round-robin rounds, each timing every variant
    calls: int = 5  # timed calls per variant per round
    threads: int | None = None  # CPU threads for torch (None: torch's choice)

    RANGES: ClassVar = {
        "image_size": (8, 4096),
        "channels": (1, 16),
        "rounds": (1, 100_000),
        "calls": (1, 100_000),
        "threads": (1, 1024),
    }

    def __post_init__(self) -> None:
        self._check_fields()


@dataclass(frozen=True)
class ConvertConfig(_CheckedConfig):
    """How `hybridprune convert` chooses each layer's kernel: measured on an input batch of `batch_size`."""

    batch_size: int = 256

    RANGES: ClassVar = {"batch_size": (1, 65_536)}

    def __post_init__(self) -> None:
        self._check_fields()


@dataclass(frozen=True)
class ExportConfig(_CheckedConfig):
    """How `hybridprune export` writes the ONNX file and how many images check it against PyTorch."""

    opset: int = ONNX_OPSET
    check_images: int = 256

    RANGES: ClassVar = {"opset": (13, 20), "check_images": (1, 100_000)}

    def __post_init__(self) -> None:
        self._check_fields()


@dataclass(frozen=True)
class QuantizeConfig(_CheckedConfig):
    """How `hybridprune quantize` makes an INT8 QDQ file: calibration images, method, activation format, and the
    runtime that will run it (where its accuracy and the `auto` format's timings are measured).

    Example:
        >>> QuantizeConfig(calibration_method="entropy").format
        'auto'
    """

    calibration_images: int = 256
    calibration_method: str = "minmax"
    format: str = "auto"
    runtime: str = "onnxruntime"
    batch_size: int = 64  # calibration and evaluation batches; also the batch the formats are timed at
    rounds: int = 10  # timed rounds per format (auto)
    opset: int = ONNX_OPSET
    # precision per layer: keep the fewest layers in float that bring top-1 on validation images (training images,
    # never the test split) within this many points of fp32 (None: every quantizable layer INT8)
    max_drop: float | None = None
    validation_images: int = 512

    RANGES: ClassVar = {
        "calibration_images": (1, 1_000_000),
        "batch_size": (1, 4096),
        "rounds": (1, 10_000),
        "opset": (13, 20),
        "max_drop": (0, 100),
        "validation_images": (1, 1_000_000),
    }

    def __post_init__(self) -> None:
        self._check_fields()
        check_name("calibration method", self.calibration_method, CALIBRATION_METHODS)
        check_name("quantization format", self.format, QUANT_FORMATS)
        check_name("runtime for an INT8 file", self.runtime, QUANT_RUNTIMES)


@dataclass(frozen=True)
class AnalysisConfig(_CheckedConfig):
    """The bound on analysis that may not end on a user's model (tracing its channel groups): seconds per stage,
    0 for none. Ten minutes by default, far beyond tracing any torchvision or timm model that can be pruned."""

    analysis_timeout: float = 600.0

    RANGES: ClassVar = {"analysis_timeout": (0, 7 * 86_400)}

    def __post_init__(self) -> None:
        self._check_fields()


@dataclass(frozen=True)
class PoolConfig(_CheckedConfig):
    """The workers that run a grid's runs (`hybridprune experiment`): how many at once, and where.

    Grid workers start at 1 (one run at a time, in this process); they are not a dataset's decoding workers
    (`DataConfig.workers`, where 0 means decoding in the main process).
    """

    workers: int = 1
    backend: str = "process"

    RANGES: ClassVar = {"workers": (1, 256)}

    def __post_init__(self) -> None:
        self._check_fields()
        check_name("backend", self.backend, BACKENDS)
