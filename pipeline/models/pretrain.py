"""Contrastive pretraining of the tiny CLIP on the synthetic world (what `bayescurate pretrain-tiny` runs).

The objective is CLIP's (Radford et al., 2021): for a batch of `N` image–caption pairs with embeddings
`g_i`, `h_j` and logits `Z_ij = s · cos(g_i, h_j)`, the symmetric cross-entropy with one-hot targets

    L = ½ [ −(1/N) Σ_i log softmax_j(Z_i·)_i  −  (1/N) Σ_j log softmax_i(Z_·j)_j ],

every other pair of the batch a negative. The scale `s = exp(logit_scale)` is learned with the rest of the
model (no weight decay), starts at `1/0.07` and is clamped to `[1, 100]` after every optimiser step, as in
CLIP and open_clip. On web data the scale runs into that clamp, which makes pretrained CLIPs confident and,
under shift, over-confident.

Captions of this world often describe only part of an image ("a red shape"), so a batch holds captions
true of several of its images, which the hard targets treat as negatives, as web captions are for CLIP.
`contrastive_targets="soft"` keeps the earlier alternative: each row (column) of the target spreads its
mass uniformly over the caption-compatible pairs (`positive_pairs`). Fresh images are drawn every step, so
there is no overfitting to a fixed set and no epoch bookkeeping.

Recipe of the shipped checkpoint (its model card records both stages): stage 1, 250 steps with the defaults
below; stage 2, 500 steps warm-started from stage 1 (`init_from`, which also carries the learned scale on)
on a fresh data stream (`data_seed=1001`) with half of the captions replaced by shape-only ones
(`shape_caption_p=0.5`), `lr=1e-3`, `warmup_steps=10`. Stage 1 alone learns colour and size quickly but
shape slowly (clean shape accuracy 0.25): most captions name the colour, which separates a batch on its
own. With hard targets stage 2 needs 500 steps where soft targets needed 250 (0.67 after 250, 0.92 after
500, 1.00 after 1,000). A ViT vision tower (patch 16, width 128, 3 layers) learned colour but not shape in
200 steps on these cores; the small timm ResNet (`test_resnet`) learns shape faster per CPU second, so it
is the tower.

The learned scale stays near 16, not CLIP's 100: it is the maximum-likelihood scale of this world, not a
learning-rate limit (for the shipped embeddings held fixed, the batch loss is lowest at s ≈ 17). Partial
captions make many in-batch "negatives" true matches ("a circle" fits a sixth of a batch), and hard
targets make confidence on those costly; web captions rarely repeat.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from pydantic import Field
from safetensors.torch import load_file, save_file

from pipeline.config import Config, Renamed
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


class Targets(str, Enum):
    """Which pairs of a batch the contrastive loss counts as matching."""

    HARD = "hard"
    """CLIP: only the image's own caption (one-hot targets); every other pair is a negative."""
    SOFT = "soft"
    """Every caption true of the image (`positive_pairs`), the target uniform over them."""


class PretrainConfig(Config):
    """Training run of the tiny model."""

    out: Annotated[str | None, Renamed("out_dir")] = Field(
        None, json_schema_extra={"metavar": "DIR"}
    )  # where the checkpoint directory is written (default: the shipped model, which needs --overwrite)
    overwrite: bool = False  # replace the shipped tiny model (pipeline/models/assets/bayescurate-tiny)
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
    contrastive_targets: Annotated[Targets, Renamed("targets")] = Targets.HARD  # hard (CLIP, one-hot) or
    # soft (caption-compatible)
    init_temperature: float = 0.07  # logit_scale starts at log(1/T) (CLIP); a warm start keeps its own
    max_logit_scale: float = 100.0  # exp(logit_scale) is clamped to [1, this] after every step (CLIP)

    @property
    def checkpoint_dir(self) -> Path:
        """`out`, or the shipped tiny model's directory."""
        return Path(self.out) if self.out else registry.TINY_DIR

    def check_overwrite(self) -> None:
        """Refuse to replace the shipped model unless `overwrite` says so (before any training)."""
        if self.checkpoint_dir.resolve() == registry.TINY_DIR.resolve() and not self.overwrite:
            raise FileExistsError(
                f"{registry.TINY_DIR} is the shipped tiny model: pass --out DIR to write elsewhere, or "
                "--overwrite to replace it"
            )


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


