"""What a `curate` run shows in MLflow: its settings, stage timings, a histogram of every scored row's score,
the share of picks per domain against the pool's, and a contact sheet of the top picks."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.data.sources import read_images
from pipeline.io import storage
from pipeline.plots import histogram_png, shares_png
from pipeline.reports.contact_sheet import SheetItem, contact_sheet

SHEET_PICKS = 64  # picks on the contact sheet
BINS = 60


def score_histogram(parts: list[str], low: float, high: float) -> tuple[np.ndarray, np.ndarray]:
    """Counts of every scored row's score in `BINS` equal bins over [low, high], one score part at a time."""
    if not high > low:
        high = low + 1e-12
    edges = np.linspace(low, high, BINS + 1)
    counts = np.zeros(BINS, dtype=np.int64)
    for path in parts:
        scores = storage.read_parquet(path, columns=["score"]).column("score").to_numpy()
        counts += np.histogram(scores, bins=edges)[0]
    return counts, edges


def pool_domains(parts: list[str], column: str = "domain") -> Counter[str]:
    """Rows per value of the pool's domain column among the scored rows (empty when there is none)."""
    found: Counter[str] = Counter()
    for path in parts:
        table = storage.read_parquet(path)
        if column not in table.column_names:
            return Counter()
        found.update(str(v) for v in table.column(column).to_pylist())
    return found


def sheet(picks: pa.Table, method: str, title: str) -> bytes:
    """The top `SHEET_PICKS` picks as thumbnails with prediction, confidence and score."""
    rows = picks.slice(0, SHEET_PICKS).to_pylist()
    sources = [r["source"] for r in rows if r.get("source")]
    images: dict[str, bytes] = {}
    for source in sources:  # one at a time: a missing image is a grey cell, not a failed run
        try:
            images.update(read_images([source]))
        except ValueError:
            continue
    items = [
        SheetItem(
            image=images.get(r.get("source") or ""),
            predicted=str(r["predicted"]),
            confidence=float(r["confidence"]),
            score=float(r["score"]),
            rank=int(r["rank"]),
        )
        for r in rows
    ]
    return contact_sheet(items, title=title, score_name=method)


def track(cfg: Any, result: Any, picks: pa.Table, parts: list[str], markers: list[dict[str, Any]]) -> str:
    """Log the run; returns its MLflow run id."""
    params = {
        "pool": cfg.pool,
        "targets": cfg.targets,
        "posterior_id": result.posterior_id,
        "selection": cfg.selection.model_dump(mode="json"),
        "batch_resolved": result.batch,
        "norm_resolved": result.norm,
        "precision_resolved": result.precision,
        "materialize": cfg.materialize.value if cfg.materialize else None,
    }
    with cfg.tracker().run("curate", params=params, tags={"command": "curate"}) as run:
        metrics = {
            "rows": result.rows,
            "candidates": result.candidates,
            "picks": result.picks,
            "removed_duplicates": result.removed_duplicates,
            "floored": result.floored,
            "seconds": result.seconds,
        }
        metrics |= {f"seconds_{k}": v for k, v in result.stages.items()}
        if result.rows:
            metrics["rows_per_s"] = result.rows / max(result.seconds, 1e-9)
        run.log_metrics(metrics)
        run.log_dict(result.to_json(), "curate.json")
        lows = [m["min"] for m in markers if m.get("min") is not None]
        highs = [m["max"] for m in markers if m.get("max") is not None]
        if lows:
            counts, edges = score_histogram(parts, min(lows), max(highs))
            marks = (
                {"lowest pick": float(np.min(picks.column("score").to_numpy()))} if picks.num_rows else None
            )
            title = f"{result.method} scores of {result.candidates:,} rows ({result.picks:,} picked)"
            run.log_bytes(
                histogram_png(counts, edges, title=title, xlabel=result.method, marks=marks), "scores.png"
            )
        if result.domains:
            pool = pool_domains(parts)
            total_pool, total_picks = sum(pool.values()), max(result.picks, 1)
            shares = {
                "candidates": {k: v / max(total_pool, 1) for k, v in pool.items()},
                "picks": {k: v / total_picks for k, v in result.domains.items()},
            }
            run.log_bytes(shares_png(shares, title="share per domain"), "domains.png")
            run.log_metrics({re.sub(r"[^\w\-. /]", "_", f"share_{k}"): v for k, v in shares["picks"].items()})
        if picks.num_rows:
            title = (
                f"curate: top {min(SHEET_PICKS, picks.num_rows)} of {result.picks:,} picks ({result.batch})"
            )
            run.log_bytes(sheet(picks, result.method, title), "picks.png")
        return run.run_id
