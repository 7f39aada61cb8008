"""Python API: `grokctl.load_model(path)` -> a model with `.logits(tokens)` and `.generate(...)`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from jax.sharding import Mesh

from grokctl.checkpoint.index import CheckpointIndex, checkpoint_root
from grokctl.config import ModelConfig, default
from grokctl.engine import Engine, enable_compilation_cache
from grokctl.generation import Completion, OnToken, SamplingParams, generate
from grokctl.loader import LoadStats, load_params
from grokctl.model.sharding import make_mesh
from grokctl.routing import Collection, RoutingStats, collect
from grokctl.tokenizer import Tokenizer, resolve_tokenizer_path


class GrokModel:
    def __init__(
        self,
        index: CheckpointIndex,
        engine: Engine,
        load_stats: LoadStats,
        tokenizer: Tokenizer | None,
    ):
        self.index = index
        self.engine = engine
        self.load_stats = load_stats
        self.tokenizer = tokenizer

    @property
    def config(self) -> ModelConfig:
        return self.engine.cfg

    @property
    def mesh(self) -> Mesh:
        return self.engine.mesh

    def logits(self, tokens: Any) -> np.ndarray:
        """Full forward pass: int32 [B, T] -> float32 [B, T, V]; pad id 0 masked as the reference."""
        padded, b = self._padded(tokens)
        out = self.engine.forward_all(padded)
        return self.engine.fetch(out.logits)[:b]

    def _padded(self, tokens: Any) -> tuple[np.ndarray, int]:
        toks = np.asarray(tokens, np.int32)
        if toks.ndim != 2:
            raise ValueError(f"tokens must be [B, T], got shape {toks.shape}")
        b = toks.shape[0]
        padded = np.zeros((self.engine.padded_batch(b), toks.shape[1]), np.int32)
        padded[:b] = toks
        return padded, b

    def routing(self, tokens: Any) -> tuple[np.ndarray, np.ndarray]:
        """Router probabilities [L, B, T, E] and chosen experts [L, B, T, k] of a full forward
        (a variant of the loaded engine's forward program, compiled once per shape)."""
        padded, b = self._padded(tokens)
        out = self.engine.forward_all(padded, raw_routing=True)
        return self.engine.fetch(out.router_probs)[:, :b], self.engine.fetch(out.experts)[:, :b]

    def routing_stats(self, tokens: Any) -> RoutingStats:
        """Routing statistics (docs/routing.md) of a full forward of int32 [B, T]; pad id 0 is
        not counted. Summed on the device; calling it again reuses the compiled program."""
        padded, _ = self._padded(tokens)
        with self.collect_routing() as rec:
            self.engine.forward_all(padded)
        return rec.stop()

    def collect_routing(self, stop_at_eos: bool = True) -> Collection:
        """Sum routing statistics over what runs until `.stop()` (or the `with` block ends):

        with model.collect_routing() as rec:
            model.generate(prompts)
        grokctl.routing.write_report("out/", rec.stats)"""
        return collect(self.engine, stop_at_eos)

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this model was loaded without a tokenizer")
        return self.tokenizer.encode(text)

    def generate(
        self,
        prompts: str | Sequence[str | Sequence[int]],
        max_tokens: int = default("max_tokens"),
        temperature: float = default("temperature"),
        top_p: float = default("top_p"),
        top_k: int = default("top_k"),
        seed: int = default("seed"),
        stop: Sequence[str] = default("stop"),
        on_token: OnToken | None = None,
        min_p: float = default("min_p"),
        repeat_penalty: float = default("repeat_penalty"),
        repeat_last_n: int = default("repeat_last_n"),
        logprobs: int = default("logprobs"),
        decode_steps: int = default("decode_steps"),
    ) -> list[Completion]:
        """Generate for one or several prompts (text, or lists of token ids), as one batch.

        Sampling as llama.cpp's: temperature (0 = greedy), top-k, top-p, min-p, and a repeat
        penalty over the last `repeat_last_n` tokens; `logprobs=N` records the top-N
        log-probabilities of every generated token. Ctrl-C ends unfinished prompts with finish
        reason "interrupted" (their tokens so far) instead of raising."""
        if isinstance(prompts, str):
            prompts = [prompts]
        texts: list[str | None] = []
        ids: list[list[int]] = []
        for p in prompts:
            if isinstance(p, str):
                texts.append(p)
                ids.append(self.encode(p))
            else:
                texts.append(None)
                ids.append([int(t) for t in p])
        params = SamplingParams(
            max_tokens,
            temperature,
            top_p,
            top_k,
            seed,
            tuple(stop),
            min_p=min_p,
            repeat_penalty=repeat_penalty,
            repeat_last_n=repeat_last_n,
            logprobs=logprobs,
            decode_steps=decode_steps,
        )
        decode = self.tokenizer.decode if self.tokenizer else None
        limit = self.tokenizer.vocab_size if self.tokenizer else None
        results = generate(self.engine, ids, params, decode, limit, on_token)
        for r, t in zip(results, texts):
            r.prompt = t
        return results


def load_model(
    path: str | os.PathLike[str],
    mesh: Mesh | str | None = None,
    moe: str = default("moe"),
    layout: str = default("layout"),
    preset: str | None = None,
    tokenizer: str | os.PathLike[str] | Tokenizer | None = None,
    require_tokenizer: bool = False,
    on_progress: Any = None,
) -> GrokModel:
    """Index the checkpoint, place its weights on `mesh` (default: all devices on 'model').

    `tokenizer`: a path, an already loaded Tokenizer, or None for <checkpoint>/tokenizer.model
    (optional unless `require_tokenizer`). It is resolved before any weight is loaded."""
    enable_compilation_cache()
    index = CheckpointIndex.open(path, preset=preset)
    tok = None
    if isinstance(tokenizer, Tokenizer):
        tok = tokenizer
    else:
        try:
            tok = Tokenizer(resolve_tokenizer_path(tokenizer, checkpoint_root(path)))
        except Exception:
            if require_tokenizer or tokenizer is not None:
                raise
    if not isinstance(mesh, Mesh):
        mesh = make_mesh(mesh)
    params, stats = load_params(index, mesh, layout, on_progress)
    engine = Engine(index.config, params, mesh, moe_kernel=moe)
    return GrokModel(index, engine, stats, tok)


__all__ = ["GrokModel", "load_model", "Path"]
