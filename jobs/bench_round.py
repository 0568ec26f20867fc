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
import io
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
from PIL import Image

from jobs._app import ConfigCommand
from pipeline.artifacts.posterior import write_posterior
from pipeline.bayes.contrastive import contrastive_factors
from pipeline.bayes.kron import KronPosterior
from pipeline.config import Config
from pipeline.io import storage, vectors
from pipeline.rounds.config import Trainer

MODEL = "factory:jobs.bench_round:synthetic"


@dataclass
class Features:
    acts: torch.Tensor  # [N, d]
    offset: torch.Tensor | None = None


class SyntheticAdapter:
    """A CLIP-shaped stand-in: projections of the given sizes with random weights, logit scale 100 (CLIP's
    cap), text activations hashed from each prompt. Enough for everything a campaign does (it never encodes
    an image: it works from cached activations)."""

    likelihood = "infonce"
    scale = 100.0
    bias = 0.0

    def __init__(self, d: int, dt: int, D: int, seed: int) -> None:
        self.d, self.dt, self.D, self.seed = d, dt, D, seed
        g = torch.Generator().manual_seed(seed)
        self._image = torch.randn(D, d + 1, generator=g, dtype=torch.float64) / math.sqrt(d)
        self._text = torch.randn(D, dt + 1, generator=g, dtype=torch.float64) / math.sqrt(dt)

    def image_weight(self) -> torch.Tensor:
        return self._image

    def text_weight(self) -> torch.Tensor:
        return self._text

    def encode_texts(self, texts: list[str]) -> Features:
        rows = []
        for text in texts:
            digest = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
            g = torch.Generator().manual_seed(digest % 2**63)
            rows.append(torch.cat([torch.randn(self.dt, generator=g, dtype=torch.float64), torch.ones(1)]))
        return Features(torch.stack(rows))

    def identity(self) -> dict[str, Any]:
        return {
            "name": MODEL,
            "pretrained": f"{self.d},{self.dt},{self.D},{self.seed}",
            "weights_sha256": f"synthetic-{self.d}-{self.dt}-{self.D}-{self.seed}",
            "embed_dim": self.D,
        }


def synthetic(pretrained: str | None, device: str = "cpu") -> SyntheticAdapter:
    """The `factory:` entry point (`pipeline.stages.embed.ModelSpec`): `pretrained` = "d,dt,D,seed"."""
    d, dt, D, seed = (int(x) for x in (pretrained or "768,512,512,0").split(","))
    return SyntheticAdapter(d, dt, D, seed)


class BenchRoundConfig(Config):
    """Sizes of the round-latency benchmark (the defaults are the reported ViT-B/32 case)."""

    out: str = "out/bench/round"  # work directory and report
    pool: int = 100_000  # pool rows
    targets: int = 256  # unlabelled target rows (EPIG's target set)
    classes: int = 10  # classes
    d: int = 768  # image activation width (a bias column is appended)
    dt: int = 512  # text activation width
    dim: int = 512  # embedding dimension D
    budget: int = 100  # picks per round, and labels arriving
    draws: int = 64  # joint posterior draws
    neighbours: int = 20  # pool neighbours per target (targeted candidates)
    pairs: int = 8192  # synthetic pairs behind the starting posterior's factors
    selections: tuple[str, ...] = ("float64:1", "float32:10", "float32:25")  # batch selections timed with
    # the in-process re-fit, each "precision:picks_per_step" (float64:1 is the exact greedy batch)
    ray_selection: str | None = "float32:10"  # the selection of one more campaign, re-fitted by Ray Train
    state_dir: str | None = None  # services state dir (default ./.state; started if not running)
    seed: int = 0  # synthetic data and model seed
    quick: bool = False  # tiny sizes for the test suite (seconds)


