"""grokctl's native checkpoint format: safetensors shards + an index, as Hugging Face lays them out.

```
DST/config.json                          ModelConfig fields + "format": "grokctl-native",
                                         "format_version": 1, "quantization": {...} (below)
DST/model-00001-of-0000N.safetensors     shards of at most `max_shard_bytes` (default 5 GB)
DST/model.safetensors.index.json         {"metadata": {"total_size", "format", "format_version",
                                         "quantization"}, "weight_map": {key: shard file}}
DST/tokenizer.model                      copied from the source when it has one
DST/grokctl-manifest.json                every file's size and sha256 (fetch/manifest.py's format)
```
Keys (one per safetensors tensor):
- a plain array under its parameter path, e.g. `language_model/rms_norm/scale` (f32; the tied
  embedding table `language_model/in_out_embed/embeddings` f32 or bf16);
- a quantized weight [..., K, N] as `<path>.qweight` + `<path>.scales`:
  bits 8: qweight int8 [..., K, N]; bits 4: qweight uint8 [..., K/2, N], packed row i = row 2i in
  the low nibble and row 2i+1 in the high nibble, each a two's-complement 4-bit value;
  scales bf16 [..., G, N], one per column per group of K/G consecutive rows (the contracting axis,
  -2); value = q * scale (int8: exact; int4: rounded to bf16 — `quantize` writes int4 scales of
  INT4_SCALE_BITS significant bits, which makes the product exact);
- the embedding table in int8 per row: `.qweight` int8 [V, D] + `.scales` bf16 [V, 1]
  (quantization.embeddings = "int8"): row v = qweight[v] * scales[v].

`quantization` = {"bits": 8|4, "group_size": N | null (null: the release's scale blocks),
"group_axis": "contracting (-2)", "quantized": [parameter patterns], "embeddings": "f32"|"bf16"|
"int8"}. A tensor's actual group size is K / G from its scales' shape.

Each shard is a standard safetensors file (8-byte little-endian header length, JSON header,
data) that `safetensors.safe_open` reads; the writer streams one tensor at a time (the header
space is reserved up front and padded with spaces), so neither the model nor a shard is ever
held in memory. The reader parses headers only and hands out `ArrayRef`/`QuantRef`s.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_dtypes
import numpy as np

from grokctl.errors import UsageError

FORMAT = "grokctl-native"
FORMAT_VERSION = 1
INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_NAME = "tokenizer.model"
MAX_SHARD_BYTES = 5 * 10**9
EMBEDDINGS = "language_model/in_out_embed/embeddings"
QWEIGHT, SCALES = ".qweight", ".scales"
GROUP_AXIS = "contracting (-2)"
INT4_SCALE_BITS = 5  # significant bits of the int4 scales quantize writes: q * scale exact in bf16
QUANTIZED_PATTERNS = (
    "multi_head_attention/(query|key|value|linear)/w",
    "moe/(linear|linear_v|linear_1)/w",
)
EMBEDDING_KINDS = ("f32", "bf16", "int8")
HEADER_LIMIT = 100 << 20  # a header larger than this is corrupt (Grok-1's largest: ~1 KB)

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": BF16,
    "F64": np.dtype(np.float64),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "I16": np.dtype(np.int16),
    "I32": np.dtype(np.int32),
    "I64": np.dtype(np.int64),
}
CODES = {v: k for k, v in DTYPES.items()}


def shard_name(i: int, n: int) -> str:
    return f"model-{i:05d}-of-{n:05d}.safetensors"


@dataclasses.dataclass(frozen=True)
class QuantScheme:
    """What a native checkpoint stores: weight bits, nominal group size, embedding storage."""

    bits: int = 8
    group_size: int | None = None  # None: the release's scale blocks (lossless int8 repack)
    embeddings: str = "f32"

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise UsageError(f"--bits {self.bits}: choose 8 or 4")
        if self.group_size is not None and self.group_size < 2:
            raise UsageError(f"--group-size {self.group_size}: must be at least 2")
        if self.embeddings not in EMBEDDING_KINDS:
            raise UsageError(
                f"--embeddings {self.embeddings!r}: choose one of {', '.join(EMBEDDING_KINDS)}"
            )

    def to_json(self) -> dict[str, Any]:
        return {
            "bits": self.bits,
            "group_size": self.group_size,
            "group_axis": GROUP_AXIS,
            "quantized": list(QUANTIZED_PATTERNS),
            "embeddings": self.embeddings,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> QuantScheme:
        return cls(int(data["bits"]), data.get("group_size"), data.get("embeddings", "f32"))


def group_rows(k: int, group_size: int, bits: int = 4) -> int:
    """Rows per scale group for a contracting dimension of `k`: `group_size` when it divides
    `k`, else the largest divisor of `k` below it (for int4 an even one, so that a packed byte
    never straddles two groups; 0 when `k` has none)."""
    for g in range(min(group_size, k), 0, -1):
        if k % g == 0 and (bits == 8 or g % 2 == 0):
            return g
    return 0


# --- packing -----------------------------------------------------------------------------------


def pack_int4(q: np.ndarray) -> np.ndarray:
    """int8 values in [-8, 7], [..., K, N] -> uint8 [..., K/2, N] (row 2i low, 2i+1 high nibble)."""
    if q.shape[-2] % 2:
        raise UsageError(f"int4 packing needs an even contracting dimension, got {q.shape}")
    u = q.astype(np.uint8) & 0x0F
    return (u[..., 0::2, :] | (u[..., 1::2, :] << 4)).astype(np.uint8)


def unpack_int4(p: np.ndarray) -> np.ndarray:
    """uint8 [..., K/2, N] -> int8 [..., K, N] (numpy reference of the model's unpacking)."""
    lo = (p & 0x0F).astype(np.int8)
    hi = (p >> 4).astype(np.int8)
    lo = np.where(lo > 7, lo - 16, lo).astype(np.int8)
    hi = np.where(hi > 7, hi - 16, hi).astype(np.int8)
    out = np.stack([lo, hi], axis=-2)  # [..., K/2, 2, N]
    return out.reshape(*p.shape[:-2], p.shape[-2] * 2, p.shape[-1])


def native_config_json(cfg: Any, scheme: QuantScheme) -> dict[str, Any]:
    return {
        **cfg.to_json_dict(),
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "quantization": scheme.to_json(),
    }
