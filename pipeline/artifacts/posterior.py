"""The posterior directory: KFAC factors per tower, an optional re-fitted image projection, `posterior.json`.

    posterior.json                 everything else (below), written last
    image.safetensors              image-tower factors A, B, n
    text.safetensors               text-tower factors
    image_projection.safetensors   the re-fitted image projection P* [D, d] of an annotation round (MATH §9);
                                   absent for a posterior fitted on pretraining pairs (P = the model's own)

`posterior.json` holds the fitted prior precision λ per tower, the tempering τ, the damping, the likelihood,
logit scale and bias, the model's identity (`ClipAdapter.identity()`), the data provenance, the lineage
(parent posterior, round, label count and a digest of the labels), the SHA-256 of every file (verified on
load), the code version, the creation time and the `posterior_id`: a hash of the numbers and files that
define the posterior, projection included, which embedding files record, so that embeddings made under
another projection are recognised as stale. Paths may be local or `pyarrow.fs` URIs.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pipeline.artifacts.factors import load_factors, save_factors
from pipeline.bayes.head import TOWERS, BayesHead
from pipeline.bayes.kron import KronPosterior
from pipeline.io import storage, tensors

FORMAT = "bayescurate.posterior/2"
READABLE_FORMATS = ("bayescurate.posterior/1", FORMAT)
INFO_FILE = "posterior.json"
PROJECTION_FILE = "image_projection.safetensors"
PROJECTION_FORMAT = "bayescurate.projection/1"


def code_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bayescurate")
    except PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class Lineage:
    """Where a posterior comes from: the posterior it updates and the labels it learned from."""

    parent: str | None = None  # posterior_id of the posterior this one updates (None: fitted on pairs)
    round: int | None = None  # annotation round that produced it
    labels: int = 0  # labels it learned from (all rounds so far)
    labels_digest: str | None = None  # SHA-256 of the labels table it learned from

    def to_json(self) -> dict[str, Any]:
        return {
            "parent": self.parent,
            "round": self.round,
            "labels": self.labels,
            "labels_digest": self.labels_digest,
        }


def posterior_id(info: dict[str, Any]) -> str:
    """Hash of what defines the posterior numerically: λ, τ, damping, likelihood, the files' digests."""
    core = {
        k: info[k] for k in ("prior_precision", "hessian_scale", "damping", "likelihood", "factors_sha256")
    }
    projection = info.get("image_projection")
    if projection:  # only round posteriors have one; fitted posteriors keep the ids they always had
        core["image_projection_sha256"] = projection["sha256"]
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:16]


def write_posterior(
    out: storage.PathLike,
    image: KronPosterior,
    text: KronPosterior,
    *,
    likelihood: str,
    scale: float,
    bias: float,
    model: dict[str, Any],
    provenance: dict[str, Any],
    image_projection: Tensor | None = None,
    lineage: Lineage | None = None,
) -> dict[str, Any]:
    """Write the posterior directory (files first, `posterior.json` last, each atomically).

    `image_projection`: the re-fitted projection P* [D, d] to use in place of the model's (normally
    `image.weight` of a round's posterior). Returns the info written to `posterior.json`.
    """
    out = str(out).rstrip("/")
    if image.hessian_scale != text.hessian_scale or image.damping != text.damping:
        raise ValueError("image and text posteriors must share the tempering τ and the damping")
    hashes = {
        tower: save_factors(storage.join(out, f"{tower}.safetensors"), post.factors)
        for tower, post in (("image", image), ("text", text))
    }
    projection = None
    if image_projection is not None:
        expected = (image.factors.D, image.factors.d)
        if tuple(image_projection.shape) != expected:
            raise ValueError(
                f"image projection has shape {list(image_projection.shape)} but the image factors are for "
                f"{list(expected)}"
            )
        header = {
            "format": PROJECTION_FORMAT,
            "tower": "image",
            "D": expected[0],
            "d": expected[1],
            "dtype": str(image_projection.dtype).removeprefix("torch."),
            "parent": lineage.parent if lineage else None,
        }
        digest = tensors.save(storage.join(out, PROJECTION_FILE), {"weight": image_projection}, header)
        projection = {"file": PROJECTION_FILE, "sha256": digest}
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
        "image_projection": projection,
        "lineage": (lineage or Lineage()).to_json(),
        "model": model,
        "data": provenance,
        "code_version": code_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    info["posterior_id"] = posterior_id(info)
    storage.write_json(storage.join(out, INFO_FILE), info)
    return info


