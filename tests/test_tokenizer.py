"""Real SentencePiece: Grok-1's tokenizer reproduces the reference's ids; the demo one trains."""

from __future__ import annotations

import json
from pathlib import Path

from grokctl.tokenizer import Tokenizer, train_demo_tokenizer


def test_grok1_tokenizer_matches_reference(grok1_tokenizer: Path, grok_tiny: Path) -> None:
    tok = Tokenizer(grok1_tokenizer)
    golden = json.loads((grok_tiny / "tokenizer_golden.json").read_text())
    assert tok.vocab_size == golden["vocab_size"] == 131072
    for item in golden["items"]:
        assert tok.encode(item["text"]) == item["ids"], item["text"]
        assert tok.pieces(item["ids"]) == item["pieces"]
        assert tok.decode(item["ids"]) == item["decoded"]


def test_demo_tokenizer_uses_grok_special_ids(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.model"
    path.write_bytes(train_demo_tokenizer(1024))
    tok = Tokenizer(path)
    assert tok.pieces([0, 1, 2, 3]) == ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]
    assert 100 < tok.vocab_size <= 1024
    ids = tok.encode("The answer to life")
    assert ids and 0 not in ids and tok.decode(ids) == "The answer to life"
