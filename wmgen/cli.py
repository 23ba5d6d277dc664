"""The wmgen command line: parses, picks a writer, prints. No torch at import time,
so `wmgen --help` is instant; generation logic lives elsewhere."""

from __future__ import annotations

import io
import os
import stat
import sys
from typing import Annotated, Optional

import click
import typer
from typer.core import TyperGroup

from wmgen.errors import UsageError, WmgenError

EXIT_CODES = """Exit status: 0 success, 1 runtime failure, 2 usage error, 130 interrupted (Ctrl-C)."""


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
        return result if isinstance(result, int) else 0
    except click.UsageError as e:
        hint = f" (see '{e.ctx.command_path} --help')" if e.ctx else ""
        error(f"{e.format_message()}{hint}")
        return 2
    except click.ClickException as e:
        error(e.format_message())
        return e.exit_code
    except click.Abort:
        error("interrupted")
        return 130
    except WmgenError as e:
        error(str(e))
        return e.exit_code
    except BrokenPipe:
        return 0
    except Exception as e:
        if os.environ.get("WMGEN_DEBUG"):
            raise
        error(f"internal error: {type(e).__name__}: {e} (set WMGEN_DEBUG=1 to see the traceback)")
        return 1


class BrokenPipe(Exception):
    """stdout's reader went away; end quietly with status 0."""


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
)


@app.callback()
def root() -> None:
    """Generate text with GPT-2 through a bounded, inspectable working memory."""


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


def read_prompt(argument: str | None, file: str | None) -> str:
    """The prompt: stdin (or -f FILE), then a newline and the argument, if both are given."""
    parts = []
    if file is not None:
        try:
            with open(file, "rb") as f:
                parts.append(decode_utf8(f.read(), file))
        except OSError as e:
            raise UsageError(f"cannot read prompt file {file}: {e.strerror}") from None
    if file is None or argument == "-":
        piped = stdin_text()
        if piped is None and argument in (None, "-") and file is None:
            raise UsageError('no prompt: give one as an argument, pipe text on stdin, or use -f FILE (e.g. wmgen generate "Once upon a time")')
        if piped:
            parts.append(piped)
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
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="auto, float32, bfloat16 or float16.", show_default=False)] = None,
    config: Annotated[Optional[str], typer.Option("--config", help="A preset name (default, precise, creative, balanced, longform) or a .toml file.", show_default=False)] = None,
    file: Annotated[Optional[str], typer.Option("-f", "--file", help="Read the prompt from this file.", show_default=False)] = None,
    from_scratch: Annotated[bool, typer.Option("--from-scratch", help="Begin with <|endoftext|>, so an empty prompt is allowed.")] = False,
    echo: Annotated[bool, typer.Option("--echo", help="Print the prompt before the continuation.")] = False,
    stats: Annotated[bool, typer.Option("--stats", help="Print timings and memory counters on stderr at the end.")] = False,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="No notices on stderr.")] = False,
) -> None:
    """Stream a continuation of the prompt to stdout."""
    from wmgen.settings import load_settings

    flags = dict(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        repetition_penalty=repetition_penalty, seed=seed, stop=tuple(stop or ()), ignore_eos=ignore_eos,
        capacity=capacity, keep=keep, evict=evict, model=model, device=device, dtype=dtype,
    )  # fmt: skip
    settings = load_settings(flags=flags, env=os.environ, config=config)
    text = read_prompt(prompt, file)
    if not text and not from_scratch:
        raise UsageError("the prompt is empty; give some text, or --from-scratch to start from <|endoftext|>")
    run_generate(settings, text, from_scratch=from_scratch, echo=echo, stats=stats, quiet=quiet)


def run_generate(settings, text: str, *, from_scratch: bool, echo: bool, stats: bool, quiet: bool) -> None:
    from wmgen.model import load_tokenizer

    info, tokenizer = load_tokenizer(settings.model.name)
    prompt_ids = ([tokenizer.eos_id] if from_scratch else []) + tokenizer.encode(text)
    if not prompt_ids:
        raise UsageError("the prompt is empty after tokenizing; give some text, or --from-scratch")

    from wmgen.memory import WorkingMemory, resolve_shape

    capacity, keep, evict = resolve_shape(settings.memory, info.n_positions, len(prompt_ids))
    model = load_with_status(info, settings, quiet)
    memory = WorkingMemory(model, capacity, keep, evict)

    from wmgen.generation import Finished, Started, generate
    from wmgen.render import PipeClosed, TextWriter, stats_line

    writer = TextWriter(sys.stdout, echo_text=text if echo else None)
    eos = model.config.eos_token_id
    try:
        for event in generate(memory, tokenizer, prompt_ids, settings.run, settings.sampling, eos_id=eos):
            if isinstance(event, Started) and event.dropped:
                notice(f"the prompt has {event.prompt_tokens} tokens; memory holds {capacity}: "
                       f"{event.dropped} tokens before the last {capacity - keep} were dropped", quiet)  # fmt: skip
            writer.write(event)
            if isinstance(event, Finished):
                if writer.wrote_any and sys.stdout.isatty():
                    print()  # leave the shell prompt on a line of its own
                if stats:
                    print(stats_line(event), file=sys.stderr)
    except PipeClosed:
        quiet_stdout()
        raise BrokenPipe from None
    except KeyboardInterrupt:
        sys.stdout.flush()
        notice("interrupted", quiet)
        raise typer.Exit(130) from None


def quiet_stdout() -> None:
    """After a closed pipe: point stdout at /dev/null so the final flush is silent."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def load_with_status(info, settings, quiet: bool):
    from wmgen.model import load_model

    if quiet or not sys.stderr.isatty():
        return load_model(info, device=settings.model.device, dtype=settings.model.dtype)
    from rich.console import Console

    with Console(stderr=True).status(f"loading {info.name}"):
        return load_model(info, device=settings.model.device, dtype=settings.model.dtype)


def main() -> None:
    app()
