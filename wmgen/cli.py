"""The wmgen command line: parses, picks a writer, prints. No torch at import time,
so `wmgen --help` is instant; generation logic lives elsewhere."""

from __future__ import annotations

import gc
import io
import os
import stat
import sys
from dataclasses import dataclass
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

try:  # typer >= 0.29 raises its own copy of click's exceptions
    from typer._click import exceptions as click_errors
except ImportError:  # older typer uses click itself
    from click import exceptions as click_errors

from wmgen.errors import SessionError, UsageError, WmgenError

EXIT_CODES = """Exit status: 0 success (also when a reader closes the pipe), 1 runtime failure, 2 usage error, 130 interrupted by Ctrl-C (SIGINT), 143 terminated (SIGTERM)."""
DTYPE_HELP = "auto, float32, bfloat16, float16, or int8 (opt-in, CPU: int8 weights, 2-2.7x faster, approximate; see README)."


class Group(TyperGroup):
    """Every error becomes one line on stderr and an exit status; tracebacks only
    with WMGEN_DEBUG=1."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        code = run_guarded(lambda: super(Group, self).main(args, prog_name, complete_var, standalone_mode=False, **extra))
        if standalone_mode:
            sys.exit(code)
        return code


def run_guarded(call) -> int:
    try:
        result = call()
        if result == 130:  # Ctrl-C before generation began (typer turned it into an exit)
            error("interrupted")
        return result if isinstance(result, int) else 0
    except click_errors.NoArgsIsHelpError as e:
        try:  # the help, on stdout like --help
            print(e.ctx.get_help() if e.ctx else e.format_message(), flush=True)
        except BrokenPipeError:
            quiet_stdout()
        return 2
    except click_errors.UsageError as e:
        hint = f" (see '{e.ctx.command_path} --help')" if e.ctx else ""
        error(f"{e.format_message()}{hint}")
        return 2
    except click_errors.ClickException as e:
        error(e.format_message())
        return e.exit_code
    except typer.Abort:
        error("interrupted")
        return 130
    except WmgenError as e:
        error(str(e))
        return e.exit_code
    except BrokenPipe:
        return 0
    except Interrupted as e:
        return e.code
    except Exception as e:
        if DEBUG["on"] or os.environ.get("WMGEN_DEBUG"):
            raise
        error(f"internal error: {type(e).__name__}: {e} (run with --debug or WMGEN_DEBUG=1 to see the traceback)")
        return 1


class BrokenPipe(Exception):
    """stdout's reader went away; end quietly with status 0."""


class Interrupted(Exception):
    """A signal stopped the run, which has said so: exit with 128 + the signal."""

    def __init__(self, code: int):
        self.code = code


def error(message: str) -> None:
    print(f"wmgen: error: {message}", file=sys.stderr)


def notice(message: str, quiet: bool = False) -> None:
    if not quiet:
        print(f"wmgen: {message}", file=sys.stderr)


app = typer.Typer(
    cls=Group,
    name="wmgen",
    help="Generate text with GPT-2 through a bounded, inspectable working memory.\n\n" + EXIT_CODES,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


DEBUG = {"on": False}


def show_version(value: bool) -> None:
    if value:
        from wmgen import __version__

        print(f"wmgen {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: Annotated[bool, typer.Option("--debug", help="Show the traceback of an unexpected error (also WMGEN_DEBUG=1).")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.", callback=show_version, is_eager=True)] = False,
) -> None:
    """Generate text with GPT-2 through a bounded, inspectable working memory."""
    DEBUG["on"] = debug


def stdin_text() -> str | None:
    """Piped or redirected stdin, or None when it is a terminal or absent."""
    stream = sys.stdin
    if stream is None or stream.isatty():
        return None
    try:
        mode = os.fstat(stream.fileno()).st_mode
        if not (stat.S_ISFIFO(mode) or stat.S_ISREG(mode) or stat.S_ISSOCK(mode)):
            return None
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        pass  # an in-memory stream (tests): read it
    data = stream.buffer.read() if hasattr(stream, "buffer") else stream.read().encode()
    return decode_utf8(data, "stdin")


def decode_utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(
            f"{where} is not UTF-8 text (bad byte at offset {e.start}); convert it first, e.g. iconv -f latin1 -t utf-8"
        ) from None


