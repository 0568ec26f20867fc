"""Ray start-up and cluster sizing for the jobs.

Local by default: an embedded Ray with token auth off (`RAY_AUTH_MODE=disabled`), no dashboard, a short
temp dir under /tmp. `address` ("auto", "ray://host:10001", "host:6379") joins a cluster instead, which is
also what a job does when started by `ray job submit` (then `RAY_ADDRESS` is set and an existing connection
is reused).

Pool sizing avoids the actor-pool deadlock of small machines: every model actor pins its CPUs for the whole
run, so the pool is sized from the cluster's resources with `reserve_cpus` left for read/decode tasks.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol


class Executor(str, Enum):
    """Where a job's stages and helper tasks run."""

    RAY = "ray"
    """On Ray: an embedded local Ray by default, or the cluster of `--address` / `RAY_ADDRESS`."""
    LOCAL = "local"
    """In this process, without Ray: the single-process reference (tests, debugging, tiny inputs)."""


@dataclass(frozen=True)
class PoolPlan:
    """How the stages of a run are spread over a cluster."""

    actors: int  # model actors in the pool
    actor_cpus: float  # logical CPUs per model actor (what Ray reserves for it)
    actor_gpus: float  # GPUs per model actor (1 when the cluster has GPUs)
    device: str  # "cuda" or "cpu" for the model
    decode_cpus: float  # logical CPUs per decode task
    read_cpus: float  # logical CPUs per read task
    actor_threads: int = 1  # torch intra-op threads per model actor


def local_plan() -> PoolPlan:
    """The in-process executor: one model, torch on every core."""
    return PoolPlan(1, 1.0, 0.0, "cpu", 1.0, 1.0, actor_threads=os.cpu_count() or 1)


def default_temp_dir() -> str:
    # Ray's socket paths must stay under ~107 characters: keep the root short.
    return os.environ.get("BAYESCURATE_RAY_TMP", os.path.join(tempfile.gettempdir(), f"bcray-{os.getuid()}"))


