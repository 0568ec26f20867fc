"""`bayescurate demo`: a whole annotation campaign on the embedded defaults.

Starts the local MLflow and Label Studio servers, writes a synthetic world (image-caption pairs; an
unlabelled pool mixing the training domain with a shifted one, plus a few corrupt files; targets and a
labelled evaluation set from the shifted domain), fits the Laplace posterior of the shipped tiny CLIP on
Ray, embeds pool, targets and evaluation set with their uncertainty, then runs a campaign of `rounds`
rounds through the REAL Label Studio: targeted EPIG picks a batch, the tasks appear in Label Studio with
the model's prediction and uncertainty, a bot annotator (a real Label Studio user) answers them from the
world's ground truth, Ray Train re-fits the image projection on all labels, the posterior is updated, and
MLflow records every round. Every step is a library flow; re-running reuses what is done.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

from pydantic import Field

from jobs._app import ConfigCommand
from pipeline import runtime
from pipeline.config import Config, Renamed
from pipeline.data.synthetic import Domain
from pipeline.flows.embed import EmbedConfig, embed
from pipeline.flows.fit import FitConfig, fit_posterior
from pipeline.flows.world import MakeWorldConfig, make_world
from pipeline.flows.zeroshot import ZeroshotConfig, zeroshot
from pipeline.rounds.config import CampaignConfig, LabelSource, Trainer

if TYPE_CHECKING:
    from pipeline.rounds.status import CampaignStatus

R = TypeVar("R")


class DemoConfig(Config):
    """The demo's world, model and campaign."""

    out: str = Field(
        "out/demo", json_schema_extra={"metavar": "DIR"}
    )  # where corpora, posterior, embeddings, the campaign and reports go
    services: bool = True  # local MLflow + Label Studio (off: sqlite tracking and the oracle label source)
    state_dir: str | None = None  # services state dir (default: ./.state)
    model: str = "bayescurate-tiny"  # model to make Bayesian
    task: str = "shape"  # zero-shot task of the synthetic world (shape or colour)
    num_pairs: Annotated[int, Renamed("pairs")] = 2048  # image-caption pairs for the posterior
    pool_size: Annotated[int, Renamed("pool")] = 2000  # unlabelled pool images (half in-domain, half shifted)
    num_targets: Annotated[int, Renamed("targets")] = 200  # unlabelled target-domain examples (what EPIG is
    # informative about)
    num_eval: Annotated[int, Renamed("eval")] = 500  # labelled target-domain examples the rounds are
    # evaluated on
    target_domain: Domain = Domain.BLUR  # the shifted domain the curation targets (the tiny model degrades)
    target_severity: int = 3  # its severity (1..5)
    corrupt: float = 0.01  # fraction of corrupt pool files (quarantined, the run goes on)
    budget: int = 16  # tasks per round
    rounds: int = 3  # annotation rounds
    executor: Annotated[Trainer, Renamed("trainer")] = Trainer.RAY  # where the projection is re-fitted
    noise: float = 0.0  # the bot annotator's share of wrong answers
    project: str = "bayescurate-demo"  # Label Studio project and MLflow experiment
    num_cpus: int | None = None  # CPUs of the embedded Ray (default: all)
    seed: int = 0  # world and Monte Carlo seed


def _step(title: str, fn: Callable[[Any], R], cfg: Any) -> R:
    print(f"\n== {title}", flush=True)
    started = time.perf_counter()
    result = fn(cfg)
    print(f"({time.perf_counter() - started:.1f} s)", flush=True)
    return result


