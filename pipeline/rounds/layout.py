"""A campaign directory: where every file of a campaign lives, and the readers of its config and round files.

    campaign.yaml                  the CampaignConfig (written by `campaign init`)
    state.json                     where the campaign stands (`state.py`; written last at every transition)
    lease                          who is stepping right now (`lease.py`)
    cache/model.safetensors        class text activations and the starting projections (`data.py`)
    labels/part-NNNNNN.parquet     the append-only labels table: one row per annotation version seen
    labels/quarantine/...          answers that are not a class, with the reason
    rounds/RRR/                    one round's files (`RoundFiles`): picks.parquet, push.json, labels.parquet,
                                   projection.safetensors, train.json, posterior/, metrics.json, ...

`CampaignDir(root)` names these paths (local or `pyarrow.fs` URI); `CampaignDir.round(i)` is a `RoundFiles`.
The directory's last path component names the campaign (and its Label Studio project, unless the config
names one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml
from torch import Tensor

from pipeline.io import storage, tensors
from pipeline.rounds.config import CampaignConfig

CONFIG_FILE = "campaign.yaml"
STATE_FILE = "state.json"
LEASE_FILE = "lease"
CACHE_FILE = "cache/model.safetensors"
LABELS_DIR = "labels"
QUARANTINE_DIR = "labels/quarantine"
ROUNDS_DIR = "rounds"


@dataclass(frozen=True)
class RoundFiles:
    """Round `index`'s folder `rounds/RRR/` of the campaign directory `root`, and what each transition writes
    there (its outputs come before the `state.json` that points at them)."""

    root: str
    index: int

    @property
    def dir(self) -> str:
        return storage.join(self.root, ROUNDS_DIR, f"{self.index:03d}")

    def _file(self, name: str) -> str:
        return storage.join(self.dir, name)

    @property
    def picks(self) -> str:
        """select: the ranked picks with their scores (and the pool's source and domain columns)."""
        return self._file("picks.parquet")

    @property
    def push(self) -> str:
        """push: what the label source created, and where."""
        return self._file("push.json")

    @property
    def labels(self) -> str:
        """collect: the resolved labels of ALL rounds so far that the round's re-fit learns from."""
        return self._file("labels.parquet")

    @property
    def projection(self) -> str:
        """train: the re-fitted image projection."""
        return self._file("projection.safetensors")

    @property
    def train(self) -> str:
        """train: the re-fit's summary and history."""
        return self._file("train.json")

    @property
    def ray_train(self) -> str:
        """train: Ray Train's storage path (the Ray trainer only)."""
        return self._file("ray-train")

    @property
    def posterior(self) -> str:
        """update: the posterior directory after the round (the next round selects with it)."""
        return self._file("posterior")

    @property
    def metrics(self) -> str:
        """update: the evaluation after the update (with an evaluation set)."""
        return self._file("metrics.json")

    @property
    def reliability(self) -> str:
        """update: the reliability diagram of that evaluation."""
        return self._file("reliability.png")

    def picked_ids(self) -> list[str]:
        """The sample ids of the round's picks, in rank order ([] before they are chosen)."""
        if not storage.is_file(self.picks):
            return []
        return storage.read_parquet(self.picks, columns=["sample_id"]).column("sample_id").to_pylist()

    def read_picks(self) -> list[dict[str, Any]]:
        """The picks' rows (sample_id, rank, score, predicted, confidence, entropy, ...)."""
        return storage.read_parquet(self.picks).to_pylist()

    def read_labels(self) -> dict[str, str]:
        """sample_id -> label of the labels the round trained on."""
        table = storage.read_parquet(self.labels, columns=["sample_id", "label"])
        return dict(
            zip(table.column("sample_id").to_pylist(), table.column("label").to_pylist(), strict=True)
        )

    def read_projection(self) -> Tensor:
        """The re-fitted image projection [D, d]."""
        found, _ = tensors.load(self.projection)
        return found["weight"]


@dataclass(frozen=True)
class CampaignDir:
    """A campaign directory (local path or URI) and the paths of its files (see the module docstring)."""

    root: str

    @property
    def name(self) -> str:
        """The directory's last path component."""
        return storage.resolve(self.root)[1].rstrip("/").rsplit("/", 1)[-1]

    @property
    def config(self) -> str:
        return storage.join(self.root, CONFIG_FILE)

    @property
    def state(self) -> str:
        return storage.join(self.root, STATE_FILE)

    @property
    def lease(self) -> str:
        return storage.join(self.root, LEASE_FILE)

    @property
    def cache(self) -> str:
        return storage.join(self.root, CACHE_FILE)

    @property
    def labels(self) -> str:
        return storage.join(self.root, LABELS_DIR)

    @property
    def quarantine(self) -> str:
        return storage.join(self.root, QUARANTINE_DIR)

    def initialised(self) -> bool:
        """Whether `campaign init` finished here (it writes `state.json` last)."""
        return storage.is_file(self.state)

    def round(self, index: int) -> RoundFiles:
        return RoundFiles(self.root, index)

    def read_config(self) -> CampaignConfig:
        if not storage.is_file(self.config):
            raise FileNotFoundError(f"{self.root!r} is not a campaign directory (no {CONFIG_FILE})")
        return CampaignConfig.model_validate(yaml.safe_load(storage.read_text(self.config)) or {})

    def write_config(self, cfg: CampaignConfig) -> None:
        storage.write_text(self.config, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def campaign_name(directory: str) -> str:
    """The directory's last path component (local path or URI)."""
    return CampaignDir(directory).name


def project_name(cfg: CampaignConfig, directory: str) -> str:
    """What the campaign is called at its label source and in MLflow: `project`, else the directory's name."""
    return cfg.project or campaign_name(directory)


def read_config(directory: str) -> CampaignConfig:
    return CampaignDir(directory).read_config()


def write_config(directory: str, cfg: CampaignConfig) -> None:
    CampaignDir(directory).write_config(cfg)
