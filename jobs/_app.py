"""Commands generated from config models, run as `main(argv) -> int` with user errors as clear messages.

`ConfigCommand(Config, run)` turns every field of the config model into a flag: `--field-name`, its help
text the field's comment (`pipeline.config.field_docs`), enums as choices, booleans as
`--flag/--no-flag`, tuples and lists as repeatable flags, a nested `Config` section as
`--section-field`. Every command also takes `--config FILE.yaml` (field names as in the model; flags
override the file), and a required field may come from either. A field named in `positional` is an
argument instead of a flag (the campaign directory). `-h` is `--help`; a flag's metavar says what it takes
(`_metavar`). A field's earlier name (`pipeline.config.Renamed`) stays a hidden flag and YAML key that
prints one deprecation line.
"""

from __future__ import annotations

import inspect
import os
import sys
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Generic, TypeVar

import typer
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from pipeline.config import Config, Renamed, field_docs, load_config, read_yaml, renamed_keys

C = TypeVar("C", bound=Config)

# Errors that mean "the user asked for something wrong", or a service said no: one line, exit code 2.
# The connectors' own errors (e.g. a refused Label Studio token) are written to be shown as they are.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    TimeoutError,
)


def is_user_error(exc: BaseException) -> bool:
    return isinstance(exc, USER_ERRORS) or type(exc).__module__.startswith("connectors.")


