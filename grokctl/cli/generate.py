"""`grokctl generate`: text from one or several prompts, streaming on a terminal."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from grokctl.cli import options
from grokctl.cli.output import emit_json, err, human_bytes, info, progress
from grokctl.config import Settings
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


def read_prompts_file(path: Path) -> list[str]:
    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text()
    except OSError as exc:
        raise MissingResourceError(f"--prompts-file {path}: {exc.strerror}") from None
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UsageError(f"--prompts-file {path}: no prompts (one per line)")
    return prompts


def generate(
    prompt: Annotated[
        Optional[list[str]], typer.Option("--prompt", "-p", help="Prompt text; repeat for a batch.")
    ] = None,
    prompts_file: Annotated[
        Optional[Path], typer.Option("--prompts-file", help="One prompt per line ('-' = stdin).")
    ] = None,
    token_ids: Annotated[
        Optional[list[str]],
        typer.Option(
            "--token-ids",
            help="A prompt as token ids, e.g. 1,2,3 (no tokenizer needed); repeatable.",
        ),
    ] = None,
    checkpoint: options.Checkpoint = None,
    tokenizer: Annotated[
        Optional[Path],
        typer.Option(
            "--tokenizer", help="SentencePiece model (default: <checkpoint>/tokenizer.model)."
        ),
    ] = None,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", "-n", min=1, help="New tokens per prompt at most.")
    ] = 64,
    temperature: Annotated[
        float, typer.Option("--temperature", "-t", min=0.0, help="0 = greedy.")
    ] = 0.0,
    top_p: Annotated[
        float, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling mass.")
    ] = 1.0,
    top_k: Annotated[
        int, typer.Option("--top-k", min=0, help="Keep the k most likely tokens (0 = off).")
    ] = 0,
    seed: Annotated[int, typer.Option("--seed", help="Sampling seed.")] = 0,
    stop: Annotated[
        Optional[list[str]],
        typer.Option("--stop", help="Stop when this text appears (repeatable)."),
    ] = None,
    stream: Annotated[
        Optional[bool],
        typer.Option(
            "--stream/--no-stream", help="Stream tokens (default: single prompt on a terminal)."
        ),
    ] = None,
    preset: options.Preset = None,
    mesh: options.Mesh = None,
    moe: options.MoeKernel = None,
    layout: options.Layout = None,
    coordinator: options.Coordinator = None,
    num_processes: options.NumProcesses = None,
    process_id: options.ProcessId = None,
    json_out: options.Json = False,
    routing_report: Annotated[
        Optional[Path],
        typer.Option(
            "--routing-report",
            metavar="DIR",
            help="Write routing statistics of this run to DIR (routing.json, heatmaps).",
        ),
    ] = None,
) -> None:
    """Generate text from a Grok-1 checkpoint (int8 weights, sparse experts, KV cache)."""
    s = Settings("generate")
    ckpt = s.get("checkpoint", checkpoint, kind=Path)
    if ckpt is None:
        raise UsageError("no checkpoint: pass --checkpoint DIR (or set GROKCTL_CHECKPOINT)")
    texts: list[str] = list(prompt or [])
    if prompts_file is not None:
        texts += read_prompts_file(prompts_file)
    id_prompts = [parse_token_ids(t) for t in token_ids or []]
    if not texts and not id_prompts:
        raise UsageError("no prompt: give --prompt TEXT, --prompts-file FILE or --token-ids 1,2,3")

    from grokctl import distributed
    from grokctl.model.moe import check_kernel

    moe_kernel = check_kernel(s.get("moe", moe, "sparse"))

    multi = distributed.initialize(
        s.get("coordinator", coordinator),
        s.get("num_processes", num_processes, kind=int),
        s.get("process_id", process_id, kind=int),
        timeout_s=s.get("init_timeout", None, distributed.DEFAULT_TIMEOUT_S, kind=int),
    )
    primary = distributed.is_primary() if multi else True

    # Everything that can be refused is refused before minutes of weight loading.
    from grokctl.checkpoint.index import checkpoint_root
    from grokctl.config import load_model_config
    from grokctl.generation import SamplingParams, check_prompts
    from grokctl.tokenizer import Tokenizer, resolve_tokenizer_path

    root = checkpoint_root(ckpt)
    tokenizer_path = s.get("tokenizer", tokenizer, kind=Path)
    early = Tokenizer(resolve_tokenizer_path(tokenizer_path, root)) if texts else None
    encoded = [early.encode(t) for t in texts] if early else []
    check_prompts(load_model_config(root, s.get("preset", preset)), [*encoded, *id_prompts])
    SamplingParams(max_tokens, temperature, top_p, top_k, seed, tuple(stop or ())).validate()
    if routing_report is not None and primary:  # --routing-report: refuse before loading
        from grokctl.routing import check_report_dir

        check_report_dir(routing_report)

    from grokctl.api import load_model

    start = time.perf_counter()
    with progress("bytes", enabled=not json_out and primary) as bar:
        task = bar.add_task("loading weights", total=None)
        model = load_model(
            ckpt,
            mesh=s.get("mesh", mesh),
            moe=moe_kernel,
            layout=s.get("layout", layout, "tensor"),
            preset=s.get("preset", preset),
            tokenizer=early or tokenizer_path,  # the tokenizer already loaded, if any
            require_tokenizer=bool(texts),
            on_progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    st = model.load_stats
    if primary and not json_out:
        shape = model.mesh.shape
        who = f"process 0 of {distributed.process_count()}: " if multi else ""
        mine = " (this process's shards)" if multi else ""
        info(
            f"[dim]{who}loaded {human_bytes(st.bytes_read)}{mine} in {st.seconds:.2f}s "
            f"({st.gb_per_s:.2f} GB/s) onto a {shape['data']}x{shape['model']} mesh "
            f"(data x model); ready in {time.perf_counter() - start:.1f}s[/]"
        )

    all_prompts: list[list[int]] = [*encoded, *id_prompts]  # texts encoded once, above
    streaming = stream if stream is not None else (len(all_prompts) == 1 and sys.stdout.isatty())
    streaming = streaming and not json_out and primary and model.tokenizer is not None
    stops = tuple(stop or ())
    on_token = _Streamer(model.tokenizer.decode, stops) if streaming and model.tokenizer else None

    if on_token is not None and texts:
        err.print(texts[0], style="dim", end="")  # the prompt, then the completion streams on
    # --routing-report: summed inside the same prefill/decode programs (docs/routing.md)
    routing_rec = model.collect_routing() if routing_report is not None else None
    results = model.generate(
        all_prompts,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        stop=tuple(stop or ()),
        on_token=on_token,
    )
    for r, text in zip(results, texts):  # label the text prompts (they went in as ids)
        r.prompt = text
    if routing_rec is not None and routing_report is not None:
        _write_routing_report(routing_rec.stop(), routing_report, ckpt, primary, json_out)
    if not primary:
        return
    if json_out:
        for r in results:
            emit_json(r.to_json())
        return
    if on_token is not None:
        on_token.finish(results[0].text or "")
    for i, r in enumerate(results):
        if on_token is None:
            if len(results) > 1:
                err.rule(f"prompt {i}")
            body = r.text if r.text is not None else ",".join(map(str, r.token_ids))
            sys.stdout.write(body + "\n")
            sys.stdout.flush()
        info(
            f"[dim]{len(r.token_ids)} tokens, finish: {r.finish_reason}, prefill "
            f"{r.prefill_tokens_per_s:.1f} tok/s, decode {r.decode_tokens_per_s:.1f} tok/s, "
            f"compile {r.compile_seconds:.1f}s[/]"
        )


def _write_routing_report(
    stats: Any, out_dir: Path, ckpt: Path, primary: bool, quiet: bool
) -> None:
    from grokctl import routing

    if not primary:
        return
    meta = {"command": "generate", "checkpoint": str(ckpt)}
    paths = routing.write_report(out_dir, stats, meta)
    if not quiet:
        err.print(routing.summary_table(stats))
        info(f"[dim]routing report: {', '.join(str(p) for p in paths.values())}[/]")


class _Streamer:
    """Prints the growing text of row 0 as tokens arrive: whole characters only, and holding
    back a tail that could still turn into a stop string (which is never printed)."""

    def __init__(self, decode: Callable[[list[int]], str], stops: tuple[str, ...] = ()):
        self.decode = decode
        self.stops = tuple(s for s in stops if s)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.ids: list[int] = []
        self.shown = ""

    def __call__(self, row: int, token: int) -> None:
        if row != 0:
            return
        self.ids.append(token)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return
        cuts = [text.find(s) for s in self.stops if s in text]
        ready = text[: min(cuts)] if cuts else text[: len(text) - self.hold]
        if ready.startswith(self.shown) and len(ready) > len(self.shown):
            sys.stdout.write(ready[len(self.shown) :])
            sys.stdout.flush()
            self.shown = ready

    def finish(self, final: str) -> None:
        if final.startswith(self.shown):
            sys.stdout.write(final[len(self.shown) :])
        sys.stdout.write("\n")
        sys.stdout.flush()


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)
