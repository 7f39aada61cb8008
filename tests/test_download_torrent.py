"""`grokctl download --magnet`: a real libtorrent seeder on 127.0.0.1 and a magnet download from
it with trackers and DHT off (nothing leaves the loopback interface)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hub_server import LOOPBACK_SETTINGS, Seeder  # tests/ is on sys.path under pytest

from grokctl.cli.app import main
from grokctl.fetch.common import PARTIAL_DIR
from grokctl.fetch.manifest import Manifest
from grokctl.fetch.pieces import relative_path
from grokctl.fetch.torrent import TORRENT_NAME, parse_peer

lt = pytest.importorskip("libtorrent")


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkpoint the torrent carries: `grok-1/{ckpt-0/..., config.json}`."""
    from grokctl.checkpoint.xai.writer import write_random_checkpoint
    from grokctl.config import preset

    return write_random_checkpoint(
        tmp_path_factory.mktemp("bt") / "grok-1", preset("grok-tiny"), seed=1, tokenizer=False
    )


@pytest.fixture(scope="module")
def seeder(source: Path) -> Iterator[Seeder]:
    s = Seeder(source)
    yield s
    s.close()


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    for var in ("GROKCTL_CHECKPOINT", "GROKCTL_CONFIG", "GROKCTL_MAGNET", "GROKCTL_LISTEN"):
        monkeypatch.delenv(var, raising=False)


def loopback(seeder: Seeder, *extra: str) -> list[str]:
    """Options for a transfer that stays on 127.0.0.1: the seeder as the only peer."""
    include = [] if "--include" in extra else ["--include", "ckpt-0,config.json"]
    return [
        "--peer", seeder.peer, "--no-dht", "--no-trackers", "--listen", "127.0.0.1:0",
        "--timeout", "30", "--no-tokenizer", *include, *extra,
    ]  # fmt: skip


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def same_tree(dest: Path, source: Path) -> None:
    for f in source.rglob("*"):
        if f.is_file():
            assert (dest / f.relative_to(source)).read_bytes() == f.read_bytes(), f


