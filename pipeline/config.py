"""Configuration models: frozen pydantic models loaded from YAML and overridden by command-line flags."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

T = TypeVar("T", bound="Config")


class Config(BaseModel):
    """Base for every job's configuration: immutable, unknown keys rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")


def load_config(cls: type[T], path: str | Path | None = None, **overrides: Any) -> T:
    """Build `cls` from an optional YAML file, then apply the overrides that are not None (the CLI flags)."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {str(path)!r} must hold a mapping, got {type(loaded).__name__}")
        data.update(loaded)
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ValueError(f"invalid {cls.__name__}: {exc}") from None
