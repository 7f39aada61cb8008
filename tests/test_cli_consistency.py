"""One consistent command line (issue 9 §8, §9): help that reads at 80 columns, the checkpoint
named the same way on every command, --json field names that agree, and `inspect` laid out to
the terminal's width without cutting a number. Everything runs in-process through the app."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from grokctl.cli.app import command, main
from grokctl.config import PRESETS

COMMANDS = ["download", "verify", "inspect", "generate", "random-checkpoint"]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- help ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("cmd", ["", *COMMANDS])
def test_help_fits_80_columns(
    cmd: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    code, out, _ = run(capsys, *([cmd] if cmd else []), "--help")
    assert code == 0 and "Usage: grokctl" in out
    long = [line for line in out.splitlines() if len(line) > 80]
    assert not long, long
    for bad in ("<bool>", "<list", "<str>", "<int", "<path>", "<float", "…", "[x>", "Env:"):
        assert bad not in out, (bad, out)
    text = " ".join(re.sub("[│╭╮╰╯─]", " ", out).split())  # the words, whatever the breaks
    if cmd in ("inspect", "generate"):
        assert "[sparse|dense]" in text and "[tensor|expert]" in text
    if cmd in ("verify", "inspect", "generate", "random-checkpoint"):
        assert all(name in text for name in PRESETS), text
    if cmd in ("verify", "inspect", "generate"):  # the checkpoint: positional and -c
        assert "CHECKPOINT" in text and "--checkpoint -c" in text
    if cmd == "generate":
        assert "(0, 1]" in text  # --top-p shows the range it enforces
        assert "default: 64; >= 1; env GROKCTL_MAX_TOKENS" in text


def test_every_option_has_a_plain_metavar() -> None:
    """No option falls back to typer's `<type>` display (checked on the objects themselves)."""
    for name in COMMANDS:
        for param in command().commands[name].params:
            assert param.metavar is not None and "<" not in param.metavar, (name, param.name)


# --- the checkpoint, named the same way everywhere -------------------------------------------------


