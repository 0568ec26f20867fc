"""The MAP re-fit of an annotation round in this process (MATH.md §9)."""

from __future__ import annotations

import time

from torch import Tensor

from pipeline.bayes.kron import KronPosterior
from pipeline.train.config import RefitConfig
from pipeline.train.data import TrainData, split_holdout
from pipeline.train.loop import Objective, RefitResult, run_refit


def refit_local(
    prior: KronPosterior,
    text_mean: Tensor,
    scale: float,
    bias: float,
    data: TrainData,
    cfg: RefitConfig | None = None,
) -> RefitResult:
    """`P* = argmin_P refit_loss(P, prior, text_mean, data...)`, from `P̂ = prior.weight`, on the CPU.

    text_mean: class text means `h_c` [C, D]; scale `s`, bias `b`; data: all labelled rows, split into
    train and held-back rows by `split_holdout(data, cfg.holdout, cfg.seed, cfg.min_holdout)`. Returns the
    new MAP [D, d] float64 and the run's history (see `RefitResult`).
    """
    cfg = cfg or RefitConfig()
    start = time.perf_counter()
    objective = Objective(prior, text_mean, scale, bias)
    objective.check(data)  # row numbers in errors are the caller's, not the split's
    train, held = split_holdout(data, cfg.holdout, cfg.seed, cfg.min_holdout)
    result = run_refit(objective, train, held, cfg)
    result.seconds = time.perf_counter() - start
    return result
