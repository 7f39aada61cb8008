"""`grokctl verify` and the built-in release layout: real checkpoints in the released format,
damaged the ways downloads get damaged (a flipped byte, a truncated file, a missing file)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from grokctl.checkpoint.layout import param_specs
from grokctl.checkpoint.xai.sizes import (
    GROK1_FILE_COUNT,
    GROK1_SIZES,
    GROK1_TOTAL_BYTES,
    expected_files,
    tensor_file_size,
    write_sparse_checkpoint,
)
from grokctl.checkpoint.xai.writer import dumps_tensor
from grokctl.cli.app import main
from grokctl.config import preset
from grokctl.verify import verify_checkpoint
from tests.helpers import HEADERS_READ_LIMIT, bytes_read, flip_byte, write_manifest

NORM = "ckpt-0/tensor00001_000"  # language_model/rms_norm/scale: float32 [emb]
EMB = "ckpt-0/tensor00000_000"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from grokctl.checkpoint.xai.writer import write_random_checkpoint

    return write_random_checkpoint(
        tmp_path_factory.mktemp("v") / "ck", preset("grok-tiny"), seed=0, tokenizer=False
    )


@pytest.fixture
def ckpt(pristine: Path, tmp_path: Path) -> Path:
    """A fresh copy to damage."""
    return Path(shutil.copytree(pristine, tmp_path / "ck"))


def with_manifest(root: Path) -> Path:
    write_manifest(root)
    return root


def verify_json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict]:
    code = main(["verify", *args, "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out)


# --- the built-in layout --------------------------------------------------------------------------


def test_grok1_layout_is_the_published_one() -> None:
    sizes = expected_files(preset("grok-1"))
    assert len(sizes) == GROK1_FILE_COUNT == 770
    assert sum(sizes.values()) == GROK1_TOTAL_BYTES == 318_239_886_140
    by_kind: dict[str, set[int]] = {}
    for spec in param_specs(preset("grok-1")):
        name = spec.name.replace("multi_head_attention", "attention")
        kind = {
            "language_model/in_out_embed/embeddings": "embeddings",
            "language_model/rms_norm/scale": "final_norm",
        }.get(name)
        if kind is None:
            kind = name.split("/", 2)[2].removesuffix("/w").removesuffix("/scale")
            kind = "rms_norm" if kind.startswith("rms_norm") else kind
        by_kind.setdefault(kind, set()).add(tensor_file_size(spec))
    assert {k: v.pop() for k, v in by_kind.items() if len(v) == 1} == GROK1_SIZES


@pytest.mark.parametrize("name", ["grok-tiny", "grok-demo"])
def test_layout_sizes_match_the_writer(name: str, tmp_path: Path) -> None:
    from grokctl.checkpoint.xai.writer import write_random_checkpoint

    root = write_random_checkpoint(tmp_path / name, preset(name), seed=3, tokenizer=False)
    sizes = expected_files(preset(name))
    assert {p: (root / p).stat().st_size for p in sizes} == sizes


def test_layout_sizes_match_the_released_fixture(grok_tiny: Path) -> None:
    sizes = expected_files(preset("grok-tiny"))
    assert {p: (grok_tiny / p).stat().st_size for p in sizes} == sizes


def sparse_files_supported(directory: Path) -> bool:
    probe = directory / "probe"
    with open(probe, "wb") as fh:
        fh.seek(1 << 30)
        fh.write(b"x")
    sparse = probe.stat().st_blocks * 512 < 1 << 20
    probe.unlink()
    return sparse


def test_the_full_grok1_layout_is_checked_in_seconds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """770 files, 318 GB apparent (sparse zeros): sizes and structure of the real layout."""
    if not sparse_files_supported(tmp_path):
        pytest.skip("this filesystem has no sparse files")
    root = write_sparse_checkpoint(tmp_path / "grok-1", preset("grok-1"))
    before = bytes_read()
    code, report = verify_json(capsys, str(root))
    after = bytes_read()
    assert code == 0 and report["files"] == 770 and report["bytes"] == GROK1_TOTAL_BYTES
    assert report["checks"]["structure"] == "ok (770 tensors match grok-1)"
    if before is not None and after is not None:  # sizes and headers: not the 318 GB of data
        assert after - before < HEADERS_READ_LIMIT, after - before
    (root / "ckpt-0" / "tensor00400_000").unlink()
    with open(root / "ckpt-0" / "tensor00769_000", "r+b") as fh:
        fh.truncate(GROK1_SIZES["router"] - 1)  # the last file (a router) one byte short
    code, report = verify_json(capsys, str(root))
    assert code == 3
    assert [f["path"] for f in report["missing"]] == ["ckpt-0/tensor00400_000"]
    assert [f["path"] for f in report["corrupt"]] == ["ckpt-0/tensor00769_000"]


# --- verify -------------------------------------------------------------------------------------


def test_intact_checkpoint_passes_without_a_manifest(
    ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, report = verify_json(capsys, str(ckpt))
    assert code == 0 and report["ok"] and report["mode"] == "layout"
    assert report["files"] == 26 and report["checks"]["structure"].startswith("ok (26 tensors")
    assert main(["verify", str(ckpt / "ckpt-0")]) == 0  # ckpt-0/ itself is accepted too
    assert "OK" in capsys.readouterr().out


def test_layout_finds_missing_and_truncated_files(
    ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (ckpt / "ckpt-0" / "tensor00007_000").unlink()
    with open(ckpt / EMB, "r+b") as fh:
        fh.truncate(1000)
    code, report = verify_json(capsys, str(ckpt))
    assert code == 3 and not report["ok"]
    assert [f["path"] for f in report["missing"]] == ["ckpt-0/tensor00007_000"]
    assert [(f["path"], f["kind"]) for f in report["corrupt"]] == [(EMB, "size")]
    assert "truncated: 1000 bytes" in report["corrupt"][0]["detail"]


def test_manifest_catches_one_flipped_byte(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with_manifest(ckpt)
    code, report = verify_json(capsys, str(ckpt))
    assert code == 0 and report["mode"] == "manifest" and report["bytes_hashed"] > 0
    assert report["hash_gb_per_s"] > 0
    flip_byte(ckpt / EMB)  # inside the array data: sizes and structure still fine
    code, report = verify_json(capsys, str(ckpt))
    assert code == 3
    assert [(f["path"], f["kind"]) for f in report["corrupt"]] == [(EMB, "sha256")]
    assert report["checks"]["sizes"].startswith("ok") and report["checks"]["structure"].startswith(
        "ok"
    )
    code, report = verify_json(capsys, str(ckpt), "--quick")  # no hashing: not caught
    assert code == 0 and report["checks"]["sha256"].startswith("skipped")


def test_manifest_reports_missing_truncated_and_unexpected(
    ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with_manifest(ckpt)
    (ckpt / "config.json").unlink()
    with open(ckpt / NORM, "r+b") as fh:
        fh.truncate(100)
    (ckpt / "ckpt-0" / "tensor00026_000").write_bytes(b"stray")
    code = main(["verify", str(ckpt), "--preset", "grok-tiny"])
    cap = capsys.readouterr()
    assert code == 3
    assert "missing     config.json" in cap.out
    assert f"corrupt     {NORM}: truncated: 100 bytes" in cap.out
    assert "unexpected  ckpt-0/tensor00026_000 (5 bytes)" in cap.out
    assert cap.err.strip() == f"grokctl: error: {ckpt}: 1 missing, 1 corrupt file(s)"


def test_structure_check_refuses_wrong_shapes_and_unsafe_pickles(
    ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (ckpt / NORM).write_bytes(dumps_tensor(np.ones((64, 2), np.float32)))  # [128] expected
    evil = b"cos\nsystem\n(S'echo pwned'\ntR."
    (ckpt / "ckpt-0" / "tensor00013_000").write_bytes(evil)
    with_manifest(ckpt)  # a manifest cannot vouch for the structure
    code, report = verify_json(capsys, str(ckpt))
    assert code == 3
    bad = {f["path"]: f["detail"] for f in report["corrupt"] if f["kind"] == "structure"}
    assert "shape [64, 2], expected [128]" in bad[NORM]
    assert "refused unsafe pickle: global os.system" in bad["ckpt-0/tensor00013_000"]


def test_deep_scan_finds_nan(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    norm = np.full(128, np.nan, np.float32)
    (ckpt / NORM).write_bytes(dumps_tensor(norm))  # same shape, same size
    assert verify_json(capsys, str(ckpt))[0] == 0  # sizes and structure cannot see it
    code, report = verify_json(capsys, str(ckpt), "--deep")
    assert code == 3 and report["corrupt"] == [
        {"path": NORM, "kind": "nonfinite", "detail": "128 NaN/Inf values"}
    ]


def test_torrent_pieces_catch_a_flipped_byte(
    ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("libtorrent")
    from hub_server import make_torrent  # tests/ is on sys.path under pytest

    (ckpt / "grokctl.torrent").write_bytes(make_torrent(ckpt))
    code, report = verify_json(capsys, str(ckpt), "--torrent")
    assert code == 0 and report["pieces_checked"] > 0 and report["pieces_failed"] == 0
    flip_byte(ckpt / EMB, 100_000)  # no manifest: sizes cannot see it (a piece inside EMB)
    code, report = verify_json(capsys, str(ckpt), "--torrent")
    assert code == 3 and report["pieces_failed"] == 1
    assert [(f["path"], f["kind"]) for f in report["corrupt"]] == [(EMB, "pieces")]
    (ckpt / "grokctl.torrent").unlink()
    assert main(["verify", str(ckpt), "--torrent"]) == 2  # no torrent to check against


def test_library_reports_every_problem_at_once(ckpt: Path) -> None:
    for i in (3, 4, 5):
        (ckpt / "ckpt-0" / f"tensor0000{i}_000").unlink()
    report = verify_checkpoint(ckpt)
    assert not report.ok and len(report.missing) == 3 and report.to_json()["ok"] is False


def test_missing_directory_is_exit_4(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(tmp_path / "nope")]) == 4
    assert "checkpoint directory not found" in capsys.readouterr().err
