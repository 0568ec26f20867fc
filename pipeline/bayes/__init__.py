"""The Bayesian core: pure tensor math of BayesVLM (no Ray, MLflow, Label Studio or network).

See ../shared/MATH.md for the specification each function docstring refers to.
"""

from pipeline.bayes.acquisition import (
    HeadDraws,
    JointDraws,
    Method,
    Selection,
    bald,
    entropy,
    epig,
    ggn_root,
    score_pool,
    select_batch,
    select_batch_reference,
)
from pipeline.bayes.contrastive import contrastive_factors
from pipeline.bayes.cosine import ProbLogits, prob_cosine
from pipeline.bayes.curvature import Likelihood, ggn, infonce_ggn, siglip_ggn
from pipeline.bayes.head import BayesHead
from pipeline.bayes.kron import Damping, KronDraws, KronFactors, KronPosterior, KronPower
from pipeline.bayes.lowrank import eigh_low_rank_update, eigh_rank_one_update
from pipeline.bayes.metrics import (
    Reliability,
    accuracy,
    auroc,
    brier,
    calibration_report,
    ece,
    nll,
    reliability,
)
from pipeline.bayes.neighbours import Metric, candidates, nearest

__all__ = [
    "BayesHead",
    "Damping",
    "HeadDraws",
    "JointDraws",
    "KronDraws",
    "KronFactors",
    "KronPosterior",
    "KronPower",
    "Likelihood",
    "Method",
    "Metric",
    "ProbLogits",
    "Reliability",
    "Selection",
    "accuracy",
    "auroc",
    "bald",
    "brier",
    "calibration_report",
    "candidates",
    "contrastive_factors",
    "ece",
    "eigh_low_rank_update",
    "eigh_rank_one_update",
    "entropy",
    "epig",
    "ggn",
    "ggn_root",
    "infonce_ggn",
    "nearest",
    "nll",
    "prob_cosine",
    "reliability",
    "score_pool",
    "select_batch",
    "select_batch_reference",
    "siglip_ggn",
]
