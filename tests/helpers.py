"""Helpers shared by tests: run the CLI in-process through its entry point and capture its
streams (tests that need a real process - signals, several processes, SIGKILL - start their own)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json_lines(self) -> list[dict]:
        return [json.loads(line) for line in self.out.splitlines() if line.strip()]


class _Stream(io.TextIOWrapper):
    """A text stream over bytes (with `.buffer`, as sys.stdout has) that is not a terminal."""

    def __init__(self, data: bytes = b"") -> None:
        super().__init__(io.BytesIO(data), encoding="utf-8", newline="")

    def text(self) -> str:
        self.flush()
        raw = self.buffer
        assert isinstance(raw, io.BytesIO)
        return raw.getvalue().decode("utf-8", "replace")


@contextlib.contextmanager
def _environment(env: dict[str, str] | None, cwd: str | Path | None) -> Iterator[None]:
    saved_env = dict(os.environ)
    saved_cwd = os.getcwd()
    try:
        os.environ.update(env or {})
        if cwd is not None:
            os.chdir(cwd)
        yield
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)


def grokctl(
    *args: str,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
    stdin: str = "",
) -> Run:
    """Run `grokctl ARGS` in this process through `grokctl.cli.app.main` (the code path of the
    installed entry point), with `env` added to the environment, `cwd` as the working directory
    and `stdin` piped in; stdout and stderr are captured (neither is a terminal)."""
    from grokctl.cli.app import main

    out, err, inp = _Stream(), _Stream(), _Stream(stdin.encode())
    saved = sys.stdin, sys.stdout, sys.stderr
    with _environment(env, cwd):
        sys.stdin, sys.stdout, sys.stderr = inp, out, err
        try:
            code = main(list(args))
        finally:
            sys.stdin, sys.stdout, sys.stderr = saved
    return Run(code, out.text(), err.text())


def one_line_error(run: Run) -> str:
    """The error is exactly one `grokctl: error:` line, and there is no traceback."""
    lines = [line for line in run.err.splitlines() if line.startswith("grokctl: error:")]
    assert len(lines) == 1, f"expected one error line, got:\n{run.err}"
    assert "Traceback" not in run.err
    return lines[0]


# Reading a full-size stand-in's headers reads a few MB; its data would be 318 GB.
HEADERS_READ_LIMIT = 256 << 20


def bytes_read() -> int | None:
    """Bytes this process has read through read(2) and friends so far (Linux /proc/self/io
    `rchar`), or None where the kernel does not say: a counter for "read the headers only"."""
    try:
        with open("/proc/self/io") as fh:
            for line in fh:
                if line.startswith("rchar:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def write_manifest(root: Path) -> Any:
    """A grokctl-manifest.json vouching for every file under `root` as it is now (size, sha256)."""
    from grokctl.fetch.common import sha256_file
    from grokctl.fetch.manifest import FileRecord, Manifest

    m = Manifest(root)
    for f in sorted(root.rglob("*")):
        if f.is_file():
            rel = f.relative_to(root).as_posix()
            m.record(rel, FileRecord(f.stat().st_size, sha256_file(f), "local", None, "2024"))
    m.save()
    return m


def flip_byte(path: Path, offset: int = -100) -> None:
    """Corrupt one bit of a real file, in place."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
