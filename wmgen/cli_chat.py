"""The `wmgen chat` command: its options (generate's, from `wmgen.options`, and the
template's), and the `Chat` the REPL (`wmgen.chat`) starts from. No torch at
import; `wmgen.cli` registers the command."""

from __future__ import annotations

import os
import sys
from typing import Annotated, Optional

import typer

from wmgen import options

TEMPLATE_HELP = "Talk in a transcript: chat (User: / Bot:) or qa (Q: / A:); the model's turn ends where it begins the next user line."


def chat(
    max_new_tokens: options.MaxNewTokens = None,
    temperature: options.Temperature = None,
    top_k: options.TopK = None,
    top_p: options.TopP = None,
    repetition_penalty: options.RepetitionPenalty = None,
    seed: options.Seed = None,
    stop: options.Stop = None,
    ignore_eos: options.IgnoreEos = None,
    capacity: options.Capacity = None,
    keep: options.Keep = None,
    evict: options.Evict = None,
    policy: options.Policy = None,
    recent: options.Recent = None,
    model: options.Model = None,
    device: options.Device = None,
    dtype: options.Dtype = None,
    config: options.Config = None,
    template: Annotated[Optional[str], typer.Option("--template", help=TEMPLATE_HELP, show_default=False)] = None,
    user_prefix: Annotated[Optional[str], typer.Option("--user-prefix", help="With a transcript: the label of your lines (default: 'User:').", show_default=False)] = None,
    bot_prefix: Annotated[Optional[str], typer.Option("--bot-prefix", help="With a transcript: the label of the model's lines (default: 'Bot:').", show_default=False)] = None,
    session: Annotated[Optional[str], typer.Option("--session", "-s", help="Start from this session when it exists, and save to it. (default: a new memory, saved as 'last')", show_default=False)] = None,
    continue_: options.Continue = False,
    no_save: options.NoSave = False,
    quiet: options.Quiet = False,
    no_color: options.NoColor = False,
    trace: options.TracePath = None,
) -> None:
    """Talk to the model through one live working memory, loaded once.

    Each line you type is read into the memory and the model continues it; lines
    that start with / are commands (/help lists them). With stdin piped, every
    line is a turn or a command. The memory is saved after every turn, as session
    'last' (or --session NAME); -c continues it.
    """
    from wmgen import chat as repl
    from wmgen import cli
    from wmgen import session as sessions
    from wmgen.errors import OutputError, UsageError
    from wmgen.settings import coerce, state_dir

    flags = dict(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        repetition_penalty=repetition_penalty, seed=seed, stop=tuple(stop or ()), ignore_eos=ignore_eos,
        capacity=capacity, keep=keep, evict=evict, policy=policy, recent=recent, model=model, device=device, dtype=dtype,
    )
    state = state_dir(os.environ)
    name = sessions.check_name("last" if session is None else session)
    transcript = repl.template_for(template, user_prefix, bot_prefix)
    resume = continue_ or (session is not None and os.path.lexists(sessions.path_of(state, name)))
    if resume and keep == "prompt":
        raise UsageError("--keep prompt pins a new memory's first text; a saved memory keeps its pins (give a count to change the head)")
    previous = sessions.read(state, name) if resume else None
    if previous is not None and model is None:
        flags["model"] = previous["model"]  # a continued memory keeps its model unless --model says otherwise
    settings = cli.build_settings(flags, config, quiet)
    color = not no_color and not os.environ.get("NO_COLOR")
    lm = cli.open_model(settings, quiet, color)
    if previous is None:
        memory = lm.memory()
    else:
        given = {"capacity": capacity, "keep": keep, "evict": evict, "policy": policy, "recent": recent}
        shape = {k: coerce(k, v, f"--{k}") for k, v in given.items() if v is not None}
        try:
            memory = lm.restore(previous, source=f"session '{name}'", **shape)
        except UsageError as e:
            raise cli.blamed(e, settings) from None
        if lost := previous["fill"] - memory.fill:
            cli.notice(f"the session held {previous['fill']} tokens; capacity {memory.capacity} keeps {memory.fill} ({lost} dropped)", quiet)
        memory.logits()  # read now: every turn then costs only its own tokens
    console, plain = cli.console_for(no_color)
    ledger = cli.open_trace(trace, memory) if trace else None
    state_of_chat = repl.Chat(
        lm=lm, memory=memory, session=name, state=state, save=lambda m, n, report=True: cli.save_memory((state, n), m, report=report),
        warn=cli.warn, signals=cli.Signals, console=console, plain=plain, interactive=sys.stdin is not None and sys.stdin.isatty(),
        autosave=not no_save, quiet=quiet, template=transcript, trace=ledger,
    )
    try:
        code = repl.run_chat(state_of_chat)
    except BrokenPipeError:  # a reader closed stdout: end quietly, the memory saved
        cli.quiet_stdout()
        raise cli.BrokenPipe from None
    except OutputError:
        cli.quiet_stdout()
        raise
    finally:
        if ledger is not None:
            ledger.close()
    if code:
        raise cli.Interrupted(code)
