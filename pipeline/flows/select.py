"""Choose the pool images humans should label next, and send them to Label Studio.

Pool (and optional target) embeddings come from `embed --activations`. Targets narrow the pool to their
nearest neighbours and define what EPIG is informative about. The picks are written to
`<out>/selection.parquet`; with a project, each becomes a Label Studio task carrying the image (by
reference: only the picked rows are read), the model's prediction (model_version = the posterior id)
and numeric uncertainty fields. Re-running adds no duplicate task: tasks are keyed by sample_id.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.annotation import ImageStore, TaskRow, push_tasks
from pipeline.artifacts.posterior import load_posterior, read_info
from pipeline.bayes.head import Activations
from pipeline.classes import class_text_features, read_classes
from pipeline.data.sources import plan_shards, read_shard
from pipeline.io import storage
from pipeline.selection import EmbeddingSet, Pick, SelectingConfig, choose, read_embeddings
from pipeline.stages.embed import ModelSpec


class SelectConfig(SelectingConfig):
    """What `select` chooses from, how, and where the picks go."""

    pool: str  # embeddings of the unlabelled pool (embed --activations)
    posterior: str  # posterior directory
    classes: str  # classes file (JSON from make-world, or one class a line)
    out: str  # output directory for selection.parquet (local path or URI)
    targets: str | None = None  # embeddings of the target distribution (targeted selection)
    project: str | None = None  # Label Studio project to send the tasks to (none: only write the file)
    corpus: str | None = None  # the pool's corpus, for embeddings made before rows recorded their source
    round: int = 0  # annotation round number, stored on each task
    state_dir: str | None = None  # services state dir holding the Label Studio URL and token
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
        label_studio = send_to_label_studio(cfg, spec.names, picks, pool, info["posterior_id"])
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
    )
    storage.write_json(storage.join(cfg.out, "selection.json"), result.to_json())
    return result


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
    cfg: SelectConfig, classes: list[str], picks: list[Pick], pool: EmbeddingSet, posterior_id: str
) -> dict[str, Any]:
    from connectors.label_studio import LabelStudioClient
    from connectors.service_state import read_state

    wanted = {p.sample_id for p in picks}
    sources = sources_of(pool, wanted, cfg.corpus)
    missing = sorted(wanted - sources.keys())
    if missing:
        raise ValueError(f"{len(missing)} selected samples have no known image location: {missing[:5]}")
    client = LabelStudioClient.from_services(cfg.state_dir)
    ls = read_state(cfg.state_dir).label_studio
    store = ImageStore(Path(ls.image_root) if ls else None, cfg.inline_max_bytes, cfg.image_store)
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
