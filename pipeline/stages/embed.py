"""Model stages (stateful, one model per actor): Bayesian image embeddings, and pair features for fitting.

`EmbedStage`: pixels -> embedding mean [N, D] and diagonal variance [N, D] through the image posterior
(MATH §3: `Var(g) = (aᵀA'⁻¹a)·diag(B'⁻¹)` for the paper damping), or the mean alone when `variance=False`
(the deterministic baseline the benchmark compares against).
`PairFeaturesStage`: image–text pairs -> both towers' pre-projection activations and MAP embeddings, the
inputs of the KFAC accumulation (`pipeline.stages.factors`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from pipeline.data.decode import SplitPreprocess, split_preprocess
from pipeline.stages.base import TIMING_PREFIX, Batch, Resources, Stage
from pipeline.stages.decode import ERROR, OK, PIXELS, REASON

MEAN, VAR, ACTS = "mean", "var", "acts"
# Seconds spent per row (the batch's time split evenly over its rows), dropped by the runners after
# summing them (see `pipeline.stages.base.TIMING_PREFIX`): model forward, the head (projection, or
# posterior mean + variance), and the actor's setup (imports, model and posterior load; on its first batch).
T_FORWARD, T_HEAD = TIMING_PREFIX + "embed_forward", TIMING_PREFIX + "embed_head"
T_SETUP = TIMING_PREFIX + "embed_setup"
IMAGE_ACTS, IMAGE_EMB, IMAGE_OFFSET = "image_acts", "image_emb", "image_offset"
TEXT_ACTS, TEXT_EMB, TEXT_OFFSET = "text_acts", "text_emb", "text_offset"


@dataclass(frozen=True)
class ModelSpec:
    """Which model a stage loads (once per actor)."""

    name: str  # "bayescurate-tiny", an open_clip config name, or a local checkpoint
    pretrained: str | None = None  # path or tag
    device: str = "cpu"  # "cuda" on GPU actors

    def load(self) -> Any:
        """The `ClipAdapter`; `factory:package.module:function` calls `function(pretrained, device)` instead
        (custom models, and the stand-in models of tests)."""
        if self.name.startswith("factory:"):
            import importlib

            module, _, attr = self.name.removeprefix("factory:").partition(":")
            return getattr(importlib.import_module(module), attr)(self.pretrained, self.device)
        from pipeline.models.adapter import load_model

        return load_model(self.name, self.pretrained, device=self.device)


def _threads(num_cpus: float) -> int:
    return max(1, round(num_cpus))


class _ModelStage(Stage):
    resources: Resources

    def __init__(
        self, model: ModelSpec, *, num_cpus: float, num_gpus: float, batch_size: int, threads: int = 0
    ) -> None:
        self.model = model
        self.threads = threads  # torch intra-op threads; 0: the stage's CPU reservation
        self.resources = Resources(num_cpus=num_cpus, num_gpus=num_gpus, stateful=True, batch_size=batch_size)
        self.adapter: Any = None

    def setup(self) -> None:
        start = time.perf_counter()
        import torch

        torch.set_num_threads(self.threads or _threads(self.resources.num_cpus))
        self.adapter = self.model.load()
        self.setup_s: float | None = time.perf_counter() - start  # reported once, with the first batch
        try:
            preprocess = self.adapter.preprocess
        except (AttributeError, ValueError):  # a model without a transform: only float pixels can arrive
            preprocess = None
        self.split: SplitPreprocess | None = split_preprocess(preprocess) if preprocess is not None else None

    def model_pixels(self, pixels: np.ndarray) -> Any:
        """Decoded pixels -> the model input [N, 3, H, W] float (finishing uint8 pixels: DecodeStage)."""
        import torch

        if pixels.dtype == np.uint8:
            if self.split is None:
                raise ValueError(
                    f"uint8 pixels arrived but the preprocess of model {self.model.name!r} cannot be split"
                )
            return self.split.finish(pixels).to(self.model.device)
        return torch.from_numpy(np.ascontiguousarray(pixels)).to(self.model.device)

    def __getstate__(self) -> dict[str, Any]:
        # Ship the recipe, never a loaded model: each actor loads its own once.
        state = super().__getstate__()
        state["adapter"] = None
        state.pop("head", None)
        state.pop("setup_s", None)
        return state


def _zeros_like_rows(n: int, values: np.ndarray, ok: np.ndarray) -> np.ndarray:
    out = np.zeros((n, *values.shape[1:]), dtype=np.float32)
    out[ok] = values
    return out


class EmbedStage(_ModelStage):
    """Image embeddings with their posterior variance; quarantined rows pass through with zeros."""

    name: ClassVar[str] = "embed"
    input_columns: ClassVar[tuple[str, ...]] = (PIXELS, OK)
    output_columns: ClassVar[tuple[str, ...]] = (MEAN, VAR, ACTS)

    def __init__(
        self,
        model: ModelSpec,
        posterior_dir: str | None,
        *,
        variance: bool = True,
        activations: bool = False,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        batch_size: int = 256,
        threads: int = 0,
    ) -> None:
        super().__init__(model, num_cpus=num_cpus, num_gpus=num_gpus, batch_size=batch_size, threads=threads)
        if variance and posterior_dir is None:
            raise ValueError("variance=True needs a posterior directory")
        self.posterior_dir = posterior_dir
        self.variance = variance
        self.activations = activations
        self.head: Any = None

    def setup(self) -> None:
        super().setup()
        if self.posterior_dir is not None:
            from pipeline.artifacts.posterior import load_posterior

            start = time.perf_counter()
            self.head = load_posterior(self.posterior_dir, self.adapter)
            self.setup_s = (self.setup_s or 0.0) + time.perf_counter() - start

    def process(self, batch: Batch) -> Batch:
        import torch

        ok = np.asarray(batch[OK], dtype=bool)
        n = len(ok)
        out = {k: v for k, v in batch.items() if k not in (PIXELS,)}
        with torch.inference_mode():
            t0 = time.perf_counter()
            pixels = self.model_pixels(batch[PIXELS][ok])  # [n_ok, 3, H, W]
            feats = self.adapter.image_features(pixels)
            acts = feats.acts  # [n_ok, d]
            t1 = time.perf_counter()
            if self.variance:
                mean, var = self.head.image_embeddings(acts, feats.offset)  # [n_ok, D] each
            else:
                weight = self.adapter.image_weight().to(acts)  # [D, d]
                mean = acts @ weight.T
                if feats.offset is not None:
                    mean = mean + feats.offset
                var = None
            if self.model.device != "cpu":
                torch.cuda.synchronize()
            t2 = time.perf_counter()
            out[MEAN] = _zeros_like_rows(n, mean.float().cpu().numpy(), ok)
            if var is not None:
                out[VAR] = _zeros_like_rows(n, var.float().cpu().numpy(), ok)
            if self.activations:
                out[ACTS] = _zeros_like_rows(n, acts.float().cpu().numpy(), ok)
        out[T_FORWARD] = np.full(n, (t1 - t0) / max(n, 1))
        out[T_HEAD] = np.full(n, (t2 - t1) / max(n, 1))
        out[T_SETUP] = np.full(n, (getattr(self, "setup_s", None) or 0.0) / max(n, 1))
        self.setup_s = None
        return out


class PairFeaturesStage(_ModelStage):
    """Both towers on image–text pairs: activations (for A) and MAP embeddings (for the GGN, B)."""

    name: ClassVar[str] = "pair_features"
    input_columns: ClassVar[tuple[str, ...]] = (PIXELS, OK, "caption")
    output_columns: ClassVar[tuple[str, ...]] = (IMAGE_ACTS, IMAGE_EMB, TEXT_ACTS, TEXT_EMB)

    def process(self, batch: Batch) -> Batch:
        import torch

        ok = np.asarray(batch[OK], dtype=bool)
        n = len(ok)
        out = {k: v for k, v in batch.items() if k not in (PIXELS,)}
        captions = [str(c) for c in batch["caption"][ok]]
        with torch.inference_mode():
            pixels = self.model_pixels(batch[PIXELS][ok])  # [n_ok, 3, H, W]
            image = self.adapter.image_features(pixels)
            text = self.adapter.text_features(self.adapter.tokenize(captions).to(self.model.device))
            for feats, weight, acts_col, emb_col, off_col in (
                (image, self.adapter.image_weight(), IMAGE_ACTS, IMAGE_EMB, IMAGE_OFFSET),
                (text, self.adapter.text_weight(), TEXT_ACTS, TEXT_EMB, TEXT_OFFSET),
            ):
                emb = feats.acts @ weight.to(feats.acts).T  # [n_ok, D]
                if feats.offset is not None:
                    emb = emb + feats.offset
                    out[off_col] = _zeros_like_rows(n, feats.offset.float().cpu().numpy(), ok)
                out[acts_col] = _zeros_like_rows(n, feats.acts.float().cpu().numpy(), ok)
                out[emb_col] = _zeros_like_rows(n, emb.float().cpu().numpy(), ok)
        return out


__all__ = ["ERROR", "REASON", "EmbedStage", "ModelSpec", "PairFeaturesStage"]
