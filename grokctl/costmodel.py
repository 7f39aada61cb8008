"""The cost model: bytes a decode step must read and FLOPs a token costs, in one place.

Shapes: B batch (rows decoded together), L layers, D emb, F ffn, E experts, k selected,
H/G q/kv heads, K key size, V vocab, c context position (keys a token attends to), d depth.

Weight bytes one decode step must read (a lower bound: what an ideal program touches):
    attention   4 projections per layer, whole                   (q, k, v, out)
    experts     3 matrices of min(E, k*B) experts per layer       (all E with --moe dense)
    router      D x E per layer;  norms  4 per layer + the final one
    unembed     the whole V x D table (the logits of every row read all of it)
    embed rows  B rows of the table (the input lookup)
each at its stored precision: int8 = K*N + 2 bytes per scale (bf16, G row blocks); int4 = K*N/2
packed + 2 bytes per group of `group_size` rows; bf16 = 2*K*N; f32 = 4*K*N. An int8 embedding
table is counted as V*D + a bf16 scale per row (2*V).
Bytes per token = bytes per step / B.
KV cache (bf16): stored  2*L*B*S*G*K*2 + B*(S+4)   (k and v, plus valid mask and positions)
                 read    2*L*B*d*G*K*2 + B*d       per decode step at depth d
FLOPs (multiply-add = 2) of one token at context position c:
    2*D*K*(2H + 2G)  +  4*H*K*c  +  2*D*E  +  6*k*D*F (6*E*D*F dense)  [+ 2*V*D with logits]
A prefill of T tokens after depth d computes logits for its last token only.

Counted from a checkpoint index (the bytes each entry stores) when one is given, otherwise
from the config and a `Precision`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from grokctl.checkpoint.layout import param_specs
from grokctl.config import ModelConfig
from grokctl.errors import UsageError

WEIGHT_FORMATS = ("int8", "int4", "bf16", "f32")
EMBEDDING_FORMATS = ("f32", "bf16", "int8")
_ITEMSIZE = {"f32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "float16": 2, "int8": 1}
PARTS = ("attention", "experts", "router", "norms", "unembed", "embed_rows")


@dataclasses.dataclass(frozen=True)
class Precision:
    """How the weights are stored: the released checkpoint is int8 weights, f32 embeddings."""

    weights: str = "int8"  # int8 (released block scales) | int4 | bf16 | f32
    group_size: int = 32  # int4 only: rows per bf16 scale
    embeddings: str = "f32"  # f32 | bf16 | int8 (+ a bf16 scale per row)

    def __post_init__(self) -> None:
        if self.weights not in WEIGHT_FORMATS:
            raise UsageError(f"unknown weight precision {self.weights!r}; one of {WEIGHT_FORMATS}")
        if self.embeddings not in EMBEDDING_FORMATS:
            raise UsageError(
                f"unknown embedding precision {self.embeddings!r}; one of {EMBEDDING_FORMATS}"
            )
        if self.group_size < 1:
            raise UsageError(f"int4 group size must be >= 1, got {self.group_size}")

    @property
    def label(self) -> str:
        w = f"int4/g{self.group_size}" if self.weights == "int4" else self.weights
        return f"{w} weights, {self.embeddings} embeddings"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {**dataclasses.asdict(self), "label": self.label}
        if self.weights != "int4":
            del out["group_size"]
        return out


def part_of(name: str) -> str:
    """Which cost-model part a checkpoint leaf belongs to."""
    if name.endswith("in_out_embed/embeddings"):
        return "unembed"
    if "/moe/" in name:
        return "experts"
    if "/multi_head_attention/" in name:
        return "attention"
    if "/router/" in name:
        return "router"
    if "rms_norm" in name:
        return "norms"
    raise ValueError(f"no cost-model part for parameter {name!r}")


def tensor_bytes(cfg: ModelConfig, precision: Precision | None = None) -> list[tuple[str, int]]:
    """(name, stored bytes) of every leaf of `cfg` at `precision`, from shapes alone."""
    p = precision or Precision()
    out = []
    for spec in param_specs(cfg):
        n = 1
        for dim in spec.shape:
            n *= dim
        if part_of(spec.name) == "unembed":
            v, _ = spec.shape
            size = n * _ITEMSIZE[p.embeddings] + (2 * v if p.embeddings == "int8" else 0)
        elif not spec.quantized:
            size = n * _ITEMSIZE[spec.dtype]
        elif p.weights == "int8":
            size = spec.nbytes()
        elif p.weights == "int4":
            *lead, k, cols = spec.shape
            groups = -(-k // p.group_size)
            size = (n + 1) // 2 + 2 * groups * cols * _prod(lead)
        else:
            size = n * _ITEMSIZE[p.weights]
        out.append((spec.name, size))
    return out


def index_tensor_bytes(index: Any) -> list[tuple[str, int]]:
    """(name, stored bytes) of every entry of an opened CheckpointIndex (weight + scales)."""
    return [(e.name, int(e.ref.nbytes)) for e in index]


def roofline_tensor_bytes(index: Any) -> list[tuple[str, int]]:
    """What a decode step *must* read at the checkpoint's weight precision: the stored bytes,
    except that the tied embedding table counts at the weights' width (one byte per element for
    an int8 model) when it is stored wider (the release keeps it f32; the reference computes
    with it in bf16 and the engine may hold it so). The roofline's denominator: what an
    engine at the bandwidth limit reads, not whatever this program happens to read."""
    out = index_tensor_bytes(index)
    emb = index.by_name()["language_model/in_out_embed/embeddings"]
    bits = max(
        (getattr(e.ref, "bits", 8) for e in index if part_of(e.name) == "experts" and e.quantized),
        default=16,
    )
    need = _prod(emb.ref.shape) * bits // 8 + (2 * emb.ref.shape[0] if bits <= 8 else 0)
    return [(n, min(b, need) if n == emb.name else b) for n, b in out]


def index_precision(index: Any) -> Precision:
    """The precision an index stores (released layout: int8 QuantRefs, float embeddings)."""
    by = index.by_name()
    emb = by["language_model/in_out_embed/embeddings"].dtype
    moe = next(e for e in index if part_of(e.name) == "experts")
    bits = getattr(moe.ref, "bits", 8)
    if moe.quantized:
        weights = "int4" if bits == 4 else "int8"
    else:
        weights = {"float32": "f32"}.get(moe.dtype, "bf16")
    group = moe.ref.weight.shape[-2] * 8 // bits // moe.ref.scales.shape[-2] if bits == 4 else 32
    return Precision(
        weights=weights,
        group_size=group,
        embeddings={"float32": "f32", "int8": "int8"}.get(emb, "bf16"),
    )


def _prod(xs: Iterable[int]) -> int:
    n = 1
    for x in xs:
        n *= x
    return n


def experts_read(cfg: ModelConfig, batch: int, moe: str = "sparse") -> int:
    """Experts of a layer a decode step of `batch` rows reads at most."""
    if moe == "dense":
        return cfg.num_experts
    return min(cfg.num_experts, cfg.num_selected_experts * batch)


@dataclasses.dataclass(frozen=True)
class DecodeBytes:
    """Weight bytes of one decode step, by part."""

    parts: dict[str, int]
    batch: int

    @property
    def per_step(self) -> int:
        return sum(self.parts.values())

    @property
    def per_token(self) -> float:
        return self.per_step / self.batch

    def to_json(self) -> dict[str, Any]:
        return {
            "per_step": self.per_step,
            "per_token": self.per_token,
            "batch": self.batch,
            "parts": dict(self.parts),
        }


def decode_weight_bytes(
    cfg: ModelConfig,
    batch: int = 1,
    moe: str = "sparse",
    precision: Precision | None = None,
    tensors: list[tuple[str, int]] | None = None,
) -> DecodeBytes:
    """Weight bytes a decode step of `batch` rows reads: from `tensors` (e.g.
    `index_tensor_bytes(index)`) when given, else from `cfg` at `precision`."""
    if batch < 1:
        raise UsageError(f"batch must be >= 1, got {batch}")
    if tensors is None:
        tensors = tensor_bytes(cfg, precision)
    e_read = experts_read(cfg, batch, moe)
    parts = dict.fromkeys(PARTS, 0)
    for name, size in tensors:
        part = part_of(name)
        if part == "experts":
            size = size * e_read // cfg.num_experts
        elif part == "unembed":
            parts["embed_rows"] += size * min(batch, cfg.vocab_size) // cfg.vocab_size
        parts[part] += size
    return DecodeBytes(parts, batch)


def kv_cache_bytes(cfg: ModelConfig, batch: int, length: int, kv_heads: int | None = None) -> int:
    """Bytes the KV cache of `batch` rows x `length` positions holds (`kv_heads` per device)."""
    g = cfg.num_kv_heads if kv_heads is None else kv_heads
    return 2 * cfg.num_layers * batch * length * g * cfg.key_size * 2 + batch * (length + 4)


def kv_read_bytes(cfg: ModelConfig, batch: int, depth: int) -> int:
    """KV-cache bytes a decode step reads at context `depth` (k, v and the valid mask)."""
    return 2 * cfg.num_layers * batch * depth * cfg.num_kv_heads * cfg.key_size * 2 + batch * depth


def token_flops(
    cfg: ModelConfig, context: float, moe: str = "sparse", logits: bool = True
) -> float:
    """FLOPs of one token attending to `context` keys (itself included)."""
    d, k = cfg.emb_size, cfg.key_size
    h, g = cfg.num_q_heads, cfg.num_kv_heads
    experts = cfg.num_experts if moe == "dense" else cfg.num_selected_experts
    per_layer = (
        2 * d * k * (2 * h + 2 * g)  # q, k, v, out projections
        + 4 * h * k * context  # q.k and p.v
        + 2 * d * cfg.num_experts  # router
        + 6 * experts * d * cfg.ffn_size  # linear, linear_v, linear_1
    )
    return cfg.num_layers * per_layer + (2 * cfg.vocab_size * d if logits else 0)


def prefill_flops(cfg: ModelConfig, tokens: int, depth: int = 0, moe: str = "sparse") -> float:
    """FLOPs of one row's prefill of `tokens` after `depth` cached tokens (last logits only)."""
    if tokens < 1:
        return 0.0
    mean_context = depth + (tokens + 1) / 2  # token i attends to depth + i keys
    body = tokens * token_flops(cfg, mean_context, moe, logits=False)
    return body + 2 * cfg.vocab_size * cfg.emb_size


def decode_flops(cfg: ModelConfig, depth: int = 0, moe: str = "sparse") -> float:
    """FLOPs of one decoded token after `depth` tokens (logits included)."""
    return token_flops(cfg, depth + 1, moe, logits=True)
