"""`bayescurate bench pipeline`: the Ray embed path against a plain single-process torch loop, in one run.

What it reports, per corpus size (JSON in `<out>/bench_pipeline.json`, a table on stdout):
- plain loop rows/s: read Parquet -> decode -> preprocess -> model, one process, torch on all cores, the
  same decode code, model, batch size and transform as the pipeline (its time split into decode and model);
- Ray `embed` (the `pipeline.flows.embed` flow) with variance and deterministic, alternating order, repeated:
  end-to-end rows/s (the job's wall time, actor start and model load included), start-up (job start to the
  first output batch on the driver), steady-state rows/s (rows after the first output batch / time from it
  to the last; shards complete in bursts, so this flatters short runs), and inside the actor the seconds of
  its setup (imports, model and posterior load), of the model forward and of the head (posterior mean +
  variance, or the plain projection);
- where the CPU went during each Ray run, in CPU seconds per role (the model actor, the read/decode task
  workers, the driver, Ray's own actors and daemons), from /proc: the reason for any gap to the plain loop;
- the peak resident memory of a run summed over the driver and every process it started (Ray's GCS,
  raylet and workers): RSS (counts the shared object store once per process that maps it) and PSS. It is
  measured in a separate run: reading /proc/<pid>/smaps_rollup of a dozen processes costs about 60 ms of
  CPU, which at 5 samples/s took a quarter of a core from the run being timed;
- Ray start-up (`ray.init`) once: a user embedding 10M images pays it once.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch

from jobs._app import ConfigCommand
from pipeline import runtime
from pipeline.artifacts.posterior import load_posterior
from pipeline.config import Config
from pipeline.data.decode import decode_batch, split_preprocess
from pipeline.flows.embed import EmbedConfig, embed
from pipeline.flows.fit import FitConfig, fit_posterior
from pipeline.flows.world import MakeWorldConfig, make_world
from pipeline.io import storage
from pipeline.runtime import Executor
from pipeline.stages.base import trace
from pipeline.stages.embed import ModelSpec


class MemorySampler:
    """Peak over time of the summed RSS and PSS (MiB) of this process and all its descendants."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.peak_rss_mb = self.peak_pss_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _family() -> list[int]:
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
                children.setdefault(ppid, []).append(int(entry.name))
        family, todo = [], [os.getpid()]
        while todo:
            pid = todo.pop()
            family.append(pid)
            todo.extend(children.get(pid, []))
        return family

    @staticmethod
    def _rss_pss_kb(pid: int) -> tuple[int, int]:
        rss = pss = 0
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1])
        except (OSError, ValueError):
            pass
        return rss, pss

    def sample(self) -> tuple[float, float]:
        sums = [self._rss_pss_kb(pid) for pid in self._family()]
        return sum(r for r, _ in sums) / 1024, sum(p for _, p in sums) / 1024

    def _run(self) -> None:
        while not self._stop.is_set():
            rss, pss = self.sample()
            self.peak_rss_mb, self.peak_pss_mb = max(self.peak_rss_mb, rss), max(self.peak_pss_mb, pss)
            time.sleep(self.interval_s)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


ROLES = ("model_actor", "tasks", "driver", "ray_actors", "ray_daemons")


def _role(pid: int, cmdline: str) -> str:
    if pid == os.getpid():
        return "driver"
    if cmdline.startswith("ray::MapWorker"):
        return "model_actor"
    if cmdline.startswith(("ray::IDLE", "ray::_map_task", "ray::ray.data", "ray::run")):
        return "tasks"  # pooled workers that run the read and decode tasks (and helper tasks)
    return "ray_actors" if cmdline.startswith("ray::") else "ray_daemons"


def cpu_by_process() -> dict[int, tuple[str, float]]:
    """{pid: (role, CPU seconds so far)} for this process and its descendants."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in MemorySampler._family():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        out[pid] = (_role(pid, cmd), (int(stat[11]) + int(stat[12])) / tick)
    return out


def cpu_delta(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds per role between two `cpu_by_process` snapshots (processes that exited meanwhile are
    missed: a worker that ran a task and died is not counted)."""
    roles = dict.fromkeys(ROLES, 0.0)
    for pid, (role, cpu) in after.items():
        roles[role] += cpu - before.get(pid, (role, 0.0))[1]
    return {k: round(v, 2) for k, v in roles.items()}


