"""`grokctl generate`: text from one or several prompts, streaming on a terminal."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from grokctl.cli import options
from grokctl.cli.output import emit_json, err, human_bytes, info, mark_mid_line, progress, warn
from grokctl.config import Settings, help_suffix
from grokctl.errors import GrokctlError, MissingResourceError, UsageError

SAMPLING = "Sampling"


class Interrupted(GrokctlError):
    """Ctrl-C during generation: what was generated is printed, then exit 130."""

    exit_code = 130


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


def decode_utf8(data: bytes, what: str) -> str:
    """UTF-8 text, or a UsageError naming the line (1-based) of the first invalid byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        col = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise UsageError(
            f"{what}: line {line} is not UTF-8 text (byte 0x{data[exc.start]:02x} at column {col})"
        ) from None


def _stdin_bytes() -> bytes:
    stream = sys.stdin
    buf = getattr(stream, "buffer", None)
    if buf is not None:
        return bytes(buf.read())
    return stream.read().encode()


def read_prompts_file(path: Path) -> list[str]:
    what = "--prompts-file " + ("- (stdin)" if str(path) == "-" else str(path))
    try:
        data = _stdin_bytes() if str(path) == "-" else path.read_bytes()
    except OSError as exc:
        raise MissingResourceError(f"--prompts-file {path}: {exc.strerror}") from None
    prompts = [line for line in decode_utf8(data, what).splitlines() if line.strip()]
    if not prompts:
        raise UsageError(f"{what}: no prompts (one per line)")
    return prompts


def read_piped_prompt() -> str | None:
    """The prompt from stdin when it is piped (`echo hi | grokctl generate ...`), else None."""
    stream = sys.stdin
    if stream is None or stream.closed or stream.isatty():
        return None
    text = decode_utf8(_stdin_bytes(), "stdin")
    text = text[:-1] if text.endswith("\n") else text
    return text if text.strip() else None


def _opt(name: str, *flags: str, help: str, panel: str | None = SAMPLING) -> Any:
    return typer.Option(
        *flags, help=f"{help} {help_suffix(name)}", show_default=False, rich_help_panel=panel
    )