def read_utf8_file(path: str, what: str) -> str:
    try:
        with open(path, "rb") as f:
            return decode_utf8(f.read(), path)
    except IsADirectoryError:
        raise UsageError(f"{path} is a folder; give a {what}") from None
    except OSError as e:
        raise UsageError(f"cannot read {what} {path}: {e.strerror}") from None


def read_prompt(argument: str | None, file: str | None, *, required: bool = True) -> str:
    """The prompt: the text of -f FILE or piped stdin (less the one trailing newline
    echo and editors add), then the argument on a line of its own."""
    if file is not None:
        source = read_utf8_file(file, "prompt file")
    else:
        source = stdin_text()
        if source is None and argument in (None, "-") and required:
            raise UsageError('no prompt: give one as an argument, pipe text on stdin, or use -f FILE (e.g. wmgen generate "Once upon a time")')
    parts = [source.removesuffix("\n")] if source else []
    if argument not in (None, "-"):
        parts.append(argument)
    return "\n".join(parts)


@app.command()
def generate(
    prompt: Annotated[Optional[str], typer.Argument(help="The prompt. Use - (or nothing) to read stdin; piped stdin and an argument are joined by a newline.", show_default=False)] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option("-n", "--max-new-tokens", help="Tokens to generate at most. (default: 100)", show_default=False)] = None,
    temperature: Annotated[Optional[float], typer.Option("-t", "--temperature", help="Softmax temperature; 0 is greedy. (default: 1.0)", show_default=False)] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", help="Sample from the k most likely tokens; 0 is off.", show_default=False)] = None,
    top_p: Annotated[Optional[float], typer.Option("--top-p", help="Sample from the smallest set of tokens with this much probability, in (0, 1]; 1 is off.", show_default=False)] = None,
    repetition_penalty: Annotated[Optional[float], typer.Option("--repetition-penalty", help="Penalise tokens already in memory (> 1 discourages repeats); 1 is off.", show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed for sampling: same seed and settings, same text.", show_default=False)] = None,
    stop: Annotated[Optional[list[str]], typer.Option("--stop", help="Stop when this text appears (not printed). Repeatable.", show_default=False)] = None,
    ignore_eos: Annotated[Optional[bool], typer.Option("--ignore-eos", help="Keep going past <|endoftext|>.", show_default=False)] = None,
    capacity: Annotated[Optional[int], typer.Option("--capacity", help="Working memory size in tokens. (default: the model's limit, 1024 for gpt2)", show_default=False)] = None,
    keep: Annotated[Optional[str], typer.Option("--keep", help="Pinned tokens at the head of memory, a count or 'prompt'. (default: 0)", show_default=False)] = None,
    evict: Annotated[Optional[int], typer.Option("--evict", help="Tokens dropped per eviction; 1 is the exact sliding window. (default: a quarter of capacity - keep)", show_default=False)] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Hub id or local folder of a GPT-2 checkpoint. (default: gpt2)", show_default=False)] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="auto, cpu, cuda or mps.", show_default=False)] = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help=DTYPE_HELP, show_default=False)] = None,
    config: Annotated[Optional[str], typer.Option("--config", help="A preset name (default, precise, creative, balanced, longform) or a .toml file.", show_default=False)] = None,
    file: Annotated[Optional[str], typer.Option("-f", "--file", help="Read the prompt from this file.", show_default=False)] = None,
    from_scratch: Annotated[bool, typer.Option("--from-scratch", help="Begin with <|endoftext|>, so an empty prompt is allowed.")] = False,
    echo: Annotated[bool, typer.Option("--echo", help="Print the prompt before the continuation.")] = False,
    stats: Annotated[bool, typer.Option("--stats", help="Print timings and memory counters on stderr at the end.")] = False,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="No notices on stderr.")] = False,
    session: Annotated[Optional[str], typer.Option("--session", "-s", help="Save the final memory as this session (default: 'last').", show_default=False)] = None,
    continue_: Annotated[bool, typer.Option("-c", "--continue", help="Continue from the saved memory of the session, and save back to it.")] = False,
    no_save: Annotated[bool, typer.Option("--no-save", help="Do not save the final memory.")] = False,
    format_: Annotated[str, typer.Option("--format", help="text, jsonl (one event per line, as it happens) or json (one object at the end).")] = "text",
    each_line: Annotated[bool, typer.Option("--each-line", help="One prompt per input line (stdin or -f FILE), run as a batch; results in input order.")] = False,
    num_samples: Annotated[int, typer.Option("--num-samples", help="Draw N continuations of the prompt, as one batch.", min=1)] = 1,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Rows run together at most (--each-line, --num-samples).", min=1)] = 8,
    separator: Annotated[str, typer.Option("--separator", help="With --format text and several results: the line printed after each.")] = "---",
    no_color: Annotated[bool, typer.Option("--no-color", help="No colour on stderr (also NO_COLOR).")] = False,
) -> None:
    """Stream a continuation of the prompt to stdout.

    The final working memory is saved as session 'last' (or --session NAME);
    -c continues from it.
    """
    from wmgen import sessions
    from wmgen.settings import load_settings, state_dir

    flags = dict(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        repetition_penalty=repetition_penalty, seed=seed, stop=tuple(stop or ()), ignore_eos=ignore_eos,
        capacity=capacity, keep=keep, evict=evict, model=model, device=device, dtype=dtype,
    )  # fmt: skip
    state = state_dir(os.environ)
    name = sessions.check_name(session or "last")
    if continue_ and (each_line or num_samples > 1):
        raise UsageError("--continue goes with a single prompt, not --each-line or --num-samples")
    previous = None
    if continue_:
        previous = sessions.read(state, name)
        # a continued memory keeps its model and shape unless a flag says otherwise
        kept = {"model": previous.get("model"), "capacity": previous["capacity"], "keep": previous["keep"], "evict": previous["evict"]}
        flags = {k: (v if v is not None else kept.get(k)) for k, v in flags.items()}
    settings = load_settings(flags=flags, env=os.environ, config=config)
    if format_ not in FORMATS:
        raise UsageError(f"--format {format_!r} is not one of {', '.join(FORMATS)}")
    out = Output(format_, echo=echo, stats=stats, quiet=quiet, color=not no_color and not os.environ.get("NO_COLOR"))
    if each_line or num_samples > 1:
        prompts = read_prompts(prompt, file, each_line=each_line, samples=num_samples)
        run_many(settings, prompts, out, from_scratch=from_scratch, batch_size=batch_size, separator=separator)
        return
    text = read_prompt(prompt, file, required=previous is None and not from_scratch)
    if not text and not from_scratch and previous is None:
        raise UsageError("the prompt is empty; give some text, or --from-scratch to start from <|endoftext|>")
    run_generate(settings, text, out, previous=previous, save_to=None if no_save else (state, name), from_scratch=from_scratch)


