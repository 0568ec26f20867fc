"""Any open_clip model as the two "last layers" BayesVLM puts a Laplace posterior on (MATH.md, Notation).

For each tower the adapter returns the pre-projection activation `a` (with a trailing 1 when the projection
has a bias), the projection `P` in `[D, d']` form, and, where the architecture adds something after the
projection, a per-sample `offset`, so that the tower's embedding is exactly `a @ P.T + offset`.

Which layer is the "last layer":
- CLIP vision towers (open_clip `VisionTransformer`): `visual.proj` (`[d, D]`, used as `pooled @ proj`), so
  `P = proj.T`; `a` is the pooled, post-`ln_post` token, computed as open_clip's own forward does:
  `pooled, _ = v._pool(v.transformer(v._embeds(x)))`.
- Text towers: `text_projection`, a Parameter `[width, D]` (`P = text_projection.T`) or an `nn.Linear`
  (`P = [W | b]`), on the `CLIP` model itself or on `model.text` for `CustomTextCLIP`. `a` is the pooled
  token that open_clip feeds to the projection: for an `nn.Linear` it is captured by a forward pre-hook; for a
  Parameter the tower is run with the projection detached (open_clip's own "pruned head" state), which
  returns the pooled token.
- timm vision towers with a linear projection head (`head.proj`): that `nn.Linear`.
- SigLIP (`timm_pool: map`, `timm_proj: none`): there is no separate projection; the embedding is the output
  of timm's `AttentionPoolLatent`, whose forward ends with `x = x + self.mlp(self.norm(x))` followed by
  token/avg pooling over the latent queries. The last linear layer is `attn_pool.mlp.fc2`, so
  `a` = input of `fc2` (pooled like the output), `P = [fc2.weight | fc2.bias]`, and the residual `x` before
  the MLP (pooled the same way) is the per-sample `offset`. Anything after the pool (`fc_norm`, `head`, the
  open_clip head) must be an identity, which is checked at construction.

The adapter only reads the model: activations are computed under `torch.no_grad()` with the model in eval
mode. Detaching a Parameter projection mutates the model for the duration of one call, so one adapter must
not be used from several threads at once (Ray actors and the jobs call it from one thread).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import Tensor, nn

from pipeline.models import registry
from pipeline.models.tokenizer import VOCAB_FILE, WordTokenizer

log = logging.getLogger(__name__)

TINY_MODEL = registry.TINY_MODEL
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
LOCAL_DIR = "local-dir:"
HF_HUB = "hf-hub:"


@dataclass
class TowerFeatures:
    """What a tower hands to the Bayesian head: `embedding = acts @ weight.T + offset`.

    acts: [N, d'] pre-projection activations, with a trailing 1 column when the projection has a bias.
    offset: [N, D] per-sample constant added after the projection (SigLIP's attention-pool residual), or None.
    """

    acts: Tensor
    offset: Tensor | None = None

    def __len__(self) -> int:
        return self.acts.shape[0]

    def embed(self, weight: Tensor) -> Tensor:
        """`acts @ weight.T (+ offset)`: [N, D] for a weight [D, d']."""
        out = self.acts @ weight.T  # [N, D]
        return out if self.offset is None else out + self.offset


class _Head:
    """The last layer of one tower: its weight and how to compute its input (and offset) for a batch."""

    has_bias: bool = False

    def weight(self) -> Tensor:  # [D, d']
        raise NotImplementedError

    def features(self, run: Callable[[], Tensor]) -> tuple[Tensor, Tensor | None]:
        """Run the tower (`run` calls the model's encode function); return (pre-projection input, offset)."""
        raise NotImplementedError


class _ParameterHead(_Head):
    """A projection Parameter `[d, D]` used as `pooled @ proj`, owned by `owner.attr`."""

    def __init__(self, owner: nn.Module, attr: str) -> None:
        self.owner, self.attr = owner, attr

    def weight(self) -> Tensor:
        return getattr(self.owner, self.attr).detach().T.clone()  # [D, d]

    @contextmanager
    def _detached(self) -> Iterator[None]:
        proj = getattr(self.owner, self.attr)
        setattr(self.owner, self.attr, None)
        try:
            yield
        finally:
            setattr(self.owner, self.attr, proj)

    def features(self, run: Callable[[], Tensor]) -> tuple[Tensor, Tensor | None]:
        with self._detached():
            return _first(run()), None


class _VisionTransformerHead(_ParameterHead):
    """open_clip `VisionTransformer`: the pooled token exactly as its forward computes it, before `proj`."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__(visual, "proj")
        self.visual = visual

    def pooled(self, pixels: Tensor) -> Tensor:
        v = self.visual
        pooled, _ = v._pool(v.transformer(v._embeds(pixels)))  # [N, d]
        return pooled


class _LinearHead(_Head):
    """An `nn.Linear` projection: its input is captured by a forward pre-hook."""

    def __init__(self, linear: nn.Linear) -> None:
        self.linear = linear
        self.has_bias = linear.bias is not None

    def weight(self) -> Tensor:
        w = self.linear.weight.detach()  # [D, d]
        if self.has_bias:
            w = torch.cat([w, self.linear.bias.detach()[:, None]], dim=1)  # [D, d + 1]
        return w.clone()

    def features(self, run: Callable[[], Tensor]) -> tuple[Tensor, Tensor | None]:
        seen: list[Tensor] = []
        handle = self.linear.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
        try:
            run()
        finally:
            handle.remove()
        if len(seen) != 1:
            raise RuntimeError(f"expected the projection to run once per forward, it ran {len(seen)} times")
        return seen[0], None


class _AttentionPoolHead(_LinearHead):
    """timm `AttentionPoolLatent` (SigLIP's MAP head): last linear `mlp.fc2`, residual as offset."""

    def __init__(self, pool: nn.Module) -> None:
        super().__init__(pool.mlp.fc2)
        self.pool = pool
        if pool.pool not in ("token", "avg"):
            raise ValueError(
                f"attention pool with pool={pool.pool!r} is not supported (need 'token' or 'avg')"
            )

    def _reduce(self, x: Tensor) -> Tensor:  # [N, L, C] -> [N, C], as AttentionPoolLatent pools its output
        return x[:, 0] if self.pool.pool == "token" else x.mean(1)

    def features(self, run: Callable[[], Tensor]) -> tuple[Tensor, Tensor | None]:
        fc2_in: list[Tensor] = []
        residual: list[Tensor] = []
        hooks = [
            self.linear.register_forward_pre_hook(lambda _m, args: fc2_in.append(args[0])),
            self.pool.norm.register_forward_pre_hook(lambda _m, args: residual.append(args[0])),
        ]
        try:
            run()
        finally:
            for h in hooks:
                h.remove()
        if len(fc2_in) != 1 or len(residual) != 1:
            raise RuntimeError("expected the attention-pool MLP to run once per forward")
        return self._reduce(fc2_in[0]), self._reduce(residual[0])


def _first(x: Tensor | tuple[Tensor, ...]) -> Tensor:
    return x[0] if isinstance(x, tuple) else x


def _is_identity(m: nn.Module | None) -> bool:
    if m is None or isinstance(m, nn.Identity):
        return True
    if isinstance(m, nn.Sequential):
        return all(_is_identity(c) for c in m)
    return isinstance(m, nn.Dropout)  # identity in eval mode, where the adapter runs


def _image_head(model: nn.Module) -> _Head:
    visual = model.visual
    if isinstance(visual, open_clip.transformer.VisionTransformer):
        if visual.proj is None:
            raise ValueError("the vision tower has no projection (visual.proj is None)")
        return _VisionTransformerHead(visual)
    if isinstance(visual, open_clip.timm_model.TimmModel):
        head = visual.head
        if isinstance(getattr(head, "proj", None), nn.Linear):
            return _LinearHead(head.proj)
        if isinstance(getattr(head, "mlp", None), nn.Module):
            return _LinearHead(head.mlp.fc2)
        trunk = visual.trunk
        pool = getattr(trunk, "attn_pool", None)
        if pool is not None and getattr(pool, "mlp", None) is not None:
            for attr in ("fc_norm", "head_drop", "head"):
                if not _is_identity(getattr(trunk, attr, None)):
                    raise ValueError(f"timm trunk has a non-identity {attr!r} after its attention pool")
            if not _is_identity(head):
                raise ValueError("open_clip timm head is not an identity after the attention pool")
            return _AttentionPoolHead(pool)
    raise ValueError(f"unsupported vision tower {type(visual).__name__}: no projection layer found")


def _text_head(model: nn.Module) -> _Head:
    owner = model.text if hasattr(model, "text") else model  # CustomTextCLIP keeps the tower in `.text`
    proj = getattr(owner, "text_projection", None)
    if isinstance(proj, nn.Linear):
        return _LinearHead(proj)
    if isinstance(proj, nn.Parameter):
        return _ParameterHead(owner, "text_projection")
    hf_proj = getattr(owner, "proj", None)  # open_clip HFTextEncoder
    if isinstance(hf_proj, nn.Linear):
        return _LinearHead(hf_proj)
    if isinstance(hf_proj, nn.Sequential) and isinstance(hf_proj[-1], nn.Linear):
        return _LinearHead(hf_proj[-1])
    raise ValueError(f"unsupported text tower {type(owner).__name__}: no projection layer found")


class ClipAdapter:
    """A frozen open_clip model seen as two last layers plus scale and bias (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        name: str,
        preprocess: Callable[[Any], Tensor] | None = None,
        tokenizer: Callable[..., Tensor] | None = None,
        pretrained: str | None = None,
        weights_path: str | Path | None = None,
    ) -> None:
        self.model = model.eval()
        self.name = name
        self.pretrained = pretrained
        self.weights_path = Path(weights_path) if weights_path is not None else None
        self._preprocess = preprocess
        self._tokenizer = tokenizer
        self._image = _image_head(model)
        self._text = _text_head(model)
        self._sha256: str | None = None

    # -- model-level constants -------------------------------------------------------------------------
    @property
    def preprocess(self) -> Callable[[Any], Tensor]:
        """PIL.Image -> Tensor[3, H, W], the model's evaluation transform."""
        if self._preprocess is None:
            raise ValueError(f"model {self.name!r} was built without a preprocessing transform")
        return self._preprocess

    @property
    def likelihood(self) -> str:
        """ "siglip" when the model has a logit bias (sigmoid loss), else "infonce"."""
        if getattr(self.model, "logit_bias", None) is not None or "siglip" in self.name.lower():
            return "siglip"
        return "infonce"

    @property
    def scale(self) -> float:
        """s = exp(logit_scale)."""
        return float(self.model.logit_scale.detach().exp().reshape(-1)[0])

    @property
    def bias(self) -> float:
        """b = logit_bias, 0.0 when the model has none."""
        b = getattr(self.model, "logit_bias", None)
        return 0.0 if b is None else float(b.detach().reshape(-1)[0])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def embed_dim(self) -> int:
        return int(self._image.weight().shape[0])

    # -- tokenizer -------------------------------------------------------------------------------------
    def tokenize(self, texts: str | Sequence[str]) -> Tensor:
        """Token ids [N, context_length] (LongTensor) for the text tower."""
        if self._tokenizer is None:
            self._tokenizer = open_clip.get_tokenizer(self.name)  # may download for hub/SigLIP tokenizers
        return self._tokenizer([texts] if isinstance(texts, str) else list(texts))

    # -- features --------------------------------------------------------------------------------------
    def _finish(self, head: _Head, acts: Tensor, offset: Tensor | None) -> TowerFeatures:
        if head.has_bias:
            acts = torch.cat([acts, acts.new_ones(acts.shape[0], 1)], dim=1)  # [N, d + 1]
        return TowerFeatures(acts=acts, offset=offset)

    @torch.no_grad()
    def image_features(self, pixels: Tensor) -> TowerFeatures:
        """Pre-projection activations of images [N, 3, H, W]: acts [N, d'] (+ offset [N, D])."""
        pixels = pixels.to(device=self.device, dtype=self.dtype)
        if isinstance(self._image, _VisionTransformerHead):
            return self._finish(self._image, self._image.pooled(pixels), None)
        acts, offset = self._image.features(lambda: self.model.encode_image(pixels))
        return self._finish(self._image, acts, offset)

    @torch.no_grad()
    def text_features(self, tokens: Tensor) -> TowerFeatures:
        """Pre-projection activations of token ids [N, L]: acts [N, d'] (+ offset, None for text towers)."""
        tokens = tokens.to(self.device)
        acts, offset = self._text.features(lambda: self.model.encode_text(tokens))
        return self._finish(self._text, acts, offset)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> TowerFeatures:
        """Tokenize and run the text tower in batches."""
        if isinstance(texts, str):
            raise ValueError("encode_texts takes a list of strings, got one string")
        if len(texts) == 0:
            raise ValueError("encode_texts needs at least one text")
        parts = [
            self.text_features(self.tokenize(texts[i : i + batch_size]))
            for i in range(0, len(texts), batch_size)
        ]
        offsets = [p.offset for p in parts]
        return TowerFeatures(
            acts=torch.cat([p.acts for p in parts]),
            offset=None if offsets[0] is None else torch.cat(offsets),  # type: ignore[arg-type]
        )

    def image_weight(self) -> Tensor:
        """P: [D, d'] (bias column last when the projection has a bias)."""
        return self._image.weight()

    def text_weight(self) -> Tensor:
        """Q: [D, d'] (bias column last when the projection has a bias)."""
        return self._text.weight()

    # -- provenance ------------------------------------------------------------------------------------
    def weights_sha256(self) -> str | None:
        """sha256 of the weights file, None for randomly initialised models."""
        if self._sha256 is None and self.weights_path is not None:
            digest = hashlib.sha256()
            with open(self.weights_path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
            self._sha256 = digest.hexdigest()
        return self._sha256

    def identity(self) -> dict[str, str | int | float | None]:
        """What a posterior artifact records to refuse being applied to another model."""
        return {
            "name": self.name,
            "pretrained": self.pretrained,
            "weights_sha256": self.weights_sha256(),
            "embed_dim": self.embed_dim,
            "image_width": int(self.image_weight().shape[1]),
            "text_width": int(self.text_weight().shape[1]),
            "image_bias": int(self._image.has_bias),
            "text_bias": int(self._text.has_bias),
            "likelihood": self.likelihood,
        }

    def __repr__(self) -> str:
        return (
            f"ClipAdapter(name={self.name!r}, likelihood={self.likelihood!r}, embed_dim={self.embed_dim}, "
            f"image_weight={list(self.image_weight().shape)}, text_weight={list(self.text_weight().shape)})"
        )


# -- loading ---------------------------------------------------------------------------------------------
def _looks_like_path(value: str) -> bool:
    return value.endswith(WEIGHT_SUFFIXES) or os.sep in value or value.startswith(".")


def _word_tokenizer(directory: Path) -> WordTokenizer | None:
    return WordTokenizer.load(directory) if (directory / VOCAB_FILE).is_file() else None


def _find_weights(directory: Path) -> Path:
    preferred = directory / registry.WEIGHTS_FILE
    if preferred.is_file():
        return preferred
    found = sorted(p for suffix in WEIGHT_SUFFIXES for p in directory.glob(f"*{suffix}"))
    if not found:
        raise FileNotFoundError(
            f"no weights file ({', '.join(WEIGHT_SUFFIXES)}) in model directory {str(directory)!r}"
        )
    return found[0]


def _load_local_dir(directory: Path, name: str, device: str) -> ClipAdapter:
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory {str(directory)!r} does not exist")
    if not (directory / registry.CONFIG_FILE).is_file():
        raise FileNotFoundError(f"model directory {str(directory)!r} has no {registry.CONFIG_FILE}")
    weights = _find_weights(directory)
    model, _, preprocess = open_clip.create_model_and_transforms(f"{LOCAL_DIR}{directory}", device=device)
    tokenizer = _word_tokenizer(directory)
    return ClipAdapter(model, name, preprocess, tokenizer, pretrained=str(weights), weights_path=weights)


def load_model(name: str, pretrained: str | None = None, device: str = "cpu") -> ClipAdapter:
    """Build an open_clip model and wrap it in a `ClipAdapter`.

    name:
      - "bayescurate-tiny" (`TINY_MODEL`): the checkpoint shipped in `pipeline/models/assets/`;
      - "local-dir:/dir": open_clip's local layout (`open_clip_config.json` + weights, optional `vocab.json`);
      - a weights file (`.safetensors`, `.pt`, ...) with `open_clip_config.json` next to it;
      - an open_clip architecture name ("ViT-B-32", a config shipped here): `pretrained` is a local weights
        file, an open_clip pretrained tag (downloads), or None for random weights (tests);
      - "hf-hub:org/repo": passed to open_clip (downloads).
    """
    registry.register_configs()
    if name == TINY_MODEL and pretrained is None:
        if not (registry.TINY_DIR / registry.WEIGHTS_FILE).is_file():
            raise FileNotFoundError(
                f"the tiny checkpoint is missing from {registry.TINY_DIR}; run `bayescurate pretrain-tiny`"
            )
        return _load_local_dir(registry.TINY_DIR, TINY_MODEL, device)
    if name.startswith(LOCAL_DIR):
        return _load_local_dir(Path(name[len(LOCAL_DIR) :]).expanduser(), name, device)
    if name.startswith(HF_HUB):
        model, _, preprocess = open_clip.create_model_and_transforms(name, device=device)
        return ClipAdapter(model, name, preprocess, None, pretrained=name)
    if name.endswith(WEIGHT_SUFFIXES):
        path = Path(name).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"weights file {name!r} does not exist")
        if not (path.parent / registry.CONFIG_FILE).is_file():
            raise FileNotFoundError(
                f"weights file {name!r} has no {registry.CONFIG_FILE} next to it; pass the architecture name "
                f"with pretrained={name!r} instead"
            )
        model, _, preprocess = open_clip.create_model_and_transforms(
            f"{LOCAL_DIR}{path.parent}", load_weights=False, device=device
        )
        open_clip.load_checkpoint(model, str(path), device=device)
        tokenizer = _word_tokenizer(path.parent)
        return ClipAdapter(model, str(path), preprocess, tokenizer, pretrained=str(path), weights_path=path)

    if name not in open_clip.list_models():
        raise ValueError(
            f"unknown model {name!r}: not {TINY_MODEL!r}, a local-dir:/hf-hub: name, a weights file, or an "
            f"open_clip architecture (e.g. {', '.join(open_clip.list_models()[:5])}, ...)"
        )
    weights_path: Path | None = None
    if pretrained is not None and _looks_like_path(pretrained):
        weights_path = Path(pretrained).expanduser()
        if not weights_path.is_file():
            raise FileNotFoundError(f"weights file {pretrained!r} does not exist")
        pretrained = str(weights_path)
    elif pretrained is None:
        log.warning("model %s built with random weights (no pretrained weights given)", name)
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
    tokenizer: Callable[..., Tensor] | None = None
    if weights_path is not None:
        tokenizer = _word_tokenizer(weights_path.parent)
    if tokenizer is None and name == TINY_MODEL:
        tokenizer = WordTokenizer.load(registry.TINY_DIR)
    return ClipAdapter(model, name, preprocess, tokenizer, pretrained=pretrained, weights_path=weights_path)
