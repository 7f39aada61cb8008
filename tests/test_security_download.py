"""No write outside the target directory, ever: a hostile hub listing, torrent or manifest naming
`..`, an absolute path, a path through a symlink or a name with control characters is refused
before any byte is written (exit 3 naming the entry, escaped), and the manifest never records it.
The real loopback hub (tests/hub_server.py), the real huggingface_hub client, the real CLI."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hub_server import HubServer  # tests/ is on sys.path under pytest

from grokctl.cli.app import main
from grokctl.errors import IntegrityError
from grokctl.fetch.common import matches, select
from grokctl.fetch.manifest import MANIFEST_NAME, Manifest
from grokctl.paths import check_relative_path, shown

PAYLOAD = b"written by a hostile mirror\n"


@pytest.fixture(scope="module")
def repo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from grokctl.checkpoint.xai.writer import write_random_checkpoint
    from grokctl.config import preset

    return write_random_checkpoint(
        tmp_path_factory.mktemp("hub") / "repo", preset("grok-tiny"), seed=0, tokenizer=False
    )


@pytest.fixture
def hub(repo_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[HubServer]:
    with HubServer(repo_dir) as server:
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        for var in ("HF_TOKEN", "HF_HUB_OFFLINE", "GROKCTL_CHECKPOINT", "GROKCTL_CONFIG"):
            monkeypatch.delenv(var, raising=False)
        yield server


def files_under(path: Path) -> set[str]:
    return {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}


def HOSTILE(tmp_path: Path) -> list[str]:  # noqa: N802
    return [
        "ckpt-0/../../pwned.txt",  # lands next to tmp_path: outside the test's directory
        str(tmp_path / "abs-pwned.txt"),
        "ckpt-0/evil\x1b[2J\rgrokctl: ok: all good",
    ]


@pytest.mark.parametrize("which", [0, 1, 2])
def test_a_hostile_hub_entry_is_refused_before_any_byte_is_written(
    hub: HubServer, tmp_path: Path, capsys: pytest.CaptureFixture[str], which: int
) -> None:
    name = HOSTILE(tmp_path)[which]
    hub.extra[name] = PAYLOAD
    outside_before = files_under(tmp_path.parent)
    dest = tmp_path / "dl"
    code = main(["download", "--dir", str(dest), "--no-tokenizer"])  # default include ckpt-0/*
    err = capsys.readouterr().err
    assert code == 3, err
    line = err.strip()
    assert line.count("\n") == 0 and line.startswith("grokctl: error:")
    assert shown(name) in line and "refused hub entry" in line
    assert "\x1b" not in line and "\r" not in line  # escaped, never interpreted
    # Nothing written anywhere (huggingface_hub's own HF_HOME aside): no manifest record either.
    hf_home = f"{tmp_path.name}/hf-home/"
    new = {p for p in files_under(tmp_path.parent) - outside_before if not p.startswith(hf_home)}
    assert new == set()
    assert not (tmp_path.parent / "pwned.txt").exists()
    assert not (tmp_path / "abs-pwned.txt").exists()
    assert not dest.exists() or files_under(dest) == set()
    assert Manifest.load(dest) is None


def test_the_default_include_does_not_cross_directories() -> None:
    assert matches("ckpt-0/tensor00000_000", "ckpt-0/*")
    assert not matches("ckpt-0/../../x", "ckpt-0/*")
    assert not matches("ckpt-0/sub/x", "ckpt-0/*")
    assert matches("ckpt-0/sub/x", "ckpt-0/**")
    assert select(["ckpt-0/a", "ckpt-0/../../b", "c"], ["ckpt-0/*"], []) == ["ckpt-0/a"]
    # a pattern without `/` is a file name at any depth, as before
    assert select(["a/x.json", "a/y"], ["*.json"], []) == ["a/x.json"]


def test_a_symlink_in_the_target_dir_cannot_lead_a_download_outside(
    hub: HubServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`<dir>/ckpt-0` planted as a symlink to elsewhere: the hub's (innocent) names would land
    outside the directory through it."""
    dest, elsewhere = tmp_path / "dl", tmp_path / "elsewhere"
    dest.mkdir()
    elsewhere.mkdir()
    (dest / "ckpt-0").symlink_to(elsewhere)
    code = main(["download", "--dir", str(dest), "--no-tokenizer"])
    err = capsys.readouterr().err
    assert code == 3 and "resolves outside the directory" in err
    assert files_under(elsewhere) == set() and Manifest.load(dest) is None


