"""The wmgen command line: parses flags, calls the library (`wmgen.api`), picks a
writer, prints, and maps errors to exit codes. No torch at import time, so `wmgen
--help` is instant; the application's work lives in the library."""

from __future__ import annotations

import gc
import io
import os
import stat
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

try:  # typer >= 0.29 raises its own copy of click's exceptions
    from typer._click import exceptions as click_errors
except ImportError:  # older typer uses click itself
    from click import exceptions as click_errors

from wmgen import options
from wmgen.cli_chat import chat
from wmgen.cli_memory import memory_app
from wmgen.cli_serve import serve
from wmgen.errors import UsageError, WmgenError

EXIT_CODES = """Exit status: 0 success (also when a reader closes the pipe), 1 runtime failure, 2 usage error, 130 interrupted by Ctrl-C (SIGINT), 143 terminated (SIGTERM)."""
# The most text wmgen reads from a file or stdin: far more than any model's window
# (a long book is ~1 MiB); past it the input is refused rather than read until
# memory runs out (-f /dev/zero).
MAX_TEXT_BYTES = 64 << 20


class Group(TyperGroup):
    """Every error becomes one line on stderr and an exit status; tracebacks only
    with --debug or WMGEN_DEBUG=1."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        code = run_guarded(lambda: super(Group, self).main(args, prog_name, complete_var, standalone_mode=False, **extra))
        if standalone_mode:
            sys.exit(code)
        return code

    # click turns a closed pipe met while parsing (--help, --version) or running into
    # exit 1; make it the quiet BrokenPipe before click sees it
    def make_context(self, *args, **kwargs):
        with pipe_closed_is_quiet():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        with pipe_closed_is_quiet():
            return super().invoke(ctx)


@contextmanager
def pipe_closed_is_quiet():
    try:
        yield
    except BrokenPipeError:
        raise BrokenPipe from None


def pipe_closed() -> None:
    """For rich's `Console.on_broken_pipe`, which would exit with status 1."""
    raise BrokenPipe


def run_guarded(call) -> int:
    try:
        result = call()
        if result == 130:  # Ctrl-C before generation began (typer turned it into an exit)
            error("interrupted")
        code = result if isinstance(result, int) else 0
        flush_stdout()
        return code
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
    except (typer.Abort, KeyboardInterrupt):
        error("interrupted")
        return 130
    except WmgenError as e:
        error(str(e))
        return e.exit_code
    except (BrokenPipe, BrokenPipeError):  # a reader closed stdout: end quietly, whatever the command
        quiet_stdout()
        return 0
    except Interrupted as e:
        return e.code
    except Exception as e:
        if DEBUG["on"] or os.environ.get("WMGEN_DEBUG"):
            raise
        error(f"internal error: {type(e).__name__}: {e} (run with --debug or WMGEN_DEBUG=1 to see the traceback)")
        return 1


def flush_stdout() -> None:
    """The last flush, here rather than at exit, so that its failure is reported."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        raise BrokenPipe from None
    except OSError as e:
        from wmgen.errors import OutputError

        quiet_stdout()
        raise OutputError(f"cannot write to standard output: {e.strerror or e}") from None
    except (AttributeError, ValueError):  # no stdout, or a closed one
        pass


class BrokenPipe(Exception):
    """stdout's reader went away; end quietly with status 0."""


class Interrupted(Exception):
    """A signal stopped the run, which has said so: exit with 128 + the signal."""

    def __init__(self, code: int):
        self.code = code


def error(message: str) -> None:
    warn(f"error: {message}")


def notice(message: str, quiet: bool = False) -> None:
    if not quiet:
        warn(message)


