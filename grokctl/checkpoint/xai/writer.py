"""Write checkpoints in the exact released on-disk format, and random-weight ones for demos.

`dump_tensor` produces the same bytes the release does (protocol 4, `numpy.core.multiarray.
_reconstruct` as numpy 1 spells it, `__main__.QuantizedWeight8bit` for int8 weights): a
re-dump of a released file is byte-identical, which the tests check against the fixtures.
Every file is written under a temporary name and renamed when complete; a checkpoint directory
gets its `config.json` last, so a half-written one never looks complete.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from grokctl.atomic import atomic_dir, atomic_write_bytes, atomic_write_json
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
    atomic_write_bytes(path, dumps_tensor(obj))


def random_param(spec: ParamSpec, cfg: ModelConfig, rng: np.random.Generator) -> Any:
    """Random weights scaled so activations stay O(1) and generation is not degenerate."""
    if spec.leaf == "scale":  # RMSNorm scales
        # Post-norms (rms_norm_1, rms_norm_3) larger so layer outputs, not the input token's own
        # embedding, dominate the residual stream (else tied embeddings echo the last token).
        centre = 4.0 if spec.module.endswith(("rms_norm_1", "rms_norm_3")) else 1.0
        return (centre + 0.1 * rng.standard_normal(spec.shape)).astype(np.float32)
    if spec.leaf == "embeddings":
        return (rng.standard_normal(spec.shape) / np.sqrt(cfg.emb_size)).astype(np.float32)
    fan_in = spec.shape[-2]
    w = rng.standard_normal(spec.shape, dtype=np.float32) / np.sqrt(fan_in)
    if spec.name.endswith("router/w"):
        return (w * 4.0).astype(np.float32)  # peaked routing, like a trained router
    return ReleaseQuantWeight(*quantize_int8(w, spec.scale_blocks))


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
