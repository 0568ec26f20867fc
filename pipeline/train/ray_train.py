"""The MAP re-fit of an annotation round on Ray Train (MATH.md §9): `run_refit` in every worker.

The driver splits the labelled rows (`split_holdout`, the same split as `refit_local`) and hands them to
`TorchTrainer` as two Ray Datasets, "train" and "held". The objective goes to every worker pickled in
`train_loop_config`, the prior with its eigendecomposition, so no worker re-decomposes the factors and all
work in the same eigenbases (`loop.EigenFrame`). Each worker reads its shard with
`ray.train.get_dataset_shard` and runs `loop.run_refit` with `torch.distributed` as the collective: the
loss and gradient are all-reduced every step, so every worker takes the full-batch step of a single
process, and the prior term is added on rank 0 only. Rank 0's evaluation metrics are reported to Ray Train
(throttled, `_Reporter`) and, at the end, one checkpoint (the new MAP and the run's full history) that the
driver reads from `result.checkpoint`.

Ray Train's default `DataConfig` splits with `streaming_split(equal=True)`, which DROPS rows to make the
shards equal; that would change the objective, so the datasets are split with `equal=False` here (every
row goes to exactly one worker). There is no resume from a mid-run checkpoint: a re-fit is a pure function
of (prior, labels) that takes seconds, so a failed run is simply run again.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.data
import ray.train
import torch
import torch.distributed as dist
from ray.train import Checkpoint, CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer, get_device
from safetensors.torch import load_file, save_file
from torch import Tensor

from pipeline.bayes.kron import KronPosterior
from pipeline.train.config import RefitConfig
from pipeline.train.data import TrainData, split_holdout
from pipeline.train.loop import Objective, Record, RefitResult, run_refit

WEIGHT_FILE = "weight.safetensors"  # in the final checkpoint: {"weight": [D, d] float64}
RESULT_FILE = "result.json"  # in the final checkpoint: history, best_step, steps_run, flags
BLOCKS_PER_WORKER = 2  # Ray Data blocks per worker, so the dynamic split has something to balance


# -- rows as Arrow ------------------------------------------------------------------------------------
def _matrix_column(x: Tensor) -> pa.FixedSizeListArray:
    flat = pa.array(x.detach().cpu().contiguous().numpy().reshape(-1), type=pa.float64())
    return pa.FixedSizeListArray.from_arrays(flat, x.shape[1])


def to_arrow(rows: TrainData) -> pa.Table:
    """`rows` as a table: sample_id, label, acts (fixed_size_list<double>[d]) and offset when present."""
    columns: dict[str, pa.Array] = {
        "sample_id": pa.array(rows.sample_ids, type=pa.string()),
        "label": pa.array(rows.labels.cpu().numpy(), type=pa.int64()),
        "acts": _matrix_column(rows.acts),
    }
    if rows.offsets is not None:
        columns["offset"] = _matrix_column(rows.offsets)
    return pa.table(columns)


def _matrix(table: pa.Table, name: str, width: int) -> Tensor:
    values = np.asarray(table.column(name).combine_chunks().flatten(), dtype=np.float64)
    return torch.from_numpy(values.reshape(-1, width).copy())


def from_arrow(table: pa.Table, d: int, D: int, has_offsets: bool) -> TrainData:
    """The rows of a table written by `to_arrow` (any number of rows, zero included)."""
    offsets = _matrix(table, "offset", D) if has_offsets else None
    labels = torch.from_numpy(np.asarray(table.column("label"), dtype=np.int64).copy())
    ids = [str(s) for s in table.column("sample_id").to_pylist()]
    return TrainData(_matrix(table, "acts", d), labels, offsets, ids)


def _dataset(rows: TrainData, blocks: int) -> ray.data.Dataset:
    table = to_arrow(rows)
    step = max(1, -(-table.num_rows // blocks))  # ceil: at most `blocks` slices
    parts = [table.slice(lo, step) for lo in range(0, table.num_rows, step)] or [table]
    return ray.data.from_arrow(parts)


class EveryRowOnce(DataConfig):
    """Split every dataset over the workers with `streaming_split(equal=False)`: no row is dropped."""

    def configure(  # type: ignore[override]
        self,
        datasets: dict[str, ray.data.Dataset],
        world_size: int,
        worker_handles: Any,
        worker_node_ids: Any,
        **kwargs: Any,
    ) -> list[dict[str, Any]]:
        output: list[dict[str, Any]] = [{} for _ in range(world_size)]
        for name, ds in datasets.items():
            splits = ds.streaming_split(world_size, equal=False, locality_hints=worker_node_ids)
            for rank, split in enumerate(splits):
                output[rank][name] = split
        return output


# -- inside a worker ----------------------------------------------------------------------------------
class TorchDistributed:
    """The loop's collectives over the process group Ray Train set up (gloo on CPU, NCCL on GPU)."""

    def __init__(self) -> None:
        self.rank = dist.get_rank()

    def all_sum(self, t: Tensor) -> Tensor:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def broadcast(self, t: Tensor) -> Tensor:
        t = t.clone()
        dist.broadcast(t, src=0)
        return t


