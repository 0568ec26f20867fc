"""The one optimisation loop of a MAP re-fit (MATH.md §9), run in-process and inside every Ray Train worker.

Full-batch Adam on `Y`, with `P = P̂ + V (S ⊙ Y) Uᵀ`: the prior's whitened coordinates (`Whitening`,
`P = P̂ + Λ^{-1/2}[Z]`) taken in the eigenbases `U` of `A` and `V` of `B`, `Y = Vᵀ Z U`. There the prior
term is `½‖Y‖²` and its curvature the identity, so one learning rate (in prior standard deviations) suits
any model, and a strong prior (the usual case: pretraining statistics of many more samples than labels)
makes the problem nearly perfectly conditioned. `EigenFrame` evaluates the data term without ever forming
`P`, so a step costs O(n·D·d) for n labelled rows rather than O(D·d·(D + d)).

Each worker evaluates the two terms on its own rows (the prior term on rank 0 only, so it is counted once)
and the loss and gradient are summed over workers before the step: every worker then holds the full-batch
gradient and takes the same step as a single process would. Every decision (evaluate, stop) is made by
rank 0 from summed values and broadcast, so the workers cannot disagree on when to stop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from pipeline.bayes.kron import KronPosterior
from pipeline.bayes.online import Whitening, check_labelled, data_nll
from pipeline.train.config import RefitConfig
from pipeline.train.data import TrainData

Record = dict[str, float | int | None]  # one evaluation: step, train_loss, val_nll, grad_max, lr


class Collective(Protocol):
    """The two collectives the loop needs; a single process is the trivial group."""

    rank: int

    def all_sum(self, t: Tensor) -> Tensor:
        """`t` summed over all workers (every worker gets the same tensor)."""
        ...

    def broadcast(self, t: Tensor) -> Tensor:
        """Rank 0's `t` on every worker."""
        ...


class SingleProcess:
    """The group of one: sums and broadcasts are the identity."""

    rank = 0

    def all_sum(self, t: Tensor) -> Tensor:
        return t

    def broadcast(self, t: Tensor) -> Tensor:
        return t


@dataclass(frozen=True)
class Objective:
    """What a round minimises: `refit_loss` with the prior `prior`, class text means `text_mean` [C, D],
    logit scale `scale` and bias `bias` (MATH §9)."""

    prior: KronPosterior
    text_mean: Tensor
    scale: float
    bias: float = 0.0

    def check(self, rows: TrainData) -> None:
        """Raise ValueError unless `rows` fit the prior's projection and the classes."""
        check_labelled(rows.acts, rows.labels, self.text_mean, rows.offsets, self.prior.weight)

    def to(self, device: torch.device) -> Objective:
        """The objective with its tensors in float64 on `device`; the prior keeps its eigendecomposition."""
        p = self.prior
        if p.weight.device != device or p.weight.dtype != torch.float64:
            p = p.to(torch.float64, device)
        text = self.text_mean.to(device=device, dtype=torch.float64)
        return Objective(p, text, float(self.scale), float(self.bias))