FORMATS = ("text", "jsonl", "json")


@dataclass(frozen=True)
class Output:
    """How a run reports: the stdout format and what goes to stderr."""

    format: str = "text"
    echo: bool = False
    stats: bool = False
    quiet: bool = False
    color: bool = True


class Signals:
    """SIGINT and SIGTERM ask generation to stop between tokens (it then flushes,
    saves and exits with 128 + the signal); a second one exits at once."""

    def __init__(self):
        self.received: int | None = None

    def __enter__(self) -> "Signals":
        import signal

        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        import signal

        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            os._exit(128 + signum)
        self.received = signum

    def stop_requested(self) -> bool:
        return self.received is not None

    def exit_if_received(self, quiet: bool) -> None:
        if self.received is not None:
            import signal

            notice(f"interrupted ({signal.Signals(self.received).name}); what was generated is kept", quiet)
            raise Interrupted(128 + self.received)


def make_writer(out: Output, text: str, about: dict):
    from wmgen.render import JsonlWriter, JsonWriter, TextWriter

    if out.format == "jsonl":
        return JsonlWriter(sys.stdout, about=about)
    if out.format == "json":
        return JsonWriter(sys.stdout, prompt=text, about=about)
    return TextWriter(sys.stdout, echo_text=text if out.echo else None)