def plain_loop(
    images: str, model: ModelSpec, posterior: str, batch_size: int, variance: bool
) -> dict[str, Any]:
    """Read Parquet -> decode -> preprocess -> model (+ variance) in one process, torch on all cores.

    Same decode function and transform split as the pipeline's decode stage (bit-identical pixels), same
    model and batch size; nothing overlaps: decode and model run one after the other.
    """
    torch.set_num_threads(os.cpu_count() or 1)
    adapter = model.load()
    head = load_posterior(posterior, adapter) if variance else None
    weight = adapter.image_weight().detach()
    split = split_preprocess(adapter.preprocess)
    shape = runtime.pixel_shape(adapter.preprocess)
    start, cpu_start = time.perf_counter(), time.process_time()
    decode_s = model_s = 0.0
    rows = 0
    for path in storage.list_files(images, suffix=".parquet"):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=["image"]):
            t0 = time.perf_counter()
            decoded = decode_batch(batch.column("image").to_pylist(), adapter.preprocess, shape, split=split)
            ok = decoded.pixels[decoded.ok]
            pixels = split.finish(ok) if split is not None else torch.from_numpy(ok)  # [B, 3, H, W]
            t1 = time.perf_counter()
            with torch.inference_mode():
                feats = adapter.image_features(pixels)
                if head is not None:
                    mean, var = head.image_embeddings(feats.acts, feats.offset)
                    _ = (mean.numpy(), var.numpy())
                else:
                    mean = feats.acts @ weight.T.to(feats.acts)
                    _ = (mean if feats.offset is None else mean + feats.offset).numpy()
            model_s += time.perf_counter() - t1
            decode_s += t1 - t0
            rows += len(pixels)
    total = time.perf_counter() - start
    return {
        "cpu_s": time.process_time() - cpu_start,
        "rows": rows,
        "seconds": total,
        "rows_per_s": rows / total,
        "decode_s": decode_s,
        "model_s": model_s,
    }


