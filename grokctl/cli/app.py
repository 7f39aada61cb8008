"""The `grokctl` command: one Typer app, one module per command, one error -> exit-code map."""

from __future__ import annotations

import importlib
import os
import sys

import typer

try:  # typer >= 0.20 vendors its own click
    from typer._click import exceptions as click_exc
except ImportError:  # pragma: no cover - older typer uses click itself
    from click import exceptions as click_exc  # type: ignore[no-redef]

from grokctl.errors import EXIT_ERROR, EXIT_USAGE, GrokctlError

app = typer.Typer(
    name="grokctl",
    help="Download, verify, inspect, quantize and run xAI's Grok-1.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

# Each module defines `register(app)`; order is the order of `grokctl --help`.
COMMAND_MODULES = [
    "download",
    "verify",
    "inspect",
    "generate",
    "quantize",
    "random_checkpoint",
]


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", help="Print the version and exit."),
) -> None:
    if version:
        from grokctl import __version__

        typer.echo(__version__)
        raise typer.Exit(0)
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(EXIT_USAGE)


def _register_all() -> None:
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"grokctl.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"grokctl.cli.{name}":
                continue  # command not built yet
            raise
        module.register(app)


_register_all()


_NO_ARGS: tuple[type[BaseException], ...] = tuple(
    e
    for e in (getattr(click_exc, n, None) for n in ("NoArgsIsHelpError", "NoArgsIsHelp"))
    if isinstance(e, type)
)
_EXIT: tuple[type[BaseException], ...] = tuple(
    e for e in (getattr(click_exc, "Exit", None), typer.Exit, SystemExit) if isinstance(e, type)
)
_ABORT: tuple[type[BaseException], ...] = tuple(
    e for e in (getattr(click_exc, "Abort", None), typer.Abort) if isinstance(e, type)
)


def _fail(message: str, code: int) -> int:
    sys.stderr.write(f"grokctl: error: {message}\n")
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point: returns the exit code; user errors print one line, never a traceback."""
    debug = os.environ.get("GROKCTL_DEBUG", "") not in ("", "0")
    try:
        rv = app(args=argv, prog_name="grokctl", standalone_mode=False)
    except _NO_ARGS:
        return EXIT_USAGE
    except _EXIT as exc:
        return int(getattr(exc, "exit_code", 0) or 0)
    except _ABORT:
        return _fail("aborted", 130)
    except click_exc.ClickException as exc:  # usage errors: bad flag, missing option, bad value
        if debug:
            raise
        message = exc.format_message().replace("\n", " ")
        ctx = getattr(exc, "ctx", None)
        where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        return _fail(message + where, exc.exit_code)
    except GrokctlError as exc:
        if debug:
            raise
        return _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except BrokenPipeError:
        return 0
    except Exception as exc:  # an unexpected failure: still one line unless GROKCTL_DEBUG=1
        if debug:
            raise
        return _fail(
            f"{type(exc).__name__}: {exc} (set GROKCTL_DEBUG=1 for a traceback)", EXIT_ERROR
        )
    return rv if isinstance(rv, int) else 0  # typer returns 130 for Ctrl-C


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
