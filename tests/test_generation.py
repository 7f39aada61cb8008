"""Generation's decode loop: pipelined steps give exactly the tokens of one step at a time."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import jax
import numpy as np
import pytest

import grokctl
from grokctl import routing
from grokctl.generation import Completion, SamplingParams, generate
from grokctl.model.sharding import make_mesh


def _run(engine, prompts, params: SamplingParams, sequential: bool) -> list[Completion]:  # type: ignore[no-untyped-def]
    """`sequential`: inside a routing collection, where the loop runs one step at a time."""
    if not sequential:
        return generate(engine, prompts, params)
    with routing.collect(engine):
        return generate(engine, prompts, params)


def _content(cs: list[Completion]) -> list[tuple[object, ...]]:
    """What was generated (not how fast)."""
    return [(c.token_ids, c.finish_reason, c.logprobs) for c in cs]


@pytest.mark.parametrize("mesh", ["1x1", "2x4"])
def test_pipelined_decode_equals_one_step_at_a_time(grok_tiny: Path, mesh: str) -> None:
    """Sampled (temperature, top-k, per-row seeds, logprobs) generation of two prompts of
    different lengths, one of them ending at an EOS in the middle while the other goes on: the
    step dispatched ahead of that EOS is discarded, and every token, finish reason and logprob
    equals the step-at-a-time loop's."""
    devices = jax.devices()[:1] if mesh == "1x1" else jax.devices()
    model = grokctl.load_model(grok_tiny, mesh=make_mesh(mesh, devices))
    engine = model.engine
    rng = np.random.default_rng(4)
    prompts = [rng.integers(3, 512, n).tolist() for n in (5, 19)]
    params = SamplingParams(
        max_tokens=9, temperature=0.9, top_k=40, seed=7, stop_at_eos=False, logprobs=2
    )
    free = _run(engine, prompts, params, sequential=False)
    assert _content(free) == _content(_run(engine, prompts, params, sequential=True))
    assert all(len(c.token_ids) == 9 and c.finish_reason == "length" for c in free)

    # The first prompt's 4th token made the EOS: it stops there, the other row does not.
    eos = free[0].token_ids[3]
    assert eos not in free[0].token_ids[:3] and eos not in free[1].token_ids
    engine.cfg = dataclasses.replace(engine.cfg, eos_token=eos)
    params = dataclasses.replace(params, stop_at_eos=True)
    pipelined = _run(engine, prompts, params, sequential=False)
    assert _content(pipelined) == _content(_run(engine, prompts, params, sequential=True))
    assert pipelined[0].token_ids == free[0].token_ids[:3]
    assert pipelined[0].finish_reason == "eos"
    assert pipelined[1].token_ids == free[1].token_ids


