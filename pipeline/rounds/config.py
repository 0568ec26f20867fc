"""What a campaign is: its pool, targets and evaluation set, the starting posterior, how it picks, trains
and collects. Written to `campaign.yaml` by `campaign init`; every field is a flag or a YAML key."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

from pydantic import AliasChoices, Field, model_validator

from pipeline.config import LabelStudioAccess, Renamed, TrackedConfig
from pipeline.selection import SelectingConfig
from pipeline.train.config import RefitConfig


class LabelSource(str, Enum):
    """Where a campaign's labels come from."""

    LABEL_STUDIO = "label-studio"
    """Human annotators in a Label Studio project (`label_studio_url` or $LABEL_STUDIO_URL, else the server of
    `bayescurate services`)."""
    ORACLE = "oracle"
    """Ground truth from a Parquet table (`truth`, `truth_label_column`), answered at once: simulations,
    benchmarks and tests. The answers go through the same collection code as Label Studio's."""


class Trainer(str, Enum):
    """Where the re-fit of the image projection (MATH §9) runs."""

    RAY = "ray"
    """Ray Train `TorchTrainer` with `train_workers` workers (GPUs when the cluster has them)."""
    LOCAL = "local"
    """The same objective and optimiser in this process."""


class PoolEngine(str, Enum):
    """How a round re-scores the pool and chooses from it."""

    AUTO = "auto"
    """`stream` for pools above 200,000 rows, `memory` below."""
    MEMORY = "memory"
    """The pool's activations held in this process (float64) and re-scored by matrix products: the fastest
    for pools that fit in memory (about 6 KB a row at ViT-B/32 sizes)."""
    STREAM = "stream"
    """`curate`'s pool engine on Ray (or in this process with the local trainer): the candidate search and
    the scores stream shard by shard under the round's posterior, so the driver never holds the pool; a
    greedy batch conditions over the best-scored rows (20 x the budget, at least 1,000)."""


STREAM_ROWS = 200_000  # `auto` streams pools above this many rows


class CampaignConfig(TrackedConfig, LabelStudioAccess, SelectingConfig):
    """An annotation campaign (see the README's campaign reference)."""

    pool: str  # embeddings of the unlabelled pool (`embed --activations`)
    classes: str  # classes file (JSON from make-world, or one class a line)
    posterior: str  # the starting posterior directory (from fit-posterior)
    targets: str | None = None  # embeddings of the target distribution: targeted selection and EPIG
    eval: str | None = Field(
        default=None, validation_alias=AliasChoices("eval", "evaluation")
    )  # labelled evaluation embeddings: metrics after every round
    eval_label_column: Annotated[str | None, Renamed("eval_labels")] = None  # label column of the evaluation
    # set (default: the classes file's)
    domain_column: str = "domain"  # column splitting the evaluation metrics per domain, when present
    max_rounds: int | None = Field(None, ge=1)  # stop after this many rounds (none: until the pool is used)
    label_source: LabelSource = Field(
        default=LabelSource.LABEL_STUDIO, validation_alias=AliasChoices("label_source", "labels", "source")
    )  # where labels come from
    project: str | None = None  # Label Studio project (default: the campaign directory's name)
    state_dir: str | None = None  # services state dir with Label Studio's URL and token (beats the env)
    image_root: str | None = None  # Label Studio's local-files root if writable here (default: the services')
    image_store: str | None = None  # s3://bucket/prefix/ where images are staged for Label Studio to read
    inline_max_bytes: int = 0  # images up to this size are inlined into tasks instead of referenced
    webhook: str | None = None  # `campaign serve` URL for Label Studio's events (init registers the webhook)
    label_studio_retry_s: float = Field(120.0, gt=0)  # seconds a Label Studio request retries outages and 5xx
    truth: str | None = Field(
        default=None, validation_alias=AliasChoices("truth", "oracle", "truth_uri")
    )  # oracle: Parquet file or folder with sample_id and the label column
    truth_label_column: Annotated[str | None, Renamed("truth_column")] = None  # oracle: the label column of
    # `truth` (default: the classes file's)
    min_answered: float = Field(1.0, gt=0, le=1)  # share of a round's tasks answered (or skipped) to train
    executor: Annotated[Trainer, Renamed("trainer")] = Trainer.RAY  # where the projection is re-fitted
    train_workers: int = Field(2, ge=1)  # Ray Train workers
    train: RefitConfig = RefitConfig()  # the re-fit's optimiser and early stopping
    merge_weight: float = 1.0  # weight w of the labelled curvature in the posterior update (A + wA_lab)
    refit_prior_precision: bool = False  # re-fit λ by marginal likelihood after each update (else keep it)
    poll_s: float = 30.0  # `campaign run --wait`: seconds between checks for new answers
    engine: PoolEngine = PoolEngine.AUTO  # how rounds re-score and choose from the pool
    address: str | None = None  # Ray cluster address (default: embedded local Ray, or $RAY_ADDRESS)
    num_cpus: int | None = None  # CPUs of the embedded local Ray (default: all)

    @model_validator(mode="after")
    def _check(self) -> CampaignConfig:
        if self.label_source is LabelSource.ORACLE and not self.truth:
            raise ValueError("the oracle label source needs `truth`: a Parquet URI with sample_id and labels")
        if self.webhook and self.label_source is not LabelSource.LABEL_STUDIO:
            raise ValueError(
                f"`webhook` {self.webhook!r} needs the label-studio label source (labels come from "
                f"{self.label_source.value})"
            )
        return self


# Settings that change how a campaign runs, not what it computes: `campaign init` with the same directory
# accepts new values for these (and writes them to campaign.yaml); any other difference is refused.
OPERATIONAL_FIELDS = frozenset(
    {
        "tracking",
        "tracking_uri",
        "experiment",
        "state_dir",
        "label_studio_url",
        "label_studio_token_file",
        "image_root",
        "image_store",
        "inline_max_bytes",
        "webhook",
        "label_studio_retry_s",
        "max_rounds",
        "train_workers",
        "poll_s",
        "address",
        "num_cpus",
    }
)
