"""`bayescurate bench calibration`: MAP vs Bayesian zero-shot calibration of a CLIP model under shift.

Fits the Laplace posterior of both projections on in-domain image–caption pairs of the synthetic world,
then classifies held-out images in-domain and in every shifted domain at several severities with the MAP
predictive and the Bayesian ones (probit, Monte Carlo), for both dampings and a sweep of the tempering τ.
Writes `results.json`, `summary.md` (the tables) and `reliability.png` under `--out`.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Annotated, Any

import torch

from jobs._app import ConfigCommand
from pipeline.bayes.kron import Damping
from pipeline.bayes.metrics import calibration_report, reliability
from pipeline.config import Config, Renamed
from pipeline.data.synthetic import SEVERITIES, SHIFTED_DOMAINS, World, class_names
from pipeline.evaluation import (
    LabelledImages,
    Predictive,
    class_text_features,
    contrastive_factors,
    encode_images,
    encode_texts,
    encode_world,
    fit_head,
    predict,
)
from pipeline.io import storage
from pipeline.progress import track

CLEAN = ("clean", 0)


class CalibrationConfig(Config):
    """What the calibration benchmark fits on and evaluates."""

    model: str = "bayescurate-tiny"  # adapter name or local checkpoint (pipeline.models.adapter.load_model)
    world_seed: int = 0  # synthetic world of the fitting and test samples
    fit_start: int = 1_000_000  # first world index of the fitting pairs (away from pretraining indices)
    n_fit: int = 8192  # image–caption pairs for the Hessian
    block_size: int = 512  # contrastive block size C (docs/method.md §1)
    test_start: int = 2_000_000  # first world index of the test images (same scenes in every domain)
    n_test: int = 1000  # test images per domain and severity
    tasks: tuple[str, ...] = ("shape", "colour")  # zero-shot tasks (pipeline.data.synthetic.TASKS)
    domains: tuple[str, ...] = tuple(d.value for d in SHIFTED_DOMAINS)  # shifted domains
    severities: tuple[int, ...] = (1, 3, 5)  # severities of each shifted domain
    dampings: tuple[Damping, ...] = (Damping.PAPER, Damping.EXACT)  # posterior forms (docs/method.md §3)
    hessian_scales: tuple[float, ...] = (0.1, 1.0, 10.0)  # tempering τ sweep; 1.0 is the reference
    draws: Annotated[int, Renamed("mc_samples")] = 64  # K joint posterior draws of the Monte Carlo predictive
    n_bins: int = 15  # equal-width confidence bins of ECE and the reliability diagram
    batch_size: int = 256  # images per encoder batch
    seed: int = 0  # Monte Carlo seed
    out: str = "out/bench/calibration"  # output folder
    quick: bool = False  # a smoke run of a few seconds (tests) instead of the reported benchmark


# `--quick`: a smoke run of a few seconds (the defaults above are the reported benchmark).
QUICK: dict[str, Any] = {
    "n_fit": 256,
    "block_size": 64,
    "n_test": 64,
    "domains": ("noise", "unseen_textures"),
    "severities": (5,),
    "hessian_scales": (1.0,),
    "draws": 8,
}


def run(cfg: CalibrationConfig) -> dict[str, Any]:
    """Fit, evaluate and write the outputs; returns the JSON document."""
    from pipeline.models.adapter import load_model

    started = time.monotonic()
    for domain in cfg.domains:
        if domain not in {d.value for d in SHIFTED_DOMAINS}:
            raise ValueError(
                f"unknown shifted domain {domain!r}; known: {[d.value for d in SHIFTED_DOMAINS]}"
            )
    for task in cfg.tasks:
        class_names(task)  # raises ValueError naming an unknown task before any work is done
    for severity in cfg.severities:
        if severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {list(SEVERITIES)}, got {severity}")
    adapter = load_model(cfg.model)
    world = World(cfg.world_seed)
    meta = {
        "model": adapter.name,
        "likelihood": str(getattr(adapter.likelihood, "value", adapter.likelihood)),
    }
    image_weight, text_weight = adapter.image_weight().detach(), adapter.text_weight().detach()

    # 1. Hessian on in-domain pairs.
    fit_samples = list(track(world.generate(cfg.n_fit, start=cfg.fit_start), "render fit pairs", cfg.n_fit))
    fit_images = encode_images(adapter, (s.image for s in fit_samples), cfg.batch_size)
    fit_texts = encode_texts(adapter, [s.caption for s in fit_samples])
    image_factors, text_factors = contrastive_factors(
        fit_images,
        fit_texts,
        image_weight,
        text_weight,
        meta["likelihood"],
        adapter.scale,
        adapter.bias,
        cfg.block_size,
        meta,
    )

    # 2. Test sets: the same scenes in-domain and under every shift.
    settings = [CLEAN] + [(d, s) for d in cfg.domains for s in cfg.severities]
    tests: dict[tuple[str, int], LabelledImages] = {
        (d, s): encode_world(adapter, world, cfg.n_test, cfg.test_start, cfg.tasks, d, s, cfg.batch_size)
        for d, s in track(settings, "encode test sets")
    }
    classes = {task: class_text_features(adapter, task) for task in cfg.tasks}

    # 3. Predictives.
    rows: list[dict[str, Any]] = []
    fits: list[dict[str, Any]] = []
    probs_kept: dict[tuple[str, str, str, int], tuple[torch.Tensor, torch.Tensor]] = {}
    map_done = False
    for damping in cfg.dampings:
        for tau in cfg.hessian_scales:
            head = fit_head(
                image_factors,
                text_factors,
                image_weight,
                text_weight,
                adapter.scale,
                adapter.bias,
                meta["likelihood"],
                tau,
                damping,
            )
            fits.append(
                {
                    "damping": Damping(damping).value,
                    "hessian_scale": tau,
                    "prior_precision_image": head.image.prior_precision,
                    "prior_precision_text": head.text.prior_precision,
                }
            )
            predictives = [Predictive.PROBIT, Predictive.MC] + ([] if map_done else [Predictive.MAP])
            for (domain, severity), test in tests.items():
                for task in cfg.tasks:
                    labels = test.labels[task]
                    for pred in predictives:
                        probs = predict(head, test.features, classes[task], pred, cfg.draws, cfg.seed)
                        name = _name(pred, damping)
                        report = calibration_report(probs, labels, cfg.n_bins)
                        rows.append(
                            {
                                "task": task,
                                "domain": domain,
                                "severity": severity,
                                "predictive": name,
                                "damping": None if pred is Predictive.MAP else Damping(damping).value,
                                "hessian_scale": None if pred is Predictive.MAP else tau,
                                **report,
                            }
                        )
                        if math.isclose(tau, 1.0) or pred is Predictive.MAP:
                            probs_kept[(name, task, domain, severity)] = (probs, labels)
            map_done = True

    doc = {
        "config": cfg.model_dump(mode="json"),
        "model": adapter.identity() if hasattr(adapter, "identity") else {"name": adapter.name},
        "factors": {
            "n": image_factors.n,
            "d_image": image_factors.d,
            "d_text": text_factors.d,
            "D": image_factors.D,
        },
        "fits": fits,
        "rows": rows,
        "seconds": round(time.monotonic() - started, 1),
    }
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    storage.write_text(out / "results.json", json.dumps(doc, indent=1, default=str))
    storage.write_text(out / "summary.md", summary_markdown(doc))
    plot_reliability(probs_kept, cfg, out / "reliability.png")
    return doc


def _name(pred: Predictive, damping: Damping | str) -> str:
    return "MAP" if pred is Predictive.MAP else f"{Damping(damping).value}-{pred.value}"


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows) if rows else math.nan


# Mean confidence next to accuracy: whether MAP is over- or under-confident decides what Bayes can fix.
METRICS = ("accuracy", "mean_confidence", "ece", "nll", "brier", "auroc_entropy_error")


def summary_markdown(doc: dict[str, Any]) -> str:
    """The benchmark's tables: τ = 1 per task and severity (shifts averaged), the τ sweep, the full grid."""
    cfg = doc["config"]
    rows = doc["rows"]
    reference = [r for r in rows if r["hessian_scale"] in (None, 1.0)]
    lines = [
        "# Calibration benchmark",
        "",
        f"Model `{cfg['model']}`; posterior from {doc['factors']['n']:.0f} in-domain pairs "
        f"(contrastive blocks of {cfg['block_size']}); {cfg['n_test']} test images per domain and severity; "
        f"ECE with {cfg['n_bins']} equal-width bins; Brier summed over classes; MC with "
        f"{cfg['draws']} joint draws; AUROC = predictive entropy separating wrong from right.",
        "",
        "## τ = 1: in-domain and shifted (mean over the shifted domains at each severity)",
        "",
    ]
    header = "| task | test set | predictive | acc | conf | ECE | NLL | Brier | AUROC |"
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in reference:
        where = "clean" if r["domain"] == "clean" else f"shift s={r['severity']}"
        groups[(r["task"], where, r["predictive"])].append(r)
        if r["domain"] != "clean":
            groups[(r["task"], "shift all", r["predictive"])].append(r)
    lines += [header, "|" + "---|" * 9]
    sets = (
        ["clean"]
        + [f"shift s={s}" for s in cfg["severities"]]
        + (["shift all"] if len(cfg["severities"]) > 1 else [])
    )
    order = ["MAP"] + [f"{d}-{p}" for d in cfg["dampings"] for p in ("probit", "mc")]
    for task in cfg["tasks"]:
        for where in sets:
            for pred in order:
                group = groups.get((task, where, pred), [])
                if group:
                    vals = " | ".join(f"{_mean(group, m):.4f}" for m in METRICS)
                    lines.append(f"| {task} | {where} | {pred} | {vals} |")

    lines += ["", "## τ sweep (λ by marginal likelihood; shifted = mean over all shifted test sets)", ""]
    lines += [
        "| damping | τ | λ image | λ text | predictive | clean ECE | clean NLL | shifted acc | "
        "shifted ECE | shifted NLL | shifted Brier |",
        "|" + "---|" * 11,
    ]
    map_rows = [r for r in rows if r["predictive"] == "MAP"]
    lines.append(_sweep_line("—", "—", "—", "—", "MAP", map_rows))
    for fit in doc["fits"]:
        for pred in ("probit", "mc"):
            name = f"{fit['damping']}-{pred}"
            sel = [r for r in rows if r["predictive"] == name and r["hessian_scale"] == fit["hessian_scale"]]
            lines.append(
                _sweep_line(
                    fit["damping"],
                    f"{fit['hessian_scale']:g}",
                    f"{fit['prior_precision_image']:.3g}",
                    f"{fit['prior_precision_text']:.3g}",
                    pred,
                    sel,
                )
            )

    lines += [
        "",
        "## Full grid (τ = 1)",
        "",
        "| task | domain | sev | predictive | acc | conf | ECE | NLL | Brier | AUROC |",
        "|" + "---|" * 10,
    ]
    for r in reference:
        vals = " | ".join(f"{r[m]:.4f}" for m in METRICS)
        lines.append(f"| {r['task']} | {r['domain']} | {r['severity']} | {r['predictive']} | {vals} |")
    lines += ["", f"Run time {doc['seconds']} s."]
    return "\n".join(lines) + "\n"


