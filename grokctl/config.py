"""The one config layer: model architecture presets and runtime settings.

Model architecture: a frozen `ModelConfig` with the reference's field names. Presets are named
constants; a `config.json` beside a checkpoint overrides the preset.

Runtime settings (paths, mesh, moe kernel, seed, ...) resolve in one place, for every command:
command-line flag > environment (`GROKCTL_<NAME>`) > `grokctl.toml` > default.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from grokctl.errors import IntegrityError, UsageError
from grokctl.paths import shown

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def ffn_size(emb_size: int, widening_factor: float) -> int:
    """The reference's expert hidden size: int(w*D)*2//3 rounded up to a multiple of 8."""
    size = int(widening_factor * emb_size) * 2 // 3
    return size + (8 - size) % 8


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Grok-1 architecture; field names as in the reference (`TransformerConfig`)."""

    emb_size: int
    key_size: int
    num_q_heads: int
    num_kv_heads: int
    num_layers: int
    vocab_size: int
    widening_factor: float
    attn_output_multiplier: float
    num_experts: int
    num_selected_experts: int
    embedding_multiplier_scale: float
    output_multiplier_scale: float
    pad_token: int = 0
    eos_token: int = 2
    sequence_len: int = 8192
    # Constants of the reference, kept explicit so tests and docs can name them.
    rms_norm_eps: float = 1e-5
    rope_base: float = 10000.0
    attn_logit_softcap: float = 30.0
    # Row blocks of the released int8 scales of the row-parallel weights
    # (`multi_head_attention/linear`, `moe/linear_1`): per-shard scales of the 8-way layout.
    row_parallel_scale_blocks: int = 8

    @property
    def ffn_size(self) -> int:
        return ffn_size(self.emb_size, self.widening_factor)

    def validate(self) -> ModelConfig:
        """Types, sane ranges and consistency (UsageError naming the key); a config.json that
        fails is an IntegrityError naming the file (`load_model_config`)."""
        for name, value in dataclasses.asdict(self).items():
            _check_field(name, value)
        for name in ("pad_token", "eos_token"):
            if getattr(self, name) >= self.vocab_size:
                raise UsageError(
                    f"{name} = {getattr(self, name)} is not below vocab_size = {self.vocab_size}"
                )
        if self.num_kv_heads > self.num_q_heads:
            raise UsageError(
                f"num_kv_heads = {self.num_kv_heads} exceeds num_q_heads = {self.num_q_heads}"
            )
        if self.ffn_size <= 0:
            raise UsageError(
                f"widening_factor = {self.widening_factor} gives an expert size of 0 "
                f"for emb_size = {self.emb_size}"
            )
        if self.num_q_heads % self.num_kv_heads:
            raise UsageError(
                f"num_q_heads={self.num_q_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.key_size % 2:
            raise UsageError(f"key_size={self.key_size} must be even (RoPE rotates halves)")
        if not 0 < self.num_selected_experts <= self.num_experts:
            raise UsageError("num_selected_experts must be in 1..num_experts")
        for name, dim in (("emb_size", self.emb_size), ("ffn_size", self.ffn_size)):
            if dim % self.row_parallel_scale_blocks:
                raise UsageError(
                    f"{name}={dim} is not a multiple of the {self.row_parallel_scale_blocks} "
                    "int8 scale blocks"
                )
        return self

    def to_json_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # --- sizes -------------------------------------------------------------------------------
    def param_count(self) -> int:
        d, f, e = self.emb_size, self.ffn_size, self.num_experts
        attn = d * self.key_size * (2 * self.num_q_heads + 2 * self.num_kv_heads)
        per_layer = attn + 3 * e * d * f + d * e + 4 * d
        return self.vocab_size * d + d + self.num_layers * per_layer

    def active_param_count(self) -> int:
        """Parameters touched per token: all but the unselected experts."""
        d, f = self.emb_size, self.ffn_size
        idle = (self.num_experts - self.num_selected_experts) * 3 * d * f
        return self.param_count() - self.num_layers * idle


_MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}

# Sane bounds, far beyond any Grok-shaped model yet small enough that nothing derived from them
# (the layout, its 12 files per layer, the cache) can take minutes or overflow.
_INT_RANGES: dict[str, tuple[int, int]] = {
    "emb_size": (1, 1 << 16),
    "key_size": (2, 1024),
    "num_q_heads": (1, 1024),
    "num_kv_heads": (1, 1024),
    "num_layers": (1, 1024),
    "vocab_size": (1, 1 << 20),
    "num_experts": (1, 1024),
    "num_selected_experts": (1, 1024),
    "pad_token": (0, (1 << 20) - 1),
    "eos_token": (0, (1 << 20) - 1),
    "sequence_len": (1, 1 << 20),
    "row_parallel_scale_blocks": (1, 1024),
}
# (exclusive lower bound, inclusive upper bound)
_FLOAT_RANGES: dict[str, tuple[float, float]] = {
    "widening_factor": (0.0, 64.0),
    "attn_output_multiplier": (0.0, 1e6),
    "embedding_multiplier_scale": (0.0, 1e6),
    "output_multiplier_scale": (0.0, 1e6),
    "rms_norm_eps": (0.0, 1.0),
    "rope_base": (1.0, 1e12),
    "attn_logit_softcap": (0.0, 1e6),
}


def _check_field(name: str, value: Any) -> None:
    """UsageError naming `name` unless `value` has its type (an int is an int: not a float, a
    string or a bool) and lies in its range."""
    if name in _INT_RANGES:
        lo, hi = _INT_RANGES[name]
        if not isinstance(value, int) or isinstance(value, bool):
            raise UsageError(f"{name} = {_shown(value)}: expected an integer in {lo}..{hi}")
        if not lo <= value <= hi:
            raise UsageError(f"{name} = {value}: out of range {lo}..{hi}")
    elif name in _FLOAT_RANGES:
        lo_f, hi_f = _FLOAT_RANGES[name]
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise UsageError(f"{name} = {_shown(value)}: expected a number")
        if not (math.isfinite(value) and lo_f < value <= hi_f):
            raise UsageError(f"{name} = {value!r}: out of range ({lo_f:g}, {hi_f:g}]")


def _shown(value: Any) -> str:
    return shown(json.dumps(value) if isinstance(value, str) else repr(value), 60)


PRESETS: dict[str, ModelConfig] = {
    # The released Grok-1 (xai-org/grok-1 run.py).
    "grok-1": ModelConfig(
        emb_size=48 * 128,
        key_size=128,
        num_q_heads=48,
        num_kv_heads=8,
        num_layers=64,
        vocab_size=128 * 1024,
        widening_factor=8,
        attn_output_multiplier=0.08838834764831845,
        num_experts=8,
        num_selected_experts=2,
        embedding_multiplier_scale=78.38367176906169,
        output_multiplier_scale=0.5773502691896257,
        sequence_len=8192,
    ),
    # The shape of ../shared/fixtures/grok-tiny (tests).
    "grok-tiny": ModelConfig(
        emb_size=128,
        key_size=8,
        num_q_heads=16,
        num_kv_heads=8,
        num_layers=2,
        vocab_size=512,
        widening_factor=2.0,
        attn_output_multiplier=0.35355339059327373,
        num_experts=8,
        num_selected_experts=2,
        embedding_multiplier_scale=128**0.5,
        output_multiplier_scale=0.5773502691896257,
        sequence_len=128,
    ),
    # `make demo`: small enough for a laptop CPU, real Grok-1 structure (GQA 4:1, 8 experts top-2).
    "grok-demo": ModelConfig(
        emb_size=256,
        key_size=32,
        num_q_heads=8,
        num_kv_heads=2,
        num_layers=4,
        vocab_size=1024,
        widening_factor=4.0,
        attn_output_multiplier=32**-0.5,
        num_experts=8,
        num_selected_experts=2,
        embedding_multiplier_scale=256**0.5,
        output_multiplier_scale=0.5773502691896257,
        sequence_len=1024,
    ),
    # Benchmarks: Grok-1 proportions scaled down (D=1024, 8 layers); ~1.2 GB int8.
    "grok-bench": ModelConfig(
        emb_size=1024,
        key_size=64,
        num_q_heads=16,
        num_kv_heads=4,
        num_layers=8,
        vocab_size=8192,
        widening_factor=8.0,
        attn_output_multiplier=64**-0.5,
        num_experts=8,
        num_selected_experts=2,
        embedding_multiplier_scale=1024**0.5,
        output_multiplier_scale=0.5773502691896257,
        sequence_len=2048,
    ),
}

CONFIG_FILENAME = "config.json"


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise UsageError(
            f"unknown preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}"
        ) from None


def model_config_from_dict(data: dict[str, Any], base: ModelConfig) -> ModelConfig:
    """Override `base` with the known keys of `data` (unknown keys, e.g. `derived`, ignored)."""
    overrides = {k: v for k, v in data.items() if k in _MODEL_FIELDS}
    return dataclasses.replace(base, **overrides).validate()


def load_model_config(
    checkpoint_dir: str | Path | None, preset_name: str | None = None
) -> ModelConfig:
    """Preset (default `grok-1`) overridden by `<checkpoint_dir>/config.json` when present."""
    base = preset(preset_name or "grok-1")
    if checkpoint_dir is None:
        return base.validate()
    path = Path(checkpoint_dir) / CONFIG_FILENAME
    try:
        st = path.stat()
    except FileNotFoundError:
        return base.validate()
    except OSError as exc:
        raise IntegrityError(f"{path}: cannot read ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode) or st.st_size > _CONFIG_MAX_BYTES:
        raise IntegrityError(f"{path}: not a regular file of at most {_CONFIG_MAX_BYTES} bytes")
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as exc:
        raise IntegrityError(f"{path}: not a readable JSON config ({_shown(str(exc))})") from None
    if not isinstance(data, dict):
        raise IntegrityError(f"{path}: expected a JSON object")
    try:
        return model_config_from_dict(data, base)
    except UsageError as exc:
        raise IntegrityError(f"{path}: {exc}") from None


_CONFIG_MAX_BYTES = 1 << 20


# --------------------------------------------------------------------------------------------
# Runtime settings: flag > GROKCTL_* environment > grokctl.toml > default
# --------------------------------------------------------------------------------------------

ENV_PREFIX = "GROKCTL_"
TOML_NAME = "grokctl.toml"


def toml_paths() -> list[Path]:
    """Where `grokctl.toml` is looked for: $GROKCTL_CONFIG, ./grokctl.toml, ~/.config/grokctl/."""
    explicit = os.environ.get(ENV_PREFIX + "CONFIG")
    if explicit:
        return [Path(explicit)]
    xdg = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config"))
    return [Path.cwd() / TOML_NAME, xdg / "grokctl" / TOML_NAME]


def load_toml() -> dict[str, Any]:
    for path in toml_paths():
        if path.is_file():
            try:
                with path.open("rb") as fh:
                    return tomllib.load(fh)
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise UsageError(f"{path}: invalid TOML ({exc})") from None
    return {}


def _convert(name: str, raw: Any, kind: Callable[[Any], Any], source: str) -> Any:
    if kind is bool and isinstance(raw, str):
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off", ""):
            return False
        raise UsageError(f"{source}: {name} expects a boolean, got {raw!r}")
    try:
        return kind(raw)
    except (TypeError, ValueError):
        raise UsageError(f"{source}: invalid value {raw!r} for {name}") from None


class Settings:
    """Resolves runtime settings for one command invocation.

    `get("mesh", flag_value, default)` returns the flag when given, else GROKCTL_MESH, else the
    `mesh` key of the command's table or the top level of grokctl.toml, else the default.
    """

    def __init__(self, command: str | None = None, toml: dict[str, Any] | None = None):
        self.command = command
        self._toml = load_toml() if toml is None else toml

    def get(
        self,
        name: str,
        flag: Any = None,
        default: Any = None,
        kind: Callable[[Any], Any] | None = None,
    ) -> Any:
        kind = kind or (type(default) if default is not None else str)
        if flag is not None:
            return flag
        env_name = ENV_PREFIX + name.upper().replace("-", "_")
        if env_name in os.environ:
            return _convert(name, os.environ[env_name], kind, env_name)
        key = name.replace("-", "_")
        table = self._toml.get(self.command, {}) if self.command else {}
        for scope, where in ((table, f"[{self.command}]"), (self._toml, "top level")):
            if isinstance(scope, dict) and key in scope and not isinstance(scope[key], dict):
                return _convert(name, scope[key], kind, f"{TOML_NAME} {where}")
        return default
