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
import re
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
    """Preset (default `grok-1`) overridden by `<checkpoint_dir>/config.json` when present.

    An explicit `preset_name` that contradicts config.json (a key of config.json with another
    value than the preset's) is a UsageError naming both."""
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
    if preset_name is not None:
        differ = [
            f"{k} {data[k]!r} there, {getattr(base, k)!r} in {preset_name}"
            for k in sorted(_MODEL_FIELDS)
            if k in data and data[k] != getattr(base, k)
        ]
        if differ:
            raise UsageError(
                f"--preset {preset_name} contradicts {path} ({'; '.join(differ[:3])}"
                f"{'; ...' if len(differ) > 3 else ''}): drop --preset, config.json describes "
                "the checkpoint"
            )
    try:
        return model_config_from_dict(data, base)
    except UsageError as exc:
        raise IntegrityError(f"{path}: {exc}") from None


_CONFIG_MAX_BYTES = 1 << 20


def assumed_preset(root: str | Path, preset_name: str | None) -> str | None:
    """For a checkpoint without config.json: the preset assumed (None when config.json exists).

    Without an explicit preset grok-1 is assumed; when the tensor files found do not number the
    assumed preset's, an IntegrityError says so (rather than "720 of 770 tensor files missing")
    and names the presets that would match."""
    root = Path(root)
    if (root / CONFIG_FILENAME).exists():
        return None
    name = preset_name or "grok-1"
    if preset_name is not None:
        return name
    from grokctl.checkpoint.layout import param_specs

    ckpt = root / "ckpt-0" if (root / "ckpt-0").is_dir() else root
    found = len(list(ckpt.glob("tensor[0-9][0-9][0-9][0-9][0-9]_000")))
    want = len(param_specs(preset(name)))
    if found != want:
        fits = [p for p, c in PRESETS.items() if len(param_specs(c)) == found]
        hint = f" ({' or '.join(fits)} has {found})" if fits else ""
        raise IntegrityError(
            f"{root}: no config.json; assumed preset {name} ({want} tensors) but found {found} "
            f"tensor files{hint}; pass --preset NAME, add config.json, or finish the download"
        )
    return name


# --------------------------------------------------------------------------------------------
# Runtime settings: flag > GROKCTL_* environment > grokctl.toml > default
# --------------------------------------------------------------------------------------------

ENV_PREFIX = "GROKCTL_"
TOML_NAME = "grokctl.toml"
COMMANDS = ("download", "verify", "inspect", "generate", "random-checkpoint")
MESH_RE = re.compile(r"\s*(\d+)\s*[xX*]\s*(\d+)\s*")


@dataclasses.dataclass(frozen=True)
class Setting:
    """One runtime setting: its type, default, constraint and the commands that read it."""

    kind: type
    default: Any = None
    lo: float | None = None  # inclusive lower bound
    hi: float | None = None  # inclusive upper bound
    lo_open: bool = False  # lower bound exclusive
    choices: tuple[str, ...] = ()
    commands: tuple[str, ...] = COMMANDS
    many: bool = False  # a list (repeatable flag; a TOML array; one value from the environment)
    check: Callable[[Any], str | None] | None = None  # extra check: the problem, or None
    # (command, default) pairs where a command's default differs from `default`
    command_defaults: tuple[tuple[str, Any], ...] = ()

    def default_for(self, command: str | None) -> Any:
        """The default of this setting for `command` (its own, when it has one)."""
        return dict(self.command_defaults).get(command or "", self.default)

    @property
    def constraint(self) -> str:
        """The constraint in words, as `--help` shows it: ">= 1", "(0, 1]", "sparse|dense"."""
        if self.choices:
            return "|".join(self.choices)
        if self.lo is not None and self.hi is not None:
            return f"{'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}]"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
        return ""

    def problem(self, value: Any) -> str | None:
        """Why `value` (already of `kind`) is not allowed, or None."""
        values = value if self.many else [value]
        for v in values:
            if self.choices and v not in self.choices:
                return f"choose one of: {', '.join(self.choices)}"
            if self.lo is not None or self.hi is not None:
                low_bad = self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo)
                high_bad = self.hi is not None and v > self.hi
                if low_bad or high_bad or v != v:  # (NaN fails every range)
                    where = self.constraint
                    return f"must be in {where}" if self.hi is not None else f"must be {where}"
            if self.check is not None and (msg := self.check(v)):
                return msg
        return None


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _check_mesh(text: str) -> str | None:
    m = MESH_RE.fullmatch(text)
    if not m:
        return "expected DxM (data x model), e.g. 1x8"
    if int(m.group(1)) < 1 or int(m.group(2)) < 1:
        return "both sizes must be >= 1"
    return None


_GEN = ("generate",)
_DL = ("download",)
_RUN = ("generate", "inspect")

