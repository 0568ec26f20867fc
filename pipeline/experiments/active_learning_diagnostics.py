"""What explains the active-learning benchmark's curves, measured on one targeted campaign's directory.

Under the starting posterior, round 0's candidates (the kNN step's share of the target domain) and their
scores by the library's own scorers (`selection.SCORERS`): EPIG with joint draws, EPIG with independent
per-logit noise and BALD, their spread, how well two seeds of each agree (Monte Carlo noise agrees with
nothing) and which domains the top scores come from. Then, per posterior (the start and each row's last
round), the image-embedding variance per pool domain and the accuracy per true class on the evaluation set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline.selection import Acquisition

SCORED = (Acquisition.EPIG, Acquisition.EPIG_INDEPENDENT, Acquisition.BALD)


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two score vectors [N] (ties broken by position)."""
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def spread(x: torch.Tensor) -> dict[str, float]:
    """Mean, sd, median, 90th percentile and maximum of scores [N]."""
    q = torch.quantile(x.double(), torch.tensor([0.5, 0.9], dtype=torch.float64))
    return {
        "mean": float(x.mean()),
        "sd": float(x.std()),
        "p50": float(q[0]),
        "p90": float(q[1]),
        "max": float(x.max()),
    }


def round0_scores(c: Any, target_domain: str, budget: int) -> dict[str, Any]:
    """Round 0's candidates of campaign `c` (a `rounds.campaign.Campaign`) and the spread, seed agreement
    and top-`budget` target share of their scores by each method of `SCORED`."""
    from pipeline.selection import SCORERS, candidate_problem, resolved_batch

    head, base = c.start_head, c.cfg.selection
    pool, targets = c.rescored(head)  # as round 0 selects
    if targets is None:
        raise ValueError(f"{c.directory} is not a targeted campaign")
    _, cand = candidate_problem(head, c.text, pool, base, targets=targets)
    domains = cand.columns["domain"]

    def scored(method: Acquisition, seed: int) -> torch.Tensor:
        """Round 0's scores of the candidates by the library's scorer of `method`, drawn with `seed`."""
        settings = base.model_copy(update={"method": method, "seed": seed})
        problem, _ = candidate_problem(head, c.text, pool, settings, targets=targets)
        return SCORERS[method](problem, resolved_batch(settings)).double()

    scores = {m.value: (scored(m, 0), scored(m, 1)) for m in SCORED}

    def top_share(s: torch.Tensor) -> float:
        top = torch.argsort(s, descending=True)[:budget].tolist()
        return sum(domains[i] == target_domain for i in top) / len(top)

    return {
        "candidates": len(cand),
        "pool": len(pool),
        "target_share_pool": sum(d == target_domain for d in pool.columns["domain"]) / len(pool),
        "target_share_candidates": sum(d == target_domain for d in domains) / len(domains),
        "scores": {
            name: {
                "spread": spread(a),
                "seed_rank_correlation": rank_correlation(a, b),
                f"target_share_top_{budget}": top_share(a),
            }
            for name, (a, b) in scores.items()
        },
        "rank_correlation_epig_joint_vs_independent": rank_correlation(
            scores["epig"][0], scores["epig-independent"][0]
        ),
    }


def posterior_effects(
    c: Any, final_posteriors: dict[str, Path], task: str
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """Per posterior (the start, then each of `final_posteriors`): the mean trace of the image-embedding
    variance per pool domain, and the Bayes accuracy per true class on the evaluation set (if any)."""
    from pipeline.rounds.evaluation import label_indices, predictives

    pool = c.pool()
    variance: dict[str, dict[str, float]] = {}
    per_class: dict[str, dict[str, float]] = {}
    all_domains = pool.columns["domain"]
    evaluation = c.eval_rows()
    classes = c.cache.classes
    truth = None if evaluation is None else label_indices(evaluation, task, classes)  # [Ne]
    for label, posterior in {"start": Path(c.cfg.posterior), **final_posteriors}.items():
        h = c.cache.head(str(posterior))
        per_row = c.rescored(h)[0].var.sum(dim=1)  # [N]
        variance[label] = {
            d: float(per_row[torch.tensor([x == d for x in all_domains])].mean())
            for d in sorted(set(all_domains))
        }
        if evaluation is not None and truth is not None:
            predicted = predictives(h, c.cache, evaluation)["Bayes"].argmax(dim=1)  # [Ne]
            per_class[label] = {
                name: float((predicted[truth == i] == i).double().mean())
                for i, name in enumerate(classes)
                if bool((truth == i).any())
            }
    return variance, per_class


def diagnostics(
    directory: Path, final_posteriors: dict[str, Path], *, target_domain: str, budget: int, task: str
) -> dict[str, Any]:
    """What explains the curves, from the targeted campaign in `directory` (module docstring):
    `round0_scores`, then `embedding_variance` and `eval_accuracy_per_class` of `posterior_effects`."""
    from pipeline.rounds.campaign import Campaign

    c = Campaign(str(directory))
    out = round0_scores(c, target_domain, budget)
    variance, per_class = posterior_effects(c, final_posteriors, task)
    out["embedding_variance"] = variance  # mean trace of the image-embedding variance per pool domain
    out["eval_accuracy_per_class"] = per_class  # Bayes accuracy per true class, first seed's last round
    return out
