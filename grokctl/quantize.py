"""`quantize`: a released (xai) or native checkpoint -> a native checkpoint in int8 or int4, with
a measured quality report.

Shapes: weights [..., K, N] with K the contracting axis (-2); G = K / group scale rows.

- `plan` reads headers only (the checkpoint index): every output tensor's stored shapes, the
  shards, the per-device memory on a mesh (inspect's plan), the disk space needed. Seconds on
  the 770-file Grok-1 layout.
- `quantize` converts one tensor at a time (host RAM: about one tensor's source values plus its
  output), its slices in parallel threads (numpy releases the GIL), and streams each tensor
  into the native writer. Everything goes to `DST.tmp-<key>` beside DST; only a complete
  directory (shards, index, config, manifest, report) is renamed to DST. A run that was
  killed leaves that temporary directory, never DST: the next run removes it and starts again.
- `--bits 8` from an int8 source is a lossless repack: the same int8 values and block scales.
  `--bits 4` dequantizes exactly (int8 x bf16 scale, as the model computes) and
  re-quantizes per group (`quantizers.int4`).
- `evaluate` scores DST against SRC with the same engine: per tensor relative RMS and max abs
  error of the model's values, and end to end on seeded probe token sequences (no tokenizer):
  top-1 agreement, KL divergence, max |delta logit|, greedy continuation agreement.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from grokctl.atomic import atomic_write_json, fsync_dir
from grokctl.checkpoint.index import CheckpointIndex, IndexEntry
from grokctl.checkpoint.layout import param_specs
from grokctl.checkpoint.refs import ArrayRef, QuantRef
from grokctl.config import ModelConfig
from grokctl.errors import MissingResourceError, UsageError
from grokctl.quantizers.int4 import (
    dequantize_int4,
    group_size_for,
    quantize_int4,
    to_bf16_value,
)
from grokctl.quantizers.int8 import dequantize_int8, quantize_int8

BITS = (8, 4)
EMBEDDINGS = ("f32", "bf16", "int8")
EMBED_NAME = "language_model/in_out_embed/embeddings"
DEFAULT_GROUP = 128
DEFAULT_SHARD_BYTES = 5 * 10**9
REPORT_NAME = "quantization-report.json"
HEADER_ALLOWANCE = 1 << 20  # safetensors headers, index, config, manifest (per shard, generous)
CHUNK_COLS = 256  # columns quantized per task (groups are independent across columns; cache-sized)
BF16 = np.dtype(ml_dtypes.bfloat16)

OnProgress = Callable[[int, int, str], None]  # (source bytes done, total, tensor name)


@dataclasses.dataclass(frozen=True)
class Options:
    bits: int = 4
    group_size: int = DEFAULT_GROUP
    embeddings: str = "f32"
    max_shard_bytes: int = DEFAULT_SHARD_BYTES
    clip_search: bool = True
    workers: int = max(1, os.cpu_count() or 1)

    def validate(self) -> Options:
        if self.bits not in BITS:
            raise UsageError(f"--bits {self.bits}: supported are 8 and 4")
        if self.group_size < 2:
            raise UsageError(f"--group-size {self.group_size}: must be >= 2")
        if self.embeddings not in EMBEDDINGS:
            raise UsageError(
                f"--embeddings {self.embeddings!r}: choose one of {', '.join(EMBEDDINGS)}"
            )
        if self.max_shard_bytes < 1:
            raise UsageError("the shard size must be >= 1 byte")
        return self


# --- the plan --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OutTensor:
    """One output tensor: how it is stored in the native checkpoint."""

    name: str
    kind: str  # "int8" | "int4" | "emb-int8" (int8 per row) | "f32" | "bf16" (plain arrays)
    shape: tuple[int, ...]  # logical shape
    stored: tuple[tuple[str, tuple[int, ...], str], ...]  # (key, shape, dtype) per stored array
    group_size: int | None = None  # int4: rows per scale group (None otherwise)
    source_bytes: int = 0

    @property
    def nbytes(self) -> int:
        return sum(math.prod(s) * np.dtype(_np_dtype(d)).itemsize for _, s, d in self.stored)

    @property
    def quantized(self) -> bool:
        return self.kind in ("int8", "int4", "emb-int8")

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "shape": list(self.shape),
            "group_size": self.group_size,
            "bytes": self.nbytes,
            "stored": [{"key": k, "shape": list(s), "dtype": d} for k, s, d in self.stored],
        }


def _np_dtype(name: str) -> Any:
    return BF16 if name == "bfloat16" else np.dtype(name)


@dataclasses.dataclass
class Plan:
    source: str
    source_format: str
    destination: str
    config: ModelConfig
    options: Options
    tensors: list[OutTensor]
    shards: list[dict[str, Any]]  # {"file", "tensors", "bytes"} (tensor data bytes)
    group_fallbacks: list[dict[str, Any]]  # tensors whose K the group size does not divide
    source_bytes: int
    mesh: tuple[int, int]
    device: dict[str, Any]  # per-device bytes on `mesh` (inspect's plan)
    free_bytes: int | None = None

    @property
    def output_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def needed_bytes(self) -> int:
        return self.output_bytes + HEADER_ALLOWANCE * (len(self.shards) + 1)

    def scheme(self) -> dict[str, Any]:
        """The quantization scheme recorded in the native checkpoint's metadata."""
        group = self.options.group_size if self.options.bits == 4 else None
        return {
            "bits": self.options.bits,
            "group_size": group,
            "group_axis": "contracting (-2)",
            "embeddings": self.options.embeddings,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "source_format": self.source_format,
            "destination": self.destination,
            "bits": self.options.bits,
            "group_size": self.options.group_size,
            "embeddings": self.options.embeddings,
            "tensors": len(self.tensors),
            "quantized_tensors": sum(t.kind in ("int8", "int4") for t in self.tensors),
            "source_bytes": self.source_bytes,
            "output_bytes": self.output_bytes,
            "needed_bytes": self.needed_bytes,
            "free_bytes": self.free_bytes,
            "shards": self.shards,
            "group_size_fallbacks": self.group_fallbacks,
            "mesh": {"data": self.mesh[0], "model": self.mesh[1]},
            "per_device": self.device,
            "scheme": self.scheme(),
        }


