"""`grokctl generate` end to end on a random checkpoint in the released format."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_settings_cli import cli  # tests/ is on sys.path under pytest

from tests.helpers import grokctl, one_line_error

PROMPT = "The answer to life the universe and everything is"


@pytest.fixture(scope="module")
def greedy(demo_ckpt: Path) -> dict:
    run = grokctl("generate", "-c", str(demo_ckpt), "-p", PROMPT, "-n", "12", "--json")
    assert run.code == 0, run.err
    (row,) = run.json_lines()
    return row


def test_json_result_fields(greedy: dict) -> None:
    assert greedy["prompt"] == PROMPT
    assert greedy["finish_reason"] == "length"
    assert greedy["generated_tokens"] == len(greedy["token_ids"]) == 12
    assert greedy["prompt_tokens"] > 3
    assert isinstance(greedy["text"], str) and greedy["text"]
    assert greedy["prefill_tokens_per_s"] > 0 and greedy["decode_tokens_per_s"] > 0


def test_plain_output_is_the_text_on_stdout(demo_ckpt: Path, greedy: dict) -> None:
    run = grokctl("generate", "-c", str(demo_ckpt), "-p", PROMPT, "-n", "12")
    assert run.code == 0, run.err
    assert run.out == greedy["text"] + "\n"
    assert "finish: length" in run.err


def test_streaming_writes_the_same_text(demo_ckpt: Path, greedy: dict) -> None:
    run = grokctl("generate", "-c", str(demo_ckpt), "-p", PROMPT, "-n", "12", "--stream")
    assert run.code == 0, run.err
    assert run.out == greedy["text"] + "\n"


def test_stop_string_cuts_the_text(demo_ckpt: Path, greedy: dict) -> None:
    text = greedy["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip()
    run = grokctl(
        "generate", "-c", str(demo_ckpt), "-p", PROMPT, "-n", "12", "--stop", stop, "--json"
    )
    (row,) = run.json_lines()
    assert row["finish_reason"] == "stop"
    assert row["text"] == text[: text.find(stop)]
    assert row["generated_tokens"] < 12


def test_eos_stops_generation(demo_ckpt: Path, greedy: dict, tmp_path: Path) -> None:
    """Make a later greedy token the EOS id (config.json override): generation stops there."""
    toks = greedy["token_ids"]
    k = next(i for i in range(1, len(toks)) if toks[i] not in toks[:i])
    ckpt = tmp_path / "eos"
    shutil.copytree(demo_ckpt, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["eos_token"] = toks[k]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    run = grokctl("generate", "-c", str(ckpt), "-p", PROMPT, "-n", "12", "--json")
    (row,) = run.json_lines()
    assert row["finish_reason"] == "eos"
    assert row["token_ids"] == toks[:k]


def test_batch_equals_single_runs_and_sampling_is_seeded(demo_ckpt: Path, tmp_path: Path) -> None:
    prompts = ["Hello, world!", "Once upon a time there was", "Numbers: 1 2 3"]
    pf = tmp_path / "prompts.txt"
    pf.write_text("\n".join(prompts) + "\n")
    common = [
        "generate",
        "-c",
        str(demo_ckpt),
        "-n",
        "8",
        "--temperature",
        "0.9",
        "--top-p",
        "0.9",
        "--seed",
        "7",
        "--json",
    ]
    batched = grokctl(*common, "--prompts-file", str(pf))
    assert batched.code == 0, batched.err
    rows = batched.json_lines()
    assert [r["prompt"] for r in rows] == prompts
    for r in rows:  # random demo weights are not degenerate: sampling gives varied tokens
        assert len(set(r["token_ids"])) >= 5, r
    alone = grokctl(*common, "-p", prompts[2])
    assert alone.json_lines()[0]["token_ids"] == rows[2]["token_ids"]
    reseeded = grokctl(*common, "-p", prompts[2], "--seed", "8")
    assert reseeded.json_lines()[0]["token_ids"] != rows[2]["token_ids"]


def test_environment_supplies_the_checkpoint(demo_ckpt: Path) -> None:
    run = grokctl(
        "generate",
        "--token-ids",
        "5,6,7",
        "-n",
        "3",
        "--json",
        env={"GROKCTL_CHECKPOINT": str(demo_ckpt)},
    )
    assert run.code == 0, run.err
    assert run.json_lines()[0]["generated_tokens"] == 3


@pytest.mark.parametrize(
    "args, code, needle",
    [
        (["--token-ids", "1,2"], 2, "no checkpoint"),
        (["-c", "{ckpt}", "--token-ids", "1,x"], 2, "--token-ids"),
        (["-c", "{ckpt}", "--token-ids", "1", "--temperature", "-1"], 2, "--temperature"),
        (["-c", "{ckpt}", "--token-ids", "1", "--top-p", "1.5"], 2, "--top-p"),
        (["-c", "{ckpt}", "--token-ids", "1", "--bogus"], 2, "--bogus"),
        (["-c", "{ckpt}"], 2, "no prompt"),
        (["-c", "{ckpt}", "--token-ids", "1", "--mesh", "3x5"], 2, "--mesh"),
        (["-c", "{ckpt}", "--token-ids", "1", "--moe", "magic"], 2, "magic"),
        (["-c", "{ckpt}", "--token-ids", "1,99999"], 2, "99999"),
        (["-c", "/nonexistent/ckpt", "--token-ids", "1"], 4, "/nonexistent/ckpt"),
        (["-c", "{ckpt}", "--prompts-file", "/nonexistent/p.txt"], 4, "/nonexistent/p.txt"),
    ],
)
def test_user_errors_are_one_line_with_exit_code(
    demo_ckpt: Path,
    args: list[str],
    code: int,
    needle: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for var in ("GROKCTL_CHECKPOINT", "GROKCTL_CONFIG", "GROKCTL_MESH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(demo_ckpt)  # no grokctl.toml here
    run = cli(capsys, "generate", *[a.replace("{ckpt}", str(demo_ckpt)) for a in args])
    assert run.code == code, run.err
    assert needle in run.error_line()


def test_prompt_longer_than_context_is_an_error_not_truncation(demo_ckpt: Path) -> None:
    ids = ",".join(["5"] * 1024)  # grok-demo context is 1024 tokens
    run = grokctl("generate", "-c", str(demo_ckpt), "--token-ids", ids, "-n", "1")
    assert run.code == 2
    line = one_line_error(run)
    assert "1024 tokens" in line and "never truncated" in line
    assert "loaded" not in run.err  # refused before any weight was loaded


def test_missing_tokenizer_is_reported(demo_ckpt: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "notok"
    shutil.copytree(demo_ckpt, ckpt)
    (ckpt / "tokenizer.model").unlink()
    run = grokctl("generate", "-c", str(ckpt), "-p", "hi")
    assert run.code == 4
    assert "--tokenizer" in one_line_error(run)
    ok = grokctl("generate", "-c", str(ckpt), "--token-ids", "5,6", "-n", "2", "--json")
    assert ok.code == 0 and ok.json_lines()[0]["text"] is None


def test_streaming_never_prints_the_stop_string(demo_ckpt: Path, greedy: dict) -> None:
    text = greedy["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    run = grokctl(
        "generate", "-c", str(demo_ckpt), "-p", PROMPT, "-n", "12", "--stop", stop, "--stream"
    )
    assert run.code == 0, run.err
    assert run.out == text[: text.find(stop)] + "\n"
