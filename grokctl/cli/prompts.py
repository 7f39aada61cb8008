"""Where `generate`'s prompts come from: --prompt, --prompts-file (or '-'), --token-ids, or
stdin when it is piped; text must be UTF-8 (an error names the line of the first bad byte)."""

from __future__ import annotations

import sys
from pathlib import Path

from grokctl.errors import MissingResourceError, UsageError


def parse_token_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise UsageError(
            f"--token-ids {text!r}: expected comma-separated integers, e.g. 1,2,3"
        ) from None
    if not ids:
        raise UsageError("--token-ids is empty")
    return ids


def decode_utf8(data: bytes, what: str) -> str:
    """UTF-8 text, or a UsageError naming the line (1-based) of the first invalid byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        col = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise UsageError(
            f"{what}: line {line} is not UTF-8 text (byte 0x{data[exc.start]:02x} at column {col})"
        ) from None


def _stdin_bytes() -> bytes:
    stream = sys.stdin
    buf = getattr(stream, "buffer", None)
    if buf is not None:
        return bytes(buf.read())
    return stream.read().encode()


def read_prompts_file(path: Path) -> list[str]:
    what = "--prompts-file " + ("- (stdin)" if str(path) == "-" else str(path))
    try:
        data = _stdin_bytes() if str(path) == "-" else path.read_bytes()
    except OSError as exc:
        raise MissingResourceError(f"--prompts-file {path}: {exc.strerror}") from None
    prompts = [line for line in decode_utf8(data, what).splitlines() if line.strip()]
    if not prompts:
        raise UsageError(f"{what}: no prompts (one per line)")
    return prompts


def read_piped_prompt() -> str | None:
    """The prompt from stdin when it is piped (`echo hi | grokctl generate ...`), else None."""
    stream = sys.stdin
    if stream is None or stream.closed or stream.isatty():
        return None
    text = decode_utf8(_stdin_bytes(), "stdin")
    text = text[:-1] if text.endswith("\n") else text
    return text if text.strip() else None


def gather_prompts(
    prompt: list[str] | None, prompts_file: Path | None, token_ids: list[str] | None
) -> tuple[list[str], list[list[int]]]:
    """The text prompts (--prompt, --prompts-file, else piped stdin) and the --token-ids ones."""
    texts: list[str] = list(prompt or [])
    if prompts_file is not None:
        texts += read_prompts_file(prompts_file)
    id_prompts = [parse_token_ids(t) for t in token_ids or []]
    if not texts and not id_prompts:
        piped = read_piped_prompt()
        if piped is None:
            raise UsageError(
                "no prompt: give --prompt TEXT, --prompts-file FILE, --token-ids 1,2,3 "
                "or pipe the prompt on stdin"
            )
        texts.append(piped)
    return texts, id_prompts
