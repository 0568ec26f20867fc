"""Contrastive pretraining of the tiny CLIP on the synthetic world (what `bayescurate pretrain-tiny` runs).

Captions of this world often describe only part of an image ("a red shape"), so one batch holds many
captions that truly match several of its images. Plain CLIP would push those apart as negatives. The loss
here is CLIP's symmetric cross-entropy with soft targets: image `i` and caption `j` are a positive pair when
every attribute the caption mentions matches the image (`caption_attributes`), and each row (column) of the
target spreads its mass uniformly over its positives. Fresh images are drawn every step, so there is no
overfitting to a fixed set and no epoch bookkeeping.

Recipe of the shipped checkpoint (its model card records both stages): stage 1 with the defaults below;
stage 2 warm-started from stage 1 (`init_from`) on a fresh data stream (`data_seed=1001`) with half of the
captions replaced by shape-only ones (`shape_caption_p=0.5`), `lr=1e-3`, `warmup_steps=10`. Stage 1 alone
learns colour and size quickly but shape slowly: most captions name the colour, which separates a batch on
its own. A ViT vision tower (patch 16, width 128, 3 layers) learned colour but not shape in 200 steps on
these cores; the small timm ResNet (`test_resnet`) learns shape faster per CPU second, so it is the tower.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from pipeline.config import Config
from pipeline.data import synthetic
from pipeline.models import registry
from pipeline.models.tokenizer import WordTokenizer

SHAPE_CAPTIONS = ("a {shape}", "a photo of a {shape}")
ATTRIBUTES = ("shape", "colour", "size", "texture")
_VALUES = {
    "shape": synthetic.SHAPES,
    "colour": tuple(synthetic.COLOURS),
    "size": tuple(synthetic.SIZES),
    "texture": synthetic.TEXTURES,
}


class PretrainConfig(Config):
    """Training run of the tiny model."""

    out_dir: str = str(registry.TINY_DIR)  # where the checkpoint directory is written
    arch: str = registry.TINY_MODEL  # architecture config in pipeline/models/configs/
    steps: int = 250  # optimiser steps
    batch_size: int = 128  # image-caption pairs per step
    lr: float = 2e-3  # peak AdamW learning rate (linear warmup, cosine decay)
    warmup_steps: int = 25  # linear warmup steps
    weight_decay: float = 0.05  # AdamW weight decay
    seed: int = 0  # torch init seed; the data come from the synthetic world of `data_seed`
    data_seed: int = 1000  # seed of the synthetic training stream
    eval_seed: int = 2000  # a world disjoint from the training stream
    eval_n: int = 1000  # images per zero-shot evaluation set
    threads: int = 2  # torch CPU threads
    shape_caption_p: float = 0.0  # chance of replacing a caption by a shape-only one ("a photo of a star")
    init_from: str | None = None  # warm start: a weights file (.safetensors) of the same architecture


def images_to_tensor(images: list[Any], mean: list[float], std: list[float]) -> torch.Tensor:
    """Stack RGB PIL images [N, 3, H, W] float32, normalised like the model's preprocessing (no resizing)."""
    arr = np.stack([np.asarray(im, dtype=np.uint8) for im in images])  # [N, H, W, 3]
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255.0)  # [N, 3, H, W]
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (x - m) / s


def positive_pairs(labels: list[dict[str, str]], captions: list[str]) -> torch.Tensor:
    """[N_img, N_txt] bool: caption j is true of image i (every attribute it mentions matches)."""
    codes = torch.tensor([[_VALUES[a].index(lab[a]) for a in ATTRIBUTES] for lab in labels])  # [N, 4]
    mentioned = [synthetic.caption_attributes(c) for c in captions]
    cap = torch.tensor([[_VALUES[a].index(m[a]) if a in m else -1 for a in ATTRIBUTES] for m in mentioned])
    match = (codes[:, None, :] == cap[None, :, :]) | (cap[None, :, :] < 0)  # [N, M, 4]
    return match.all(dim=-1)


def _captions(batch: list[synthetic.Sample], shape_p: float, rng: np.random.Generator) -> list[str]:
    """The world's captions, each replaced with chance `shape_p` by a shape-only caption.

    Most captions name the colour, which a batch separates on its own, so shape is rarely the attribute that
    tells a caption's images from the rest; shape-only captions make it so.
    """
    out = []
    for s in batch:
        if rng.random() < shape_p:
            template = SHAPE_CAPTIONS[int(rng.integers(len(SHAPE_CAPTIONS)))]
            out.append(template.format(shape=s.labels["shape"]))
        else:
            out.append(s.caption)
    return out