def test_a_manifest_naming_paths_outside_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Offline mode works from the manifest alone: its names are checked like a listing's."""
    dest = tmp_path / "dl"
    dest.mkdir()
    (tmp_path / "secret").write_bytes(b"x" * 10)
    for bad in ("../secret", str(tmp_path / "secret"), "a//b", "ckpt-0\\..\\x", "x\x00y"):
        data = {"format": "grokctl-manifest/1", "files": {bad: {"size": 10, "sha256": None}}}
        (dest / MANIFEST_NAME).write_text(json.dumps(data))
        with pytest.raises(IntegrityError, match="refused grokctl-manifest.json entry"):
            Manifest.load(dest)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        assert main(["download", "--dir", str(dest), "--no-tokenizer", "--include", "*"]) == 3
        assert "refused grokctl-manifest.json entry" in capsys.readouterr().err
    # and a record can never be added under such a name
    with pytest.raises(IntegrityError):
        Manifest(dest).record("../x", None)  # type: ignore[arg-type]


def test_the_validator_refuses_every_unsafe_form(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "other").mkdir()
    os.symlink(tmp_path / "other", tmp_path / "out" / "link")
    for bad, why in [
        ("../x", "'..' component"),
        ("a/../../x", "'..' component"),
        ("./x", "'.' component"),
        ("/etc/passwd", "absolute path"),
        ("C:x", "drive letter"),
        ("a\\b", "backslash"),
        ("a//b", "empty component"),
        ("a/", "empty component"),
        ("", "empty path"),
        ("a\nb", "control"),
        ("a\u202eb", "control or invisible"),  # right-to-left override
        ("x" * 256, "longer than 255 bytes"),
        ("link/x", "resolves outside"),
    ]:
        with pytest.raises(IntegrityError, match=why):
            check_relative_path(bad, tmp_path / "out")
    assert check_relative_path("ckpt-0/tensor00000_000", tmp_path) == "ckpt-0/tensor00000_000"


def test_shown_escapes_and_cuts() -> None:
    assert shown("a\x1b[31mb\nc") == "a\\x1b[31mb\\x0ac"
    assert len(shown("x" * 10_000)) == 121 and shown("x" * 10_000).endswith("…")
    assert shown("tensor00000_000") == "tensor00000_000"


def test_a_torrent_name_outside_the_directory_is_refused(tmp_path: Path) -> None:
    """libtorrent sanitises `..` out of a torrent's paths; whatever its file list says still
    passes the same gate before a byte is written (here: a `..` built into the name itself and
    a path through a planted symlink)."""
    lt = pytest.importorskip("libtorrent")
    from grokctl.fetch.manifest import Manifest
    from grokctl.fetch.torrent import TorrentOptions, download_magnet

    src = tmp_path / "grok-1" / "ckpt-0"
    src.mkdir(parents=True)
    (src / "tensor00000_000").write_bytes(b"0" * 20000)
    info = {
        b"name": b"grok-1",
        b"piece length": 16384,
        b"pieces": b"\0" * 40,
        b"files": [{b"length": 20000, b"path": [b"ckpt-0", b"..", b"..", b"..", b"pwned.txt"]}],
    }
    crafted = tmp_path / "crafted.torrent"
    crafted.write_bytes(lt.bencode({b"info": info}))
    paths = [
        lt.torrent_info(str(crafted)).layout().file_path(i)
        for i in range(lt.torrent_info(str(crafted)).layout().num_files())
    ]
    dest = tmp_path / "dl"
    if any(".." in p.split(os.sep) for p in paths):  # not sanitised: the gate must stop it
        with pytest.raises(IntegrityError, match="refused torrent file"):
            download_magnet(str(crafted), dest, Manifest(dest), TorrentOptions(dht=False))
    # A symlink planted in the target directory: the torrent's innocent names lead outside.
    from hub_server import make_torrent

    good = tmp_path / "good.torrent"
    good.write_bytes(make_torrent(tmp_path / "grok-1"))
    dest.mkdir(exist_ok=True)
    (tmp_path / "elsewhere").mkdir()
    (dest / "ckpt-0").symlink_to(tmp_path / "elsewhere")
    opts = TorrentOptions(dht=False, trackers=False, listen="127.0.0.1:0")
    with pytest.raises(IntegrityError, match="refused torrent file .*resolves outside"):
        download_magnet(str(good), dest, Manifest(dest), opts)
    assert files_under(tmp_path / "elsewhere") == set()
    assert Manifest.load(dest) is None and not (dest / "grokctl.torrent").exists()
