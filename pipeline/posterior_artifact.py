"""The posterior directory: `image.safetensors`, `text.safetensors` (KFAC factors) and `posterior.json`.

`posterior.json` holds everything else needed to rebuild the `BayesHead` and to audit it: the fitted prior
precision λ per tower, the tempering τ, the damping, the likelihood, logit scale and bias, the model's
identity (`ClipAdapter.identity()`), the data provenance (inputs, counts, quarantined rows), the code
version, the creation time and a `posterior_id` (hash of the factors and the fitted numbers) that the
embedding files record as their posterior version.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from connectors import storage
from pipeline.bayes.head import BayesHead
from pipeline.bayes.kron import KronFactors, KronPosterior

FORMAT = "bayescurate.posterior/1"
INFO_FILE = "posterior.json"
TOWERS = ("image", "text")


def code_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bayescurate")
    except PackageNotFoundError:
        return "unknown"


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_posterior(
    out: str | Path,
    image: KronPosterior,
    text: KronPosterior,
    *,
    likelihood: str,
    scale: float,
    bias: float,
    model: dict[str, Any],
    provenance: dict[str, Any],
) -> dict[str, Any]:
    """Write the posterior directory (factors first, `posterior.json` last, each atomically)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if image.hessian_scale != text.hessian_scale or image.damping != text.damping:
        raise ValueError("image and text posteriors must share the tempering τ and the damping")
    hashes = {}
    for tower, post in (("image", image), ("text", text)):
        path = post.factors.save(out / f"{tower}.safetensors")
        hashes[tower] = _file_sha256(path)
    info: dict[str, Any] = {
        "format": FORMAT,
        "prior_precision": {"image": image.prior_precision, "text": text.prior_precision},
        "hessian_scale": image.hessian_scale,
        "damping": image.damping.value,
        "likelihood": str(getattr(likelihood, "value", likelihood)),
        "scale": float(scale),
        "bias": float(bias),
        "n": {"image": image.factors.n, "text": text.factors.n},
        "factors_sha256": hashes,
        "model": model,
        "data": provenance,
        "code_version": code_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    core = {
        k: info[k] for k in ("prior_precision", "hessian_scale", "damping", "likelihood", "factors_sha256")
    }
    info["posterior_id"] = hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:16]
    storage.write_json(out / INFO_FILE, info)
    return info


def read_info(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / INFO_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{str(directory)!r} is not a posterior directory (no {INFO_FILE})")
    info = storage.read_json(path)
    if info.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} has format {info.get('format')!r}, expected {FORMAT!r}")
    return info


def check_identity(stored: dict[str, Any], actual: dict[str, Any]) -> None:
    """Raise ValueError when the model in use is not the one the posterior was fitted for.

    Weight hashes decide when both sides have them (paths to the same weights may differ between
    machines); otherwise every shared key must agree.
    """
    hash_keys = sorted(k for k in stored.keys() & actual.keys() if "sha" in k.lower())
    keys = hash_keys + [k for k in ("name", "embed_dim") if k in stored and k in actual]
    if not hash_keys:
        keys = sorted(stored.keys() & actual.keys())
    for key in keys:
        if stored[key] != actual[key]:
            raise ValueError(
                f"the posterior was fitted for model {key}={stored[key]!r}, but the model in use has "
                f"{key}={actual[key]!r}: refit the posterior for this model"
            )


def load_posterior(
    directory: str | Path,
    adapter: Any,
    *,
    hessian_scale: float | None = None,
    damping: str | None = None,
) -> BayesHead:
    """The `BayesHead` of a posterior directory for `adapter` (a `ClipAdapter` of the same model).

    `hessian_scale` / `damping` override the stored τ / damping (for sweeps); λ stays as fitted.
    """
    directory = Path(directory)
    info = read_info(directory)
    check_identity(info["model"], adapter.identity())
    posts = {}
    for tower, weight in (("image", adapter.image_weight()), ("text", adapter.text_weight())):
        factors = KronFactors.load(directory / f"{tower}.safetensors")
        posts[tower] = KronPosterior(
            factors,
            weight.detach().to(factors.A.dtype).cpu(),
            info["prior_precision"][tower],
            info["hessian_scale"] if hessian_scale is None else hessian_scale,
            info["damping"] if damping is None else damping,
        )
    return BayesHead(posts["image"], posts["text"], info["scale"], info["bias"], info["likelihood"])
