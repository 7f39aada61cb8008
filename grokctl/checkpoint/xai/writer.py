"""Write checkpoints in the exact released on-disk format, and random-weight ones for demos.

`dump_tensor` produces the same bytes the release does (protocol 4, `numpy.core.multiarray.
_reconstruct` as numpy 1 spells it, `__main__.QuantizedWeight8bit` for int8 weights): a
re-dump of a released file is byte-identical, which the tests check against the fixtures.
Every file is written under a temporary name and renamed when complete; a checkpoint directory
gets its `config.json` last, so a half-written one never looks complete.
"""

from __future__ import annotations

import concurrent.futures
import io
import math
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from grokctl.atomic import atomic_dir, atomic_open, atomic_write_bytes, atomic_write_json
from grokctl.checkpoint.layout import ParamSpec, param_specs
from grokctl.checkpoint.xai.files import CKPT_SUBDIR, tensor_filename
from grokctl.config import CONFIG_FILENAME, ModelConfig
from grokctl.errors import UsageError
from grokctl.quantizers.int8 import quantize_int8


class ReleaseQuantWeight:
    """An int8 weight as the release pickles it: `__main__.QuantizedWeight8bit` with state
    {'weight', 'scales'} (the model's pytree class of that name is `model.quant`'s)."""

    def __init__(self, weight: np.ndarray, scales: np.ndarray):
        self.weight = weight
        self.scales = scales


_ALIASES: dict[int, tuple[str, str]] = {
    id(np.ndarray.__reduce__(np.zeros(0))[0]): ("numpy.core.multiarray", "_reconstruct"),
    id(ReleaseQuantWeight): ("__main__", "QuantizedWeight8bit"),
}


class _ReleasePickler(pickle._Pickler):  # type: ignore[name-defined,misc]
    """The pure-Python pickler (byte-identical framing to the C one) with release names."""

    def save_global(self, obj: Any, name: str | None = None) -> None:  # type: ignore[override]
        alias = _ALIASES.get(id(obj))
        if alias is None:
            super().save_global(obj, name)  # type: ignore[misc]
            return
        this: Any = self  # the pure-Python pickler's internals are untyped
        this.save(alias[0])  # protocol 4 writes STACK_GLOBAL of (module, name)
        this.save(alias[1])
        this.write(pickle.STACK_GLOBAL)
        this.memoize(obj)


def dumps_tensor(obj: np.ndarray | ReleaseQuantWeight) -> bytes:
    """The release's exact bytes for one tensor file."""
    buf = io.BytesIO()
    _ReleasePickler(buf, protocol=4).dump(obj)
    return buf.getvalue()


def dump_tensor(path: str | os.PathLike[str], obj: np.ndarray | ReleaseQuantWeight) -> None:
    """`dumps_tensor`'s bytes, pickled straight into the file (a real-width expert tensor is
    1.6 GB: no second copy in memory)."""
    with atomic_open(path) as fh:
        _ReleasePickler(fh, protocol=4).dump(obj)


def random_param(spec: ParamSpec, cfg: ModelConfig, rng: np.random.Generator) -> Any:
    """Random weights scaled so activations stay O(1) and generation is not degenerate."""
    if spec.leaf == "scale":  # RMSNorm scales
        # Post-norms (rms_norm_1, rms_norm_3) larger so layer outputs, not the input token's own
        # embedding, dominate the residual stream (else tied embeddings echo the last token).
        centre = 4.0 if spec.module.endswith(("rms_norm_1", "rms_norm_3")) else 1.0
        return (centre + 0.1 * rng.standard_normal(spec.shape)).astype(np.float32)
    if spec.leaf == "embeddings":  # drawn in row chunks: the same values, no 6 GB of float64
        table = np.empty(spec.shape, np.float32)
        for r in range(0, spec.shape[0], 8192):
            rows = rng.standard_normal((min(8192, spec.shape[0] - r), *spec.shape[1:]))
            table[r : r + len(rows)] = rows / np.sqrt(cfg.emb_size)
        return table
    fan_in = spec.shape[-2]
    if spec.name.endswith("router/w"):
        w = rng.standard_normal(spec.shape, dtype=np.float32) / np.sqrt(fan_in)
        return (w * 4.0).astype(np.float32)  # peaked routing, like a trained router
    # One [K, N] matrix at a time, the draws in order (the same values as the whole tensor
    # drawn at once) and each matrix scaled and quantized in place on a worker thread (numpy
    # releases the GIL), the draws reusing `workers` buffers: a real-width expert tensor would
    # otherwise pass through 13 GB of float64 on one core (3 minutes a layer on a 2-core
    # machine), and every fresh 0.8 GB buffer costs its page faults again.
    *lead, k, n = spec.shape
    q = np.empty(spec.shape, np.int8)
    scales: list[Any] = [None] * math.prod(lead)
    index = list(np.ndindex(*lead))
    workers = max(1, min(4, os.cpu_count() or 1))
    buffers = [np.empty((k, n), np.float32) for _ in range(min(workers, len(index)))]

    def quantize(j: int, w: np.ndarray) -> None:
        np.divide(w, np.sqrt(fan_in), out=w)  # the same f32 values as w / sqrt(fan_in)
        part = quantize_int8(w, spec.scale_blocks, overwrite=True)
        q[index[j]] = part.weight
        scales[j] = part.scales

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        pending: list[concurrent.futures.Future[None]] = []
        for j in range(len(index)):
            if len(pending) >= workers:  # at most `workers` matrices in flight
                pending.pop(0).result()
            w = rng.standard_normal((k, n), dtype=np.float32, out=buffers[j % len(buffers)])
            pending.append(pool.submit(quantize, j, w))
        for f in pending:
            f.result()
    return ReleaseQuantWeight(q, np.stack(scales).reshape(*lead, *scales[0].shape))


def write_checkpoint(
    out_dir: str | os.PathLike[str],
    cfg: ModelConfig,
    make_param: Callable[[ParamSpec], Any],
    force: bool = False,
    on_tensor: Callable[[int, int], None] | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Write every tensor of `cfg` in release order into `<out_dir>/ckpt-0/`, atomically.

    The checkpoint is assembled in a sibling temporary directory and renamed into place when
    complete, so an interrupted run never leaves a checkpoint that looks whole.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not force:
        raise UsageError(f"{out} exists and is not empty (use --force to replace it)")
    with atomic_dir(out) as tmp:
        ckpt = tmp / CKPT_SUBDIR
        ckpt.mkdir()
        specs = param_specs(cfg)
        for i, spec in enumerate(specs):
            dump_tensor(ckpt / tensor_filename(i), make_param(spec))
            if on_tensor:
                on_tensor(i + 1, len(specs))
        for name, data in (extra_files or {}).items():
            atomic_write_bytes(tmp / name, data)
        atomic_write_json(tmp / CONFIG_FILENAME, cfg.to_json_dict())
    return out


def write_random_checkpoint(
    out_dir: str | os.PathLike[str],
    cfg: ModelConfig,
    seed: int = 0,
    force: bool = False,
    tokenizer: bool = True,
    on_tensor: Callable[[int, int], None] | None = None,
) -> Path:
    """A random-weight checkpoint of `cfg` in the released format (+ a tokenizer it can use)."""
    rng = np.random.default_rng(seed)
    extra = {}
    if tokenizer:
        from grokctl.tokenizer import train_demo_tokenizer

        extra["tokenizer.model"] = train_demo_tokenizer(cfg.vocab_size)
    return write_checkpoint(
        out_dir, cfg, lambda s: random_param(s, cfg, rng), force, on_tensor, extra
    )