def generate(
    prompt: Annotated[
        Optional[list[str]],
        typer.Option(
            "--prompt", "-p", help="Prompt text; repeat for a batch. Default: stdin when piped."
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
            help="SentencePiece model (default: <checkpoint>/tokenizer.model).",
            panel=None,
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
    stream: Annotated[
        Optional[bool],
        typer.Option(
            "--stream/--no-stream",
            help="Stream tokens (default: single prompt on a terminal). Env GROKCTL_STREAM.",
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
    """Generate text from a Grok-1 checkpoint (int8 weights, sparse experts, KV cache)."""
    s = Settings("generate")
    ckpt = s.get("checkpoint", checkpoint)
    from grokctl.generation import SamplingParams

    params = SamplingParams(
        max_tokens=s.get("max_tokens", max_tokens),
        temperature=s.get("temperature", temperature),
        top_p=s.get("top_p", top_p),
        top_k=s.get("top_k", top_k),
        seed=s.get("seed", seed),
        stop=tuple(s.get("stop", stop)),
        min_p=s.get("min_p", min_p),
        repeat_penalty=s.get("repeat_penalty", repeat_penalty),
        repeat_last_n=s.get("repeat_last_n", repeat_last_n),
        logprobs=s.get("logprobs", logprobs),
    ).validate()
    stream = s.get("stream", stream)
    moe_kernel = s.get("moe", moe)
    layout_name = s.get("layout", layout)
    mesh_text = s.get("mesh", mesh)
    preset_name = s.get("preset", preset)
    tokenizer_path = s.get("tokenizer", tokenizer)
    if ckpt is None:
        raise UsageError("no checkpoint: pass --checkpoint DIR (or set GROKCTL_CHECKPOINT)")
    texts: list[str] = list(prompt or [])
    if prompts_file is not None:
        texts += read_prompts_file(prompts_file)
    id_prompts = [parse_token_ids(t) for t in token_ids or []]
    if not texts and not id_prompts:
        piped = read_piped_prompt()
        if piped is None:
            raise UsageError(
                "no prompt: give --prompt TEXT, --prompts-file FILE, --token-ids 1,2,3 "
                "or pipe the prompt on stdin"
            )
        texts.append(piped)
    if params.logprobs and not json_out:
        warn("--logprobs is reported in --json output only")

    from grokctl import distributed

    multi = distributed.initialize(
        s.get("coordinator", coordinator),
        s.get("num_processes", num_processes),
        s.get("process_id", process_id),
        timeout_s=s.get("init_timeout"),
    )
    primary = distributed.is_primary() if multi else True

    # Everything that can be refused is refused before minutes of weight loading.
    from grokctl.checkpoint.index import checkpoint_root
    from grokctl.config import assumed_preset, load_model_config
    from grokctl.generation import check_prompts, context_warning
    from grokctl.tokenizer import Tokenizer, resolve_tokenizer_path

    root = checkpoint_root(ckpt)
    assumed = assumed_preset(root, preset_name)
    if assumed is not None and preset_name is None and primary:
        warn(f"{root} has no config.json: assuming preset {assumed} (--preset chooses another)")
    early = Tokenizer(resolve_tokenizer_path(tokenizer_path, root)) if texts else None
    encoded = [early.encode(t) for t in texts] if early else []
    all_prompts: list[list[int]] = [*encoded, *id_prompts]  # texts encoded once, here
    cfg = load_model_config(root, preset_name)
    check_prompts(cfg, all_prompts)
    if primary and (note := context_warning(cfg, all_prompts, params.max_tokens)):
        warn(note)
    if routing_report is not None and primary:  # --routing-report: refuse before loading
        from grokctl.routing import check_report_dir

        check_report_dir(routing_report)

    model = _load(s, ckpt, mesh_text, moe_kernel, layout_name, preset_name, early, tokenizer_path,
                  bool(texts), json_out, primary, multi)  # fmt: skip

    streaming = stream if stream is not None else (len(all_prompts) == 1 and sys.stdout.isatty())
    streaming = streaming and not json_out and primary and model.tokenizer is not None
    streamer = (
        _Streamer(model.tokenizer.decode, params.stop) if streaming and model.tokenizer else None
    )
    echo = texts[0] if streamer is not None and texts else None
    # --routing-report: summed inside the same prefill/decode programs (docs/routing.md)
    routing_rec = model.collect_routing() if routing_report is not None else None
    with _status(enabled=primary and not json_out and err.is_terminal) as status:

        def on_token(row: int, token: int) -> None:
            if status.first():  # the first token: compiling is over
                if echo is not None:
                    err.print(echo, style="dim", end="", markup=False, highlight=False)
            if streamer is not None:
                streamer(row, token)

        results = model.generate(
            all_prompts,
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            seed=params.seed,
            stop=params.stop,
            on_token=on_token,
            min_p=params.min_p,
            repeat_penalty=params.repeat_penalty,
            repeat_last_n=params.repeat_last_n,
            logprobs=params.logprobs,
        )
    for r, text in zip(results, texts):  # label the text prompts (they went in as ids)
        r.prompt = text
    if routing_rec is not None and routing_report is not None:
        _write_routing_report(routing_rec.stop(), routing_report, ckpt, primary, json_out)
    interrupted = any(r.finish_reason == "interrupted" for r in results)
    if primary:
        _print_results(results, streamer, json_out)
    if interrupted:
        raise Interrupted("interrupted")


def _load(
    s: Settings,
    ckpt: Path,
    mesh_text: str | None,
    moe_kernel: str,
    layout_name: str,
    preset_name: str | None,
    early: Any,
    tokenizer_path: Path | None,
    need_tokenizer: bool,
    json_out: bool,
    primary: bool,
    multi: bool,
) -> Any:
    """The model on its mesh, with a progress bar on a terminal and one summary line."""
    from grokctl import distributed
    from grokctl.api import load_model

    start = time.perf_counter()
    try:
        with progress("bytes", enabled=not json_out and primary) as bar:
            task = bar.add_task("loading weights", total=None)
            model = load_model(
                ckpt,
                mesh=mesh_text,
                moe=moe_kernel,
                layout=layout_name,
                preset=preset_name,
                tokenizer=early or tokenizer_path,  # the tokenizer already loaded, if any
                require_tokenizer=need_tokenizer,
                on_progress=lambda done, total: bar.update(task, completed=done, total=total),
            )
    except UsageError as exc:  # the mesh was checked against the devices: blame its source
        where = s.source("mesh")
        if "--mesh" in str(exc) and where != "--mesh":
            raise UsageError(str(exc).replace("--mesh", where)) from None
        raise
    st = model.load_stats
    if primary and not json_out:
        shape = model.mesh.shape
        who = f"process 0 of {distributed.process_count()}: " if multi else ""
        mine = " (this process's shards)" if multi else ""
        info(
            f"[dim]{who}loaded {human_bytes(st.bytes_read)}{mine} in {st.seconds:.2f}s "
            f"({st.gb_per_s:.2f} GB/s) onto a {shape['data']}x{shape['model']} mesh "
            f"(data x model) in {time.perf_counter() - start:.1f}s[/]"
        )
    return model


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
