"""Calibrated zero-shot classification of embedded images with ProbCosine.

Class prompts go through the text tower with its posterior (prompt activations averaged per class, so the
class embedding is `Q ā` and its variance is exact), image embeddings come from `embed`. Per image:
Bayesian (probit, or `draws` Monte Carlo draws) and MAP predictions, confidence, predictive entropy and
mean logit variance; with a label column, accuracy/ECE/NLL/Brier for MAP and Bayes side by side and a
reliability diagram, all logged to MLflow. Streams over the embedding part files; `out` may be a URI.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.artifacts.posterior import load_posterior, projection_sha256, read_info
from pipeline.bayes import metrics
from pipeline.bayes.cosine import ProbLogits, prob_cosine
from pipeline.bayes.metrics import entropy
from pipeline.classes import class_text_features, read_classes
from pipeline.config import Renamed, TrackedConfig
from pipeline.io import storage, vectors
from pipeline.plots import reliability_png
from pipeline.stages.embed import ModelSpec


class ZeroshotConfig(TrackedConfig):
    """What `zeroshot` classifies, against which classes, and where it writes."""

    embeddings: str  # directory written by `bayescurate embed`
    classes: str  # classes file: JSON {"classes", "prompts", "label_column"} or one class a line
    posterior: str  # posterior directory
    out: str  # output directory (local path or URI)
    label_column: Annotated[str | None, Renamed("labels")] = None  # label column in the embeddings: report
    # accuracy/ECE/NLL/Brier
    draws: Annotated[int, Renamed("mc")] = 0  # Monte Carlo draws of the logits (0: the probit approximation)
    n_bins: int = 15  # ECE / reliability bins
    seed: int = 0  # Monte Carlo seed


@dataclass(frozen=True)
class ZeroshotResult:
    """What a zero-shot run produced (also `metrics.json` under `out`)."""

    out: str
    files: int
    classes: list[str]
    posterior_id: str
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # "MAP"/"Bayes" -> report
    n_labelled: int = 0
    unknown_labels: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def embedding_files(uri: str) -> list[str]:
    """The embedding part files of an `embed` output directory (quarantine excluded)."""
    files = [f for f in storage.list_files(uri, suffix=".parquet") if "/quarantine/" not in f]
    if not files:
        raise FileNotFoundError(f"no embedding Parquet files under {uri!r}")
    return files


def check_fresh(table: pa.Table, path: str, info: dict[str, Any]) -> None:
    """Raise ValueError when `table` was embedded under another image projection than the posterior's.

    A round's posterior carries a re-fitted projection (MATH §9): means made with the old one are stale.
    """
    raw = (table.schema.metadata or {}).get(b"bayescurate")
    meta = json.loads(raw) if raw else {}
    made_with = meta.get("projection_sha256")
    wanted = projection_sha256(info)
    if made_with != wanted:
        raise ValueError(
            f"{path!r} was embedded under another image projection than posterior {info['posterior_id']} "
            f"uses (embedded with posterior {meta.get('posterior_id')}): its means are stale; re-embed "
            "with this posterior"
        )


def zeroshot(cfg: ZeroshotConfig) -> ZeroshotResult:
    """Classify every embedded image; with `label_column`, MAP vs Bayes calibration metrics and a diagram."""
    info = read_info(cfg.posterior)
    adapter = ModelSpec(info["model"].get("name"), info["model"].get("pretrained")).load()
    head = load_posterior(cfg.posterior, adapter)
    spec = read_classes(cfg.classes)
    names = spec.names
    index = {n: i for i, n in enumerate(names)}
    text_acts, text_offset = class_text_features(adapter, spec)
    mean_y, var_y = head.text_embeddings(text_acts, text_offset)  # [C, D] each
    gen = torch.Generator().manual_seed(cfg.seed)
    files = embedding_files(cfg.embeddings)
    all_bayes, all_map, all_labels, unknown = [], [], [], 0
    for path in files:
        fs, p = storage.resolve(path)
        table = pq.read_table(p, filesystem=fs)
        if "var" not in table.column_names:
            raise ValueError(f"{path!r} has no 'var' column: embed with a posterior (without --no-variance)")
        if cfg.label_column and cfg.label_column not in table.column_names:
            raise ValueError(
                f"label column {cfg.label_column!r} not in {path!r}; columns: {table.column_names}"
            )
        check_fresh(table, path, info)
        mean_x = vectors.tensor(table, "mean")  # [N, D]
        var_x = vectors.tensor(table, "var")  # [N, D]
        cos_mean, cos_var = prob_cosine(mean_x, var_x, mean_y, var_y)  # [N, C] each
        logits = ProbLogits.from_cosine(cos_mean, cos_var, head.scale, head.bias)
        bayes = logits.probit() if cfg.draws <= 0 else logits.sample_probs(cfg.draws, gen).mean(1)  # [N, C]
        map_cos = (
            torch.nn.functional.normalize(mean_x, dim=1) @ torch.nn.functional.normalize(mean_y, dim=1).T
        )
        map_probs = torch.softmax(head.scale * map_cos + head.bias, dim=1)  # [N, C]
        pred = bayes.argmax(1)
        columns = {
            "sample_id": table.column("sample_id"),
            "pred": pa.array([names[i] for i in pred.tolist()], pa.string()),
            "confidence": pa.array(bayes.max(1).values.numpy(), pa.float32()),
            "entropy": pa.array(entropy(bayes).numpy(), pa.float32()),
            "logit_var": pa.array(logits.var.mean(1).numpy(), pa.float32()),
            "map_pred": pa.array([names[i] for i in map_probs.argmax(1).tolist()], pa.string()),
            "map_confidence": pa.array(map_probs.max(1).values.numpy(), pa.float32()),
            "map_entropy": pa.array(entropy(map_probs).numpy(), pa.float32()),
            "probs": vectors.vector_column(bayes),
        }
        if cfg.label_column:
            labels = table.column(cfg.label_column).to_pylist()
            columns["label"] = pa.array(labels, pa.string())
            known = np.array([lab in index for lab in labels], dtype=bool)
            unknown += int((~known).sum())
            all_bayes.append(bayes[torch.from_numpy(known)])
            all_map.append(map_probs[torch.from_numpy(known)])
            all_labels.append(torch.tensor([index[lab] for lab in labels if lab in index], dtype=torch.long))
        meta = {b"bayescurate": json.dumps({"posterior_id": info["posterior_id"], "classes": names}).encode()}
        name = path.rstrip("/").rsplit("/", 1)[-1]
        storage.write_parquet(pa.table(columns).replace_schema_metadata(meta), storage.join(cfg.out, name))
    result = ZeroshotResult(out=cfg.out, files=len(files), classes=names, posterior_id=info["posterior_id"])
    if cfg.label_column:
        labels_t = torch.cat(all_labels)
        if len(labels_t) == 0:
            raise ValueError(f"no row of label column {cfg.label_column!r} names one of the classes {names}")
        results = {"MAP": torch.cat(all_map), "Bayes": torch.cat(all_bayes)}
        report = {k: metrics.calibration_report(v, labels_t, cfg.n_bins) for k, v in results.items()}
        result = ZeroshotResult(
            out=cfg.out,
            files=len(files),
            classes=names,
            posterior_id=info["posterior_id"],
            metrics=report,
            n_labelled=len(labels_t),
            unknown_labels=unknown,
        )
        storage.write_bytes(
            storage.join(cfg.out, "reliability.png"), reliability_png(results, labels_t, cfg.n_bins)
        )
    storage.write_json(storage.join(cfg.out, "metrics.json"), result.to_json())
    if cfg.tracking:
        _track(cfg, result)
    return result


def _track(cfg: ZeroshotConfig, result: ZeroshotResult) -> None:
    params = {
        "embeddings": cfg.embeddings,
        "classes": cfg.classes,
        "posterior_id": result.posterior_id,
        "label_column": cfg.label_column,
        "draws": cfg.draws,
        "n_bins": cfg.n_bins,
    }
    with cfg.tracker().run("zeroshot", params=params, tags={"command": "zeroshot"}) as run:
        for kind, values in result.metrics.items():
            run.log_metrics({f"{kind.lower()}_{k}": float(v) for k, v in values.items() if v == v})
        run.log_dict(result.to_json(), "metrics.json")
        png = storage.join(cfg.out, "reliability.png")
        if storage.is_file(png):
            run.log_bytes(storage.read_bytes(png), "reliability.png")