def read_info(directory: storage.PathLike) -> dict[str, Any]:
    """`posterior.json` of a posterior directory (any readable format version)."""
    path = storage.join(directory, INFO_FILE)
    if not storage.is_file(path):
        raise FileNotFoundError(f"{str(directory)!r} is not a posterior directory (no {INFO_FILE})")
    info = storage.read_json(path)
    if info.get("format") not in READABLE_FORMATS:
        raise ValueError(f"{path!r} has format {info.get('format')!r}, expected one of {READABLE_FORMATS}")
    info.setdefault("image_projection", None)
    info.setdefault("lineage", Lineage().to_json())
    return info


def projection_sha256(info: dict[str, Any]) -> str | None:
    """Digest of the posterior's own image projection, or None when it uses the model's."""
    projection = info.get("image_projection")
    return projection["sha256"] if projection else None


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


def load_projection(directory: storage.PathLike, info: dict[str, Any]) -> Tensor | None:
    """The re-fitted image projection [D, d] of the directory, verified against its SHA-256, or None."""
    projection = info.get("image_projection")
    if not projection:
        return None
    path = storage.join(directory, projection["file"])
    found, header = tensors.load(path, sha256=projection["sha256"])
    if header.get("format") != PROJECTION_FORMAT or set(found) != {"weight"}:
        raise ValueError(f"{path!r} is not an image projection file")
    return found["weight"]


def load_head(
    directory: storage.PathLike,
    *,
    image_weight: Tensor,
    text_weight: Tensor,
    identity: dict[str, Any] | None = None,
    hessian_scale: float | None = None,
    damping: str | None = None,
) -> BayesHead:
    """The `BayesHead` of a posterior directory, given the model's projections (no model needed).

    Every file is checked against the SHA-256 recorded in `posterior.json`. The image projection is the
    directory's own when it has one (an annotation round's re-fit), else `image_weight`. `identity`, when
    given, must be the model the posterior was fitted for. `hessian_scale` / `damping` override the stored
    τ / damping (for sweeps); λ stays as fitted.
    """
    info = read_info(directory)
    if identity is not None:
        check_identity(info["model"], identity)
    weights = {"image": image_weight, "text": text_weight}
    projection = load_projection(directory, info)
    if projection is not None:
        if projection.shape != image_weight.shape:
            raise ValueError(
                f"the posterior's image projection has shape {list(projection.shape)} but the model's has "
                f"{list(image_weight.shape)}"
            )
        weights["image"] = projection
    posts = {}
    for tower in TOWERS:
        factors = load_factors(
            storage.join(directory, f"{tower}.safetensors"), sha256=info["factors_sha256"][tower]
        )
        posts[tower] = KronPosterior(
            factors,
            weights[tower].detach().to(factors.A.dtype).cpu(),
            info["prior_precision"][tower],
            info["hessian_scale"] if hessian_scale is None else hessian_scale,
            info["damping"] if damping is None else damping,
        )
    return BayesHead(posts["image"], posts["text"], info["scale"], info["bias"], info["likelihood"])


def load_posterior(
    directory: storage.PathLike,
    adapter: Any,
    *,
    hessian_scale: float | None = None,
    damping: str | None = None,
) -> BayesHead:
    """The `BayesHead` of a posterior directory for `adapter` (a `ClipAdapter` of the same model).

    As `load_head`, with the model's projections and identity taken from the adapter.
    """
    return load_head(
        directory,
        image_weight=adapter.image_weight(),
        text_weight=adapter.text_weight(),
        identity=adapter.identity(),
        hessian_scale=hessian_scale,
        damping=damping,
    )


def image_weight(directory: storage.PathLike, adapter: Any) -> Tensor:
    """The image projection a posterior directory uses: its own re-fit, or the model's."""
    info = read_info(directory)
    projection = load_projection(directory, info)
    weight = adapter.image_weight() if projection is None else projection
    return weight.detach().to(torch.float64).cpu()