# The one table of runtime settings and their defaults: `--help` texts and Settings read it.
SETTINGS: dict[str, Setting] = {
    # every command
    "checkpoint": Setting(
        Path,
        None,
        command_defaults=(("download", Path("checkpoints")), ("verify", Path("checkpoints"))),
    ),
    "preset": Setting(
        str,
        None,
        choices=tuple(PRESETS),
        commands=COMMANDS[1:],
        command_defaults=(("random-checkpoint", "grok-demo"),),
    ),
    "seed": Setting(int, 0, commands=("generate", "random-checkpoint")),
    # the model on devices
    "mesh": Setting(str, None, check=_check_mesh, commands=_RUN),
    "moe": Setting(str, "sparse", choices=("sparse", "dense"), commands=_RUN),
    "layout": Setting(str, "tensor", choices=("tensor", "expert"), commands=_RUN),
    # generate
    "tokenizer": Setting(Path, None, commands=_GEN),
    "max_tokens": Setting(int, 64, lo=1, commands=_GEN),
    "temperature": Setting(float, 0.0, lo=0, commands=_GEN),
    "top_p": Setting(float, 1.0, lo=0, hi=1, lo_open=True, commands=_GEN),
    "top_k": Setting(int, 0, lo=0, commands=_GEN),
    "min_p": Setting(float, 0.0, lo=0, hi=1, commands=_GEN),
    "repeat_penalty": Setting(float, 1.0, lo=0, lo_open=True, commands=_GEN),
    "repeat_last_n": Setting(int, 64, lo=0, commands=_GEN),
    "logprobs": Setting(int, 0, lo=0, hi=20, commands=_GEN),
    "decode_steps": Setting(int, 4, lo=1, hi=64, commands=_GEN),
    "stop": Setting(str, (), many=True, commands=_GEN),
    "stream": Setting(bool, None, commands=_GEN),
    "coordinator": Setting(str, None, commands=_GEN),
    "num_processes": Setting(int, None, lo=1, commands=_GEN),
    "process_id": Setting(int, None, lo=0, commands=_GEN),
    "init_timeout": Setting(int, 300, lo=1, commands=_GEN),
    # inspect
    "batch": Setting(int, 1, lo=1, commands=("inspect",)),
    "seq_len": Setting(int, None, lo=1, commands=("inspect",)),
    "device_memory": Setting(str, None, commands=("inspect",)),
    # verify
    "workers": Setting(int, None, lo=1, commands=("verify",)),
    # download
    "repo": Setting(str, "xai-org/grok-1", commands=_DL),
    "revision": Setting(str, "main", commands=_DL),
    "magnet": Setting(
        str,
        "magnet:?xt=urn:btih:5f96d43576e3d386c9ba65b883210a393b68210e"
        "&tr=https%3A%2F%2Facademictorrents.com%2Fannounce.php"
        "&tr=udp%3A%2F%2Ftracker.coppersurfer.tk%3A6969"
        "&tr=udp%3A%2F%2Ftracker.opentrackr.org%3A1337%2Fannounce",
        commands=_DL,
    ),  # the official Grok-1 torrent
    "max_workers": Setting(int, 8, lo=1, commands=_DL),
    "retries": Setting(int, 5, lo=0, commands=_DL),
    "timeout": Setting(float, None, lo=0, commands=_DL),
    "tokenizer_url": Setting(str, None, commands=_DL),
    "listen": Setting(str, "0.0.0.0:6881,[::]:6881", commands=_DL),
    # random-checkpoint
    "layers": Setting(int, None, lo=1, commands=("random-checkpoint",)),
}


def default(name: str, command: str | None = None) -> Any:
    """The default of setting `name` (for `command`, when its default differs)."""
    return SETTINGS[name].default_for(command)


def help_suffix(name: str, default_text: str | None = None) -> str:
    """`(default: 64; >= 1; env GROKCTL_MAX_TOKENS)` for a `--help` text, from the table."""
    st = SETTINGS[name]
    parts = []
    shown = default_text if default_text is not None else st.default
    if shown not in (None, (), ""):
        parts.append(f"default: {shown}")
    if st.constraint and not st.choices:
        parts.append(st.constraint)
    parts.append(f"env {ENV_PREFIX}{name.upper()}")
    return f"({'; '.join(parts)})"


def toml_paths() -> list[Path]:
    """Where `grokctl.toml` is looked for: $GROKCTL_CONFIG, ./grokctl.toml, ~/.config/grokctl/."""
    explicit = os.environ.get(ENV_PREFIX + "CONFIG")
    if explicit:
        return [Path(explicit)]
    xdg = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config"))
    return [Path.cwd() / TOML_NAME, xdg / "grokctl" / TOML_NAME]


def load_toml() -> tuple[Path | None, dict[str, Any]]:
    """The first grokctl.toml found (its path and contents), its keys checked."""
    paths = toml_paths()
    explicit = os.environ.get(ENV_PREFIX + "CONFIG")
    for path in paths:
        if path.is_file():
            try:
                with path.open("rb") as fh:
                    data = tomllib.load(fh)
            except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
                raise UsageError(f"{path}: invalid TOML ({exc})") from None
            check_toml_keys(path, data)
            return path, data
    if explicit:
        raise UsageError(f"GROKCTL_CONFIG={explicit}: no such file")
    return None, {}


def _table_name(key: str) -> str | None:
    name = key.replace("_", "-")
    return name if name in COMMANDS else None