Stored = tuple[tuple[str, tuple[int, ...], str], ...]


def _out_tensor(e: IndexEntry, opts: Options) -> OutTensor:
    name, shape = e.name, tuple(e.spec.shape)
    stored: Stored
    if name == EMBED_NAME:
        v, d = shape
        if opts.embeddings == "int8":
            stored = ((f"{name}.qweight", shape, "int8"), (f"{name}.scales", (v, 1), "bfloat16"))
            return OutTensor(name, "emb-int8", shape, stored, None, e.ref.nbytes)
        dtype = "float32" if opts.embeddings == "f32" else "bfloat16"
        return OutTensor(name, opts.embeddings, shape, ((name, shape, dtype),), None, e.ref.nbytes)
    if not e.spec.quantized:
        dtype = str(e.ref.dtype) if isinstance(e.ref, ArrayRef) else "float32"
        return OutTensor(
            name, "f32" if dtype == "float32" else dtype, shape, ((name, shape, dtype),)
        )
    *lead, k, n = shape
    if opts.bits == 8:
        g = _int8_blocks(e)
        stored = (
            (f"{name}.qweight", shape, "int8"),
            (f"{name}.scales", (*lead, g, n), "bfloat16"),
        )
        return OutTensor(name, "int8", shape, stored, None, e.ref.nbytes)
    group = group_size_for(k, opts.group_size)
    stored = (
        (f"{name}.qweight", (*lead, k // 2, n), "uint8"),
        (f"{name}.scales", (*lead, k // group, n), "bfloat16"),
    )
    return OutTensor(name, "int4", shape, stored, group, e.ref.nbytes)


def _int8_blocks(e: IndexEntry) -> int:
    """Scale rows of the int8 output: the source's own blocks when it is int8 (lossless)."""
    if isinstance(e.ref, QuantRef) and e.ref.bits == 8:
        return int(e.ref.scales.shape[-2])
    return e.spec.scale_blocks


def assign_shards(tensors: list[OutTensor], max_shard_bytes: int) -> list[dict[str, Any]]:
    """Tensors in order into shards of at most `max_shard_bytes` of data (a larger tensor gets
    a shard of its own), named as Hugging Face does."""
    groups: list[list[OutTensor]] = []
    size = 0
    for t in tensors:
        if not groups or (size + t.nbytes > max_shard_bytes and groups[-1]):
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    n = len(groups)
    return [
        {
            "file": f"model-{i + 1:05d}-of-{n:05d}.safetensors",
            "tensors": len(g),
            "bytes": sum(t.nbytes for t in g),
        }
        for i, g in enumerate(groups)
    ]


def _device_plan(
    cfg: ModelConfig, tensors: list[OutTensor], mesh: tuple[int, int]
) -> dict[str, Any]:
    """Per-device bytes of the output on `mesh`: inspect's placement and memory plan."""
    from grokctl import inspect as insp
    from grokctl.model import sharding as shd

    sizes = shd.mesh_sizes(*mesh)
    infos = []
    for i, t in enumerate(tensors):
        scales = t.stored[1][1] if len(t.stored) > 1 else None
        dtype = {"int4": "int4", "int8": "int8", "emb-int8": "int8"}.get(t.kind, t.stored[0][2])
        bits = 4 if t.kind == "int4" else 8
        info = insp.TensorInfo(i, t.name, "", t.shape, dtype, scales, t.nbytes, t.nbytes, bits)
        infos.append(insp.place(info, sizes, "tensor"))
    mp = insp.plan_memory(cfg, infos, mesh[0], mesh[1], 1, cfg.sequence_len)
    return {
        "weights": mp.weights,
        "kv_cache": mp.kv_cache,
        "working": mp.working_total,
        "total": mp.total,
        "batch": 1,
        "seq_len": cfg.sequence_len,
    }


def _free_bytes(path: Path) -> int:
    probe = path
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


def plan(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    opts: Options,
    mesh: tuple[int, int] = (1, 1),
    index: CheckpointIndex | None = None,
) -> Plan:
    """The output plan from the source's headers alone (no tensor data read)."""
    opts.validate()
    index = index or CheckpointIndex.open(src)
    cfg = index.config
    tensors = [_out_tensor(e, opts) for e in index]
    fallbacks = [
        {"name": t.name, "contracting": t.shape[-2], "group_size": t.group_size}
        for t in tensors
        if t.kind == "int4" and t.group_size != opts.group_size
    ]
    shards = assign_shards(tensors, opts.max_shard_bytes)
    dst_path = Path(dst)
    return Plan(
        str(index.root),
        index.format,
        str(dst_path),
        cfg,
        opts,
        tensors,
        shards,
        fallbacks,
        sum(e.ref.nbytes for e in index),
        mesh,
        _device_plan(cfg, tensors, mesh),
        _free_bytes(dst_path.parent if dst_path.parent != Path("") else Path(".")),
    )


# --- values ----------------------------------------------------------------------------------


def source_values(ref: ArrayRef | QuantRef) -> np.ndarray:
    """The model's value of a stored tensor (f32): q x scale for int8 weights, bf16(q x scale)
    for int4 ones."""
    if isinstance(ref, QuantRef):
        w, s = np.asarray(ref.weight.memmap()), np.asarray(ref.scales.memmap())
        return dequantize_int4(w, s) if ref.bits == 4 else dequantize_int8(w, s)
    return np.asarray(ref.memmap(), np.float32)


@dataclasses.dataclass
class TensorResult:
    name: str
    kind: str
    group_size: int | None
    method: str  # "repack", "copy", "cast", "rtn", "clip-search", "int8-row", "int8-block"
    rel_rms_error: float
    max_abs_error: float
    bytes: int

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _rel(sq_err: float, sq_ref: float) -> float:
    return math.sqrt(sq_err / sq_ref) if sq_ref > 0 else (0.0 if sq_err == 0 else math.inf)


def _errors(ref: np.ndarray, new: np.ndarray) -> tuple[float, float]:
    diff = new.astype(np.float32) - ref.astype(np.float32)
    sq_err = float(np.square(diff, dtype=np.float64).sum())
    sq_ref = float(np.square(ref, dtype=np.float64).sum())
    return _rel(sq_err, sq_ref), float(np.abs(diff).max()) if diff.size else 0.0


Payload = np.ndarray | tuple[np.ndarray, np.ndarray]


def _slice_values(ref: ArrayRef | QuantRef, i: int, c0: int, c1: int) -> np.ndarray:
    """Model values (f32) of rows [:, c0:c1] of the i-th [K, N] matrix of a stored tensor,
    read from the memory map: only that slice is ever in memory."""
    if isinstance(ref, QuantRef):
        w, s = ref.weight, ref.scales
        wm = w.memmap().reshape(-1, *w.shape[-2:])[i, :, c0:c1]
        sm = s.memmap().reshape(-1, *s.shape[-2:])[i, :, c0:c1]
        wm, sm = np.asarray(wm), np.asarray(sm)
        return dequantize_int4(wm, sm) if ref.bits == 4 else dequantize_int8(wm, sm)
    a = ref.memmap()
    return np.asarray(a.reshape(-1, *a.shape[-2:])[i, :, c0:c1], np.float32)


def _convert_int4(
    ref: ArrayRef | QuantRef,
    shape: tuple[int, ...],
    group: int,
    clip: bool,
    pool: ThreadPoolExecutor,
) -> tuple[tuple[np.ndarray, np.ndarray], str, float, float]:
    """int4 of the tensor [..., K, N] at `ref`, by slices (leading index x column chunk) in
    parallel; each slice is dequantized from the memory map as it is needed (bounded RAM: the
    output plus one slice per thread)."""
    *lead, k, n = shape
    m = math.prod(lead)
    packed = np.empty((m, k // 2, n), np.uint8)
    scales = np.empty((m, k // group, n), BF16)
    jobs = [(i, c) for i in range(m) for c in range(0, n, CHUNK_COLS)]

    def one(job: tuple[int, int]) -> tuple[str, float, float, float]:
        i, c = job
        w = _slice_values(ref, i, c, c + CHUNK_COLS)
        r = quantize_int4(w, group, clip)
        packed[i, :, c : c + CHUNK_COLS] = r.packed
        scales[i, :, c : c + CHUNK_COLS] = r.scales
        return r.method, r.sq_error, r.max_abs_error, float(np.square(w, dtype=np.float64).sum())

    results = list(pool.map(one, jobs))
    method = "clip-search" if any(r[0] == "clip-search" for r in results) else "rtn"
    sq_err = sum(r[1] for r in results)
    max_abs = max((r[2] for r in results), default=0.0)
    sq_ref = sum(r[3] for r in results)
    out = (packed.reshape(*lead, k // 2, n), scales.reshape(*lead, k // group, n))
    return out, method, _rel(sq_err, sq_ref), max_abs


def convert(
    e: IndexEntry, t: OutTensor, opts: Options, pool: ThreadPoolExecutor
) -> tuple[Payload, TensorResult]:
    """One tensor: its output payload (an array, or (qweight, scales)) and its errors."""
    ref = e.ref
    if t.kind == "int8" and isinstance(ref, QuantRef) and ref.bits == 8:
        w, s = np.array(ref.weight.memmap()), np.array(ref.scales.memmap()).astype(BF16)
        return (w, s), TensorResult(t.name, t.kind, None, "repack", 0.0, 0.0, t.nbytes)
    if t.kind in ("f32", "float32") and isinstance(ref, ArrayRef) and ref.dtype == np.float32:
        a = np.array(ref.memmap())
        return a, TensorResult(t.name, t.kind, None, "copy", 0.0, 0.0, t.nbytes)
    if t.kind == "int4":
        assert t.group_size is not None
        payload, method, rel, mx = _convert_int4(ref, t.shape, t.group_size, opts.clip_search, pool)
        return payload, TensorResult(t.name, t.kind, t.group_size, method, rel, mx, t.nbytes)
    values = source_values(ref)
    if t.kind == "int8":  # from a 4-bit source: the release's block layout
        q8 = quantize_int8(values, t.stored[1][1][-2])
        rec = dequantize_int8(q8.weight, q8.scales)
        rel, mx = _errors(values, rec)
        return (q8.weight, q8.scales), TensorResult(
            t.name, t.kind, None, "int8-block", rel, mx, t.nbytes
        )
    if t.kind == "emb-int8":
        amax = np.abs(values).max(axis=-1, keepdims=True)
        scales = (np.maximum(amax, np.float32(1e-12)) / np.float32(127)).astype(BF16)
        q = np.clip(np.rint(values / scales.astype(np.float32)), -127, 127).astype(np.int8)
        rec = to_bf16_value(q.astype(np.float32) * scales.astype(np.float32))
        rel, mx = _errors(values, rec)
        return (q, scales), TensorResult(t.name, t.kind, None, "int8-row", rel, mx, t.nbytes)
    dtype = _np_dtype(t.stored[0][2])
    arr = values.astype(dtype)
    rel, mx = _errors(values, arr.astype(np.float32))
    return arr, TensorResult(t.name, t.kind, None, "cast", rel, mx, t.nbytes)


# --- the run ---------------------------------------------------------------------------------


def temp_dir_for(dst: Path, src_root: Path, opts: Options) -> Path:
    """`DST.tmp-<key>`: the key names the job (source, bits, group, embeddings)."""
    job = json.dumps(
        [str(src_root.resolve()), opts.bits, opts.group_size, opts.embeddings], sort_keys=True
    )
    key = hashlib.sha256(job.encode()).hexdigest()[:12]
    return dst.parent / f"{dst.name}.tmp-{key}"


def _check_destination(src_root: Path, dst: Path, force: bool) -> None:
    if dst.resolve() == src_root.resolve():
        raise UsageError(f"{dst}: the destination is the source checkpoint")
    if dst.exists() and not force:
        raise UsageError(f"{dst} exists (use --force to replace it)")


def check_disk(p: Plan) -> None:
    free = _free_bytes(Path(p.destination).parent)
    p.free_bytes = free
    if free < p.needed_bytes:
        from grokctl.units import human_bytes

        raise MissingResourceError(
            f"{Path(p.destination).parent}: {human_bytes(free)} free, the quantized checkpoint "
            f"needs {human_bytes(p.needed_bytes)}"
        )


def _tensors(
    index: CheckpointIndex,
    p: Plan,
    pool: ThreadPoolExecutor,
    results: list[TensorResult],
    on_progress: OnProgress | None,
) -> Iterator[tuple[str, Payload]]:
    done = 0
    for e, t in zip(index, p.tensors):
        payload, res = convert(e, t, p.options, pool)
        results.append(res)
        done += e.ref.nbytes
        if on_progress:
            on_progress(done, p.source_bytes, t.name)
        yield t.name, payload
        del payload


@dataclasses.dataclass
class Result:
    plan: Plan
    tensors: list[TensorResult]
    seconds: float
    end_to_end: dict[str, Any] | None
    restarted_from: str | None = None
    end_to_end_error: str | None = None

    @property
    def gb_per_s(self) -> float:
        return self.plan.source_bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def report(self) -> dict[str, Any]:
        report = build_report(self.plan, self.tensors, self.end_to_end, self.seconds)
        if self.end_to_end_error:
            report["end_to_end_error"] = self.end_to_end_error
        return report


def build_report(
    p: Plan, tensors: list[TensorResult], e2e: dict[str, Any] | None, seconds: float | None
) -> dict[str, Any]:
    quant = [t for t in tensors if t.kind in ("int8", "int4", "emb-int8")]
    return {
        "format": "grokctl-quantization-report/1",
        "source": p.source,
        "source_format": p.source_format,
        "destination": p.destination,
        "bits": p.options.bits,
        "group_size": p.options.group_size if p.options.bits == 4 else None,
        "embeddings": p.options.embeddings,
        "source_bytes": p.source_bytes,
        "output_bytes": p.output_bytes,
        "seconds": seconds,
        "gb_per_s": (p.source_bytes / seconds / 1e9) if seconds else None,
        "group_size_fallbacks": p.group_fallbacks,
        "summary": {
            "tensors": len(tensors),
            "quantized_tensors": len(quant),
            "max_rel_rms_error": max((t.rel_rms_error for t in tensors), default=0.0),
            "mean_rel_rms_error_quantized": (
                float(np.mean([t.rel_rms_error for t in quant])) if quant else 0.0
            ),
            "max_abs_error": max((t.max_abs_error for t in tensors), default=0.0),
            "clip_search_tensors": sum(t.method == "clip-search" for t in tensors),
        },
        "tensors": [t.to_json() for t in tensors],
        "end_to_end": e2e,
    }


def quantize(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    opts: Options,
    force: bool = False,
    evaluate_model: bool = True,
    eval_mesh: Any = None,
    on_progress: OnProgress | None = None,
    log: Callable[[str], None] | None = None,
) -> Result:
    """Write the native checkpoint DST from SRC (see the module docstring)."""
    from grokctl.checkpoint.native import NativeWriter, QuantScheme

    opts.validate()
    dst = Path(dst)
    index = CheckpointIndex.open(src)
    _check_destination(index.root, dst, force)
    p = plan(src, dst, opts, index=index)
    check_disk(p)
    tmp = temp_dir_for(dst, index.root, opts)
    restarted = None
    if tmp.exists():  # a run that was killed: its partial output is discarded, the job redone
        restarted = str(tmp)
        if log:
            log(f"removing the incomplete output of an interrupted run: {tmp}")
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    start = time.perf_counter()
    results: list[TensorResult] = []
    try:
        scheme = QuantScheme(
            opts.bits, opts.group_size if opts.bits == 4 else None, opts.embeddings
        )
        writer = NativeWriter(tmp, index.config, scheme, opts.max_shard_bytes)
        with ThreadPoolExecutor(max_workers=opts.workers) as pool:
            for name, payload in _tensors(index, p, pool, results, on_progress):
                writer.add(name, payload)
        tok = index.root / "tokenizer.model"
        writer.finish(tokenizer=tok if tok.is_file() else None)
        seconds = time.perf_counter() - start
        e2e, e2e_error = None, None
        if evaluate_model:
            try:
                e2e = evaluate_end_to_end(index.root, tmp, eval_mesh)
            except Exception as exc:  # the checkpoint is complete: keep it, say why, and
                # let `--evaluate-only` score it later (e.g. on a larger mesh)
                e2e_error = f"{type(exc).__name__}: {exc}"
                if log:
                    log(
                        f"end-to-end evaluation failed ({e2e_error}); rerun it with --evaluate-only"
                    )
        res = Result(p, results, seconds, e2e, restarted, e2e_error)
        atomic_write_json(tmp / REPORT_NAME, res.report())
        fsync_dir(tmp)
        _replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return res


def _replace_dir(tmp: Path, dst: Path) -> None:
    """Rename the complete `tmp` to `dst`; an existing `dst` (--force) is moved aside first."""
    old = None
    if dst.exists():
        old = dst.parent / f"{dst.name}.old-{os.getpid()}"
        os.replace(dst, old)
    os.replace(tmp, dst)
    fsync_dir(dst.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --- evaluation ------------------------------------------------------------------------------

PROBES = 4
PROBE_LEN = 128
PROMPT_LEN = 32
CONTINUATION = 32
PROBE_SEED = 20260101


def probe_tokens(cfg: ModelConfig, seed: int = PROBE_SEED) -> np.ndarray:
    """Fixed token sequences [PROBES, T] (T = min(128, context)), seeded; ids 3.. (no pad/eos).
    Two are uniform random; two repeat a random 16-token motif (copying behaviour)."""
    t = min(PROBE_LEN, cfg.sequence_len)
    rng = np.random.default_rng(seed)
    rows = [rng.integers(3, cfg.vocab_size, t) for _ in range(PROBES // 2)]
    for _ in range(PROBES - PROBES // 2):
        motif = rng.integers(3, cfg.vocab_size, 16)
        rows.append(np.resize(motif, t))
    return np.stack(rows).astype(np.int32)


def _model_outputs(path: Path, mesh: Any, probes: np.ndarray) -> tuple[np.ndarray, list[list[int]]]:
    import grokctl

    model = grokctl.load_model(str(path), mesh=mesh, tokenizer=None)
    logits = model.logits(probes)
    prompts = [row[:PROMPT_LEN].tolist() for row in probes]
    gens = model.generate(prompts, max_tokens=CONTINUATION, temperature=0.0)
    tokens = [g.token_ids for g in gens]
    del model
    gc.collect()
    return logits, tokens


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def compare_logits(
    ref: np.ndarray, new: np.ndarray, ref_gen: list[list[int]], new_gen: list[list[int]]
) -> dict[str, Any]:
    """End-to-end figures of `new` against `ref` (logits [B, T, V], greedy continuations)."""
    kl_rows = []
    for a, b in zip(ref, new):  # one probe at a time: [T, V] f64 temporaries only
        lp, lq = _log_softmax(a), _log_softmax(b)
        kl_rows.append((np.exp(lp) * (lp - lq)).sum(-1))  # KL(ref || new) per position
    kl = np.stack(kl_rows)
    prefix, same = [], []
    for a, b in zip(ref_gen, new_gen):
        # A continuation that stopped (end of sequence) is padded with -1: stopping at the
        # same step agrees, stopping at a different one does not.
        n = max(len(a), len(b))
        if n == 0:
            prefix.append(1.0)
            same.append(1.0)
            continue
        agree = [x == y for x, y in zip(a + [-1] * (n - len(a)), b + [-1] * (n - len(b)))]
        first = agree.index(False) if False in agree else n
        prefix.append(first / n)
        same.append(sum(agree) / n)
    return {
        "probes": int(ref.shape[0]),
        "positions": int(ref.shape[0] * ref.shape[1]),
        "top1_agreement": float(np.mean(ref.argmax(-1) == new.argmax(-1))),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "max_abs_logit_delta": float(np.abs(ref - new).max()),
        "greedy_tokens": CONTINUATION,
        "greedy_prefix_agreement": float(np.mean(prefix)),
        "greedy_token_agreement": float(np.mean(same)),
    }


def evaluate_end_to_end(src: Path, dst: Path, mesh: Any = None) -> dict[str, Any]:
    """Probe both checkpoints with the same engine, one model in memory at a time."""
    cfg = CheckpointIndex.open(src).config
    probes = probe_tokens(cfg)
    ref_logits, ref_gen = _model_outputs(src, mesh, probes)
    new_logits, new_gen = _model_outputs(dst, mesh, probes)
    return compare_logits(ref_logits, new_logits, ref_gen, new_gen)


def evaluate(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    mesh: Any = None,
    end_to_end: bool = True,
) -> dict[str, Any]:
    """`--evaluate-only`: score an existing DST against SRC (per tensor, and end to end)."""
    s_index, d_index = CheckpointIndex.open(src), CheckpointIndex.open(dst)
    d_by_name = d_index.by_name()
    missing = [e.name for e in s_index if e.name not in d_by_name]
    if missing:
        raise UsageError(
            f"{dst}: has no tensor {missing[0]} of the source ({len(missing)} missing)"
        )
    results = []
    for e in s_index:
        d = d_by_name[e.name]
        ref, new = source_values(e.ref), source_values(d.ref)
        if ref.shape != new.shape:
            raise UsageError(
                f"{dst}: {e.name} has shape {list(new.shape)}, source {list(ref.shape)}"
            )
        rel, mx = _errors(ref, new)
        kind, group = _kind_of(d)
        results.append(TensorResult(e.name, kind, group, "measured", rel, mx, d.ref.nbytes))
    scheme = _scheme_of(d_index)
    opts = Options(
        bits=int(scheme.get("bits") or 8),
        group_size=int(scheme.get("group_size") or DEFAULT_GROUP),
        embeddings=str(scheme.get("embeddings") or "f32"),
    )
    p = plan(src, dst, opts, index=s_index)
    p.group_fallbacks = [
        {
            "name": r.name,
            "contracting": d_by_name[r.name].spec.shape[-2],
            "group_size": r.group_size,
        }
        for r in results
        if r.kind == "int4" and r.group_size != opts.group_size
    ]
    e2e = evaluate_end_to_end(s_index.root, d_index.root, mesh) if end_to_end else None
    return build_report(p, results, e2e, None)


def _kind_of(e: IndexEntry) -> tuple[str, int | None]:
    ref = e.ref
    if isinstance(ref, QuantRef):
        if e.name == EMBED_NAME:
            return "emb-int8", None
        if ref.bits == 4:
            return "int4", ref.shape[-2] // ref.scales.shape[-2]
        return "int8", None
    return {"float32": "f32", "bfloat16": "bf16"}.get(str(ref.dtype), str(ref.dtype)), None


def _scheme_of(index: CheckpointIndex) -> dict[str, Any]:
    try:
        cfg = json.loads((index.root / "config.json").read_text())
        q = cfg.get("quantization")
        return q if isinstance(q, dict) else {}
    except (OSError, ValueError):
        return {}


def expected_output_bytes(cfg: ModelConfig, opts: Options) -> int:
    """Tensor data bytes of the native checkpoint for `cfg` (from shapes alone)."""
    total = 0
    for spec in param_specs(cfg):
        if spec.name == EMBED_NAME:
            v, d = spec.shape
            total += {"f32": 4 * v * d, "bf16": 2 * v * d, "int8": v * d + 2 * v}[opts.embeddings]
        elif not spec.quantized:
            total += spec.nbytes()
        else:
            *lead, k, n = spec.shape
            lead_n = math.prod(lead)
            if opts.bits == 8:
                total += lead_n * (k * n + 2 * spec.scale_blocks * n)
            else:
                g = group_size_for(k, opts.group_size)
                total += lead_n * (k // 2 * n + 2 * (k // g) * n)
    return total
