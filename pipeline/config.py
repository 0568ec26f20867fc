"""Configuration models: frozen pydantic models, loaded from YAML and overridden by command-line flags.

A field's trailing comment is its documentation: `field_docs` reads it from the source, and the CLI
(`jobs._app.ConfigCommand`) turns it into the flag's help text, so the two cannot drift apart. A field
that holds another `Config` is a section: nested in YAML, `--section-field` on the command line. A field
marked `Renamed("old")` still loads from its earlier name, so old YAML files and campaign directories do.
"""

from __future__ import annotations

import functools
import inspect
import io
import textwrap
import tokenize
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

T = TypeVar("T", bound="Config")


@dataclass(frozen=True)
class Renamed:
    """A field's earlier name, still accepted: `executor: Annotated[Trainer, Renamed("trainer")] = ...`.

    A YAML key or keyword argument under the old name loads into the field (the current name wins when both
    are given), and the CLI keeps the old flag, hidden, with a deprecation line. `convert` maps a value
    given under the old name to the field's meaning, when the meaning changed too.
    """

    old: str
    convert: Callable[[Any], Any] | None = None


@functools.cache
def renamed_fields(cls: type[BaseModel]) -> dict[str, tuple[str, Renamed]]:
    """old name -> (current name, its `Renamed` marker) for the fields of `cls` (not of its sections)."""
    return {
        m.old: (name, m)
        for name, field in cls.model_fields.items()
        for m in field.metadata
        if isinstance(m, Renamed)
    }


class Config(BaseModel):
    """Base for every configuration: immutable, unknown keys rejected, earlier field names accepted."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_enum_values=False)

    @model_validator(mode="before")
    @classmethod
    def _current_names(cls, data: Any) -> Any:
        renames = renamed_fields(cls)
        if not isinstance(data, dict) or not renames.keys() & data.keys():
            return data
        data = dict(data)
        for old in sorted(renames.keys() & data.keys()):
            name, marker = renames[old]
            value = data.pop(old)
            if value is not None and marker.convert is not None:
                value = marker.convert(value)
            data.setdefault(name, value)
        return data


def renamed_keys(cls: type[BaseModel], data: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(old key, current key), dotted through sections, for every earlier field name used in `data`."""
    if not isinstance(data, dict):
        return
    renames = renamed_fields(cls)
    for key, value in data.items():
        if key in renames:
            yield prefix + key, prefix + renames[key][0]
        field = cls.model_fields.get(key)
        section = _section_type(field.annotation) if field is not None else None
        if section is not None:
            yield from renamed_keys(section, value, f"{prefix}{key}.")


def _section_type(annotation: Any) -> type[BaseModel] | None:
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _trailing_comments(source: str) -> dict[str, str]:
    """`name: type = default  # comment` -> {name: comment} for the fields of one class body.

    A comment line directly under a documented field continues that field's comment; any other comment on a
    line of its own (a section heading) documents nothing.
    """
    docs: dict[str, str] = {}
    depth, line_tokens = 0, []
    last_field, last_row = None, -1
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.INDENT:
            depth += 1
            continue
        if tok.type == tokenize.DEDENT:
            depth -= 1
            continue
        if tok.type == tokenize.COMMENT and not [t for t in line_tokens if t.type != tokenize.NL]:
            if depth == 1 and last_field is not None and tok.start[0] == last_row + 1:
                docs[last_field] += " " + tok.string.lstrip("#").strip()
                last_row = tok.start[0]
            else:
                last_field = None
            continue
        if tok.type in (tokenize.NEWLINE, tokenize.ENDMARKER):
            names = [t for t in line_tokens if t.type not in (tokenize.COMMENT, tokenize.NL)]
            comments = [t.string.lstrip("#").strip() for t in line_tokens if t.type == tokenize.COMMENT]
            last_field = None
            field_line = len(names) >= 2 and names[0].type == tokenize.NAME and names[1].string == ":"
            if depth == 1 and field_line and comments:
                docs[names[0].string] = " ".join(comments)
                last_field, last_row = names[0].string, tok.start[0]
            line_tokens = []
            continue
        line_tokens.append(tok)
    return docs


