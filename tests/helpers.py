"""Helpers shared by tests: run the real CLI entry point and capture its streams."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json_lines(self) -> list[dict]:
        return [json.loads(line) for line in self.out.splitlines() if line.strip()]


def grokctl(
    *args: str,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
    timeout: float = 300,
) -> Run:
    """Run `python -m grokctl ARGS` in a subprocess (the installed entry point's code path)."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "grokctl", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=timeout,
    )
    return Run(proc.returncode, proc.stdout, proc.stderr)


def one_line_error(run: Run) -> str:
    """The error is exactly one `grokctl: error:` line, and there is no traceback."""
    lines = [line for line in run.err.splitlines() if line.startswith("grokctl: error:")]
    assert len(lines) == 1, f"expected one error line, got:\n{run.err}"
    assert "Traceback" not in run.err
    return lines[0]
