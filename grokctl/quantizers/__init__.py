"""Weight quantizers over numpy arrays (`int8`: the release's symmetric per-block int8)."""
