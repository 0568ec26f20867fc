"""A word-level tokenizer for small closed-vocabulary models (the shipped tiny CLIP).

Why not open_clip's BPE tokenizer: its 49,408-token embedding table alone would be several MB at the tiny
model's width, for a world whose captions use a few dozen words. The vocabulary ships with the model as
`vocab.json` (a list of words). Ids: 0 pad, 1 unknown, then the words, then start and end; the end token
has the highest id, so open_clip's default "argmax" text pooling finds it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch

PAD, UNK, START, END = "<pad>", "<unk>", "<start>", "<end>"
VOCAB_FILE = "vocab.json"


class WordTokenizer:
    """Lower-cases, splits on anything that is not a letter or digit, and maps words to ids."""

    def __init__(self, words: Sequence[str], context_length: int) -> None:
        if context_length < 3:
            raise ValueError(f"context_length must be at least 3, got {context_length}")
        specials = {PAD, UNK, START, END}
        clean = [w for w in dict.fromkeys(words) if w not in specials]
        self.tokens: list[str] = [PAD, UNK, *clean, START, END]
        self.index = {t: i for i, t in enumerate(self.tokens)}
        self.context_length = context_length

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """Token ids [N, context_length]: start, words (truncated), end, then padding."""
        if isinstance(texts, str):
            texts = [texts]
        length = context_length or self.context_length
        out = torch.zeros(len(texts), length, dtype=torch.long)  # [N, L]
        unk, start, end = self.index[UNK], self.index[START], self.index[END]
        for row, text in enumerate(texts):
            ids = [self.index.get(w, unk) for w in re.findall(r"[a-z0-9]+", text.lower())][: length - 2]
            ids = [start, *ids, end]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / VOCAB_FILE
        words = self.tokens[2:-2]
        path.write_text(json.dumps({"words": words, "context_length": self.context_length}, indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> WordTokenizer:
        path = Path(path)
        if path.is_dir():
            path = path / VOCAB_FILE
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer vocabulary {str(path)!r} does not exist")
        data = json.loads(path.read_text())
        return cls(data["words"], int(data["context_length"]))