def clip_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE with one-hot targets (Radford et al., 2021).

    `Z = s · norm(img) @ norm(txt)ᵀ` [N, N];
    `L = ½ [ −(1/N) Σ_i log softmax_j(Z_i·)_i − (1/N) Σ_j log softmax_i(Z_·j)_j ]`.
    img [N, D], txt [N, D] unnormalised, row i of each a pair; scale `s` a scalar tensor (learnable).
    """
    logits = scale * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T  # [N, N]
    target = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def soft_clip_loss(
    img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, pos: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE with targets uniform over the positives of each row / column.

    `L = ½ [ −(1/N) Σ_i Σ_j pos_ij/|pos_i·| log softmax_j(Z_i·)_j − (1/N) Σ_j Σ_i pos_ij/|pos_·j| log
    softmax_i(Z_·j)_i ]` with `Z` as in `clip_loss`; `pos = I` gives `clip_loss`.
    img [N, D], txt [N, D] unnormalised; pos [N, N] bool with a true diagonal.
    """
    logits = scale * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T  # [N, N]
    target = pos.float()
    loss_i = -(target / target.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
    loss_t = -(target / target.sum(0, keepdim=True) * logits.log_softmax(0)).sum(0).mean()
    return 0.5 * (loss_i + loss_t)


def build_model(cfg: PretrainConfig) -> torch.nn.Module:
    """The architecture `cfg.arch` at `logit_scale = log(1/T)`, or the warm-start weights `cfg.init_from`."""
    if not 0.0 < cfg.init_temperature <= 1.0:
        raise ValueError(f"init_temperature must be in (0, 1], got {cfg.init_temperature}")
    if cfg.max_logit_scale < 1.0 / cfg.init_temperature:
        raise ValueError(
            f"max_logit_scale {cfg.max_logit_scale} is below the initial scale 1/{cfg.init_temperature}"
        )
    registry.register_configs()
    model = open_clip.create_model(cfg.arch, pretrained=None)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1.0 / cfg.init_temperature))
    if cfg.init_from is not None:
        if not Path(cfg.init_from).is_file():
            raise FileNotFoundError(f"init_from weights {cfg.init_from!r} do not exist")
        model.load_state_dict(load_file(cfg.init_from))
    return model


def build_optimizer(model: torch.nn.Module, cfg: PretrainConfig) -> torch.optim.Optimizer:
    """AdamW; matrices decay, while biases, norms, embeddings and the logit scale do not (as open_clip)."""

    def decays(name: str, p: torch.nn.Parameter) -> bool:
        return p.ndim >= 2 and "embedding" not in name

    params = list(model.named_parameters())
    return torch.optim.AdamW(
        [
            {"params": [p for n, p in params if decays(n, p)], "weight_decay": cfg.weight_decay},
            {"params": [p for n, p in params if not decays(n, p)], "weight_decay": 0.0},
        ],
        lr=cfg.lr,
    )


def train_step(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    pixels: torch.Tensor,
    tokens: torch.Tensor,
    targets: Targets = Targets.HARD,
    pos: torch.Tensor | None = None,
    max_logit_scale: float = 100.0,
) -> float:
    """One optimiser step on a batch (pixels [N, 3, H, W], tokens [N, L]); then clamp the logit scale.

    `pos` [N, N] (caption-compatible pairs) is needed by soft targets only. Returns the batch loss.
    """
    img, txt = model.encode_image(pixels), model.encode_text(tokens)  # [N, D], [N, D]
    scale = model.logit_scale.exp()
    if Targets(targets) is Targets.HARD:
        loss = clip_loss(img, txt, scale)
    elif pos is None:
        raise ValueError("soft targets need the caption-compatible pairs `pos`")
    else:
        loss = soft_clip_loss(img, txt, scale, pos)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    with torch.no_grad():  # CLIP: 1 <= exp(logit_scale) <= max after every step
        model.logit_scale.clamp_(0.0, math.log(max_logit_scale))
    return float(loss.detach())


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


