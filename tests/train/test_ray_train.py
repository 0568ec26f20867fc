"""refit_ray against refit_local: the same split, objective and loop, sharded over 2 Ray Train workers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.train import RefitConfig, refit_local
from pipeline.train.ray_train import from_arrow, to_arrow
from tests.train import problems

WEIGHT_ATOL = 1e-10  # local vs Ray: only the order of the gradient sums differs (measured ~1e-16)


def test_rows_round_trip_through_arrow() -> None:
    data = problems.labelled(n=13, offsets=True)
    back = from_arrow(to_arrow(data), problems.d, problems.D, has_offsets=True)
    assert back.sample_ids == data.sample_ids
    assert torch.equal(back.acts, data.acts) and torch.equal(back.labels, data.labels)
    assert back.offsets is not None and data.offsets is not None and torch.equal(back.offsets, data.offsets)
    empty = from_arrow(to_arrow(data.take([])), problems.d, problems.D, has_offsets=False)
    assert len(empty) == 0 and empty.offsets is None and tuple(empty.acts.shape) == (0, problems.d)


@pytest.mark.ray
@pytest.mark.slow
def test_ray_train_matches_the_local_refit(ray_session: None, tmp_path: Path) -> None:
    from pipeline.train.ray_train import refit_ray

    # The early-stopping case of test_local (weak prior, noisy labels), with SigLIP-style offsets and a
    # logit bias: both runs must stop at the same evaluation with the same weights.
    prior = problems.prior(n_pretrain=20, prior_precision=1e-2, seed=2)
    data = problems.labelled(n=40, noise=0.3, seed=2, offsets=True)
    text = problems.world(2)[1]
    cfg = RefitConfig(max_steps=400, eval_every=5, patience=3, holdout=0.2, min_holdout=1)
    local = refit_local(prior, text, problems.SCALE, -0.5, data, cfg)
    distributed = refit_ray(
        prior, text, problems.SCALE, -0.5, data, cfg, num_workers=2, storage_path=tmp_path, name="refit"
    )

    assert local.stopped_early and 0 < local.best_step < local.steps_run < cfg.max_steps
    assert (distributed.best_step, distributed.steps_run, distributed.stopped_early) == (
        local.best_step,
        local.steps_run,
        local.stopped_early,
    )
    # every row counted exactly once: the objective at P̂ is the full-data one
    assert distributed.history[0]["train_loss"] == pytest.approx(local.history[0]["train_loss"], rel=1e-13)
    assert [r["step"] for r in distributed.history] == [r["step"] for r in local.history]
    for ours, theirs in zip(distributed.history, local.history, strict=True):
        assert ours["val_nll"] == pytest.approx(theirs["val_nll"], rel=1e-10)
    assert distributed.weight.dtype == torch.float64
    torch.testing.assert_close(distributed.weight, local.weight, rtol=0, atol=WEIGHT_ATOL)
    diff = float((distributed.weight - local.weight).abs().max())
    ray_s, local_s = distributed.seconds, local.seconds
    print(f"max |P_ray - P_local| = {diff:.3g}; refit took {ray_s:.1f} s on Ray, {local_s:.2f} s locally")
