"""hybridprune: filter pruning ranked for 2:4 sparsity, then N:M pruning, for NVIDIA sparse tensor cores.

The public API is resolved lazily: `import hybridprune` imports no torch, and `hp.build_model` imports the
module that defines it the first time it is used. The layout (see docs/architecture.md), lower
layers first; a layer imports only the layers before it:

    core          errors, registry, config, outputs, world, version: types every package may use
    data          in-memory datasets, on-disk formats, streamed image folders
    models        where networks come from, the built-in architectures, MAC and size counts
    pruning       channel groups, importance metrics, allocation, plans and history, N:M masks, permutations,
                  checkpoints (a pruned model as data)
    training      fit/evaluate with masks held, distillation, DistributedDataParallel, hold_masks for your own
                  loop, the Lightning callback
    deploy        timing, sparse kernels and the inference model, bench, ONNX export, runtimes and precisions,
                  INT8 quantization
    experiments   the staged job, grids, the experiment store, reports and plots
    cli           one module per command family

Example:
    >>> import hybridprune as hp
    >>> model = hp.build_model("alexnet", in_channels=1, width=0.125)
    >>> plan = hp.prune_filters_(model, hp.PruneConfig(metric="hybrid", filter_ratio=0.4, round_to=8), [])
    >>> masks = hp.nm_prune_(model)
    >>> all(hp.satisfies_nm(dict(model.named_modules())[n].weight) for n in masks)
    True
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from hybridprune.version import __version__ as __version__

# public name -> the module that defines it
_API = {
    "hybridprune.config": (
        "RECIPES DataConfig DeployConfig ModelConfig ModelSource NMPattern PruneConfig QuantizeConfig RunConfig "
        "TrainConfig"
    ),
    "hybridprune.errors": "HybridPruneError",
    "hybridprune.data.datasets": "load_dataset",
    "hybridprune.data.images": "Dataset ImageSet",
    "hybridprune.models.sources": "MODELS Classifier build_model model_spec",
    "hybridprune.models.counts": "model_stats",
    "hybridprune.pruning.metrics": "METRICS ScoringContext score_filters",
    "hybridprune.pruning.nm": "apply_masks_ compute_masks nm_eligibility nm_mask nm_prune_ satisfies_nm",
    "hybridprune.pruning.plan": "FilterPlan apply_filter_plan_ plan_filter_pruning",
    "hybridprune.pruning.checkpoint": "load_checkpoint load_weights_ rebuild save_checkpoint",
    "hybridprune.experiments.job": "run",
    "hybridprune.pruning.filters": "prune_filters_",
    "hybridprune.pruning.permute": "permute_for_nm_",
    "hybridprune.training.loop": "calibration_batches evaluate fit recalibrate_bn_",
    "hybridprune.training.masks": "MaskHandle hold_masks",
    "hybridprune.training.lightning": "HybridPruningCallback",  # needs the optional extra: lightning
    "hybridprune.deploy.runtimes": "RUNTIMES get_runtime",
    "hybridprune.deploy.quantize": "quantize",  # needs the optional extra: export
    "hybridprune.deploy.deployment": "Variant deploy_variants",  # needs the optional extra: export
}
_WHERE = {name: module for module, names in _API.items() for name in names.split()}
__all__ = sorted([*_WHERE, "__version__"])


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'hybridprune' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # what editors and type checkers see
    from hybridprune.config import (  # noqa: F401
        RECIPES,
        DataConfig,
        ModelConfig,
        ModelSource,
        NMPattern,
        PruneConfig,
        QuantizeConfig,
        RunConfig,
        TrainConfig,
    )
    from hybridprune.data.datasets import load_dataset  # noqa: F401
    from hybridprune.data.images import Dataset, ImageSet  # noqa: F401
    from hybridprune.deploy.quantize import quantize  # noqa: F401
    from hybridprune.deploy.runtimes import RUNTIMES, get_runtime  # noqa: F401
    from hybridprune.errors import HybridPruneError  # noqa: F401
    from hybridprune.experiments.job import run  # noqa: F401
    from hybridprune.models.counts import model_stats  # noqa: F401
    from hybridprune.models.sources import MODELS, Classifier, build_model, model_spec  # noqa: F401
    from hybridprune.pruning.checkpoint import load_checkpoint, load_weights_, rebuild, save_checkpoint  # noqa: F401
    from hybridprune.pruning.filters import prune_filters_  # noqa: F401
    from hybridprune.pruning.metrics import METRICS, ScoringContext, score_filters  # noqa: F401
    from hybridprune.pruning.nm import (  # noqa: F401
        apply_masks_,
        compute_masks,
        nm_eligibility,
        nm_mask,
        nm_prune_,
        satisfies_nm,
    )
    from hybridprune.pruning.permute import permute_for_nm_  # noqa: F401
    from hybridprune.pruning.plan import FilterPlan, apply_filter_plan_, plan_filter_pruning  # noqa: F401
    from hybridprune.training.lightning import HybridPruningCallback  # noqa: F401
    from hybridprune.training.loop import calibration_batches, evaluate, fit, recalibrate_bn_  # noqa: F401
    from hybridprune.training.masks import MaskHandle, hold_masks  # noqa: F401
