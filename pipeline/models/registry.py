"""Where models come from: the open_clip configs shipped here and the tiny pretrained checkpoint.

`configs/*.json` are open_clip architecture configs (keys `embed_dim`, `vision_cfg`, `text_cfg`), registered
with `open_clip.add_model_config` so `open_clip.create_model(name)` builds them offline. None is named with
"siglip": open_clip would switch to a Hugging Face tokenizer that downloads.

The tiny model ("bayescurate-tiny"): a small timm ResNet vision tower (`test_resnet`, average pooling,
linear projection 96 -> 64) and a 2-layer text transformer (width 128, context 12) over a 33-word vocabulary;
about 0.8M parameters, 3 MB. Trained by `bayescurate pretrain-tiny` (pipeline/models/pretrain.py).

`assets/bayescurate-tiny/` is the shipped checkpoint in open_clip's `local-dir:` layout
(`open_clip_config.json` with `model_cfg` + `preprocess_cfg`, `open_clip_model.safetensors`), plus the
word-level tokenizer vocabulary (`vocab.json`) and a model card (`model_card.json`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import open_clip
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

TINY_MODEL = "bayescurate-tiny"
CONFIG_DIR = Path(__file__).parent / "configs"
ASSETS_DIR = Path(__file__).parent / "assets"
TINY_DIR = ASSETS_DIR / TINY_MODEL

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
CARD_FILE = "model_card.json"

# Preprocessing of the tiny model: open_clip's defaults (OpenAI mean/std), so that building the architecture
# by name with a weights file preprocesses like the local-dir layout. Images are 64 x 64 already, so the
# resize is the identity.
TINY_PREPROCESS: dict[str, Any] = {
    "size": 64,
    "mean": list(OPENAI_DATASET_MEAN),
    "std": list(OPENAI_DATASET_STD),
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}

_registered = False


def register_configs() -> None:
    """Make the configs in `configs/` known to open_clip (idempotent)."""
    global _registered
    if not _registered:
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


def model_config(name: str) -> dict[str, Any]:
    """The architecture config of a shipped config name, e.g. "bayescurate-tiny"."""
    path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        raise ValueError(f"no shipped config named {name!r}; shipped configs: {known}")
    return json.loads(path.read_text())


def write_local_dir(directory: Path, model_cfg: dict[str, Any], preprocess_cfg: dict[str, Any]) -> Path:
    """Write `open_clip_config.json` for open_clip's `local-dir:` loader."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CONFIG_FILE
    path.write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2) + "\n")
    return path
