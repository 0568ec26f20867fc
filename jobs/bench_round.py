"""`bayescurate bench round`: time from "labels are in" to "the next batch is in Label Studio".

At ViT-B/32 sizes (activations d = 768 plus the bias column, embeddings D = 512) on synthetic activations: a
100k-row pool, 256 unlabelled targets, 10 classes, budget 100, 64 joint draws. A synthetic model stands in
for the encoder (its projections have ViT-B/32's shapes and random weights; text activations are hashed
from the prompts); no image is ever encoded, exactly as in a campaign, which works from cached
activations. Per trainer (in-process, Ray Train): `campaign init`, a first step (round 0 is selected and
pushed to the REAL Label Studio), the bot annotator answers all of round 0's tasks, then the timed step:
collect -> train -> update -> re-score -> select -> push of round 1. Writes `results.json` and
`summary.md` under `--out`; every step's time comes from the campaign's own round timings.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from jobs._app import ConfigCommand
from pipeline.config import Config, Renamed
from pipeline.experiments.synthetic_world import WorldSizes, build_world
from pipeline.io import storage
from pipeline.models.synthetic import SyntheticAdapter  # noqa: F401 - its old home
from pipeline.models.synthetic import legacy_synthetic as synthetic  # noqa: F401 - see below
from pipeline.rounds.config import Trainer

# `synthetic` stays importable here: posterior directories written before the model moved to
# `pipeline.models.synthetic` name it "factory:jobs.bench_round:synthetic" (`LEGACY_MODEL`), and load
# through it under that name, which `check_identity` compares. New worlds record the new name.


class BenchRoundConfig(Config):
    """Sizes of the round-latency benchmark (the defaults are the reported ViT-B/32 case)."""

    out: str = Field("out/bench/round", json_schema_extra={"metavar": "DIR"})  # work directory and report
    pool_size: Annotated[int, Renamed("pool")] = 100_000  # pool rows
    num_targets: Annotated[int, Renamed("targets")] = 256  # unlabelled target rows (EPIG's target set)
    num_classes: Annotated[int, Renamed("classes")] = 10  # classes
    image_width: Annotated[int, Renamed("d")] = 768  # image activation width without the bias column, which
    # is appended
    text_width: Annotated[int, Renamed("dt")] = 512  # text activation width
    dim: int = 512  # embedding dimension D
    budget: int = 100  # picks per round, and labels arriving
    draws: int = 64  # joint posterior draws
    neighbours: int = 20  # pool neighbours per target (targeted candidates)
    num_pairs: Annotated[int, Renamed("pairs")] = 8192  # synthetic pairs behind the starting posterior's
    # factors
    selections: tuple[str, ...] = ("float64:1", "float32:10", "float32:25")  # batch selections timed with
    # the in-process re-fit, each "precision:picks_per_step" (float64:1 is the exact greedy batch)
    ray_selection: str | None = "float32:10"  # the selection of one more campaign, re-fitted by Ray Train
    state_dir: str | None = None  # services state dir (default ./.state; started if not running)
    seed: int = 0  # synthetic data and model seed
    quick: bool = False  # tiny sizes for the test suite (seconds)


QUICK = {"pool_size": 600, "num_targets": 24, "num_classes": 4, "image_width": 24, "text_width": 16}
QUICK |= {"dim": 12, "budget": 6, "draws": 8, "num_pairs": 512, "neighbours": 10}
QUICK |= {"selections": ("float64:1",), "ray_selection": None}


def build(cfg: BenchRoundConfig, work: Path) -> dict[str, Any]:
    """The synthetic posterior, pool, targets, truth and image corpus (skipped when already there)."""
    sizes = WorldSizes(
        pool=cfg.pool_size, targets=cfg.num_targets, classes=cfg.num_classes, d=cfg.image_width,
        dt=cfg.text_width, dim=cfg.dim, pairs=cfg.num_pairs, seed=cfg.seed,
    )  # fmt: skip
    return dict(build_world(work, sizes))


def _campaign(
    cfg: BenchRoundConfig, data: dict[str, Any], work: Path, trainer: Trainer, selection: str
) -> dict[str, Any]:
    from connectors.annotator_bot import answer_open_tasks
    from connectors.label_studio import LabelStudioClient
    from jobs.annotate_bot import bot_session, read_truth
    from pipeline.rounds import campaign
    from pipeline.rounds.config import CampaignConfig
    from pipeline.rounds.layout import CampaignDir

    precision, _, per_step = selection.partition(":")
    stamp = hashlib.sha256(f"{work.absolute()}{time.time()}".encode()).hexdigest()[:6]
    name = f"{trainer.value}-{precision}-{per_step or 1}-{stamp}"
    project = f"bench-round-{name}"
    directory = work / f"campaign-{name}"
    camp = CampaignConfig(
        pool=data["pool"], targets=data["targets"], classes=data["classes"], posterior=data["posterior"],
        budget=cfg.budget, draws=cfg.draws, neighbours=cfg.neighbours, seed=cfg.seed, max_rounds=2,
        label_source="label-studio", project=project, state_dir=cfg.state_dir, executor=trainer,
        tracking=False, precision=precision, picks_per_step=int(per_step or 1),
    )  # fmt: skip
    quiet = lambda _: None  # noqa: E731
    t0 = time.perf_counter()
    campaign.init(str(directory), camp, log=quiet)
    t1 = time.perf_counter()
    campaign.step(str(directory), log=quiet)  # round 0: selected and pushed, then waiting
    t2 = time.perf_counter()
    client = LabelStudioClient.from_services(cfg.state_dir)
    bot = bot_session(client, "bench-bot@bayescurate.local", cfg.state_dir)
    answered = answer_open_tasks(
        bot, client, client.find_project(project), read_truth(data["truth"], "label")
    )
    t3 = time.perf_counter()
    report = campaign.step(str(directory), log=quiet)  # labels in -> next batch in Label Studio
    t4 = time.perf_counter()
    first, second = report.state.rounds[0], report.state.rounds[1]
    round0_picks = CampaignDir(str(directory)).round(0).picked_ids()
    steps = {
        "collect": first.timings.get("collect", 0.0),
        "train": first.timings.get("train", 0.0),
        "update": first.timings.get("update", 0.0),
        "rescore": second.timings.get("rescore", 0.0),
        "select": second.timings.get("select", 0.0),
        "push": second.timings.get("push", 0.0),
    }
    return {
        "trainer": trainer.value,
        "selection": selection,
        "project": project,
        "init_s": t1 - t0,
        "first_step_s": t2 - t1,
        "answered": answered.answered,
        "answer_s": t3 - t2,
        "round_s": t4 - t3,
        "steps_s": steps,
        "other_s": (t4 - t3) - sum(steps.values()),
        "train_steps": first.train.get("steps_run"),
        "labels": first.labels_used,
        "candidates": second.counts.selection.candidates,
        "picked": second.picked,
        "round0_picks": round0_picks,
    }


def run(cfg: BenchRoundConfig) -> int:
    """Time a campaign round at ViT-B/32 sizes: labels in -> next ranked batch in Label Studio."""
    from connectors.services import ensure_services
    from pipeline import runtime
    from pipeline.runtime import Executor

    if cfg.quick:
        cfg = cfg.model_copy(update={k: v for k, v in QUICK.items() if k not in cfg.model_fields_set})
    work = Path(cfg.out) / "work"
    ensure_services(cfg.state_dir, mlflow=False)
    started = time.perf_counter()
    data = build(cfg, work)
    build_s = time.perf_counter() - started
    plan = [(Trainer.LOCAL, s) for s in cfg.selections]
    if cfg.ray_selection:
        plan.append((Trainer.RAY, cfg.ray_selection))
    runs = []
    for trainer, selection in plan:
        with runtime.ray_session(Executor.RAY if trainer is Trainer.RAY else Executor.LOCAL):
            runs.append(_campaign(cfg, data, work, trainer, selection))
        print(f"{trainer.value}, {selection}: labels in -> next batch in {runs[-1]['round_s']:.1f} s")
    result: dict[str, Any] = {"config": cfg.model_dump(mode="json"), "build_s": build_s, "runs": runs}
    exact = next((r for r in runs if r["selection"] == "float64:1"), None)
    for r in runs:  # round 0 starts every campaign from the same posterior and seed: its picks compare
        shared = None if exact is None else set(r["round0_picks"]) & set(exact["round0_picks"])
        r["round0_shared"] = None if shared is None else len(shared)
    ray = [r for r in runs if r["trainer"] == "ray"]
    twin = [r for r in runs if r["trainer"] == "local" and ray and r["selection"] == ray[0]["selection"]]
    if ray and twin:
        result["ray_train_overhead"] = ray[0]["steps_s"]["train"] / max(twin[0]["steps_s"]["train"], 1e-9)
        result["ray_round_ratio"] = ray[0]["round_s"] / max(twin[0]["round_s"], 1e-9)
    storage.write_json(Path(cfg.out) / "results.json", result)
    storage.write_text(Path(cfg.out) / "summary.md", summary(result))
    print(summary(result))
    return 0


def summary(result: dict[str, Any]) -> str:
    c = result["config"]
    lines = [
        f"pool {c['pool_size']}, targets {c['num_targets']}, d {c['image_width']}+1, D {c['dim']}, "
        f"{c['num_classes']} classes, "
        f"budget {c['budget']}, {c['draws']} draws",
        "",
        "| re-fit | selection | collect | train | update | re-score | select | push | other "
        "| labels in -> next batch | round-0 picks shared with float64:1 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        s = r["steps_s"]
        lines.append(
            f"| {r['trainer']} | {r['selection']} | {s['collect']:.1f} s | {s['train']:.1f} s | "
            f"{s['update']:.1f} s | "
            f"{s['rescore']:.1f} s | {s['select']:.1f} s | {s['push']:.1f} s | {r['other_s']:.1f} s | "
            f"**{r['round_s']:.1f} s** | "
            + ("" if r.get("round0_shared") is None else f"{r['round0_shared']} of {len(r['round0_picks'])}")
            + " |"
        )
    if "ray_train_overhead" in result:
        lines += [
            "",
            f"Ray Train re-fit / in-process re-fit (same selection): {result['ray_train_overhead']:.1f}x; "
            f"whole round {result['ray_round_ratio']:.2f}x.",
        ]
    return "\n".join(lines) + "\n"


CONFIG = BenchRoundConfig
main = ConfigCommand(BenchRoundConfig, run, "bayescurate bench round")