def check_toml_keys(path: Path, data: dict[str, Any]) -> None:
    """Unknown keys and tables are errors naming the file and the key (a typo is never silent)."""
    for key, value in data.items():
        command = _table_name(key)
        if isinstance(value, dict):
            if command is None:
                raise UsageError(
                    f"{path}: unknown table [{key}]; tables are the commands: {', '.join(COMMANDS)}"
                )
            for sub in value:
                st = SETTINGS.get(sub.replace("-", "_"))
                if st is None or command not in st.commands:
                    raise UsageError(f"{path}: [{key}] {sub}: unknown setting for {command}")
        elif key.replace("-", "_") not in SETTINGS:
            raise UsageError(f"{path}: {key}: unknown setting")


def _convert(raw: Any, st: Setting, source: str) -> Any:
    """`raw` (a string from the environment, a TOML value) as `st.kind`, checked."""
    if st.many:
        items = raw if isinstance(raw, list) else [raw]
        return tuple(_convert_one(v, st, source) for v in items)
    return _convert_one(raw, st, source)


def _convert_one(raw: Any, st: Setting, source: str) -> Any:
    kind = st.kind
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        low = str(raw).strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise UsageError(f"{source}: expected a boolean (true/false), got {raw!r}")
    if isinstance(raw, (dict, list)) or (isinstance(raw, bool) and kind is not bool):
        raise UsageError(f"{source}: expected {_KIND_WORDS[kind]}, got {raw!r}")
    if kind is int and isinstance(raw, float):
        raise UsageError(f"{source}: expected an integer, got {raw!r}")
    if kind in (str, Path) and not isinstance(raw, str):
        raise UsageError(f"{source}: expected {_KIND_WORDS[kind]}, got {raw!r}")
    try:
        value = Path(raw).expanduser() if kind is Path else kind(raw)
    except (TypeError, ValueError):
        raise UsageError(f"{source}: expected {_KIND_WORDS[kind]}, got {raw!r}") from None
    return value


_KIND_WORDS: dict[type, str] = {
    int: "an integer",
    float: "a number",
    str: "a string",
    Path: "a path",
    bool: "a boolean",
}

_UNSET: Any = object()


class Settings:
    """Resolves runtime settings for one command invocation.

    `get("mesh", flag_value)` returns the flag when given, else $GROKCTL_MESH, else the `mesh`
    key of the command's table or the top level of grokctl.toml, else the default of SETTINGS.
    Every value is type- and range-checked; an error names where the value came from (the flag,
    the variable, or the file and key). `source(name)` says where a resolved value came from.
    """

    def __init__(self, command: str | None = None, toml: dict[str, Any] | None = None):
        self.command = command
        if toml is None:
            self.toml_path, self._toml = load_toml()
        else:
            self.toml_path, self._toml = None, toml
        self._sources: dict[str, str] = {}

    def _toml_where(self, scope: str | None, key: str) -> str:
        path = self.toml_path or TOML_NAME
        return f"{path}: [{scope}] {key}" if scope else f"{path}: {key}"

    def get(
        self,
        name: str,
        flag: Any = None,
        default: Any = _UNSET,
        kind: Callable[[Any], Any] | None = None,
    ) -> Any:
        key = name.replace("-", "_")
        st = SETTINGS.get(key)
        if st is None:  # not in the table: an ad hoc setting of this kind
            k = kind or (type(default) if default not in (None, _UNSET) else str)
            st = Setting(k if isinstance(k, type) else str)
        if default is _UNSET:
            default = st.default_for(self.command)
        if flag is not None and not (st.many and len(flag) == 0):
            value, source = flag, "--" + key.replace("_", "-")
        else:
            found = self._lookup(key, st)
            if found is None:
                self._sources[key] = "default"
                return default
            value, source = found
        if source.startswith("--") and st.many:
            value = tuple(value)
        if (msg := st.problem(value)) is not None:
            if st.choices:
                raise UsageError(f"{source}: unknown {key.replace('_', ' ')} {value!r}; {msg}")
            raise UsageError(f"{source}: {msg}, got {value!r}")
        self._sources[key] = source
        return value

    def _lookup(self, key: str, st: Setting) -> tuple[Any, str] | None:
        env_name = ENV_PREFIX + key.upper()
        if os.environ.get(env_name, "") != "":  # set and not empty (`export X=` clears it)
            return _convert(os.environ[env_name], st, env_name), env_name
        scopes: list[tuple[str | None, Any]] = []
        if self.command:
            for table in (self.command, self.command.replace("-", "_")):
                if isinstance(self._toml.get(table), dict):
                    scopes.append((table, self._toml[table]))
        scopes.append((None, self._toml))
        for scope, values in scopes:
            for k in (key, key.replace("_", "-")):
                if k in values and not isinstance(values[k], dict):
                    where = self._toml_where(scope, k)
                    return _convert(values[k], st, where), where
        return None

    def source(self, name: str) -> str:
        """Where the value of `name` came from: "--mesh", "GROKCTL_MESH", "FILE: key", "default"."""
        return self._sources.get(name.replace("-", "_"), "--" + name.replace("_", "-"))
