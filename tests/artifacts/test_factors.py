"""KFAC factor files: round trip, header checks, no temporary file left behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pipeline.artifacts.factors import load_factors, save_factors
from tests.bayes.test_kron import D, _factors, d


def test_save_load_round_trip_and_mismatch(tmp_path: Path) -> None:
    meta = {"model": "bayescurate-tiny", "tower": "image", "likelihood": "infonce"}
    f = _factors(meta=meta)
    path = tmp_path / "sub" / "image.kfac.safetensors"
    save_factors(path, f)
    assert [p.name for p in path.parent.iterdir()] == ["image.kfac.safetensors"]  # no temp file left
    g = load_factors(path, expect={"model": "bayescurate-tiny", "d": d, "D": D, "dtype": "float64"})
    assert torch.equal(g.A, f.A) and torch.equal(g.B, f.B) and g.n == f.n and g.meta == meta
    with pytest.raises(ValueError, match="has tower='image', expected tower='text'"):
        load_factors(path, expect={"tower": "text"})
    with pytest.raises(ValueError, match="has D=4, expected D=512"):
        load_factors(path, expect={"D": 512})
    with pytest.raises(FileNotFoundError):
        load_factors(tmp_path / "missing.safetensors")
    # a header that disagrees with the tensors
    header = json.loads(json.dumps(f.header()))
    header["D"] = 6
    bad = tmp_path / "bad.safetensors"
    save_file({"A": f.A, "B": f.B}, str(bad), metadata={"bayescurate": json.dumps(header)})
    with pytest.raises(ValueError, match="do not match the header"):
        load_factors(bad)