def test_positional_and_option_name_the_same_checkpoint(
    grok_tiny: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = ("--mesh", "1x2", "--device-memory", "1", "--json")
    a = run(capsys, "inspect", str(grok_tiny), *plan)
    b = run(capsys, "inspect", "-c", str(grok_tiny), *plan)
    c = run(capsys, "inspect", "--checkpoint", str(grok_tiny), str(grok_tiny), *plan)
    assert a[0] == b[0] == c[0] == 0 and a[1] == b[1] == c[1]

    v1 = json.loads(run(capsys, "verify", str(grok_tiny), "--quick", "--json")[1])
    v2 = json.loads(run(capsys, "verify", "-c", str(grok_tiny), "--quick", "--json")[1])
    assert v1["checkpoint"] == v2["checkpoint"] and v1["files"] == v2["files"] == 26


@pytest.mark.parametrize("cmd", ["inspect", "verify", "generate"])
def test_two_different_checkpoints_is_a_usage_error(
    cmd: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, cmd, str(tmp_path / "a"), "-c", str(tmp_path / "b"))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "two checkpoints given" in err


def test_generate_takes_the_checkpoint_positionally_and_batches_as_json_lines(
    demo_ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(
        capsys, "generate", str(demo_ckpt), "--token-ids", "5,6,7", "--token-ids", "9,8",
        "-n", "2", "--json",
    )  # fmt: skip
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 2  # JSON Lines: one object per prompt, one per line
    records = [json.loads(line) for line in lines]
    assert [r["prompt_tokens"] for r in records] == [3, 2]
    assert all(r["generated_tokens"] == len(r["token_ids"]) == 2 for r in records)


# --- --json field names agree ---------------------------------------------------------------------


def _keys(doc: Any) -> set[str]:
    if isinstance(doc, dict):
        return set(doc) | {k for v in doc.values() for k in _keys(v)}
    if isinstance(doc, list):
        return {k for v in doc for k in _keys(v)}
    return set()


def test_json_field_names_agree(
    grok_tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    docs = {
        "inspect": run(capsys, "inspect", str(grok_tiny), "--mesh", "1x1", "--json")[1],
        "verify": run(capsys, "verify", str(grok_tiny), "--quick", "--json")[1],
        "random-checkpoint": run(
            capsys, "random-checkpoint", str(tmp_path / "r"), "--preset", "grok-tiny", "--json"
        )[1],
    }
    parsed = {name: json.loads(text) for name, text in docs.items()}
    for name, doc in parsed.items():
        keys = _keys(doc)
        assert not keys & {"bytes_total", "root", "dir", "location", "path_total"}, name
        assert doc["checkpoint"] is not None, name  # the checkpoint directory, by one name
        if "files" in doc:
            assert isinstance(doc["files"], int), name  # `files` is always a count
    assert parsed["random-checkpoint"]["checkpoint"] == str(tmp_path / "r")


# --- inspect: laid out to the width, never a number cut ------------------------------------------


def _inspect(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, width: int, *argv: str
) -> tuple[str, dict[str, Any]]:
    monkeypatch.setenv("COLUMNS", str(width))
    code, text, _ = run(capsys, "inspect", *argv)
    assert code == 0
    code, doc, _ = run(capsys, "inspect", *argv, "--json")
    assert code == 0
    return text, json.loads(doc)


@pytest.mark.parametrize("width", [60, 200])
def test_inspect_tensors_fit_the_width_and_show_every_number(
    width: int, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = ("--preset", "grok-tiny", "--mesh", "1x2", "--device-memory", "1", "--tensors")
    text, doc = _inspect(capsys, monkeypatch, width, *argv)
    lines = text.splitlines()
    assert "…" not in text and all(len(line) <= width for line in lines), width
    assert len(doc["tensors"]) == 26
    for t in doc["tensors"]:
        # the tensor's record: its name, then (when narrow) the lines of its fields
        start = lines.index(t["name"]) if width < 100 else None
        if start is None:
            record = next(line for line in lines if line.startswith(t["name"] + " "))
        else:
            record = " ".join(lines[start : start + 4])
        for value in (
            f"{t['file_bytes']:,}",
            f"{t['device_bytes']:,}",
            "x".join(map(str, t["shape"])),
            "x".join(map(str, t["shard_shape"])),
            t["file"].rsplit("/", 1)[-1],
        ):
            assert value in record, (t["name"], value, record)
    totals, plan = doc["totals"], doc["plan"]
    for n in (totals["parameters"], totals["bytes_on_disk"], plan["weights"], plan["kv_cache"],
              plan["working_total"], plan["total"], plan["device_memory"]):  # fmt: skip
        assert f"{n:,}" in text, n


def test_inspect_grok1_summary_by_default(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = ("--preset", "grok-1", "--mesh", "1x8", "--device-memory", "80")
    text, doc = _inspect(capsys, monkeypatch, 60, *argv)
    assert all(len(line) <= 60 for line in text.splitlines()) and "…" not in text
    assert "decoder_layer_0" not in text  # the tensor listing is for --tensors
    assert "318,239,886,140" in text and f"{doc['plan']['total']:,}" in text
    assert "verdict: fits" in text


def test_inspect_rules_fit_a_narrow_terminal(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "60")
    code, out, _ = run(capsys, "inspect", "--rules")
    assert code == 0 and "…" not in out
    assert all(len(line) <= 60 for line in out.splitlines())
    assert "multi_head_attention/(query|key|value)/w$" in out.splitlines()


def test_human_results_go_to_stdout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The result on stdout, never on stderr (here random-checkpoint, once stderr-only)."""
    code, out, err = run(capsys, "random-checkpoint", str(tmp_path / "r"), "--preset", "grok-tiny")
    assert code == 0 and out.startswith("wrote 26 tensors") and "wrote" not in err
