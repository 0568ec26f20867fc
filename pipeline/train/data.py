"""The labelled rows of a re-fit and their stable split into train and held-back rows."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor

MIN_ROWS_FOR_HOLDOUT = 10  # below this every row trains: a held-back NLL of fewer rows is noise


@dataclass(frozen=True)
class TrainData:
    """Labelled pairs of an annotation round, one row per sample (MATH §9).

    acts: [n, d] float64 cached pre-projection image activations (bias-augmented like the posterior);
    labels: [n] long class indices; offsets: [n, D] float64 embedding offsets (SigLIP) or None;
    sample_ids: n distinct ids, which fix the held-back split.
    """

    acts: Tensor
    labels: Tensor
    offsets: Tensor | None
    sample_ids: list[str]

    def __post_init__(self) -> None:
        if self.acts.ndim != 2:
            raise ValueError(f"acts must be [n, d], got shape {list(self.acts.shape)}")
        n = self.acts.shape[0]
        if self.labels.ndim != 1 or self.labels.shape[0] != n:
            raise ValueError(f"labels have shape {list(self.labels.shape)}, expected [{n}]")
        if self.labels.dtype.is_floating_point or self.labels.dtype == torch.bool:
            raise ValueError(f"labels must be integer class indices, got dtype {self.labels.dtype}")
        if self.offsets is not None and (self.offsets.ndim != 2 or self.offsets.shape[0] != n):
            raise ValueError(f"offsets have shape {list(self.offsets.shape)}, expected [{n}, D]")
        if len(self.sample_ids) != n:
            raise ValueError(f"got {len(self.sample_ids)} sample ids for {n} rows")
        seen: set[str] = set()
        for sample_id in self.sample_ids:
            if sample_id in seen:
                raise ValueError(f"sample id {sample_id!r} appears more than once (dedupe by sample id)")
            seen.add(sample_id)
        # Frozen, but normalise the dtypes once here so every consumer sees float64 / long.
        object.__setattr__(self, "acts", self.acts.to(torch.float64))
        object.__setattr__(self, "labels", self.labels.to(torch.long))
        if self.offsets is not None:
            object.__setattr__(self, "offsets", self.offsets.to(torch.float64))
        object.__setattr__(self, "sample_ids", [str(s) for s in self.sample_ids])

    def __len__(self) -> int:
        return int(self.acts.shape[0])

    @classmethod
    def empty(cls, d: int, D: int | None = None) -> TrainData:
        """No rows (offsets [0, D] when D is given, else None)."""
        offsets = None if D is None else torch.zeros(0, D, dtype=torch.float64)
        return cls(torch.zeros(0, d, dtype=torch.float64), torch.zeros(0, dtype=torch.long), offsets, [])

    def take(self, rows: list[int]) -> TrainData:
        """The rows at the given positions, in that order."""
        index = torch.tensor(rows, dtype=torch.long)
        offsets = None if self.offsets is None else self.offsets[index]
        return TrainData(self.acts[index], self.labels[index], offsets, [self.sample_ids[i] for i in rows])

    def to(self, device: torch.device | str) -> TrainData:
        """The same rows with the tensors on `device`."""
        offsets = None if self.offsets is None else self.offsets.to(device)
        return TrainData(self.acts.to(device), self.labels.to(device), offsets, self.sample_ids)


def holdout_score(sample_id: str, salt: int = 0) -> float:
    """A uniform number in [0, 1) fixed by (salt, sample_id) alone: blake2b, 8 bytes."""
    digest = hashlib.blake2b(f"{salt}:{sample_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def split_holdout(
    data: TrainData, holdout: float = 0.1, salt: int = 0, min_held: int = 1
) -> tuple[TrainData, TrainData]:
    """(train, held-back) rows for early stopping, each in the input order.

    `min_held`: when fewer rows than this would be held back, none is: a decision taken on a handful of
    labels is noise, and the prior already regularises the re-fit (`RefitConfig.min_holdout`).

    A row is held back when `holdout_score(sample_id, salt) < holdout`, so a sample's side never changes
    when more labels arrive. Below `MIN_ROWS_FOR_HOLDOUT` rows nothing is held back; from there on, if no
    score falls under the share, the row with the smallest score is held back (the one exception to
    stability: it returns to training once another sample is held back on its own).
    """
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"holdout must be in [0, 1), got {holdout}")
    n = len(data)
    if n < MIN_ROWS_FOR_HOLDOUT or holdout == 0.0:
        return data, data.take([])
    scores = [holdout_score(s, salt) for s in data.sample_ids]
    held = {i for i, u in enumerate(scores) if u < holdout}
    if not held:
        held = {min(range(n), key=scores.__getitem__)}
    if len(held) < min_held:
        return data, data.take([])
    return data.take([i for i in range(n) if i not in held]), data.take(sorted(held))
