"""grokctl: get xAI's Grok-1 onto your machines and run it."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load_model(path: str, mesh: Any = None, **kwargs: Any) -> Any:
    """Load a checkpoint onto the local devices; see `grokctl.api.GrokModel`."""
    from grokctl.api import load_model as _load

    return _load(path, mesh=mesh, **kwargs)


__all__ = ["__version__", "load_model"]
