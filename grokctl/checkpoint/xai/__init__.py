"""The released Grok-1 format (xai-org/grok-1): `ckpt-0/tensorNNNNN_000`, one protocol-4 pickle
per parameter. `files` (naming and order), `safe_pickle` (the parser), `reader` (the index
reader behind `CheckpointIndex.open`), `writer` (the release pickler; random checkpoints),
`sizes` (every file's exact size; sparse full-size stand-ins)."""
