"""Settings of one MAP re-fit (MATH.md §9): full-batch Adam in the prior's whitened coordinates."""

from __future__ import annotations

import math

from pydantic import Field

from pipeline.config import Config


class RefitConfig(Config):
    """How `refit_local` / `refit_ray` minimise the round's objective, and when they stop.

    Parameters are `P = P̂ + V (S ⊙ Y) Uᵀ`, the prior's whitened coordinates in its eigenbases
    (`pipeline.train.loop`, `pipeline.bayes.online.Whitening`), so `lr` is in prior standard deviations
    whatever the scale of the pretrained weights; the prior term is `½‖Y‖²`.
    """

    max_steps: int = Field(1000, ge=0)  # Adam steps at most (the cosine schedule spans exactly these)
    lr: float = Field(0.1, gt=0)  # peak Adam step, in prior standard deviations
    final_lr: float = Field(0.0, ge=0, le=1)  # learning rate at max_steps, as a fraction of lr (cosine decay)
    eval_every: int = Field(10, ge=1)  # steps between evaluations (held-back NLL, stop tests, reports)
    holdout: float = Field(0.1, ge=0, le=0.5)  # share of labelled rows held back for early stopping
    min_holdout: int = Field(20, ge=1)  # fewer held-back rows than this: no early stopping, all rows train
    patience: int | None = Field(5, ge=1)  # evaluations without a held-back gain before stopping (null in
    # YAML: no early stopping)
    min_delta: float = Field(1e-4, ge=0)  # least fall of the mean held-back NLL (nats) that is a gain
    tolerance: float = Field(1e-6, ge=0)  # stop when max |∂loss/∂Y| at an evaluation is at most this
    seed: int = 0  # salt of the held-back split hash (the optimisation itself has no randomness)

    def lr_at(self, step: int) -> float:
        """Cosine schedule from `lr` at step 0 to `final_lr · lr` at `max_steps`."""
        if self.max_steps == 0:
            return self.lr
        frac = min(step, self.max_steps) / self.max_steps
        return self.lr * (self.final_lr + (1 - self.final_lr) * 0.5 * (1 + math.cos(math.pi * frac)))
