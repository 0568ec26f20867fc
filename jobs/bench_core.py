"""`bayescurate bench core`: the Bayesian core's speed.

1. The label-free GGN sums (`infonce_ggn`, `siglip_ggn`) against the per-sample formula that builds a
   `[B, D, D]` tensor: same result (max relative error) and the speed ratio.
2. The overhead of Bayesian image embeddings (mean and variance) over deterministic ones on the same batch,
   for the tiny model and ViT-B-32 with random weights, through `pipeline.models.adapter.load_model`.

All timings are taken in one process after a warm-up; the median of the repeats is reported.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import Field

from jobs._app import ConfigCommand
from pipeline.config import Config, Renamed
from pipeline.io import storage


class BenchCoreConfig(Config):
    """Sizes and repeats of the core benchmark."""

    batch_size: Annotated[int, Renamed("batch")] = 256  # sources B in the GGN comparison
    num_classes: Annotated[int, Renamed("classes")] = 2048  # targets C in the GGN comparison
    dim: int = 512  # embedding dimension D in the GGN comparison
    scale: float = 100.0  # logit scale s (CLIP's exp(logit_scale) at its cap)
    bias: float = -10.0  # SigLIP logit bias b
    models: tuple[str, ...] = ("bayescurate-tiny", "ViT-B-32")  # overhead models (ViT-B-32: random weights)
    image_batch: int = 32  # images per batch in the overhead measurement
    dampings: tuple[str, ...] = ("paper", "exact")  # posterior dampings whose variance is timed
    warmup: int = 1  # untimed calls before timing
    repeats: int = 5  # timed calls; the median is reported
    threads: int | None = None  # torch CPU threads (default: torch's own choice)
    seed: int = 0  # torch seed for the random inputs
    quick: bool = False  # a small smoke run (tests): tiny sizes and the tiny model only
    out: str = Field(
        "out/bench/core.json", json_schema_extra={"metavar": "FILE"}
    )  # where the JSON results are written

    def effective(self) -> BenchCoreConfig:
        """The configuration actually run: `quick` shrinks everything."""
        if not self.quick:
            return self
        return self.model_copy(
            update={
                "batch_size": min(self.batch_size, 32),
                "num_classes": min(self.num_classes, 128),
                "dim": min(self.dim, 64),
                "models": tuple(m for m in self.models if m == "bayescurate-tiny"),
                "image_batch": min(self.image_batch, 4),
                "repeats": min(self.repeats, 2),
            }
        )


def _time(fn: Callable[[], Any], warmup: int, repeats: int) -> float:
    """Median wall time of `fn()` in seconds after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def per_sample_ggn(sources: Any, targets: Any, scale: float, bias: float, softmax: bool) -> Any:
    """The reference: `Σ_b J_b M_b J_b` with every `J_b`, `M_b` materialised as `[B, D, D]` (method §1)."""
    import torch

    y = targets / targets.norm(dim=1, keepdim=True)  # [C, D]
    r = sources.norm(dim=1)  # [B]
    u = sources / r[:, None]  # [B, D]
    logits = scale * (u @ y.T) + (0.0 if softmax else bias)  # [B, C]
    w = torch.softmax(logits, dim=1) if softmax else torch.sigmoid(logits) * torch.sigmoid(-logits)  # [B, C]
    m = torch.einsum("bc,cd,ce->bde", w, y, y)  # Ŷᵀ diag(w_b) Ŷ   [B, D, D]
    if softmax:
        q = w @ y  # Ŷᵀ p_b   [B, D]
        m = m - q[:, :, None] * q[:, None, :]
    m = scale * scale * m
    eye = torch.eye(sources.shape[1], dtype=sources.dtype)
    jac = (eye[None] - u[:, :, None] * u[:, None, :]) / r[:, None, None]  # [B, D, D]
    return (jac @ m @ jac).sum(0)


def bench_ggn(cfg: BenchCoreConfig) -> list[dict[str, Any]]:
    """Fast GGN vs the per-sample formula for both likelihoods (float32 inputs)."""
    import torch

    from pipeline.bayes.curvature import ggn, infonce_ggn, siglip_ggn

    g = torch.Generator().manual_seed(cfg.seed)
    sources = torch.randn(cfg.batch_size, cfg.dim, generator=g) * 3.0
    targets = torch.randn(cfg.num_classes, cfg.dim, generator=g)
    rows = []
    for name, softmax in (("infonce", True), ("siglip", False)):
        if softmax:
            fast_fn = lambda: infonce_ggn(sources, targets, cfg.scale)  # noqa: E731
        else:
            fast_fn = lambda: siglip_ggn(sources, targets, cfg.scale, cfg.bias)  # noqa: E731
        slow_fn = lambda s=softmax: per_sample_ggn(sources, targets, cfg.scale, cfg.bias, s)  # noqa: E731
        with torch.inference_mode():
            fast, slow = fast_fn(), slow_fn()  # also the warm-up of the per-sample formula
            # reference: the fast expansion in float64 (tests check it against autograd Jacobians)
            exact = ggn(name, sources.double(), targets.double(), cfg.scale, cfg.bias)
            t_fast = _time(fast_fn, cfg.warmup, cfg.repeats)
            t_slow = _time(slow_fn, 0, max(1, min(cfg.repeats, 2)))
        ref = exact.abs().max()
        rows.append(
            {
                "likelihood": name,
                "B": cfg.batch_size,
                "C": cfg.num_classes,
                "D": cfg.dim,
                "fast_s": t_fast,
                "per_sample_s": t_slow,
                "speedup": t_slow / t_fast,
                # max |error| relative to the largest entry of the float64 result
                "max_rel_err_fast": float((fast.double() - exact).abs().max() / ref),
                "max_rel_err_per_sample": float((slow.double() - exact).abs().max() / ref),
            }
        )
    return rows


