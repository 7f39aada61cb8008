"""The config layer: presets, config.json overrides, flag > env > grokctl.toml > default."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from grokctl.config import PRESETS, SETTINGS, Settings, ffn_size, load_model_config, preset
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
    cfg = load_model_config(tmp_path)
    assert cfg.num_layers == 3 and cfg.emb_size == 256 and cfg.key_size == preset("grok-1").key_size
    assert load_model_config(tmp_path / "absent").num_layers == 64  # no config.json: grok-1


def test_explicit_preset_contradicting_config_json_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"num_layers": 3}))
    with pytest.raises(
        UsageError, match=r"--preset grok-demo contradicts .*config.json.*num_layers"
    ):
        load_model_config(tmp_path, "grok-demo")
    (tmp_path / "config.json").write_text(json.dumps({"num_layers": 4}))  # agrees: fine
    assert load_model_config(tmp_path, "grok-demo") == preset("grok-demo")


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
    monkeypatch.delenv("GROKCTL_SEED", raising=False)
    assert Settings("generate").get("mesh") == "2x4"  # command table beats top level
    assert Settings("inspect").get("mesh") == "1x2"  # top level
    assert Settings("generate").get("seed") == 5
    assert Settings("generate").get("max_tokens") == SETTINGS["max_tokens"].default == 64
    monkeypatch.setenv("GROKCTL_MESH", "1x8")
    s = Settings("generate")
    assert s.get("mesh") == "1x8" and s.source("mesh") == "GROKCTL_MESH"  # env beats toml
    assert s.get("mesh", "4x2") == "4x2" and s.source("mesh") == "--mesh"  # flag beats env
    monkeypatch.setenv("GROKCTL_SEED", "notanint")
    with pytest.raises(UsageError, match="GROKCTL_SEED: expected an integer"):
        Settings("generate").get("seed")


@pytest.mark.parametrize(
    "name, env, needle",
    [
        ("max_tokens", "0", "GROKCTL_MAX_TOKENS: must be >= 1, got 0"),
        ("temperature", "-0.5", "GROKCTL_TEMPERATURE: must be >= 0"),
        ("top_p", "1.5", "GROKCTL_TOP_P: must be in (0, 1]"),
        ("top_p", "nan", "GROKCTL_TOP_P: must be in (0, 1]"),
        ("top_k", "2.5", "GROKCTL_TOP_K: expected an integer"),
        ("min_p", "2", "GROKCTL_MIN_P: must be in [0, 1]"),
        ("repeat_penalty", "0", "GROKCTL_REPEAT_PENALTY: must be > 0"),
        ("moe", "magic", "GROKCTL_MOE: unknown moe 'magic'"),
        ("mesh", "3by5", "GROKCTL_MESH: expected DxM"),
        ("stream", "maybe", "GROKCTL_STREAM: expected a boolean"),
    ],
)
def test_bad_environment_values_name_the_variable(
    name: str, env: str, needle: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("GROKCTL_CONFIG", str(tmp_path / "none.toml"))
    (tmp_path / "none.toml").write_text("")
    monkeypatch.setenv("GROKCTL_" + name.upper(), env)
    with pytest.raises(UsageError) as exc:
        Settings("generate").get(name)
    assert needle in str(exc.value)


def test_bad_toml_values_and_unknown_keys_name_the_file_and_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    toml = tmp_path / "grokctl.toml"
    monkeypatch.setenv("GROKCTL_CONFIG", str(toml))
    monkeypatch.delenv("GROKCTL_TOP_K", raising=False)
    toml.write_text("[generate]\ntop_k = -1\n")
    with pytest.raises(UsageError, match=rf"{toml}: \[generate\] top_k: must be >= 0, got -1"):
        Settings("generate").get("top_k")
    toml.write_text('[generate]\nstop = ["a", 3]\n')
    with pytest.raises(UsageError, match=r"\[generate\] stop: expected a string"):
        Settings("generate").get("stop")
    toml.write_text('[generate]\nstop = ["\\n\\n", "END"]\n')
    assert Settings("generate").get("stop") == ("\n\n", "END")
    for text, needle in (
        ("max_token = 3\n", f"{toml}: max_token: unknown setting"),
        ("[generate]\nretries = 3\n", f"{toml}: [generate] retries: unknown setting for generate"),
        ("[generat]\nseed = 3\n", f"{toml}: unknown table [generat]"),
    ):
        toml.write_text(text)
        with pytest.raises(UsageError) as exc:
            Settings("generate")
        assert needle in str(exc.value)


def test_invalid_toml_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "grokctl.toml"
    bad.write_text("mesh = = 3")
    monkeypatch.setenv("GROKCTL_CONFIG", str(bad))
    with pytest.raises(UsageError, match="grokctl.toml"):
        Settings("generate")
    bad.write_bytes(b"mesh = '\xff'")
    with pytest.raises(UsageError, match="grokctl.toml"):
        Settings("generate")