def prepare(cfg: DemoConfig, out: Path, tracking_uri: str | None) -> dict[str, Path]:
    """World, posterior, embeddings (skipping what is done); returns their paths."""
    world = out / "world"
    paths = {
        "pairs": world / "pairs",
        "pool": world / "pool",
        "targets": world / "targets",
        "eval": world / "eval",
        "posterior": out / "posterior",
    }
    shifted = {"domain": cfg.target_domain, "severity": cfg.target_severity}
    half = cfg.pool_size // 2
    worlds = [
        ("image-caption pairs", {"out": str(paths["pairs"]), "n": cfg.num_pairs}),
        (
            "pool, in-domain half (with corrupt files)",
            {"out": str(paths["pool"] / "clean"), "n": half, "start": 1_000_000, "corrupt": cfg.corrupt},
        ),
        (
            "pool, shifted half",
            {"out": str(paths["pool"] / "shifted"), "n": cfg.pool_size - half, "start": 2_000_000, **shifted},
        ),
        ("targets", {"out": str(paths["targets"]), "n": cfg.num_targets, "start": 3_000_000, **shifted}),
        (
            "labelled evaluation set",
            {"out": str(paths["eval"]), "n": cfg.num_eval, "start": 4_000_000, **shifted},
        ),
    ]
    for title, fields in worlds:
        if not (Path(fields["out"]) / "classes").is_dir():
            _step(f"world: {title}", make_world, MakeWorldConfig(seed=cfg.seed, **fields))
    track = {"tracking": tracking_uri is not None, "tracking_uri": tracking_uri, "experiment": cfg.project}
    fit = FitConfig(pairs=str(paths["pairs"]), model=cfg.model, out=str(paths["posterior"]), **track)
    _step("fit the Laplace posterior (KFAC factors per worker, reduced)", fit_posterior, fit)
    for name in ("pool", "targets", "eval"):
        dest = out / "embeddings" / name
        emb = EmbedConfig(
            images=str(paths[name]),
            posterior=str(paths["posterior"]),
            out=str(dest),
            activations=True,
            **track,
        )
        _step(f"embed the {name} with uncertainty and activations", embed, emb)
        paths[f"emb_{name}"] = dest
    return paths


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    from pipeline.rounds import campaign

    out = Path(cfg.out).absolute()
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
    with runtime.ray_session(num_cpus=cfg.num_cpus):  # one Ray for every step and every round
        paths = prepare(cfg, out, tracking_uri)
        classes = paths["pairs"] / "classes" / f"{cfg.task}.json"
        zs = ZeroshotConfig(
            embeddings=str(paths["emb_pool"]),
            classes=str(classes),
            posterior=str(paths["posterior"]),
            out=str(out / "zeroshot"),
            label_column=cfg.task,
            tracking_uri=tracking_uri,
            experiment=cfg.project,
        )
        _step("zero-shot calibration on the pool (MAP vs Bayesian)", zeroshot, zs)
        directory = str(out / "campaign")
        camp = CampaignConfig(
            pool=str(paths["emb_pool"]),
            targets=str(paths["emb_targets"]),
            eval=str(paths["emb_eval"]),
            classes=str(classes),
            posterior=str(paths["posterior"]),
            budget=cfg.budget,
            max_rounds=cfg.rounds,
            seed=cfg.seed,
            label_source=LabelSource.LABEL_STUDIO if cfg.services else LabelSource.ORACLE,
            truth=None if cfg.services else str(paths["emb_pool"]),
            project=cfg.project,
            state_dir=cfg.state_dir,
            executor=cfg.executor,
            tracking_uri=tracking_uri,
            experiment=cfg.project,
        )
        print(f"\n== campaign {directory}: {cfg.rounds} rounds of {cfg.budget} tasks", flush=True)
        campaign.init(directory, camp)
        annotate = _bot(cfg, paths) if cfg.services else None
        while True:
            report = campaign.step(directory)
            if report.state.completed >= cfg.rounds or report.finished:
                break
            if report.waiting and annotate is not None:
                print("-- the bot annotator answers in Label Studio", flush=True)
                annotate()
    login = state.label_studio.admin_file if state and state.label_studio else None
    status = campaign.status(directory)
    return {
        "mlflow": status.mlflow or tracking_uri,
        "label_studio": _project_url(cfg, status.method.value) if cfg.services else None,
        "login_file": login,
        "status": status,
        "out": str(out),
    }


def _bot(cfg: DemoConfig, paths: dict[str, Path]) -> Callable[[], None]:
    from connectors.annotator_bot import answer_open_tasks
    from connectors.label_studio import LabelStudioClient
    from jobs.annotate_bot import bot_session, read_truth

    client = LabelStudioClient.from_services(cfg.state_dir)
    truth = read_truth(str(paths["emb_pool"]), cfg.task)
    bot = bot_session(client, "demo-annotator@bayescurate.local", cfg.state_dir)

    def annotate() -> None:
        project = client.find_project(cfg.project)
        counts = answer_open_tasks(bot, client, project, truth, noise=cfg.noise, seed=cfg.seed)
        print(
            f"   answered {counts.answered} tasks ({counts.wrong} wrong on purpose), skipped {counts.skipped}"
        )

    return annotate


def _project_url(cfg: DemoConfig, method: str) -> str | None:
    """The project's Data Manager, on the tab the rounds made (image, prediction, informativeness first)."""
    from connectors.label_studio import LabelStudioClient
    from pipeline.annotation import tab_title

    client = LabelStudioClient.from_services(cfg.state_dir)
    project = client.find_project(cfg.project)
    if project is None:
        return None
    view = client.find_view(project, tab_title(method))
    return f"{client.url}/projects/{project.id}/data" + (f"?tab={view}" if view is not None else "")


def rounds_table(status: CampaignStatus) -> str:
    """The demo's closing table: labels and target-domain metrics per round, MAP vs Bayes."""
    lines = [
        "| round | labels | accuracy MAP / Bayes | ECE MAP / Bayes | NLL MAP / Bayes |",
        "|---|---|---|---|---|",
    ]
    rows = [("start", 0, status.baseline)]
    rows += [(str(r.index), r.labels_used, r.metrics) for r in status.rounds if r.metrics]
    for name, labels, m in rows:
        if not m.get("MAP"):
            continue
        a, b = m["MAP"], m["Bayes"]
        lines.append(
            f"| {name} | {labels} | {a['accuracy']:.3f} / {b['accuracy']:.3f} "
            f"| {a['ece']:.3f} / {b['ece']:.3f} | {a['nll']:.3f} / {b['nll']:.3f} |"
        )
    return "\n".join(lines)


def run(cfg: DemoConfig) -> int:
    """Run an annotation campaign end to end on the embedded defaults, then print where to look."""
    result = run_demo(cfg)
    print("\n== done: target-domain evaluation after each round")
    print(rounds_table(result["status"]))
    print(f"\n  MLflow:       {result['mlflow']}")
    if result["label_studio"]:
        print(f"  Label Studio: {result['label_studio']}")
        print(f"                (the UI login is in {result['login_file']}, readable by you only)")
    print(f"  outputs:      {result['out']}")
    print(f"  campaign:     bayescurate campaign status {result['out']}/campaign")
    return 0


CONFIG = DemoConfig
main = ConfigCommand(DemoConfig, run, "bayescurate demo")