@functools.cache
def field_docs(cls: type[BaseModel]) -> dict[str, str]:
    """Help text of every documented field of `cls`: `Field(description=...)`, else its trailing comment."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not (isinstance(klass, type) and issubclass(klass, BaseModel)) or klass is BaseModel:
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):  # no source (frozen app): descriptions only
            continue
        docs.update(_trailing_comments(source))
    for name, field in cls.model_fields.items():
        if field.description:
            docs[name] = field.description
    return {name: text for name, text in docs.items() if name in cls.model_fields}


def changed_fields(old: BaseModel, new: BaseModel) -> list[str]:
    """The fields whose values differ, sorted: a section's own fields as `section.field`, or by their name
    alone for a section marked `flatten` (as their flags are named)."""
    out: list[str] = []
    for name, field in type(new).model_fields.items():
        before, after = getattr(old, name), getattr(new, name)
        if before == after:
            continue
        if isinstance(before, BaseModel) and isinstance(after, BaseModel) and type(before) is type(after):
            extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
            prefix = "" if extra.get("flatten") else f"{name}."
            out += [prefix + leaf for leaf in changed_fields(before, after)]
        else:
            out.append(name)
    return sorted(out)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML config file (local path or URI)."""
    from pipeline.io import storage

    if not storage.is_file(path):
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    loaded = yaml.safe_load(storage.read_text(path)) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping, got {type(loaded).__name__}")
    return loaded


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        elif value is not None:
            out[key] = value
    return out


def _describe(cls: type[BaseModel], exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        flag = "--" + "-".join(loc).replace("_", "-")
        key = ".".join(loc)
        if not loc:  # a check across fields
            lines.append(str(err["msg"]).removeprefix("Value error, "))
        elif err["type"] == "missing":
            lines.append(f"missing {flag} (or `{key}:` in the --config file)")
        elif err["type"] == "extra_forbidden":
            lines.append(f"unknown setting {key!r}")
        else:
            lines.append(f"{flag}: {err['msg']} (got {err.get('input')!r})")
    return f"invalid {cls.__name__}: " + "; ".join(lines)


def load_config(cls: type[T], path: str | Path | None = None, **overrides: Any) -> T:
    """Build `cls` from an optional YAML file, then apply the overrides that are not None (the CLI flags).

    Nested dicts in `overrides` update the matching section of the file rather than replacing it.
    """
    data = read_yaml(path) if path is not None else {}
    data = _merge(data, overrides)
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ValueError(_describe(cls, exc)) from None


class TrackedConfig(Config):
    """Fields of every config whose run is logged to MLflow."""

    tracking: bool = True  # log the run to MLflow
    tracking_uri: str | None = (
        None  # MLflow URI (default: $MLFLOW_TRACKING_URI, the `services` one, or sqlite)
    )
    experiment: str = "bayescurate"  # MLflow experiment

    def tracker(self) -> Any:
        """The `connectors.tracking.Tracker` these fields name (imports MLflow: only when tracking)."""
        from connectors.tracking import Tracker

        if self.tracking_uri:
            return Tracker(self.tracking_uri, self.experiment)
        return Tracker.default(self.experiment)


class LabelStudioAccess(Config):
    """Fields of every config that talks to Label Studio; resolved with the command's `state_dir` by
    `connectors.label_studio_access.resolve` (flag, then environment, then the local services)."""

    label_studio_url: str | None = None  # URL of the Label Studio server to use (default: $LABEL_STUDIO_URL,
    # else the one `bayescurate services up` started)
    label_studio_token_file: str | None = None  # file holding its API token (default: $LABEL_STUDIO_API_KEY,
    # else the file $LABEL_STUDIO_API_KEY_FILE)

    def label_studio(self, state_dir: str | None = None) -> Any:
        """The `connectors.label_studio_access.LabelStudioTarget` these fields (and `state_dir`) name."""
        from connectors.label_studio_access import resolve

        return resolve(self.label_studio_url, self.label_studio_token_file, state_dir)
