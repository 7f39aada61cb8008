"""The config layer: presets, config.json overrides, flag > env > grokctl.toml > default."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from grokctl.config import PRESETS, Settings, ffn_size, load_model_config, preset
from grokctl.errors import IntegrityError, UsageError


def test_grok1_preset_is_the_release() -> None:
    cfg = preset("grok-1")
    assert (cfg.emb_size, cfg.num_layers, cfg.num_q_heads, cfg.num_kv_heads, cfg.key_size) == (
        6144,
        64,
        48,
        8,
        128,
    )
    assert cfg.ffn_size == 32768 and cfg.vocab_size == 131072 and cfg.sequence_len == 8192
    assert (cfg.num_experts, cfg.num_selected_experts) == (8, 2)
    assert round(cfg.param_count() / 1e9) == 316
    assert round(cfg.active_param_count() / 1e9) == 84


def test_ffn_size_rounds_up_to_multiple_of_8() -> None:
    assert ffn_size(128, 2.0) == 176  # int(256)*2//3 = 170 -> 176
    assert ffn_size(6144, 8) == 32768


def test_all_presets_validate() -> None:
    for cfg in PRESETS.values():
        cfg.validate()


def test_config_json_overrides_preset(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps({"num_layers": 3, "emb_size": 256, "derived": {"x": 1}})
    )
    cfg = load_model_config(tmp_path, "grok-demo")
    assert (
        cfg.num_layers == 3 and cfg.emb_size == 256 and cfg.key_size == preset("grok-demo").key_size
    )
    assert load_model_config(tmp_path / "absent").num_layers == 64  # no config.json: grok-1


def test_fixture_config_matches_tiny_preset(grok_tiny: Path) -> None:
    assert load_model_config(grok_tiny) == preset("grok-tiny")


def test_bad_config_json_is_an_integrity_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(IntegrityError, match="config.json"):
        load_model_config(tmp_path)


def test_settings_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml = tmp_path / "grokctl.toml"
    toml.write_text('mesh = "1x2"\nseed = 5\n[generate]\nmesh = "2x4"\n')
    monkeypatch.setenv("GROKCTL_CONFIG", str(toml))
    monkeypatch.delenv("GROKCTL_MESH", raising=False)
    assert Settings("generate").get("mesh") == "2x4"  # command table beats top level
    assert Settings("inspect").get("mesh") == "1x2"  # top level
    assert Settings("inspect").get("seed", None, 0) == 5
    assert Settings("inspect").get("absent", None, "dflt") == "dflt"
    monkeypatch.setenv("GROKCTL_MESH", "1x8")
    assert Settings("generate").get("mesh") == "1x8"  # env beats toml
    assert Settings("generate").get("mesh", "4x2") == "4x2"  # flag beats env
    monkeypatch.setenv("GROKCTL_SEED", "notanint")
    with pytest.raises(UsageError, match="GROKCTL_SEED"):
        Settings("generate").get("seed", None, 0)


def test_invalid_toml_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "grokctl.toml"
    bad.write_text("mesh = = 3")
    monkeypatch.setenv("GROKCTL_CONFIG", str(bad))
    with pytest.raises(UsageError, match="grokctl.toml"):
        Settings("generate")