def warn(message: str) -> None:
    """One line on stderr; nothing at all when stderr is closed (never on stdout)."""
    if sys.stderr is None:
        return
    try:
        print(f"wmgen: {message}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


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


# --- reading text ------------------------------------------------------------------


def read_text(stream, where: str) -> str:
    """At most MAX_TEXT_BYTES of UTF-8 text from a binary stream."""
    from wmgen import files

    try:
        data = files.read_stream(stream, MAX_TEXT_BYTES)
    except files.FileProblem as e:
        raise UsageError(f"{where} {e}; cut it first (e.g. head -c 1M)") from None
    try:
        return files.utf8(data)
    except files.FileProblem as e:
        raise UsageError(f"{where} {e}; convert it first, e.g. iconv -f latin1 -t utf-8") from None


def stdin_text(*, quiet: bool = True) -> str | None:
    """Piped or redirected stdin, or None when it is a terminal or absent."""
    stream = sys.stdin
    if stream is None or stream.isatty():
        return None
    try:
        mode = os.fstat(stream.fileno()).st_mode
        if not (stat.S_ISFIFO(mode) or stat.S_ISREG(mode) or stat.S_ISSOCK(mode)):
            return None
        if stat.S_ISFIFO(mode) and not quiet and sys.stderr is not None and sys.stderr.isatty() and not waiting_is_quick(stream.fileno()):
            notice("waiting for text on stdin (add --no-stdin to ignore it)")
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        pass  # an in-memory stream (tests): read it
    return read_text(stream.buffer if hasattr(stream, "buffer") else io.BytesIO(stream.read().encode()), "stdin")


def waiting_is_quick(fd: int, seconds: float = 1.0) -> bool:
    """Whether a pipe has something to read (or is closed) within `seconds`."""
    import select

    try:
        return bool(select.select([fd], [], [], seconds)[0])
    except (OSError, ValueError):
        return True


def read_utf8_file(path: str, what: str) -> str:
    """A text file (or a pipe, as `-f <(cmd)` gives), at most MAX_TEXT_BYTES."""
    if path == "-":
        text = stdin_text()
        if text is None:
            raise UsageError(f"no text on stdin for the {what}: pipe some in, or give a file")
        return text
    try:
        with open(path, "rb") as f:
            return read_text(f, path)
    except IsADirectoryError:
        raise UsageError(f"{path} is a folder; give a {what}") from None
    except OSError as e:
        raise UsageError(f"cannot read {what} {path}: {e.strerror}") from None


def read_prompt(argument: str | None, file: str | None, *, required: bool = True, use_stdin: bool = True, quiet: bool = True) -> str:
    """The prompt: the text of -f FILE or piped stdin (less the one trailing newline
    echo and editors add), then the argument on a line of its own."""
    from wmgen.settings import check_utf8

    if argument not in (None, "-"):
        check_utf8(argument, "the prompt")
    if file is not None:
        source = read_utf8_file(file, "prompt file")
    else:
        source = stdin_text(quiet=quiet) if use_stdin else None
        if source is None and argument in (None, "-") and required:
            hint = " (--no-stdin was given)" if not use_stdin else ""
            raise UsageError(f'no prompt{hint}: give one as an argument, pipe text on stdin, or use -f FILE (e.g. wmgen generate "Once upon a time")')
    parts = [source.removesuffix("\n")] if source else []
    if argument not in (None, "-"):
        parts.append(argument)
    return "\n".join(parts)


# --- settings and the model ----------------------------------------------------------


def build_settings(flags: dict, config: str | None, quiet: bool):
    """Settings from the layers (presets, user config, WMGEN_*, flags); unknown
    WMGEN_* variables are warned about once."""
    from wmgen.settings import load_settings, unknown_env, unknown_env_warning

    for name in unknown_env(os.environ):
        notice(f"warning: {unknown_env_warning(name)}", quiet)
    return load_settings(flags=flags, env=os.environ, config=config)


def open_model(settings, quiet: bool = False, color: bool = True):
    """The library's model; a spinner on a terminal while the weights are read."""
    from contextlib import contextmanager

    from wmgen.api import Model
    from wmgen.settings import forced_kernels

    kernels = forced_kernels(os.environ)  # checked before the weights are read

    @contextmanager
    def loading(name: str):
        plain = not color or os.environ.get("NO_COLOR") or sys.stderr is None or not sys.stderr.isatty()
        if quiet or plain:  # a spinner is terminal control codes
            yield
        else:
            from rich.console import Console

            with Console(stderr=True).status(f"loading {name}"):
                yield
        collect_garbage_from_now_on()

    return Model(settings, loading=loading, kernels=kernels)


@app.command()
def generate(
    prompt: Annotated[Optional[str], typer.Argument(help="The prompt. Use - (or nothing) to read stdin; piped stdin and an argument are joined by a newline.", show_default=False)] = None,
    max_new_tokens: options.MaxNewTokens = None,
    temperature: options.Temperature = None,
    top_k: options.TopK = None,
    top_p: options.TopP = None,
    repetition_penalty: options.RepetitionPenalty = None,
    seed: options.Seed = None,
    stop: options.Stop = None,
    ignore_eos: options.IgnoreEos = None,
    lookahead: options.Lookahead = None,
    capacity: options.Capacity = None,
    keep: options.Keep = None,
    evict: options.Evict = None,
    policy: options.Policy = None,
    recent: options.Recent = None,
    model: options.Model = None,
    device: options.Device = None,
    dtype: options.Dtype = None,
    config: options.Config = None,
    file: Annotated[Optional[str], typer.Option("-f", "--file", help="Read the prompt from this file (- for stdin).", show_default=False)] = None,
    no_stdin: Annotated[bool, typer.Option("--no-stdin", help="Do not read stdin, even when it is piped (for loops that read their own input).")] = False,
    from_scratch: Annotated[bool, typer.Option("--from-scratch", help="Begin with <|endoftext|>, so an empty prompt is allowed.")] = False,
    echo: Annotated[bool, typer.Option("--echo", help="Print the prompt before the continuation.")] = False,
    stats: Annotated[bool, typer.Option("--stats", help="Print timings and memory counters on stderr at the end.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="With --stats, also the kernels chosen for this machine; and tracebacks of unexpected errors.")] = False,
    quiet: options.Quiet = False,
    session: Annotated[Optional[str], typer.Option("--session", "-s", help="Save the final memory as this session (default: 'last').", show_default=False)] = None,
    continue_: options.Continue = False,
    no_save: options.NoSave = False,
    format_: Annotated[str, typer.Option("--format", help="text, jsonl (one event per line, as it happens) or json (one object at the end).")] = "text",
    each_line: Annotated[bool, typer.Option("--each-line", help="One prompt per input line (stdin or -f FILE), run as a batch; results in input order.")] = False,
    num_samples: Annotated[int, typer.Option("--num-samples", help="Draw N continuations of the prompt, as one batch.", min=1)] = 1,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Rows run together at most (--each-line, --num-samples).", min=1)] = 8,
    separator: Annotated[str, typer.Option("--separator", help="With --format text and several results: the line printed after each.")] = "---",
    no_color: options.NoColor = False,
    trace: options.TracePath = None,
    server: Annotated[Optional[str], typer.Option("--server", envvar="WMGEN_SERVER", help="Run on this wmgen serve (a URL) instead of loading the model here; sessions are the server's. (also WMGEN_SERVER)", show_default=False)] = None,
) -> None:
    """Stream a continuation of the prompt to stdout.

    The final working memory is saved as session 'last' (or --session NAME);
    -c continues from it.
    """
    from wmgen import session as sessions
    from wmgen.settings import check_utf8, coerce, state_dir

    check_utf8(separator, "--separator")
    DEBUG["on"] = DEBUG["on"] or debug
    flags = dict(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        repetition_penalty=repetition_penalty, seed=seed, stop=tuple(stop or ()), ignore_eos=ignore_eos, lookahead=lookahead,
        capacity=capacity, keep=keep, evict=evict, policy=policy, recent=recent, model=model, device=device, dtype=dtype,
    )
    state = state_dir(os.environ)
    name = sessions.check_name("last" if session is None else session)
    if format_ not in FORMATS:
        raise UsageError(f"--format {format_!r} is not one of {', '.join(FORMATS)}")
    if continue_ and (each_line or num_samples > 1):
        raise UsageError("--continue goes with a single prompt, not --each-line or --num-samples")
    if continue_ and keep == "prompt":
        raise UsageError("--keep prompt pins a new memory's prompt; with -c the memory keeps its pinned head (give a count to change it)")
    if trace and (each_line or num_samples > 1):
        raise UsageError("--trace follows one memory; --each-line and --num-samples run many (trace one prompt at a time)")
    if trace and server:
        raise UsageError("--trace writes the ledger of a memory run here; with --server the memory is the server's")
    if server:
        if each_line or num_samples > 1:
            raise UsageError("--server runs one prompt at a time; --each-line and --num-samples run here (leave out --server)")
        if config is not None or device is not None or dtype is not None:
            raise UsageError("--config, --device and --dtype are the server's own (wmgen serve takes them); leave them out with --server")
        out = Output(format_, echo=echo, stats=stats, quiet=quiet, color=not no_color and not os.environ.get("NO_COLOR"))
        text = read_prompt(prompt, file, required=not continue_ and not from_scratch, use_stdin=not no_stdin, quiet=quiet)
        run_on_server(server, flags, text, out, name=name, continue_=continue_, save=not no_save, from_scratch=from_scratch)
        return
    previous = sessions.read(state, name) if continue_ else None
    if previous is not None and model is None:
        flags["model"] = previous["model"]  # a continued memory keeps its model unless --model says otherwise
    settings = build_settings(flags, config, quiet)
    out = Output(format_, echo=echo, stats=stats, quiet=quiet, color=not no_color and not os.environ.get("NO_COLOR"))
    if each_line or num_samples > 1:
        prompts = read_prompts(prompt, file, each_line=each_line, samples=num_samples, from_scratch=from_scratch, use_stdin=not no_stdin)
        run_many(settings, prompts, out, from_scratch=from_scratch, batch_size=batch_size, separator=separator)
        return
    text = read_prompt(prompt, file, required=previous is None and not from_scratch, use_stdin=not no_stdin, quiet=quiet)
    if not text and not from_scratch and previous is None:
        raise UsageError("the prompt is empty; give some text, or --from-scratch to start from <|endoftext|>")
    lm = open_model(settings, out.quiet, out.color)
    memory = None
    if previous is not None:
        given = {"capacity": capacity, "keep": keep, "evict": evict, "policy": policy, "recent": recent}
        shape = {k: coerce(k, v, f"--{k}") for k, v in given.items() if v is not None}
        mark = sessions.fingerprint(previous)  # so the save can tell whether another run saved it since
        try:
            memory = lm.restore(previous, source=f"session '{name}'", **shape)
        except UsageError as e:
            raise blamed(e, settings) from None
        sessions.remember(memory, state, name, mark)
        if lost := previous["fill"] - memory.fill:
            notice(f"the session held {previous['fill']} tokens; capacity {memory.capacity} keeps {memory.fill} ({lost} dropped)", out.quiet)
    run_generate(lm, text, out, memory=memory, save_to=None if no_save else (state, name), from_scratch=from_scratch, trace=trace)


FORMATS = ("text", "jsonl", "json")
TRACE_CAP = 100_000  # events of a perplexity ledger: a long text's scoring would write one per chunk and eviction
app.command()(chat)  # wmgen chat: its options and state in wmgen.cli_chat, its loop in wmgen.chat
app.command()(serve)  # wmgen serve: its options in wmgen.cli_serve, its routes in wmgen.server, its batching in wmgen.engine


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


def blamed(e: UsageError, settings) -> UsageError:
    from wmgen.settings import blame

    return blame(e, settings)


def make_writer(out: Output, text: str, about: dict):
    from wmgen.render import JsonlWriter, JsonWriter, TextWriter

    if out.format == "jsonl":
        return JsonlWriter(sys.stdout, about=about)
    if out.format == "json":
        return JsonWriter(sys.stdout, prompt=text, about=about)
    return TextWriter(sys.stdout, echo_text=text if out.echo else None)


def run_generate(lm, text: str, out: Output, *, memory, save_to, from_scratch: bool, trace: str | None = None) -> None:
    """One prompt: stream its events to the writer, save the memory, report."""
    from wmgen.errors import OutputError
    from wmgen.render import PipeClosed
    from wmgen.settings import as_dict

    settings = lm.settings
    about = {"model": lm.name, "settings": as_dict(settings)}
    writer = make_writer(out, text, about)
    ids = lm.encode(text, from_scratch=from_scratch)
    if not ids and memory is None:
        raise UsageError("the prompt is empty after tokenizing; give some text, or --from-scratch")
    if memory is None:
        memory = lm.memory(**lm.shape(prompt_tokens=len(ids))._asdict())
    about["settings"]["memory"] = memory.shape._asdict()  # the memory's own: a continued one keeps its shape
    ledger = open_trace(trace, memory) if trace else None
    with Signals() as signals, ledger or nullcontext():
        events = lm.events(ids, memory=memory, should_stop=signals.stop_requested)
        try:
            write_events(events, writer, out, about, memory.shape, lambda: save_memory(save_to, memory), lm)
        except PipeClosed:
            quiet_stdout()
            events.close()
            save_memory(save_to, memory, report=False)
            raise BrokenPipe from None
        except OutputError:
            quiet_stdout()
            events.close()
            save_memory(save_to, memory)
            raise
        signals.exit_if_received(out.quiet)


def open_trace(path: str, memory, *, cap: int | None = None):
    """The memory's ledger, written to `path` from now on (`wmgen.trace`)."""
    from wmgen.trace import Trace

    if path == "-":
        raise UsageError("--trace needs a file (stdout is the generated text)")
    try:
        out = open(path, "w", encoding="utf-8")
    except IsADirectoryError:
        raise UsageError(f"--trace {path} is a folder; give a file") from None
    except OSError as e:
        raise UsageError(f"--trace {path}: cannot write it ({e.strerror})") from None
    ledger = Trace(out, memory, cap=cap)
    memory.trace = ledger
    return ledger


def run_on_server(url: str, flags: dict, text: str, out: Output, *, name: str, continue_: bool, save: bool, from_scratch: bool) -> None:
    """`generate --server`: the same run on a server, written as a local one is."""
    from wmgen.client import RemoteRun, check_url
    from wmgen.errors import OutputError
    from wmgen.render import PipeClosed
    from wmgen.settings import coerce

    url = check_url(url)
    given = {k: coerce(k, v, f"--{k.replace('_', '-')}") for k, v in flags.items() if v is not None and v != () and k != "model"}
    if not text and not from_scratch and not continue_:
        raise UsageError("the prompt is empty; give some text, or --from-scratch to start from <|endoftext|>")
    body = {"prompt": text, "from_scratch": from_scratch, "options": {k: list(v) if isinstance(v, tuple) else v for k, v in given.items()},
            "session": name, "continue": continue_, "save": save} | ({"model": flags["model"]} if flags.get("model") else {})
    with Signals() as signals:
        run = RemoteRun(url, body, os.environ.get("WMGEN_API_KEY"), signals.stop_requested)
        writer = make_writer(out, text, run.about)
        try:
            write_events(run.events(), writer, out, run.about, run.shape, lambda: remote_saved(run, name, out))
        except (PipeClosed, BrokenPipeError):
            quiet_stdout()
            raise BrokenPipe from None
        except OutputError:
            quiet_stdout()
            raise
        signals.exit_if_received(out.quiet)


def remote_saved(run, name: str, out: Output) -> dict:
    """What the server said about the session, warned about as a local save is."""
    saved = run.saved
    if saved.get("conflict"):
        warn(f"warning: session '{name}' was saved by another run after this one read it, so it is kept; this memory is saved as '{saved.get('session')}'")
    elif saved.get("save_error"):
        warn(f"warning: the memory was not saved: {saved['save_error']}")
    return saved


def write_events(events, writer, out: Output, about: dict, shape, saved, lm=None) -> None:
    """A run's events to the writer, as they come: the seed noted in `about`, a
    prompt that did not fit said, and at the end what `saved()` reports about the
    session, then the stats line (a local run or one on a server writes the same)."""
    from wmgen.events import Finished, Started
    from wmgen.render import stats_line

    for event in events:
        if isinstance(event, Started):
            about["settings"]["sampling"]["seed"] = event.seed  # said, so a run can be repeated
            if event.unread:
                notice(f"the prompt has {event.prompt_tokens} tokens; memory holds {shape.capacity}: "
                       f"{event.unread} tokens before the last {shape.capacity - shape.keep} were not read", out.quiet)
        if isinstance(event, Finished):
            writer.write(event, **saved())
            if out.format == "text" and writer.wrote_any and sys.stdout.isatty():
                print()  # leave the shell prompt on a line of its own
            if out.stats:
                warn_line(stats_line(event))
                if lm is not None:
                    report_kernels(lm)
        else:
            writer.write(event)


def report_kernels(lm) -> None:
    """With --debug (or WMGEN_DEBUG), which kernels ran and how they were chosen, and
    the dtype keys and values are kept in."""
    if DEBUG["on"] or os.environ.get("WMGEN_DEBUG"):
        warn_line(f"kernels: {lm.kernels} · keys and values {str(lm.network.kv_dtype).removeprefix('torch.')}")


def warn_line(text: str) -> None:
    if sys.stderr is not None:
        try:
            print(text, file=sys.stderr, flush=True)
        except (OSError, ValueError):
            pass


def save_memory(save_to, memory, *, report: bool = True) -> dict:
    """Save the memory as a session (unless --no-save), as the session name asked
    for or, when that name holds a session this memory must not replace (another
    tokenizer's, an unreadable one, or one another run saved after `-c` read it),
    the next free one. A failure is a warning, never silenced by -q (the text was
    already written). Returns what the JSON output says about it."""
    if save_to is None:
        return {"saved": False, "session": None}
    from wmgen import session as sessions

    state, name = save_to
    try:
        used, conflict = sessions.store(memory, name, home=state, fallback=True)
    except WmgenError as e:
        if report:
            warn(f"warning: the memory was not saved: {e}")
        return {"saved": False, "session": None, "save_error": str(e)}
    if conflict and report:
        warn(f"warning: session '{name}' was saved by another run after this one read it, so it is kept; this memory is saved as '{used}'")
    elif used != name and report:
        warn(f"warning: session '{name}' was made with another tokenizer or cannot be read, so it is kept; this memory is saved as '{used}'")
    return {"saved": True, "session": used} | ({"conflict": conflict} if conflict else {})


def read_prompts(argument: str | None, file: str | None, *, each_line: bool, samples: int, from_scratch: bool = False,
                 use_stdin: bool = True) -> list[tuple[int | None, int | None, str]]:
    """(line number, sample number, prompt) for every row of a batched run."""
    if not each_line:
        text = read_prompt(argument, file, required=not from_scratch, use_stdin=use_stdin)
        if not text and not from_scratch:
            raise UsageError("the prompt is empty; give some text to sample from, or --from-scratch")
        return [(None, i, text) for i in range(samples)]
    if file is not None:
        source = read_prompt(None, file)
    else:
        source = stdin_text() if use_stdin else None
        if source is None:
            raise UsageError("--each-line reads one prompt per line from stdin or -f FILE; neither has any")
    if argument not in (None, "-"):
        from wmgen.settings import check_utf8

        check_utf8(argument, "the prompt")
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
    from time import perf_counter

    from wmgen.render import PipeClosed, generation_record, put, put_line

    lm = open_model(settings, out.quiet, out.color)
    base = settings.sampling.seed if settings.sampling.seed is not None else secrets.randbits(62)
    seeds = [(base + (sample or 0)) % 2**63 for _, sample, _ in prompts]  # each line as if run alone with --seed
    records, total = [], 0
    t0 = perf_counter()
    with Signals() as signals:
        results = lm.generate_each([text for _, _, text in prompts], seed=seeds, batch_size=batch_size,
                                   from_scratch=from_scratch, should_stop=signals.stop_requested)
        try:
            for i, g in enumerate(results):
                line, sample, text = prompts[i]
                total += len(g.tokens)
                record = {"type": "result"} | ({"line": line} if line is not None else {}) | ({"sample": sample} if sample is not None else {})
                record |= generation_record(g)
                if out.format == "jsonl":
                    put_line(sys.stdout, record)
                elif out.format == "json":
                    records.append(record)
                else:
                    put(sys.stdout, ((text if out.echo else "") + g.text) + "\n" + separator + "\n")
            if out.format == "json":
                put_line(sys.stdout, records, indent=1)
        except PipeClosed:
            quiet_stdout()
            raise BrokenPipe from None
        if out.stats:
            elapsed = perf_counter() - t0
            rate = total / elapsed if elapsed else 0.0
            warn_line(f"{len(prompts)} prompts · generated {total} tokens · {elapsed:.2f} s · {rate:.1f} tokens/s in all")
            report_kernels(lm)
        signals.exit_if_received(out.quiet)


def quiet_stdout() -> None:
    """After a closed pipe or a failed write: point stdout at /dev/null so that the
    final flush is silent."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        pass


def console_for(no_color: bool):
    """A rich console on stdout: colour and boxes only on a terminal without NO_COLOR."""
    from rich.console import Console

    plain = no_color or bool(os.environ.get("NO_COLOR")) or not sys.stdout.isatty()
    console = Console(color_system=None if plain else "auto", highlight=False, soft_wrap=False)
    console.on_broken_pipe = pipe_closed
    return console, plain


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
    policy: Annotated[Optional[str], typer.Option("--policy", help="With --prompt: what a full memory forgets (oldest, boundary, attention).", show_default=False)] = None,
    recent: Annotated[Optional[int], typer.Option("--recent", help="With --prompt and --policy attention: recent tokens always kept.", show_default=False)] = None,
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
    from wmgen import session as sessions
    from wmgen.settings import state_dir

    if head is not None and tail is not None:
        raise UsageError("--head and --tail cannot be used together; pick one")
    if as_json and as_text:
        raise UsageError("--json and --text cannot be used together; pick one")
    if layer is not None and not attention:
        raise UsageError("--layer goes with --attention")
    if layer is not None and layer < 0:
        raise UsageError(f"--layer {layer}: layers are numbered from 0")
    if prompt is not None:
        flags = dict(capacity=capacity, keep=keep, evict=evict, policy=policy, recent=recent, model=model, device=device, dtype=dtype)
        lm = open_model(build_settings(flags, config, quiet=False), color=not no_color)
        snap = lm.preview(read_prompt(prompt, None))
    else:
        if any(v is not None for v in (capacity, keep, evict, policy, recent)):
            raise UsageError("--capacity, --keep, --evict, --policy and --recent shape a --prompt preview; a saved session keeps its own")
        name = sessions.check_name("last" if session is None else session)
        snap = sessions.read(state_dir(os.environ), name) | {"name": name}  # the name asked for, not the one inside a copied file
        lm = None
        if attention:
            flags = dict(model=model or snap.get("model"), device=device, dtype=dtype)
            lm = open_model(build_settings(flags, config, quiet=False), color=not no_color)
    if attention:
        try:
            source = "the preview" if prompt is not None else f"session '{name}'"
            snap["attention"] = {"layer": layer, "shares": lm.attention(snap, layer, source=source)}
        except UsageError as e:
            raise UsageError(f"--{e}") if e.key == "layer" else e from None

    if as_json:
        from wmgen.render import put_line, select_slots

        put_line(sys.stdout, snap | {"slots": select_slots(snap["slots"], head, tail)}, indent=1)
    elif as_text:
        from wmgen.render import put

        put(sys.stdout, snap.get("text", "") + ("\n" if sys.stdout.isatty() else ""))
    else:
        from wmgen.render import show_memory

        console, plain = console_for(no_color)
        show_memory(snap, console, head=head, tail=tail, plain=plain)


app.add_typer(memory_app)  # wmgen memory forget|pin|unpin|insert|fork|undo|diff, in wmgen.cli_memory


@app.command("timeline")
def timeline_command(
    trace: Annotated[str, typer.Argument(help="A trace written by --trace FILE.", show_default=False)],
    output: Annotated[Optional[str], typer.Option("-o", "--output", help="Draw it to this .png or .svg (needs matplotlib) instead of the terminal.", show_default=False)] = None,
    no_color: options.NoColor = False,
) -> None:
    """Draw what the memory held over time, from a --trace ledger.

    x is the step, y the tokens in the order they were read; a cell wherever a
    token was in memory. Colour: the attention it received (policy attention),
    else its origin. Evictions and pinned rows are marked.
    """
    from wmgen import trace as ledger
    from wmgen.timeline import check_path, draw, show

    if output is not None:
        check_path(output)
    view = ledger.timeline(ledger.load(trace))
    if not view["rows"]:
        raise UsageError(f"{trace} holds no tokens yet (the run it traces read nothing)")
    if output is None:
        console, plain = console_for(no_color)
        show(view, console, plain=plain)
        return
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("drawing a picture needs matplotlib: pip install 'wmgen[plot]' (or leave out -o for the terminal view)") from None
    width, height = draw(view, output)
    notice(f"wrote {output} ({width}×{height} px: {len(view['rows'])} tokens, {view['steps'] + 1} steps, {len(view['evictions'])} evictions)")


@app.command("sessions")
def list_sessions(
    delete: Annotated[Optional[list[str]], typer.Option("--delete", help="Delete this session. Repeatable.", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the list as JSON.")] = False,
    no_color: Annotated[bool, typer.Option("--no-color", help="No colour or box drawing.")] = False,
) -> None:
    """List saved sessions (or delete some with --delete NAME)."""
    from wmgen import session as sessions
    from wmgen.render import put
    from wmgen.settings import state_dir

    state = state_dir(os.environ)
    if delete:
        for name in delete:
            path = sessions.delete(state, name)
            warn(f"deleted session '{name}' ({path})")
        return
    rows = sessions.listing(state)
    if as_json:
        from wmgen.render import put_line

        put_line(sys.stdout, rows, indent=1)
    elif not sys.stdout.isatty():
        from wmgen.render import session_lines

        if not rows:
            warn("no saved sessions")
        put(sys.stdout, session_lines(rows))
    else:
        from wmgen.render import show_sessions

        console, plain = console_for(no_color)
        show_sessions(rows, console, plain=plain)


SWEEP_KEYS = ("capacity", "evict", "keep", "policy", "recent")


def parse_sweep(specs: list[str]) -> list[dict[str, int | str]]:
    """`["capacity=128,256", "policy=oldest,attention"]` -> every combination, as dicts."""
    import itertools

    from wmgen.settings import POLICIES

    axes: dict[str, list] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        if not sep or key not in SWEEP_KEYS:
            raise UsageError(f"--sweep {spec!r}: expected KEY=V1,V2,... with KEY one of {', '.join(SWEEP_KEYS)}")
        axes[key] = [v.strip() for v in values.split(",") if v.strip()]
        if not axes[key]:
            raise UsageError(f"--sweep {spec!r}: give at least one value")
        if key == "policy":
            if bad := [v for v in axes[key] if v not in POLICIES]:
                raise UsageError(f"--sweep {spec!r}: {bad[0]!r} is not one of {', '.join(POLICIES)}")
            continue
        try:
            axes[key] = [int(v) for v in axes[key]]
        except ValueError:
            raise UsageError(f"--sweep {spec!r}: values must be whole numbers separated by commas") from None
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


PLOT_SUFFIXES = (".png", ".svg", ".pdf")


def check_plot_path(path: str) -> None:
    """Before any scoring: a file name matplotlib will write as given, in a folder
    that exists, and matplotlib itself."""
    from pathlib import Path

    target = Path(path)
    if target.suffix.lower() not in PLOT_SUFFIXES:
        raise UsageError(f"--plot {path}: give a file name ending in {', '.join(PLOT_SUFFIXES)}")
    if target.is_dir():
        raise UsageError(f"--plot {path} is a folder; give a file name such as {target / 'sweep.png'}")
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"--plot {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"--plot {path}: the folder {folder} is not writable")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install matplotlib") from None


@app.command()
def perplexity(
    file: Annotated[str, typer.Argument(help="Text file to score, or - for stdin.", show_default=False)],
    sweep_rest: Annotated[Optional[list[str]], typer.Argument(help="More KEY=V1,V2 axes for --sweep.", show_default=False)] = None,
    capacity: Annotated[Optional[int], typer.Option("--capacity", help="Working memory size in tokens. (default: the model's limit)", show_default=False)] = None,
    keep: Annotated[Optional[int], typer.Option("--keep", help="Pinned tokens at the head of memory. (default: 0)", show_default=False)] = None,
    evict: Annotated[Optional[int], typer.Option("--evict", help="Tokens dropped per eviction; 1 is the exact sliding window.", show_default=False)] = None,
    policy: options.Policy = None,
    recent: options.Recent = None,
    max_tokens: Annotated[Optional[int], typer.Option("--max-tokens", help="Score only the first N tokens of the text.", min=2, show_default=False)] = None,
    sweep: Annotated[Optional[list[str]], typer.Option("--sweep", help="Score a grid of memory shapes: --sweep capacity=128,256 evict=1,64 [keep=0,4] [policy=oldest,attention] [recent=...].", show_default=False)] = None,
    plot: Annotated[Optional[str], typer.Option("--plot", help="With --sweep: write a PNG of perplexity against speed.", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    model: options.Model = None,
    device: options.Device = None,
    dtype: options.Dtype = None,
    config: Annotated[Optional[str], typer.Option("--config", help="A preset name or .toml file.", show_default=False)] = None,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="No notices or progress on stderr.")] = False,
    trace: Annotated[Optional[str], typer.Option("--trace", help=f"Write the memory's ledger to this file (at most {TRACE_CAP:,} events; not with --sweep).", show_default=False)] = None,
    cost: Annotated[bool, typer.Option("--cost", help="Also measure what each eviction cost: the tokens up to the next one scored again through a memory that kept what it dropped.")] = False,
    bound: Annotated[bool, typer.Option("--cost-bound", help="With the cost, what the least costly other choice of slots to drop would have cost (slow: about capacity times).")] = False,
) -> None:
    """Score a text through working memory: perplexity, bits per byte, speed.

    Each token is scored with the log-probability the model gives it from what is
    in memory just before it; the text is read in batched chunks. With --cost, the
    cost of forgetting, eviction by eviction (exact: see the README).
    """
    if sweep_rest and not sweep:
        raise UsageError(f"unexpected arguments {' '.join(sweep_rest)}; only one FILE is scored (grids go after --sweep)")
    if plot and not sweep:
        raise UsageError("--plot draws a --sweep; add --sweep capacity=...,... evict=...,...")
    if plot:
        check_plot_path(plot)
    if trace and sweep:
        raise UsageError("--trace follows one memory; --sweep scores many (trace one shape at a time)")
    grid = parse_sweep([*(sweep or []), *(sweep_rest or [])]) if sweep else None
    flags = dict(capacity=capacity, keep=keep, evict=evict, policy=policy, recent=recent, model=model, device=device, dtype=dtype)
    settings = build_settings(flags, config, quiet)
    text = read_text_file(file)
    lm = open_model(settings, quiet)
    ids = lm.encode(text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise UsageError(f"{file} has {len(ids)} token(s); scoring needs at least 2")
    if settings.memory.keep == "prompt":
        raise blamed(UsageError("keep 'prompt' has no meaning for perplexity; give a count", key="keep"), settings)
    shapes = []
    for point in grid or [{}]:
        try:
            shapes.append(lm.shape(**point))  # every shape checked before any scoring
        except UsageError as e:
            raise UsageError(f"--sweep {e}") if e.key in point else e from None
        if cost or bound:
            try:
                lm.check_cost(shapes[-1])
            except UsageError as e:
                raise UsageError(f"{'--cost-bound' if bound else '--cost'}: {e} (--capacity)") from None

    from wmgen.perplexity import looks_untrained

    results = []
    with progress_bar(len(ids) - 1, len(shapes), quiet) as advance:
        for shape in shapes:
            if trace:
                memory = lm.memory(**shape._asdict())
                with open_trace(trace, memory, cap=TRACE_CAP):
                    results.append(lm.perplexity(ids, memory=memory, progress=advance, cost=cost, bound=bound))
            else:
                results.append(lm.perplexity(ids, **shape._asdict(), progress=advance, cost=cost, bound=bound))
    if looks_untrained(results[0].perplexity, lm.info.vocab_size):
        notice(f"warning: perplexity {results[0].perplexity:.0f} is about the vocabulary size ({lm.info.vocab_size}): "
               "this model looks untrained, so these numbers say nothing about quality", quiet)

    from wmgen.render import put

    about = {"model": lm.name, "file": file, "text_tokens": len(ids)}
    if as_json:
        from wmgen.render import put_line

        data = [r.as_dict() | about for r in results] if grid else results[0].as_dict() | about
        put_line(sys.stdout, data, indent=1)
    else:
        from wmgen.render import score_table

        put(sys.stdout, score_table(results, about) + "\n")
        if cost or bound:
            from wmgen.render import cost_table

            put(sys.stdout, cost_table(results) + "\n")
    if plot:  # after the results are out, whatever the plot does
        from wmgen.render import plot_sweep

        plot_sweep(results, plot, title=f"{lm.info.name} on {file}")
        notice(f"wrote {plot}", quiet)


def read_text_file(file: str) -> str:
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
        if quiet or sys.stderr is None or not sys.stderr.isatty():
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
