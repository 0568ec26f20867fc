"""pipeline.bayes is pure tensor math: importing it must not pull in I/O, services or Ray."""

from __future__ import annotations

import subprocess
import sys

FORBIDDEN = ("ray", "mlflow", "label_studio_sdk", "requests", "connectors", "jobs", "pyarrow")


def test_importing_the_core_loads_no_io_or_ray() -> None:
    code = f"import sys, pipeline.bayes; print(sorted(m for m in {FORBIDDEN!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_public_api_is_complete() -> None:
    import pipeline.bayes as bayes

    for name in bayes.__all__:
        assert getattr(bayes, name) is not None, name
    for name in (
        "infonce_ggn",
        "siglip_ggn",
        "KronFactors",
        "KronPosterior",
        "prob_cosine",
        "ProbLogits",
        "BayesHead",
        "entropy",
        "bald",
        "epig",
        "select_batch",
        "ece",
        "auroc",
    ):
        assert name in bayes.__all__, name
