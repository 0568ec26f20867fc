"""Decode stage: encoded image bytes -> preprocessed pixels [N, 3, H, W] plus a verdict per row.

Rows that fail are not dropped: they travel on with `ok = False` and their quarantine reason, so the driver
sees every input row exactly once and knows when a shard is complete. Their pixels are zeros.

When the transform is a standard [resize/crop..., ToTensor, Normalize] (`split_preprocess`), the pixels
travel as uint8 [N, H, W, 3] and the model stage finishes them (`model_pixels`): a quarter of the bytes
through the object store and a batched float conversion, with bit-identical model inputs.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import ClassVar

from pipeline.data.decode import Limits, decode_batch, split_preprocess
from pipeline.stages.base import Batch, Resources, Stage, object_array

PIXELS, OK, REASON, ERROR = "pixels", "ok", "reason", "error"


class DecodeStage(Stage):
    """CPU stage: PIL decode + the model's preprocess transform (a picklable torchvision Compose)."""

    name: ClassVar[str] = "decode"
    input_columns: ClassVar[tuple[str, ...]] = ("image",)
    output_columns: ClassVar[tuple[str, ...]] = (PIXELS, OK, REASON, ERROR)

    def __init__(
        self,
        preprocess: Callable[[object], object],
        pixel_shape: tuple[int, int, int],
        *,
        require_caption: bool = False,
        limits: Limits = Limits(),
        num_cpus: float = 1.0,
        batch_size: int = 256,
        compact: bool = True,
    ) -> None:
        self.split = split_preprocess(preprocess) if compact else None  # uint8 pixels when not None
        # Only the split's torch-free PIL steps travel to the workers when there is one (see
        # `pipeline.data.decode`): shipping the torchvision transform would import torch there.
        self.preprocess = preprocess if self.split is None else None
        self.pixel_shape = tuple(pixel_shape)
        self.require_caption = require_caption
        self.limits = limits
        self.resources = Resources(num_cpus=num_cpus, batch_size=batch_size)

    def setup(self) -> None:
        if "torch" in sys.modules:  # a transform that is not torch-free
            import torch

            # Each decode task is one process on one core: torch's own threads would only fight each other.
            torch.set_num_threads(1)

    def process(self, batch: Batch) -> Batch:
        captions = batch.get("caption") if self.require_caption else None
        if self.require_caption and captions is None:
            raise ValueError("image-text pairs need a caption column; the input has none")
        decoded = decode_batch(
            list(batch["image"]),
            self.preprocess,
            self.pixel_shape,  # type: ignore[arg-type]
            captions=None if captions is None else list(captions),
            read_errors=list(batch["read_error"]) if "read_error" in batch else None,
            limits=self.limits,
            split=self.split,
        )
        out = {k: v for k, v in batch.items() if k not in ("image", "read_error")}
        out[PIXELS] = decoded.pixels
        out[OK] = decoded.ok
        out[REASON] = object_array(decoded.reason)
        out[ERROR] = object_array(decoded.error)
        return out
