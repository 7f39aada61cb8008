"""grokctl: get xAI's Grok-1 onto your machines and run it."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load_model(path: str, mesh: Any = None, **kwargs: Any) -> Any:
    """Load a checkpoint onto the local devices; see `grokctl.api.GrokModel`."""
    from grokctl.api import load_model as _load

    return _load(path, mesh=mesh, **kwargs)


def download(request: Any = None, hooks: Any = None, **fields: Any) -> Any:
    """Download the checkpoint (and tokenizer.model): a `grokctl.fetch.download.DownloadRequest`,
    or its fields as keywords (`grokctl.download(directory=Path("ckpt"), dry_run=True)`); see
    `grokctl.fetch.download.download`."""
    from grokctl.fetch.download import DownloadRequest
    from grokctl.fetch.download import download as _download

    return _download(request or DownloadRequest(**fields), hooks)


__all__ = ["__version__", "download", "load_model"]
