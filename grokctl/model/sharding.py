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
int8 scales [..., G, N] follow their weight's spec (G row blocks shard like the rows); when the
model axis does not divide G (e.g. 8 released scale blocks over 16 devices) the scales, a few
hundred KB, are replicated instead. Weights are replicated over `data`.

Activations and the KV cache use the specs below with `fit_spec`: an axis the mesh does not
divide (e.g. 8 KV heads over 16 devices) degrades to replication instead of failing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from grokctl.config import default
from grokctl.errors import UsageError

DATA, MODEL = "data", "model"
AXES = (DATA, MODEL)

Spec = tuple[str | None, ...]
Rule = tuple[str, Spec]

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

# KV cache [B, G, S, K], positions [B], key-valid mask [B, S]; tokens [B, T].
CACHE_KV: Spec = (DATA, MODEL, None, None)
CACHE_POS: Spec = (DATA,)
CACHE_VALID: Spec = (DATA, None)
TOKENS: Spec = (DATA, None)
REPLICATED: Spec = ()

ACTIVATION_RULES: tuple[tuple[str, Spec], ...] = (
    ("kv cache k/v [B, G, S, K]", CACHE_KV),
    ("cache positions [B]", CACHE_POS),
    ("cache valid mask [B, S]", CACHE_VALID),
    ("tokens [B, T]", TOKENS),
    ("sampled tokens [B], fetched logits", REPLICATED),
)


def rules(layout: str = default("layout")) -> tuple[Rule, ...]:
    if layout not in LAYOUTS:
        raise UsageError(f"unknown --layout {layout!r}; choose one of: {', '.join(LAYOUTS)}")
    return (EXPERT_PARALLEL_RULES + PARAM_RULES) if layout == "expert" else PARAM_RULES


def logical_spec(name: str, layout: str = default("layout")) -> Spec:
    for pattern, spec in rules(layout):
        if re.search(pattern, name):
            return spec
    raise KeyError(f"no partition rule matches parameter {name!r}")


def matching_rule(name: str, layout: str = default("layout")) -> str:
    """The pattern of the first rule that matches `name` (what `inspect --rules` shows)."""
    for pattern, _ in rules(layout):
        if re.search(pattern, name):
            return pattern
    raise KeyError(f"no partition rule matches parameter {name!r}")


def parse_mesh_shape(text: str) -> tuple[int, int]:
    """'DxM' -> (D, M), without looking at devices (plans for hardware one does not have)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX*]\s*(\d+)\s*", text)
    if not m:
        raise UsageError(f"--mesh {text!r}: expected DxM (data x model), e.g. 1x8")
    d, mm = int(m.group(1)), int(m.group(2))
    if d < 1 or mm < 1:
        raise UsageError(f"--mesh {text!r}: both sizes must be >= 1")
    return d, mm


def parse_mesh(text: str | None, n_devices: int) -> tuple[int, int]:
    """'DxM' -> (D, M) checked against `n_devices`; None -> (1, all devices)."""
    if text is None or text == "":
        return 1, n_devices
    d, mm = parse_mesh_shape(text)
    if d * mm != n_devices:
        raise UsageError(
            f"--mesh {text}: {d}x{mm} = {d * mm} devices, but {n_devices} are available "
            "(a mesh uses every device; hide the others, e.g. with CUDA_VISIBLE_DEVICES)"
        )
    return d, mm


def make_mesh(text: str | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """A data x model mesh over `devices` (default: every device of every process).

    Devices are laid out in process order, so on several hosts the model axis stays inside a
    host (fast links) whenever M divides the devices per host, and `data` spans the hosts.
    """
    devices = list(devices if devices is not None else jax.devices())
    d, m = parse_mesh(text, len(devices))
    devices.sort(key=lambda dev: (dev.process_index, dev.id))
    grid = np.array(devices, dtype=object).reshape(d, m)
    try:
        from jax.sharding import AxisType

        return Mesh(grid, AXES, axis_types=(AxisType.Auto, AxisType.Auto))
    except (ImportError, TypeError):  # older jax: every axis is automatic
        return Mesh(grid, AXES)


def mesh_shape(mesh: Mesh) -> dict[str, int]:
    return {str(k): int(v) for k, v in mesh.shape.items()}


def mesh_sizes(data: int, model: int) -> dict[str, int]:
    return {DATA: data, MODEL: model}


def checked_spec(
    name: str, shape: Sequence[int], spec: Sequence[str | None], mesh_sizes: dict[str, int]
) -> PartitionSpec:
    """PartitionSpec for `shape`, refusing a dimension that the mesh axis does not divide."""
    spec = tuple(spec)[: len(shape)]
    for dim, axis in zip(shape, spec, strict=False):
        if axis is not None and dim % mesh_sizes.get(axis, 1):
            raise UsageError(
                f"{name}: dimension {dim} of shape {list(shape)} does not divide over mesh axis "
                f"'{axis}' of size {mesh_sizes[axis]}; choose another --mesh"
            )
    return PartitionSpec(*spec)


def param_spec(
    name: str,
    shape: Sequence[int],
    mesh_sizes: dict[str, int],
    layout: str = default("layout"),
    scales: bool = False,
) -> PartitionSpec:
    """Spec of a parameter (or of its int8 scales [..., G, N], which follow the weight)."""
    spec = logical_spec(name, layout)
    if scales and len(spec) >= 2 and spec[-2] is not None and shape[-2] % mesh_sizes[spec[-2]]:
        # Fewer scale blocks than row shards: keep the (tiny) scales whole on every device.
        spec = (*spec[:-2], None, spec[-1])
    return checked_spec(name + (" scales" if scales else ""), shape, spec, mesh_sizes)


def fit_spec(shape: Sequence[int], spec: Spec, mesh_sizes: dict[str, int]) -> PartitionSpec:
    """Activation spec: axes that do not divide their dimension degrade to replication."""
    fixed = tuple(
        a if a is None or dim % mesh_sizes.get(a, 1) == 0 else None
        for dim, a in zip(shape, spec, strict=False)
    )
    return PartitionSpec(*fixed)


def named(mesh: Mesh, spec: Sequence[str | None] | PartitionSpec) -> NamedSharding:
    """NamedSharding of a table entry."""
    return NamedSharding(mesh, spec if isinstance(spec, PartitionSpec) else PartitionSpec(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (what every process can read back)."""
    return NamedSharding(mesh, PartitionSpec())


def shard_shape(
    shape: Sequence[int], spec: PartitionSpec, mesh_sizes: dict[str, int]
) -> tuple[int, ...]:
    out = []
    for i, dim in enumerate(shape):
        axis = spec[i] if i < len(spec) else None
        names = axis if isinstance(axis, tuple) else (axis,)
        out.append(dim // math.prod(mesh_sizes[a] for a in names if a))
    return tuple(out)


def spec_text(spec: PartitionSpec | Sequence[str | None]) -> str:
    """Compact form for tables: (None, model) -> '-, model'; replicated -> 'replicated'."""
    parts = list(spec)
    if not any(parts):
        return "replicated"
    return ", ".join("-" if p is None else str(p) for p in parts)