def _sweep_line(damping: str, tau: str, lam_i: str, lam_t: str, pred: str, sel: list[dict[str, Any]]) -> str:
    clean = [r for r in sel if r["domain"] == "clean"]
    shifted = [r for r in sel if r["domain"] != "clean"]
    vals = [
        _mean(clean, "ece"),
        _mean(clean, "nll"),
        _mean(shifted, "accuracy"),
        _mean(shifted, "ece"),
        _mean(shifted, "nll"),
        _mean(shifted, "brier"),
    ]
    return (
        f"| {damping} | {tau} | {lam_i} | {lam_t} | {pred} | " + " | ".join(f"{v:.4f}" for v in vals) + " |"
    )


def plot_reliability(
    kept: dict[tuple[str, str, str, int], tuple[torch.Tensor, torch.Tensor]],
    cfg: CalibrationConfig,
    path: Path,
) -> None:
    """Reliability diagrams (τ = 1): per task, in-domain and all shifts at the highest severity pooled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worst = max(cfg.severities)
    names = ["MAP"] + [_name(p, d) for d in cfg.dampings for p in (Predictive.PROBIT, Predictive.MC)]
    fig, axes = plt.subplots(len(cfg.tasks), 2, figsize=(10, 4.6 * len(cfg.tasks)), squeeze=False)
    for row, task in enumerate(cfg.tasks):
        for col, (title, sets) in enumerate(
            [
                ("in-domain", [CLEAN]),
                (f"shifted, severity {worst} (all domains)", [(d, worst) for d in cfg.domains]),
            ]
        ):
            ax = axes[row][col]
            ax.plot([0, 1], [0, 1], color="grey", lw=1, ls=":")
            for name in names:
                parts = [kept[(name, task, d, s)] for d, s in sets if (name, task, d, s) in kept]
                if not parts:
                    continue
                probs = torch.cat([p for p, _ in parts])
                labels = torch.cat([y for _, y in parts])
                rel = reliability(probs, labels, cfg.n_bins)
                filled = rel.counts > 0
                report = calibration_report(probs, labels, cfg.n_bins)
                ax.plot(
                    rel.confidence[filled],
                    rel.accuracy[filled],
                    marker="o",
                    ms=3,
                    label=f"{name} (ECE {report['ece']:.3f}, acc {report['accuracy']:.2f})",
                )
            ax.set(title=f"{task}: {title}", xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
            ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main_run(cfg: CalibrationConfig) -> int:
    """MAP vs Bayesian zero-shot calibration in-domain and under shift (both dampings, a τ sweep)."""
    if cfg.quick:  # the smoke-run sizes, below anything the config file or a flag set explicitly
        cfg = cfg.model_copy(update={k: v for k, v in QUICK.items() if k not in cfg.model_fields_set})
    doc = run(cfg)
    print(f"wrote {cfg.out}/summary.md, results.json, reliability.png ({doc['seconds']} s)")
    return 0


CONFIG = CalibrationConfig
main = ConfigCommand(CalibrationConfig, main_run, "bayescurate bench calibration")

if __name__ == "__main__":
    raise SystemExit(main())