QUICK = {"pool": 600, "targets": 24, "classes": 4, "d": 24, "dt": 16, "dim": 12, "budget": 6, "draws": 8}
QUICK |= {"pairs": 512, "neighbours": 10, "selections": ("float64:1",), "ray_selection": None}


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (180, 40, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


def build(cfg: BenchRoundConfig, work: Path) -> dict[str, Any]:
    """The synthetic posterior, pool, targets, truth and image corpus (skipped when already there)."""
    marker = work / "data.json"
    if marker.is_file():
        return json.loads(marker.read_text())
    g = torch.Generator().manual_seed(cfg.seed)
    adapter = SyntheticAdapter(cfg.d, cfg.dt, cfg.dim, cfg.seed)
    # Starting posterior: factors from synthetic pairs, λ by marginal likelihood (MATH §2-4).
    img_acts = torch.cat(
        [torch.randn(cfg.pairs, cfg.d, generator=g, dtype=torch.float64), torch.ones(cfg.pairs, 1)], 1
    )
    txt_acts = torch.cat(
        [torch.randn(cfg.pairs, cfg.dt, generator=g, dtype=torch.float64), torch.ones(cfg.pairs, 1)], 1
    )
    block = min(1024, cfg.pairs)
    image_f, text_f = contrastive_factors(
        img_acts, img_acts @ adapter.image_weight().T, txt_acts, txt_acts @ adapter.text_weight().T,
        "infonce", adapter.scale, adapter.bias, block_size=block,
    )  # fmt: skip
    image = KronPosterior.fit(image_f, adapter.image_weight())
    text = KronPosterior.fit(text_f, adapter.text_weight())
    posterior = work / "posterior"
    write_posterior(
        posterior, image, text, likelihood="infonce", scale=adapter.scale, bias=adapter.bias,
        model=adapter.identity(), provenance={"synthetic_pairs": cfg.pairs},
    )  # fmt: skip
    # Pool and targets: a class-clustered mixture, the targets from the "shifted" half's region.
    centres = torch.randn(cfg.classes, cfg.d, generator=g, dtype=torch.float64)
    shift = torch.randn(cfg.d, generator=g, dtype=torch.float64)
    images = work / "images.parquet"
    storage.write_parquet(pa.table({"image": [_png()] * cfg.pool}), images)
    truth: dict[str, list[Any]] = {"sample_id": [], "label": []}
    for name, n in (("pool", cfg.pool), ("targets", cfg.targets)):
        labels = torch.randint(cfg.classes, (n,), generator=g)
        shifted = torch.rand(n, generator=g) < (0.5 if name == "pool" else 1.0)
        acts = centres[labels] + 0.8 * torch.randn(n, cfg.d, generator=g, dtype=torch.float64)
        acts = acts + shifted[:, None].double() * shift
        acts = torch.cat([acts, torch.ones(n, 1, dtype=torch.float64)], 1)
        ids = [f"{name}-{i:07d}" for i in range(n)]
        for lo in range(0, n, 20_000):
            part = slice(lo, lo + 20_000)
            mean, var = image.mean(acts[part]), image.embedding_variance(acts[part])
            table = pa.table(
                {
                    "sample_id": ids[part],
                    "mean": vectors.vector_column(mean),
                    "var": vectors.vector_column(var),
                    "acts": vectors.vector_column(acts[part]),
                    "source": [f"{images}#{i}" for i in range(lo, min(lo + 20_000, n))],
                    "domain": ["shifted" if s else "clean" for s in shifted[part].tolist()],
                }
            )
            meta = {"posterior_id": None, "projection_sha256": None, "model": adapter.identity()}
            table = table.replace_schema_metadata({b"bayescurate": json.dumps(meta).encode()})
            storage.write_parquet(table, work / name / f"part-{lo // 20_000:05d}.parquet")
        if name == "pool":
            truth["sample_id"] += ids
            truth["label"] += [f"class-{int(c)}" for c in labels]
    storage.write_parquet(pa.table(truth), work / "truth.parquet")
    classes = {"classes": [f"class-{c}" for c in range(cfg.classes)], "prompts": ["a photo of a {}"]}
    storage.write_json(work / "classes.json", classes)
    info = {"posterior": str(posterior), "pool": str(work / "pool"), "targets": str(work / "targets")}
    info |= {"truth": str(work / "truth.parquet"), "classes": str(work / "classes.json")}
    storage.write_json(marker, info)
    return info


def _campaign(
    cfg: BenchRoundConfig, data: dict[str, Any], work: Path, trainer: Trainer, selection: str
) -> dict[str, Any]:
    from connectors.annotator_bot import answer_open_tasks
    from connectors.label_studio import LabelStudioClient
    from jobs.annotate_bot import bot_session, read_truth
    from pipeline.rounds import campaign
    from pipeline.rounds.config import CampaignConfig

    precision, _, per_step = selection.partition(":")
    stamp = hashlib.sha256(f"{work.absolute()}{time.time()}".encode()).hexdigest()[:6]
    name = f"{trainer.value}-{precision}-{per_step or 1}-{stamp}"
    project = f"bench-round-{name}"
    directory = work / f"campaign-{name}"
    camp = CampaignConfig(
        pool=data["pool"], targets=data["targets"], classes=data["classes"], posterior=data["posterior"],
        budget=cfg.budget, draws=cfg.draws, neighbours=cfg.neighbours, seed=cfg.seed, max_rounds=2,
        label_source="label-studio", project=project, state_dir=cfg.state_dir, trainer=trainer,
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
    picks = storage.read_parquet(storage.join(directory, "rounds", "000", "picks.parquet"))
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
        "candidates": second.counts.get("candidates"),
        "picked": second.picks,
        "round0_picks": picks.column("sample_id").to_pylist(),
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
        f"pool {c['pool']}, targets {c['targets']}, d {c['d']}+1, D {c['dim']}, {c['classes']} classes, "
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