def _read_shard(name: str, d: int, D: int, has_offsets: bool) -> TrainData:
    shard = ray.train.get_dataset_shard(name)
    tables = [] if shard is None else list(shard.iter_batches(batch_size=None, batch_format="pyarrow"))
    tables = [t for t in tables if t.num_rows > 0]
    if not tables:
        return TrainData.empty(d, D if has_offsets else None)
    return from_arrow(pa.concat_tables(tables), d, D, has_offsets)


class _Reporter:
    """Reports evaluations to Ray Train at most every `interval_s` seconds, on every worker at once.

    `ray.train.report` is a barrier, and a worker's result queue holds one report until the controller
    polls it (every 2 s by default), so reporting every evaluation of a loop that takes milliseconds a
    step would make the run mostly waiting. Rank 0's clock decides, and the decision is broadcast, so all
    workers call `report` the same number of times.
    """

    def __init__(self, comm: TorchDistributed, device: torch.device, interval_s: float) -> None:
        self.comm, self.device, self.interval_s = comm, device, interval_s
        self.last = -math.inf
        self.reports = 0

    def __call__(self, record: Record) -> None:
        due = time.monotonic() - self.last >= self.interval_s
        if not bool(self.comm.broadcast(torch.tensor([float(due)], device=self.device))):
            return
        self.last = time.monotonic()
        self.reports += 1
        ray.train.report({k: v for k, v in record.items() if v is not None})


def _worker(config: dict[str, Any]) -> None:
    """Ray Train's `train_loop_per_worker`: read this worker's rows, run the shared loop, report."""
    objective: Objective = config["objective"]
    cfg: RefitConfig = config["cfg"]
    d, D = objective.prior.factors.d, objective.prior.factors.D
    train = _read_shard("train", d, D, config["has_offsets"])
    held = _read_shard("held", d, D, config["has_offsets"])
    comm, device = TorchDistributed(), get_device()
    reporter = _Reporter(comm, device, config["report_interval_s"])
    result = run_refit(objective, train, held, cfg, comm, device=device, on_eval=reporter)
    summary = {
        "history": result.history,
        "best_step": result.best_step,
        "steps_run": result.steps_run,
        "stopped_early": result.stopped_early,
        "converged": result.converged,
        "seconds": result.seconds,
        "reports": reporter.reports,
    }
    metrics = {"done": 1, "best_step": result.best_step, "steps_run": result.steps_run}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if comm.rank == 0:
            save_file({"weight": result.weight.contiguous()}, str(Path(tmp) / WEIGHT_FILE))
            (Path(tmp) / RESULT_FILE).write_text(json.dumps(summary))
            checkpoint = Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


# -- driver -------------------------------------------------------------------------------------------
def refit_ray(
    prior: KronPosterior,
    text_mean: Tensor,
    scale: float,
    bias: float,
    data: TrainData,
    cfg: RefitConfig | None = None,
    *,
    num_workers: int = 2,
    use_gpu: bool = False,
    storage_path: str | Path | None = None,
    name: str | None = None,
    report_interval_s: float = 10.0,
) -> RefitResult:
    """`refit_local` on Ray Train: the same split, objective and loop, the rows sharded over workers.

    Ray must be initialised by the caller. num_workers: data-parallel workers (1 CPU, or 1 GPU with `use_gpu`,
    each); storage_path: where Ray Train keeps the run and its checkpoint (shared storage on a
    multi-node cluster; Ray's default when None); name: the run's name there; report_interval_s: least
    time between two metric reports (0: every evaluation; see `_Reporter`). Returns the `RefitResult`
    read from the final checkpoint, `seconds` being the driver's wall time (start-up included).
    """
    cfg = cfg or RefitConfig()
    if not ray.is_initialized():
        raise RuntimeError("refit_ray needs a running Ray (pipeline.runtime.init_ray, or ray.init)")
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    start = time.perf_counter()
    objective = Objective(prior, text_mean, float(scale), float(bias))
    objective.check(data)  # fail here, not in a worker after start-up
    train, held = split_holdout(data, cfg.holdout, cfg.seed, cfg.min_holdout)
    blocks = num_workers * BLOCKS_PER_WORKER
    trainer = TorchTrainer(
        _worker,
        train_loop_config={
            "objective": objective,
            "cfg": cfg,
            "has_offsets": data.offsets is not None,
            "report_interval_s": float(report_interval_s),
        },
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        run_config=RunConfig(
            name=name,
            storage_path=None if storage_path is None else str(storage_path),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            failure_config=FailureConfig(max_failures=0),
        ),
        datasets={"train": _dataset(train, blocks), "held": _dataset(held, blocks)},
        dataset_config=EveryRowOnce(),
    )
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"Ray Train re-fit failed: {result.error}") from result.error
    if result.checkpoint is None:
        raise RuntimeError("Ray Train re-fit finished without a checkpoint")
    with result.checkpoint.as_directory() as folder:
        weight = load_file(str(Path(folder) / WEIGHT_FILE))["weight"]
        summary = json.loads((Path(folder) / RESULT_FILE).read_text())
    return RefitResult(
        weight=weight,
        history=summary["history"],
        best_step=summary["best_step"],
        steps_run=summary["steps_run"],
        stopped_early=summary["stopped_early"],
        converged=summary["converged"],
        seconds=time.perf_counter() - start,
    )