def run_generate(settings, text: str, out: Output, *, previous, save_to, from_scratch: bool) -> None:
    from wmgen.model import load_tokenizer

    info, tokenizer = load_tokenizer(settings.model.name)
    if previous is not None:
        check_same_tokenizer(previous, tokenizer)
    prompt_ids = ([tokenizer.eos_id] if from_scratch else []) + tokenizer.encode(text)
    if not prompt_ids and previous is None:
        raise UsageError("the prompt is empty after tokenizing; give some text, or --from-scratch")

    from wmgen.memory import CONTINUED, PROMPT, WorkingMemory
    from wmgen.window import resolve_shape

    capacity, keep, evict = resolve_shape(settings.memory, info.n_positions, len(prompt_ids))
    model = load_with_status(info, settings, out.quiet, out.color)
    memory = WorkingMemory(model, capacity, keep, evict)
    if previous is not None and (lost := memory.restore(previous)):
        notice(f"the session held {previous['fill']} tokens; --capacity {capacity} keeps {previous['fill'] - lost}", out.quiet)

    from wmgen.events import Finished, Started
    from wmgen.generation import generate
    from wmgen.render import PipeClosed, stats_line
    from wmgen.settings import as_dict

    about = {"model": model_id(settings.model.name), "settings": as_dict(settings)}
    writer = make_writer(out, text, about)
    origin = CONTINUED if previous is not None else PROMPT
    with Signals() as signals:
        events = generate(memory, tokenizer, prompt_ids, settings.run, settings.sampling,
                          eos_id=model.config.eos_token_id, origin=origin, should_stop=signals.stop_requested)  # fmt: skip
        try:
            for event in events:
                if isinstance(event, Started):
                    settings = with_seed(settings, event.seed)  # saved, so a run can be repeated
                    if event.dropped:
                        notice(f"the prompt has {event.prompt_tokens} tokens; memory holds {capacity}: "
                               f"{event.dropped} tokens before the last {capacity - keep} were dropped", out.quiet)  # fmt: skip
                writer.write(event)
                if isinstance(event, Finished):
                    if out.format == "text" and writer.wrote_any and sys.stdout.isatty():
                        print()  # leave the shell prompt on a line of its own
                    if out.stats:
                        print(stats_line(event), file=sys.stderr)
        except PipeClosed:
            quiet_stdout()
            save_memory(save_to, memory, tokenizer, settings, quiet=True)
            raise BrokenPipe from None
        save_memory(save_to, memory, tokenizer, settings, out.quiet)
        signals.exit_if_received(out.quiet)


def read_prompts(argument: str | None, file: str | None, *, each_line: bool, samples: int) -> list[tuple[int | None, int | None, str]]:
    """(line number, sample number, prompt) for every row of a batched run."""
    if not each_line:
        text = read_prompt(argument, file)
        if not text:
            raise UsageError("the prompt is empty; give some text to sample from")
        return [(None, i, text) for i in range(samples)]
    if file is not None:
        source = read_prompt(None, file)
    else:
        source = stdin_text()
        if source is None:
            raise UsageError("--each-line reads one prompt per line from stdin or -f FILE; neither has any")
    suffix = argument if argument not in (None, "-") else None
    rows = [
        (number, sample if samples > 1 else None, line + ("\n" + suffix if suffix else ""))
        for number, line in enumerate(source.splitlines(), start=1)
        if line.strip()
        for sample in range(samples)
    ]
    if not rows:
        raise UsageError("--each-line found no prompts: every input line is blank")
    return rows


def run_many(settings, prompts, out: Output, *, from_scratch: bool, batch_size: int, separator: str) -> None:
    """Several prompts (or samples), batch by batch; results in input order."""
    import secrets

    from wmgen.model import load_tokenizer
    from wmgen.window import resolve_shape

    info, tokenizer = load_tokenizer(settings.model.name)
    ids = [([tokenizer.eos_id] if from_scratch else []) + tokenizer.encode(text) for _, _, text in prompts]
    shapes = [resolve_shape(settings.memory, info.n_positions, len(row)) for row in ids]
    model = load_with_status(info, settings, out.quiet, out.color)

    from wmgen.generation import generate_batch
    from wmgen.memory import MemoryBatch
    from wmgen.render import PipeClosed, put_line, result_record

    base = settings.sampling.seed if settings.sampling.seed is not None else secrets.randbits(62)
    seeds = [base + (sample or 0) for _, sample, _ in prompts]  # each line as if run alone with --seed
    records, total, elapsed = [], 0, 0.0
    with Signals() as signals:
        try:
            for start in range(0, len(prompts), batch_size):
                chunk = range(start, min(start + batch_size, len(prompts)))
                capacity, _, evict = shapes[start]
                batch = MemoryBatch(model, len(chunk), capacity, [shapes[i][1] for i in chunk], evict)
                results = generate_batch(batch, tokenizer, [ids[i] for i in chunk], settings.run, settings.sampling,
                                         [seeds[i] for i in chunk], eos_id=model.config.eos_token_id,
                                         should_stop=signals.stop_requested)  # fmt: skip
                elapsed += results[0].elapsed_s
                for i, result in zip(chunk, results):
                    line, sample, text = prompts[i]
                    total += len(result.tokens)
                    record = result_record(result, line=line, sample=sample, prompt=text)
                    if out.format == "jsonl":
                        put_line(sys.stdout, record)
                    elif out.format == "json":
                        records.append(record)
                    else:
                        write_text(((text if out.echo else "") + result.text) + "\n" + separator + "\n")
                if signals.stop_requested():
                    break
            if out.format == "json":
                put_line(sys.stdout, records, indent=1)
        except (PipeClosed, BrokenPipeError):
            quiet_stdout()
            raise BrokenPipe from None
        if out.stats:
            rate = total / elapsed if elapsed else 0.0
            print(f"{len(prompts)} prompts · generated {total} tokens · {elapsed:.2f} s · {rate:.1f} tokens/s in all", file=sys.stderr)
        signals.exit_if_received(out.quiet)