def run_command(fn: Callable[..., Any], argv: Sequence[str] | None, prog: str) -> int:
    """Parse `argv` with typer from the signature of `fn`, call it, and return an exit code.

    Set BAYESCURATE_DEBUG=1 to see the traceback of a user error.
    """
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)
    app.command(help=fn.__doc__, context_settings={"help_option_names": ["-h", "--help"]})(fn)
    command = typer.main.get_command(app)
    for param in command.params:
        if isinstance(param, typer.core.TyperArgument) and param.metavar:
            param.display_type_rich = lambda ctx: None  # type: ignore[method-assign]  # not `DIR <str>`
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        result = command.main(args=args, prog_name=prog, standalone_mode=False)
    except typer.Exit as exc:
        return int(exc.exit_code)
    except typer.Abort:
        print("aborted", file=sys.stderr)
        return 130
    except typer.TyperException as exc:  # usage errors: typer vendors click, so these are its classes
        exc.show()  # type: ignore[attr-defined]
        return int(getattr(exc, "exit_code", 2))
    except Exception as exc:
        if not is_user_error(exc) or os.environ.get("BAYESCURATE_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return int(result or 0)


# ------------------------------------------------------------------------------------ config -> flags


@dataclass(frozen=True)
class Flag:
    """One command-line flag of a config field (possibly inside a section)."""

    path: tuple[str, ...]  # field names from the top-level model down, e.g. ("labels", "source")
    param: str  # python parameter name, e.g. "labels_source"
    annotation: Any  # the typer type of the parameter
    kind: str  # "scalar", "bool", "list" or "enum"
    positional: bool = False
    name: str = ""  # the flag's name when it is not the field's (`Field(json_schema_extra={"flag": ...})`)
    metavar: str | None = None  # what the value is, in --help (None: a boolean flag takes none)
    default: str = ""  # "required", "default: VALUE", or "" (none)
    renamed_to: str = ""  # a deprecated earlier name: the flag it stands for now (hidden from --help)

    @property
    def option(self) -> str:
        return "--" + (self.name or self.param.replace("_", "-"))


def _unwrap_optional(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
        raise TypeError(f"unsupported union type {annotation!r} in a config field")
    return annotation


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _flag_type(annotation: Any, where: str) -> tuple[Any, str]:
    inner = _unwrap_optional(annotation)
    origin = typing.get_origin(inner)
    if origin in (tuple, list, Sequence):
        args = [a for a in typing.get_args(inner) if a is not Ellipsis]
        item = _unwrap_optional(args[0]) if args else str
        return list[item], "list"  # type: ignore[valid-type]
    if inner is bool:
        return bool, "bool"
    if isinstance(inner, type) and issubclass(inner, Enum):
        return inner, "enum"
    if inner in (str, int, float, Path):
        return inner, "scalar"
    raise TypeError(f"config field {where} has type {annotation!r}, which no flag can express")


# What a text value names, by the field's name: the same name means the same thing in every command.
METAVARS = {
    **dict.fromkeys(
        ("out", "pool", "targets", "eval", "images", "embeddings", "posterior", "pairs", "corpus", "truth"),
        "PATH|URI",
    ),
    **dict.fromkeys(("model", "arch", "task", "project", "experiment"), "NAME"),
    "classes": "FILE",
    "init_from": "FILE",
    "image_store": "URI",
    "webhook": "URL",
    "address": "ADDRESS",
    "host": "HOST",
}
SUFFIX_METAVARS = {
    "_dir": "DIR",
    "_root": "DIR",
    "_file": "FILE",
    "_uri": "URI",
    "_url": "URL",
    "_column": "COLUMN",
}


def _metavar(name: str, typ: Any, extra: dict[str, Any]) -> str | None:
    """What a flag takes: `json_schema_extra={"metavar": ...}`, else the choices of an enum ({ray|local}), N
    (int), X (float), or for text what the field's name says (`METAVARS`, `SUFFIX_METAVARS`; else TEXT)."""
    if extra.get("metavar"):
        return str(extra["metavar"])
    if typing.get_origin(typ) is list:
        typ = typing.get_args(typ)[0]
    if typ is bool:
        return None
    if isinstance(typ, type) and issubclass(typ, Enum):
        return "{" + "|".join(str(m.value) for m in typ) + "}"
    if typ is int:
        return "N"
    if typ is float:
        return "X"
    if name in METAVARS:
        return METAVARS[name]
    return next((m for suffix, m in SUFFIX_METAVARS.items() if name.endswith(suffix)), "TEXT")


def _default_text(field: Any) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.get_default(call_default_factory=True)
    if value is None:
        return ""
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, tuple | list):
        value = " ".join(str(v.value if isinstance(v, Enum) else v) for v in value) or "none"
    if isinstance(value, bool):
        return "default: on" if value else "default: off"
    return f"default: {value}"


def _suffix(kind: str, default: str) -> str:
    """What --help appends to a field's comment: ` [repeatable; default: 1 2]`, ` [required]`, or ``."""
    shown = (["repeatable"] if kind == "list" else []) + ([default] if default else [])
    return f" [{'; '.join(shown)}]" if shown else ""


def _flattened(field: Any) -> bool:
    """A section whose flags drop its name (`--budget`, not `--selection-budget`)."""
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    return bool(extra.get("flatten"))


def config_flags(
    cls: type[Config],
    positional: Sequence[str] = (),
    prefix: tuple[str, ...] = (),
    flag_prefix: tuple[str, ...] | None = None,
) -> list[tuple[Flag, str]]:
    """(flag, help text) for every field of `cls`, sections flattened (`--section-field`, or `--field` for
    a section marked `flatten`)."""
    out: list[tuple[Flag, str]] = []
    docs = field_docs(cls)
    flag_prefix = prefix if flag_prefix is None else flag_prefix
    for name, field in cls.model_fields.items():
        path = (*prefix, name)
        annotation = _unwrap_optional(field.annotation)
        if _is_section(annotation):
            out += config_flags(
                annotation, (), path, flag_prefix if _flattened(field) else (*flag_prefix, name)
            )
            continue
        where = ".".join(path)
        typ, kind = _flag_type(field.annotation, where)
        is_positional = not prefix and name in positional
        default = _default_text(field)
        help_text = (docs.get(name, "") + _suffix(kind, "" if is_positional else default)).strip()
        extra_schema = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        param = "_".join(path)
        option = str(extra_schema.get("flag") or "")
        if not option and flag_prefix != prefix:
            option = "-".join((*flag_prefix, name)).replace("_", "-")
        metavar = name.upper() if is_positional else _metavar(name, typ, extra_schema)
        flag = Flag(path, param, typ, kind, is_positional, option, metavar, default)
        out.append((flag, help_text))
        for was in (m for m in field.metadata if isinstance(m, Renamed)):
            old = "-".join((*flag_prefix, was.old)).replace("_", "-")
            alias = Flag(
                (*prefix, was.old), "_".join(("was", *prefix, was.old)), typ, kind,
                name=old, metavar=metavar, renamed_to=flag.option,
            )  # fmt: skip
            out.append((alias, f"deprecated: use {flag.option}"))
    return out


def _parameter(flag: Flag, help_text: str) -> inspect.Parameter:
    if flag.positional:
        info: Any = typer.Argument(help=help_text, show_default=False, metavar=flag.metavar)
        return inspect.Parameter(
            flag.param, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Annotated[flag.annotation, info]
        )
    hidden = bool(flag.renamed_to)
    if flag.kind == "bool":
        name = flag.option.removeprefix("--")
        info = typer.Option(f"--{name}/--no-{name}", help=help_text, show_default=False, hidden=hidden)
    else:
        info = typer.Option(
            flag.option, help=help_text, show_default=False, metavar=flag.metavar, hidden=hidden
        )
    return inspect.Parameter(
        flag.param,
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[flag.annotation | None, info],  # type: ignore[operator]
    )


def _nest(values: dict[str, Any], flags: list[Flag]) -> dict[str, Any]:
    """Flat flag values -> the nested override dict `load_config` expects (None: not given)."""
    out: dict[str, Any] = {}
    for flag in flags:
        value = values.get(flag.param)
        if value is None or (flag.kind == "list" and value == []):
            continue
        node = out
        for key in flag.path[:-1]:
            node = node.setdefault(key, {})
        node[flag.path[-1]] = value
    return out


class ConfigCommand(Generic[C]):
    """A command whose flags are generated from `config` and whose body is `run(cfg) -> exit code`."""

    def __init__(
        self,
        config: type[C],
        run: Callable[[C], int | None],
        prog: str,
        *,
        help: str | None = None,
        positional: Sequence[str] = (),
    ) -> None:
        self.config = config
        self.run = run
        self.prog = prog
        self.help = help or (run.__doc__ or "").strip() or (config.__doc__ or "").strip()
        self.positional = tuple(positional)
        self.flags = config_flags(config, self.positional)
        options = [f.option for f, _ in self.flags if not f.positional]
        options += ["--no-" + f.option.removeprefix("--") for f, _ in self.flags if f.kind == "bool"]
        repeated = sorted({o for o in options if options.count(o) > 1})
        if repeated:
            raise TypeError(f"{config.__name__} gives several fields the flags {repeated}")

    def parse(self, argv: Sequence[str]) -> C:
        """The config that `argv` (flags and `--config`) describes, without running the command."""
        found: list[C] = []
        code = self._execute(argv, found.append)
        if code != 0 or not found:
            raise ValueError(f"{self.prog}: could not parse {list(argv)} (exit code {code})")
        return found[0]

    def main(self, argv: Sequence[str] | None = None) -> int:
        return self._execute(argv, self.run)

    def option_names(self) -> set[str]:
        """Every current flag of the command (both forms of a boolean, `--config` and `--help`; not the
        deprecated names, `renamed_options`)."""
        names = {"--config", "--help"}
        for flag, _ in self.flags:
            if flag.positional or flag.renamed_to:
                continue
            names.add(flag.option)
            if flag.kind == "bool":
                names.add("--no-" + flag.option.removeprefix("--"))
        return names

    def renamed_options(self) -> dict[str, str]:
        """Deprecated flag -> the flag it stands for now (hidden from --help)."""
        return {flag.option: flag.renamed_to for flag, _ in self.flags if flag.renamed_to}

    __call__ = main

    def _execute(self, argv: Sequence[str] | None, body: Callable[[C], Any]) -> int:
        flags = [f for f, _ in self.flags]

        def command(**values: Any) -> int:
            config_file = values.pop("config", None)
            for flag in flags:
                if flag.renamed_to and values.get(flag.param) not in (None, []):
                    print(f"warning: {flag.option} is deprecated; use {flag.renamed_to}", file=sys.stderr)
            if config_file is not None:
                for old, new in renamed_keys(self.config, read_yaml(config_file)):
                    print(f"warning: `{old}:` in {config_file} is deprecated; use `{new}:`", file=sys.stderr)
            cfg = load_config(self.config, config_file, **_nest(values, flags))
            return int(body(cfg) or 0)

        params = [_parameter(f, h) for f, h in self.flags]
        positional = [p for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
        keyword = [p for p in params if p.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD]
        config_opt = typer.Option(
            "--config",
            help="YAML file with the command's settings (field names as above); flags win.",
            metavar="FILE",
        )
        keyword.append(
            inspect.Parameter(
                "config",
                inspect.Parameter.KEYWORD_ONLY,
                default=None,
                annotation=Annotated[str | None, config_opt],  # a path or a URI (Path would mangle s3://)
            )
        )
        command.__signature__ = inspect.Signature(positional + keyword)  # type: ignore[attr-defined]
        command.__doc__ = self.help
        return run_command(command, argv, self.prog)


def resolve_target(target: str) -> Callable[[Sequence[str]], int]:
    """`"package.module"` -> its `main`; `"package.module:name"` -> that attribute (imported lazily)."""
    import importlib

    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr or "main")  # type: ignore[no-any-return]


def subcommands(
    table: dict[str, tuple[str, str]], argv: Sequence[str] | None, prog: str, what: str = "command"
) -> int:
    """Dispatch `prog NAME ...` to the target of `table[NAME]` (see `resolve_target`), imported lazily."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help") or args[0] not in table:
        if args and args[0] not in ("-h", "--help"):
            print(f"error: unknown {what} {args[0]!r}", file=sys.stderr)
        print(f"usage: {prog} {{{','.join(table)}}} [ARGS]...\n")
        width = max(len(name) for name in table)
        for name, (_, desc) in table.items():
            print(f"  {name.ljust(width)}  {desc}")
        return 0 if not args or args[0] in ("-h", "--help") else 2
    return int(resolve_target(table[args[0]][0])(args[1:]))


def config_reference(cls: type[Config], positional: Sequence[str] = ()) -> str:
    """A Markdown table of every field of `cls` (sections flattened as `section.field`; fields named in
    `positional` are arguments): the docs' CLI reference (`jobs._reference`), kept true by a test."""
    rows = ["| field | flag | default | what |", "|---|---|---|---|"]
    for flag, help_text in config_flags(cls, positional):
        if flag.renamed_to:
            continue
        text = help_text.removesuffix(_suffix(flag.kind, "" if flag.positional else flag.default))
        default = flag.default.removeprefix("default: ")
        default = f"`{default}`" if default and default != "required" else (default or "—")
        if flag.kind == "enum":
            text += " (" + ", ".join(f"`{m.value}`" for m in flag.annotation) + ")"
        if flag.kind == "list":
            text += " (repeatable)"
        name = f"{flag.param.upper()} (argument)" if flag.positional else flag.option
        rows.append(f"| `{'.'.join(flag.path)}` | `{name}` | {default} | {text.replace('|', '/')} |")
    return "\n".join(rows)