LOSS_TEXT = {
    Targets.HARD: "CLIP's symmetric InfoNCE with one-hot targets, learnable logit scale clamped at log(max)",
    Targets.SOFT: "symmetric InfoNCE with soft targets over caption-compatible pairs, learnable logit scale",
}


def _previous_stages(init_from: str | None) -> list[dict[str, Any]]:
    """The stages recorded by the model card next to warm-start weights (none without a card)."""
    if init_from is None:
        return []
    card_path = Path(init_from).parent / registry.CARD_FILE
    if not card_path.is_file():
        return []
    training = json.loads(card_path.read_text()).get("training", {})
    return list(training.get("stages", []))


def train_tiny(cfg: PretrainConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train the tiny CLIP, write the checkpoint directory, and return the model card.

    A warm start from a checkpoint directory with a model card continues its record: the new card lists
    the earlier stages and this one. The shipped model is replaced only with `overwrite`.
    """
    cfg.check_overwrite()
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
    previous = _previous_stages(cfg.init_from)
    model = build_model(cfg)
    model.train()
    opt = build_optimizer(model, cfg)
    targets = Targets(cfg.contrastive_targets)

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
        pos = positive_pairs([s.labels for s in batch], captions) if targets is Targets.SOFT else None
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        losses.append(train_step(model, opt, x, tokens, targets, pos, cfg.max_logit_scale))
        if step % 20 == 0 or step == cfg.steps - 1:
            log(
                f"step {step:4d}  loss {np.mean(losses[-20:]):.4f}  "
                f"scale {float(model.logit_scale.detach().exp()):6.2f}  {time.monotonic() - start:6.1f}s"
            )
    train_seconds = time.monotonic() - start

    accuracy = evaluate(model, tokenizer, cfg, preprocess)
    scale = float(model.logit_scale.detach().exp())
    out = cfg.checkpoint_dir
    registry.write_local_dir(out, model_cfg, preprocess)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / registry.WEIGHTS_FILE))
    tokenizer.save(out)
    stage = {
        **cfg.model_dump(mode="json", exclude={"out", "overwrite", "contrastive_targets"}),
        "targets": targets.value,  # the name the shipped card's stages use
        "data": "pipeline.data.synthetic World(data_seed), clean domain, a fresh batch every step",
        "loss": LOSS_TEXT[targets],
        "images_seen": cfg.steps * cfg.batch_size,
        "train_seconds": round(train_seconds, 1),
        "final_loss": round(float(np.mean(losses[-20:])), 4),
        "logit_scale_exp": round(scale, 4),
        "clean_zero_shot_accuracy": {k: round(v, 4) for k, v in accuracy.items() if k.startswith("clean/")},
    }
    stages = [*previous, stage]
    card = {
        "name": registry.TINY_MODEL,
        "architecture": model_cfg,
        "parameters": sum(p.numel() for p in model.parameters()),
        "tokenizer": "word-level, vocab.json (see pipeline/models/tokenizer.py)",
        "training": {
            "stages": stages,
            "images_seen": sum(int(s.get("images_seen", 0)) for s in stages),
            "train_seconds": round(sum(float(s.get("train_seconds", 0.0)) for s in stages), 1),
            "loss": LOSS_TEXT[targets],
            "torch": torch.__version__,
            "open_clip": open_clip.__version__,
        },
        "zero_shot_accuracy": {k: round(v, 4) for k, v in accuracy.items()},
        "zero_shot_eval": (
            f"{cfg.eval_n:,} images of World(eval_seed={cfg.eval_seed}) per domain/severity; "
            "prompt-ensembled class embeddings"
        ),
        "logit_scale_exp": round(scale, 4),
    }
    (out / registry.CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    log(
        f"wrote {out} in {train_seconds:.0f}s of training; logit scale {scale:.2f}; clean accuracy "
        f"shape {accuracy['clean/0/shape']:.3f} colour {accuracy['clean/0/colour']:.3f}"
    )
    return card