def ray_embed(
    corpus: Path,
    target: Path,
    posterior: Path,
    variance: bool,
    batch_size: int,
    rows_per_shard: int,
    memory: bool = False,
) -> dict[str, Any]:
    """One `embed` job on the running Ray, traced: end-to-end, start-up, steady state, actor times, CPU per
    role; with `memory`, the peak memory too (that run's timings are perturbed by the sampling)."""
    storage.remove(str(target))
    cfg = EmbedConfig(
        images=str(corpus),
        out=str(target),
        posterior=str(posterior),
        variance=variance,
        rows_per_shard=rows_per_shard,
        batch_size=batch_size,
        tracking=False,
    )
    sampler = MemorySampler() if memory else contextlib.nullcontext()
    cpu_before = cpu_by_process()
    with sampler as mem, trace() as tr:
        summary = embed(cfg).to_json()
    cpu = cpu_delta(cpu_before, cpu_by_process())
    times = [t for t, _ in tr.arrivals]
    rows = [r for _, r in tr.arrivals]
    first, last = times[0], times[-1]
    steady_rows = sum(rows[1:])
    out = {
        "rows": summary["embedded"],
        "seconds": summary["seconds"],
        "rows_per_s": summary["embedded"] / summary["seconds"],
        "setup_s": summary["setup_s"],
        "startup_s": first - tr.started,
        "output_batches": len(rows),
        "steady_rows_per_s": steady_rows / (last - first) if last > first else float("nan"),
        # Fixed cost of the run: wall time beyond what its rows take at the steady rate (actor start, model
        # load, filling the pipeline, draining it, job bookkeeping).
        "overhead_s": summary["seconds"] - summary["embedded"] * (last - first) / steady_rows
        if last > first
        else float("nan"),
        "actor_forward_s": tr.stage_s.get("embed_forward", 0.0),
        "actor_head_s": tr.stage_s.get("embed_head", 0.0),
        # Imports, model and posterior load inside the model actor(s), summed over actors.
        "actor_setup_s": tr.stage_s.get("embed_setup", 0.0),
        "cpu_s": cpu,
    }
    if isinstance(mem, MemorySampler):
        out.update(peak_rss_mb=mem.peak_rss_mb, peak_pss_mb=mem.peak_pss_mb)
    storage.remove(str(target))
    return out


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def _spread(runs: list[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in runs]
    return (max(values) - min(values)) / statistics.median(values) if values else 0.0


def _world(work: Path, size: int) -> Path:
    corpus = work / f"world-{size}"
    if not (corpus / "classes").exists():
        make_world(MakeWorldConfig(out=str(corpus), n=size, per_file=5000))
    return corpus


class BenchPipelineConfig(Config):
    """Corpus sizes and model of the pipeline benchmark."""

    out: str  # work directory (corpora, posterior, outputs, report)
    n: tuple[int, ...] = (10000,)  # corpus sizes (repeatable: --n 10000 --n 50000)
    model: str = "bayescurate-tiny"  # model name
    pretrained: str | None = None  # weights path or tag
    batch_size: int = 256  # rows per model call
    rows_per_shard: int = 2048  # rows per shard
    num_cpus: int | None = None  # CPUs of the embedded local Ray (default: all)
    repeats: int = 2  # runs of each variant (alternating order)
    compare_max: int = 10000  # sizes above this get only the memory run (no throughput comparison)


def bench(cfg: BenchPipelineConfig) -> int:
    """Benchmark the Ray embed pipeline against a plain torch loop."""
    out, model, pretrained, batch_size = cfg.out, cfg.model, cfg.pretrained, cfg.batch_size
    rows_per_shard, repeats, compare_max, num_cpus, n = (
        cfg.rows_per_shard, cfg.repeats, cfg.compare_max, cfg.num_cpus, list(cfg.n)
    )  # fmt: skip
    work = Path(out)
    posterior = work / "posterior"
    spec = ModelSpec(model, pretrained)
    sizes = n or [10000]
    report: dict[str, Any] = {
        "model": model,
        "batch_size": batch_size,
        "rows_per_shard": rows_per_shard,
        "cpus": os.cpu_count(),
        "load_avg_start": os.getloadavg(),
        "sizes": {},
    }
    warm = _world(work, 1000)
    if not (posterior / "posterior.json").exists():
        fit_posterior(
            FitConfig(
                pairs=str(_world(work, min(sizes))), model=model, pretrained=pretrained, out=str(posterior),
                block_size=256, executor=Executor.LOCAL, tracking=False,
            )
        )  # fmt: skip
    t0 = time.perf_counter()
    with runtime.ray_session(Executor.RAY, None, num_cpus):
        report["ray_init_s"] = time.perf_counter() - t0
        # Cold run: fresh worker processes import torch; later runs reuse them (the actor still starts anew).
        report["cold_run_1k"] = ray_embed(
            warm, work / "emb-warm", posterior, True, batch_size, rows_per_shard
        )
        for size in sizes:
            corpus = _world(work, size)
            entry: dict[str, Any] = {}
            if size <= compare_max:
                plain: list[dict[str, Any]] = []
                runs: dict[str, list[dict[str, Any]]] = {"ray_bayes": [], "ray_deterministic": []}
                for i in range(repeats):
                    order = [True, False] if i % 2 == 0 else [False, True]
                    for variance in order:
                        name = "ray_bayes" if variance else "ray_deterministic"
                        runs[name].append(
                            ray_embed(corpus, work / "emb", posterior, variance, batch_size, rows_per_shard)
                        )
                    plain.append(plain_loop(str(corpus), spec, str(posterior), batch_size, variance=False))
                entry.update(runs)
                entry["plain"] = plain
                p = _median(plain, "rows_per_s")
                b, d = runs["ray_bayes"], runs["ray_deterministic"]
                entry["summary"] = {
                    "plain_rows_per_s": p,
                    "ray_rows_per_s": _median(b, "rows_per_s"),
                    "ray_steady_rows_per_s": _median(b, "steady_rows_per_s"),
                    "ratio_end_to_end": _median(b, "rows_per_s") / p,
                    "ratio_steady": _median(b, "steady_rows_per_s") / p,
                    "startup_s": _median(b, "startup_s"),
                    "overhead_s": _median(b, "overhead_s"),
                    "bayes_overhead_end_to_end": _median(b, "seconds") / _median(d, "seconds") - 1,
                    "bayes_overhead_steady": _median(d, "steady_rows_per_s") / _median(b, "steady_rows_per_s")
                    - 1,
                    "variance_share_in_actor": (_median(b, "actor_head_s") - _median(d, "actor_head_s"))
                    / _median(d, "actor_forward_s"),
                    "actor_forward_s": _median(b, "actor_forward_s"),
                    "actor_setup_s": _median(b, "actor_setup_s"),
                    "plain_model_s": _median(plain, "model_s"),
                    "plain_decode_s": _median(plain, "decode_s"),
                    "plain_cpu_s": _median(plain, "cpu_s"),
                    "ray_cpu_s": {role: statistics.median(r["cpu_s"][role] for r in b) for role in ROLES},
                    "spread_ray_bayes_seconds": _spread(b, "seconds"),
                    "spread_plain_seconds": _spread(plain, "seconds"),
                }
            # Memory in a run of its own (sampling /proc costs CPU; see the module docstring).
            mem = ray_embed(corpus, work / "emb", posterior, True, batch_size, rows_per_shard, memory=True)
            entry["memory_run"] = mem
            entry["peak_rss_mb"], entry["peak_pss_mb"] = mem["peak_rss_mb"], mem["peak_pss_mb"]
            report["sizes"][str(size)] = entry
            print(json.dumps({str(size): entry.get("summary", entry)}, indent=2, default=float))
    report["load_avg_end"] = os.getloadavg()
    storage.write_json(work / "bench_pipeline.json", json.loads(json.dumps(report, default=float)))
    return 0


CONFIG = BenchPipelineConfig
main = ConfigCommand(BenchPipelineConfig, bench, "bayescurate bench pipeline")


if __name__ == "__main__":
    raise SystemExit(main())
