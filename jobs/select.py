"""`bayescurate select`: choose the pool images humans should label next, and send them to Label Studio.

Pool (and optional target) embeddings come from `bayescurate embed --activations`. Targets narrow the pool
to their nearest neighbours and define what EPIG is informative about. The picks are written to
`<out>/selection.parquet`; with `--project`, each becomes a Label Studio task carrying the image, the
model's prediction (model_version = round) and sortable uncertainty fields. Re-running adds no duplicate
task: tasks are keyed by sample_id.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Annotated, Any

import pyarrow as pa
import typer

from jobs._app import ConfigOption, run_command
from pipeline.artifacts.posterior import load_posterior, read_info
from pipeline.bayes.acquisition import Method
from pipeline.bayes.neighbours import Metric
from pipeline.classes import class_text_features, read_classes
from pipeline.config import Config, load_config
from pipeline.data.sources import plan_shards, read_shard
from pipeline.io import storage
from pipeline.selection import Pick, choose, read_embeddings
from pipeline.stages.embed import ModelSpec


class SelectConfig(Config):
    pool: str  # embeddings directory of the unlabelled pool (embed --activations)
    posterior: str  # posterior directory
    classes: str  # classes file (JSON from make-world, or one class a line)
    out: str  # output directory for selection.parquet
    targets: str | None = None  # embeddings directory of the target distribution
    budget: int = 20  # images to send to annotators
    method: Method = Method.EPIG  # acquisition function
    neighbours: int = 20  # pool neighbours per target point (targeted selection)
    metric: Metric = Metric.WASSERSTEIN  # neighbour distance between Gaussian embeddings
    draws: int = 64  # joint posterior draws for BALD/EPIG
    seed: int = 0  # Monte Carlo seed
    project: str | None = None  # Label Studio project to send the tasks to (none: only write the file)
    corpus: str | None = None  # the pool's corpus URI, to attach images to the tasks
    round: int = 0  # annotation round number, stored on each task
    state_dir: str | None = None  # services state dir holding the Label Studio URL and token


def select(cfg: SelectConfig) -> dict[str, Any]:
    start = time.perf_counter()
    info = read_info(cfg.posterior)
    adapter = ModelSpec(info["model"].get("name"), info["model"].get("pretrained")).load()
    head = load_posterior(cfg.posterior, adapter)
    spec = read_classes(cfg.classes)
    text_acts, text_offset = class_text_features(adapter, spec)
    pool = read_embeddings(cfg.pool)
    targets = read_embeddings(cfg.targets) if cfg.targets else None
    picks, n_candidates = choose(
        head,
        text_acts,
        spec.names,
        pool,
        cfg.budget,
        targets=targets,
        method=cfg.method,
        neighbours=cfg.neighbours,
        metric=cfg.metric,
        draws=cfg.draws,
        seed=cfg.seed,
        text_offset=text_offset,
    )
    table = pa.table(
        {
            "sample_id": [p.sample_id for p in picks],
            "rank": pa.array([p.rank for p in picks], pa.int32()),
            "score": pa.array([p.score for p in picks], pa.float64()),
            "predicted": [p.predicted for p in picks],
            "confidence": pa.array([p.confidence for p in picks], pa.float64()),
            "entropy": pa.array([p.entropy for p in picks], pa.float64()),
            "round": pa.array([cfg.round] * len(picks), pa.int32()),
        }
    )
    storage.write_parquet(table, f"{cfg.out}/selection.parquet")
    summary: dict[str, Any] = {
        "pool": len(pool),
        "targets": 0 if targets is None else len(targets),
        "candidates": n_candidates,
        "selected": len(picks),
        "method": cfg.method.value,
        "mean_score": sum(p.score for p in picks) / max(len(picks), 1),
    }
    if cfg.project:
        summary["label_studio"] = send_to_label_studio(cfg, spec.names, picks)
    summary["seconds"] = time.perf_counter() - start
    storage.write_json(f"{cfg.out}/selection.json", summary)
    return summary


def images_of(corpus: str, sample_ids: set[str]) -> dict[str, bytes]:
    """Image bytes of the wanted samples, read shard by shard from the corpus."""
    found: dict[str, bytes] = {}
    for shard in plan_shards(corpus, None, 4096):
        table = read_shard(shard)
        for sid, image in zip(
            table.column("sample_id").to_pylist(), table.column("image").to_pylist(), strict=True
        ):
            if sid in sample_ids and image:
                found[sid] = image
        if len(found) == len(sample_ids):
            break
    return found


def send_to_label_studio(cfg: SelectConfig, classes: list[str], picks: list[Pick]) -> dict[str, Any]:
    from connectors.label_studio import LabelStudioClient, Prediction, TaskInput, inline_image

    if not cfg.corpus:
        raise ValueError("--corpus is required with --project: tasks need the images")
    images = images_of(cfg.corpus, {p.sample_id for p in picks})
    missing = sorted({p.sample_id for p in picks} - images.keys())
    if missing:
        raise ValueError(
            f"{len(missing)} selected samples are not in the corpus {cfg.corpus!r}: {missing[:5]}"
        )
    client = LabelStudioClient.from_services(cfg.state_dir)
    project = client.ensure_project(cfg.project, classes)
    tasks = [
        TaskInput(
            sample_id=p.sample_id,
            image=inline_image(images[p.sample_id]),
            round=cfg.round,
            prediction=Prediction(p.predicted, p.confidence),
            uncertainty={f"{cfg.method.value}": p.score, "entropy": p.entropy, "pick_rank": p.rank},
        )
        for p in picks
    ]
    result = client.import_tasks(project, tasks)
    return {
        "project_id": project.id,
        "url": f"{client.url}/projects/{project.id}/data",
        "created": len(result.created),
        "skipped": len(result.skipped),
    }


def command(
    pool: Annotated[str, typer.Option(help="Embeddings of the unlabelled pool (embed --activations).")],
    posterior: Annotated[str, typer.Option(help="Posterior directory.")],
    classes: Annotated[str, typer.Option(help="Classes file.")],
    out: Annotated[str, typer.Option(help="Output directory.")],
    targets: Annotated[str | None, typer.Option(help="Embeddings of the target distribution.")] = None,
    budget: Annotated[int | None, typer.Option(help="Images to send to annotators.")] = None,
    method: Annotated[Method | None, typer.Option(help="epig or bald.")] = None,
    neighbours: Annotated[int | None, typer.Option(help="Pool neighbours per target point.")] = None,
    metric: Annotated[Metric | None, typer.Option(help="cosine or wasserstein.")] = None,
    draws: Annotated[int | None, typer.Option(help="Joint posterior draws.")] = None,
    seed: Annotated[int | None, typer.Option(help="Monte Carlo seed.")] = None,
    project: Annotated[str | None, typer.Option(help="Label Studio project to send tasks to.")] = None,
    corpus: Annotated[str | None, typer.Option(help="The pool's corpus (images for the tasks).")] = None,
    round: Annotated[int | None, typer.Option(help="Annotation round number.")] = None,
    state_dir: Annotated[str | None, typer.Option(help="Services state directory.")] = None,
    config: ConfigOption = None,
) -> int:
    """Choose the pool images humans should label next (EPIG/BALD) and send them to Label Studio."""
    cfg = load_config(
        SelectConfig,
        config,
        pool=pool,
        posterior=posterior,
        classes=classes,
        out=out,
        targets=targets,
        budget=budget,
        method=method,
        neighbours=neighbours,
        metric=metric,
        draws=draws,
        seed=seed,
        project=project,
        corpus=corpus,
        round=round,
        state_dir=state_dir,
    )
    summary = select(cfg)
    print(
        f"selected {summary['selected']} of {summary['candidates']} candidates "
        f"(pool {summary['pool']}, targets {summary['targets']}) by {summary['method']}"
    )
    if "label_studio" in summary:
        ls = summary["label_studio"]
        print(f"Label Studio: {ls['created']} new tasks, {ls['skipped']} already there: {ls['url']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(command, argv, "bayescurate select")
