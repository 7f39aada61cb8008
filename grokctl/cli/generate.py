"""`grokctl generate`: text from one or several prompts, streaming on a terminal."""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from grokctl.cli import options
from grokctl.cli.output import emit_json, err, human_bytes, info, mark_mid_line, progress, warn
from grokctl.cli.prompts import gather_prompts
from grokctl.config import Settings, help_suffix
from grokctl.errors import GrokctlError, UsageError

SAMPLING = "Sampling"


class Interrupted(GrokctlError):
    """Ctrl-C during generation: what was generated is printed, then exit 130."""

    exit_code = 130


def _opt(
    name: str, *flags: str, help: str, panel: str | None = SAMPLING, default_text: str | None = None
) -> Any:
    """An option whose default, constraint and variable come from the settings table."""
    return typer.Option(
        *flags,
        help=f"{help} {help_suffix(name, default_text)}",
        show_default=False,
        rich_help_panel=panel,
    )


def generate(
    directory: options.CheckpointArg = None,
    prompt: Annotated[
        Optional[list[str]],
        typer.Option(
            "--prompt", "-p", help="Prompt text; repeat for a batch. (default: stdin when piped)"
        ),
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
        _opt(
            "tokenizer",
            "--tokenizer",
            help="SentencePiece model.",
            panel=None,
            default_text="tokenizer.model in the checkpoint",
        ),
    ] = None,
    max_tokens: Annotated[
        Optional[int],
        _opt("max_tokens", "--max-tokens", "-n", help="New tokens per prompt at most."),
    ] = None,
    temperature: Annotated[
        Optional[float], _opt("temperature", "--temperature", "-t", help="0 = greedy.")
    ] = None,
    top_p: Annotated[
        Optional[float], _opt("top_p", "--top-p", help="Nucleus sampling mass.")
    ] = None,
    top_k: Annotated[
        Optional[int], _opt("top_k", "--top-k", help="Keep the k most likely tokens (0 = off).")
    ] = None,
    min_p: Annotated[
        Optional[float],
        _opt(
            "min_p",
            "--min-p",
            help="Drop tokens below this fraction of the top token's probability (0 = off).",
        ),
    ] = None,
    repeat_penalty: Annotated[
        Optional[float],
        _opt(
            "repeat_penalty",
            "--repeat-penalty",
            help="Divide positive (multiply negative) logits of recent tokens by this (1 = off).",
        ),
    ] = None,
    repeat_last_n: Annotated[
        Optional[int],
        _opt("repeat_last_n", "--repeat-last-n", help="Recent tokens the repeat penalty looks at."),
    ] = None,
    seed: Annotated[Optional[int], _opt("seed", "--seed", help="Sampling seed.")] = None,
    stop: Annotated[
        Optional[list[str]],
        _opt("stop", "--stop", help="Stop when this text appears (repeatable)."),
    ] = None,
    logprobs: Annotated[
        Optional[int],
        _opt(
            "logprobs",
            "--logprobs",
            help="With --json: the top-N log-probabilities of each new token.",
            panel=None,
        ),
    ] = None,
    decode_steps: Annotated[
        Optional[int],
        _opt(
            "decode_steps",
            "--decode-steps",
            help="Decode steps per device call: the host's cost of a call is shared by this "
            "many tokens, which then arrive together (the tokens are the same for any value).",
            panel=None,
        ),
    ] = None,
    stream: Annotated[
        Optional[bool],
        typer.Option(
            "--stream/--no-stream",
            help="Stream tokens as they come. "
            + help_suffix("stream", default_text="on for one prompt on a terminal"),
            show_default=False,
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
    """Generate text from a Grok-1 checkpoint (int8 weights, sparse experts, KV cache). With
    --json: one JSON object per prompt, one per line (JSON Lines)."""
    s = Settings("generate")
    run = _resolve(
        s, options.checkpoint(s, directory, checkpoint), tokenizer, json_out, stream,
        routing_report, preset, mesh, moe, layout,
        SamplingArgs(max_tokens, temperature, top_p, top_k, seed, stop, min_p, repeat_penalty,
                     repeat_last_n, logprobs, decode_steps),
    )  # fmt: skip
    texts, id_prompts = gather_prompts(prompt, prompts_file, token_ids)
    if run.params.logprobs and not json_out:
        warn("--logprobs is reported in --json output only")

    from grokctl import distributed

    multi = distributed.initialize(
        s.get("coordinator", coordinator),
        s.get("num_processes", num_processes),
        s.get("process_id", process_id),
        timeout_s=s.get("init_timeout"),
    )
    primary = distributed.is_primary() if multi else True
    early, all_prompts = _prepare(run, texts, id_prompts, primary)
    model = _load(s, run, early, need_tokenizer=bool(texts), primary=primary, multi=multi)
    results, streamer = _run(model, run, all_prompts, texts, primary)
    if run.routing_report is not None and results.routing is not None:
        _write_routing_report(results.routing, run.routing_report, run.checkpoint, primary,
                              json_out)  # fmt: skip
    if primary:
        _print_results(results.completions, streamer, json_out)
    if any(r.finish_reason == "interrupted" for r in results.completions):
        raise Interrupted("interrupted")


@dataclasses.dataclass(frozen=True)
class SamplingArgs:
    """The sampling flags as given (None: not on the command line)."""

    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    top_k: int | None
    seed: int | None
    stop: list[str] | None
    min_p: float | None
    repeat_penalty: float | None
    repeat_last_n: int | None
    logprobs: int | None
    decode_steps: int | None


@dataclasses.dataclass(frozen=True)
class GenerateRun:
    """Every setting of one `generate`, resolved (flag > GROKCTL_* > grokctl.toml > default)."""

    checkpoint: Path
    params: Any  # generation.SamplingParams
    tokenizer: Path | None
    stream: bool | None
    moe: str
    layout: str
    mesh: str | None
    preset: str | None
    json_out: bool
    routing_report: Path | None


def _resolve(
    s: Settings,
    ckpt: Path | None,
    tokenizer: Path | None,
    json_out: bool,
    stream: bool | None,
    routing_report: Path | None,
    preset: str | None,
    mesh: str | None,
    moe: str | None,
    layout: str | None,
    sampling: SamplingArgs,
) -> GenerateRun:
    """Options -> settings: each through `Settings` (defaults and ranges from the one table)."""
    from grokctl.generation import SamplingParams

    if ckpt is None:
        raise UsageError("no checkpoint: give CHECKPOINT or -c DIR (or set GROKCTL_CHECKPOINT)")
    values = {
        f.name: s.get(f.name, getattr(sampling, f.name)) for f in dataclasses.fields(sampling)
    }
    values["stop"] = tuple(values["stop"])
    return GenerateRun(
        checkpoint=ckpt,
        params=SamplingParams(**values).validate(),
        tokenizer=s.get("tokenizer", tokenizer),
        stream=s.get("stream", stream),
        moe=s.get("moe", moe),
        layout=s.get("layout", layout),
        mesh=s.get("mesh", mesh),
        preset=s.get("preset", preset),
        json_out=json_out,
        routing_report=routing_report,
    )


def _prepare(
    run: GenerateRun, texts: list[str], id_prompts: list[list[int]], primary: bool
) -> tuple[Any, list[list[int]]]:
    """Everything that can be refused, refused before minutes of weight loading: the config,
    the tokenizer, every prompt against the context, the routing report's directory. Returns
    the tokenizer (when text prompts need one) and every prompt as token ids."""
    from grokctl.checkpoint.index import checkpoint_root
    from grokctl.config import assumed_preset, load_model_config
    from grokctl.generation import check_prompts, context_warning
    from grokctl.tokenizer import Tokenizer, resolve_tokenizer_path

    root = checkpoint_root(run.checkpoint)
    assumed = assumed_preset(root, run.preset)
    if assumed is not None and run.preset is None and primary:
        warn(f"{root} has no config.json: assuming preset {assumed} (--preset chooses another)")
    early = Tokenizer(resolve_tokenizer_path(run.tokenizer, root)) if texts else None
    encoded = [early.encode(t) for t in texts] if early else []
    all_prompts: list[list[int]] = [*encoded, *id_prompts]  # texts encoded once, here
    cfg = load_model_config(root, run.preset)
    check_prompts(cfg, all_prompts)
    if primary and (note := context_warning(cfg, all_prompts, run.params.max_tokens)):
        warn(note)
    if run.routing_report is not None and primary:
        from grokctl.routing import check_report_dir

        check_report_dir(run.routing_report)
    return early, all_prompts


def _load(
    s: Settings, run: GenerateRun, early: Any, need_tokenizer: bool, primary: bool, multi: bool
) -> Any:
    """The model on its mesh, with a progress bar on a terminal and one summary line."""
    from grokctl import distributed
    from grokctl.api import load_model

    start = time.perf_counter()
    try:
        with progress("bytes", enabled=not run.json_out and primary) as bar:
            task = bar.add_task("loading weights", total=None)
            model = load_model(
                run.checkpoint,
                mesh=run.mesh,
                moe=run.moe,
                layout=run.layout,
                preset=run.preset,
                tokenizer=early or run.tokenizer,  # the tokenizer already loaded, if any
                require_tokenizer=need_tokenizer,
                on_progress=lambda done, total: bar.update(task, completed=done, total=total),
            )
    except UsageError as exc:  # the mesh was checked against the devices: blame its source
        where = s.source("mesh")
        if "--mesh" in str(exc) and where != "--mesh":
            raise UsageError(str(exc).replace("--mesh", where)) from None
        raise
    st = model.load_stats
    if primary and not run.json_out:
        shape = model.mesh.shape
        who = f"process 0 of {distributed.process_count()}: " if multi else ""
        mine = " (this process's shards)" if multi else ""
        info(
            f"[dim]{who}loaded {human_bytes(st.bytes_read)}{mine} in {st.seconds:.2f}s "
            f"({st.gb_per_s:.2f} GB/s) onto a {shape['data']}x{shape['model']} mesh "
            f"(data x model) in {time.perf_counter() - start:.1f}s[/]"
        )
    return model


@dataclasses.dataclass
class _Results:
    completions: list[Any]
    routing: Any = None  # routing statistics with --routing-report


def _run(
    model: Any, run: GenerateRun, prompts: list[list[int]], texts: list[str], primary: bool
) -> tuple[_Results, _Streamer | None]:
    """Generate: a status line until the first token (on a terminal), then streamed text when
    streaming (a single prompt on a terminal by default)."""
    streaming = (
        run.stream if run.stream is not None else (len(prompts) == 1 and sys.stdout.isatty())
    )
    streaming = streaming and not run.json_out and primary and model.tokenizer is not None
    streamer = _Streamer(model.tokenizer.decode, run.params.stop) if streaming else None
    echo = texts[0] if streamer is not None and texts else None
    # --routing-report: summed inside the same prefill/decode programs (docs/routing.md)
    routing_rec = model.collect_routing() if run.routing_report is not None else None
    p = run.params
    with _status(enabled=primary and not run.json_out and err.is_terminal) as status:

        def on_token(row: int, token: int) -> None:
            if status.first() and echo is not None:  # the first token: compiling is over
                err.print(echo, style="dim", end="", markup=False, highlight=False)
            if streamer is not None:
                streamer(row, token)

        completions = model.generate(
            prompts, max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p,
            top_k=p.top_k, seed=p.seed, stop=p.stop, on_token=on_token, min_p=p.min_p,
            repeat_penalty=p.repeat_penalty, repeat_last_n=p.repeat_last_n, logprobs=p.logprobs,
        )  # fmt: skip
    for r, text in zip(completions, texts):  # label the text prompts (they went in as ids)
        r.prompt = text
    routing = routing_rec.stop() if routing_rec is not None else None
    return _Results(completions, routing), streamer


def _print_results(results: list[Any], streamer: _Streamer | None, json_out: bool) -> None:
    if json_out:
        for r in results:
            emit_json(r.to_json())
        return
    if streamer is not None:
        streamer.finish(results[0].text or "")
    for i, r in enumerate(results):
        if streamer is None:
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


class _Status:
    """ "compiling..." on stderr until the first token arrives (only on a terminal)."""

    def __init__(self, live: Any):
        self.live = live
        self.seen = False

    def first(self) -> bool:
        if self.seen:
            return False
        self.seen = True
        if self.live is not None:
            self.live.stop()
        return True


@contextmanager
def _status(enabled: bool) -> Iterator[_Status]:
    if not enabled:
        yield _Status(None)
        return
    live = err.status("compiling... (the first run of a shape takes a while)", spinner="dots")
    live.start()
    try:
        yield _Status(live)
    finally:
        live.stop()


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
            mark_mid_line("stdout", True)
            self.shown = ready

    def finish(self, final: str) -> None:
        if final.startswith(self.shown):
            sys.stdout.write(final[len(self.shown) :])
        sys.stdout.write("\n")  # the terminal is left on a clean line, also after Ctrl-C
        sys.stdout.flush()
        mark_mid_line("stdout", False)


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)
