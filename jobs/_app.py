"""Runs one typer command function as `main(argv) -> int`, turning user errors into clear messages."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

# Options shared by several commands (each command's config model has the matching field).
ConfigOption = Annotated[
    Path | None, typer.Option(help="YAML config file with the command's fields; flags override it.")
]
ExecutorOption = Annotated[str | None, typer.Option(help="ray or local (in-process, no Ray).")]
AddressOption = Annotated[str | None, typer.Option(help="Ray cluster address (default: embedded local Ray).")]
NumCpusOption = Annotated[int | None, typer.Option(help="CPUs of the embedded local Ray (default: all).")]
TrackingOption = Annotated[bool | None, typer.Option("--tracking/--no-tracking", help="Log to MLflow.")]
TrackingUriOption = Annotated[
    str | None,
    typer.Option(help="MLflow URI (default: $MLFLOW_TRACKING_URI, the `services` MLflow, or .state sqlite)."),
]
ExperimentOption = Annotated[str | None, typer.Option(help="MLflow experiment.")]

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
    app.command(help=fn.__doc__)(fn)
    command = typer.main.get_command(app)
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
