"""`inspect`: what a checkpoint holds and what each device of a mesh will hold, from the index.

No tensor data is read: a checkpoint's pickle headers (or, with a preset and no files, the
shapes alone) give every parameter's path, file, shape, dtype, int8/scales layout and bytes;
the partition rules give each tensor's spec and per-device shard; `plan_memory` adds the KV
cache and a working-space estimate and compares the sum with the device memory.

Shapes: B batch (padded to a multiple of the data axis D), S sequence length (cache), T prefill
tokens, L layers, D emb, F ffn, E experts, k selected, H/G q/kv heads, K key size, V vocab,
M model-axis size. Memory per device (bytes), as `plan_memory` computes it:
    weights  = sum over tensors of its shard (int8 weight, or int4 packed two per byte, + bf16
               scales, or the f32/bf16 array)
    kv cache = 2*L * B/D * S * G/Mg * K * 2  +  B/D * (S + 4)       (Mg = M if M divides G)
    working  = dequant + residual + logits + max(attention, moe), with T = S (a prefill of the
               whole context; attention and MoE temporaries are never alive together)
      dequant   = 2 * max(3*D*F/Mf, V*D/M, D*H*K/M)       one expert's bf16 copy (sparse kernel;
                  3*E/Me*D*F/Mf for --moe dense), the bf16 embedding table, the query weight
      residual  = B/D * T * D * 16                        bf16 stream + f32 norm temporaries
      logits    = B/D * V * 12                            last-position f32 logits + sampling
      attention = B/D * H/Mh * T * S * 10                 f32 scores, f32 capped, bf16 weights
      moe       = B/D * T * k * D * 12                    sorted dispatch: f32 expert outputs x3
Checked against XLA's own memory analysis of the compiled prefill in tests/test_inspect.py.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

from grokctl import costmodel
from grokctl.checkpoint.index import CheckpointIndex
from grokctl.checkpoint.layout import BF16, INT8, param_specs
from grokctl.checkpoint.native.format import EMBEDDINGS
from grokctl.checkpoint.refs import QuantRef
from grokctl.checkpoint.xai.files import CKPT_SUBDIR, tensor_filename
from grokctl.config import ModelConfig, default
from grokctl.errors import UsageError
from grokctl.model import sharding as shd

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One checkpoint leaf as stored, and its placement on the mesh."""

    index: int
    name: str
    file: str
    shape: tuple[int, ...]
    dtype: str
    scales_shape: tuple[int, ...] | None  # quantized weights only: [..., G, N] bf16
    data_bytes: int  # array payload (weight + scales)
    file_bytes: int  # the pickle file, exactly; a native shard's share: its data bytes
    bits: int = 8  # quantized weights: 8 (int8) or 4 (int4, two per byte along K)
    spec: str = ""
    scales_spec: str | None = None
    shard_shape: tuple[int, ...] = ()
    scales_shard_shape: tuple[int, ...] | None = None
    device_bytes: int = 0  # what one device holds of this tensor
    rule: str = ""

    @property
    def quantized(self) -> bool:
        return self.scales_shape is not None

    @property
    def params(self) -> int:
        return math.prod(self.shape)

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """The array as stored: int4 packs two rows of the contracting axis (-2) per byte."""
        if self.quantized and self.bits == 4:
            return (*self.shape[:-2], self.shape[-2] // 2, self.shape[-1])
        return self.shape

    @property
    def layer(self) -> int | None:
        m = re.search(r"decoder_layer_(\d+)/", self.name)
        return int(m.group(1)) if m else None

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(quantized=self.quantized, params=self.params, layer=self.layer)
        if self.quantized:
            out["scales_dtype"] = BF16
            out["scale_blocks"] = self.scales_shape[-2]  # type: ignore[index]
        return out


def tensors_from_index(index: CheckpointIndex) -> list[TensorInfo]:
    """Every leaf of an opened checkpoint, as its files hold it (headers only). Shapes are
    logical (an int4 weight [..., K, N] is stored [..., K/2, N])."""
    out = []
    shared = index.format != "xai"  # one file holds many tensors: count each one's data
    for e in index:
        rel = Path(e.path).relative_to(index.root).as_posix()
        on_disk = e.ref.nbytes if shared else e.file_bytes
        if isinstance(e.ref, QuantRef):
            r = e.ref
            dtype = "int4" if r.bits == 4 else str(r.weight.dtype)
            out.append(
                TensorInfo(
                    e.index, e.name, rel, r.shape, dtype, r.scales.shape, r.nbytes, on_disk, r.bits
                )
            )
        else:
            ref = e.ref
            out.append(
                TensorInfo(
                    e.index, e.name, rel, ref.shape, str(ref.dtype), None, ref.nbytes, on_disk
                )
            )
    return out


def tensors_from_config(
    cfg: ModelConfig, bits: int = 8, group_size: int | None = None
) -> list[TensorInfo]:
    """Every leaf the released format writes for `cfg`, with exact file sizes, from shapes; with
    `bits` 4 or a `group_size`, the leaves of a native checkpoint quantized that way (scales
    [..., K/g, N], g = `native.group_rows(K, group_size)`; on disk = data bytes)."""
    from grokctl.checkpoint.xai.sizes import tensor_file_size

    if bits not in (4, 8):
        raise UsageError(f"--bits {bits}: choose 8 or 4")
    if group_size is not None and group_size < 2:
        raise UsageError(f"--group-size {group_size}: must be at least 2")
    if bits == 4 or group_size is not None:
        return _native_tensors(cfg, bits, group_size or 128)
    out = []
    for i, spec in enumerate(param_specs(cfg)):
        file = f"{CKPT_SUBDIR}/{tensor_filename(i)}"
        scales = spec.scales_shape if spec.quantized else None
        dtype = INT8 if spec.quantized else spec.dtype
        out.append(
            TensorInfo(
                i, spec.name, file, spec.shape, dtype, scales, spec.nbytes(), tensor_file_size(spec)
            )
        )
    return out


def _native_tensors(cfg: ModelConfig, bits: int, group_size: int) -> list[TensorInfo]:
    from grokctl.checkpoint.native import group_rows

    out = []
    for i, spec in enumerate(param_specs(cfg)):
        if not spec.quantized:
            n = spec.nbytes()
            out.append(TensorInfo(i, spec.name, "", spec.shape, spec.dtype, None, n, n))
            continue
        *lead, k, n_out = spec.shape
        rows = group_rows(k, group_size, bits)
        if not rows:
            raise UsageError(f"{spec.name}: {k} rows cannot be packed two per byte")
        scales = (*lead, k // rows, n_out)
        n = math.prod(spec.shape) * bits // 8 + 2 * math.prod(scales)
        dtype = "int4" if bits == 4 else INT8
        out.append(TensorInfo(i, spec.name, "", spec.shape, dtype, scales, n, n, bits))
    return out


def _itemsize(dtype: str) -> int:
    # int4: bytes per stored (packed) element
    return {"int8": 1, "int4": 1, "uint8": 1, "bfloat16": 2, "float16": 2, "float32": 4}.get(
        dtype, 4
    )


def place(t: TensorInfo, sizes: dict[str, int], layout: str) -> TensorInfo:
    """`t` with its partition spec, per-device shard shape and per-device bytes filled in (int4:
    the packed rows shard like the rows, so the stored shape must divide too)."""
    spec = shd.param_spec(t.name, t.shape, sizes, layout)
    shard = shd.shard_shape(t.shape, spec, sizes)
    stored = shd.param_spec(t.name, t.stored_shape, sizes, layout)
    nbytes = math.prod(shd.shard_shape(t.stored_shape, stored, sizes)) * _itemsize(t.dtype)
    s_spec_text = s_shard = None
    if t.scales_shape is not None and t.name == EMBEDDINGS:  # int8 per row: scales [V, 1] whole
        s_spec = shd.fit_spec(t.scales_shape, shd.REPLICATED, sizes)
        s_shard = t.scales_shape
        s_spec_text = shd.spec_text(s_spec)
        nbytes += math.prod(s_shard) * 2
    elif t.scales_shape is not None:
        s_spec = shd.param_spec(t.name, t.scales_shape, sizes, layout, scales=True)
        s_shard = shd.shard_shape(t.scales_shape, s_spec, sizes)
        s_spec_text = shd.spec_text(s_spec)
        nbytes += math.prod(s_shard) * 2
    return dataclasses.replace(
        t,
        spec=shd.spec_text(spec),
        scales_spec=s_spec_text,
        shard_shape=shard,
        scales_shard_shape=s_shard,
        device_bytes=nbytes,
        rule=shd.matching_rule(t.name, layout),
    )


def select(tensors: list[TensorInfo], pattern: str | None, layer: int | None) -> list[TensorInfo]:
    """`--filter REGEX` (searched in the parameter path) and `--layer N`."""
    if pattern:
        try:
            rx = re.compile(pattern)
        except re.error as exc:
            raise UsageError(
                f"--filter {pattern!r}: not a valid regular expression ({exc})"
            ) from None
        tensors = [t for t in tensors if rx.search(t.name)]
    if layer is not None:
        tensors = [t for t in tensors if t.layer == layer]
    return tensors


# --- the memory plan ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    data: int
    model: int
    batch: int
    padded_batch: int
    seq_len: int
    weights: int
    kv_cache: int
    working: dict[str, int]
    device_memory: int | None
    device_memory_source: str

    @property
    def working_total(self) -> int:
        w = self.working
        return w["dequant"] + w["residual"] + w["logits"] + max(w["attention"], w["moe"])

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.working_total

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory is None else self.total <= self.device_memory

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(working_total=self.working_total, total=self.total, fits=self.fits)
        return out


def _div(dim: int, m: int) -> int:
    """Shard of a dimension over m devices, or the whole of it when m does not divide."""
    return dim // m if dim % m == 0 else dim


def plan_memory(
    cfg: ModelConfig,
    tensors: list[TensorInfo],
    data: int,
    model: int,
    batch: int,
    seq_len: int,
    layout: str = default("layout"),
    moe: str = default("moe"),
    device_memory: int | None = None,
    device_memory_source: str = "not given",
) -> MemoryPlan:
    """Per-device bytes: weights (from the placed `tensors`) + KV cache + working space."""
    if batch < 1 or seq_len < 1:
        raise UsageError("--batch and --seq-len must be >= 1")
    if seq_len > cfg.sequence_len:
        raise UsageError(f"--seq-len {seq_len} exceeds the model's context of {cfg.sequence_len}")
    padded = -(-batch // data) * data
    bd, s, t = padded // data, seq_len, seq_len
    d, f, e, k, v = (
        cfg.emb_size,
        cfg.ffn_size,
        cfg.num_experts,
        cfg.num_selected_experts,
        cfg.vocab_size,
    )
    g_local, kk = _div(cfg.num_kv_heads, model), cfg.key_size
    kv = costmodel.kv_cache_bytes(cfg, bd, s, kv_heads=g_local)
    expert = layout == "expert" and e % model == 0
    e_local, f_local = (e // model, f) if expert else (e, _div(f, model))
    n_moe = 3 if moe == "sparse" else 3 * e_local
    h_local = _div(cfg.num_q_heads, model)
    working = {
        "dequant": 2 * max(n_moe * d * f_local, v * _div(d, model), d * h_local * kk),
        "residual": bd * t * d * 16,
        "logits": bd * v * 12,
        "attention": bd * h_local * t * s * 10,
        "moe": bd * t * k * d * 12,
    }
    weights = sum(x.device_bytes for x in tensors)
    return MemoryPlan(
        data,
        model,
        batch,
        padded,
        seq_len,
        weights,
        kv,
        working,
        device_memory,
        device_memory_source,
    )


# --- the report -------------------------------------------------------------------------------


@dataclasses.dataclass
class Report:
    source: str  # "checkpoint" or "preset"
    location: str  # checkpoint directory, or the preset name
    config: ModelConfig
    layout: str
    tensors: list[TensorInfo]  # all, placed
    selected: list[TensorInfo]  # after --filter / --layer
    plan: MemoryPlan
    preset: str | None = None  # the preset named (the source, or the one a checkpoint assumes)

    def totals(self) -> dict[str, Any]:
        sel = self.selected
        return {
            "tensors": len(self.tensors),
            "parameters": sum(t.params for t in self.tensors),
            "active_parameters_per_token": self.config.active_param_count(),
            "bytes_on_disk": sum(t.file_bytes for t in self.tensors),
            "data_bytes": sum(t.data_bytes for t in self.tensors),
            "int8_tensors": sum(t.quantized and t.bits == 8 for t in self.tensors),
            "int4_tensors": sum(t.quantized and t.bits == 4 for t in self.tensors),
            "selected_tensors": len(sel),
            "selected_parameters": sum(t.params for t in sel),
            "selected_bytes_on_disk": sum(t.file_bytes for t in sel),
            "selected_device_bytes": sum(t.device_bytes for t in sel),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "checkpoint": self.location if self.source == "checkpoint" else None,
            "preset": self.preset,
            "config": self.config.to_json_dict(),
            "mesh": {"data": self.plan.data, "model": self.plan.model},
            "layout": self.layout,
            "totals": self.totals(),
            "tensors": [t.to_json() for t in self.selected],
            "plan": self.plan.to_json(),
        }


def inspect(
    checkpoint: str | None = None,
    preset: str | None = None,
    mesh: tuple[int, int] = (1, 1),
    layout: str = default("layout"),
    batch: int = 1,
    seq_len: int | None = None,
    device_memory: int | None = None,
    device_memory_source: str = "not given",
    pattern: str | None = None,
    layer: int | None = None,
    moe: str = default("moe"),
    bits: int | None = None,
    group_size: int | None = None,
) -> Report:
    """The whole report. With `checkpoint`, from its index (headers only); else from `preset`
    (`bits` / `group_size`: plan a native checkpoint quantized that way)."""
    from grokctl.config import load_model_config

    if checkpoint is not None:
        if bits is not None or group_size is not None:
            raise UsageError(
                "--bits and --group-size plan from a --preset; a checkpoint has its own"
            )
        index = CheckpointIndex.open(checkpoint, preset=preset)
        cfg, raw = index.config, tensors_from_index(index)
        source, location = "checkpoint", str(index.root)
    elif preset is not None:
        cfg = load_model_config(None, preset)
        raw = tensors_from_config(cfg, bits or 8, group_size)
        source, location = "preset", preset
    else:
        raise UsageError("nothing to inspect: give a checkpoint DIR or --preset NAME")
    shd.rules(layout)  # validates the layout name
    if moe not in ("sparse", "dense"):
        raise UsageError(f"unknown --moe {moe!r}; choose one of: sparse, dense")
    sizes = shd.mesh_sizes(*mesh)
    placed = [place(t, sizes, layout) for t in raw]
    if layer is not None and not 0 <= layer < cfg.num_layers:
        raise UsageError(f"--layer {layer}: the model has layers 0..{cfg.num_layers - 1}")
    plan = plan_memory(
        cfg,
        placed,
        mesh[0],
        mesh[1],
        batch,
        seq_len or cfg.sequence_len,
        layout,
        moe,
        device_memory,
        device_memory_source,
    )
    selected = select(placed, pattern, layer)
    return Report(source, location, cfg, layout, placed, selected, plan, preset)


def rules_table(layout: str = default("layout")) -> list[dict[str, Any]]:
    """The partition rules as rows (pattern, spec, what it shards), parameters then activations."""
    rows: list[dict[str, Any]] = [
        {"kind": "parameter", "pattern": pattern, "spec": shd.spec_text(spec), "axes": list(spec)}
        for pattern, spec in shd.rules(layout)
    ]
    rows += [
        {"kind": "activation", "pattern": what, "spec": shd.spec_text(spec), "axes": list(spec)}
        for what, spec in shd.ACTIVATION_RULES
    ]
    return rows


def detect_device_memory() -> tuple[int | None, str, int]:
    """(bytes per device, where the number came from, local device count) of this machine."""
    import jax

    devices = jax.local_devices()
    stats = devices[0].memory_stats() or {}
    limit = stats.get("bytes_limit")
    kind = getattr(devices[0], "device_kind", devices[0].platform)
    if limit:
        return int(limit), f"detected: {len(devices)} x {kind} (bytes_limit)", len(devices)
    try:
        import psutil

        total = int(psutil.virtual_memory().total)
    except Exception:  # pragma: no cover - psutil is a dependency
        return None, "unknown (pass --device-memory)", len(devices)
    return (
        total // len(devices),
        f"detected: host RAM shared by {len(devices)} {kind} devices",
        len(devices),
    )


_UNITS = {"": GIB}
for _i, _p in enumerate("KMGT", 1):
    _UNITS.update({_p: 1024**_i, _p + "IB": 1024**_i, _p + "B": 1000**_i})


def parse_memory(text: str) -> int:
    """'80' (GiB), '80GiB', '80G' (binary), '80GB' (decimal), '512MiB', '1.5TB' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).upper() if m else ""
    if not m or unit not in _UNITS or float(m.group(1)) <= 0:
        raise UsageError(
            f"--device-memory {text!r}: expected a positive size such as 80 (GiB), 80GB or 24GiB"
        )
    return int(float(m.group(1)) * _UNITS[unit])
