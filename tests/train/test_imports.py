"""Importing pipeline.train must not import Ray (only pipeline.train.ray_train does) nor any service."""

from __future__ import annotations

import subprocess
import sys


def _loaded(module: str, names: tuple[str, ...]) -> str:
    code = f"import sys, {module}; print(sorted(m for m in {names!r} if m in sys.modules))"
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_train_package_imports_no_ray_or_services() -> None:
    assert _loaded("pipeline.train", ("ray", "mlflow", "label_studio_sdk", "connectors")) == "[]"


def test_ray_adapter_imports_no_services() -> None:
    assert _loaded("pipeline.train.ray_train", ("mlflow", "label_studio_sdk", "connectors")) == "[]"
