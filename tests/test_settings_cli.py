"""Settings, errors, interruption and generate's options through the real entry point
(`grokctl.cli.app.main`, in-process), plus two Ctrl-C runs of the real `python -m grokctl`."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hub_server import HubServer  # tests/ is on sys.path under pytest

from grokctl.cli.app import main
from grokctl.fetch.manifest import Manifest


@dataclass
class Result:
    code: int
    out: str
    err: str

    def error_line(self) -> str:
        lines = [ln for ln in self.err.splitlines() if ln.startswith("grokctl: error:")]
        assert len(lines) == 1, self.err
        assert "Traceback" not in self.err
        return lines[0]


@pytest.fixture(autouse=True)
def _clean_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No grokctl.toml and no GROKCTL_* variable leaks in from the machine running the tests."""
    for var in list(os.environ):
        if var.startswith("GROKCTL_") and var != "GROKCTL_CACHE_DIR":
            monkeypatch.delenv(var)
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    monkeypatch.setenv("GROKCTL_CONFIG", str(empty))


def cli(capsys: pytest.CaptureFixture[str], *args: str, stdin: bytes = b"") -> Result:
    old = sys.stdin
    sys.stdin = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
    try:
        code = main(list(args))
    finally:
        sys.stdin = old
    cap = capsys.readouterr()
    return Result(code, cap.out, cap.err)


# --- item 4: every option through flag > env > grokctl.toml > default ----------------------------