def _image_size(adapter: Any) -> tuple[int, int]:
    size = getattr(getattr(adapter.model, "visual", None), "image_size", 224)
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _overhead_one(adapter: Any, name: str, cfg: BenchCoreConfig) -> dict[str, Any]:
    """Time one model: forward + mean (deterministic), + variance (Bayesian), and the variance alone."""
    import torch

    from pipeline.bayes.kron import KronFactors, KronPosterior

    adapter.model.eval()
    g = torch.Generator().manual_seed(cfg.seed)
    pixels = torch.randn(cfg.image_batch, 3, *_image_size(adapter), generator=g)
    weight = adapter.image_weight().detach().to(torch.float32)  # [D, d']
    dim, width = weight.shape

    def embed(post: KronPosterior | None) -> Any:
        feats = adapter.image_features(pixels)
        acts = feats.acts.to(torch.float32)  # [N, d']
        mean = acts @ weight.T if feats.offset is None else acts @ weight.T + feats.offset
        return mean if post is None else (mean, post.embedding_variance(acts))

    row: dict[str, Any] = {"model": name, "batch": cfg.image_batch, "d": width, "D": dim}
    with torch.inference_mode():
        acts = adapter.image_features(pixels).acts.to(torch.float64)  # [N, d']
        b = torch.randn(dim, dim, generator=g, dtype=torch.float64)
        factors = KronFactors(acts.T @ acts, b @ b.T, float(acts.shape[0]))  # values do not affect timing
        row["det_s"] = _time(lambda: embed(None), cfg.warmup, cfg.repeats)
        for damping in cfg.dampings:
            post = KronPosterior(factors, weight, 1.0, damping=damping)
            row[f"{damping}_bayes_s"] = _time(lambda p=post: embed(p), cfg.warmup, cfg.repeats)
            t_var = _time(lambda p=post, a=acts.float(): p.embedding_variance(a), cfg.warmup, cfg.repeats)
            row[f"{damping}_variance_s"] = t_var
            # the variance's own cost relative to the deterministic path; the end-to-end times are
            # noisier because the tower dominates both
            row[f"{damping}_overhead"] = t_var / row["det_s"]
    return row


def bench_overhead(cfg: BenchCoreConfig) -> list[dict[str, Any]]:
    """Deterministic vs Bayesian image embeddings per model, or a `skipped` row if no adapter exists."""
    try:
        from pipeline.models.adapter import load_model
    except ImportError as exc:
        return [{"model": m, "skipped": f"pipeline.models.adapter unavailable: {exc}"} for m in cfg.models]
    rows = []
    for name in cfg.models:
        try:
            adapter = load_model(name)
        except (ValueError, FileNotFoundError) as exc:  # e.g. the tiny checkpoint not trained yet
            rows.append({"model": name, "skipped": f"load_model failed: {exc}"})
            continue
        rows.append(_overhead_one(adapter, name, cfg))
    return rows


def _print_tables(ggn_rows: list[dict[str, Any]], overhead_rows: list[dict[str, Any]]) -> None:
    print("GGN sum: fast expansion vs per-sample [B, D, D] formula (float32, median wall time)")
    print(
        f"{'likelihood':<10} {'B':>5} {'C':>6} {'D':>5} {'fast ms':>9} {'per-sample ms':>14} {'speedup':>8} "
        f"{'rel err fast':>13} {'rel err ref':>12}"
    )
    for r in ggn_rows:
        print(
            f"{r['likelihood']:<10} {r['B']:>5} {r['C']:>6} {r['D']:>5} {1e3 * r['fast_s']:>9.2f} "
            f"{1e3 * r['per_sample_s']:>14.1f} {r['speedup']:>7.1f}x {r['max_rel_err_fast']:>13.2e} "
            f"{r['max_rel_err_per_sample']:>12.2e}"
        )
    print("\nBayesian image embeddings: variance on top of the deterministic forward (median wall time)")
    for r in overhead_rows:
        if "skipped" in r:
            print(f"{r['model']:<18} skipped: {r['skipped']}")
            continue
        head = f"{r['model']:<18} batch {r['batch']:>3}  d'={r['d']:<5} D={r['D']:<4}"
        parts = [f"{head} det {1e3 * r['det_s']:.2f} ms"]
        for key in r:
            if key.endswith("_variance_s"):
                damping = key.removesuffix("_variance_s")
                parts.append(
                    f"{damping}: bayes {1e3 * r[f'{damping}_bayes_s']:.2f} ms, "
                    f"variance +{1e3 * r[key]:.3f} ms ({100 * r[f'{damping}_overhead']:.2f}%)"
                )
        print("  ".join(parts))


def run(cfg: BenchCoreConfig) -> dict[str, Any]:
    """Run both parts, print the tables, write the JSON to `cfg.out`, return the results."""
    import torch

    cfg = cfg.effective()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    ggn_rows = bench_ggn(cfg)
    overhead_rows = bench_overhead(cfg)
    _print_tables(ggn_rows, overhead_rows)
    result = {
        "config": cfg.model_dump(),
        "environment": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
            "processor": platform.processor(),
        },
        "ggn": ggn_rows,
        "overhead": overhead_rows,
    }
    storage.write_text(cfg.out, json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {cfg.out}")
    return result


def main_run(cfg: BenchCoreConfig) -> int:
    """Benchmark the GGN fast path and the overhead of Bayesian embeddings."""
    run(cfg)
    return 0


CONFIG = BenchCoreConfig
main = ConfigCommand(BenchCoreConfig, main_run, "bayescurate bench core")

if __name__ == "__main__":
    raise SystemExit(main())
