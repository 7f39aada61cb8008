"""Bring Grok-1's `tokenizer.model` next to the checkpoint, checked against its pinned sha256.

Sources, first that applies: a local copy (`--tokenizer-from PATH`), the hub repo when it lists
the file, else the xai-org/grok-1 source tree (`--tokenizer-url`, GROKCTL_TOKENIZER_URL).
"""

from __future__ import annotations

import dataclasses
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from grokctl.atomic import replace_into
from grokctl.errors import IntegrityError, MissingResourceError
from grokctl.fetch.common import partial_dir, prune_partial, sha256_file
from grokctl.fetch.http import HTTP_TIMEOUT_S, RETRIES, Transfer, part_path, transfer
from grokctl.fetch.manifest import FileRecord, Manifest
from grokctl.tokenizer import GROK1_TOKENIZER_BYTES, GROK1_TOKENIZER_SHA256, TOKENIZER_FILENAME

TOKENIZER_URL = "https://raw.githubusercontent.com/xai-org/grok-1/main/tokenizer.model"


@dataclasses.dataclass(frozen=True)
class TokenizerResult:
    path: str
    sha256: str
    size: int
    action: str  # "present" | "copied" | "downloaded"
    source: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_pinned(path: Path, what: str) -> str:
    size = path.stat().st_size
    digest = sha256_file(path)
    if size != GROK1_TOKENIZER_BYTES or digest != GROK1_TOKENIZER_SHA256:
        raise IntegrityError(
            f"{what}: not Grok-1's tokenizer.model (sha256 {digest}, {size} bytes; expected "
            f"{GROK1_TOKENIZER_SHA256}, {GROK1_TOKENIZER_BYTES} bytes)"
        )
    return digest


def fetch_tokenizer(
    root: Path,
    manifest: Manifest,
    *,
    from_path: Path | None = None,
    url: str = TOKENIZER_URL,
    headers: dict[str, str] | None = None,
    offline: bool = False,
    retries: int = RETRIES,
    timeout: float = HTTP_TIMEOUT_S,
    on_bytes: Callable[[int], None] | None = None,
    cancel: threading.Event | None = None,
) -> TokenizerResult:
    """Put the pinned tokenizer at `<root>/tokenizer.model` and record it in the manifest.

    `headers` go with the request (the hub's auth headers when `url` is the hub's own file;
    never send them to a third-party URL).
    """
    dest = root / TOKENIZER_FILENAME
    if dest.is_file() and dest.stat().st_size == GROK1_TOKENIZER_BYTES:
        try:
            digest = _check_pinned(dest, str(dest))
            return _record(manifest, dest, digest, "present", "local")
        except IntegrityError:
            pass  # a wrong file under the final name: replace it
    if from_path is not None:
        if not from_path.is_file():
            raise MissingResourceError(f"--tokenizer-from {from_path}: no such file")
        digest = _check_pinned(from_path, f"--tokenizer-from {from_path}")
        tmp = part_path(partial_dir(root), TOKENIZER_FILENAME, digest)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(from_path, tmp)
        replace_into(tmp, dest)
        return _record(manifest, dest, digest, "copied", f"file:{from_path.resolve()}")
    if offline:
        raise MissingResourceError(
            f"HF_HUB_OFFLINE is set and {dest} is missing: pass --tokenizer-from PATH"
        )
    from huggingface_hub.utils import get_session

    part = part_path(partial_dir(root), TOKENIZER_FILENAME, GROK1_TOKENIZER_SHA256)
    t = Transfer(
        TOKENIZER_FILENAME,
        url,
        dest,
        part,
        GROK1_TOKENIZER_BYTES,
        GROK1_TOKENIZER_SHA256,
        None,
        dict(headers or {}),
    )
    res = transfer(
        t, get_session(), retries=retries, timeout=timeout, on_bytes=on_bytes, cancel=cancel
    )
    return _record(manifest, dest, res.sha256, "downloaded", url)


def _record(
    manifest: Manifest, dest: Path, digest: str, action: str, source: str
) -> TokenizerResult:
    key = manifest.add_source(source, kind="tokenizer", url=source) if action != "present" else None
    rec = manifest.files.get(TOKENIZER_FILENAME)
    if rec is None or rec.sha256 != digest or action != "present":
        manifest.record(
            TOKENIZER_FILENAME, FileRecord(GROK1_TOKENIZER_BYTES, digest, "pinned", key)
        )
        manifest.mark_downloaded(TOKENIZER_FILENAME)
    manifest.save()
    prune_partial(dest.parent)
    return TokenizerResult(str(dest), digest, GROK1_TOKENIZER_BYTES, action, source)