def test_environment_and_toml_drive_generate_options(
    demo_ckpt: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """GROKCTL_MAX_TOKENS=3 generates 3 tokens (it used to generate 64); the prompt comes from
    the piped stdin; --logprobs N reports the top-N log-probabilities of every token."""
    monkeypatch.setenv("GROKCTL_MAX_TOKENS", "3")
    toml = Path(os.environ["GROKCTL_CONFIG"])
    toml.write_text("[generate]\nlogprobs = 3\ntemperature = 0.0\n")
    run = cli(capsys, "generate", "-c", str(demo_ckpt), "--json", stdin=b"Hello there\n")
    assert run.code == 0, run.err
    (row,) = [json.loads(line) for line in run.out.splitlines()]
    assert row["prompt"] == "Hello there"
    assert row["generated_tokens"] == 3 and row["finish_reason"] == "length"
    assert len(row["logprobs"]) == 3
    for tok, lp in zip(row["token_ids"], row["logprobs"]):
        assert lp["token_id"] == tok and len(lp["top"]) == 3
        tops = [t["logprob"] for t in lp["top"]]
        assert tops == sorted(tops, reverse=True) and all(t <= 0 for t in tops)
        assert lp["top"][0]["token_id"] == tok and lp["logprob"] == tops[0]  # greedy
    flag = cli(capsys, "generate", "-c", str(demo_ckpt), "-n", "2", "--json", stdin=b"Hello there")
    assert flag.code == 0 and json.loads(flag.out)["token_ids"] == row["token_ids"][:2]


@pytest.mark.parametrize(
    "env, value, needle",
    [
        ("GROKCTL_MAX_TOKENS", "0", "GROKCTL_MAX_TOKENS: must be >= 1, got 0"),
        ("GROKCTL_TEMPERATURE", "hot", "GROKCTL_TEMPERATURE: expected a number"),
        ("GROKCTL_TOP_P", "0", "GROKCTL_TOP_P: must be in (0, 1]"),
        ("GROKCTL_SEED", "x", "GROKCTL_SEED: expected an integer"),
        ("GROKCTL_MESH", "3by5", "GROKCTL_MESH: expected DxM"),
        ("GROKCTL_MESH", "3x5", "GROKCTL_MESH 3x5: 3x5 = 15 devices"),
    ],
)
def test_bad_environment_values_exit_2_naming_the_variable(
    demo_ckpt: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    env: str,
    value: str,
    needle: str,
) -> None:
    monkeypatch.setenv(env, value)
    run = cli(capsys, "generate", "-c", str(demo_ckpt), "--token-ids", "5,6")
    assert run.code == 2, run.err
    line = run.error_line()
    assert needle in line and "--mesh" not in line


def test_bad_toml_value_and_unknown_key_exit_2_naming_file_and_key(
    demo_ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    toml = Path(os.environ["GROKCTL_CONFIG"])
    toml.write_text("[generate]\ntop_k = -3\n")
    run = cli(capsys, "generate", "-c", str(demo_ckpt), "--token-ids", "5")
    assert run.code == 2 and f"{toml}: [generate] top_k: must be >= 0" in run.error_line()
    toml.write_text("temprature = 0.5\n")
    run = cli(capsys, "inspect", "--preset", "grok-1")
    assert run.code == 2 and f"{toml}: temprature: unknown setting" in run.error_line()


def test_flag_range_errors_name_the_flag(
    demo_ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for flag, value, needle in (
        ("--min-p", "1.5", "--min-p: must be in [0, 1], got 1.5"),
        ("--repeat-penalty", "-1", "--repeat-penalty: must be > 0"),
        ("--logprobs", "99", "--logprobs: must be in [0, 20]"),
        ("--max-tokens", "0", "--max-tokens: must be >= 1"),
    ):
        run = cli(capsys, "generate", "-c", str(demo_ckpt), "--token-ids", "5", flag, value)
        assert run.code == 2 and needle in run.error_line(), run.err


# --- item 5: a checkpoint without config.json ---------------------------------------------------


def test_missing_config_json_names_the_assumed_preset(
    demo_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = tmp_path / "noconfig"
    shutil.copytree(demo_ckpt, ckpt)
    (ckpt / "config.json").unlink()
    run = cli(capsys, "generate", "-c", str(ckpt), "--token-ids", "5")
    assert run.code == 3
    line = run.error_line()
    assert "no config.json; assumed preset grok-1 (770 tensors) but found 26 tensor files" in line
    assert "--preset" in line and "tensor files missing" not in line
    run = cli(capsys, "inspect", str(ckpt))
    assert run.code == 3 and "assumed preset grok-1" in run.error_line()


def test_preset_contradicting_config_json_is_a_usage_error(
    demo_ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = cli(capsys, "generate", "-c", str(demo_ckpt), "--token-ids", "5", "--preset", "grok-1")
    assert run.code == 2
    line = run.error_line()
    assert "--preset grok-1 contradicts" in line and "config.json" in line


# --- item 6: one-line errors with the right exit codes ---------------------------------------------


def test_non_utf8_prompts_file_names_the_line(
    demo_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pf = tmp_path / "prompts.txt"
    pf.write_bytes(b"hello\nwor\xffld\n")
    run = cli(capsys, "generate", "-c", str(demo_ckpt), "--prompts-file", str(pf))
    assert run.code == 2
    assert f"--prompts-file {pf}: line 2 is not UTF-8 text (byte 0xff" in run.error_line()
    run = cli(capsys, "generate", "-c", str(demo_ckpt), stdin=b"\xfe")
    assert run.code == 2 and "stdin: line 1 is not UTF-8" in run.error_line()


def test_random_checkpoint_onto_a_file_or_unwritable_place(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    run = cli(capsys, "random-checkpoint", str(f), "--layers", "1")
    assert run.code == 2 and "exists and is not a directory" in run.error_line()
    run = cli(capsys, "random-checkpoint", str(f / "sub"), "--layers", "1")
    assert run.code == 2 and f"{f} is not a directory" in run.error_line()
    run = cli(capsys, "random-checkpoint", "/proc/grokctl-test", "--layers", "1")
    assert run.code == 4
    line = run.error_line()
    assert "/proc/grokctl-test" in line and ".partial" not in line and "Errno" not in line


def test_download_refuses_bad_dir_and_tokenizer_source_before_any_transfer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: never reached
    f = tmp_path / "file"
    f.write_text("x")
    run = cli(capsys, "download", "--dir", str(f))
    assert run.code == 2 and f"--dir {f}: exists and is not a directory" in run.error_line()
    dest = str(tmp_path / "dl")
    run = cli(capsys, "download", "--dir", dest, "--tokenizer-from", str(tmp_path / "absent"))
    assert run.code == 4 and "--tokenizer-from" in run.error_line()
    for url in ("htp:/nowhere", "not a url", "http://host:port/x"):
        run = cli(capsys, "download", "--dir", dest, "--tokenizer-url", url)
        assert run.code == 2 and "--tokenizer-url" in run.error_line(), run.err
    monkeypatch.setenv("GROKCTL_TOKENIZER_URL", "ftp://x/tokenizer.model")
    run = cli(capsys, "download", "--dir", dest)
    assert run.code == 2 and "GROKCTL_TOKENIZER_URL" in run.error_line()
    assert not (tmp_path / "dl").exists()


def test_unreachable_tokenizer_host_says_cannot_reach(tmp_path: Path) -> None:
    from grokctl.errors import MissingResourceError
    from grokctl.fetch.manifest import Manifest
    from grokctl.fetch.tokenizer_fetch import fetch_tokenizer

    with pytest.raises(MissingResourceError) as exc:
        fetch_tokenizer(
            tmp_path,
            Manifest.load_or_new(tmp_path),
            url="http://127.0.0.1:9/tokenizer.model",
            retries=0,
            timeout=5,
        )
    assert "cannot reach 127.0.0.1" in str(exc.value) and "resume" not in str(exc.value)


# --- item 10: generate's warnings -----------------------------------------------------------------


def test_max_tokens_beyond_the_context_is_warned(
    demo_ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = ",".join(["5"] * 1020)  # grok-demo holds 1024 tokens
    run = cli(capsys, "generate", "-c", str(demo_ckpt), "--token-ids", ids, "-n", "10", "--json")
    assert run.code == 0, run.err
    assert "grokctl: warning: --max-tokens 10 exceeds what the context allows" in run.err
    assert "at most 4 new tokens" in run.err
    row = json.loads(run.out)
    assert row["finish_reason"] == "context" and row["generated_tokens"] == 4


# --- item 11: help and completion -----------------------------------------------------------------


def test_help_lists_existing_commands_and_completion_is_available(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run = cli(capsys, "--help")
    assert run.code == 0
    from grokctl.cli.app import COMMAND_MODULES

    # The commands panel lists exactly the registered commands, and the text names no other.
    registered = {m.replace("_", "-") for m in COMMAND_MODULES}
    listed = set(re.findall(r"^│ ([a-z][a-z-]+)\s{2,}", run.out, re.M))
    assert listed == registered, listed
    for word in re.findall(r"grokctl ([a-z][a-z-]+)", run.out):
        assert word in registered, word
    assert "--install-completion" in run.out
    # The script the shell sources (as `--show-completion` prints it, without detecting the
    # shell from the process tree, which fails when no shell is an ancestor of the test run).
    monkeypatch.setenv("_GROKCTL_COMPLETE", "source_bash")
    run = cli(capsys)
    assert run.code == 0 and "complete" in run.out and "grokctl" in run.out


# --- item 7: Ctrl-C -------------------------------------------------------------------------------


@pytest.fixture
def stalled_hub(tmp_path: Path, grok1_tokenizer: Path) -> Iterator[tuple[HubServer, str]]:
    from grokctl.checkpoint.xai.writer import write_random_checkpoint
    from grokctl.config import preset

    repo = write_random_checkpoint(tmp_path / "repo", preset("grok-tiny"), seed=1, tokenizer=False)
    with HubServer(repo) as server:
        big = max(repo.rglob("tensor*"), key=lambda p: p.stat().st_size)
        name = big.relative_to(repo).as_posix()
        server.stall[name] = big.stat().st_size // 2  # goes silent mid-body, never closes
        yield server, name


def _sigint_when(proc: subprocess.Popen[str], ready: Any, limit: float = 120) -> None:
    deadline = time.monotonic() + limit
    while not ready():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "never reached the point to interrupt"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)


def test_ctrl_c_during_a_stalled_download_exits_130_at_once(
    stalled_hub: tuple[HubServer, str], tmp_path: Path
) -> None:
    server, name = stalled_hub
    dest = tmp_path / "dl"
    env = {**os.environ, "HF_ENDPOINT": server.url, "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_TOKEN", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "grokctl", "download", "--dir", str(dest), "--no-tokenizer",
         "--timeout", "300"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip

    def stalled() -> bool:
        parts = list((dest / ".grokctl-partial").rglob("*.part")) if dest.exists() else []
        return any(p.stat().st_size >= server.stall[name] for p in parts)

    _sigint_when(proc, stalled)
    try:  # the read timeout is 300 s: only the cancellation can end it this soon
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"still running 60 s after Ctrl-C; stderr: {err!r}") from None
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("grokctl: error: interrupted"), err
    assert "run the same command to resume" in lines[0]  # stopped by itself, part files kept
    assert Manifest.load(dest) is not None
    assert not (dest / name).exists()


def test_ctrl_c_during_generation_prints_what_it_has(demo_ckpt: Path, tmp_path: Path) -> None:
    out_path = tmp_path / "out.txt"
    with out_path.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "grokctl", "generate", "-c", str(demo_ckpt), "-p", "Once upon",
             "-n", "1000", "--stream", "--temperature", "0.8"],
            env={**os.environ}, stdout=out, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        _sigint_when(proc, lambda: out_path.stat().st_size > 20)
        try:
            _, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
    assert proc.returncode == 130, err
    text = out_path.read_text()
    assert text.endswith("\n") and text.count("\n") >= 1
    assert "finish: interrupted" in err
    assert err.strip().splitlines()[-1] == "grokctl: error: interrupted"
    assert "Traceback" not in err


def test_cancel_wakes_a_transfer_blocked_on_a_stalled_server(
    stalled_hub: tuple[HubServer, str], tmp_path: Path
) -> None:
    """The library path under the Ctrl-C above: a worker thread blocked reading a silent
    server (read timeout 300 s) returns promptly once `cancel` is set, keeping its part file."""
    import threading

    from huggingface_hub.utils import get_session

    from grokctl.fetch.http import Cancelled, Transfer, transfer

    server, name = stalled_hub
    size = (server.root / name).stat().st_size
    url = f"{server.url}/{server.repo}/resolve/main/{name}"
    part = tmp_path / "x.part"
    t = Transfer(name, url, tmp_path / "x", part, size)
    cancel = threading.Event()
    outcome: list[BaseException] = []

    def work() -> None:
        try:
            transfer(t, get_session(), retries=0, timeout=300, cancel=cancel)
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
            outcome.append(exc)

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    deadline = time.monotonic() + 60
    while not (part.exists() and part.stat().st_size >= server.stall[name]):
        assert time.monotonic() < deadline and worker.is_alive(), outcome
        time.sleep(0.05)
    cancel.set()
    worker.join(timeout=10)
    assert not worker.is_alive(), "the transfer did not notice the cancellation"
    assert len(outcome) == 1 and isinstance(outcome[0], Cancelled)
    assert part.stat().st_size == server.stall[name] and not (tmp_path / "x").exists()


REPO = Path(__file__).resolve().parents[1]


def _python(code: str, **kw: Any) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", code],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        **kw,
    )


def test_ctrl_c_during_start_up_is_one_line() -> None:
    """Ctrl-C while `python -m grokctl` imports its modules: one line, exit 130, no traceback."""
    code = (
        "import builtins, runpy, sys\n"
        "real = builtins.__import__\n"
        "def imp(name, *a, **k):\n"
        "    if name == 'typer':\n"
        "        raise KeyboardInterrupt  # as if Ctrl-C arrived while typer loads\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = imp\n"
        "sys.argv = ['grokctl', '--help']\n"
        "runpy.run_module('grokctl', run_name='__main__')\n"
    )
    proc = _python(code)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err == "grokctl: error: interrupted\n" and out == ""


def test_ctrl_c_while_stuck_in_a_c_call_ends_within_the_grace_time() -> None:
    """The main thread inside a long call that never returns to Python (as an XLA compile):
    the watchdog ends the process with one line and exit 130."""
    code = (
        "import hashlib\n"
        "from grokctl.cli.app import _InterruptWatchdog\n"
        "with _InterruptWatchdog():\n"
        "    print('ready', flush=True)\n"
        "    hashlib.pbkdf2_hmac('sha256', b'x', b'y', 2 * 10**9)  # minutes in C, no signal checks\n"
        "print('not reached')\n"
    )
    proc = _python(code)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)  # the C call alone would take minutes
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert err.strip() == "grokctl: error: interrupted" and "not reached" not in out


def test_compiling_status_on_a_terminal(
    demo_ckpt: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a terminal (stderr), "compiling..." stands until the first token, not silence."""
    from grokctl.cli import output

    monkeypatch.setattr(output.err, "_force_terminal", True)  # stderr as a terminal
    monkeypatch.setattr(output.err, "is_interactive", True)
    run = cli(capsys, "generate", "-c", str(demo_ckpt), "--token-ids", "5,6", "-n", "2")
    assert run.code == 0, run.err
    assert "compiling..." in run.err and "ready" not in run.err
    assert run.out.strip() == run.out.strip().split("\n")[-1]  # the ids, one line