def soft_clip_loss(
    img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, pos: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE with targets uniform over the positives of each row / column.

    img [N, D], txt [N, D] unnormalised; pos [N, N] bool with a true diagonal.
    """
    logits = scale * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T  # [N, N]
    target = pos.float()
    loss_i = -(target / target.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
    loss_t = -(target / target.sum(0, keepdim=True) * logits.log_softmax(0)).sum(0).mean()
    return 0.5 * (loss_i + loss_t)


@torch.no_grad()
def class_embeddings(
    model: torch.nn.Module, tokenizer: Callable[[list[str]], torch.Tensor], task: str
) -> torch.Tensor:
    """Normalised prompt-ensembled text embedding of each class of `task`: [C, D]."""
    rows = []
    for name in synthetic.class_names(task):
        tokens = tokenizer([p.format(name) for p in synthetic.prompts(task)])  # [P, L]
        rows.append(F.normalize(model.encode_text(tokens), dim=-1).mean(0))
    return F.normalize(torch.stack(rows), dim=-1)


@torch.no_grad()
def image_embeddings(model: torch.nn.Module, pixels: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Normalised image embeddings of `pixels` [N, 3, H, W]: [N, D]."""
    parts = [model.encode_image(pixels[i : i + batch_size]) for i in range(0, len(pixels), batch_size)]
    return F.normalize(torch.cat(parts), dim=-1)


def accuracy_of(
    images: torch.Tensor, classes: torch.Tensor, labels: list[dict[str, str]], task: str
) -> float:
    """Top-1 accuracy of nearest-class-embedding predictions; images [N, D], classes [C, D]."""
    names = synthetic.class_names(task)
    truth = torch.tensor([names.index(lab[task]) for lab in labels])
    return float(((images @ classes.T).argmax(1) == truth).float().mean())


def zero_shot_accuracy(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    pixels: torch.Tensor,
    labels: list[dict[str, str]],
    task: str,
) -> float:
    """Accuracy of prompt-ensembled zero-shot classification of `pixels` [N, 3, H, W] on `task`."""
    model.eval()
    return accuracy_of(
        image_embeddings(model, pixels), class_embeddings(model, tokenizer, task), labels, task
    )


def _eval_set(
    seed: int, n: int, domain: str, severity: int, preprocess: dict[str, Any]
) -> tuple[torch.Tensor, list[dict[str, str]]]:
    samples = list(synthetic.generate(n, seed=seed, domain=domain, severity=severity))
    x = images_to_tensor([s.image for s in samples], preprocess["mean"], preprocess["std"])
    return x, [s.labels for s in samples]


def evaluate(
    model: torch.nn.Module, tokenizer: WordTokenizer, cfg: PretrainConfig, preprocess: dict[str, Any]
) -> dict[str, float]:
    """Zero-shot shape and colour accuracy in-domain and on every shift at severities 1, 3 and 5."""
    model.eval()
    out: dict[str, float] = {}
    tasks = ("shape", "colour", "size")
    classes = {task: class_embeddings(model, tokenizer, task) for task in tasks}
    sets = [("clean", 0)] + [(d.value, s) for d in synthetic.SHIFTED_DOMAINS for s in (1, 3, 5)]
    for domain, severity in sets:
        x, labels = _eval_set(cfg.eval_seed, cfg.eval_n, domain, severity, preprocess)
        images = image_embeddings(model, x)  # [N, D]
        for task in tasks:
            out[f"{domain}/{severity}/{task}"] = accuracy_of(images, classes[task], labels, task)
    return out


def train_tiny(cfg: PretrainConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train the tiny CLIP, write the checkpoint directory, and return the model card."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    registry.register_configs()
    model_cfg = registry.model_config(cfg.arch)
    tokenizer = WordTokenizer(synthetic.vocabulary(), model_cfg["text_cfg"]["context_length"])
    if tokenizer.vocab_size != model_cfg["text_cfg"]["vocab_size"]:
        raise ValueError(
            f"config vocab_size {model_cfg['text_cfg']['vocab_size']} != "
            f"tokenizer vocab size {tokenizer.vocab_size}"
        )
    preprocess = registry.TINY_PREPROCESS
    model = open_clip.create_model(cfg.arch, pretrained=None)
    if cfg.init_from is not None:
        if not Path(cfg.init_from).is_file():
            raise FileNotFoundError(f"init_from weights {cfg.init_from!r} do not exist")
        model.load_state_dict(load_file(cfg.init_from))
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
    )

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))

    world = synthetic.World(cfg.data_seed)
    start = time.monotonic()
    losses: list[float] = []
    for step in range(cfg.steps):
        batch = [world.sample(step * cfg.batch_size + k) for k in range(cfg.batch_size)]
        x = images_to_tensor([s.image for s in batch], preprocess["mean"], preprocess["std"])  # [B, 3, H, W]
        captions = _captions(batch, cfg.shape_caption_p, np.random.default_rng([cfg.data_seed, step]))
        tokens = tokenizer(captions)  # [B, L]
        pos = positive_pairs([s.labels for s in batch], captions)  # [B, B]
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        img, txt = model.encode_image(x), model.encode_text(tokens)
        loss = soft_clip_loss(img, txt, model.logit_scale.exp(), pos)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(float(loss.detach()))
        if step % 20 == 0 or step == cfg.steps - 1:
            log(f"step {step:4d}  loss {np.mean(losses[-20:]):.4f}  {time.monotonic() - start:6.1f}s")
    train_seconds = time.monotonic() - start

    accuracy = evaluate(model, tokenizer, cfg, preprocess)
    out = Path(cfg.out_dir)
    registry.write_local_dir(out, model_cfg, preprocess)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / registry.WEIGHTS_FILE))
    tokenizer.save(out)
    card = {
        "name": registry.TINY_MODEL,
        "architecture": model_cfg,
        "parameters": sum(p.numel() for p in model.parameters()),
        "tokenizer": "word-level, vocab.json (see pipeline/models/tokenizer.py)",
        "training": {
            **cfg.model_dump(exclude={"out_dir"}),
            "data": "pipeline.data.synthetic World(data_seed), clean domain, a fresh batch every step",
            "loss": "symmetric InfoNCE with soft targets over caption-compatible pairs",
            "images_seen": cfg.steps * cfg.batch_size,
            "train_seconds": round(train_seconds, 1),
            "final_loss": round(float(np.mean(losses[-20:])), 4),
            "torch": torch.__version__,
            "open_clip": open_clip.__version__,
        },
        "zero_shot_accuracy": {k: round(v, 4) for k, v in accuracy.items()},
        "logit_scale_exp": round(float(model.logit_scale.detach().exp()), 4),
    }
    (out / registry.CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    log(
        f"wrote {out} in {train_seconds:.0f}s of training; clean accuracy "
        f"shape {accuracy['clean/0/shape']:.3f} colour {accuracy['clean/0/colour']:.3f}"
    )
    return card
