"""`grokctl download` from a Hugging Face hub: a real loopback server speaking the hub API
(tests/hub_server.py), the real huggingface_hub client, the real CLI entry point."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hub_server import HubServer  # tests/ is on sys.path under pytest

import grokctl
from grokctl.cli.app import main
from grokctl.fetch.common import PARTIAL_DIR, matches, select, split_patterns
from grokctl.fetch.manifest import MANIFEST_NAME, Manifest

BIG = "ckpt-0/tensor00000_000"  # the embeddings: the largest file of the tiny checkpoint


@pytest.fixture(scope="module")
def repo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small checkpoint in the released format, laid out as the hub repo holds it."""
    from grokctl.checkpoint.xai.writer import write_random_checkpoint
    from grokctl.config import preset

    return write_random_checkpoint(
        tmp_path_factory.mktemp("hub") / "repo", preset("grok-tiny"), seed=0, tokenizer=False
    )


@pytest.fixture
def hub(
    repo_dir: Path, grok1_tokenizer: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[HubServer]:
    with HubServer(repo_dir) as server:
        server.raw["tokenizer.model"] = grok1_tokenizer.read_bytes()
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no stored token
        monkeypatch.setenv("GROKCTL_TOKENIZER_URL", server.url + "/raw/tokenizer.model")
        for var in ("HF_TOKEN", "HF_HUB_OFFLINE", "GROKCTL_CHECKPOINT", "GROKCTL_CONFIG"):
            monkeypatch.delenv(var, raising=False)
        yield server


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_final_files_complete(dest: Path, source: Path) -> None:
    """Every file under a final name is byte-identical to the source: nothing partial."""
    for f in dest.rglob("*"):
        rel = f.relative_to(dest).as_posix()
        if f.is_file() and not rel.startswith(PARTIAL_DIR) and rel.startswith("ckpt-0/"):
            assert f.read_bytes() == (source / rel).read_bytes(), f"{rel} is incomplete"


FULL = ("--include", "ckpt-0", "--include", "config.json")


def test_download_writes_files_manifest_and_tokenizer(
    hub: HubServer, repo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "dl"
    code, out, _ = run(capsys, "download", "--dir", str(dest), *FULL, "--json")
    assert code == 0
    result = json.loads(out)
    assert result["commit"] == hub.commit and result["files"] == 27 and result["downloaded"] == 27
    assert result["tokenizer"]["action"] == "downloaded"
    for f in repo_dir.rglob("*"):
        if f.is_file():
            assert (dest / f.relative_to(repo_dir)).read_bytes() == f.read_bytes()
    manifest = Manifest.load(dest)
    assert manifest is not None and len(manifest.files) == 28
    rec = manifest.files[BIG]
    assert rec.sha256 == sha(repo_dir / BIG) and rec.sha256_from == "hub-lfs" and rec.downloaded
    assert manifest.files["config.json"].sha256_from == "local"  # not in LFS: hashed here
    assert manifest.files["tokenizer.model"].sha256_from == "pinned"
    assert manifest.sources[rec.source]["commit"] == hub.commit
    assert not (dest / PARTIAL_DIR).exists()
    assert run(capsys, "verify", str(dest))[0] == 0

    # A second run finds everything present and transfers nothing.
    hub.requests.clear()
    code, out, _ = run(capsys, "download", "--dir", str(dest), *FULL, "--json")
    assert code == 0 and json.loads(out)["downloaded"] == 0
    assert not [r for r in hub.requests if "/resolve/" in r[1] or r[1].startswith("/raw/")]


def test_cut_mid_file_resumes_on_the_next_run(
    hub: HubServer, repo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "dl"
    hub.cut[BIG] = 100_000
    code, _, err = run(capsys, "download", "--dir", str(dest), "--retries", "0", "--no-tokenizer")
    assert code == 1
    assert err.count("\n") == 1 and "run the same command again to resume" in err and BIG in err
    assert not (dest / BIG).exists()  # nothing partial under the final name
    parts = list((dest / PARTIAL_DIR).rglob("*.part"))
    assert len(parts) == 1 and parts[0].stat().st_size == 100_000
    assert_final_files_complete(dest, repo_dir)
    # The manifest already names the file; verify reports it missing.
    assert Manifest.load(dest).files[BIG].downloaded is None  # type: ignore[union-attr]
    code, out, _ = run(capsys, "verify", str(dest), "--preset", "grok-tiny", "--json")
    assert code == 3 and [f["path"] for f in json.loads(out)["missing"]] == [BIG]

    del hub.cut[BIG]
    hub.requests.clear()
    code, out, _ = run(capsys, "download", "--dir", str(dest), "--no-tokenizer", "--json")
    assert code == 0
    result = json.loads(out)
    assert result["downloaded"] == 1 and result["bytes_resumed"] == 100_000
    assert result["bytes_fetched"] == (repo_dir / BIG).stat().st_size - 100_000
    assert ("GET", f"/_lfs/{sha(repo_dir / BIG)}", "bytes=100000-") in hub.requests
    assert (dest / BIG).read_bytes() == (repo_dir / BIG).read_bytes()
    assert run(capsys, "verify", str(dest), "--preset", "grok-tiny")[0] == 0


def test_a_dropped_connection_is_retried_within_the_run(
    hub: HubServer, repo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hub.cut[BIG], hub.cut_once = 50_000, True
    code, out, _ = run(
        capsys, "download", "--dir", str(tmp_path / "dl"), "--no-tokenizer", "--json"
    )
    assert code == 0 and json.loads(out)["downloaded"] == 26
    ranges = [r[2] for r in hub.requests if r[1].startswith("/_lfs/") and r[2]]
    assert ranges == ["bytes=50000-"]
    assert (tmp_path / "dl" / BIG).read_bytes() == (repo_dir / BIG).read_bytes()


def test_killed_download_never_leaves_a_complete_looking_file(
    hub: HubServer, repo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "dl"
    hub.stall[BIG] = 120_000  # the server goes silent mid-file; the process is then killed
    proc = subprocess.Popen(
        [sys.executable, "-m", "grokctl", "download", "--dir", str(dest), "--no-tokenizer"],
        env={**os.environ},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        part = None
        while time.monotonic() < deadline:
            parts = list((dest / PARTIAL_DIR).rglob("*.part")) if dest.exists() else []
            if parts and parts[0].stat().st_size >= 120_000:
                part = parts[0]
                break
            time.sleep(0.05)
        assert part is not None, "the download never reached the stall point"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    assert not (dest / BIG).exists()
    assert_final_files_complete(dest, repo_dir)

    hub.stall.clear()
    code, out, _ = run(capsys, "download", "--dir", str(dest), "--no-tokenizer", "--json")
    assert code == 0 and json.loads(out)["bytes_resumed"] >= 120_000
    assert (dest / BIG).read_bytes() == (repo_dir / BIG).read_bytes()


def test_dry_run_lists_files_and_refuses_when_the_disk_is_too_small(
    hub: HubServer, repo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "dl"
    code, out, _ = run(capsys, "download", "--dir", str(dest), "--dry-run", "--json")
    assert code == 0
    plan = json.loads(out)
    assert plan["files"] == len(plan["listing"]) == 26 and plan["bytes"] == sum(
        f.stat().st_size for f in (repo_dir / "ckpt-0").iterdir()
    )
    assert plan["free_bytes"] > 0 and not dest.exists()
    assert not [r for r in hub.requests if "/resolve/" in r[1]]

    hub.virtual["ckpt-0/tensor99999_000"] = 10**18  # listed, never served
    code, out, err = run(capsys, "download", "--dir", str(dest), "--dry-run")
    assert code == 4 and "not enough disk space" in err and out == ""
    code, _, err = run(capsys, "download", "--dir", str(dest))  # a real run refuses first too
    assert code == 4 and not dest.exists()


def test_hf_token_is_sent(
    hub: HubServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    hub.token = "hf_s3cret"
    code, _, err = run(capsys, "download", "--dir", str(tmp_path / "a"), "--no-tokenizer")
    assert code == 4 and "HF_TOKEN" in err
    monkeypatch.setenv("HF_TOKEN", "hf_s3cret")
    assert run(capsys, "download", "--dir", str(tmp_path / "b"), "--no-tokenizer")[0] == 0


def test_offline_mode_uses_the_manifest_only(
    hub: HubServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    dest = tmp_path / "dl"
    assert run(capsys, "download", "--dir", str(dest))[0] == 0
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.requests.clear()
    assert run(capsys, "download", "--dir", str(dest))[0] == 0
    (dest / BIG).unlink()
    code, _, err = run(capsys, "download", "--dir", str(dest))
    assert code == 4 and "HF_HUB_OFFLINE" in err
    assert hub.requests == []
    code, _, err = run(capsys, "download", "--dir", str(tmp_path / "empty"))
    assert code == 4 and MANIFEST_NAME in err


def test_tokenizer_is_checked_against_its_pinned_sha256(
    hub: HubServer, grok1_tokenizer: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    only = ("--include", "config.json")
    code, out, _ = run(
        capsys,
        "download",
        "--dir",
        str(tmp_path / "a"),
        *only,
        "--tokenizer-from",
        str(grok1_tokenizer),
        "--json",
    )
    assert code == 0 and json.loads(out)["tokenizer"]["action"] == "copied"
    assert not [r for r in hub.requests if r[1].startswith("/raw/")]

    wrong = tmp_path / "wrong.model"
    wrong.write_bytes(b"not a tokenizer")
    code, _, err = run(
        capsys, "download", "--dir", str(tmp_path / "b"), *only, "--tokenizer-from", str(wrong)
    )
    assert code == 3 and "not Grok-1's tokenizer.model" in err

    good = grok1_tokenizer.read_bytes()
    hub.raw["tokenizer.model"] = good[:1000] + bytes([good[1000] ^ 1]) + good[1001:]
    code, _, err = run(capsys, "download", "--dir", str(tmp_path / "c"), *only)
    assert code == 3 and "sha256" in err
    assert not (tmp_path / "c" / "tokenizer.model").exists()


def test_a_file_that_does_not_match_the_hub_checksum_is_refused(
    hub: HubServer, repo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = repo_dir / "ckpt-0" / "tensor00001_000"
    original = target.read_bytes()
    try:
        target.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # served != listed sha256
        code, _, err = run(capsys, "download", "--dir", str(tmp_path / "dl"), "--no-tokenizer")
    finally:
        target.write_bytes(original)
    assert code == 3 and "tensor00001_000" in err and "sha256" in err
    assert not (tmp_path / "dl" / "ckpt-0" / "tensor00001_000").exists()


def test_unknown_revision_and_repo(
    hub: HubServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "download", "--dir", str(tmp_path), "--revision", "v9")
    assert code == 4 and "'v9' not found" in err
    code, _, err = run(capsys, "download", "nobody/nothing", "--dir", str(tmp_path))
    assert code == 4 and "nobody/nothing" in err


def test_include_exclude_patterns(
    hub: HubServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(
        capsys,
        "download",
        "--dir",
        str(tmp_path / "dl"),
        "--no-tokenizer",
        "--include",
        "ckpt-0/tensor0000*",
        "--exclude",
        "*_000",
    )
    assert code == 2 and "matches --include/--exclude" in err
    code, out, _ = run(
        capsys,
        "download",
        "--dir",
        str(tmp_path / "dl"),
        "--no-tokenizer",
        "--include",
        "ckpt-0/tensor0000*",
        "--exclude",
        "ckpt-0/tensor00009_000",
        "--json",
    )
    assert code == 0 and json.loads(out)["files"] == 9
    assert sorted(p.name for p in (tmp_path / "dl" / "ckpt-0").iterdir()) == [
        f"tensor{i:05d}_000" for i in range(9)
    ]


def test_pattern_matching() -> None:
    assert split_patterns(["a,b", " ./c/ ", ""]) == ["a", "b", "c/"]
    assert matches("ckpt-0/tensor00000_000", "ckpt-0/*")
    assert matches("ckpt-0/tensor00000_000", "ckpt-0")  # a bare directory needs no glob
    assert matches("ckpt-0/tensor00000_000", "ckpt-0/")
    assert not matches("ckpt-00/x", "ckpt-0")
    assert not matches("config.json", "ckpt-0/*")
    assert select(["a/x", "a/y", "b/z"], ["a"], ["*y"]) == ["a/x"]
    assert select(["a/x", "b/z"], [], []) == ["a/x", "b/z"]


def test_library_call_without_the_cli(hub: HubServer, repo_dir: Path, tmp_path: Path) -> None:
    """`fetch.download.download` is the whole download: plan, disk check, transfers, tokenizer;
    its hooks report progress and each phase; its record is the CLI's --json."""
    from grokctl.fetch.download import DownloadHooks, DownloadRequest, download

    dest = tmp_path / "lib"
    req = DownloadRequest(
        dest, include=["ckpt-0", "config.json"], tokenizer_url=hub.url + "/raw/tokenizer.model"
    )
    plan = download(DownloadRequest(dest, include=req.include, dry_run=True, tokenizer=False))
    files = sorted(f for f in repo_dir.rglob("*") if f.is_file())
    total = sum(f.stat().st_size for f in files)
    assert plan.dry_run and plan.hub is None and not dest.exists()  # nothing fetched
    assert len(plan.hub_plan.files) == len(files) == 27 and plan.hub_plan.bytes_needed == total

    events: list[tuple[str, object]] = []
    hooks = DownloadHooks(
        progress=lambda desc, done, of: events.append(("progress", (desc, done, of))),
        fetched=lambda res: events.append(("fetched", len(res.hub.downloaded))),
        tokenizer=lambda res: events.append(("tokenizer", res.action)),
    )
    res = download(req, hooks)
    kinds = [k for k, _ in events]
    assert kinds[-2:] == ["fetched", "tokenizer"] and set(kinds[:-2]) == {"progress"}
    assert events[-2][1] == 27 and events[-1][1] == "downloaded"
    last = events[-3][1]
    assert last == ("xai-org/grok-1 27/27 files", total, total), last
    record = res.to_json()
    assert record["downloaded"] == 27 and record["bytes"] == total
    assert record["tokenizer"]["action"] == "downloaded" and record["checkpoint"] == str(dest)
    for f in files:
        assert (dest / f.relative_to(repo_dir)).read_bytes() == f.read_bytes()

    again = grokctl.download(directory=dest, include=req.include, tokenizer=False)  # the API's
    assert again.hub.downloaded == [] and again.tokenizer is None