@dataclass(frozen=True)
class EigenFrame:
    """The objective in the loop's coordinates `Y` [D, d], where `P = P̂ + V (S ⊙ Y) Uᵀ` (module docstring).

    `U`, `V` are orthogonal, so norms and inner products survive them:
    `cos(P a + o, h) = cos((S ⊙ Y) Uᵀ a + Vᵀ(P̂ a + o), Vᵀ h)`. The data term is therefore `data_nll` of the
    matrix `S ⊙ Y` on rows `Uᵀ a_i`, with offsets `Vᵀ(P̂ a_i + o_i)` and text means `Vᵀ h_c` (`rows`, made
    once per run), and the prior term is `½‖Y‖²_F`. Both equal the terms of `refit_loss` (`data_nll`,
    `prior_penalty`) at `weight(Y)` up to rounding (tested).
    """

    objective: Objective
    whiten: Whitening
    text: Tensor  # [C, D], rows `Vᵀ h_c`

    @classmethod
    def of(cls, objective: Objective) -> EigenFrame:
        """The frame of `objective`'s prior, in float64 on the prior's weight's device.

        Unlike `Whitening` as an operator, the coordinates `Y` depend on the signs and order of the
        eigenvectors `eigh` returns, which may differ between devices or libraries. No worker decomposes:
        the frame is the prior's cached eigendecomposition, which every worker receives with the prior
        (pickled from the driver by `refit_ray`, moved by `Objective.to`), so all sum their gradients in
        the driver's coordinates.
        """
        whiten = Whitening.of(objective.prior).to(torch.float64, objective.prior.weight.device)
        return cls(objective, whiten, objective.text_mean @ whiten.V)

    def rows(self, data: TrainData) -> TrainData:
        """`data` in the frame: activations `Uᵀ a_i` [n, d], offsets `Vᵀ(P̂ a_i + o_i)` [n, D]."""
        base = data.acts @ self.objective.prior.weight.T  # [n, D]
        if data.offsets is not None:
            base = base + data.offsets
        return TrainData(data.acts @ self.whiten.U, data.labels, base @ self.whiten.V, data.sample_ids)

    def data_term(self, y: Tensor, rows: TrainData) -> Tensor:
        """`Σ_i CE(s · cos(P a_i + o_i, h_c) + b, y_i)` at `P = weight(y)`, on rows made by `rows`."""
        o = self.objective
        return data_nll(self.whiten.S * y, self.text, rows.acts, rows.labels, o.scale, o.bias, rows.offsets)

    @staticmethod
    def prior_term(y: Tensor) -> Tensor:
        """`½ vec(P − P̂)ᵀ Λ_prev vec(P − P̂)` at `P = weight(y)`: `½‖Y‖²_F`, scalar."""
        return 0.5 * (y * y).sum()

    def weight(self, y: Tensor) -> Tensor:
        """`P = P̂ + V (S ⊙ Y) Uᵀ` [D, d]."""
        w = self.whiten
        return self.objective.prior.weight + w.V @ (w.S * y) @ w.U.T


@dataclass
class RefitResult:
    """Outcome of a re-fit.

    weight: [D, d] float64, the new MAP `P*` (the best held-back weights when early stopping is on);
    history: one record per evaluation (step, train_loss = full objective, val_nll = mean held-back NLL
    or None, grad_max = max |∂loss/∂Y|, lr); best_step: the step `weight` comes from; steps_run: Adam
    steps taken; stopped_early: patience ran out; converged: the gradient tolerance was met; seconds:
    wall time (for Ray, of the whole run seen from the driver, start-up included).
    """

    weight: Tensor
    history: list[Record] = field(default_factory=list)
    best_step: int = 0
    steps_run: int = 0
    stopped_early: bool = False
    converged: bool = False
    seconds: float = 0.0