@pytest.mark.parametrize(("mesh", "k"), [("1x1", 3), ("2x4", 4)])
def test_decode_steps_per_call_give_the_tokens_of_one_step_at_a_time(
    grok_tiny: Path, mesh: str, k: int
) -> None:
    """`decode_steps` steps in one program (each step samples on the device and feeds its token
    to the next): the same tokens and finish reasons as one step at a time, for sampled rows of
    different lengths, a row ending at an EOS inside a call (the steps after it discarded), 9
    tokens (calls of k steps and a shorter last one), and a row whose context fills mid-call."""
    devices = jax.devices()[:1] if mesh == "1x1" else jax.devices()
    engine = grokctl.load_model(grok_tiny, mesh=make_mesh(mesh, devices)).engine
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 512, n).tolist() for n in (5, 19)]
    params = SamplingParams(
        max_tokens=9, temperature=0.9, top_k=40, seed=3, stop_at_eos=False, decode_steps=k
    )

    def one(params: SamplingParams) -> SamplingParams:
        return dataclasses.replace(params, decode_steps=1)

    before = engine.compile_count
    burst = generate(engine, prompts, params)
    assert engine.compile_count - before >= 1  # the k-step program ran
    assert _content(burst) == _content(generate(engine, prompts, one(params)))
    assert _content(burst) == _content(_run(engine, prompts, params, sequential=True))
    assert all(len(c.token_ids) == 9 for c in burst)

    # The second prompt's 5th token (inside the second call) made the EOS.
    eos = burst[1].token_ids[4]
    assert eos not in burst[1].token_ids[:4] and eos not in burst[0].token_ids
    engine.cfg = dataclasses.replace(engine.cfg, eos_token=eos)
    params = dataclasses.replace(params, stop_at_eos=True)
    ended = generate(engine, prompts, params)
    assert _content(ended) == _content(generate(engine, prompts, one(params)))
    assert ended[1].token_ids == burst[1].token_ids[:4] and ended[1].finish_reason == "eos"
    assert ended[0].token_ids == burst[0].token_ids

    # A prompt 6 tokens short of the context: it takes 6 tokens (finish "context").
    ctx = engine.cfg.sequence_len
    prompts = [rng.integers(3, 512, ctx - 6).tolist(), prompts[0]]
    params = dataclasses.replace(params, stop_at_eos=False)
    full = generate(engine, prompts, params)
    assert _content(full) == _content(generate(engine, prompts, one(params)))
    assert len(full[0].token_ids) == 6 and full[0].finish_reason == "context"


@pytest.mark.parametrize(("mesh", "native"), [("1x1", True), ("1x1", False), ("2x4", False)])
def test_decode_steps_loop_hoists_no_weight_work(
    grok_tiny: Path, mesh: str, native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """XLA moves loop-invariant work out of a loop, to run once per call: a weight's
    dequantization, or XLA:CPU's widening of a bf16 table gathered inside (3x slower steps on
    bench-l2 when it happened), would be materialised for every weight at once. With the native
    kernels and on XLA's paths (no kernels, a mesh), nothing bigger than a few rows is computed
    outside `Engine.decode_steps`' loop."""
    if not native:
        monkeypatch.setenv("GROKCTL_CPU_KERNELS", "0")
    devices = jax.devices()[:1] if mesh == "1x1" else jax.devices()
    eng = grokctl.load_model(grok_tiny, mesh=make_mesh(mesh, devices)).engine
    text = eng.compiled("decode_steps", eng.padded_batch(1), 32, tokens=4).as_text()
    assert " while(" in text
    entry = text[text.index("\nENTRY") :].splitlines()[1:]
    made = []
    for line in entry:
        m = re.search(r"= \w+\[([0-9,]+)\]", line)
        if m and "parameter(" not in line and "get-tuple-element(" not in line:
            if math.prod(int(n) for n in m.group(1).split(",")) >= 4096:
                made.append(line.strip()[:160])
    assert not made, made


def test_padded_prompt_gives_the_unpadded_logits(grok_tiny: Path) -> None:
    """A prompt in a longer bucket (its padding runs no expert) gives the last logits of the
    same prompt with no padding, through the native kernels on one device."""
    model = grokctl.load_model(grok_tiny, mesh=make_mesh("1x1", jax.devices()[:1]))
    engine = model.engine
    prompt = np.random.default_rng(11).integers(3, 512, 19).astype(np.int32)
    padded = np.zeros((1, 32), np.int32)
    padded[0, :19] = prompt
    lengths = np.array([19], np.int32)
    a, _ = engine.prefill(padded, lengths, engine.new_cache(1, 64))
    b, _ = engine.prefill(prompt[None, :], lengths, engine.new_cache(1, 64))
    a, b = np.asarray(a), np.asarray(b)
    # bf16 logits from f32 sums over other shapes (the bucket's): within two bf16 ulps of the
    # largest logit, the same top 5
    ulp = 2.0 ** (np.floor(np.log2(np.abs(b).max())) - 7)
    assert np.abs(a - b).max() <= 2 * ulp
    np.testing.assert_array_equal(np.argsort(-a[0])[:5], np.argsort(-b[0])[:5])