def write_text(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def with_seed(settings, seed: int):
    from dataclasses import replace

    return replace(settings, sampling=replace(settings.sampling, seed=seed))


def model_id(name: str) -> str:
    """A hub id as given; a local folder as an absolute path, so -c works from anywhere."""
    from pathlib import Path

    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else name


def check_same_tokenizer(previous: dict, tokenizer) -> None:
    if previous.get("tokenizer") != tokenizer.fingerprint:
        raise SessionError(
            f"session '{previous.get('name')}' was made with another tokenizer (model {previous.get('model')}); "
            f"continue it with --model {previous.get('model')}, or start a new session with --session NAME"
        )


def save_memory(save_to, memory, tokenizer, settings, quiet: bool) -> None:
    """Save the memory as a session, unless --no-save; a failure is a notice, since
    the text was already written."""
    if save_to is None:
        return
    from wmgen import sessions
    from wmgen.settings import as_dict

    state, name = save_to
    snap = memory.snapshot(
        token_text=tokenizer.token_text, model=model_id(settings.model.name), tokenizer=tokenizer.fingerprint,
        sampling=as_dict(settings)["sampling"], text=tokenizer.decode(memory.tokens),
    )  # fmt: skip
    try:
        sessions.write(state, name, snap)
    except WmgenError as e:
        notice(f"warning: {e}", quiet)


def quiet_stdout() -> None:
    """After a closed pipe: point stdout at /dev/null so the final flush is silent."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def load_with_status(info, settings, quiet: bool, color: bool = True):
    from wmgen.model import load_model

    if quiet or not color or not sys.stderr.isatty():  # a spinner is terminal control codes
        model = load_model(info, device=settings.model.device, dtype=settings.model.dtype)
    else:
        from rich.console import Console

        with Console(stderr=True).status(f"loading {info.name}"):
            model = load_model(info, device=settings.model.device, dtype=settings.model.dtype)
    collect_garbage_from_now_on()
    return model


def console_for(no_color: bool):
    """A rich console on stdout: colour and boxes only on a terminal without NO_COLOR."""
    from rich.console import Console

    plain = no_color or bool(os.environ.get("NO_COLOR")) or not sys.stdout.isatty()
    return Console(color_system=None if plain else "auto", highlight=False, soft_wrap=False), plain


@app.command("inspect-memory")
def inspect_memory(
    session: Annotated[Optional[str], typer.Option("--session", "-s", help="The session to show (default: 'last').", show_default=False)] = None,
    head: Annotated[Optional[int], typer.Option("--head", help="Show only the first N slots.", min=0, show_default=False)] = None,
    tail: Annotated[Optional[int], typer.Option("--tail", help="Show only the last N slots.", min=0, show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole snapshot as JSON.")] = False,
    as_text: Annotated[bool, typer.Option("--text", help="Print only the text in memory.")] = False,
    prompt: Annotated[Optional[str], typer.Option("--prompt", help="Show how this prompt (- for stdin) would fill a memory, without generating.", show_default=False)] = None,
    capacity: Annotated[Optional[int], typer.Option("--capacity", help="With --prompt: the memory's capacity.", show_default=False)] = None,
    keep: Annotated[Optional[str], typer.Option("--keep", help="With --prompt: pinned tokens, a count or 'prompt'.", show_default=False)] = None,
    evict: Annotated[Optional[int], typer.Option("--evict", help="With --prompt: tokens per eviction.", show_default=False)] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="With --prompt: whose tokenizer (default: gpt2). With --attention: the model to run (default: the session's).", show_default=False)] = None,
    attention: Annotated[bool, typer.Option("--attention", help="Run the memory through the model once and show where the next token's query attends.")] = False,
    layer: Annotated[Optional[int], typer.Option("--layer", help="With --attention: one layer instead of the mean over all.", show_default=False)] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="With --attention: auto, cpu, cuda or mps.", show_default=False)] = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="With --attention: auto, float32, bfloat16 or float16.", show_default=False)] = None,
    config: Annotated[Optional[str], typer.Option("--config", help="A preset name or .toml file (for --prompt defaults).", show_default=False)] = None,
    no_color: Annotated[bool, typer.Option("--no-color", help="No colour or box drawing.")] = False,
) -> None:
    """Show what is in working memory: a saved session, or a prompt's footprint.

    Loads no model weights unless --attention is given.
    """
    from wmgen import sessions
    from wmgen.settings import load_settings, state_dir

    if head is not None and tail is not None:
        raise UsageError("--head and --tail cannot be used together; pick one")
    if as_json and as_text:
        raise UsageError("--json and --text cannot be used together; pick one")
    if prompt is not None:
        flags = dict(capacity=capacity, keep=keep, evict=evict, model=model, device=device, dtype=dtype)
        snap = preview_prompt(load_settings(flags=flags, env=os.environ, config=config), read_prompt(prompt, None))
    else:
        if any(v is not None for v in (capacity, keep, evict)):
            raise UsageError("--capacity, --keep and --evict shape a --prompt preview; a saved session keeps its own")
        snap = sessions.read(state_dir(os.environ), sessions.check_name(session or "last"))
    if attention:
        if layer is not None and layer < 0:
            raise UsageError(f"--layer {layer}: layers are numbered from 0")
        flags = dict(model=model or snap.get("model"), device=device, dtype=dtype)
        color = not no_color and not os.environ.get("NO_COLOR")
        snap["attention"] = attention_shares(snap, load_settings(flags=flags, env=os.environ, config=config), layer, color)
    elif layer is not None:
        raise UsageError("--layer goes with --attention")

    if as_json:
        import json

        from wmgen.render import select_slots

        print(json.dumps(snap | {"slots": select_slots(snap["slots"], head, tail)}, ensure_ascii=False, indent=1))
    elif as_text:
        sys.stdout.write(snap.get("text", ""))
        if sys.stdout.isatty():
            print()
    else:
        from wmgen.render import show_memory

        console, plain = console_for(no_color)
        show_memory(snap, console, head=head, tail=tail, plain=plain)


def preview_prompt(settings, text: str) -> dict:
    """How `text` would fill a memory: tokenizer only, no weights."""
    from wmgen.model import load_tokenizer
    from wmgen.window import describe, fit, kv_bytes_per_token, resolve_shape

    info, tokenizer = load_tokenizer(settings.model.name)
    ids = tokenizer.encode(text)
    if not ids:
        raise UsageError("the prompt is empty; give some text to preview")
    capacity, keep, evict = resolve_shape(settings.memory, info.n_positions, min(len(ids), info.n_positions - 1))
    kept, dropped = fit(ids, capacity, keep)
    bytes_per_value = 2 if settings.model.dtype in ("bfloat16", "float16") else 4
    snap = describe(
        kept, ["prompt"] * len(kept), [None] * len(kept), capacity=capacity, keep=keep, evict=evict,
        counters={"evictions": 0, "evicted": 0, "recomputed": 0, "seen": len(kept)},
        kv_bytes_per_token=kv_bytes_per_token(info.n_layer, info.n_embd, bytes_per_value), token_text=tokenizer.token_text,
        model=model_id(settings.model.name), tokenizer=tokenizer.fingerprint, text=tokenizer.decode(kept),
    )  # fmt: skip
    return snap | {"name": "(prompt preview)", "prompt_tokens": len(ids), "dropped": dropped}


def attention_shares(snap: dict, settings, layer: int | None, color: bool) -> dict:
    """Per slot, the share of attention the last slot's query gives it (mean over heads, and layers)."""
    from wmgen.model import load_tokenizer

    info, tokenizer = load_tokenizer(settings.model.name)
    if snap.get("tokenizer") not in (None, tokenizer.fingerprint):
        raise SessionError(f"this memory was made with another tokenizer; pass --model {snap.get('model')}")
    if not snap["slots"]:
        raise UsageError("the memory is empty: nothing to attend to")
    if layer is not None and layer >= info.n_layer:
        raise UsageError(f"--layer {layer}: the model has layers 0..{info.n_layer - 1}")
    if len(snap["slots"]) > info.n_positions:
        raise UsageError(f"the memory holds {len(snap['slots'])} tokens, more than {info.name} can read ({info.n_positions})")
    from wmgen.memory import WorkingMemory

    model = load_with_status(info, settings, quiet=False, color=color)
    memory = WorkingMemory(model, max(2, len(snap["slots"])), 0, 1)
    memory.restore(snap | {"keep": 0})
    weights = memory.attention()  # [layers, heads, fill]
    picked = weights.mean(dim=(0, 1)) if layer is None else weights[layer].mean(dim=0)
    return {"layer": layer, "shares": [round(float(x), 6) for x in picked]}


@app.command("sessions")
def list_sessions(
    delete: Annotated[Optional[list[str]], typer.Option("--delete", help="Delete this session. Repeatable.", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the list as JSON.")] = False,
    no_color: Annotated[bool, typer.Option("--no-color", help="No colour or box drawing.")] = False,
) -> None:
    """List saved sessions (or delete some with --delete NAME)."""
    from wmgen import sessions
    from wmgen.settings import state_dir

    state = state_dir(os.environ)
    if delete:
        for name in delete:
            path = sessions.delete(state, name)
            print(f"wmgen: deleted session '{name}' ({path})", file=sys.stderr)
        return
    rows = sessions.listing(state)
    if as_json:
        import json

        print(json.dumps(rows, ensure_ascii=False, indent=1))
        return
    from wmgen.render import show_sessions

    console, plain = console_for(no_color)
    show_sessions(rows, console, plain=plain)


SWEEP_KEYS = ("capacity", "evict", "keep")


def parse_sweep(specs: list[str]) -> list[dict[str, int]]:
    """`["capacity=128,256", "evict=1,64"]` -> every combination, as dicts."""
    import itertools

    axes: dict[str, list[int]] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        if not sep or key not in SWEEP_KEYS:
            raise UsageError(f"--sweep {spec!r}: expected KEY=V1,V2,... with KEY one of {', '.join(SWEEP_KEYS)}")
        try:
            axes[key] = [int(v) for v in values.split(",") if v.strip()]
        except ValueError:
            raise UsageError(f"--sweep {spec!r}: values must be whole numbers separated by commas") from None
        if not axes[key]:
            raise UsageError(f"--sweep {spec!r}: give at least one value")
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


@app.command()
def perplexity(
    file: Annotated[str, typer.Argument(help="Text file to score, or - for stdin.", show_default=False)],
    sweep_rest: Annotated[Optional[list[str]], typer.Argument(help="More KEY=V1,V2 axes for --sweep.", show_default=False)] = None,
    capacity: Annotated[Optional[int], typer.Option("--capacity", help="Working memory size in tokens. (default: the model's limit)", show_default=False)] = None,
    keep: Annotated[Optional[int], typer.Option("--keep", help="Pinned tokens at the head of memory. (default: 0)", show_default=False)] = None,
    evict: Annotated[Optional[int], typer.Option("--evict", help="Tokens dropped per eviction; 1 is the exact sliding window.", show_default=False)] = None,
    max_tokens: Annotated[Optional[int], typer.Option("--max-tokens", help="Score only the first N tokens of the text.", min=2, show_default=False)] = None,
    sweep: Annotated[Optional[list[str]], typer.Option("--sweep", help="Score a grid of memory shapes: --sweep capacity=128,256 evict=1,64 [keep=0,4].", show_default=False)] = None,
    plot: Annotated[Optional[str], typer.Option("--plot", help="With --sweep: write a PNG of perplexity against speed.", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Hub id or local folder of a GPT-2 checkpoint. (default: gpt2)", show_default=False)] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="auto, cpu, cuda or mps.", show_default=False)] = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help=DTYPE_HELP, show_default=False)] = None,
    config: Annotated[Optional[str], typer.Option("--config", help="A preset name or .toml file.", show_default=False)] = None,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="No notices or progress on stderr.")] = False,
) -> None:
    """Score a text through working memory: perplexity, bits per byte, speed.

    Each token is scored with the log-probability the model gives it from what is
    in memory just before it; the text is read in batched chunks.
    """
    from wmgen.settings import load_settings

    if sweep_rest and not sweep:
        raise UsageError(f"unexpected arguments {' '.join(sweep_rest)}; only one FILE is scored (grids go after --sweep)")
    if plot and not sweep:
        raise UsageError("--plot draws a --sweep; add --sweep capacity=...,... evict=...,...")
    grid = parse_sweep([*(sweep or []), *(sweep_rest or [])]) if sweep else None
    flags = dict(capacity=capacity, keep=keep, evict=evict, model=model, device=device, dtype=dtype)
    settings = load_settings(flags=flags, env=os.environ, config=config)
    text = read_text_file(file)

    from wmgen.model import load_tokenizer
    from wmgen.window import resolve_shape

    info, tokenizer = load_tokenizer(settings.model.name)
    ids = tokenizer.encode(text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise UsageError(f"{file} has {len(ids)} token(s); scoring needs at least 2")
    if settings.memory.keep == "prompt":
        raise UsageError("--keep prompt has no meaning for perplexity; give a count")
    from dataclasses import replace

    shapes = []
    for point in grid or [{}]:
        memory_settings = replace(settings.memory, **point)
        shapes.append(resolve_shape(memory_settings, info.n_positions, 0))
    model_ = load_with_status(info, settings, quiet)

    from wmgen.memory import WorkingMemory
    from wmgen.perplexity import looks_untrained, score

    results = []
    with progress_bar(len(ids) - 1, len(shapes), quiet) as advance:
        for capacity_, keep_, evict_ in shapes:
            memory = WorkingMemory(model_, capacity_, keep_, evict_)
            results.append(score(memory, ids, tokenizer.token_bytes, progress=advance))
    if looks_untrained(results[0].perplexity, info.vocab_size):
        notice(f"warning: perplexity {results[0].perplexity:.0f} is about the vocabulary size ({info.vocab_size}): "
               "this model looks untrained, so these numbers say nothing about quality", quiet)  # fmt: skip
    if plot:
        from wmgen.render import plot_sweep

        plot_sweep(results, plot, title=f"{info.name} on {file}")
        notice(f"wrote {plot}", quiet)

    about = {"model": model_id(settings.model.name), "file": file, "text_tokens": len(ids)}
    if as_json:
        import json

        data = [r.as_dict() | about for r in results] if grid else results[0].as_dict() | about
        print(json.dumps(data, indent=1))
    else:
        from wmgen.render import score_table

        print(score_table(results, about))


def read_text_file(file: str) -> str:
    if file == "-":
        text = stdin_text()
        if text is None:
            raise UsageError("no text on stdin: pipe some in, or give a FILE")
    else:
        text = read_utf8_file(file, "text file")
    if "\x00" in text:
        raise UsageError(f"{file} looks binary (it contains NUL bytes); give a text file")
    if not text.strip():
        raise UsageError(f"{file} is empty; give some text to score")
    return text


def progress_bar(per_run: int, runs: int, quiet: bool):
    """A context giving `advance(n)`; a rich bar on stderr only when it is a terminal."""
    from contextlib import contextmanager

    @contextmanager
    def bar():
        if quiet or not sys.stderr.isatty():
            yield lambda n: None
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        columns = ("scoring", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=Console(stderr=True), transient=True) as p:
            task = p.add_task("scoring", total=per_run * runs)
            yield lambda n: p.advance(task, n)

    return bar()


def main() -> None:
    # Importing torch makes hundreds of thousands of objects, and the garbage
    # collector's passes over them cost ~0.2 s of start-up. Nothing made before the
    # model is loaded is worth collecting; after that the collector runs again.
    gc.disable()
    app()


def collect_garbage_from_now_on() -> None:
    """Start-up is over: what exists now stays for good (frozen, so later passes
    skip it), and the collector runs again."""
    gc.freeze()
    gc.enable()
