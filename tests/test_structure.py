"""Module boundaries and the small shared pieces: tensor references, atomic writes, units."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import numpy as np
import pytest

import grokctl
from grokctl.atomic import atomic_dir, atomic_write_bytes, atomic_write_json
from grokctl.checkpoint.refs import ArrayRef, QuantRef
from grokctl.units import human_bytes

PACKAGE = Path(grokctl.__file__).parent


def _imports(tree: ast.AST, module: str) -> list[str]:
    """Absolute names of every module `tree` imports (relative imports resolved)."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = module.rsplit(".", node.level)[0]
                base = f"{parent}.{base}" if base else parent
            names += [base] + [f"{base}.{a.name}" for a in node.names]
    return names


def test_no_library_module_imports_the_cli() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        module = ".".join(rel.parts)
        if module.startswith("grokctl.cli") or module == "grokctl.__main__":
            continue  # the CLI itself, and `python -m grokctl` (which only runs it)
        tree = ast.parse(path.read_text(), str(path))
        bad = [
            n for n in _imports(tree, module) if n == "grokctl.cli" or n.startswith("grokctl.cli.")
        ]
        if bad:
            offenders.append(f"{module}: {sorted(set(bad))}")
    assert not offenders, offenders
    assert len(list(PACKAGE.rglob("*.py"))) > 20  # the walk saw the package


def test_quant_ref_logical_shape(tmp_path: Path) -> None:
    w8 = ArrayRef(str(tmp_path / "x"), 0, (4, 256, 64), np.dtype(np.int8))
    s = ArrayRef(str(tmp_path / "x"), 0, (4, 2, 64), np.dtype(np.float32))
    assert QuantRef(w8, s).shape == (4, 256, 64)
    assert QuantRef(w8, s).nbytes == 4 * 256 * 64 + 4 * 2 * 64 * 4
    packed = ArrayRef(str(tmp_path / "x"), 0, (4, 128, 64), np.dtype(np.uint8))
    assert QuantRef(packed, s, bits=4).shape == (4, 256, 64)


def test_atomic_writes_leave_no_partial(tmp_path: Path) -> None:
    target = tmp_path / "a.bin"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    atomic_write_json(tmp_path / "c.json", {"k": [1, 2]})
    assert json.loads((tmp_path / "c.json").read_text()) == {"k": [1, 2]}
    assert (tmp_path / "c.json").read_bytes() == json.dumps({"k": [1, 2]}, indent=1).encode()
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "c.json"]


def test_atomic_dir_renames_only_when_complete(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "f").write_bytes(b"x")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []  # no partial directory, nothing under the final name
    with atomic_dir(out) as tmp:
        (tmp / "f").write_bytes(b"x")
        assert not out.exists()
    assert (out / "f").read_bytes() == b"x"
    with atomic_dir(out) as tmp:  # replaces what is there
        (tmp / "g").write_bytes(b"y")
    assert sorted(p.name for p in out.iterdir()) == ["g"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_human_bytes() -> None:
    assert human_bytes(999) == "999 B"
    assert human_bytes(318_239_886_140) == "318.24 GB"
    assert human_bytes(3e15) == "3000.00 TB"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_index_dispatches_on_what_is_on_disk(grok_tiny: Path, tmp_path: Path) -> None:
    from grokctl.checkpoint.index import FORMATS, CheckpointIndex, checkpoint_root
    from grokctl.errors import MissingResourceError

    assert [f.name for f in FORMATS] == ["xai", "native"]
    index = CheckpointIndex.open(grok_tiny)
    assert index.format == "xai" and index.root == grok_tiny
    assert CheckpointIndex.open(grok_tiny / "ckpt-0").root == grok_tiny
    assert checkpoint_root(grok_tiny / "ckpt-0") == grok_tiny
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        MissingResourceError,
        match=r"empty: no ckpt-0/ with tensor files or model\.safetensors\.index\.json \(or \*\.safetensors\) found",
    ):
        CheckpointIndex.open(tmp_path / "empty")
    with pytest.raises(MissingResourceError, match="checkpoint directory not found"):
        CheckpointIndex.open(tmp_path / "absent")
