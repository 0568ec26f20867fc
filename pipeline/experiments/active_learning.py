"""The active-learning experiment: accuracy per label of the acquisition functions, in real campaigns.

On the synthetic world with the tiny CLIP: the pool mixes in-domain images, every shifted domain at one
severity and a few corrupt files (quarantined by `embed`); the targets are an unlabelled sample of one
shifted domain and the evaluation set a disjoint labelled sample of that same domain. The posterior is
fitted and pool, targets and evaluation set are embedded (with activations) once, shared by every run
(`campaign_world`). Each method and seed is then a campaign run exactly as users run one (`campaign.init`
+ `campaign.run`, the `oracle` label source, the local trainer); EPIG also runs with `batch: stochastic`
beside its greedy batches, and one more campaign re-fits with Ray Train and is compared with its local
twin. `run` writes `results.json`, `curves.png` and `summary.md` (`reports.active_learning`) under
`out`; `out`/work keeps the world and the campaigns, so a re-run with the same settings resumes.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pipeline.config import Config, Renamed
from pipeline.data.synthetic import SEVERITIES, SHIFTED_DOMAINS, Domain, class_names
from pipeline.experiments.active_learning_analysis import (
    DEFAULT_BETA,
    METRICS,
    PREDICTIVES,
    STOCHASTIC_EPIG,
    UNTARGETED,
    aggregate,
    beta_sweep,
    curve,
    goals,
)
from pipeline.experiments.campaign_world import CampaignWorld, CampaignWorldSpec, build_campaign_world
from pipeline.io import storage
from pipeline.rounds.layout import CampaignDir, RoundFiles
from pipeline.selection import Acquisition

if TYPE_CHECKING:
    from pipeline.rounds.status import RoundStatus

METHODS: tuple[Acquisition, ...] = (
    Acquisition.RANDOM,
    Acquisition.ENTROPY,
    Acquisition.BALD,
    Acquisition.EPIG,
    Acquisition.EPIG_INDEPENDENT,
)


class ActiveLearningConfig(Config):
    """The world, the campaigns and the methods of the active-learning benchmark."""

    model: str = "bayescurate-tiny"  # model whose posterior the campaigns refine
    task: str = "shape"  # zero-shot task of the synthetic world (its classes file)
    world_seed: int = 0  # synthetic world seed: one world for every method and seed
    num_pairs: Annotated[int, Renamed("pairs")] = 2048  # in-domain image–caption pairs the starting
    # posterior is fitted on
    pool_clean: int = 400  # in-domain pool images
    pool_per_domain: int = 400  # pool images per shifted domain
    pool_domains: tuple[Domain, ...] = SHIFTED_DOMAINS  # shifted domains in the pool
    severity: int = 3  # severity of every shifted domain (1..5)
    corrupt: float = 0.02  # fraction of the in-domain pool files made corrupt (embed quarantines them)
    target_domain: Domain = Domain.BLUR  # the shifted domain the campaigns target and are evaluated on
    num_targets: Annotated[int, Renamed("targets")] = 200  # unlabelled target-domain images (what EPIG is
    # informative about)
    num_eval: Annotated[int, Renamed("eval")] = 1000  # labelled target-domain images scored after every
    # round (their own world indices)
    methods: tuple[Acquisition, ...] = METHODS  # acquisition functions compared
    untargeted_random: bool = True  # also random over the whole pool (no targets): what the kNN step buys
    stochastic_epig: bool = True  # also EPIG with `batch: stochastic` (power sampling at the default
    # beta), the row `epig-stochastic`, judged against greedy EPIG's gain over random (when --methods has
    # epig)
    beta_sweep: tuple[float, ...] = (1.0, 2.0, 8.0, 16.0)  # more exponents of that power sampling, as
    # the rows `epig-stochastic-beta1`, `-beta2`, ... (with --stochastic-epig)
    seeds: tuple[int, ...] = (0, 1, 2)  # campaign seeds (round r uses seed + r)
    rounds: int = 8  # annotation rounds per campaign
    budget: int = 20  # labels per round
    draws: int = 64  # joint posterior draws of EPIG and BALD
    ray_check: bool = True  # one more campaign with `executor: ray`, compared with its local twin
    ray_method: Acquisition = Acquisition.EPIG  # method of the Ray Train campaign
    ray_seed: int = 0  # seed of the Ray Train campaign
    num_cpus: int | None = None  # CPUs of the embedded Ray of the Ray Train campaign (default: all)
    out: str = "out/bench/active-learning"  # output folder (work/ keeps the world and the campaigns)
    quick: bool = False  # a smoke run of a minute or two (tests) instead of the reported benchmark

    def effective(self) -> ActiveLearningConfig:
        """With `quick`, the smoke-run sizes (`QUICK`) below anything set explicitly; else itself."""
        if not self.quick:
            return self
        return self.model_copy(update={k: v for k, v in QUICK.items() if k not in self.model_fields_set})


# `quick`: a smoke run (the defaults above are the reported benchmark); explicit settings win.
QUICK: dict[str, Any] = {
    "num_pairs": 256,
    "pool_clean": 40,
    "pool_per_domain": 40,
    "pool_domains": (Domain.NOISE, Domain.BLUR),
    "corrupt": 0.05,
    "num_targets": 24,
    "num_eval": 64,
    "methods": (Acquisition.RANDOM, Acquisition.EPIG),
    "untargeted_random": False,
    "beta_sweep": (),
    "seeds": (0,),
    "rounds": 2,
    "budget": 4,
    "draws": 8,
    "ray_check": False,
}


def check(cfg: ActiveLearningConfig) -> None:
    """Refuse settings the benchmark cannot run, naming the offending value, before any work is done."""
    class_names(cfg.task)  # a ValueError naming an unknown task
    if cfg.severity not in SEVERITIES:
        raise ValueError(f"--severity must be one of {list(SEVERITIES)}, got {cfg.severity}")
    if Domain.CLEAN in cfg.pool_domains:
        raise ValueError("--pool-domains lists shifted domains; the in-domain share is --pool-clean")
    if cfg.target_domain not in cfg.pool_domains:
        raise ValueError(
            f"the target domain {cfg.target_domain.value!r} is not in the pool's shifted domains "
            f"{[d.value for d in cfg.pool_domains]}"
        )
    counts = ("num_pairs", "pool_clean", "pool_per_domain", "num_targets", "num_eval", "rounds", "budget")
    for name in (*counts, "draws"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if not cfg.methods or not cfg.seeds:
        raise ValueError("--methods and --seeds must name at least one method and one seed")
    if cfg.ray_check and (cfg.ray_method not in cfg.methods or cfg.ray_seed not in cfg.seeds):
        raise ValueError(
            f"the Ray Train check compares with the local run of --ray-method {cfg.ray_method.value!r} and "
            f"--ray-seed {cfg.ray_seed}, which --methods / --seeds do not run"
        )


def _digest(fields: dict[str, Any]) -> str:
    text = json.dumps(fields, sort_keys=True, default=lambda v: getattr(v, "value", str(v)))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------------------- the world


def world_fields(cfg: ActiveLearningConfig) -> dict[str, Any]:
    """The world's settings, named as `CampaignWorldSpec` names them (the digest of the world's directory)."""
    keys = ("model", "task", "world_seed", "pool_clean", "pool_per_domain", "pool_domains", "severity")
    fields = {k: getattr(cfg, k) for k in (*keys, "corrupt", "target_domain")}
    return fields | {"pairs": cfg.num_pairs, "targets": cfg.num_targets, "eval": cfg.num_eval}


def world_spec(cfg: ActiveLearningConfig) -> CampaignWorldSpec:
    """The campaign world every run shares (its directory is named by a digest of `world_fields`)."""
    return CampaignWorldSpec(
        model=cfg.model, task=cfg.task, seed=cfg.world_seed, pairs=cfg.num_pairs, pool_clean=cfg.pool_clean,
        pool_per_domain=cfg.pool_per_domain, pool_domains=cfg.pool_domains, severity=cfg.severity,
        corrupt=cfg.corrupt, target_domain=cfg.target_domain, targets=cfg.num_targets, eval=cfg.num_eval,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------- the campaigns


@dataclass(frozen=True)
class RunSpec:
    """One campaign of the benchmark."""

    method: str  # an Acquisition value, or UNTARGETED
    seed: int
    trainer: str = "local"
    batch: str | None = None  # the selection's `batch` ("stochastic"), else the campaign's default
    beta: float | None = None  # the power-sampling exponent of a stochastic batch

    @property
    def row(self) -> str:
        """The row of the table the campaign is a seed of: its method, `STOCHASTIC_EPIG` (the default
        exponent) or `STOCHASTIC_EPIG-beta<b>` (an exponent of the sweep)."""
        if self.batch != "stochastic":
            return self.method
        return STOCHASTIC_EPIG if self.beta == DEFAULT_BETA else f"{STOCHASTIC_EPIG}-beta{self.beta:g}"

    @property
    def name(self) -> str:
        """The campaign's directory: a stochastic one names its exponent, so a change of the default never
        resumes a campaign run with another."""
        row = f"{STOCHASTIC_EPIG}-beta{self.beta:g}" if self.batch == "stochastic" else self.row
        return f"{row}-seed{self.seed}" + ("" if self.trainer == "local" else f"-{self.trainer}")

    @property
    def targeted(self) -> bool:
        return self.method != UNTARGETED


def run_specs(cfg: ActiveLearningConfig) -> list[RunSpec]:
    """The local campaigns: every method and seed, then stochastic EPIG (the default exponent, then the
    sweep's) and untargeted random per seed."""
    specs = [RunSpec(m.value, s) for m in cfg.methods for s in cfg.seeds]
    if cfg.stochastic_epig and Acquisition.EPIG in cfg.methods:
        betas = dict.fromkeys([DEFAULT_BETA, *cfg.beta_sweep])  # the default first, each exponent once
        epig = Acquisition.EPIG.value
        specs += [RunSpec(epig, s, batch="stochastic", beta=b) for b in betas for s in cfg.seeds]
    if cfg.untargeted_random:
        specs += [RunSpec(UNTARGETED, s) for s in cfg.seeds]
    return specs


def campaign_config(spec: RunSpec, cfg: ActiveLearningConfig, paths: CampaignWorld) -> Any:
    """The campaign a user would write for this run: only `method`, `seed`, `executor`, `batch` (and for
    the untargeted baseline the absence of `targets`) differ between runs."""
    from pipeline.rounds.config import CampaignConfig

    fields: dict[str, Any] = {
        "pool": str(paths.pool),
        "eval": str(paths.eval),
        "classes": str(paths.classes),
        "posterior": str(paths.posterior),
        "budget": cfg.budget,
        "max_rounds": cfg.rounds,
        "method": Acquisition.RANDOM.value if spec.method == UNTARGETED else spec.method,
        "draws": cfg.draws,
        "seed": spec.seed,
        "label_source": "oracle",
        "truth": str(paths.pool),  # the pool's embeddings carry the world's labels
        "executor": spec.trainer,
        "tracking": False,
        "num_cpus": cfg.num_cpus,
    }
    if spec.batch is not None:
        fields |= {"batch": spec.batch, "beta": spec.beta}  # power sampling, P(pick) ∝ score^beta
    if spec.targeted:
        fields["targets"] = str(paths.targets)
    return CampaignConfig.model_validate(fields)


def _scores(values: Sequence[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def round_record(
    files: RoundFiles, r: RoundStatus, train: dict[str, Any], start_weight: Any, target: str
) -> dict[str, Any]:
    """One round of a campaign's record: its metrics, picks (their domains, true classes and scores), the
    re-fit's summary and how far it moved the projection, and its step timings."""
    picks = files.read_picks()
    ids = [p["sample_id"] for p in picks]
    domains = [p["domain"] for p in picks if "domain" in p]
    answers = files.read_labels()  # the oracle's answers so far: the true classes
    weight = files.read_projection().double()
    change = float((weight - start_weight).norm() / start_weight.norm())
    return {
        "round": r.index,
        "labels": r.labels_used,
        **{p: {m: r.metrics[p][m] for m in METRICS} for p in PREDICTIVES},
        "target_share": (sum(d == target for d in domains) / len(domains) if domains else None),
        "picks": ids,
        "pick_domains": domains,
        "pick_labels": [answers[sid] for sid in ids],
        "scores": _scores([p["score"] for p in picks]),
        "candidates": r.counts.selection.candidates,
        "train": {k: train.get(k) for k in ("steps_run", "best_step", "converged", "stopped_early")},
        "weight_change": change,  # ‖P* − P̂‖ / ‖P̂‖ of the round's re-fit
        "seconds": r.seconds,
    }


def run_campaign(
    spec: RunSpec, cfg: ActiveLearningConfig, paths: CampaignWorld, directory: Path
) -> dict[str, Any]:
    """`campaign.init` + `campaign.run` for `cfg.rounds` rounds, then its record from `campaign.status`."""
    from pipeline.rounds import campaign
    from pipeline.rounds.data import read_cache
    from pipeline.rounds.state import read_state

    def log(line: str) -> None:
        if "updated ->" in line:
            print(f"  {spec.name}: {line}", flush=True)

    where = CampaignDir(str(directory))
    resumed = where.initialised()
    started = time.perf_counter()
    campaign.init(str(directory), campaign_config(spec, cfg, paths), log=lambda _: None)
    report = campaign.run(str(directory), cfg.rounds, log=log)
    wall = time.perf_counter() - started
    if report.state.completed < cfg.rounds:
        raise ValueError(
            f"campaign {spec.name} stopped after {report.state.completed} of {cfg.rounds} rounds "
            f"({report.finished}): the pool is too small for --rounds x --budget"
        )
    status = campaign.status(str(directory))
    state = read_state(str(directory))
    start_weight = read_cache(str(directory)).image_weight.double()
    rounds = [
        round_record(where.round(r.index), r, s.train, start_weight, cfg.target_domain.value)
        for r, s in zip(status.rounds, state.rounds, strict=True)
    ]
    return {
        "name": spec.name,
        "method": spec.method,
        "batch": spec.batch,
        "beta": spec.beta,
        "row": spec.row,
        "seed": spec.seed,
        "trainer": spec.trainer,
        "targeted": spec.targeted,
        "directory": str(directory),
        "baseline": {p: {m: status.baseline[p][m] for m in METRICS} for p in PREDICTIVES},
        "rounds": rounds,
        "seconds": sum(sum(r["seconds"].values()) for r in rounds),  # the rounds' own step timings
        "wall_seconds": wall,
        "resumed": resumed,
        "target_domain": cfg.target_domain.value,
        "task": cfg.task,
    }


def ray_check(local: dict[str, Any], ray: dict[str, Any]) -> dict[str, Any]:
    """Per round: the same picks? The largest metric and projection differences between the trainers."""
    metric_diff: dict[str, float] = {}
    for p in PREDICTIVES:
        for m in METRICS:
            metric_diff[f"{p}.{m}"] = max(
                abs(a - b) for a, b in zip(curve(local, p, m), curve(ray, p, m), strict=True)
            )
    weight_diff, same_picks, differing = 0.0, 0, 0
    for a, b in zip(local["rounds"], ray["rounds"], strict=True):
        same_picks += a["picks"] == b["picks"]
        differing += len(set(a["picks"]) ^ set(b["picks"])) // 2
        wa = CampaignDir(local["directory"]).round(a["round"]).read_projection().double()
        wb = CampaignDir(ray["directory"]).round(b["round"]).read_projection().double()
        weight_diff = max(weight_diff, float((wa - wb).abs().max()))
    return {
        "local": local["name"],
        "ray": ray["name"],
        "rounds": len(local["rounds"]),
        "rounds_with_identical_picks": same_picks,
        "picks_differing": differing,
        "max_metric_difference": metric_diff,
        "max_difference": max(metric_diff.values()),
        "max_projection_difference": weight_diff,
        "seconds_local": local["seconds"],
        "seconds_ray": ray["seconds"],
    }


# ------------------------------------------------------------------------------------------------ a run


def _run_ray_check(
    cfg: ActiveLearningConfig, paths: CampaignWorld, runs_root: Path, runs: list[dict[str, Any]]
) -> dict[str, Any]:
    """The Ray Train campaign (appended to `runs`) compared with its local twin."""
    from pipeline import runtime

    spec = RunSpec(cfg.ray_method.value, cfg.ray_seed, "ray")
    print(f"== campaign {spec.name} (Ray Train)", flush=True)
    with runtime.ray_session(runtime.Executor.RAY, None, cfg.num_cpus):  # one Ray for all its rounds
        record = run_campaign(spec, cfg, paths, runs_root / spec.name)
    runs.append(record)
    twin = next(r for r in runs if r["name"] == RunSpec(spec.method, spec.seed).name)
    return ray_check(twin, record)


def _final_posteriors(
    cfg: ActiveLearningConfig, runs: list[dict[str, Any]], rows: Sequence[str]
) -> dict[str, Path]:
    """Row -> the posterior of its first seed's last round (local runs)."""
    return {
        row: Path(CampaignDir(r["directory"]).round(cfg.rounds - 1).posterior)
        for row in rows
        for r in runs
        if r["row"] == row and r["seed"] == cfg.seeds[0] and r["trainer"] == "local"
    }


def run(cfg: ActiveLearningConfig) -> dict[str, Any]:
    """Build the world once, run every campaign, analyse, and write the outputs; returns the JSON document."""
    from pipeline.experiments.active_learning_diagnostics import diagnostics
    from pipeline.reports.active_learning import plot_curves, summary_markdown

    check(cfg)
    started = time.perf_counter()
    out = Path(cfg.out)
    world_root = out / "work" / f"world-{_digest(world_fields(cfg))}"
    print(f"== world, posterior and embeddings under {world_root}", flush=True)
    paths, world = build_campaign_world(world_root, world_spec(cfg))
    world_seconds = time.perf_counter() - started
    runs_root = (
        world_root / f"campaigns-{_digest({'budget': cfg.budget, 'rounds': cfg.rounds, 'draws': cfg.draws})}"
    )
    runs = []
    for spec in run_specs(cfg):
        print(f"== campaign {spec.name}", flush=True)
        runs.append(run_campaign(spec, cfg, paths, runs_root / spec.name))
    ray_doc = _run_ray_check(cfg, paths, runs_root, runs) if cfg.ray_check else None
    agg = aggregate(runs)
    targeted = next(r for r in runs if r["targeted"] and r["trainer"] == "local")
    diag = diagnostics(
        Path(targeted["directory"]), _final_posteriors(cfg, runs, list(agg)),
        target_domain=cfg.target_domain.value, budget=cfg.budget, task=cfg.task,
    )  # fmt: skip
    doc = {
        "config": cfg.model_dump(mode="json"),
        "world": world,
        "runs": runs,
        "methods": agg,
        "goals": goals(agg),
        "goals_untargeted": goals(agg, UNTARGETED)[:1] if UNTARGETED in agg else [],
        "beta_sweep": beta_sweep(agg),
        "ray_check": ray_doc,
        "diagnostics": diag,
        "world_seconds": world_seconds,
        "seconds": time.perf_counter() - started,  # this invocation (resumed campaigns cost little)
        "resumed_runs": [r["name"] for r in runs if r["resumed"]],
        "step_seconds": sum(r["seconds"] for r in runs),  # every campaign's own step timings
    }
    out.mkdir(parents=True, exist_ok=True)
    storage.write_text(out / "results.json", json.dumps(doc, indent=1, default=str))
    plot_curves(doc, out / "curves.png")
    storage.write_text(out / "summary.md", summary_markdown(doc))
    return doc