def test_magnet_download_verifies_and_leaves_a_manifest(
    seeder: Seeder,
    source: Path,
    tmp_path: Path,
    grok1_tokenizer: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    dest = tmp_path / "dl"
    args = [a for a in loopback(seeder) if a != "--no-tokenizer"]
    args += ["--tokenizer-from", str(grok1_tokenizer)]  # the torrent has no tokenizer
    code, out, _ = run(
        capsys, "download", "--magnet", seeder.magnet, "--dir", str(dest), *args, "--json"
    )
    assert code == 0, out
    result = json.loads(out)
    total = sum(f.stat().st_size for f in source.rglob("*") if f.is_file())
    assert result["info_hash"] == seeder.info_hash and result["bytes"] == total
    assert result["bytes_fetched"] >= total and result["tokenizer"]["action"] == "copied"
    same_tree(dest, source)
    manifest = Manifest.load(dest)
    assert manifest is not None
    src = manifest.sources[f"magnet:{seeder.info_hash}"]
    assert src["info_hash"] == seeder.info_hash and src["torrent"] == TORRENT_NAME
    rec = manifest.files["ckpt-0/tensor00000_000"]
    assert (
        rec.downloaded and rec.sha256_from == "local" and rec.source == f"magnet:{seeder.info_hash}"
    )
    assert (dest / TORRENT_NAME).read_bytes() and not (dest / PARTIAL_DIR).exists()
    code, out, _ = run(capsys, "verify", str(dest), "--torrent", "--json")
    report = json.loads(out)
    assert code == 0 and report["pieces_checked"] == seeder.ti.num_pieces()

    # Again: everything is there; libtorrent re-checks it and fetches nothing.
    code, out, _ = run(
        capsys, "download", seeder.magnet, "--dir", str(dest), *loopback(seeder), "--json"
    )
    assert code == 0 and json.loads(out)["bytes_fetched"] == 0


def test_include_exclude_select_files(
    seeder: Seeder, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "dl"
    args = loopback(seeder, "--include", "ckpt-0/tensor0001*", "--exclude", "*9_000", "--json")
    code, out, _ = run(capsys, "download", seeder.magnet, "--dir", str(dest), *args)
    assert code == 0
    names = sorted(p.relative_to(dest).as_posix() for p in (dest / "ckpt-0").iterdir())
    assert names == [f"ckpt-0/tensor000{i}_000" for i in range(10, 19)]
    assert json.loads(out)["files"] == len(names) == 9


def test_dry_run_fetches_metadata_only(
    seeder: Seeder, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "dl"
    code, out, _ = run(
        capsys,
        "download",
        seeder.magnet,
        "--dir",
        str(dest),
        *loopback(seeder),
        "--dry-run",
        "--json",
    )
    assert code == 0
    plan = json.loads(out)
    assert plan["dry_run"] and plan["files"] == len(plan["listing"]) == 27
    assert not (dest / "ckpt-0").exists() and (dest / TORRENT_NAME).is_file()


def test_interrupted_magnet_download_continues(
    seeder: Seeder, source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "dl"
    total = sum(f.stat().st_size for f in source.rglob("*") if f.is_file())
    seeder.throttle(200_000)  # ~8 s for the whole torrent
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "grokctl", "download", seeder.magnet, "--dir", str(dest),
             *loopback(seeder)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            deadline, got = time.monotonic() + 30, 0
            while time.monotonic() < deadline and got < 300_000:
                time.sleep(0.05)
                # bytes written so far (allocated blocks: libtorrent's files are sparse)
                got = sum(f.stat().st_blocks * 512 for f in dest.rglob("*") if f.is_file())
            assert got >= 300_000, "the transfer never started"
        finally:
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=30)
    finally:
        seeder.throttle(0)
    assert proc.returncode == 130, err
    assert list((dest / PARTIAL_DIR).glob("bt-*.resume")), "no resume data saved"
    for f in (dest / "ckpt-0").rglob("*") if (dest / "ckpt-0").exists() else []:  # all complete
        assert f.read_bytes() == (source / f.relative_to(dest)).read_bytes()

    code, out, _ = run(
        capsys, "download", seeder.magnet, "--dir", str(dest), *loopback(seeder), "--json"
    )
    assert code == 0
    assert json.loads(out)["bytes_fetched"] < total  # continued, not restarted
    same_tree(dest, source)


def test_seed_keeps_serving_after_completion(seeder: Seeder, source: Path, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [a if a != "127.0.0.1:0" else f"127.0.0.1:{port}" for a in loopback(seeder)]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "grokctl",
            "download",
            seeder.magnet,
            "--dir",
            str(tmp_path / "a"),
            *args,
            "--seed",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ},
    )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()  # type: ignore[arg-type]
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any("seeding" in ln for ln in lines):
            time.sleep(0.05)
        assert any("seeding" in ln for ln in lines), lines
        # A second peer that can only reach the grokctl process gets the whole torrent from it.
        leech = lt.session(LOOPBACK_SETTINGS)
        atp = lt.add_torrent_params()
        atp.ti, atp.save_path = seeder.ti, str(tmp_path / "b")
        atp.flags &= ~(lt.torrent_flags.auto_managed | lt.torrent_flags.paused)
        h = leech.add_torrent(atp)
        h.connect_peer(("127.0.0.1", port))
        while time.monotonic() < deadline and not h.status().is_seeding:
            time.sleep(0.05)
        assert h.status().is_seeding
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    assert proc.returncode == 0, lines
    same_tree(tmp_path / "b" / source.name, source)


def test_no_peers_gives_up_after_the_timeout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(
        capsys,
        "download",
        "magnet:?xt=urn:btih:" + "ab" * 20,
        "--dir",
        str(tmp_path),
        "--no-dht",
        "--no-trackers",
        "--listen",
        "127.0.0.1:0",
        "--timeout",
        "1",
    )
    assert code == 1 and "no progress for 1 s while fetching the torrent's metadata" in err


def test_bad_arguments_are_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "download", "--magnet", "--peer", "nohost", "--dir", str(tmp_path))[0] == 2
    assert run(capsys, "download", "magnet:?xt=urn:btih:zz", "--dir", str(tmp_path))[0] == 2
    with pytest.raises(Exception, match="HOST:PORT"):
        parse_peer("1.2.3.4:99999")


def test_torrent_paths_map_under_the_download_directory() -> None:
    assert relative_path("ckpt-0/tensor00000_000") == "ckpt-0/tensor00000_000"
    assert relative_path("grok-1/ckpt-0/tensor00000_000") == "ckpt-0/tensor00000_000"
    assert relative_path("grok-1/tokenizer.model") == "tokenizer.model"
    assert relative_path("single.bin") == "single.bin"
