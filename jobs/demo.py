"""`bayescurate demo`: one curation round end to end on the embedded defaults.

Starts the local MLflow and Label Studio servers, writes a synthetic world (image-caption pairs, an
unlabelled pool mixing the training domain with a shifted one plus a few corrupt files, and a target
set from the shifted domain), fits the Laplace posterior of the shipped tiny CLIP on Ray, embeds the pool
and targets with their uncertainty, scores zero-shot calibration, picks the images most informative about
the target domain (targeted EPIG) and sends them to Label Studio with the model's predictions. Every step
is a library flow (`pipeline.flows`), the same code the commands run. Re-running reuses what is done:
completed shards are skipped and tasks are deduplicated by sample_id.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from jobs._app import ConfigCommand
from pipeline import runtime
from pipeline.config import Config
from pipeline.data.synthetic import Domain
from pipeline.flows.embed import EmbedConfig, embed
from pipeline.flows.fit import FitConfig, fit_posterior
from pipeline.flows.select import SelectConfig, select
from pipeline.flows.world import MakeWorldConfig, make_world
from pipeline.flows.zeroshot import ZeroshotConfig, zeroshot

R = TypeVar("R")


class DemoConfig(Config):
    """The demo's world, model and round."""

    out: str = "out/demo"  # where corpora, posterior, embeddings and reports go
    services: bool = True  # start local MLflow + Label Studio (off: sqlite tracking, no annotation tasks)
    state_dir: str | None = None  # services state dir (default: ./.state)
    model: str = "bayescurate-tiny"  # model to make Bayesian
    task: str = "shape"  # zero-shot task of the synthetic world (shape or colour)
    pairs: int = 2048  # image-caption pairs for the posterior
    pool: int = 2000  # unlabelled pool size (half in-domain, half shifted)
    targets: int = 200  # target-domain examples
    target_domain: Domain = Domain.BLUR  # the shifted domain the curation targets (the tiny model degrades)
    target_severity: int = 2  # its severity (1..5)
    corrupt: float = 0.01  # fraction of corrupt pool files (quarantined, the run goes on)
    budget: int = 16  # images sent to annotators
    project: str = "bayescurate-demo"  # Label Studio project and MLflow experiment
    num_cpus: int | None = None  # CPUs of the embedded Ray (default: all)
    seed: int = 0  # world and Monte Carlo seed


def _step(title: str, fn: Callable[[Any], R], cfg: Config) -> R:
    print(f"\n== {title}", flush=True)
    started = time.perf_counter()
    result = fn(cfg)
    print(f"({time.perf_counter() - started:.1f} s)", flush=True)
    return result


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    out = Path(cfg.out).absolute()
    world = out / "world"
    pairs, pool, targets = world / "pairs", world / "pool", world / "targets"
    posterior, emb_pool, emb_targets = out / "posterior", out / "embeddings/pool", out / "embeddings/targets"
    state = None
    if cfg.services:
        from connectors.services import ensure_services

        print(
            "== starting local MLflow and Label Studio (the very first start takes a few minutes)", flush=True
        )
        state = ensure_services(cfg.state_dir)
        tracking_uri = state.mlflow_url
    else:
        from connectors.tracking import local_tracking_uri

        tracking_uri = local_tracking_uri(cfg.state_dir)
    track = {"tracking_uri": tracking_uri, "experiment": cfg.project}
    shifted = {"domain": cfg.target_domain, "severity": cfg.target_severity}
    half = cfg.pool // 2
    worlds = [
        ("image-caption pairs", {"out": str(pairs), "n": cfg.pairs}),
        (
            "pool, in-domain half (with corrupt files)",
            {"out": str(pool / "clean"), "n": half, "start": 1_000_000, "corrupt": cfg.corrupt},
        ),
        (
            "pool, shifted half",
            {"out": str(pool / "shifted"), "n": cfg.pool - half, "start": 2_000_000, **shifted},
        ),
        ("targets", {"out": str(targets), "n": cfg.targets, "start": 3_000_000, **shifted}),
    ]
    for title, fields in worlds:
        _step(f"world: {title}", make_world, MakeWorldConfig(seed=cfg.seed, **fields))
    classes = pairs / "classes" / f"{cfg.task}.json"

    with runtime.ray_session(num_cpus=cfg.num_cpus):  # one Ray for every step
        fit = FitConfig(pairs=str(pairs), model=cfg.model, out=str(posterior), **track)
        _step("fit the Laplace posterior (KFAC factors per worker, reduced)", fit_posterior, fit)
        for name, corpus, dest in (("pool", pool, emb_pool), ("targets", targets, emb_targets)):
            emb = EmbedConfig(images=str(corpus), posterior=str(posterior), out=str(dest), activations=True)
            _step(f"embed the {name} with uncertainty", embed, emb)
    zs = ZeroshotConfig(
        embeddings=str(emb_pool),
        classes=str(classes),
        posterior=str(posterior),
        out=str(out / "zeroshot"),
        labels=cfg.task,
        **track,
    )
    report = _step("zero-shot calibration on the pool (MAP vs Bayesian)", zeroshot, zs)
    sel = SelectConfig(
        pool=str(emb_pool),
        targets=str(emb_targets),
        posterior=str(posterior),
        classes=str(classes),
        out=str(out / "selection"),
        budget=cfg.budget,
        seed=cfg.seed,
        project=cfg.project if cfg.services else None,
        state_dir=cfg.state_dir,
    )
    selection = _step("select what annotators label next (targeted EPIG)", select, sel)
    login = state.label_studio.admin_file if state and state.label_studio else None
    return {
        "mlflow": tracking_uri,
        "label_studio": (selection.label_studio or {}).get("url"),
        "login_file": login,
        "metrics": report.metrics,
        "selection": selection.to_json(),
        "out": str(out),
    }


def run(cfg: DemoConfig) -> int:
    """Run one curation round end to end on the embedded defaults, then print where to look."""
    result = run_demo(cfg)
    print("\n== done")
    for predictor, values in result["metrics"].items():
        figures = ", ".join(f"{k} {v:.3f}" for k, v in values.items() if isinstance(v, float))
        print(f"  {predictor:>6}: {figures}")
    print(f"  selected {result['selection']['selected']} of {result['selection']['candidates']} candidates")
    print(f"  MLflow:       {result['mlflow']}")
    if result["label_studio"]:
        print(f"  Label Studio: {result['label_studio']}")
        print(f"                (the UI login is in {result['login_file']}, readable by you only)")
    print(f"  outputs:      {result['out']}")
    return 0


CONFIG = DemoConfig
main = ConfigCommand(DemoConfig, run, "bayescurate demo")