def init_ray(address: str | None = None, num_cpus: int | None = None, temp_dir: str | None = None) -> bool:
    """Connect to (or start) Ray; returns True when this call started it (the caller then shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    quiet = {"log_to_driver": False, "logging_level": "warning"}
    if address:
        ray.init(address=address, **quiet)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            _temp_dir=temp_dir or default_temp_dir(),
            runtime_env={"env_vars": worker_env()},
            **quiet,
        )
    configure_data(progress=None)
    return True


@contextmanager
def ray_session(
    executor: Executor | str = Executor.RAY, address: str | None = None, num_cpus: int | None = None
) -> Iterator[None]:
    """Ray for the duration of the block when `executor` is ray: joined if already up (a job under
    `ray job submit`, the demo's one Ray for every step), else started and shut down on exit."""
    started = init_ray(address, num_cpus) if Executor(executor) is Executor.RAY else False
    try:
        yield
    finally:
        if started:
            import ray

            ray.shutdown()


def worker_env() -> dict[str, str]:
    """Environment of the embedded Ray's workers.

    Model actors run torch on all the cores they share with short decode tasks; with OpenMP's default
    spin-waiting the idle threads burn the cores the decode tasks need. Passive waiting made `embed` 1.3x
    faster end to end on 2 cores (bench pipeline). A user's own OMP_WAIT_POLICY wins.
    """
    return {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


def configure_data(progress: bool | None = None) -> None:
    """Ray Data settings: no bars of its own (the runner draws one for rows done/total, rate and ETA,
    `pipeline.progress.RowProgress`) unless asked, no verbose stats."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = bool(progress)
    ctx.print_on_execution_start = False
    ctx.verbose_stats_logs = False


def cluster_resources() -> dict[str, float]:
    import ray

    return {k: float(v) for k, v in ray.cluster_resources().items()}


def plan_pool(
    resources: dict[str, Any] | None = None,
    *,
    reserve_cpus: float | None = None,
    max_actors: int | None = None,
) -> PoolPlan:
    """Size the model actor pool from the cluster: one actor per GPU, else CPUs minus `reserve_cpus`
    (default: one read task plus one decode task).

    On 2 CPUs this gives one 1-CPU actor and leaves one CPU for a decode task plus reads; two 1-CPU actors
    there starve the read tasks and the run hangs.
    """
    res = resources if resources is not None else cluster_resources()
    cpus, gpus = float(res.get("CPU", 0.0)), float(res.get("GPU", 0.0))
    if cpus <= 0:
        raise ValueError(f"the Ray cluster has no CPUs ({res}); reads and decoding need at least one")
    read_cpus = 0.25
    decode_cpus = 0.75 if cpus <= 4 else 1.0
    reserve_cpus = read_cpus + decode_cpus if reserve_cpus is None else reserve_cpus
    if gpus >= 1:
        actors = int(gpus)
        spare = max(cpus - reserve_cpus, 0.0)
        actor_cpus = min(4.0, max(0.5, math.floor(spare / actors))) if spare >= 0.5 * actors else 0.25
        plan = PoolPlan(actors, actor_cpus, 1.0, "cuda", decode_cpus, read_cpus, max(1, round(actor_cpus)))
    else:
        actor_cpus = 1.0 if cpus >= 2 else 0.5
        usable = cpus - min(reserve_cpus, cpus / 2)
        actors = max(1, math.floor(usable / actor_cpus))
        # Threads share the cores among the actors, not just their reservation: decode tasks are short and
        # time-share, and one 1-thread actor on 2 cores ran its forward passes 1.5x slower (bench pipeline).
        threads = max(1, math.floor(cpus / actors))
        plan = PoolPlan(actors, actor_cpus, 0.0, "cpu", min(decode_cpus, cpus / 2), read_cpus, threads)
    if max_actors is not None:
        plan = dataclasses.replace(plan, actors=min(plan.actors, max_actors))
    return plan


def plan(executor: Executor | str) -> PoolPlan:
    """The pool plan of a run: sized from the cluster on Ray, one in-process model otherwise."""
    return plan_pool() if Executor(executor) is Executor.RAY else local_plan()


class Tasks(Protocol):
    """Helper tasks of a job (factor accumulation, reductions) on Ray or in-process."""

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Start `fn(*args)`; returns a handle for `gather`."""
        ...

    def gather(self, handles: Sequence[Any]) -> list[tuple[Any, str]]:
        """(result, node id that ran it) of every handle, in order."""
        ...

    def map(self, fn: Callable[..., Any], items: Sequence[Any]) -> list[Any]:
        """`[fn(item) for item in items]`, in parallel where possible."""
        ...


class LocalTasks:
    """Runs each task at once, in this process."""

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)

    def gather(self, handles: Sequence[Any]) -> list[tuple[Any, str]]:
        return [(h, "local") for h in handles]

    def map(self, fn: Callable[..., Any], items: Sequence[Any]) -> list[Any]:
        return [fn(item) for item in items]


class Shared(Protocol):
    """A value built once on the driver and read by every worker: `get()` returns it."""

    def get(self) -> Any: ...


@dataclass(frozen=True)
class LocalShared:
    """The value itself (in-process runs)."""

    value: Any

    def get(self) -> Any:
        return self.value


def share(executor: Executor | str, value: Any) -> Shared:
    """`value` put once where workers read it: Ray's object store, or this process."""
    if Executor(executor) is Executor.LOCAL:
        return LocalShared(value)
    from pipeline.stages.ray_adapter import RayShared

    return RayShared.put(value)


def tasks(executor: Executor | str, num_cpus: float = 0.25, *, spread: bool = False) -> Tasks:
    """Helper tasks in this process, or Ray tasks reserving `num_cpus` each: a fraction for light work
    (reductions, factor sums), a whole CPU for compute-bound work, so that no more run at once than the
    cores can hold (on 2 cores, eight quarter-CPU kNN tasks ran 4x slower than two whole-CPU ones).
    `spread`: over the cluster's nodes rather than packed onto the first (short compute-bound tasks would
    otherwise often all run where they were submitted)."""
    if Executor(executor) is Executor.LOCAL:
        return LocalTasks()
    from pipeline.stages.ray_adapter import RayTasks

    return RayTasks(num_cpus=num_cpus, spread=spread)


def run_stages(
    executor: Executor | str,
    shards: Any,
    stages: Any,
    sink: Any,
    *,
    pool_size: int = 1,
    read_cpus: float = 0.25,
    read: Any = None,
    total: int | None = None,
) -> dict[str, set[str]]:
    """Run `stages` over `shards` with the local runner or on Ray; returns {stage: nodes that ran it}.

    `read` turns shard descriptors into rows (default: the corpus reader, `ReadStage`); `total` is the rows
    it yields when it keeps only some (the progress line's total)."""
    from pipeline.stages.read import ReadStage

    read = read or ReadStage(num_cpus=read_cpus)
    if Executor(executor) is Executor.LOCAL:
        from pipeline.stages.local import run_local

        return run_local(shards, stages, sink, read=read)
    from pipeline.stages.ray_adapter import run_ray

    return run_ray(shards, stages, sink, pool_size=pool_size, read=read, total=total)


def pixel_shape(preprocess: Any) -> tuple[int, int, int]:
    """Shape [3, H, W] that `preprocess` produces (probed on a blank image)."""
    from PIL import Image

    probe = preprocess(Image.new("RGB", (64, 64)))
    return tuple(int(s) for s in probe.shape)  # type: ignore[return-value]
