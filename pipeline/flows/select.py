"""Choose the pool images humans should label next, and send them to Label Studio.

Pool (and optional target) embeddings come from `embed --activations`. Targets narrow the pool to their
nearest neighbours and define what EPIG is informative about. The picks are written to
`<out>/selection.parquet`; with a project, each becomes a Label Studio task carrying the image (by
reference: only the picked rows are read), the model's prediction (model_version = the posterior id)
and numeric uncertainty fields. Re-running adds no duplicate task: tasks are keyed by sample_id. With
tracking on, an MLflow run `select` holds the settings, the score summary and the picks table.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.annotation import ImageStore, TaskRow, push_tasks
from pipeline.artifacts.posterior import load_posterior, read_info
from pipeline.bayes.head import Activations
from pipeline.classes import class_text_features, read_classes
from pipeline.config import LabelStudioAccess, TrackedConfig
from pipeline.data.sources import plan_shards, read_shard
from pipeline.io import storage
from pipeline.selection import EmbeddingSet, Pick, SelectingConfig, choose, read_embeddings
from pipeline.stages.embed import ModelSpec


class SelectConfig(TrackedConfig, LabelStudioAccess, SelectingConfig):
    """What `select` chooses from, how, and where the picks go."""

    pool: str  # embeddings of the unlabelled pool (embed --activations)
    posterior: str  # posterior directory
    classes: str  # classes file (JSON from make-world, or one class a line)
    out: str  # output directory for selection.parquet (local path or URI)
    targets: str | None = None  # embeddings of the target distribution (targeted selection)
    project: str | None = None  # Label Studio project to send the tasks to (none: only write the file)
    corpus: str | None = None  # the pool's corpus, for embeddings made before rows recorded their source
    round: int = 0  # annotation round number, stored on each task
    state_dir: str | None = None  # services state dir holding the Label Studio URL and token (beats the env)
    image_store: str | None = None  # s3://bucket/prefix/ where images are staged for Label Studio to read
    inline_max_bytes: int = 0  # images up to this size are inlined into tasks instead of referenced


@dataclass(frozen=True)
class SelectResult:
    """What a selection produced (also `selection.json` under `out`)."""

    pool: int
    targets: int
    candidates: int
    selected: int
    method: str
    mean_score: float
    seconds: float
    batch: str = "greedy"  # how the batch was drawn
    duplicates: int = 0  # near-duplicate picks dropped and refilled
    picks: list[Pick] = field(default_factory=list)
    label_studio: dict[str, Any] | None = None
    posterior_id: str | None = None
    mlflow_run_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("picks")
        return out


def selection_table(picks: list[Pick], round_: int) -> pa.Table:
    return pa.table(
        {
            "sample_id": [p.sample_id for p in picks],
            "rank": pa.array([p.rank for p in picks], pa.int32()),
            "score": pa.array([p.score for p in picks], pa.float64()),
            "predicted": [p.predicted for p in picks],
            "confidence": pa.array([p.confidence for p in picks], pa.float64()),
            "entropy": pa.array([p.entropy for p in picks], pa.float64()),
            "round": pa.array([round_] * len(picks), pa.int32()),
        }
    )


def select(cfg: SelectConfig) -> SelectResult:
    """Pick `budget` pool images by the acquisition function; optionally create their Label Studio tasks."""
    start = time.perf_counter()
    target = cfg.label_studio(cfg.state_dir) if cfg.project else None  # no server: fail before the work
    info = read_info(cfg.posterior)
    adapter = ModelSpec(info["model"].get("name"), info["model"].get("pretrained")).load()
    head = load_posterior(cfg.posterior, adapter)
    spec = read_classes(cfg.classes)
    text_acts, text_offset = class_text_features(adapter, spec)
    pool = read_embeddings(cfg.pool)
    targets = read_embeddings(cfg.targets) if cfg.targets else None
    for name, rows in (("pool", pool), ("targets", targets)):
        if rows is not None and rows.meta.get("projection_sha256") != (
            info.get("image_projection") or {}
        ).get("sha256"):
            raise ValueError(
                f"the {name} embeddings were made under another image projection than posterior "
                f"{info['posterior_id']} uses (embedded with {rows.meta.get('posterior_id')}): re-embed them"
            )
    pool = pool.with_offsets(head)
    targets = targets.with_offsets(head) if targets is not None else None
    choice = choose(
        head, Activations(text_acts, text_offset), spec.names, pool, cfg.selection, targets=targets
    )
    picks = choice.picks
    storage.write_parquet(selection_table(picks, cfg.round), storage.join(cfg.out, "selection.parquet"))
    label_studio = None
    if cfg.project:
        label_studio = send_to_label_studio(cfg, target, spec.names, picks, pool, info["posterior_id"])
    result = SelectResult(
        pool=len(pool),
        targets=0 if targets is None else len(targets),
        candidates=choice.candidates,
        selected=len(picks),
        method=cfg.selection.method.value,
        mean_score=sum(p.score for p in picks) / max(len(picks), 1),
        seconds=time.perf_counter() - start,
        batch=choice.batch.value,
        duplicates=choice.duplicates,
        picks=picks,
        label_studio=label_studio,
        posterior_id=info["posterior_id"],
    )
    storage.write_json(storage.join(cfg.out, "selection.json"), result.to_json())
    if cfg.tracking:
        result = replace(result, mlflow_run_id=track(cfg, result))
        storage.write_json(storage.join(cfg.out, "selection.json"), result.to_json())
    return result


def track(cfg: SelectConfig, result: SelectResult) -> str:
    """Log the selection to MLflow (settings, score summary, the picks table); returns the run id."""
    params = {
        "pool": cfg.pool,
        "targets": cfg.targets,
        "classes": cfg.classes,
        "posterior_id": result.posterior_id,
        "selection": cfg.selection.model_dump(mode="json"),
        "batch_resolved": result.batch,
        "project": cfg.project,
        "round": cfg.round,
    }
    with cfg.tracker().run("select", params=params, tags={"command": "select"}) as run:
        scores = [p.score for p in result.picks]
        metrics = {
            "pool": result.pool,
            "targets": result.targets,
            "candidates": result.candidates,
            "selected": result.selected,
            "duplicates": result.duplicates,
            "seconds": result.seconds,
        }
        if scores:
            metrics |= {"score_mean": result.mean_score, "score_min": min(scores), "score_max": max(scores)}
            metrics["entropy_mean"] = sum(p.entropy for p in result.picks) / len(scores)
            metrics["confidence_mean"] = sum(p.confidence for p in result.picks) / len(scores)
        if result.label_studio:
            metrics |= {f"tasks_{k}": result.label_studio[k] for k in ("created", "skipped")}
        run.log_metrics(metrics)
        run.log_dict(result.to_json(), "selection.json")
        run.log_artifact(storage.join(cfg.out, "selection.parquet"))
        return run.run_id


def sources_of(pool: EmbeddingSet, sample_ids: set[str], corpus: str | None) -> dict[str, str]:
    """sample_id -> image location of the picked rows (recorded by `embed`, or found in `corpus`)."""
    if "source" in pool.columns:
        return {
            sid: src
            for sid, src in zip(pool.sample_ids, pool.columns["source"], strict=True)
            if sid in sample_ids
        }
    if not corpus:
        raise ValueError("the pool embeddings do not record image locations: pass --corpus, or re-embed")
    found: dict[str, str] = {}
    for shard in plan_shards(corpus, None, 4096):
        table = read_shard(shard)
        for sid, source in zip(
            table.column("sample_id").to_pylist(), table.column("source").to_pylist(), strict=True
        ):
            if sid in sample_ids:
                found[sid] = source
        if len(found) == len(sample_ids):
            break
    return found


def send_to_label_studio(
    cfg: SelectConfig,
    target: Any,
    classes: list[str],
    picks: list[Pick],
    pool: EmbeddingSet,
    posterior_id: str,
) -> dict[str, Any]:
    """Create the picks' tasks on `target` (a `connectors.label_studio_access.LabelStudioTarget`)."""
    wanted = {p.sample_id for p in picks}
    sources = sources_of(pool, wanted, cfg.corpus)
    missing = sorted(wanted - sources.keys())
    if missing:
        raise ValueError(f"{len(missing)} selected samples have no known image location: {missing[:5]}")
    client = target.client()
    root = target.image_root  # known for the local services' server only
    store = ImageStore(Path(root) if root else None, cfg.inline_max_bytes, cfg.image_store)
    rows = [
        TaskRow(
            sample_id=p.sample_id,
            round=cfg.round,
            rank=p.rank,
            predicted=p.predicted,
            confidence=p.confidence,
            scores={cfg.selection.method.value: p.score, "entropy": p.entropy},
        )
        for p in picks
    ]
    return push_tasks(client, cfg.project or "", classes, rows, sources, store, model_version=posterior_id)
