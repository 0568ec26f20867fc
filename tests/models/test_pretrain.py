"""`bayescurate pretrain-tiny` runs in-process on a few steps and writes a loadable checkpoint directory."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from jobs.pretrain_tiny import main
from pipeline.models import registry
from pipeline.models.adapter import load_model
from pipeline.models.pretrain import positive_pairs, soft_clip_loss


def test_pretrain_job_writes_a_loadable_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "tiny"
    argv = ["--out-dir", str(out), "--steps", "2", "--batch-size", "8", "--eval-n", "10", "--threads", "1"]
    assert main(argv) == 0
    for name in (registry.CONFIG_FILE, registry.WEIGHTS_FILE, "vocab.json", registry.CARD_FILE):
        assert (out / name).is_file(), name
    card = json.loads((out / registry.CARD_FILE).read_text())
    assert card["training"]["steps"] == 2 and "clean/0/shape" in card["zero_shot_accuracy"]
    adapter = load_model(f"local-dir:{out}")
    assert adapter.tokenize(["a red circle"]).shape == (1, 12)


def test_pretrain_job_rejects_bad_flags(tmp_path: Path) -> None:
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2


def test_positive_pairs_follow_caption_attributes() -> None:
    labels = [
        {"shape": "circle", "colour": "red", "size": "small", "texture": "plain"},
        {"shape": "star", "colour": "red", "size": "large", "texture": "dots"},
    ]
    captions = ["a small red circle on plain", "a red shape", "a star"]
    pos = positive_pairs(labels, captions)
    assert pos.tolist() == [[True, True, False], [False, True, True]]


def test_soft_clip_loss_is_minimal_for_matching_embeddings() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, generator=g, dtype=torch.float64)
    pos = torch.eye(4, dtype=torch.bool)
    scale = torch.tensor(50.0, dtype=torch.float64)
    aligned = soft_clip_loss(x, x, scale, pos)
    shuffled = soft_clip_loss(x, x.roll(1, 0), scale, pos)
    assert float(aligned) < 0.1 < float(shuffled)
