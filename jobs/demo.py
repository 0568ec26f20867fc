"""`bayescurate demo`: one curation round end to end on the embedded defaults.

Starts the local MLflow and Label Studio servers, writes a synthetic world (image-caption pairs, an
unlabelled pool mixing the training domain with a shifted one plus a few corrupt files, and a target
set from the shifted domain), fits the Laplace posterior of the shipped tiny CLIP on Ray, embeds the pool
and targets with their uncertainty, scores zero-shot calibration, picks the images most informative about
the target domain (targeted EPIG) and sends them to Label Studio with the model's predictions. Every step is
a `bayescurate` command run in-process, so the demo is also their integration test. Re-running reuses what
is done: completed shards are skipped and tasks are deduplicated by sample_id.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from jobs import embed, fit_posterior, make_world, select, zeroshot
from jobs._app import ConfigOption, NumCpusOption, run_command
from pipeline import runtime
from pipeline.config import Config, load_config


class DemoConfig(Config):
    out: str = "out/demo"  # where corpora, posterior, embeddings and reports go
    services: bool = True  # start local MLflow + Label Studio (False: sqlite tracking, no annotation tasks)
    state_dir: str | None = None  # services state dir (default: ./.state)
    model: str = "bayescurate-tiny"  # model to make Bayesian
    task: str = "shape"  # zero-shot task of the synthetic world (shape or colour)
    pairs: int = 2048  # image-caption pairs for the posterior
    pool: int = 2000  # unlabelled pool size (half in-domain, half shifted)
    targets: int = 200  # target-domain examples
    target_domain: str = "blur"  # the shifted domain the curation targets (the tiny model degrades on it)
    target_severity: int = 2  # its severity (1..5)
    corrupt: float = 0.01  # fraction of corrupt pool files (quarantined, the run goes on)
    budget: int = 16  # images sent to annotators
    project: str = "bayescurate-demo"  # Label Studio project
    num_cpus: int | None = None  # CPUs of the embedded Ray (default: all)
    seed: int = 0  # world and Monte Carlo seed


def _step(title: str, fn: Any, command: str, **flags: Any) -> None:
    """Run `bayescurate COMMAND --flag value ...` in-process; flags with value True are bare switches."""
    argv: list[str] = []
    for key, value in flags.items():
        if value is None or value is False:
            continue
        argv.append("--" + key.replace("_", "-"))
        if value is not True:
            argv.append(str(value))
    print(f"\n== {title}\n$ bayescurate {command} {' '.join(argv)}", flush=True)
    started = time.perf_counter()
    code = fn(argv)
    if code != 0:
        raise RuntimeError(f"step {title!r} failed with exit code {code}")
    print(f"({time.perf_counter() - started:.1f} s)", flush=True)


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
    make = make_world.main
    _step("world: image-caption pairs", make, "make-world", out=pairs, n=cfg.pairs, seed=cfg.seed)
    _step(
        "world: pool, in-domain half (with corrupt files)",
        make,
        "make-world",
        out=pool / "clean",
        n=half,
        seed=cfg.seed,
        start=1_000_000,
        corrupt=cfg.corrupt,
    )
    _step(
        "world: pool, shifted half",
        make,
        "make-world",
        out=pool / "shifted",
        n=cfg.pool - half,
        seed=cfg.seed,
        start=2_000_000,
        **shifted,
    )
    _step(
        "world: targets",
        make,
        "make-world",
        out=targets,
        n=cfg.targets,
        seed=cfg.seed,
        start=3_000_000,
        **shifted,
    )
    classes = pairs / "classes" / f"{cfg.task}.json"

    started_ray = runtime.init_ray(None, cfg.num_cpus)  # one Ray for every step
    try:
        _step(
            "fit the Laplace posterior (KFAC factors per worker, reduced)",
            fit_posterior.main,
            "fit-posterior",
            pairs=pairs,
            model=cfg.model,
            out=posterior,
            **track,
        )
        for name, corpus, dest in (("pool", pool, emb_pool), ("targets", targets, emb_targets)):
            _step(
                f"embed the {name} with uncertainty",
                embed.main,
                "embed",
                images=corpus,
                posterior=posterior,
                out=dest,
                activations=True,
            )
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    _step(
        "zero-shot calibration on the pool (MAP vs Bayesian)",
        zeroshot.main,
        "zeroshot",
        embeddings=emb_pool,
        classes=classes,
        posterior=posterior,
        out=out / "zeroshot",
        labels=cfg.task,
        **track,
    )
    _step(
        "select what annotators label next (targeted EPIG)",
        select.main,
        "select",
        pool=emb_pool,
        targets=emb_targets,
        posterior=posterior,
        classes=classes,
        out=out / "selection",
        budget=cfg.budget,
        seed=cfg.seed,
        project=cfg.project if cfg.services else None,
        corpus=pool if cfg.services else None,
        state_dir=cfg.state_dir,
    )
    metrics = json.loads((out / "zeroshot" / "metrics.json").read_text()).get("metrics", {})
    selection = json.loads((out / "selection" / "selection.json").read_text())
    login = state.label_studio.admin_file if state and state.label_studio else None
    return {
        "mlflow": tracking_uri,
        "label_studio": selection.get("label_studio", {}).get("url"),
        "login_file": login,
        "metrics": metrics,
        "selection": selection,
        "out": str(out),
    }


def command(
    out: Annotated[str | None, typer.Option(help="Output directory.")] = None,
    services: Annotated[
        bool | None, typer.Option("--services/--no-services", help="Start local MLflow and Label Studio.")
    ] = None,
    state_dir: Annotated[str | None, typer.Option(help="Services state directory.")] = None,
    pool: Annotated[int | None, typer.Option(help="Unlabelled pool size.")] = None,
    pairs: Annotated[int | None, typer.Option(help="Image-caption pairs for the posterior.")] = None,
    budget: Annotated[int | None, typer.Option(help="Images sent to annotators.")] = None,
    num_cpus: NumCpusOption = None,
    config: ConfigOption = None,
) -> int:
    """Run one curation round end to end on the embedded defaults, then print where to look."""
    cfg = load_config(
        DemoConfig,
        config,
        out=out,
        services=services,
        state_dir=state_dir,
        pool=pool,
        pairs=pairs,
        budget=budget,
        num_cpus=num_cpus,
    )
    result = run_demo(cfg)
    print("\n== done")
    for predictor, report in result["metrics"].items():
        figures = ", ".join(f"{k} {v:.3f}" for k, v in report.items() if isinstance(v, float))
        print(f"  {predictor:>6}: {figures}")
    print(f"  selected {result['selection']['selected']} of {result['selection']['candidates']} candidates")
    print(f"  MLflow:       {result['mlflow']}")
    if result["label_studio"]:
        print(f"  Label Studio: {result['label_studio']}")
        print(f"                (the UI login is in {result['login_file']}, readable by you only)")
    print(f"  outputs:      {result['out']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(command, argv, "bayescurate demo")
