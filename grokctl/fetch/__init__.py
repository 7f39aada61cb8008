"""Bringing the checkpoint onto the machine: Hugging Face (`hub`), BitTorrent (`torrent`), the
tokenizer (`tokenizer_fetch`), and the manifest they leave next to the files (`manifest`).

Every file is assembled under `<dir>/.grokctl-partial/` and renamed to its final name only when
it is complete and its checksum matches, so nothing partial ever sits under a final name.
"""
