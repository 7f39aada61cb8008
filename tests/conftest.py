"""Shared test set-up: 8 virtual CPU devices, the shared fixtures, small checkpoints."""

from __future__ import annotations

import os

# Before jax is imported anywhere: real sharding over 8 virtual CPU devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import signal  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# A run started in the background of a non-interactive shell (`make test &`) inherits SIGINT
# ignored, and so would every CLI a test spawns: the Ctrl-C tests would then wait in vain (seen:
# five of them failed that way). A child starts with SIGINT's default when this process handles it.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
GROK_TINY = SHARED / "fixtures" / "grok-tiny"
GROK1_TOKENIZER = SHARED / "grok-1" / "tokenizer.model"


@pytest.fixture(scope="session")
def grok_tiny() -> Path:
    if not (GROK_TINY / "golden.npz").is_file():
        pytest.skip(
            f"golden fixture not found at {GROK_TINY} (../shared/ is absent on a user's clone)"
        )
    return GROK_TINY


@pytest.fixture(scope="session")
def grok1_tokenizer() -> Path:
    if not GROK1_TOKENIZER.is_file():
        pytest.skip(f"Grok-1 tokenizer not found at {GROK1_TOKENIZER} (../shared/ is absent)")
    return GROK1_TOKENIZER


@pytest.fixture(scope="session")
def demo_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random-weight checkpoint (grok-demo preset, 2 layers) in the released format."""
    import dataclasses

    from grokctl.checkpoint.xai.writer import write_random_checkpoint
    from grokctl.config import preset

    cfg = dataclasses.replace(preset("grok-demo"), num_layers=2)
    return write_random_checkpoint(tmp_path_factory.mktemp("demo") / "ckpt", cfg, seed=0)


@pytest.fixture(autouse=True)
def _isolated_jax_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keep the persistent compilation cache inside the test run's temp area."""
    monkeypatch.setenv("GROKCTL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "jax-cache"))
