"""`bayescurate bench active-learning`: accuracy per label of the acquisition functions, in real campaigns.

On the synthetic world with the tiny CLIP: the pool mixes in-domain images, every shifted domain at one
severity and a few corrupt files (quarantined by `embed`); the targets are an unlabelled sample of one
shifted domain and the evaluation set a disjoint labelled sample of that same domain. The posterior is
fitted and pool, targets and evaluation set are embedded (with activations) once, shared by every run.
Each method and seed is then a campaign run exactly as users run one (`campaign.init` + `campaign.run`,
the `oracle` label source, the local trainer); one more campaign re-fits with Ray Train and is compared
with its local twin. Writes `results.json`, `curves.png` and `summary.md` (the table, the goals) under
`--out`; `--out`/work keeps the world and the campaigns, so a re-run with the same settings resumes.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from jobs._app import ConfigCommand
from pipeline.config import Config
from pipeline.data.synthetic import SEVERITIES, SHIFTED_DOMAINS, Domain, class_names
from pipeline.io import storage
from pipeline.selection import Acquisition

METHODS: tuple[Acquisition, ...] = (
    Acquisition.RANDOM,
    Acquisition.ENTROPY,
    Acquisition.BALD,
    Acquisition.EPIG,
    Acquisition.EPIG_INDEPENDENT,
)
UNTARGETED = "random-untargeted"  # random over the whole pool, the campaign given no targets
PREDICTIVES = ("Bayes", "MAP")
METRICS = ("accuracy", "nll", "ece", "brier")


class ActiveLearningConfig(Config):
    """The world, the campaigns and the methods of the active-learning benchmark."""

    model: str = "bayescurate-tiny"  # model whose posterior the campaigns refine
    task: str = "shape"  # zero-shot task of the synthetic world (its classes file)
    world_seed: int = 0  # synthetic world seed: one world for every method and seed
    pairs: int = 2048  # in-domain image–caption pairs the starting posterior is fitted on
    pool_clean: int = 400  # in-domain pool images
    pool_per_domain: int = 400  # pool images per shifted domain
    pool_domains: tuple[Domain, ...] = SHIFTED_DOMAINS  # shifted domains in the pool
    severity: int = 3  # severity of every shifted domain (1..5)
    corrupt: float = 0.02  # fraction of the in-domain pool files made corrupt (embed quarantines them)
    target_domain: Domain = Domain.BLUR  # the shifted domain the campaigns target and are evaluated on
    targets: int = 200  # unlabelled target-domain images (what EPIG is informative about)
    eval: int = 1000  # labelled target-domain images scored after every round (their own world indices)
    methods: tuple[Acquisition, ...] = METHODS  # acquisition functions compared
    untargeted_random: bool = True  # also random over the whole pool (no targets): what the kNN step buys
    seeds: tuple[int, ...] = (0, 1, 2)  # campaign seeds (round r uses seed + r)
    rounds: int = 8  # annotation rounds per campaign
    budget: int = 20  # labels per round
    draws: int = 64  # joint posterior draws of EPIG and BALD
    ray_check: bool = True  # one more campaign with `trainer: ray`, compared with its local twin
    ray_method: Acquisition = Acquisition.EPIG  # method of the Ray Train campaign
    ray_seed: int = 0  # seed of the Ray Train campaign
    num_cpus: int | None = None  # CPUs of the embedded Ray of the Ray Train campaign (default: all)
    out: str = "out/bench/active-learning"  # output folder (work/ keeps the world and the campaigns)
    quick: bool = False  # a smoke run of a minute or two (tests) instead of the reported benchmark


# `--quick`: a smoke run (the defaults above are the reported benchmark); explicit settings win.
QUICK: dict[str, Any] = {
    "pairs": 256,
    "pool_clean": 40,
    "pool_per_domain": 40,
    "pool_domains": (Domain.NOISE, Domain.BLUR),
    "corrupt": 0.05,
    "targets": 24,
    "eval": 64,
    "methods": (Acquisition.RANDOM, Acquisition.EPIG),
    "untargeted_random": False,
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
    for name in ("pairs", "pool_clean", "pool_per_domain", "targets", "eval", "rounds", "budget", "draws"):
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


@dataclass(frozen=True)
class WorldPaths:
    """The shared inputs of every campaign (embeddings with activations of the starting posterior)."""

    root: Path
    posterior: Path
    pool: Path
    targets: Path
    eval: Path
    classes: Path


def world_fields(cfg: ActiveLearningConfig) -> dict[str, Any]:
    keys = ("model", "task", "world_seed", "pairs", "pool_clean", "pool_per_domain", "pool_domains")
    more = ("severity", "corrupt", "target_domain", "targets", "eval")
    return {k: getattr(cfg, k) for k in (*keys, *more)}


def corpora(cfg: ActiveLearningConfig) -> dict[str, dict[str, Any]]:
    """name -> make-world fields; every corpus has its own world indices, so no image is in two of them."""
    shifted = {"severity": cfg.severity}
    out: dict[str, dict[str, Any]] = {
        "pairs": {"n": cfg.pairs},
        "pool/clean": {"n": cfg.pool_clean, "start": 1_000_000, "corrupt": cfg.corrupt},
    }
    for i, domain in enumerate(cfg.pool_domains):
        out[f"pool/{domain.value}"] = {
            "n": cfg.pool_per_domain, "start": 2_000_000 + 100_000 * i, "domain": domain, **shifted,
        }  # fmt: skip
    target = {"domain": cfg.target_domain, **shifted}
    out["targets"] = {"n": cfg.targets, "start": 3_000_000, **target}
    out["eval"] = {"n": cfg.eval, "start": 4_000_000, **target}
    return out


def prepare_world(cfg: ActiveLearningConfig, root: Path) -> tuple[WorldPaths, dict[str, Any]]:
    """Write the world, fit the posterior, embed pool, targets and evaluation set (once: `world.json`)."""
    from pipeline.flows.embed import EmbedConfig, embed
    from pipeline.flows.fit import FitConfig, fit_posterior
    from pipeline.flows.world import MakeWorldConfig, make_world

    paths = WorldPaths(
        root,
        root / "posterior",
        root / "emb" / "pool",
        root / "emb" / "targets",
        root / "emb" / "eval",
        root / "world" / "pairs" / "classes" / f"{cfg.task}.json",
    )
    marker = root / "world.json"
    if marker.is_file():
        return paths, json.loads(marker.read_text())
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    for name, fields in corpora(cfg).items():
        make_world(MakeWorldConfig(out=str(root / "world" / name), seed=cfg.world_seed, **fields))
    seconds["world"] = time.perf_counter() - started
    started = time.perf_counter()
    fit = fit_posterior(
        FitConfig(
            pairs=str(root / "world" / "pairs"), model=cfg.model, out=str(paths.posterior),
            executor="local", tracking=False,
        )
    )  # fmt: skip
    seconds["fit"] = time.perf_counter() - started
    embedded: dict[str, Any] = {}
    for name, dest in (("pool", paths.pool), ("targets", paths.targets), ("eval", paths.eval)):
        started = time.perf_counter()
        result = embed(
            EmbedConfig(
                images=str(root / "world" / name), posterior=str(paths.posterior), out=str(dest),
                executor="local", activations=True,
            )
        )  # fmt: skip
        seconds[f"embed_{name}"] = time.perf_counter() - started
        embedded[name] = {"rows": result.rows, "embedded": result.embedded, "quarantined": result.quarantined}
    info = {
        "settings": json.loads(json.dumps(world_fields(cfg), default=lambda v: v.value)),
        "posterior_id": fit.posterior_id,
        "prior_precision": fit.prior_precision,
        "pairs_used": fit.pairs_used,
        "embedded": embedded,
        "seconds": seconds,
    }
    storage.write_text(marker, json.dumps(info, indent=1))
    return paths, info


# ---------------------------------------------------------------------------------------- the campaigns


@dataclass(frozen=True)
class RunSpec:
    """One campaign of the benchmark."""

    method: str  # an Acquisition value, or UNTARGETED
    seed: int
    trainer: str = "local"

    @property
    def name(self) -> str:
        return f"{self.method}-seed{self.seed}" + ("" if self.trainer == "local" else f"-{self.trainer}")

    @property
    def targeted(self) -> bool:
        return self.method != UNTARGETED


def campaign_config(spec: RunSpec, cfg: ActiveLearningConfig, paths: WorldPaths) -> Any:
    """The campaign a user would write for this run: only `method`, `seed`, `trainer` (and for the
    untargeted baseline the absence of `targets`) differ between runs."""
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
        "trainer": spec.trainer,
        "tracking": False,
        "num_cpus": cfg.num_cpus,
    }
    if spec.targeted:
        fields["targets"] = str(paths.targets)
    return CampaignConfig.model_validate(fields)


def _read_picks(directory: Path, index: int) -> dict[str, list[Any]]:
    import pyarrow.parquet as pq

    table = pq.read_table(directory / "rounds" / f"{index:03d}" / "picks.parquet")
    return {name: table.column(name).to_pylist() for name in table.column_names}


def _read_labels(directory: Path, index: int) -> dict[str, str]:
    import pyarrow.parquet as pq

    table = pq.read_table(
        directory / "rounds" / f"{index:03d}" / "labels.parquet", columns=["sample_id", "label"]
    )
    return dict(zip(table.column("sample_id").to_pylist(), table.column("label").to_pylist(), strict=True))


def class_balance(labels: Sequence[str], classes: int) -> float:
    """Entropy of the picks' class histogram over log C: 1 when every class is picked equally often."""
    counts = torch.tensor([labels.count(c) for c in sorted(set(labels))], dtype=torch.float64)
    p = counts / counts.sum()
    return float(-(p * p.log()).sum() / math.log(classes)) if classes > 1 else 1.0


