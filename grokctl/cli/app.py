"""The `grokctl` command: one Typer app, one module per command, one error -> exit-code map."""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
from typing import Any

import typer
import typer.main

try:  # typer >= 0.20 vendors its own click
    from typer._click import exceptions as click_exc
except ImportError:  # pragma: no cover - older typer uses click itself
    from click import exceptions as click_exc  # type: ignore[no-redef]

from grokctl.errors import EXIT_ERROR, EXIT_USAGE, GrokctlError

app = typer.Typer(
    name="grokctl",
    help="Download, verify, inspect and run xAI's Grok-1; write random-weight checkpoints in its "
    "released format.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

# Each module defines `register(app)`; order is the order of `grokctl --help`.
COMMAND_MODULES = [
    "download",
    "verify",
    "inspect",
    "generate",
    "bench",
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

_METAVARS = {int: "INT", float: "FLOAT", str: "TEXT", bool: "BOOL"}


def _metavar(param: Any) -> str:
    """What `--help` shows for a parameter's value: nothing for a flag, the choices of a
    setting with choices ([sparse|dense]), else INT / FLOAT / TEXT / PATH."""
    if getattr(param, "is_flag", False):
        return ""
    long = next((o for o in param.opts if o.startswith("--")), "--" + (param.name or ""))
    from grokctl.config import SETTINGS

    st = SETTINGS.get(long[2:].replace("-", "_"))
    if st is not None and st.choices:  # long lists (presets) are spelled out in the help text
        shown = f"[{'|'.join(st.choices)}]"
        return shown if len(shown) <= 20 else "NAME"
    desc = getattr(param, "type_descriptor", None)
    if desc is not None and desc.is_path:
        return "PATH"
    args = getattr(getattr(desc, "annotation", None), "__args__", None)
    kind = (
        args[0] if desc is not None and desc.is_list and args else getattr(desc, "annotation", str)
    )
    return _METAVARS.get(kind, "TEXT")


def _polish(command: Any) -> Any:
    """Help that reads well at 80 columns: every value shown as a plain metavar (never
    `<bool>` or `<list[str]>`), choices listed; applied to every command once."""
    for param in command.params:
        if param.param_type_name == "argument":  # its name says what it is: no <path> after it
            param.metavar = param.metavar or param.name.upper()
            param.display_type_rich = lambda ctx: ""
        elif param.metavar is None:
            param.metavar = _metavar(param)
    get_help_option = command.get_help_option

    def help_option(ctx: Any) -> Any:
        option = get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option

    command.get_help_option = help_option
    for sub in getattr(command, "commands", {}).values():
        if sub.short_help is None and sub.help:  # the command list shows one sentence each
            first = " ".join(sub.help.split()).split(". ")[0].rstrip(".")
            sub.short_help = first + "."
        _polish(sub)
    return command


_COMMAND: Any = None


def command() -> Any:
    """The click command behind `app`, built and polished once."""
    global _COMMAND
    if _COMMAND is None:
        _COMMAND = _polish(typer.main.get_command(app))
    return _COMMAND


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


INTERRUPT_GRACE_S = 1.0


class _InterruptWatchdog:
    """Ctrl-C answers within a second even while the main thread is inside a long call that
    Python cannot interrupt (an XLA compile, a blocking C read).

    The signal's wakeup byte reaches a watcher thread at once. If within `INTERRUPT_GRACE_S` the
    main thread has not received its KeyboardInterrupt (it is stuck in C), the watcher ends the
    process with one line and exit 130. A main thread that did receive it is cleaning up (saving
    resume data, printing what it has) and is left to finish; a second Ctrl-C ends it at once."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.seen = threading.Event()  # the main thread has received a KeyboardInterrupt
        self.count = 0
        self._fds: tuple[int, int] | None = None
        self._old_fd = -1

    def __enter__(self) -> _InterruptWatchdog:
        if threading.current_thread() is not threading.main_thread():
            return self
        if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            return self  # someone else (an embedding application) handles Ctrl-C
        r, w = os.pipe()
        os.set_blocking(w, False)
        try:
            self._old_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        except (ValueError, OSError):  # pragma: no cover - not the main interpreter
            os.close(r)
            os.close(w)
            return self
        signal.signal(signal.SIGINT, self._on_sigint)
        self._fds = (r, w)
        threading.Thread(target=self._watch, args=(r,), daemon=True, name="grokctl-sigint").start()
        return self

    def _on_sigint(self, signum: int, frame: object) -> None:  # runs in the main thread
        self.count += 1
        if self.count > 1:
            self._exit()
        self.seen.set()
        raise KeyboardInterrupt

    @staticmethod
    def _exit() -> None:
        try:
            from grokctl.cli.output import end_line

            end_line()
            sys.stderr.write("grokctl: error: interrupted\n")
            sys.stderr.flush()
        finally:
            os._exit(130)

    def _watch(self, r: int) -> None:
        presses = 0
        while True:
            try:
                data = os.read(r, 64)
            except OSError:
                return
            if not data:  # closed: the command is over
                return
            presses += data.count(signal.SIGINT)
            if presses == 0:
                continue
            if presses == 1 and (self.seen.wait(INTERRUPT_GRACE_S) or self.done.is_set()):
                continue  # the main thread has it and is cleaning up
            if not self.done.is_set():
                self._exit()  # stuck in C past the grace time, or a second Ctrl-C

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        if self._fds is not None:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.set_wakeup_fd(self._old_fd)
            os.close(self._fds[1])  # the watcher reads EOF and ends
            self._fds = None


def main(argv: list[str] | None = None) -> int:
    """Entry point: returns the exit code; user errors print one line, never a traceback."""
    with _InterruptWatchdog():
        code = _main(argv)
    return code


def _main(argv: list[str] | None = None) -> int:
    debug = os.environ.get("GROKCTL_DEBUG", "") not in ("", "0")
    try:
        rv = command().main(args=argv, prog_name="grokctl", standalone_mode=False)
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
        from grokctl.cli.output import end_line

        end_line()
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
    from grokctl.cli import finish

    finish(main())


if __name__ == "__main__":
    run()
