"""An annotation campaign: `init`, `step` (advance as far as possible), `run` (until N rounds), `status`.

A round is `select -> push -> collect -> train -> update` (MATH §9):
- select: the round's posterior re-scores the pool from cached activations (labelled and already pushed
  samples leave it) and the acquisition picks `budget` samples;
- push: they become tasks at the label source, each with the model's prediction and uncertainty;
- collect: answers are appended to the labels table; the round waits until `min_answered` of its tasks
  are answered (or `--force`);
- train: the image projection is re-fitted from the ORIGINAL prior on ALL labels so far (Ray Train or
  in-process), so a round is a pure function of (starting posterior, labels, seeds);
- update: the labelled curvature at the new MAP is merged into the posterior (a new posterior directory
  naming its parent, round and labels), and the evaluation set is scored.
Each transition writes its outputs first and `state.json` last; every output is a deterministic function
of what came before, so a crash at any point resumes on the next `step` with the same picks, no duplicate
task and no label lost or counted twice. One stepper at a time holds the lease.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import torch

from pipeline import runtime
from pipeline.annotation import TaskRow
from pipeline.artifacts.posterior import Lineage, projection_sha256, read_info, write_posterior
from pipeline.bayes.batches import BatchMode
from pipeline.bayes.head import Activations
from pipeline.bayes.online import labelled_factors, updated_posterior
from pipeline.classes import read_classes
from pipeline.config import changed_fields
from pipeline.flows.pool_engine import PoolScoring, choose_from_pool, plan_pool, pool_size, rows_by_id
from pipeline.flows.select import selection_table
from pipeline.io import faults, storage, tensors, vectors
from pipeline.rounds import labels as labels_table
from pipeline.rounds import lease, review, webhook
from pipeline.rounds.config import OPERATIONAL_FIELDS, STREAM_ROWS, CampaignConfig, PoolEngine, Trainer
from pipeline.rounds.data import ModelCache, Rows, load_rows, read_cache, write_cache
from pipeline.rounds.evaluation import evaluate
from pipeline.rounds.layout import CampaignDir, project_name, read_config, write_config
from pipeline.rounds.sources import Source, WebhookSource, make_source
from pipeline.rounds.state import (
    CampaignState,
    Round,
    RoundCounts,
    RoundState,
    SelectionCounts,
    read_state,
    write_state,
)
from pipeline.rounds.status import status as status  # re-exported: `campaign.status` as ever
from pipeline.rounds.tracking import CampaignTracker
from pipeline.runtime import Executor
from pipeline.selection import Acquisition, EmbeddingSet, Pick, SelectionSettings, choose, resolved_batch
from pipeline.stages.curate import recovered_offsets
from pipeline.train.data import TrainData
from pipeline.train.loop import RefitResult

Log = Callable[[str], None]

ROWS_PER_SHARD = 16384  # pool rows per scoring shard of a streamed round (the unit of resumable work)


def _now() -> datetime:
    return datetime.now(timezone.utc)


# ---------------------------------------------------------------------------------------------- init


def init(
    directory: str, cfg: CampaignConfig, log: Log = print, *, webhook_secret: str | None = None
) -> CampaignState:
    """Create the campaign directory (idempotent for the same config; refused for another one).

    With `cfg.webhook`, Label Studio's project posts its annotation events there (`campaign serve`) with
    `webhook_secret` (default: `$BAYESCURATE_WEBHOOK_SECRET`); a re-run updates that one webhook in place.
    """
    if cfg.webhook and webhook_secret is None:
        webhook_secret = webhook.read_secret()  # before anything is created
    if CampaignDir(directory).initialised():
        existing = read_config(directory)
        changed = changed_fields(existing, cfg)
        defining = [k for k in changed if k not in OPERATIONAL_FIELDS]
        if defining:
            raise FileExistsError(
                f"{directory!r} is a campaign with another configuration ({', '.join(defining)} differ); "
                "use a new directory (or edit its campaign.yaml by hand, knowing what it changes)"
            )
        if changed:
            with lease.acquire(directory, "campaign init"):
                write_config(directory, cfg)
            log(f"campaign {directory}: updated {', '.join(changed)}")
        if cfg.webhook:
            cache = read_cache(directory)
            source = make_source(cfg, cache.classes, directory, cache.label_column)
            _register_webhook(source, cfg.webhook, webhook_secret, project_name(cfg, directory), log)
        log(f"campaign {directory} exists with this configuration: nothing to do")
        return read_state(directory)
    with lease.acquire(directory, "campaign init"):
        spec = read_classes(cfg.classes)
        start = read_info(cfg.posterior)
        cache = write_cache(directory, cfg.posterior, spec)
        campaign = Campaign(directory, cfg, cache)
        pool_rows = campaign.check_pool()  # reads and checks the embeddings now, not at the first step
        if cfg.targets:
            campaign.targets()
        baseline: dict[str, Any] = {}
        if cfg.eval:
            baseline, _ = campaign.evaluate(cache.head(cfg.posterior))
        source = make_source(cfg, cache.classes, directory, cache.label_column)
        source.check()
        if cfg.webhook:
            _register_webhook(source, cfg.webhook, webhook_secret, campaign.name, log)
        write_config(directory, cfg)
        parent = campaign.tracker.parent()
        state = write_state(directory, CampaignState(mlflow_run_id=parent, baseline=baseline))
        campaign.tracker.log_curve(parent, state)
        log(
            f"campaign {directory}: pool {pool_rows} rows, {len(cache.classes)} classes, starting posterior "
            f"{start['posterior_id']}, labels from {cfg.label_source.value}"
        )
        return state


def _register_webhook(source: Source, url: str, secret: str | None, project: str, log: Log) -> None:
    """The project's one webhook to `url` (`campaign serve`), carrying the shared secret; idempotent."""
    if not isinstance(source, WebhookSource) or not secret:
        raise ValueError(f"webhook {url!r} needs the label-studio label source and a shared secret")
    hook = source.register_webhook(url, secret)
    log(f"webhook {hook} of the {source.name} project {project!r}: annotation events go to {url}")


