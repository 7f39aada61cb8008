"""The one scorer of the golden fixture (../shared/fixtures/grok-tiny), shared by every test that
compares logits with the reference's.

Acceptance rules and thresholds are the fixture's own (its README.md, config.json -> fixture ->
acceptance); they are read from the fixture, never restated or loosened here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

Pairs = list[tuple[np.ndarray, np.ndarray]]


def load_acceptance(fixture: Path) -> dict[str, float]:
    """The fixture's thresholds: atol, median_max_abs, mean_abs, frac_pos_within, ..."""
    return json.loads((fixture / "config.json").read_text())["fixture"]["acceptance"]


def score(pairs: Pairs, acc: dict[str, float]) -> dict[str, float]:
    """Rule 1, pooled over the valid positions of every (ours, reference) pair of [N, V] logits:
    median of the per-position max |diff|, mean |diff|, fraction of positions within atol."""
    d = np.concatenate([np.abs(a - b).max(-1) for a, b in pairs])
    mean_abs = float(np.mean(np.concatenate([np.abs(a - b).ravel() for a, b in pairs])))
    return {
        "median": float(np.median(d)),
        "mean_abs": mean_abs,
        "frac": float(np.mean(d <= acc["atol"])),
    }


def assert_rule1(pairs: Pairs, acc: dict[str, float], label: str = "") -> dict[str, float]:
    """Score `pairs` and assert the fixture's rule 1; returns the scores."""
    stats = score(pairs, acc)
    assert stats["median"] <= acc["median_max_abs"], (label, stats)
    assert stats["mean_abs"] <= acc["mean_abs"], (label, stats)
    assert stats["frac"] >= acc["frac_pos_within"], (label, stats)
    return stats
