"""Optimisation loops of the online Laplace step (MATH.md §9): the MAP re-fit, in-process or on Ray Train.

The objective and the posterior update are pure math in `pipeline.bayes.online`; this package owns the
loop (`loop.run_refit`, the same code in a single process and in every Ray Train worker), the labelled
rows and their held-back split, and the Ray Train adapter (`ray_train`, imported on use so that importing
this package does not import Ray).
"""

from pipeline.train.config import RefitConfig
from pipeline.train.data import TrainData, holdout_score, split_holdout
from pipeline.train.local import refit_local
from pipeline.train.loop import Objective, RefitResult, run_refit

__all__ = [
    "Objective",
    "RefitConfig",
    "RefitResult",
    "TrainData",
    "holdout_score",
    "refit_local",
    "run_refit",
    "split_holdout",
]
