"""The safe checkpoint reader: release layout, exact format, and refusal of anything unsafe."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from grokctl.checkpoint.index import CheckpointIndex
from grokctl.checkpoint.layout import param_specs
from grokctl.checkpoint.refs import QuantRef
from grokctl.checkpoint.xai.safe_pickle import parse_tensor_file
from grokctl.checkpoint.xai.sizes import write_sparse_checkpoint
from grokctl.checkpoint.xai.writer import ReleaseQuantWeight, dumps_tensor
from grokctl.config import preset
from grokctl.errors import IntegrityError, UnsafePickleError
from grokctl.model.transformer import param_shapes
from tests.helpers import grokctl, one_line_error

GROK1_BYTES = 318_239_886_140


def _manifest(fixture: Path) -> list[dict]:
    return json.loads((fixture / "config.json").read_text())["fixture"]["tensors"]


def test_fixture_index_matches_manifest(grok_tiny: Path) -> None:
    index = CheckpointIndex.open(grok_tiny)
    manifest = _manifest(grok_tiny)
    assert len(index) == len(manifest) == 26
    for entry, m in zip(index, manifest):
        assert entry.name == m["name"]
        assert entry.file_bytes == m["bytes"]
        if m["kind"] == "QuantizedWeight8bit":
            assert isinstance(entry.ref, QuantRef)
            assert list(entry.ref.weight.shape) == m["weight_shape"]
            assert list(entry.ref.scales.shape) == m["scales_shape"]
            assert entry.scale_blocks == m["scale_blocks"]
            assert str(entry.ref.scales.dtype) == "bfloat16"
        else:
            assert list(entry.ref.shape) == m["shape"] and entry.dtype == m["dtype"]


def test_arrays_are_memory_mapped_and_exact(grok_tiny: Path) -> None:
    entry = CheckpointIndex.open(grok_tiny).by_name()[
        "transformer/decoder_layer_0/multi_head_attention/linear/w"
    ]
    weight, scales = entry.load()
    assert isinstance(weight, np.memmap) and isinstance(scales, np.memmap)
    raw = Path(entry.path).read_bytes()
    assert (
        raw[entry.ref.weight.offset : entry.ref.weight.offset + weight.nbytes] == weight.tobytes()
    )


def test_redump_is_byte_identical_to_release(grok_tiny: Path) -> None:
    for entry, m in zip(CheckpointIndex.open(grok_tiny), _manifest(grok_tiny)):
        arr = entry.load()
        obj = (
            ReleaseQuantWeight(np.asarray(arr[0]), np.asarray(arr[1]))
            if isinstance(arr, tuple)
            else np.asarray(arr)
        )
        assert hashlib.sha256(dumps_tensor(obj)).hexdigest() == m["sha256"], entry.name


def test_grok1_layout_is_jax_tree_order() -> None:
    """File index = JAX's flattening of the haiku params; layers sort as strings."""
    cfg = preset("grok-1")
    specs = param_specs(cfg)
    assert len(specs) == 770
    shapes = param_shapes(cfg)  # jax.eval_shape of the real model: no memory used
    leaves, _ = jax.tree_util.tree_flatten_with_path(shapes)
    names = ["/".join(k.key for k in path) for path, _ in leaves]
    assert names == [s.name for s in specs]
    for spec, (_, leaf) in zip(specs, leaves):
        assert tuple(leaf.shape) == spec.shape, spec.name
    layer_of_file = [s.layer for s in specs[2::12]]
    assert layer_of_file[:4] == [0, 1, 10, 11] and layer_of_file[-1] == 9
    assert specs[2 + 12 * 2].name == "transformer/decoder_layer_10/moe/linear/w"


def test_grok1_shaped_checkpoint_indexes_with_release_sizes(tmp_path: Path) -> None:
    """A 770-file Grok-1 checkpoint at its exact released sizes (data as sparse holes)."""
    root = write_sparse_checkpoint(tmp_path / "grok-1", preset("grok-1"))
    index = CheckpointIndex.open(root, preset="grok-1")
    assert len(index) == 770
    assert index.file_bytes == GROK1_BYTES
    by = index.by_name()
    sizes = {
        "language_model/in_out_embed/embeddings": 3_221_225_637,
        "language_model/rms_norm/scale": 24_727,
        "transformer/decoder_layer_63/moe/linear/w": 1_611_137_347,
        "transformer/decoder_layer_63/moe/linear_v/w": 1_611_137_347,
        "transformer/decoder_layer_63/moe/linear_1/w": 1_611_399_491,
        "transformer/decoder_layer_7/multi_head_attention/key/w": 6_293_814,
        "transformer/decoder_layer_7/multi_head_attention/linear/w": 37_847_359,
        "transformer/decoder_layer_7/multi_head_attention/query/w": 37_761_334,
        "transformer/decoder_layer_7/router/w": 196_770,
    }
    for name, size in sizes.items():
        assert by[name].file_bytes == size, name
    assert by["transformer/decoder_layer_10/moe/linear/w"].path.endswith("tensor00026_000")
    assert by["transformer/decoder_layer_2/moe/linear/w"].path.endswith("tensor00146_000")
    assert by["transformer/decoder_layer_0/moe/linear_1/w"].scale_blocks == 8
    assert by["transformer/decoder_layer_0/multi_head_attention/query/w"].scale_blocks == 1


