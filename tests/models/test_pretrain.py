"""Pretraining of the tiny CLIP: CLIP's hard-target objective and temperature, and the `pretrain-tiny` job."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from jobs.pretrain_tiny import main
from pipeline.data import synthetic
from pipeline.models import registry
from pipeline.models.adapter import load_model
from pipeline.models.pretrain import (
    PretrainConfig,
    Targets,
    build_model,
    build_optimizer,
    clip_loss,
    images_to_tensor,
    positive_pairs,
    soft_clip_loss,
    train_step,
)
from pipeline.models.tokenizer import WordTokenizer


def _card(directory: Path) -> dict:
    return json.loads((directory / registry.CARD_FILE).read_text())


def test_pretrain_job_writes_a_loadable_checkpoint_and_a_warm_start_continues_it(tmp_path: Path) -> None:
    common = ["--steps", "2", "--batch-size", "8", "--eval-n", "10", "--threads", "1"]
    first, second = tmp_path / "stage1", tmp_path / "stage2"
    assert main(["--out-dir", str(first), *common]) == 0
    for name in (registry.CONFIG_FILE, registry.WEIGHTS_FILE, "vocab.json", registry.CARD_FILE):
        assert (first / name).is_file(), name
    card = _card(first)
    (stage,) = card["training"]["stages"]
    assert (
        stage["steps"] == 2 and stage["targets"] == "hard" and "clean/0/shape" in card["zero_shot_accuracy"]
    )
    assert 1.0 <= card["logit_scale_exp"] <= 100.0
    adapter = load_model(f"local-dir:{first}")
    assert adapter.tokenize(["a red circle"]).shape == (1, 12)

    weights = first / registry.WEIGHTS_FILE
    argv = ["--out-dir", str(second), "--init-from", str(weights), "--shape-caption-p", "0.5", *common]
    assert main(argv) == 0
    stages = _card(second)["training"]["stages"]
    assert [s["shape_caption_p"] for s in stages] == [0.0, 0.5]
    assert _card(second)["training"]["images_seen"] == 2 * 2 * 8


def test_pretrain_job_rejects_bad_flags(tmp_path: Path) -> None:
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert main(["--targets", "fuzzy", "--out-dir", str(tmp_path / "x")]) == 2
    assert main(["--init-from", str(tmp_path / "none.safetensors"), "--out-dir", str(tmp_path / "x")]) == 2


def test_positive_pairs_follow_caption_attributes() -> None:
    labels = [
        {"shape": "circle", "colour": "red", "size": "small", "texture": "plain"},
        {"shape": "star", "colour": "red", "size": "large", "texture": "dots"},
    ]
    captions = ["a small red circle on plain", "a red shape", "a star"]
    pos = positive_pairs(labels, captions)
    assert pos.tolist() == [[True, True, False], [False, True, True]]


def _embeddings(n: int = 5, d: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(2, n, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return x[0], x[1]  # [n, d] images, [n, d] captions


def test_clip_loss_is_the_symmetric_hard_target_cross_entropy() -> None:
    img, txt = _embeddings()
    s = 1 / 0.07
    n = len(img)
    z = [
        [s * float(img[i] @ txt[j]) / float(img[i].norm() * txt[j].norm()) for j in range(n)]
        for i in range(n)
    ]
    image_to_text = sum(math.log(sum(math.exp(z[i][j]) for j in range(n))) - z[i][i] for i in range(n)) / n
    text_to_image = sum(math.log(sum(math.exp(z[i][j]) for i in range(n))) - z[j][j] for j in range(n)) / n
    expected = 0.5 * (image_to_text + text_to_image)
    got = clip_loss(img, txt, torch.tensor(s, dtype=torch.float64))
    assert float(got) == pytest.approx(expected, rel=1e-12)
    # Soft targets with only the diagonal as positives are the hard targets.
    pos = torch.eye(n, dtype=torch.bool)
    assert float(soft_clip_loss(img, txt, torch.tensor(s, dtype=torch.float64), pos)) == pytest.approx(
        expected, rel=1e-12
    )


def test_clip_loss_scale_gradient_is_mean_minus_target_cosine() -> None:
    # dL/ds = ½ mean_i (E_softmax_j[cos_ij] - cos_ii) + ½ mean_j (E_softmax_i[cos_ij] - cos_jj).
    img, txt = _embeddings()
    scale = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    clip_loss(img, txt, scale).backward()
    cos = torch.nn.functional.normalize(img, dim=1) @ torch.nn.functional.normalize(txt, dim=1).T
    p_row, p_col = (10.0 * cos).softmax(1), (10.0 * cos).softmax(0)
    diag = cos.diagonal()
    expected = 0.5 * ((p_row * cos).sum(1) - diag).mean() + 0.5 * ((p_col * cos).sum(0) - diag).mean()
    assert scale.grad is not None
    assert float(scale.grad) == pytest.approx(float(expected), rel=1e-10)


def test_soft_clip_loss_is_minimal_for_matching_embeddings() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, generator=g, dtype=torch.float64)
    pos = torch.eye(4, dtype=torch.bool)
    scale = torch.tensor(50.0, dtype=torch.float64)
    aligned = soft_clip_loss(x, x, scale, pos)
    shuffled = soft_clip_loss(x, x.roll(1, 0), scale, pos)
    assert float(aligned) < 0.1 < float(shuffled)


def test_logit_scale_is_learnable_undecayed_and_starts_at_clip_temperature() -> None:
    model = build_model(PretrainConfig())
    assert isinstance(model.logit_scale, torch.nn.Parameter) and model.logit_scale.requires_grad
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07), rel=1e-6)
    opt = build_optimizer(model, PretrainConfig())
    (group,) = [g for g in opt.param_groups if any(p is model.logit_scale for p in g["params"])]
    assert group["weight_decay"] == 0.0


def test_warm_start_keeps_the_learned_logit_scale(tmp_path: Path) -> None:
    model = build_model(PretrainConfig())
    with torch.no_grad():
        model.logit_scale.fill_(math.log(42.0))
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    warm = build_model(PretrainConfig(init_from=str(path)))
    assert warm.logit_scale.exp().item() == pytest.approx(42.0, rel=1e-6)
    assert float(load_file(str(path))["logit_scale"].exp()) == pytest.approx(42.0, rel=1e-6)


def test_bad_temperatures_are_rejected() -> None:
    with pytest.raises(ValueError, match="init_temperature"):
        build_model(PretrainConfig(init_temperature=0.0))
    with pytest.raises(ValueError, match="max_logit_scale"):
        build_model(PretrainConfig(max_logit_scale=10.0))


def _batch(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    samples = [synthetic.World(7).sample(i) for i in range(n)]
    pre = registry.TINY_PREPROCESS
    pixels = images_to_tensor([s.image for s in samples], pre["mean"], pre["std"])  # [n, 3, 64, 64]
    tokens = WordTokenizer(synthetic.vocabulary(), 12)([s.caption for s in samples])  # [n, 12]
    pos = positive_pairs([s.labels for s in samples], [s.caption for s in samples])
    return pixels, tokens, pos


def test_logit_scale_is_clamped_after_every_step() -> None:
    torch.manual_seed(0)
    cfg = PretrainConfig(lr=1e-2)
    model = build_model(cfg)
    opt = build_optimizer(model, cfg)
    pixels, tokens, pos = _batch(6)
    for targets in (Targets.HARD, Targets.SOFT, Targets.HARD):
        with torch.no_grad():  # well above the clamp: one Adam step (at most ~lr) cannot bring it back
            model.logit_scale.fill_(math.log(100.0) + 1.0)
        train_step(model, opt, pixels, tokens, targets, pos, max_logit_scale=100.0)
        assert model.logit_scale.item() == pytest.approx(math.log(100.0), abs=1e-6)


def test_soft_targets_need_the_positive_pairs() -> None:
    cfg = PretrainConfig()
    model = build_model(cfg)
    pixels, tokens, _ = _batch(4)
    with pytest.raises(ValueError, match="pos"):
        train_step(model, build_optimizer(model, cfg), pixels, tokens, Targets.SOFT, None)


def test_a_few_steps_decrease_the_loss() -> None:
    torch.manual_seed(0)
    cfg = PretrainConfig(lr=2e-3, weight_decay=0.0)
    model = build_model(cfg)
    model.train()
    opt = build_optimizer(model, cfg)
    pixels, tokens, _ = _batch(16)
    losses = [train_step(model, opt, pixels, tokens) for _ in range(8)]
    assert losses[-1] < losses[0] - 0.1, losses
    assert math.log(1.0) <= model.logit_scale.item() <= math.log(100.0)
