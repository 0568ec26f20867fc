"""`bayescurate bench select`: greedy batch selection at ViT-B/32 sizes, the fast path against the plain loop.

On synthetic activations (d = 768 + bias, D = 512, C classes, K joint draws, Nt targets, Np candidates):
1. `select_batch` against `select_batch_reference` (full re-draw, eigh, unchunked scoring every step) in
   the same process on the same data: seconds per pick, their ratio, and whether picks and scores agree;
   then a few steps of both timed alternately (`paired_*`), whose median ratio other load cannot skew;
2. one greedy step taken apart, before and after: eigh / eigen-update, the draws, scoring, EPIG;
3. the peak resident memory of streamed `score_pool` (EPIG against the targets) at growing pool sizes.

Timings are wall-clock medians (component timings: the minimum of the repeats, to damp other load).
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any

from pydantic import Field

from jobs._app import ConfigCommand
from pipeline.config import Config, Renamed
from pipeline.io import storage


class BenchSelectConfig(Config):
    """Sizes of the greedy-selection benchmark."""

    image_width: Annotated[int, Renamed("d", lambda d: d - 1)] = 768  # image activation width without the
    # bias column, which is appended (ViT-B/32: 768; the old --d counted the bias column)
    dim: Annotated[int, Renamed("D")] = 512  # embedding dimension D
    text_width: int = 512  # text activation width
    num_classes: Annotated[int, Renamed("classes")] = 10  # class prompts C
    draws: int = 64  # joint posterior draws K
    candidates: tuple[int, ...] = (2000, 5000)  # pool sizes Np of the per-pick comparison
    num_targets: Annotated[int, Renamed("targets")] = 256  # EPIG target points Nt
    budget: int = 20  # picks of the fast path
    reference_budget: int | None = None  # picks of the plain loop, the slow one (default: --budget)
    paired_steps: int = 5  # steps timed alternately (fast step, then plain step) for a load-robust ratio
    dtypes: tuple[str, ...] = ("float64", "float32")  # dtypes of weights and activations
    damping: str = "paper"  # posterior damping (paper or exact)
    method: str = "epig"  # acquisition score (epig or bald)
    scale: float = 100.0  # logit scale s (CLIP's exp(logit_scale) at its cap)
    memory_pools: tuple[int, ...] = (10000, 40000)  # pool sizes of the streaming-memory measurement
    memory_dtype: str = "float32"  # dtype of the memory measurement
    repeats: int = 3  # repeats of each component timing (the minimum is reported)
    threads: int | None = None  # torch CPU threads (default: torch's own choice)
    seed: int = 0  # seed of the synthetic data
    quick: bool = False  # a small smoke run (tests): tiny sizes
    out: str = Field(
        "out/bench/select.json", json_schema_extra={"metavar": "FILE"}
    )  # where the JSON results are written

    @property
    def acts_width(self) -> int:
        """The image activations' width d, the bias column included."""
        return self.image_width + 1

    def effective(self) -> BenchSelectConfig:
        """The configuration actually run: `quick` shrinks everything."""
        if not self.quick:
            return self
        return self.model_copy(
            update={
                "image_width": 32,
                "dim": 16,
                "text_width": 16,
                "num_classes": 4,
                "draws": 8,
                "candidates": (300,),
                "num_targets": 20,
                "budget": 4,
                "reference_budget": None,
                "paired_steps": 2,
                "dtypes": ("float64",),
                "memory_pools": (1000, 4000),
                "repeats": 1,
            }
        )


def _dtype(name: str) -> Any:
    import torch

    dtypes = {"float64": torch.float64, "float32": torch.float32}
    if name not in dtypes:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(dtypes)}")
    return dtypes[name]


def synthetic_head(cfg: BenchSelectConfig, dtype: Any) -> Any:
    """A BayesHead with ViT-B/32-shaped random factors and weights (values do not affect timing)."""
    import torch

    from pipeline.bayes.curvature import infonce_ggn
    from pipeline.bayes.head import BayesHead
    from pipeline.bayes.kron import KronFactors, KronPosterior

    g = torch.Generator().manual_seed(cfg.seed)

    def posterior(width: int) -> KronPosterior:
        n = 4 * width
        acts = torch.randn(n, width, generator=g, dtype=torch.float64)
        acts[:, -1] = 1.0  # bias column
        emb = torch.randn(n, cfg.dim, generator=g, dtype=torch.float64)
        text = torch.randn(64, cfg.dim, generator=g, dtype=torch.float64)
        factors = KronFactors.from_batch(acts, infonce_ggn(emb, text, cfg.scale))
        weight = torch.randn(cfg.dim, width, generator=g, dtype=torch.float64) / math.sqrt(width)
        return KronPosterior(factors, weight.to(dtype), 1.0, damping=cfg.damping)

    return BayesHead(posterior(cfg.acts_width), posterior(cfg.text_width), scale=cfg.scale)