# --- refusing unsafe or broken files ----------------------------------------------------------


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def _planted(grok_tiny: Path, tmp_path: Path, index: int, data: bytes) -> Path:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(grok_tiny, ckpt, ignore=shutil.ignore_patterns("golden.npz"))
    target = ckpt / "ckpt-0" / f"tensor{index:05d}_000"
    target.chmod(0o644)
    target.write_bytes(data)
    return target


def test_malicious_pickle_is_refused_and_never_runs(grok_tiny: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Evil(marker), protocol=4)
    target = _planted(grok_tiny, tmp_path, 5, payload)
    run = grokctl("generate", "-c", str(target.parents[1]), "--token-ids", "1,2,3", "-n", "2")
    assert run.code == 3
    line = one_line_error(run)
    assert target.name in line and "posix.system" in line
    assert not marker.exists()
    # Control: a plain unpickler would have run the command (so the test can fail).
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Evil(control), protocol=4))  # noqa: S301
    assert control.exists()


@pytest.mark.parametrize(
    "payload, why",
    [
        (b"\x80\x04cbuiltins\neval\n(S'1'\ntR.", "global builtins.eval"),
        (b"\x80\x04\x8c\x05numpy\x8c\x04load\x93.", "global numpy.load"),
        # _reconstruct (allowed) applied to something other than ndarray
        (
            b"\x80\x04\x8c\x15numpy.core.multiarray\x8c\x0c_reconstruct\x93\x8c\x05numpy\x8c\x05dtype\x93)C\x01b\x87R.",
            "_reconstruct of something",
        ),
        # QuantizedWeight8bit name with arguments (a constructor call)
        (b"\x80\x04\x8c\x08__main__\x8c\x13QuantizedWeight8bit\x93K\x01\x85\x81.", "construction"),
    ],
)
def test_unsafe_opcodes_and_globals_are_refused(tmp_path: Path, payload: bytes, why: str) -> None:
    path = tmp_path / "tensor00000_000"
    path.write_bytes(payload)
    with pytest.raises(UnsafePickleError, match=why):
        parse_tensor_file(path)


def test_truncated_tensor_file_exits_3_naming_it(grok_tiny: Path, tmp_path: Path) -> None:
    good = (grok_tiny / "ckpt-0" / "tensor00002_000").read_bytes()
    target = _planted(grok_tiny, tmp_path, 2, good[: len(good) // 2])
    run = grokctl("generate", "-c", str(target.parents[1]), "--token-ids", "1,2,3", "-n", "2")
    assert run.code == 3
    line = one_line_error(run)
    assert str(target) in line and "truncated" in line


def test_garbled_tensor_file_exits_3(grok_tiny: Path, tmp_path: Path) -> None:
    target = _planted(grok_tiny, tmp_path, 7, np.random.default_rng(0).bytes(4000))
    run = grokctl("generate", "-c", str(target.parents[1]), "--token-ids", "1", "-n", "1")
    assert run.code == 3
    assert target.name in one_line_error(run)
    with pytest.raises(IntegrityError):
        parse_tensor_file(target)


def test_wrong_shape_is_an_integrity_error(grok_tiny: Path, tmp_path: Path) -> None:
    target = _planted(grok_tiny, tmp_path, 1, dumps_tensor(np.ones(64, np.float32)))
    with pytest.raises(IntegrityError, match="expected \\[128\\]"):
        CheckpointIndex.open(target.parents[1])


def test_random_weights_drawn_a_matrix_at_a_time_equal_the_whole_tensor_draw(
    tmp_path: Path,
) -> None:
    """random-checkpoint draws an expert tensor one [K, N] matrix at a time (quantized on worker
    threads, pickled straight to the file): the values, the bytes and the random stream after
    it are those of drawing the whole tensor at once."""
    from grokctl.checkpoint.xai.writer import dump_tensor, random_param
    from grokctl.quantizers.int8 import quantize_int8

    cfg = preset("grok-tiny")
    spec = next(s for s in param_specs(cfg) if s.quantized and len(s.shape) == 3)
    drawn = np.random.default_rng(9)
    got = random_param(spec, cfg, drawn)
    rng = np.random.default_rng(9)
    whole = rng.standard_normal(spec.shape, dtype=np.float32) / np.sqrt(spec.shape[-2])
    want = quantize_int8(whole, spec.scale_blocks)
    np.testing.assert_array_equal(got.weight, want.weight)
    np.testing.assert_array_equal(got.scales, want.scales)
    np.testing.assert_array_equal(drawn.standard_normal(4), rng.standard_normal(4))
    dump_tensor(tmp_path / "t", got)
    assert (tmp_path / "t").read_bytes() == dumps_tensor(ReleaseQuantWeight(*want))
    assert [p.name for p in tmp_path.iterdir()] == ["t"]  # no temporary left behind
    # the embedding table, drawn in row chunks (more rows than a chunk: 8192)
    table = next(s for s in param_specs(cfg) if s.leaf == "embeddings")
    table = dataclasses.replace(table, shape=(9000, table.shape[1]))
    got_table = random_param(table, cfg, drawn)
    want_table = (rng.standard_normal(table.shape) / np.sqrt(cfg.emb_size)).astype(np.float32)
    np.testing.assert_array_equal(got_table, want_table)
    np.testing.assert_array_equal(drawn.standard_normal(4), rng.standard_normal(4))
