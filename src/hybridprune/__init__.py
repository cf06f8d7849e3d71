"""hybridprune: filter pruning ranked for 2:4 sparsity, then N:M pruning, for NVIDIA sparse tensor cores.

Example:
    >>> import hybridprune as hp
    >>> model = hp.build_model("alexnet", in_channels=1, width=0.125)
    >>> plan = hp.prune_filters_(model, hp.PruneConfig(metric="hybrid", filter_ratio=0.4, round_to=8), [])
    >>> masks = hp.nm_prune_(model)
    >>> all(hp.satisfies_nm(dict(model.named_modules())[n].weight) for n in masks)
    True
"""

__version__ = "0.1.0"

from hybridprune.config import RECIPES, DataConfig, ModelConfig, PruneConfig, RunConfig, TrainConfig
from hybridprune.data.datasets import Dataset, ImageSet, load_dataset
from hybridprune.errors import HybridPruneError
from hybridprune.experiments.job import prune_filters_, run
from hybridprune.models.counts import model_stats
from hybridprune.models.sources import MODELS, Classifier, ModelSource, build_model, model_spec
from hybridprune.pruning.checkpoint import load_checkpoint, load_weights_, rebuild, save_checkpoint
from hybridprune.pruning.metrics import METRICS, ScoringContext, score_filters
from hybridprune.pruning.nm import (
    NMPattern,
    apply_masks_,
    compute_masks,
    nm_eligibility,
    nm_mask,
    nm_prune_,
    satisfies_nm,
)
from hybridprune.pruning.plan import FilterPlan, apply_filter_plan_, plan_filter_pruning
from hybridprune.training.loop import calibration_batches, evaluate, fit, recalibrate_bn_

__all__ = [
    "METRICS",
    "MODELS",
    "RECIPES",
    "DataConfig",
    "Dataset",
    "FilterPlan",
    "HybridPruneError",
    "ImageSet",
    "ModelConfig",
    "NMPattern",
    "PruneConfig",
    "RunConfig",
    "ScoringContext",
    "TrainConfig",
    "__version__",
    "apply_filter_plan_",
    "apply_masks_",
    "build_model",
    "Classifier",
    "ModelSource",
    "load_weights_",
    "calibration_batches",
    "compute_masks",
    "evaluate",
    "fit",
    "load_checkpoint",
    "load_dataset",
    "model_stats",
    "model_spec",
    "nm_eligibility",
    "nm_mask",
    "nm_prune_",
    "plan_filter_pruning",
    "prune_filters_",
    "rebuild",
    "recalibrate_bn_",
    "run",
    "satisfies_nm",
    "save_checkpoint",
    "score_filters",
]
