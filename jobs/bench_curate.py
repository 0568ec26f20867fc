"""`bayescurate bench curate`: `curate` on synthetic pools at ViT-B/32 sizes, on Ray and as a plain loop.

Per row count: a synthetic world (`pipeline.experiments.synthetic_world`: d = 768 + bias, D = 512, 10
classes, the targets in the shifted region), then `curate` on the embedded Ray cluster and, for pools up to
`plain_max_rows`, the same steps in this process (`--executor local`, no Ray) on the same rows as the
baseline. Peak resident memory of the driver (this process) and of the largest Ray worker are sampled from
/proc while curate runs. Writes `results.json` under `--out`.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pyarrow.parquet as pq
from pydantic import Field
from scipy.stats import spearmanr

from jobs._app import ConfigCommand
from pipeline.config import Config, Renamed
from pipeline.experiments.synthetic_world import WorldSizes, build_world
from pipeline.flows.curate import CurateConfig, curate
from pipeline.flows.pool_engine import score_parts


class BenchCurateConfig(Config):
    """Sizes of the curation benchmark (the defaults are the reported case)."""

    out: str = Field(
        "out/bench/curate", json_schema_extra={"metavar": "DIR"}
    )  # work directory and results.json
    rows: tuple[int, ...] = (100_000, 1_000_000)  # pool sizes, each one world and one run
    num_targets: Annotated[int, Renamed("targets")] = 1000  # unlabelled target rows
    num_classes: Annotated[int, Renamed("classes")] = 10  # classes
    image_width: Annotated[int, Renamed("d")] = 768  # image activation width without the bias column, which
    # is appended
    text_width: Annotated[int, Renamed("dt")] = 512  # text activation width
    dim: int = 512  # embedding dimension D
    budget: int = 10_000  # images to choose
    method: str = "epig"  # acquisition function
    batch: str = "stochastic"  # batch mode
    draws: int = 64  # joint posterior draws
    neighbours: int = 20  # pool neighbours per target
    whole_pool: bool = False  # score every row instead of the neighbours of the targets
    plain_max_rows: int = 100_000  # the plain single-process baseline runs up to this pool size
    seed: int = 0  # synthetic data and sampling seed
    quick: bool = False  # tiny sizes for the test suite (seconds)
    human_budget: int = 100  # a campaign-sized stochastic batch on the smallest pool (0: skip)
    norm_check: bool = True  # on the smallest pool, expected-norm scores against exact-norm ones


QUICK = {"rows": (600, 1200), "num_targets": 24, "num_classes": 4, "image_width": 24, "text_width": 16}
QUICK |= {"dim": 12, "budget": 30}
QUICK |= {"draws": 8, "neighbours": 10, "plain_max_rows": 600, "human_budget": 10}


def _rss(pid: int | str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _ray_workers() -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            try:
                if (entry / "cmdline").read_bytes().startswith(b"ray::"):
                    found.append(entry.name)
            except OSError:
                continue
    return found


class _Peaks:
    """Samples the driver's and the largest Ray worker's resident memory every `every` seconds."""

    def __init__(self, every: float = 0.25) -> None:
        self.every, self.driver, self.worker = every, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.driver = max(self.driver, _rss("self"))
            self.worker = max([self.worker, *(_rss(p) for p in _ray_workers())])
            self._stop.wait(self.every)

    def __enter__(self) -> _Peaks:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _curate(
    cfg: BenchCurateConfig, world: dict[str, str], out: Path, executor: str, **selection: Any
) -> dict[str, Any]:
    settings = {
        "budget": cfg.budget, "method": cfg.method, "batch": cfg.batch, "draws": cfg.draws,
        "neighbours": cfg.neighbours, "whole_pool": cfg.whole_pool, "seed": cfg.seed,
    } | selection  # fmt: skip
    run = CurateConfig(
        pool=world["pool"], targets=world["targets"], posterior=world["posterior"], classes=world["classes"],
        out=str(out), executor=executor, tracking=False, **settings,
    )  # fmt: skip
    start = time.perf_counter()
    with _Peaks() as peaks:
        result = curate(run)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "stages": result.stages,
        "rows_per_s": result.rows / seconds,
        "candidates": result.candidates,
        "picks": result.picks,
        "peak_driver_rss_bytes": peaks.driver,
        "peak_worker_rss_bytes": peaks.worker,
        "nodes": result.nodes,
    }


def _scores(out: Path) -> dict[str, float]:
    scores: dict[str, float] = {}
    for part in score_parts(str(out)):
        table = pq.read_table(part, columns=["sample_id", "score"])
        ids, values = table.column("sample_id").to_pylist(), table.column("score").to_pylist()
        scores.update(zip(ids, values, strict=True))
    return scores


def _norm_check(cfg: BenchCurateConfig, world: dict[str, str], work: Path) -> dict[str, Any]:
    """Every candidate scored with the exact and with the expected norm (float64, top-k): Spearman rank
    correlation over all candidates and the overlap of the two `budget`-row top lists."""
    runs, scores = {}, {}
    for norm in ("exact", "expected"):
        out = work / f"norm-{norm}-{time.strftime('%Y%m%d-%H%M%S')}"
        runs[norm] = _curate(cfg, world, out, "ray", batch="top-k", norm=norm, precision="float64")
        scores[norm] = _scores(out)
    ids = sorted(scores["exact"])
    exact = np.array([scores["exact"][i] for i in ids])
    expected = np.array([scores["expected"][i] for i in ids])
    k = min(cfg.budget, len(ids))
    top = set(np.argsort(-exact, kind="stable")[:k]) & set(np.argsort(-expected, kind="stable")[:k])
    return {
        "rows": len(ids),
        "spearman": float(spearmanr(exact, expected).statistic),
        "k": k,
        "top_k_overlap": len(top) / k if k else None,
        "max_relative_difference": float(np.max(np.abs(expected - exact) / np.maximum(np.abs(exact), 1e-30))),
        "exact_score_seconds": runs["exact"]["stages"].get("score"),
        "expected_score_seconds": runs["expected"]["stages"].get("score"),
    }


def run_bench(cfg: BenchCurateConfig) -> dict[str, Any]:
    if cfg.quick:
        cfg = cfg.model_copy(update=QUICK)
    work = Path(cfg.out)
    runs = []
    for rows in cfg.rows:
        sizes = WorldSizes(
            pool=rows, targets=cfg.num_targets, classes=cfg.num_classes, d=cfg.image_width,
            dt=cfg.text_width, dim=cfg.dim, seed=cfg.seed, pairs=512 if cfg.quick else 8192,
            rows_per_file=min(50_000, max(rows // 4, 100)),
        )  # fmt: skip
        t0 = time.perf_counter()
        world = build_world(work / f"world-{rows}", sizes, images=False)
        built = time.perf_counter() - t0
        stamp = time.strftime("%Y%m%d-%H%M%S")
        entry: dict[str, Any] = {"rows": rows, "world_seconds": built}
        entry |= _curate(cfg, world, work / f"run-{rows}-ray-{stamp}", "ray")
        entry["stage_seconds"] = entry["stages"]
        entry["plain"] = None
        if rows <= cfg.plain_max_rows:
            plain = _curate(cfg, world, work / f"run-{rows}-plain-{stamp}", "local")
            entry["plain"] = plain
            entry["plain_seconds"] = plain["seconds"]
            entry["ray_over_plain"] = plain["seconds"] / entry["seconds"]
        runs.append(entry)
        print(f"{rows:>10,} rows: {entry['seconds']:.1f} s on Ray", flush=True)
        if len(runs) == 1:
            first = world
    results: dict[str, Any] = {
        "config": cfg.model_dump(mode="json"),
        "runs": runs,
        "by_rows": {str(r["rows"]): r for r in runs},
    }
    if runs and cfg.human_budget:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        human, plain = (
            _curate(cfg, first, work / f"human-{runs[0]['rows']}-{executor}-{stamp}", executor,
                    budget=cfg.human_budget, batch="stochastic")
            for executor in ("ray", "local")
        )  # fmt: skip
        results["human_batch"] = {"rows": runs[0]["rows"], "budget": cfg.human_budget} | human
        results["human_batch"] |= {"plain": plain, "plain_seconds": plain["seconds"]}
        seconds = f"{human['seconds']:.1f} s on Ray, {plain['seconds']:.1f} s plain"
        print(f"human batch of {cfg.human_budget}: {seconds}", flush=True)
    if runs and cfg.norm_check:
        results["norm_check"] = _norm_check(cfg, first, work)
        print(f"norm check: spearman {results['norm_check']['spearman']:.4f}", flush=True)
    if len(runs) >= 2:
        small, large = runs[0], runs[-1]
        results["scaling"] = {
            "rows": [small["rows"], large["rows"]],
            "time_ratio": large["seconds"] / small["seconds"],
            "rows_ratio": large["rows"] / small["rows"],
        }
    work.mkdir(parents=True, exist_ok=True)
    (work / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    return results


def run(cfg: BenchCurateConfig) -> int:
    """Time `curate` on synthetic ViT-B/32-sized pools, on Ray and as a plain single-process loop."""
    run_bench(cfg)
    print(f"results: {Path(cfg.out) / 'results.json'}")
    return 0


main = ConfigCommand(BenchCurateConfig, run, "bayescurate bench curate")

if __name__ == "__main__":
    raise SystemExit(main())
