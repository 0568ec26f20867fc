"""pipeline.bayes is pure tensor math: importing it must not pull in I/O, services or Ray."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

FORBIDDEN = (
    "ray",
    "mlflow",
    "label_studio_sdk",
    "requests",
    "connectors",
    "jobs",
    "pyarrow",
    "safetensors",
    "pipeline.io",
    "pipeline.artifacts",
)
# Modules through which code touches files; torch itself imports some of them, so this is checked in the
# source of pipeline/bayes rather than in sys.modules.
FILE_MODULES = {"os", "pathlib", "tempfile", "shutil", "io", "safetensors", "pyarrow", "pickle", "json"}
FILE_CALLS = {"open", "save", "load", "write_text", "write_bytes", "read_text", "read_bytes"}
BAYES = Path(__file__).resolve().parents[2] / "pipeline" / "bayes"


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


def test_the_core_source_imports_and_calls_nothing_that_touches_files() -> None:
    """The math returns tensors and headers; `pipeline.artifacts` writes them (through `pipeline.io`)."""
    problems = []
    for path in sorted(BAYES.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Call):
                fn = node.func
                called = (
                    fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else ""
                )
                if called in FILE_CALLS:
                    problems.append(f"{path.name}:{node.lineno} calls {called}()")
                continue
            else:
                continue
            problems += [
                f"{path.name}:{node.lineno} imports {n}" for n in names if n.split(".")[0] in FILE_MODULES
            ]
    assert problems == []
