"""The one table of partition rules, and the device mesh.

Mesh axes: `data` (batch) x `model` (tensor parallel). Every PartitionSpec in the project comes
from the tables below; nothing else builds one from literals.

Parameter shapes (D emb, F ffn, E experts, H*K q width, G*K kv width, V vocab):
  embeddings [V, D]                  -> shard D over model
  query/key/value w [D, H*K|G*K]     -> column parallel: shard outputs over model
  attention linear w [H*K, D]        -> row parallel: shard inputs over model (+ its 8 scale rows)
  moe linear, linear_v w [E, D, F]   -> shard F over model
  moe linear_1 w [E, F, D]           -> shard F over model (+ its 8 scale rows)
  router [D, E], norms [D]           -> replicated
With layout "expert", the MoE weights shard E over model instead (expert parallelism).
int8 scales [..., G, N] follow their weight's spec (G row blocks shard like the rows).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from grokctl.errors import UsageError

DATA, MODEL = "data", "model"
AXES = (DATA, MODEL)

Rule = tuple[str, tuple[str | None, ...]]

PARAM_RULES: tuple[Rule, ...] = (
    (r"in_out_embed/embeddings$", (None, MODEL)),
    (r"multi_head_attention/(query|key|value)/w$", (None, MODEL)),
    (r"multi_head_attention/linear/w$", (MODEL, None)),
    (r"moe/(linear|linear_v)/w$", (None, None, MODEL)),
    (r"moe/linear_1/w$", (None, MODEL, None)),
    (r"router/w$", (None, None)),
    (r"rms_norm(_\d+)?/scale$", (None,)),
)

EXPERT_PARALLEL_RULES: tuple[Rule, ...] = (
    (r"moe/(linear|linear_v|linear_1)/w$", (MODEL, None, None)),
)

LAYOUTS = ("tensor", "expert")

# KV cache [B, S, G, K], positions [B], key-valid mask [B, S]; tokens [B, T].
CACHE_KV = (DATA, None, MODEL, None)
CACHE_POS = (DATA,)
CACHE_VALID = (DATA, None)
TOKENS = (DATA, None)
REPLICATED: tuple[str | None, ...] = ()


def rules(layout: str = "tensor") -> tuple[Rule, ...]:
    if layout not in LAYOUTS:
        raise UsageError(f"unknown --layout {layout!r}; choose one of: {', '.join(LAYOUTS)}")
    return (EXPERT_PARALLEL_RULES + PARAM_RULES) if layout == "expert" else PARAM_RULES


def logical_spec(name: str, layout: str = "tensor") -> tuple[str | None, ...]:
    for pattern, spec in rules(layout):
        if re.search(pattern, name):
            return spec
    raise KeyError(f"no partition rule matches parameter {name!r}")


def parse_mesh(text: str | None, n_devices: int) -> tuple[int, int]:
    """'DxM' -> (D, M); None -> (1, all devices)."""
    if text is None or text == "":
        return 1, n_devices
    m = re.fullmatch(r"\s*(\d+)\s*[xX*]\s*(\d+)\s*", text)
    if not m:
        raise UsageError(f"--mesh {text!r}: expected DxM (data x model), e.g. 1x8")
    d, mm = int(m.group(1)), int(m.group(2))
    if d < 1 or mm < 1:
        raise UsageError(f"--mesh {text!r}: both sizes must be >= 1")
    if d * mm != n_devices:
        raise UsageError(
            f"--mesh {text}: {d}x{mm} = {d * mm} devices, but {n_devices} are available"
        )
    return d, mm


def make_mesh(text: str | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    d, m = parse_mesh(text, len(devices))
    grid = np.array(devices, dtype=object).reshape(d, m)
    try:
        from jax.sharding import AxisType

        return Mesh(grid, AXES, axis_types=(AxisType.Auto, AxisType.Auto))
    except (ImportError, TypeError):  # older jax: every axis is automatic
        return Mesh(grid, AXES)


def mesh_shape(mesh: Mesh) -> dict[str, int]:
    return {str(k): int(v) for k, v in mesh.shape.items()}


def checked_spec(
    name: str, shape: Sequence[int], spec: Sequence[str | None], mesh_sizes: dict[str, int]
) -> PartitionSpec:
    """PartitionSpec for `shape`, refusing a dimension that the mesh axis does not divide."""
    spec = tuple(spec)[: len(shape)]
    for dim, axis in zip(shape, spec):
        if axis is not None and dim % mesh_sizes.get(axis, 1):
            raise UsageError(
                f"{name}: dimension {dim} of shape {list(shape)} does not divide over mesh axis "
                f"'{axis}' of size {mesh_sizes[axis]}; choose another --mesh"
            )
    return PartitionSpec(*spec)


def param_spec(
    name: str, shape: Sequence[int], mesh_sizes: dict[str, int], layout: str = "tensor", scales: bool = False
) -> PartitionSpec:
    """Spec of a parameter (or of its int8 scales [..., G, N], which follow the weight)."""
    spec = logical_spec(name, layout)
    if scales and len(spec) >= 2 and spec[-2] is not None and shape[-2] % mesh_sizes[spec[-2]]:
        # Fewer scale blocks than row shards: keep the (tiny) scales whole on every device.
        spec = (*spec[:-2], None, spec[-1])
    return checked_spec(name + (" scales" if scales else ""), shape, spec, mesh_sizes)


def named(mesh: Mesh, spec: Sequence[str | None] | PartitionSpec) -> NamedSharding:
    """NamedSharding of a table entry; the data axis is dropped when it is 1."""
    return NamedSharding(mesh, spec if isinstance(spec, PartitionSpec) else PartitionSpec(*spec))


def shard_shape(shape: Sequence[int], spec: PartitionSpec, mesh_sizes: dict[str, int]) -> tuple[int, ...]:
    out = []
    for i, dim in enumerate(shape):
        axis = spec[i] if i < len(spec) else None
        div = math.prod(mesh_sizes[a] for a in (axis if isinstance(axis, tuple) else (axis,)) if a) if axis else 1
        out.append(dim // div)
    return tuple(out)