def _scores(values: Sequence[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def run_campaign(
    spec: RunSpec, cfg: ActiveLearningConfig, paths: WorldPaths, directory: Path
) -> dict[str, Any]:
    """`campaign.init` + `campaign.run` for `cfg.rounds` rounds, then its record from `campaign.status`."""
    from pipeline.io import tensors
    from pipeline.rounds import campaign
    from pipeline.rounds.data import read_cache
    from pipeline.rounds.state import read_state

    def log(line: str) -> None:
        if "updated ->" in line:
            print(f"  {spec.name}: {line}", flush=True)

    resumed = (directory / "state.json").is_file()
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
    rounds = []
    for r, s in zip(status["rounds"], state.rounds, strict=True):
        picks = _read_picks(directory, r["round"])
        domains = picks.get("domain", [])
        answers = _read_labels(directory, r["round"])  # the oracle's answers so far: the true classes
        weight = tensors.load(directory / "rounds" / f"{r['round']:03d}" / "projection.safetensors")[0]
        change = float((weight["weight"].double() - start_weight).norm() / start_weight.norm())
        rounds.append(
            {
                "round": r["round"],
                "labels": r["labels_used"],
                **{p: {m: r["metrics"][p][m] for m in METRICS} for p in PREDICTIVES},
                "target_share": (
                    sum(d == cfg.target_domain.value for d in domains) / len(domains) if domains else None
                ),
                "picks": picks["sample_id"],
                "pick_domains": domains,
                "pick_labels": [answers[sid] for sid in picks["sample_id"]],
                "scores": _scores(picks["score"]),
                "candidates": r["labels"].get("candidates"),
                "train": {
                    k: s.train.get(k) for k in ("steps_run", "best_step", "converged", "stopped_early")
                },
                "weight_change": change,  # ‖P* − P̂‖ / ‖P̂‖ of the round's re-fit
                "seconds": r["seconds"],
            }
        )
    return {
        "name": spec.name,
        "method": spec.method,
        "seed": spec.seed,
        "trainer": spec.trainer,
        "targeted": spec.targeted,
        "directory": str(directory),
        "baseline": {p: {m: status["baseline"][p][m] for m in METRICS} for p in PREDICTIVES},
        "rounds": rounds,
        "seconds": sum(sum(r["seconds"].values()) for r in rounds),  # the rounds' own step timings
        "wall_seconds": wall,
        "resumed": resumed,
    }


# ------------------------------------------------------------------------------------------- analysis


def curve(run: dict[str, Any], predictive: str, metric: str) -> list[float]:
    """The metric at 0 labels (the starting posterior) and after every round."""
    return [run["baseline"][predictive][metric]] + [r[predictive][metric] for r in run["rounds"]]


def labels_of(run: dict[str, Any]) -> list[int]:
    return [0] + [r["labels"] for r in run["rounds"]]


def aggregate(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method (local runs): the label axis, and per predictive and metric the mean, sd, min and max
    over seeds at each point; the share of picks from the target domain per round and overall."""
    by_method: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        if run["trainer"] == "local":
            by_method.setdefault(run["method"], []).append(run)
    out: dict[str, dict[str, Any]] = {}
    for method, group in by_method.items():
        labels = labels_of(group[0])
        if any(labels_of(r) != labels for r in group):
            raise ValueError(f"the seeds of {method} labelled different numbers of samples: {labels}")
        entry: dict[str, Any] = {"labels": labels, "seeds": [r["seed"] for r in group]}
        for p in PREDICTIVES:
            for m in METRICS:
                points = list(zip(*(curve(r, p, m) for r in group), strict=True))
                entry[f"{p}.{m}"] = {
                    "mean": [statistics.fmean(v) for v in points],
                    "sd": [statistics.stdev(v) if len(v) > 1 else 0.0 for v in points],
                    "min": [min(v) for v in points],
                    "max": [max(v) for v in points],
                    "final": [v[-1] for v in (curve(r, p, m) for r in group)],
                }
        shares = [[r["target_share"] for r in run["rounds"]] for run in group]
        entry["target_share"] = [statistics.fmean(v) for v in zip(*shares, strict=True)]
        picks = [d for run in group for r in run["rounds"] for d in r["pick_domains"]]
        entry["target_share_all"] = (
            sum(d == group[0]["target_domain"] for d in picks) / len(picks) if picks else math.nan
        )
        classes = len(class_names(group[0]["task"]))
        half = max(1, len(group[0]["rounds"]) // 2)
        entry["target_picks_per_class"] = {
            name: sum(
                lab == name and dom == group[0]["target_domain"]
                for run in group
                for r in run["rounds"]
                for lab, dom in zip(r["pick_labels"], r["pick_domains"], strict=True)
            )
            / len(group)
            for name in class_names(group[0]["task"])
        }  # target-domain picks of each true class over the whole campaign, seed mean
        entry["class_balance"] = {
            "first_half": statistics.fmean(
                class_balance([x for r in run["rounds"][:half] for x in r["pick_labels"]], classes)
                for run in group
            ),
            "all": statistics.fmean(
                class_balance([x for r in run["rounds"] for x in r["pick_labels"]], classes) for run in group
            ),
        }
        entry["median_score"] = [
            statistics.fmean(v)
            for v in zip(*([r["scores"]["median"] for r in run["rounds"]] for run in group), strict=True)
        ]
        entry["weight_change_final"] = statistics.fmean(run["rounds"][-1]["weight_change"] for run in group)
        entry["seconds_per_run"] = statistics.fmean(run["seconds"] for run in group)
        out[method] = entry
    return out


def labels_to_reach(entry: dict[str, Any], level: float, predictive: str = "Bayes") -> int | None:
    """The fewest labels after which the seed-mean accuracy is at least `level` (None: never)."""
    for labels, acc in zip(entry["labels"], entry[f"{predictive}.accuracy"]["mean"], strict=True):
        if acc >= level - 1e-12:
            return int(labels)
    return None


def _final(agg: dict[str, dict[str, Any]], method: str, predictive: str = "Bayes") -> float:
    return float(agg[method][f"{predictive}.accuracy"]["mean"][-1])


def _paired(agg: dict[str, dict[str, Any]], a: str, b: str, predictive: str = "Bayes") -> list[float]:
    """Per-seed final accuracy differences a − b (the seeds both ran)."""
    fa = dict(zip(agg[a]["seeds"], agg[a][f"{predictive}.accuracy"]["final"], strict=True))
    fb = dict(zip(agg[b]["seeds"], agg[b][f"{predictive}.accuracy"]["final"], strict=True))
    return [fa[s] - fb[s] for s in fa if s in fb]


def goals(agg: dict[str, dict[str, Any]], baseline: str = Acquisition.RANDOM.value) -> list[dict[str, Any]]:
    """The three goals, each met or not with its numbers (Bayes accuracy, seed means; MAP's verdict too)."""
    epig, indep = Acquisition.EPIG.value, Acquisition.EPIG_INDEPENDENT.value
    out: list[dict[str, Any]] = []

    def missing(*methods: str) -> list[str]:
        return [m for m in methods if m not in agg]

    name = f"targeted EPIG reaches {baseline}'s final accuracy with at most half of {baseline}'s labels"
    if missing(epig, baseline):
        out.append({"goal": name, "met": None, "detail": f"not evaluated: {missing(epig, baseline)} not run"})
    else:
        verdicts = {}
        numbers: dict[str, Any] = {}
        for p in PREDICTIVES:
            level = _final(agg, baseline, p)
            final_labels = agg[baseline]["labels"][-1]
            needed = labels_to_reach(agg[epig], level, p)
            verdicts[p] = needed is not None and needed <= final_labels / 2
            numbers[p] = {"level": level, "baseline_labels": final_labels, "epig_labels": needed}
        b = numbers["Bayes"]
        reached = "never" if b["epig_labels"] is None else f"after {b['epig_labels']} labels"
        out.append(
            {
                "goal": name,
                "met": verdicts["Bayes"],
                "met_map": verdicts["MAP"],
                "numbers": numbers,
                "detail": f"{baseline} ends at {b['level']:.4f} after {b['baseline_labels']} labels; EPIG "
                f"reaches it {reached} (goal: at most {b['baseline_labels'] / 2:g})",
            }
        )
    for goal, others in (
        ("EPIG ends above entropy and BALD", (Acquisition.ENTROPY.value, Acquisition.BALD.value)),
        ("EPIG with joint draws ends above EPIG with independent per-logit noise", (indep,)),
    ):
        if missing(epig, *others):
            out.append(
                {"goal": goal, "met": None, "detail": f"not evaluated: {missing(epig, *others)} not run"}
            )
            continue
        numbers = {
            p: {m: _final(agg, m, p) for m in (epig, *others)} | {
                f"paired {epig} - {m}": _paired(agg, epig, m, p) for m in others
            }
            for p in PREDICTIVES
        }  # fmt: skip
        verdict = {p: all(_final(agg, epig, p) > _final(agg, m, p) for m in others) for p in PREDICTIVES}
        parts = [f"EPIG {_final(agg, epig):.4f}"] + [f"{m} {_final(agg, m):.4f}" for m in others]
        seeds = "; ".join(
            f"per-seed EPIG − {m}: " + ", ".join(f"{d:+.4f}" for d in _paired(agg, epig, m)) for m in others
        )
        out.append(
            {
                "goal": goal,
                "met": verdict["Bayes"],
                "met_map": verdict["MAP"],
                "numbers": numbers,
                "detail": "final Bayes accuracy " + ", ".join(parts) + f" ({seeds})",
            }
        )
    return out


def ray_check(local: dict[str, Any], ray: dict[str, Any]) -> dict[str, Any]:
    """Per round: the same picks? The largest metric and projection differences between the trainers."""
    from pipeline.io import tensors

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
        wa = tensors.load(
            Path(local["directory"]) / "rounds" / f"{a['round']:03d}" / "projection.safetensors"
        )
        wb = tensors.load(Path(ray["directory"]) / "rounds" / f"{b['round']:03d}" / "projection.safetensors")
        weight_diff = max(
            weight_diff, float((wa[0]["weight"].double() - wb[0]["weight"].double()).abs().max())
        )
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


def _rank_corr(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def _spread(x: torch.Tensor) -> dict[str, float]:
    q = torch.quantile(x.double(), torch.tensor([0.5, 0.9], dtype=torch.float64))
    return {
        "mean": float(x.mean()),
        "sd": float(x.std()),
        "p50": float(q[0]),
        "p90": float(q[1]),
        "max": float(x.max()),
    }


def diagnostics(
    cfg: ActiveLearningConfig, directory: Path, final_posteriors: dict[str, Path]
) -> dict[str, Any]:
    """What explains the curves, under the starting posterior of a targeted campaign: the candidates the
    kNN step keeps (share of the target domain), the spread of the EPIG scores with joint draws and with
    independent per-logit noise (and how well two seeds of each agree: Monte Carlo noise agrees with
    nothing), BALD, which domains the top scores come from, and the posterior variance per domain before
    and after each method's last round."""
    from pipeline.bayes.acquisition import Method, epig, score_pool
    from pipeline.bayes.neighbours import candidates
    from pipeline.rounds.campaign import Campaign
    from pipeline.rounds.evaluation import label_indices, predictives

    c = Campaign(str(directory))
    pool, targets = c.pool(), c.targets()
    if targets is None:
        raise ValueError(f"{directory} is not a targeted campaign")
    head, text_acts, text_offset = c.start_head, c.cache.text_acts, c.cache.text_offset
    scored, scored_targets = pool.rescored(head), targets.rescored(head)  # as round 0 selects
    index = candidates(
        scored.mean,
        scored.var,
        scored_targets.mean,
        scored_targets.var,
        c.cfg.selection.neighbours,
        c.cfg.selection.metric,
    )
    cand = pool.take(index)
    domains = cand.columns["domain"]
    target = cfg.target_domain.value
    most = c.cfg.selection.max_targets
    keep = targets if len(targets) <= most else targets.take(torch.arange(most))
    kwargs = {"pool_offsets": cand.offsets, "text_offset": text_offset, "target_offsets": keep.offsets}

    def joint(seed: int, method: Method = Method.EPIG) -> torch.Tensor:
        return score_pool(
            head, cand.acts, text_acts, method=method, target_acts=keep.acts, k=cfg.draws, seed=seed, **kwargs
        )

    def independent(seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        lp = head.logits(cand.acts, text_acts, image_offset=cand.offsets, text_offset=text_offset)
        lt = head.logits(keep.acts, text_acts, image_offset=keep.offsets, text_offset=text_offset)
        return epig(lp.sample_probs(cfg.draws, gen), lt.sample_probs(cfg.draws, gen))

    scores = {
        "epig": (joint(0), joint(1)),
        "epig-independent": (independent(0), independent(1)),
        "bald": (joint(0, Method.BALD), joint(1, Method.BALD)),
    }

    def top_share(s: torch.Tensor) -> float:
        top = torch.argsort(s, descending=True)[: cfg.budget].tolist()
        return sum(domains[i] == target for i in top) / len(top)

    out: dict[str, Any] = {
        "candidates": len(cand),
        "pool": len(pool),
        "target_share_pool": sum(d == target for d in pool.columns["domain"]) / len(pool),
        "target_share_candidates": sum(d == target for d in domains) / len(domains),
        "scores": {
            name: {
                "spread": _spread(a),
                "seed_rank_correlation": _rank_corr(a, b),
                f"target_share_top_{cfg.budget}": top_share(a),
            }
            for name, (a, b) in scores.items()
        },
        "rank_correlation_epig_joint_vs_independent": _rank_corr(
            scores["epig"][0], scores["epig-independent"][0]
        ),
    }
    variance: dict[str, dict[str, float]] = {}
    per_class: dict[str, dict[str, float]] = {}
    all_domains = pool.columns["domain"]
    evaluation = c.eval_rows()
    classes = c.cache.classes
    truth = None if evaluation is None else label_indices(evaluation, cfg.task, classes)  # [Ne]
    for label, posterior in {"start": Path(c.cfg.posterior), **final_posteriors}.items():
        h = c.cache.head(str(posterior))
        _, var = h.image_embeddings(pool.acts, pool.offsets)  # [N, D]
        per_row = var.sum(dim=1)
        variance[label] = {
            d: float(per_row[torch.tensor([x == d for x in all_domains])].mean())
            for d in sorted(set(all_domains))
        }
        if evaluation is not None and truth is not None:
            predicted = predictives(h, c.cache, evaluation)["Bayes"].argmax(dim=1)  # [Ne]
            per_class[label] = {
                name: float((predicted[truth == i] == i).double().mean())
                for i, name in enumerate(classes)
                if bool((truth == i).any())
            }
    out["embedding_variance"] = variance  # mean trace of the image-embedding variance per pool domain
    out["eval_accuracy_per_class"] = per_class  # Bayes accuracy per true class, first seed's last round
    return out


# ------------------------------------------------------------------------------------------ the figure

COLOURS = {
    "random": "#7f7f7f",
    UNTARGETED: "#bcbd22",
    "entropy": "#ff7f0e",
    "bald": "#2ca02c",
    "epig": "#1f77b4",
    "epig-independent": "#d62728",
}


def plot_curves(agg: dict[str, dict[str, Any]], cfg: ActiveLearningConfig, path: Path) -> None:
    """Accuracy, NLL and ECE against labels (Bayes above, MAP below; bands: min-max over seeds), the
    target-domain share of each round's picks, and the picks' median acquisition score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(19, 8.4), squeeze=False)
    random = agg.get(Acquisition.RANDOM.value)
    for row, p in enumerate(PREDICTIVES):
        for col, (m, title) in enumerate((("accuracy", "accuracy"), ("nll", "NLL"), ("ece", "ECE"))):
            ax = axes[row][col]
            for method, entry in agg.items():
                s = entry[f"{p}.{m}"]
                style = "--" if method == UNTARGETED else "-"
                ax.plot(
                    entry["labels"],
                    s["mean"],
                    style,
                    marker="o",
                    ms=3,
                    color=COLOURS.get(method),
                    label=method,
                )
                if len(entry["seeds"]) > 1:
                    ax.fill_between(
                        entry["labels"], s["min"], s["max"], color=COLOURS.get(method), alpha=0.15
                    )
            if m == "accuracy" and random is not None:
                level = random[f"{p}.accuracy"]["mean"][-1]
                ax.axhline(level, color="black", lw=0.8, ls=":", label="random's final accuracy")
                ax.axvline(
                    random["labels"][-1] / 2, color="black", lw=0.8, ls="-.", label="half random's labels"
                )
            ax.set(
                xlabel="labels", ylabel=title, title=f"{p}: {title} on the {cfg.target_domain.value} eval set"
            )
            ax.grid(alpha=0.3)
            if m == "accuracy":  # one legend a row: the colours are the same in every panel
                ax.legend(fontsize=7)
    ax = axes[0][3]
    for method, entry in agg.items():
        ax.plot(
            entry["labels"][1:],
            entry["target_share"],
            marker="o",
            ms=3,
            color=COLOURS.get(method),
            label=method,
        )
    ax.set(
        xlabel="labels",
        ylabel="share",
        ylim=(0, 1.02),
        title=f"share of the round's picks from {cfg.target_domain.value}",
    )
    ax.grid(alpha=0.3)
    ax = axes[1][3]
    for method, entry in agg.items():
        if method in (Acquisition.RANDOM.value, UNTARGETED):
            continue
        ax.plot(
            entry["labels"][1:],
            entry["median_score"],
            marker="o",
            ms=3,
            color=COLOURS.get(method),
            label=method,
        )
    ax.set(
        xlabel="labels", ylabel="nats", yscale="log", title="median acquisition score of the round's picks"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    seeds = ", ".join(str(s) for s in cfg.seeds)
    fig.suptitle(
        f"Active learning on {cfg.target_domain.value} (severity {cfg.severity}), {cfg.budget} labels a "
        "round, "
        f"seeds {seeds}: seed mean, band = min-max over seeds"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ the report


def _fmt(x: float | None, digits: int = 3) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def summary_markdown(doc: dict[str, Any]) -> str:
    cfg, agg, world = doc["config"], doc["methods"], doc["world"]
    random = agg.get(Acquisition.RANDOM.value)
    level = random["Bayes.accuracy"]["mean"][-1] if random else None
    pool = world["embedded"]["pool"]
    lines = [
        "# Active-learning benchmark",
        "",
        f"Tiny model `{cfg['model']}`, task `{cfg['task']}`. Pool: {cfg['pool_clean']} in-domain images "
        f"({cfg['corrupt']:.0%} made corrupt) and {cfg['pool_per_domain']} per shifted domain "
        f"({', '.join(cfg['pool_domains'])}) at severity {cfg['severity']}; {pool['embedded']} of "
        f"{pool['rows']} embedded, quarantined {pool['quarantined'] or 'none'}. Targets: {cfg['targets']} "
        f"unlabelled `{cfg['target_domain']}` images; evaluation: {cfg['eval']} labelled "
        f"`{cfg['target_domain']}` "
        f"images (other world indices). Posterior fitted on {world['pairs_used']} in-domain pairs "
        f"(λ image {world['prior_precision']['image']:.3g}). {cfg['rounds']} rounds of {cfg['budget']} "
        "labels, "
        f"seeds {cfg['seeds']}, {cfg['draws']} joint draws, oracle labels, local trainer.",
        "",
        "## Final metrics (seed mean ± sd; Bayes = probit predictive of the round's posterior)",
        "",
        "| method | labels | Bayes accuracy | Bayes NLL | Bayes ECE | MAP accuracy | MAP NLL | MAP ECE | "
        "labels to reach random's final accuracy | target-domain share of picks | s per run |",
        "|" + "---|" * 11,
    ]
    base = next(iter(agg.values())) if agg else None
    if base is not None:
        b = {f"{p}.{m}": base[f"{p}.{m}"]["mean"][0] for p in PREDICTIVES for m in METRICS}
        lines.append(
            f"| starting posterior | 0 | {b['Bayes.accuracy']:.3f} | {b['Bayes.nll']:.3f} | "
            f"{b['Bayes.ece']:.3f} | "
            f"{b['MAP.accuracy']:.3f} | {b['MAP.nll']:.3f} | {b['MAP.ece']:.3f} | | | |"
        )
    for method, e in agg.items():
        cells = []
        for p in PREDICTIVES:
            for m in ("accuracy", "nll", "ece"):
                s = e[f"{p}.{m}"]
                cells.append(
                    f"{s['mean'][-1]:.3f} ± {s['sd'][-1]:.3f}" if p == "Bayes" else f"{s['mean'][-1]:.3f}"
                )
        reach = labels_to_reach(e, level) if level is not None else None
        lines.append(
            f"| {method} | {e['labels'][-1]} | "
            + " | ".join(cells)
            + f" | {reach if reach is not None else 'not reached'} "
            f"| {e['target_share_all']:.2f} | {e['seconds_per_run']:.0f} |"
        )
    lines += ["", "## Bayes accuracy after each round (seed mean)", ""]
    if base is not None:
        lines += [
            "| method | " + " | ".join(str(x) for x in base["labels"]) + " |",
            "|" + "---|" * (len(base["labels"]) + 1),
        ]
        for method, e in agg.items():
            lines.append(
                f"| {method} | " + " | ".join(f"{v:.3f}" for v in e["Bayes.accuracy"]["mean"]) + " |"
            )
    lines += ["", "## Goals", ""]
    for g in doc["goals"]:
        verdict = {True: "**met**", False: "**not met**", None: "not evaluated"}[g["met"]]
        extra = (
            ""
            if g.get("met_map") is None
            else f" (with MAP accuracy: {'met' if g['met_map'] else 'not met'})"
        )
        lines.append(f"- {g['goal']}: {verdict}{extra}. {g['detail']}.")
    if doc.get("goals_untargeted"):
        g = doc["goals_untargeted"][0]
        verdict = "met" if g["met"] else "not met" if g["met"] is False else "not evaluated"
        lines.append(f"- (context) against random over the whole pool: {verdict}. {g['detail']}.")
    check_ = doc.get("ray_check")
    lines += ["", "## Ray Train against the local trainer", ""]
    if check_:
        lines.append(
            f"`{check_['ray']}` against `{check_['local']}`: identical picks in "
            f"{check_['rounds_with_identical_picks']} of {check_['rounds']} rounds "
            f"({check_['picks_differing']} picks differ); largest metric difference "
            f"{check_['max_difference']:.2e}; largest projection difference "
            f"{check_['max_projection_difference']:.2e}; "
            f"{check_['seconds_ray']:.0f} s against {check_['seconds_local']:.0f} s."
        )
    else:
        lines.append("Not run (`--no-ray-check`).")
    diag = doc.get("diagnostics")
    if diag:
        lines += ["", "## Diagnostics (starting posterior, round-0 candidates)", ""]
        lines.append(
            f"The kNN step keeps {diag['candidates']} of {diag['pool']} pool rows; the target domain is "
            f"{diag['target_share_pool']:.0%} of the pool and {diag['target_share_candidates']:.0%} of the "
            "candidates."
        )
        header = "| score | mean | sd | median | p90 | max | rank corr. seed 0 vs 1 | target share of the top"
        lines += ["", f"{header} {cfg['budget']} |", "|" + "---|" * 8]
        for name, s in diag["scores"].items():
            sp = s["spread"]
            top = s[f"target_share_top_{cfg['budget']}"]
            lines.append(
                f"| {name} | {sp['mean']:.2e} | {sp['sd']:.2e} | {sp['p50']:.2e} | {sp['p90']:.2e} | "
                f"{sp['max']:.2e} | "
                f"{s['seed_rank_correlation']:.3f} | {top:.2f} |"
            )
        lines.append(
            f"\nRank correlation of EPIG with joint draws and with independent noise: "
            f"{diag['rank_correlation_epig_joint_vs_independent']:.3f}."
        )
        lines += ["", "Mean trace of the image-embedding variance per pool domain:", ""]
        names = sorted(next(iter(diag["embedding_variance"].values())))
        lines += ["| posterior | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
        for label, v in diag["embedding_variance"].items():
            lines.append(f"| {label} | " + " | ".join(f"{v[n]:.4f}" for n in names) + " |")
        if diag["eval_accuracy_per_class"]:
            classes = list(next(iter(diag["eval_accuracy_per_class"].values())))
            lines += [
                "",
                f"Bayes accuracy per true class on the evaluation set (first seed's last round), and the "
                f"`{cfg['target_domain']}` picks of each class over the campaign (seed mean):",
                "",
                "| posterior | " + " | ".join(classes) + " |",
                "|" + "---|" * (len(classes) + 1),
            ]
            for label, v in diag["eval_accuracy_per_class"].items():
                picks = agg.get(label, {}).get("target_picks_per_class", {})
                cells = [f"{v[n]:.2f}" + (f" ({picks[n]:.1f})" if n in picks else "") for n in classes]
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines += ["", "Relative change of the projection after the last round, ‖P* − P̂‖/‖P̂‖ (seed mean):", ""]
        lines.append(", ".join(f"{m} {e['weight_change_final']:.4f}" for m, e in agg.items()) + ".")
        lines += ["", "Class balance of the picks (entropy of their class histogram / log C; seed mean):", ""]
        lines.append(
            ", ".join(
                f"{m} {e['class_balance']['first_half']:.2f} in the first half, "
                f"{e['class_balance']['all']:.2f} in all"
                for m, e in agg.items()
            )
            + "."
        )
    resumed = doc["resumed_runs"]
    lines += [
        "",
        f"Run time {doc['seconds']:.0f} s (world, posterior and embeddings {doc['world_seconds']:.0f} s); "
        f"the campaigns' own steps took {doc['step_seconds']:.0f} s"
        + (f"; {len(resumed)} campaigns were resumed from an earlier run." if resumed else "."),
    ]
    return "\n".join(lines) + "\n"


def run(cfg: ActiveLearningConfig) -> dict[str, Any]:
    """Build the world once, run every campaign, analyse, and write the outputs; returns the JSON document."""
    from pipeline import runtime

    check(cfg)
    started = time.perf_counter()
    out = Path(cfg.out)
    world_root = out / "work" / f"world-{_digest(world_fields(cfg))}"
    print(f"== world, posterior and embeddings under {world_root}", flush=True)
    paths, world = prepare_world(cfg, world_root)
    world_seconds = time.perf_counter() - started
    runs_root = (
        world_root / f"campaigns-{_digest({'budget': cfg.budget, 'rounds': cfg.rounds, 'draws': cfg.draws})}"
    )
    specs = [RunSpec(m.value, s) for m in cfg.methods for s in cfg.seeds]
    if cfg.untargeted_random:
        specs += [RunSpec(UNTARGETED, s) for s in cfg.seeds]
    runs = []
    for spec in specs:
        print(f"== campaign {spec.name}", flush=True)
        record = run_campaign(spec, cfg, paths, runs_root / spec.name)
        record |= {"target_domain": cfg.target_domain.value, "task": cfg.task}
        runs.append(record)
    ray_doc = None
    if cfg.ray_check:
        spec = RunSpec(cfg.ray_method.value, cfg.ray_seed, "ray")
        print(f"== campaign {spec.name} (Ray Train)", flush=True)
        with runtime.ray_session(runtime.Executor.RAY, None, cfg.num_cpus):  # one Ray for all its rounds
            record = run_campaign(spec, cfg, paths, runs_root / spec.name)
        record |= {"target_domain": cfg.target_domain.value, "task": cfg.task}
        runs.append(record)
        twin = next(r for r in runs if r["name"] == RunSpec(spec.method, spec.seed).name)
        ray_doc = ray_check(twin, record)
    agg = aggregate(runs)
    targeted = next(r for r in runs if r["targeted"] and r["trainer"] == "local")
    finals = {
        m: Path(r["directory"]) / "rounds" / f"{cfg.rounds - 1:03d}" / "posterior"
        for m in agg
        for r in runs
        if r["method"] == m and r["seed"] == cfg.seeds[0] and r["trainer"] == "local"
    }
    doc = {
        "config": cfg.model_dump(mode="json"),
        "world": world,
        "runs": runs,
        "methods": agg,
        "goals": goals(agg),
        "goals_untargeted": goals(agg, UNTARGETED)[:1] if UNTARGETED in agg else [],
        "ray_check": ray_doc,
        "diagnostics": diagnostics(cfg, Path(targeted["directory"]), finals),
        "world_seconds": world_seconds,
        "seconds": time.perf_counter() - started,  # this invocation (resumed campaigns cost little)
        "resumed_runs": [r["name"] for r in runs if r["resumed"]],
        "step_seconds": sum(r["seconds"] for r in runs),  # every campaign's own step timings
    }
    out.mkdir(parents=True, exist_ok=True)
    storage.write_text(out / "results.json", json.dumps(doc, indent=1, default=str))
    plot_curves(agg, cfg, out / "curves.png")
    storage.write_text(out / "summary.md", summary_markdown(doc))
    return doc


def main_run(cfg: ActiveLearningConfig) -> int:
    """Accuracy per label of random, entropy, BALD, EPIG and EPIG-independent in oracle campaigns."""
    if cfg.quick:  # the smoke-run sizes, below anything the config file or a flag set explicitly
        cfg = cfg.model_copy(update={k: v for k, v in QUICK.items() if k not in cfg.model_fields_set})
    doc = run(cfg)
    for g in doc["goals"]:
        print(f"goal: {g['goal']}: {g['met']}; {g['detail']}")
    print(f"wrote {cfg.out}/summary.md, results.json, curves.png ({doc['seconds']:.0f} s)")
    return 0


CONFIG = ActiveLearningConfig
main = ConfigCommand(ActiveLearningConfig, main_run, "bayescurate bench active-learning")

if __name__ == "__main__":
    raise SystemExit(main())