def synthetic_acts(n: int, width: int, seed: int, dtype: Any) -> Any:
    import torch

    acts = torch.randn(n, width, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    acts[:, -1] = 1.0
    return acts


def _best(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Minimum wall time of `fn()` over `repeats` calls after one untimed call, and its last result."""
    out = fn()
    times = []
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def synthetic_problem(cfg: BenchSelectConfig, dtype_name: str, n_pool: int) -> tuple[Any, Any, Any, Any]:
    """The head, pool [n_pool, d], targets [Nt, d] and class prompt activations [C, dt] every timing uses."""
    import torch

    dtype = _dtype(dtype_name)
    head = synthetic_head(cfg, dtype)
    pool = synthetic_acts(n_pool, cfg.acts_width, cfg.seed + 1, dtype)
    targets = synthetic_acts(cfg.num_targets, cfg.acts_width, cfg.seed + 2, dtype)
    text = torch.randn(cfg.num_classes, cfg.text_width, generator=torch.Generator().manual_seed(cfg.seed + 3))
    text = text.to(dtype)
    return head, pool, targets, text


def compare(cfg: BenchSelectConfig, dtype_name: str, n_pool: int) -> dict[str, Any]:
    """Fast and plain greedy selection on the same head and data: seconds per pick and agreement."""
    import torch

    from pipeline.bayes.acquisition import select_batch, select_batch_reference

    head, pool, targets, text = synthetic_problem(cfg, dtype_name, n_pool)
    ref_budget = cfg.budget if cfg.reference_budget is None else min(cfg.reference_budget, cfg.budget)
    kwargs: dict[str, Any] = {"method": cfg.method, "target_acts": targets, "k": cfg.draws}
    load_before = os.getloadavg()[0]
    with torch.inference_mode():
        start = time.perf_counter()
        fast = select_batch(
            head, pool, text, cfg.budget, generator=torch.Generator().manual_seed(0), **kwargs
        )
        t_fast = time.perf_counter() - start
        start = time.perf_counter()
        ref = select_batch_reference(
            head, pool, text, ref_budget, generator=torch.Generator().manual_seed(0), **kwargs
        )
        t_ref = time.perf_counter() - start
        paired = paired_steps(cfg, head, pool, targets=targets, text=text, steps=cfg.paired_steps)
    common = min(len(ref.indices), len(fast.indices))
    rel = [abs(a - b) / max(abs(b), 1e-300) for a, b in zip(fast.scores[:common], ref.scores, strict=False)]
    return {
        "dtype": dtype_name,
        "damping": cfg.damping,
        "method": cfg.method,
        "candidates": n_pool,
        "targets": cfg.num_targets,
        "d": cfg.acts_width,
        "D": cfg.dim,
        "K": cfg.draws,
        "C": cfg.num_classes,
        "budget": cfg.budget,
        "reference_budget": ref_budget,
        "fast_s_per_pick": t_fast / cfg.budget,
        "reference_s_per_pick": t_ref / max(ref_budget, 1),
        "speedup": (t_ref / max(ref_budget, 1)) / (t_fast / cfg.budget),
        "same_picks": fast.indices[:common] == ref.indices,
        "max_rel_score_diff": max(rel) if rel else 0.0,
        # other processes on the machine skew both timings: the 1-minute load average around the run
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        **paired,
    }


def paired_steps(
    cfg: BenchSelectConfig, head: Any, pool: Any, text: Any, targets: Any, steps: int
) -> dict[str, Any]:
    """The two greedy loops side by side, one step of each in turn, each step timed.

    The loops are the library's, a step at a time (`greedy_steps` is `select_batch`, `greedy_steps_reference`
    is `select_batch_reference`), so that a step of one is always timed next to the same step of the other:
    the median of the per-step ratios is robust to other load on the machine, which whole-loop timings are
    not. Their set-up is not timed. The picks of the two must agree.
    """
    import torch

    from pipeline.bayes.acquisition import greedy_steps, greedy_steps_reference

    kwargs: dict[str, Any] = {"method": cfg.method, "target_acts": targets, "k": cfg.draws}
    fast = greedy_steps(head, pool, text, steps, generator=torch.Generator().manual_seed(0), **kwargs)
    plain = greedy_steps_reference(
        head, pool, text, steps, generator=torch.Generator().manual_seed(0), **kwargs
    )
    fast_s, plain_s, same = [], [], True
    for _ in range(steps):
        start = time.perf_counter()
        picked_fast = next(fast)
        fast_s.append(time.perf_counter() - start)

        start = time.perf_counter()
        picked_plain = next(plain)
        plain_s.append(time.perf_counter() - start)
        same = same and picked_fast.indices == picked_plain.indices
    ratios = [p / f for p, f in zip(plain_s, fast_s, strict=True)]
    return {
        "paired_steps": steps,
        "paired_fast_s_median": statistics.median(fast_s),
        "paired_plain_s_median": statistics.median(plain_s),
        "paired_speedup_median": statistics.median(ratios),
        "paired_same_picks": same,
    }


def profile_step(cfg: BenchSelectConfig, dtype_name: str, n_pool: int) -> dict[str, float]:
    """One greedy step taken apart: the plain loop's parts (`old_*`), the fast path's (`new_*`), seconds."""
    import torch

    from pipeline.bayes.acquisition import JointDraws, condition_on_unlabelled, epig, ggn_root
    from pipeline.bayes.lowrank import eigh_rank_one_update

    head, pool, targets, text = synthetic_problem(cfg, dtype_name, n_pool)
    image, k, r = head.image, cfg.draws, cfg.repeats

    def gen() -> torch.Generator:
        return torch.Generator().manual_seed(0)

    out: dict[str, float] = {}
    with torch.inference_mode():
        a64, b64 = image.factors.A.to(torch.float64), image.factors.B.to(torch.float64)
        out["old_eigh_A"], (alpha, U) = _best(lambda: torch.linalg.eigh(a64), r)
        out["old_eigh_B"], _ = _best(lambda: torch.linalg.eigh(b64), r)
        out["old_sample_weights_image"], _ = _best(lambda: image.sample_weights(k, gen()), r)
        out["old_sample_weights_text"], _ = _best(lambda: head.text.sample_weights(k, gen()), r)
        out["old_sample_probs"], (pp, pt) = _best(
            lambda: head.sample_probs([pool, targets], text, k, gen()), r
        )
        out["old_epig"], _ = _best(lambda: epig(pp, pt, chunk_size=256), r)
        out["old_condition"], _ = _best(lambda: condition_on_unlabelled(head, pool[:1], text), r)
        out["old_step"] = sum(out[key] for key in ("old_sample_probs", "old_epig", "old_condition"))

        out["new_setup_once"], joint = _best(lambda: JointDraws(head, text, k, gen()), r)
        out["new_draws"], drawn = _best(lambda: joint.draw(image), r)
        out["new_target_probs"], _ = _best(lambda: drawn.probs(targets), r)
        out["new_epig"], _ = _best(lambda: epig(pp, pt), r)

        def scores() -> Any:
            return joint.scores(image, pool, target_acts=targets)

        out["new_scores"], _ = _best(scores, r)
        out["new_pool_probs_and_epig"] = out["new_scores"] - out["new_draws"] - out["new_target_probs"]
        out["new_eigen_update_A"], _ = _best(lambda: eigh_rank_one_update(alpha, U, pool[0]), r)
        text_mean, _ = head.text_embeddings(text)
        emb, _ = head.image_embeddings(pool[:1])
        root = ggn_root(head.likelihood, emb, text_mean, head.scale, head.bias)
        out["new_condition"], _ = _best(lambda: image.update_low_rank(pool[:1], root), r)
        out["new_step"] = out["new_scores"] + out["new_condition"]
    return out


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@contextmanager
def _peak_rss(interval_s: float = 0.002) -> Iterator[dict[str, float]]:
    """Sample this process's resident memory in a thread; yields a dict that gets `peak_mb` at exit."""
    result = {"start_mb": _rss_mb(), "peak_mb": 0.0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            result["peak_mb"] = max(result["peak_mb"], _rss_mb())
            stop.wait(interval_s)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        result["peak_mb"] = max(result["peak_mb"], _rss_mb())


def streaming_memory(cfg: BenchSelectConfig) -> list[dict[str, Any]]:
    """Peak memory of streamed EPIG scoring above the inputs, per pool size (same draws, same targets)."""
    import gc

    import torch

    from pipeline.bayes.acquisition import score_pool

    dtype = _dtype(cfg.memory_dtype)
    head = synthetic_head(cfg, dtype)
    targets = synthetic_acts(cfg.num_targets, cfg.acts_width, cfg.seed + 2, dtype)
    text = torch.randn(cfg.num_classes, cfg.text_width, generator=torch.Generator().manual_seed(cfg.seed + 3))
    text = text.to(dtype)
    rows = []
    with torch.inference_mode():
        small = synthetic_acts(64, cfg.acts_width, cfg.seed, dtype)
        score_pool(head, small, text, target_acts=targets, k=cfg.draws)  # warm-up: allocator, thread pools
        for n_pool in cfg.memory_pools:
            pool = synthetic_acts(n_pool, cfg.acts_width, cfg.seed + 1, dtype)
            gc.collect()
            start = time.perf_counter()
            with _peak_rss() as mem:
                scores = score_pool(head, pool, text, target_acts=targets, k=cfg.draws)
            rows.append(
                {
                    "pool": n_pool,
                    "dtype": cfg.memory_dtype,
                    "seconds": time.perf_counter() - start,
                    "inputs_mb": pool.numel() * pool.element_size() / 2**20,
                    "scores_mb": scores.numel() * scores.element_size() / 2**20,
                    # what the unchunked path would hold for the pool's probabilities alone
                    "unchunked_probs_mb": n_pool * cfg.draws * cfg.num_classes * pool.element_size() / 2**20,
                    "peak_above_start_mb": mem["peak_mb"] - mem["start_mb"],
                }
            )
            del pool, scores
    return rows


def _print(result: dict[str, Any]) -> None:
    print("greedy selection: fast path vs plain loop (same process, same data)")
    print(
        f"{'dtype':<8} {'Np':>6} {'Nt':>4} {'K':>3} {'fast s/pick':>12} {'plain s/pick':>13} {'speedup':>8} "
        f"{'same picks':>10} {'max rel diff':>13} {'paired':>7}"
    )
    for r in result["compare"]:
        print(
            f"{r['dtype']:<8} {r['candidates']:>6} {r['targets']:>4} {r['K']:>3} "
            f"{r['fast_s_per_pick']:>12.3f} {r['reference_s_per_pick']:>13.3f} {r['speedup']:>7.1f}x "
            f"{r['same_picks']!s:>10} {r['max_rel_score_diff']:>13.1e} {r['paired_speedup_median']:>6.1f}x"
        )
    for row in result["profile"]:
        print(f"\none step at Np={row['candidates']} ({row['dtype']}), seconds (min of repeats)")
        for key, value in row["parts"].items():
            print(f"  {key:<28} {value:8.3f}")
    print("\nstreamed EPIG scoring: peak resident memory above the start of the call")
    for r in result["memory"]:
        print(
            f"  Np={r['pool']:>7} {r['dtype']}: {r['seconds']:.1f} s, "
            f"peak +{r['peak_above_start_mb']:.0f} MB (inputs {r['inputs_mb']:.0f} MB, "
            f"unchunked probs would be {r['unchunked_probs_mb']:.0f} MB)"
        )


def run(cfg: BenchSelectConfig) -> dict[str, Any]:
    """Run the three parts, print them, write the JSON to `cfg.out`, return the results."""
    import torch

    cfg = cfg.effective()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    rows = []
    for dt in cfg.dtypes:
        for n in cfg.candidates:
            rows.append(compare(cfg, dt, n))
            r = rows[-1]
            print(
                f"[{dt} Np={n}] fast {r['fast_s_per_pick']:.3f} s/pick, "
                f"plain {r['reference_s_per_pick']:.3f} s/pick ({r['speedup']:.1f}x), "
                f"same picks: {r['same_picks']}; paired steps: {r['paired_speedup_median']:.1f}x "
                f"({r['paired_fast_s_median']:.3f} vs {r['paired_plain_s_median']:.3f} s)",
                flush=True,
            )
    profile = [
        {"dtype": dt, "candidates": cfg.candidates[0], "parts": profile_step(cfg, dt, cfg.candidates[0])}
        for dt in cfg.dtypes
    ]
    result = {
        "config": cfg.model_dump(),
        "environment": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
            "processor": platform.processor(),
        },
        "compare": rows,
        "profile": profile,
        "memory": streaming_memory(cfg),
        "median_speedup": statistics.median(r["speedup"] for r in rows),
    }
    _print(result)
    storage.write_json(cfg.out, result)
    print(f"\nwrote {cfg.out}")
    return result


def main_run(cfg: BenchSelectConfig) -> int:
    """Benchmark greedy batch selection: fast path vs the plain loop, per-step profile, streaming memory."""
    run(cfg)
    return 0


CONFIG = BenchSelectConfig
main = ConfigCommand(BenchSelectConfig, main_run, "bayescurate bench select")

if __name__ == "__main__":
    raise SystemExit(main())
