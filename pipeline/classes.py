"""Class lists and prompt templates for zero-shot tasks, and their text-tower activations."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pipeline.io import storage

DEFAULT_PROMPT = "a photo of a {}"


@dataclass(frozen=True)
class ClassSpec:
    names: list[str]  # class names, in label-index order
    prompts: list[str]  # templates with exactly one "{}"
    label_column: str | None = None  # column of a corpus holding the true class, when known


def read_classes(path: str) -> ClassSpec:
    """JSON `{"classes": [...], "prompts": [...], "label_column": ...}`, or plain text with a class a line."""
    text = storage.read_text(path)
    if path.endswith(".json"):
        spec = json.loads(text)
        names = list(spec.get("classes", []))
        prompts = list(spec.get("prompts") or [DEFAULT_PROMPT])
        label_column = spec.get("label_column")
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
        prompts, label_column = [DEFAULT_PROMPT], None
    if len(names) < 2:
        raise ValueError(f"classes file {path!r} must name at least 2 classes, got {names}")
    if len(set(names)) != len(names):
        raise ValueError(f"classes file {path!r} repeats a class: {names}")
    bad = [p for p in prompts if p.count("{}") != 1]
    if bad:
        raise ValueError(f"prompt templates must contain exactly one '{{}}': {bad}")
    return ClassSpec(names, prompts, label_column)


def class_text_features(adapter: Any, spec: ClassSpec) -> tuple[Tensor, Tensor | None]:
    """Text activations [C, d'] (and offsets [C, D] or None) of each class, averaged over its prompts.

    Averaging activations (not embeddings) keeps the class embedding `Q ā` linear in the projection, so
    its posterior variance stays exact.
    """
    texts = [p.format(n) for n in spec.names for p in spec.prompts]
    with torch.inference_mode():
        feats = adapter.encode_texts(texts)
    shape = (len(spec.names), len(spec.prompts), -1)
    acts = feats.acts.double().reshape(shape).mean(1)  # [C, d']
    offset = None if feats.offset is None else feats.offset.double().reshape(shape).mean(1)  # [C, D]
    return acts, offset
