"""Every malformed input maps to its exit code, and `verify` cannot be talked into "ok".

Crafted tensor files (an overflowing dimension, a nesting bomb, a special file, big-endian and
float64 arrays, a global whose name writes a fake status line), crafted `config.json` values and
edited manifests, run through the real app in-process (`inspect`, `verify`, `generate`)."""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from grokctl.checkpoint.xai.safe_pickle import parse_tensor_file
from grokctl.checkpoint.xai.writer import dumps_tensor
from grokctl.cli.app import main
from grokctl.config import preset
from grokctl.errors import IntegrityError
from grokctl.fetch.manifest import MANIFEST_NAME, Manifest
from tests.helpers import flip_byte, write_manifest

NORM = "ckpt-0/tensor00001_000"  # language_model/rms_norm/scale: float32 [128]
EMB = "ckpt-0/tensor00000_000"
SCALES = "ckpt-0/tensor00002_000"  # a QuantizedWeight8bit (int8 weight, bf16 scales)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from grokctl.checkpoint.xai.writer import write_random_checkpoint

    return write_random_checkpoint(
        tmp_path_factory.mktemp("sec") / "ck", preset("grok-tiny"), seed=0, tokenizer=False
    )


@pytest.fixture
def ckpt(pristine: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "ck"))


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def error_line(err: str) -> str:
    """Exactly one `grokctl: error:` line, no traceback, no raw control character."""
    lines = [line for line in err.splitlines() if line.startswith("grokctl: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "\x1b" not in err and "\r" not in err
    return lines[0]


# --- crafted pickles, byte by byte --------------------------------------------------------------


def _u(text: str) -> bytes:
    raw = text.encode()
    return b"\x8c" + bytes([len(raw)]) + raw


def _int(n: int) -> bytes:
    if 0 <= n < 256:
        return b"K" + bytes([n])
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def _shape(dims: tuple[int, ...]) -> bytes:
    return b"(" + b"".join(_int(d) for d in dims) + b"t"


def _data(n: int) -> bytes:
    return (b"C" + bytes([n]) if n < 256 else b"B" + struct.pack("<I", n)) + bytes(n)


def array_pickle(
    shape: bytes, code: str = "f4", order: str = "<", nbytes: int = 512, glob: str = "dtype"
) -> bytes:
    """`numpy._core.multiarray._reconstruct(ndarray, (0,), b'b')` built with `shape` (raw pickle
    bytes pushing the shape), a dtype `code`/byte `order` and `nbytes` of zeros as its data."""
    dtype = (
        _u("numpy") + _u(glob) + b"\x93" + _u(code) + b"\x89\x88\x87R"
        b"(" + _int(3) + _u(order) + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xff" + _int(0) + b"tb"
    )
    return (
        b"\x80\x04"
        + _u("numpy._core.multiarray")
        + _u("_reconstruct")
        + b"\x93"
        + _u("numpy")
        + _u("ndarray")
        + b"\x93"
        + _int(0)
        + b"\x85C\x01b\x87R"
        + b"("
        + _int(1)
        + shape
        + dtype
        + b"\x89"
        + _data(nbytes)
        + b"tb."
    )


def test_the_crafted_pickle_helper_makes_a_valid_norm(tmp_path: Path) -> None:
    """Control: the helper's bytes are a real array pickle (so the refusals below are real)."""
    path = tmp_path / "t"
    path.write_bytes(array_pickle(_shape((128,))))
    ref = parse_tensor_file(path)
    assert ref.shape == (128,) and ref.dtype == np.float32  # type: ignore[union-attr]
    assert np.array_equal(ref.memmap(), np.zeros(128, np.float32))  # type: ignore[union-attr]


BOMB = b")" + b"\x85" * 200_000  # a tuple nested 200,000 deep

CRAFTED: dict[str, tuple[bytes, str]] = {
    "dimension 2**70": (array_pickle(_shape((2**70,))), "bad array shape"),
    "dimensions beyond the file": (array_pickle(_shape((2**40, 2**20))), "needs"),
    "nesting bomb": (array_pickle(BOMB), "nested deeper than 16"),
    "big-endian f4": (array_pickle(_shape((128,)), order=">"), "big-endian array (>f4)"),
    "fake status line": (
        b"\x80\x04" + _u("os\ngrokctl: ok: all good\x1b[2J") + _u("system") + b"\x93.",
        "global os\\x0agrokctl: ok: all good\\x1b[2J.system",
    ),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_tensor_files_are_exit_3_in_every_command(
    ckpt: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    data, why = CRAFTED[case]
    (ckpt / NORM).write_bytes(data)
    with pytest.raises(IntegrityError, match=None) as exc:
        parse_tensor_file(ckpt / NORM)
    assert why in str(exc.value) and len(str(exc.value)) < 600
    for args in (
        ("inspect", str(ckpt)),
        ("generate", "-c", str(ckpt), "--token-ids", "1,2,3", "-n", "1"),
    ):
        code, _, err = run(capsys, *args)
        line = error_line(err)
        assert code == 3 and NORM.split("/")[1] in line and why in line, (args, line)
    code, out, err = run(capsys, "verify", str(ckpt))
    assert code == 3 and "\x1b" not in out and "\ngrokctl: ok" not in out
    assert NORM in out and ("size" in out or why in out)  # a size mismatch is also a refusal


def big_endian_bf16_scales(ckpt: Path) -> None:
    """The int8 weight of SCALES as released, its bf16 scales re-labelled big-endian (`>V2`)."""
    raw = (ckpt / SCALES).read_bytes()
    marker = b"\x8c\x01<"  # the byte-order field of a dtype state
    i = raw.index(b"bfloat16")
    j = raw.index(marker, i)
    (ckpt / SCALES).write_bytes(raw[:j] + b"\x8c\x01>" + raw[j + len(marker) :])


@pytest.mark.parametrize(
    "damage, why",
    [
        (lambda ck: (ck / NORM).write_bytes(dumps_tensor(np.ones(128, ">f4"))), "big-endian"),
        (big_endian_bf16_scales, "big-endian"),
        (lambda ck: (ck / NORM).write_bytes(dumps_tensor(np.ones(128, np.float64))), "float64"),
    ],
    ids=["f4-big-endian", "bf16-scales-big-endian", "float64-norm"],
)
def test_one_structural_judgement_for_inspect_verify_and_generate(
    ckpt: Path,
    capsys: pytest.CaptureFixture[str],
    damage: Callable[[Path], None],
    why: str,
) -> None:
    """The reader refuses big-endian arrays and `check_entry` refuses any dtype but the
    release's (no cast): all three commands say exit 3 on the same file."""
    damage(ckpt)
    codes = {}
    for args in (
        ("inspect", str(ckpt)),
        ("generate", "-c", str(ckpt), "--token-ids", "1,2,3", "-n", "1"),
        ("verify", str(ckpt)),
    ):
        code, out, err = run(capsys, *args)
        codes[args[0]] = code
        line = error_line(err)
        # the same words everywhere: verify names the reason on its `corrupt` line
        assert why in (line if args[0] != "verify" else out), (args, line, out)
    assert codes == {"inspect": 3, "generate": 3, "verify": 3}


def test_special_files_are_refused_before_opening(
    ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = ckpt / NORM
    fifo = ckpt.parent / "fifo"
    os.mkfifo(fifo)
    for special, what in (
        ("/proc/self/mem", "kernel file"),
        (str(fifo), "FIFO"),
        ("/dev/zero", "character device"),
    ):
        target.unlink()
        target.symlink_to(special)
        with pytest.raises(IntegrityError, match=what):
            parse_tensor_file(target)
        for args in (
            ("inspect", str(ckpt)),
            ("generate", "-c", str(ckpt), "--token-ids", "1", "-n", "1"),
        ):
            code, _, err = run(capsys, *args)
            line = error_line(err)  # the index calls a non-regular file "missing" before parsing
            assert code == 3 and "tensor00001_000" in line, (special, args)
            assert "not a regular file" in line or "missing" in line, line
        code, out, _ = run(capsys, "verify", str(ckpt), "--json")
        assert code == 3 and NORM in {f["path"] for f in json.loads(out)["corrupt"]}


# --- config.json ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, value, why",
    [
        ("num_layers", 1e12, "expected an integer"),
        ("num_layers", "four", 'num_layers = "four": expected an integer'),
        ("num_layers", True, "expected an integer"),
        ("num_layers", 2000, "out of range 1..1024"),
        ("num_layers", 0, "out of range"),
        ("vocab_size", 2**21, "out of range"),
        ("emb_size", -128, "out of range"),
        ("num_kv_heads", 3, "not a multiple of num_kv_heads"),
        ("eos_token", 512, "not below vocab_size"),
        ("widening_factor", "NaN", "expected a number"),
        ("rms_norm_eps", float("inf"), "out of range"),
        ("key_size", "8\x1b[2J", "\\u001b[2J"),
    ],
)
def test_config_json_is_validated_with_exit_3_naming_the_key(
    ckpt: Path, capsys: pytest.CaptureFixture[str], key: str, value: object, why: str
) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg[key] = value
    (ckpt / "config.json").write_text(json.dumps(cfg))
    commands = [("verify", str(ckpt)), ("inspect", str(ckpt))]
    if key == "num_layers" and value == 1e12:
        commands.append(("generate", "-c", str(ckpt), "--token-ids", "1", "-n", "1"))
    for args in commands:
        code, _, err = run(capsys, *args)
        line = error_line(err)
        assert code == 3, (args, line)
        assert "config.json" in line and key in line and why in line, line


def test_config_json_that_is_not_a_json_object(
    ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for text in ("[1, 2]", "{not json", "[" * 100_000):
        (ckpt / "config.json").write_text(text)
        code, _, err = run(capsys, "verify", str(ckpt))
        assert code == 3 and "config.json" in error_line(err)


# --- verify cannot be talked into "ok" -----------------------------------------------------------


def with_manifest(root: Path) -> Manifest:
    return write_manifest(root)


def edit_manifest(root: Path, edit: Callable[[dict], object]) -> None:
    path = root / MANIFEST_NAME
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def verify_json(capsys: pytest.CaptureFixture[str], root: Path) -> tuple[int, dict]:
    code = main(["verify", str(root), "--json"])
    return code, json.loads(capsys.readouterr().out)


EDITS: dict[str, Callable[[dict], object]] = {
    "no entries": lambda m: m.update(files={}),
    "entry deleted": lambda m: m["files"].pop(EMB),
    "sha256 null": lambda m: m["files"][EMB].update(sha256=None),
    "sha256 missing": lambda m: m["files"][EMB].pop("sha256"),
    "size a string": lambda m: m["files"][EMB].update(size=str(m["files"][EMB]["size"])),
    "size a float": lambda m: m["files"][EMB].update(size=float(m["files"][EMB]["size"])),
    "size a bool": lambda m: m["files"][NORM].update(size=True),
    "sha256 not hex": lambda m: m["files"][EMB].update(sha256="../" * 21 + "x"),
    "absolute path": lambda m: m["files"].update({"/etc/hostname": {"size": 1, "sha256": None}}),
    "dotdot path": lambda m: m["files"].update({"../outside": {"size": 7, "sha256": "0" * 64}}),
    "files a list": lambda m: m.update(files=[]),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_an_edited_manifest_never_makes_a_corrupt_tensor_pass(
    ckpt: Path, capsys: pytest.CaptureFixture[str], edit: str
) -> None:
    with_manifest(ckpt)
    (ckpt.parent / "outside").write_bytes(b"outside")
    assert verify_json(capsys, ckpt)[0] == 0  # control: intact, full manifest
    flip_byte(ckpt / EMB)
    code, report = verify_json(capsys, ckpt)
    assert code == 3 and not report["ok"]  # control: the flip is caught by its sha256
    edit_manifest(ckpt, EDITS[edit])
    code, report = verify_json(capsys, ckpt)
    assert code == 3 and not report["ok"], report
    findings = report["missing"] + report["corrupt"] + report["unverified"]
    assert {f["path"] for f in findings} & {EMB, MANIFEST_NAME}, findings
    assert not any(f["path"].startswith(("/", "..")) for f in findings + report["unexpected"])
    assert report["bytes_hashed"] <= sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    # every tensor file of the layout is still checked (sizes and structure)
    assert report["checks"]["structure"].startswith("ok (26 tensors")


def test_unverified_files_are_named_and_not_exit_0(
    ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with_manifest(ckpt)
    edit_manifest(ckpt, lambda m: m["files"][NORM].update(sha256=None))
    code, out, err = run(capsys, "verify", str(ckpt))
    assert code == 3
    assert f"unverified  {NORM}: no sha256 in grokctl-manifest.json" in out
    assert "UNVERIFIED" in out
    assert error_line(err).endswith("0 missing, 0 corrupt, 1 unverified file(s)")
    assert run(capsys, "verify", str(ckpt), "--quick")[0] == 0  # no hashing asked for


def test_a_manifest_that_disagrees_with_the_layout_is_reported(
    ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Truncate a tensor and make the manifest describe the truncated file."""
    with open(ckpt / EMB, "r+b") as fh:
        fh.truncate(1000)
    with_manifest(ckpt)
    code, report = verify_json(capsys, ckpt)
    assert code == 3
    kinds = {(f["path"], f["kind"]) for f in report["corrupt"]}
    assert (EMB, "manifest") in kinds and (EMB, "size") in kinds


@pytest.mark.parametrize("form", ["directory", "not json", "json array", "deep nesting"])
def test_a_manifest_that_is_not_a_manifest_is_exit_3(
    ckpt: Path, capsys: pytest.CaptureFixture[str], form: str
) -> None:
    flip_byte(ckpt / EMB)
    path = ckpt / MANIFEST_NAME
    if form == "directory":
        path.mkdir()
    else:
        path.write_text(
            {"not json": "{oops", "json array": "[]", "deep nesting": "[" * 100_000}[form]
        )
    code, report = verify_json(capsys, ckpt)
    assert code == 3 and report["corrupt"][0]["path"] == MANIFEST_NAME
    assert report["checks"]["structure"].startswith("ok (26 tensors")