class Adam:
    """Adam (Kingma & Ba, 2015) on one tensor, computed as `torch.optim.Adam` with its defaults computes it.

    Written out because `torch.optim` imports `torch._dynamo` on first use (seconds per process, paid by
    every `campaign step`), and because the update is then visibly the same on every worker.
    """

    def __init__(self, like: Tensor, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.m = torch.zeros_like(like)
        self.v = torch.zeros_like(like)
        self.betas, self.eps, self.t = betas, eps, 0

    @torch.no_grad()
    def step(self, param: Tensor, grad: Tensor, lr: float) -> None:
        """`param -= lr · m̂ / (√v̂ + eps)` with bias-corrected moments, in place."""
        b1, b2 = self.betas
        self.t += 1
        self.m.mul_(b1).add_(grad, alpha=1 - b1)
        self.v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        correction1 = 1 - b1**self.t
        correction2 = 1 - b2**self.t
        denom = (self.v.sqrt() / math.sqrt(correction2)).add_(self.eps)
        param.addcdiv_(self.m, denom, value=-lr / correction1)


@dataclass
class _Evaluations:
    """What the evaluations of a run decide: its history, the best held-back NLL and the weights it came
    from, and when to stop (every worker holds one; the stop flags are rank 0's, broadcast)."""

    best_weight: Tensor  # [D, d], `P̂` until a held-back gain
    early: bool  # early stopping applies: patience is set and there are held-back rows
    history: list[Record] = field(default_factory=list)
    best_val: float = math.inf
    best_step: int = 0
    since_best: int = 0
    converged: bool = False
    stopped_early: bool = False

    def observe(self, record: Record, weight: Callable[[], Tensor], cfg: RefitConfig) -> bool:
        """Keep `record`, and the weights (`weight()`) when its held-back NLL gains more than `min_delta`;
        whether this worker would stop (gradient tolerance met, patience run out, or the last step)."""
        self.history.append(record)
        val = record["val_nll"]
        if val is not None and float(val) < self.best_val - cfg.min_delta:
            self.best_val, self.best_step, self.since_best = float(val), int(record["step"] or 0), 0
            self.best_weight = weight()
        else:
            self.since_best += 1
        self.converged = float(record["grad_max"]) <= cfg.tolerance  # type: ignore[arg-type]
        self.stopped_early = self.early and self.since_best >= (cfg.patience or 0)
        return self.converged or self.stopped_early or int(record["step"] or 0) >= cfg.max_steps

    def agree(self, done: bool, comm: Collective, device: torch.device) -> bool:
        """Rank 0's decision on every worker (so none stops alone); whether to stop."""
        flags = torch.tensor([done, self.converged, self.stopped_early], dtype=torch.float64, device=device)
        done, self.converged, self.stopped_early = (bool(f) for f in comm.broadcast(flags))
        return done


def _full_batch_gradient(
    frame: EigenFrame, y: Tensor, train: TrainData, comm: Collective
) -> tuple[Tensor, Tensor]:
    """The full objective (scalar) and its gradient ∂loss/∂Y [D, d], both summed over workers: the data
    term of every worker's rows, the prior term once (on rank 0)."""
    loss = frame.data_term(y, train)
    if comm.rank == 0:
        loss = loss + frame.prior_term(y)
    (grad,) = torch.autograd.grad(loss, y)
    summed = comm.all_sum(torch.cat([loss.detach().reshape(1), grad.reshape(-1)]))
    return summed[0], summed[1:].view_as(y)


def _held_back_nll(
    frame: EigenFrame, y: Tensor, held: TrainData, n_held: int, comm: Collective
) -> Tensor | None:
    """The mean held-back NLL at `y` over every worker's held-back rows (None: there are none)."""
    if not n_held:
        return None
    with torch.no_grad():
        return comm.all_sum(frame.data_term(y, held).reshape(1)) / n_held


def run_refit(
    objective: Objective,
    train: TrainData,
    held: TrainData,
    cfg: RefitConfig,
    comm: Collective | None = None,
    *,
    device: torch.device | str = "cpu",
    on_eval: Callable[[Record], None] | None = None,
) -> RefitResult:
    """Minimise the round's objective from `P̂` with full-batch Adam (module docstring).

    train, held: this worker's rows (all rows in a single process; any of them may be empty). At every
    `cfg.eval_every`-th step and at the last one: the mean held-back NLL is evaluated, the best weights
    kept (a gain must exceed `cfg.min_delta`), and the run stops when the gradient tolerance is met,
    `cfg.patience` evaluations passed without a gain (only when there are held-back rows), or
    `cfg.max_steps` is reached. `on_eval` receives each evaluation's record on every worker.
    Every worker must be given the same `objective` (one posterior object, shared or unpickled, not one
    rebuilt per worker from the factors): its eigenbases are the coordinates the gradients are summed in.
    """
    start = time.perf_counter()
    comm = comm or SingleProcess()
    device = torch.device(device)
    objective.check(train)
    objective.check(held)
    obj = objective.to(device)
    frame = EigenFrame.of(obj)
    train, held = frame.rows(train.to(device)), frame.rows(held.to(device))
    p_hat = obj.prior.weight  # [D, d]

    counts = comm.all_sum(torch.tensor([len(train), len(held)], dtype=torch.float64, device=device))
    n_held = int(counts[1])
    evals = _Evaluations(p_hat.clone(), early=cfg.patience is not None and n_held > 0)

    y = torch.zeros_like(p_hat, requires_grad=True)  # whitened offset from P̂ in the eigenbases   [D, d]
    opt = Adam(y)
    step = 0
    while True:
        loss, grad = _full_batch_gradient(frame, y, train, comm)  # full-batch ∂loss/∂Y   [D, d]
        if step % cfg.eval_every == 0 or step >= cfg.max_steps:
            val = _held_back_nll(frame, y, held, n_held, comm)
            record: Record = {
                "step": step,
                "train_loss": float(loss),
                "val_nll": None if val is None else float(val),
                "grad_max": float(grad.abs().max()),
                "lr": cfg.lr_at(step),
            }
            done = evals.agree(evals.observe(record, lambda: frame.weight(y.detach()), cfg), comm, device)
            if on_eval is not None:
                on_eval(record)
            if done:
                break

        opt.step(y, grad, cfg.lr_at(step))
        step += 1

    best_step, best_weight = evals.best_step, evals.best_weight
    if not evals.early:
        best_step, best_weight = step, frame.weight(y.detach())
    return RefitResult(
        weight=best_weight.cpu(),
        history=evals.history,
        best_step=best_step,
        steps_run=step,
        stopped_early=evals.stopped_early,
        converged=evals.converged,
        seconds=time.perf_counter() - start,
    )
