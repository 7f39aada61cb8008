"""SentencePiece tokenizer: Grok-1's `tokenizer.model`, or a small one trained for demos."""

from __future__ import annotations

import io
import os
from importlib import resources
from pathlib import Path

from grokctl.errors import IntegrityError, MissingResourceError

TOKENIZER_FILENAME = "tokenizer.model"
GROK1_TOKENIZER_SHA256 = "5c69d7cbad192fa2c9d14e2a77fbfdc11597c68907b043ddb0260e3d28eddd7f"
GROK1_TOKENIZER_BYTES = 2_229_219


class Tokenizer:
    """Encodes as the reference runner does: `encode(text)` with no BOS/EOS added."""

    def __init__(self, path: str | os.PathLike[str]):
        import sentencepiece as spm

        self.path = Path(path)
        if not self.path.is_file():
            raise MissingResourceError(f"tokenizer not found: {self.path}")
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(str(self.path))
        except (OSError, RuntimeError) as exc:
            raise IntegrityError(f"{self.path}: not a SentencePiece model ({exc})") from None

    @property
    def vocab_size(self) -> int:
        return int(self._sp.GetPieceSize())

    def encode(self, text: str) -> list[int]:
        return list(self._sp.EncodeAsIds(text))

    def decode(self, ids: list[int]) -> str:
        ids = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
        return str(self._sp.DecodeIds(ids))

    def pieces(self, ids: list[int]) -> list[str]:
        return [str(self._sp.IdToPiece(int(i))) for i in ids]


def resolve_tokenizer_path(
    tokenizer: str | os.PathLike[str] | None, checkpoint: str | os.PathLike[str] | None
) -> Path:
    """`--tokenizer` if given, else `<checkpoint>/tokenizer.model`."""
    if tokenizer:
        return Path(tokenizer)
    if checkpoint is not None:
        for cand in (
            Path(checkpoint) / TOKENIZER_FILENAME,
            Path(checkpoint).parent / TOKENIZER_FILENAME,
        ):
            if cand.is_file():
                return cand
    raise MissingResourceError(
        f"no tokenizer: pass --tokenizer PATH or put {TOKENIZER_FILENAME} in the checkpoint "
        "directory (`grokctl download` fetches it), or give --token-ids"
    )


def train_demo_tokenizer(vocab_size: int) -> bytes:
    """A small SentencePiece model (ids 0..3 = [PAD] [BOS] [EOS] [UNK], as Grok-1's)."""
    import sentencepiece as spm

    corpus = resources.files("grokctl").joinpath("data/demo_corpus.txt").read_text()
    model = io.BytesIO()
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(corpus.splitlines()),
        model_writer=model,
        vocab_size=min(vocab_size, 512),
        model_type="bpe",
        byte_fallback=False,
        hard_vocab_limit=False,
        pad_id=0,
        bos_id=1,
        eos_id=2,
        unk_id=3,
        pad_piece="[PAD]",
        bos_piece="[BOS]",
        eos_piece="[EOS]",
        unk_piece="[UNK]",
        minloglevel=2,
        num_threads=1,
    )
    return model.getvalue()
