"""`bayescurate zeroshot`: calibrated zero-shot classification of embedded images with ProbCosine.

Class prompts go through the text tower with its posterior (prompt activations averaged per class, so the
class embedding is `Q ā` and its variance is exact), image embeddings come from `bayescurate embed`.
Per image: Bayesian (probit, or Monte Carlo with --mc K) and MAP predictions, confidence, predictive
entropy and mean logit variance; with --labels, accuracy/ECE/NLL/Brier for MAP and Bayes side by side,
a reliability diagram PNG, all logged to MLflow. Streams over the embedding part files.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import typer

from jobs._app import ConfigOption, ExperimentOption, TrackingOption, TrackingUriOption, run_command
from pipeline.artifacts.posterior import load_posterior, read_info
from pipeline.bayes import metrics
from pipeline.bayes.cosine import ProbLogits, prob_cosine
from pipeline.classes import class_text_features, read_classes
from pipeline.config import Config, load_config
from pipeline.io import storage
from pipeline.io.vectors import vector_column
from pipeline.stages.embed import ModelSpec


class ZeroshotConfig(Config):
    embeddings: str  # directory written by `bayescurate embed`
    classes: str  # JSON {"classes": [...], "prompts": [...], "label_column": ...} or text, one class a line
    posterior: str  # posterior directory
    out: str  # output directory
    labels: str | None = None  # label column in the embeddings (enables the metrics)
    mc: int = 0  # Monte Carlo samples of the logits; 0 = probit
    n_bins: int = 15  # ECE / reliability bins
    seed: int = 0  # Monte Carlo seed
    tracking: bool = True  # log to MLflow
    tracking_uri: str | None = None  # MLflow tracking URI
    experiment: str = "bayescurate"  # MLflow experiment


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -torch.special.xlogy(p, p).sum(-1)


def reliability_png(results: dict[str, torch.Tensor], labels: torch.Tensor, n_bins: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4.5), squeeze=False)
    for ax, (name, probs) in zip(axes[0], results.items(), strict=True):
        rel = metrics.reliability(probs, labels, n_bins)
        centers = ((rel.bin_edges[1:] + rel.bin_edges[:-1]) / 2).numpy()
        acc = np.nan_to_num(rel.accuracy.numpy())
        ax.bar(centers, acc, width=1.0 / n_bins, edgecolor="black", alpha=0.7, label="accuracy")
        ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
        ece = metrics.ece(probs, labels, n_bins)
        ax.set(title=f"{name}: ECE {ece:.3f} ({n_bins} bins)", xlabel="confidence", ylabel="accuracy")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def zeroshot(cfg: ZeroshotConfig) -> dict[str, Any]:
    info = read_info(cfg.posterior)
    adapter = ModelSpec(info["model"].get("name"), info["model"].get("pretrained")).load()
    head = load_posterior(cfg.posterior, adapter)
    spec = read_classes(cfg.classes)
    names = spec.names
    index = {n: i for i, n in enumerate(names)}
    text_acts, text_offset = class_text_features(adapter, spec)
    mean_y, var_y = head.text_embeddings(text_acts, text_offset)  # [C, D] each
    gen = torch.Generator().manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    files = [f for f in storage.list_files(cfg.embeddings, suffix=".parquet") if "/quarantine/" not in f]
    if not files:
        raise FileNotFoundError(f"no embedding Parquet files under {cfg.embeddings!r}")
    all_bayes, all_map, all_labels, unknown = [], [], [], 0
    for path in files:
        fs, p = storage.resolve(path)
        table = pq.read_table(p, filesystem=fs)
        if "var" not in table.column_names:
            raise ValueError(f"{path!r} has no 'var' column: embed with a posterior (without --no-variance)")
        if cfg.labels and cfg.labels not in table.column_names:
            raise ValueError(f"label column {cfg.labels!r} not in {path!r}; columns: {table.column_names}")
        d = table.schema.field("mean").type.list_size
        mean_x = torch.from_numpy(
            np.array(table.column("mean").combine_chunks().flatten()).reshape(-1, d)
        ).double()
        var_x = torch.from_numpy(
            np.array(table.column("var").combine_chunks().flatten()).reshape(-1, d)
        ).double()
        cos_mean, cos_var = prob_cosine(mean_x, var_x, mean_y, var_y)  # [N, C] each
        logits = ProbLogits.from_cosine(cos_mean, cos_var, head.scale, head.bias)
        bayes = logits.probit() if cfg.mc <= 0 else logits.sample_probs(cfg.mc, gen).mean(1)  # [N, C]
        map_cos = (
            torch.nn.functional.normalize(mean_x, dim=1) @ torch.nn.functional.normalize(mean_y, dim=1).T
        )
        map_probs = torch.softmax(head.scale * map_cos + head.bias, dim=1)  # [N, C]
        pred = bayes.argmax(1)
        columns = {
            "sample_id": table.column("sample_id"),
            "pred": pa.array([names[i] for i in pred.tolist()], pa.string()),
            "confidence": pa.array(bayes.max(1).values.numpy(), pa.float32()),
            "entropy": pa.array(_entropy(bayes).numpy(), pa.float32()),
            "logit_var": pa.array(logits.var.mean(1).numpy(), pa.float32()),
            "map_pred": pa.array([names[i] for i in map_probs.argmax(1).tolist()], pa.string()),
            "map_confidence": pa.array(map_probs.max(1).values.numpy(), pa.float32()),
            "map_entropy": pa.array(_entropy(map_probs).numpy(), pa.float32()),
            "probs": vector_column(bayes.numpy()),
        }
        if cfg.labels:
            labels = table.column(cfg.labels).to_pylist()
            columns["label"] = pa.array(labels, pa.string())
            known = np.array([lab in index for lab in labels], dtype=bool)
            unknown += int((~known).sum())
            all_bayes.append(bayes[torch.from_numpy(known)])
            all_map.append(map_probs[torch.from_numpy(known)])
            all_labels.append(torch.tensor([index[lab] for lab in labels if lab in index], dtype=torch.long))
        meta = {b"bayescurate": json.dumps({"posterior_id": info["posterior_id"], "classes": names}).encode()}
        storage.write_parquet(pa.table(columns).replace_schema_metadata(meta), str(out / Path(path).name))
    summary: dict[str, Any] = {"files": len(files), "classes": names, "posterior_id": info["posterior_id"]}
    if cfg.labels:
        labels_t = torch.cat(all_labels)
        if len(labels_t) == 0:
            raise ValueError(f"no row of label column {cfg.labels!r} names one of the classes {names}")
        results = {"MAP": torch.cat(all_map), "Bayes": torch.cat(all_bayes)}
        summary["metrics"] = {
            k: metrics.calibration_report(v, labels_t, cfg.n_bins) for k, v in results.items()
        }
        summary["n_labelled"], summary["unknown_labels"] = len(labels_t), unknown
        reliability_png(results, labels_t, cfg.n_bins, out / "reliability.png")
    storage.write_json(out / "metrics.json", summary)
    if cfg.tracking:
        _track(cfg, summary, out)
    return summary


def _track(cfg: ZeroshotConfig, summary: dict[str, Any], out: Path) -> None:
    from connectors.tracking import Tracker

    tracker = (
        Tracker(cfg.tracking_uri, cfg.experiment) if cfg.tracking_uri else Tracker.default(cfg.experiment)
    )
    params = {
        "embeddings": cfg.embeddings,
        "classes": cfg.classes,
        "posterior_id": summary["posterior_id"],
        "labels": cfg.labels,
        "mc": cfg.mc,
        "n_bins": cfg.n_bins,
    }
    with tracker.run("zeroshot", params=params, tags={"command": "zeroshot"}) as run:
        for kind, values in summary.get("metrics", {}).items():
            run.log_metrics({f"{kind.lower()}_{k}": float(v) for k, v in values.items() if v == v})
        run.log_artifact(str(out / "metrics.json"))
        if (out / "reliability.png").is_file():
            run.log_artifact(str(out / "reliability.png"))


def command(
    embeddings: Annotated[str, typer.Option(help="Directory written by `bayescurate embed`.")],
    classes: Annotated[str, typer.Option(help="Classes file: JSON (classes, prompts) or one class a line.")],
    posterior: Annotated[str, typer.Option(help="Posterior directory.")],
    out: Annotated[str, typer.Option(help="Output directory.")],
    labels: Annotated[str | None, typer.Option(help="Label column: report accuracy/ECE/NLL/Brier.")] = None,
    mc: Annotated[int | None, typer.Option(help="Monte Carlo samples (0 = probit).")] = None,
    n_bins: Annotated[int | None, typer.Option(help="ECE / reliability bins.")] = None,
    tracking: TrackingOption = None,
    tracking_uri: TrackingUriOption = None,
    experiment: ExperimentOption = None,
    config: ConfigOption = None,
) -> int:
    """Calibrated zero-shot classification with ProbCosine."""
    cfg = load_config(
        ZeroshotConfig,
        config,
        embeddings=embeddings,
        classes=classes,
        posterior=posterior,
        out=out,
        labels=labels,
        mc=mc,
        n_bins=n_bins,
        tracking=tracking,
        tracking_uri=tracking_uri,
        experiment=experiment,
    )
    s = zeroshot(cfg)
    print(f"zero-shot over {len(s['classes'])} classes, {s['files']} files -> {cfg.out}")
    for kind, values in s.get("metrics", {}).items():
        print(f"  {kind:5s} " + " ".join(f"{k}={v:.4f}" for k, v in values.items()))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(command, argv, "bayescurate zeroshot")


if __name__ == "__main__":
    raise SystemExit(main())
