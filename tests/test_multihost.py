"""Several hosts through jax.distributed: two real processes over loopback (gloo collectives on
CPU, 4 devices each) give the same greedy tokens and logits as one process with 8 devices, on
every process, printed once."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import grokctl
from grokctl.cli.app import main
from grokctl.model.sharding import make_mesh

GROKCTL = str(Path(sys.executable).with_name("grokctl"))
PROMPTS = ("5,6,7,8,9", "300,2,41")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_two(argv_for: list[list[str]], tmp_path: Path) -> list[subprocess.CompletedProcess[str]]:
    """Start both processes, wait for both (bounded), return their results."""
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        JAX_PLATFORMS="cpu",
        GROKCTL_INIT_TIMEOUT="90",
        PYTHONUNBUFFERED="1",
    )
    procs = [
        subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path
        )
        for argv in argv_for
    ]
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=240)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, r in enumerate(results):
        assert r.returncode == 0, f"process {i} failed:\n{r.stderr[-3000:]}"
    return results


@pytest.mark.slow
def test_cli_two_processes_match_one_and_print_once(
    grok_tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = [
        "generate",
        "--checkpoint",
        str(grok_tiny),
        "--max-tokens",
        "8",
        "--json",
        "--mesh",
        "1x8",
    ]
    for prompt in PROMPTS:
        common += ["--token-ids", prompt]
    assert main(common) == 0  # one process, 8 devices
    single = [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    port = free_port()
    results = run_two(
        [
            [
                GROKCTL,
                *common,
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(i),
            ]
            for i in range(2)
        ],
        tmp_path,
    )
    lines = results[0].stdout.splitlines()
    assert len(lines) == len(PROMPTS), results[0].stdout  # stdout: only the results (no gloo logs)
    multi = [json.loads(line) for line in lines]
    assert results[1].stdout == ""  # printed once, by process 0
    assert [r["token_ids"] for r in multi] == [r["token_ids"] for r in single]
    assert all(len(r["token_ids"]) == 8 for r in multi)


_API_SCRIPT = r"""
import json, sys
import numpy as np
from grokctl import distributed
pid, port, ckpt, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
distributed.initialize(f"127.0.0.1:{port}", 2, pid)
import grokctl
model = grokctl.load_model(ckpt, mesh="1x8")
golden = np.load(f"{ckpt}/golden.npz")
logits = model.logits(golden["tokens_plain"][None])
tokens = [r.token_ids for r in model.generate([[5, 6, 7, 8, 9], [300, 2, 41]], max_tokens=8)]
np.save(f"{out}/logits_{pid}.npy", logits)
print(json.dumps({"tokens": tokens, "bytes_read": model.load_stats.bytes_read,
                  "devices": len(model.mesh.devices.flat), "local": len(model.mesh.local_devices)}))
"""


@pytest.mark.slow
def test_api_results_are_identical_on_every_process(grok_tiny: Path, tmp_path: Path) -> None:
    port = free_port()
    results = run_two(
        [
            [sys.executable, "-c", _API_SCRIPT, str(i), str(port), str(grok_tiny), str(tmp_path)]
            for i in range(2)
        ],
        tmp_path,
    )
    reports = [json.loads(r.stdout.strip().splitlines()[-1]) for r in results]
    logits = [np.load(tmp_path / f"logits_{i}.npy") for i in range(2)]
    assert reports[0]["tokens"] == reports[1]["tokens"]
    np.testing.assert_array_equal(logits[0], logits[1])
    assert all(r["devices"] == 8 and r["local"] == 4 for r in reports)

    # Each process read only its own devices' shards: about half of the model each.
    model = grokctl.load_model(grok_tiny, mesh=make_mesh("1x8"))
    total = model.load_stats.bytes_read
    for r in reports:
        assert 0.45 * total < r["bytes_read"] < 0.55 * total
    assert reports[0]["bytes_read"] + reports[1]["bytes_read"] >= total

    # ... and they agree with one process holding all 8 devices.
    golden = np.load(grok_tiny / "golden.npz")
    single = model.logits(golden["tokens_plain"][None])
    assert np.abs(single - logits[0]).max() <= 0.125
    tokens = [r.token_ids for r in model.generate([[5, 6, 7, 8, 9], [300, 2, 41]], max_tokens=8)]
    assert tokens == reports[0]["tokens"]


# --- settings: flags, GROKCTL_* variables, and failures that stay one line ---------------------


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--coordinator", "127.0.0.1:1234"], {}, "needs --num-processes N and --process-id I"),
        (["--num-processes", "2"], {}, "need --coordinator HOST:PORT"),
        (
            ["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "2"],
            {},
            "must be in 0..1",
        ),
        (
            ["--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"],
            {},
            "expected HOST:PORT",
        ),
        (
            [],
            {"GROKCTL_COORDINATOR": "127.0.0.1:1234", "GROKCTL_NUM_PROCESSES": "2"},
            "--process-id I",
        ),
        ([], {"GROKCTL_NUM_PROCESSES": "two"}, "GROKCTL_NUM_PROCESSES"),
    ],
)
def test_bad_multihost_settings_exit_2(
    grok_tiny: Path,
    argv: list[str],
    env: dict[str, str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(["generate", "--checkpoint", str(grok_tiny), "--token-ids", "1,2", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_unreachable_coordinator_is_one_line_exit_4(
    grok_tiny: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A joining process checks that the coordinator listens (jax.distributed would abort the
    process instead of raising)."""
    monkeypatch.setenv("GROKCTL_INIT_TIMEOUT", "1")
    monkeypatch.setenv("GROKCTL_COORDINATOR", f"127.0.0.1:{free_port()}")
    argv = ["generate", "--checkpoint", str(grok_tiny), "--token-ids", "1,2"]
    assert main([*argv, "--num-processes", "2", "--process-id", "1"]) == 4
    err = capsys.readouterr().err
    assert "nothing listening after 1s" in err and err.count("\n") == 1