# ---------------------------------------------------------------------------------------------- step


@dataclass
class StepReport:
    """What one `step` did and where the campaign stands after it."""

    state: CampaignState
    did: list[str] = field(default_factory=list)  # transitions made, e.g. "round 1: trained"
    waiting: str | None = None  # what the campaign waits for (answers), if anything
    finished: str | None = None  # why no further round starts (rounds reached, pool exhausted)


@dataclass(frozen=True)
class _Chosen:
    """A round's batch and what selecting it saw."""

    picks: list[Pick]
    batch: BatchMode
    candidates: int  # rows scored
    pool_left: int  # pool rows not picked by an earlier round
    columns: dict[str, list]  # the pool's source and domain columns of the picks
    rescore_s: float


class Campaign:
    """A campaign directory with its config, model cache and label source loaded."""

    def __init__(self, directory: str, cfg: CampaignConfig | None = None, cache: ModelCache | None = None):
        self.directory = directory
        self.dir = CampaignDir(directory)
        self.cfg = cfg or self.dir.read_config()
        self.cache = cache or read_cache(directory)
        self.name = project_name(self.cfg, directory)
        self.start_info = read_info(self.cfg.posterior)
        self.tracker = CampaignTracker(self.cfg, self.name)
        self._rows: dict[str, Rows] = {}
        self._source: Source | None = None
        self._start_head: Any = None
        self._pool_rows: int | None = None

    # -- inputs ------------------------------------------------------------------------------------
    @property
    def source(self) -> Source:
        if self._source is None:
            self._source = make_source(self.cfg, self.cache.classes, self.directory, self.cache.label_column)
        return self._source

    def _load(self, what: str, uri: str) -> Rows:
        if what not in self._rows:
            self._rows[what] = load_rows(uri, self.cache, self.start_info, what)
        return self._rows[what]

    def pool(self) -> Rows:
        return self._load("pool", self.cfg.pool)

    def check_pool(self) -> int:
        """The pool's rows, its files checked to hold activations made under the starting projection (a
        streamed pool is not read: only its Parquet footers are)."""
        if self.streamed:
            shards, _ = plan_pool(self.cfg.pool, ROWS_PER_SHARD, projection_sha256(self.start_info))
            return sum(s.rows for s in shards)
        return len(self.pool())

    def targets(self) -> Rows | None:
        return self._load("targets", self.cfg.targets) if self.cfg.targets else None

    def eval_rows(self) -> Rows | None:
        return self._load("evaluation", self.cfg.eval) if self.cfg.eval else None

    @property
    def start_head(self) -> Any:
        if self._start_head is None:
            self._start_head = self.cache.head(self.cfg.posterior)
        return self._start_head

    @property
    def text(self) -> Activations:
        """The class prompts as a head takes them (cached text activations and offsets)."""
        return Activations(self.cache.text_acts, self.cache.text_offset)

    def rescored(
        self, head: Any, taken: frozenset[str] = frozenset()
    ) -> tuple[EmbeddingSet, EmbeddingSet | None]:
        """The pool rows not in `taken`, and the targets (None: none), with `head`'s Gaussian embeddings:
        what an in-memory round chooses from."""
        pool = self.pool()
        keep = [i for i, sid in enumerate(pool.sample_ids) if sid not in taken]
        targets = self.targets()
        return (
            pool.take(torch.tensor(keep, dtype=torch.long)).rescored(head),
            None if targets is None else targets.rescored(head),
        )

    def posterior_of(self, index: int) -> str:
        """The posterior round `index` selects with: the start, or the previous round's update."""
        return self.cfg.posterior if index == 0 else self.dir.round(index - 1).posterior

    def evaluate(self, head: Any) -> tuple[dict[str, Any], bytes | None]:
        rows = self.eval_rows()
        if rows is None:
            return {}, None
        column = self.cfg.eval_label_column or self.cache.label_column
        if not column:
            raise ValueError(
                "the evaluation set needs `eval_label_column` (the classes file names no label column)"
            )
        return evaluate(head, self.cache, rows, column, self.cfg.domain_column)

    # -- transitions -------------------------------------------------------------------------------
    @property
    def streamed(self) -> bool:
        """Whether rounds use the pool engine instead of holding the pool (`PoolEngine`)."""
        engine = self.cfg.engine
        if engine is PoolEngine.AUTO:
            if self._pool_rows is None:
                self._pool_rows = pool_size(self.cfg.pool)
            return self._pool_rows > STREAM_ROWS
        return engine is PoolEngine.STREAM

    def select(self, state: CampaignState, index: int) -> tuple[CampaignState, str | None]:
        """Choose round `index`'s picks; returns the new state, or the old one and why nothing was picked."""
        started = time.perf_counter()
        cfg = self.cfg
        posterior = self.posterior_of(index)
        head = self.cache.head(posterior)
        posterior_id = read_info(posterior)["posterior_id"]
        taken = frozenset(sid for r in state.rounds for sid in self.picks(r.index))
        seed = cfg.selection.seed + index
        settings = cfg.selection.model_copy(update={"seed": seed})
        choose_in = self._choose_streamed if self.streamed else self._choose_in_memory
        chosen = choose_in(head, posterior_id, settings, taken, index)
        if isinstance(chosen, str):
            return state, chosen
        params = {
            "round": index,
            "method": cfg.selection.method.value,
            "batch": chosen.batch.value,
            "budget": cfg.selection.budget,
            "draws": cfg.selection.draws,
            "seed": seed,
            "posterior_id": posterior_id,
            "start_posterior_id": self.cache.posterior_id,
            "trainer": cfg.executor.value,
            "label_source": cfg.label_source.value,
            "engine": "stream" if self.streamed else "memory",
        }
        run_id = self.tracker.round_run(state.mlflow_run_id, index, params)
        table = selection_table(chosen.picks, index)
        for name, values in chosen.columns.items():
            table = table.append_column(name, pa.array(values))
        storage.write_parquet(table, self.dir.round(index).picks)
        round_ = Round(
            index=index,
            state=RoundState.SELECTED,
            posterior_id=posterior_id,
            picked=len(chosen.picks),
            seed=seed,
            mlflow_run_id=run_id,
            counts=RoundCounts(SelectionCounts(len(chosen.picks), chosen.candidates, chosen.pool_left)),
            timings={"rescore": chosen.rescore_s, "select": time.perf_counter() - started - chosen.rescore_s},
        )
        return write_state(self.directory, state.with_round(round_)), None

    def _choose_in_memory(
        self, head: Any, posterior_id: str, settings: SelectionSettings, taken: frozenset[str], index: int
    ) -> _Chosen | str:
        """The round's batch with the pool's activations held here and re-scored by matrix products."""
        pool = self.pool()
        if all(sid in taken for sid in pool.sample_ids):
            return f"the pool is exhausted ({len(pool)} rows, all picked)"
        t0 = time.perf_counter()
        remaining, targets = self.rescored(head, taken)
        rescore_s = time.perf_counter() - t0
        choice = choose(head, self.text, self.cache.classes, remaining, settings, targets=targets)
        by_id = {sid: i for i, sid in enumerate(remaining.sample_ids)}
        columns = {
            name: [remaining.columns[name][by_id[p.sample_id]] for p in choice.picks]
            for name in dict.fromkeys(("source", self.cfg.domain_column))
            if name in remaining.columns
        }
        return _Chosen(choice.picks, choice.batch, choice.candidates, len(remaining), columns, rescore_s)

    def _choose_streamed(
        self, head: Any, posterior_id: str, settings: SelectionSettings, taken: frozenset[str], index: int
    ) -> _Chosen | str:
        """The round's batch from the pool engine: the pool streams shard by shard under the round's
        posterior (offsets against the starting projection); earlier picks are left out."""
        cfg = self.cfg
        shards, scalar = plan_pool(cfg.pool, ROWS_PER_SHARD, projection_sha256(self.start_info))
        rows = sum(s.rows for s in shards)
        if rows - len(taken) <= 0:
            return f"the pool is exhausted ({rows} rows, all picked)"
        mode = resolved_batch(settings)
        t0 = time.perf_counter()
        targets = self.targets()
        targets = targets.rescored(head) if targets is not None else None
        if targets is None and settings.method is Acquisition.EPIG:
            raise ValueError(
                "EPIG on a streamed pool needs `targets` (the domain the labels are for); set targets, "
                "another method, or engine: memory"
            )
        scoring = PoolScoring(
            head,
            self.text,
            self.cache.classes,
            posterior_id,
            targets,
            reference=self.cache.image_weight,
            exclude=taken,
        )
        executor = Executor(cfg.executor.value)
        with runtime.ray_session(executor, cfg.address, cfg.num_cpus):
            found = choose_from_pool(
                scoring,
                settings,
                mode,
                cfg.pool,
                shards,
                scalar,
                self.dir.round(index).dir,
                executor=executor,
            )
        random = settings.method is Acquisition.RANDOM
        picks = [
            Pick(
                row["sample_id"],
                rank,
                0.0 if random else float(row["score"]),
                row["predicted"],
                float(row["confidence"]),
                float(row["entropy"]),
            )
            for rank, row in enumerate(found.picks.to_pylist())
        ]
        columns = {
            name: found.picks.column(name).to_pylist()
            for name in dict.fromkeys(("source", cfg.domain_column))
            if name in found.picks.column_names
        }
        return _Chosen(picks, mode, found.candidates, rows - len(taken), columns, time.perf_counter() - t0)

    def picks(self, index: int) -> list[str]:
        """The sample ids round `index` picked ([] before it picks)."""
        return self.dir.round(index).picked_ids()

    def push(self, state: CampaignState, round_: Round) -> CampaignState:
        started = time.perf_counter()
        files = self.dir.round(round_.index)
        picks = files.read_picks()
        # picks.parquet carries the pool's source column: pushing never reads the pool.
        sources = {p["sample_id"]: p["source"] for p in picks if p.get("source") is not None}
        run_url = self.tracker.url(round_.mlflow_run_id) if round_.mlflow_run_id else None
        rows = [
            TaskRow(
                sample_id=p["sample_id"],
                round=round_.index,
                rank=int(p["rank"]),
                predicted=p["predicted"],
                confidence=float(p["confidence"]),
                scores={self.cfg.selection.method.value: float(p["score"]), "entropy": float(p["entropy"])},
                mlflow_run=run_url,
            )
            for p in picks
        ]
        result = self.source.push(rows, sources, model_version=round_.posterior_id)
        if self.tracker.enabled:  # what the round asks people about, in its MLflow run
            self.tracker.log_picks(round_.mlflow_run_id, self._sheet(round_.index, picks, {}))
        faults.checkpoint(f"push round {round_.index}")
        url = self.source.url()
        storage.write_json(files.push, {**result, "url": url, "at": _now().isoformat()})
        selection = replace(round_.counts.selection, created=result.get("created", 0))
        counts = replace(round_.counts, selection=selection)
        timings = {**round_.timings, "push": time.perf_counter() - started}
        round_ = replace(round_, state=RoundState.PUSHED, counts=counts, timings=timings)
        return write_state(self.directory, state.with_round(round_))

    def _sheet(self, index: int, picks: list[dict[str, Any]], labels: dict[str, str]) -> bytes:
        """The round's contact sheet: its picks, with the labels people gave them (`labels`: sample_id ->)."""
        title = review.sheet_title(self.name, index, picks, labels)
        return review.picks_sheet(picks, labels, title=title, score_name=self.cfg.selection.method.value)

    def collect(self, state: CampaignState, round_: Round, force: bool) -> tuple[CampaignState, str | None]:
        """Pull answers; returns the state and, while the round waits for more answers, what it waits for."""
        started = time.perf_counter()
        snapshot = self.dir.round(round_.index).labels
        if storage.is_file(snapshot):  # collected before a crash: train on exactly those labels
            return state, None
        pushed = {
            sid: r.index for r in state.rounds if r.at_least(RoundState.PUSHED) for sid in self.picks(r.index)
        }
        fetched = self.source.fetch(pushed)
        existing = labels_table.read_rows(self.directory)
        new = labels_table.changes(existing, fetched, set(pushed))
        labels_table.append(self.directory, new, _now())
        resolution = labels_table.resolve([*existing, *new], self.cache.classes)
        labels_table.write_quarantine(self.directory, resolution.quarantined)
        collected = labels_table.round_counts(resolution, self.picks(round_.index))
        counts = replace(round_.counts, labels=collected)
        tasks = collected.tasks
        needed = math.ceil(self.cfg.min_answered * tasks - 1e-9)
        timings = {**round_.timings, "collect": time.perf_counter() - started}
        if collected.answered < needed and not force:
            waiting = (
                f"waiting: {collected.answered} of {tasks} tasks answered in round {round_.index} "
                f"({needed} needed, min_answered {self.cfg.min_answered:g}; --force trains on what is there)"
            )
            if round_.state is not RoundState.COLLECTING or round_.counts != counts:
                round_ = replace(round_, state=RoundState.COLLECTING, counts=counts, timings=timings)
                state = write_state(self.directory, state.with_round(round_))
            return state, waiting
        storage.write_parquet(labels_table.labels_table(resolution), snapshot)
        round_ = replace(round_, state=RoundState.COLLECTING, counts=counts, timings=timings)
        return write_state(self.directory, state.with_round(round_)), None

    def _labelled(self, index: int) -> tuple[TrainData, str]:
        """The labels round `index` trains on (its snapshot) as cached activations, and their digest."""
        table = storage.read_parquet(self.dir.round(index).labels)
        ids, names = table.column("sample_id").to_pylist(), table.column("label").to_pylist()
        acts, offsets = self._labelled_rows(ids)
        index_of = {c: i for i, c in enumerate(self.cache.classes)}
        data = TrainData(
            acts=acts,
            labels=torch.tensor([index_of[n] for n in names], dtype=torch.long),
            offsets=offsets,
            sample_ids=list(ids),
        )
        digest = labels_table.Resolution(
            labels={
                sid: labels_table.Resolved(sid, n, 0, 1, 1.0, _now())
                for sid, n in zip(ids, names, strict=True)
            }
        ).digest()
        return data, digest

    def _labelled_rows(self, ids: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Activations [n, d] and offsets [n, D] (float64) of labelled pool rows: from the pool held here,
        or read by id from the pool's files when rounds stream it."""
        if not self.streamed:
            pool = self.pool()
            at = {sid: i for i, sid in enumerate(pool.sample_ids)}
            missing = [sid for sid in ids if sid not in at]
            if missing:
                raise ValueError(
                    f"{len(missing)} labelled samples are not in the pool {self.cfg.pool!r}: {missing[:5]}"
                )
            rows = pool.take(torch.tensor([at[sid] for sid in ids], dtype=torch.long))
            return rows.acts.double(), None if rows.offsets is None else rows.offsets.double()
        if not ids:
            return torch.zeros(0, self.cache.image_weight.shape[1], dtype=torch.float64), None
        table = rows_by_id(self.cfg.pool, ids, ["acts", "mean"])
        acts, stored = vectors.tensor(table, "acts"), vectors.tensor(table, "mean")
        offsets = recovered_offsets(stored, acts @ self.cache.image_weight.T.to(acts.dtype))
        return acts, offsets

    def train(self, state: CampaignState, round_: Round) -> CampaignState:
        started = time.perf_counter()
        files = self.dir.round(round_.index)
        data, digest = self._labelled(round_.index)
        head = self.start_head
        prior = head.image
        text_mean, _ = head.text_embeddings(self.cache.text_acts, self.cache.text_offset)
        refit = self.cfg.train
        if len(data.sample_ids) == 0:
            weight, summary = prior.weight.clone(), {"steps_run": 0, "note": "no labels: the prior mean"}
        elif self.cfg.executor is Trainer.LOCAL:
            from pipeline.train.local import refit_local

            result = refit_local(prior, text_mean, head.scale, head.bias, data, refit)
            weight, summary = result.weight, _train_summary(result)
        else:
            from pipeline.train.ray_train import refit_ray

            with runtime.ray_session(Executor.RAY, self.cfg.address, self.cfg.num_cpus):
                use_gpu = runtime.cluster_resources().get("GPU", 0.0) >= 1
                result = refit_ray(
                    prior,
                    text_mean,
                    head.scale,
                    head.bias,
                    data,
                    refit,
                    num_workers=self.cfg.train_workers,
                    use_gpu=use_gpu,
                    storage_path=_ray_storage(files.ray_train),
                    name=f"{self.name}-round-{round_.index:03d}",
                )
            weight, summary = result.weight, _train_summary(result)
        summary |= {
            "labels": len(data.sample_ids),
            "labels_digest": digest,
            "trainer": self.cfg.executor.value,
        }
        tensors.save(files.projection, {"weight": weight}, {"round": round_.index, "labels_digest": digest})
        storage.write_json(files.train, summary)
        timings = {**round_.timings, "train": time.perf_counter() - started}
        short = {k: v for k, v in summary.items() if k != "history"}
        round_ = replace(
            round_, state=RoundState.TRAINED, labels_used=len(data.sample_ids), train=short, timings=timings
        )
        return write_state(self.directory, state.with_round(round_))

    def update(self, state: CampaignState, round_: Round) -> CampaignState:
        started = time.perf_counter()
        files = self.dir.round(round_.index)
        weight = files.read_projection().double()
        data, digest = self._labelled(round_.index)
        head = self.start_head
        prior = head.image
        text_mean, _ = head.text_embeddings(self.cache.text_acts, self.cache.text_offset)
        if len(data.sample_ids):
            extra = labelled_factors(
                weight,
                data.acts,
                text_mean,
                head.likelihood,
                head.scale,
                head.bias,
                data.offsets,
                prior.factors.meta,
            )
            image = updated_posterior(
                prior,
                weight,
                extra,
                merge_weight=self.cfg.merge_weight,
                refit_prior_precision=self.cfg.refit_prior_precision,
            )
        else:
            image = prior
        info = write_posterior(
            files.posterior,
            image,
            head.text,
            likelihood=head.likelihood.value,
            scale=head.scale,
            bias=head.bias,
            model=self.start_info["model"],
            provenance={
                "campaign": self.name,
                "start_posterior_id": self.cache.posterior_id,
                "labels": len(data.sample_ids),
                "merge_weight": self.cfg.merge_weight,
            },
            image_projection=weight,
            lineage=Lineage(
                parent=round_.posterior_id,
                round=round_.index,
                labels=len(data.sample_ids),
                labels_digest=digest,
            ),
        )
        new_head = self.cache.head(files.posterior)
        metrics, png = self.evaluate(new_head)
        if metrics:
            storage.write_json(files.metrics, metrics)
        if png is not None:
            storage.write_bytes(files.reliability, png)
        timings = {**round_.timings, "update": time.perf_counter() - started}
        round_ = replace(
            round_,
            state=RoundState.UPDATED,
            new_posterior_id=info["posterior_id"],
            metrics=metrics,
            timings=timings,
        )
        given = files.read_labels()
        sheet = None
        if self.tracker.enabled:
            sheet = self._sheet(round_.index, files.read_picks(), given)
        self.tracker.log_round(round_.mlflow_run_id, round_, files, png, sheet)
        state = write_state(self.directory, state.with_round(round_))
        self.tracker.log_curve(state.mlflow_run_id, state, Counter(given.values()))
        return state


def _train_summary(result: RefitResult) -> dict[str, Any]:
    """The re-fit's `train.json` (its history records are dicts, from either trainer)."""
    return {
        "steps_run": result.steps_run,
        "best_step": result.best_step,
        "stopped_early": result.stopped_early,
        "converged": result.converged,
        "seconds": result.seconds,
        "history": [dict(r) for r in result.history],
    }


def _ray_storage(uri: str) -> str:
    """Ray Train's storage path: a local absolute path, or the URI as it is."""
    return storage.resolve(uri)[1] if storage.is_local(uri) else uri


def step(
    directory: str, *, force: bool = False, max_rounds: int | None = None, log: Log = print
) -> StepReport:
    """Advance the campaign as far as it can go now (holding the lease); idempotent.

    `force`: train the current round on the answers there are, whatever `min_answered` says.
    `max_rounds`: start no round beyond this many (default: the config's `max_rounds`).
    """
    with lease.acquire(directory, "campaign step"):
        campaign = Campaign(directory)
        state = read_state(directory)
        report = StepReport(state)
        target = max_rounds if max_rounds is not None else campaign.cfg.max_rounds
        forced = force
        while True:
            current = state.current
            if current is None or current.state is RoundState.UPDATED:
                if target is not None and state.completed >= target:
                    report.finished = f"{state.completed} rounds done"
                    campaign.tracker.finish_campaign(state.mlflow_run_id)
                    break
                state, why = campaign.select(state, len(state.rounds))
                if why is not None:
                    report.finished = why
                    campaign.tracker.finish_campaign(state.mlflow_run_id)
                    break
                _did(
                    report, log, f"round {len(state.rounds) - 1}: selected {state.rounds[-1].picked} samples"
                )
            elif current.state is RoundState.SELECTED:
                state = campaign.push(state, current)
                where = campaign.source.url() or campaign.source.name
                _did(report, log, f"round {current.index}: pushed {current.picked} tasks to {where}")
            elif current.state in (RoundState.PUSHED, RoundState.COLLECTING):
                state, waiting = campaign.collect(state, current, forced)
                if waiting is not None:
                    report.waiting = waiting
                    log(waiting)
                    break
                forced = False
                _did(report, log, _collected(current.index, state.rounds[current.index].counts.labels))
                state = campaign.train(state, state.rounds[current.index])
                t = state.rounds[current.index].train
                _did(
                    report,
                    log,
                    f"round {current.index}: trained ({campaign.cfg.executor.value}) on {t.get('labels', 0)} "
                    f"labels, {t.get('steps_run', 0)} steps",
                )
            else:  # TRAINED
                state = campaign.update(state, current)
                done = state.rounds[current.index]
                _did(
                    report,
                    log,
                    f"round {current.index}: updated -> posterior {done.new_posterior_id}" + _brief(done),
                )
        report.state = state
        return report


def _did(report: StepReport, log: Log, text: str) -> None:
    report.did.append(text)
    log(text)


def _collected(index: int, c: labels_table.LabelCounts | None) -> str:
    """What a round collected (None: a crash came between its snapshot and the state that counts it)."""
    if c is None:
        return f"round {index}: collected 0 labels, 0 skipped, 0 quarantined (0 labels in all)"
    return (
        f"round {index}: collected {c.labelled} labels, {c.skipped} skipped, {c.quarantined} quarantined "
        f"({c.labels_total} labels in all)"
    )


def _brief(round_: Round) -> str:
    m = round_.metrics
    if not m:
        return ""
    return (
        f"; evaluation accuracy MAP {m['MAP']['accuracy']:.3f} / Bayes {m['Bayes']['accuracy']:.3f}, "
        f"ECE {m['MAP']['ece']:.3f} / {m['Bayes']['ece']:.3f}"
    )


def run(
    directory: str,
    rounds: int,
    *,
    wait: bool = False,
    force: bool = False,
    poll_s: float | None = None,
    log: Log = print,
) -> StepReport:
    """Step until `rounds` rounds are updated; with `wait`, poll for answers instead of returning."""
    if rounds < 1:
        raise ValueError(f"--rounds must be at least 1, got {rounds}")
    interval = poll_s if poll_s is not None else read_config(directory).poll_s
    while True:
        try:
            report = step(directory, force=force, max_rounds=rounds, log=log)
        except lease.LeaseHeld as held:
            if not wait:
                raise
            log(f"{held}; retrying in {interval:g} s")
            time.sleep(interval)
            continue
        force = False
        if report.state.completed >= rounds or report.finished or not wait:
            return report
        time.sleep(interval)
