"""`wmgen chat`: one live working memory, the model loaded once.

Three small parts, as `llm chat` has them: `run_chat` is the loop (a line is a turn
or a command), `turn` does one turn (the typed text read into the memory, the
model's continuation streamed from `Model.events`, the path `generate -c` takes),
and `after_turn` saves the memory. Commands (`/forget 40-80`, `/undo`, ...) map to
the memory's own edits; nothing here computes anything the memory does not. The
command line (`wmgen.cli_chat`) builds the `Chat` and hands it the few things that
are the command line's: how to save, warn and catch signals.

Model text goes to stdout, and so do the views a command asks for (`/show`,
`/text`, `/stats`, `/help`); prompts, notices and errors go to stderr. With stdin
not a terminal, every line is a turn or a command, and stdout is plain text: each
turn's text, then a newline.
"""

from __future__ import annotations

import difflib
import re
import secrets
import shlex
import signal
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter
from typing import TYPE_CHECKING, TextIO

from wmgen import session as sessions
from wmgen.errors import OutputError, UsageError, WmgenError
from wmgen.events import Finished, Started, Token
from wmgen.render import policy_words, put, show_memory, stats_line
from wmgen.spans import SPAN, parse_span, show_span

if TYPE_CHECKING:
    from wmgen.api import Model
    from wmgen.memory import WorkingMemory

# speaker labels: a transcript line is "\n{user} {text}\n{bot}", and the model's
# turn ends where it starts the next "\n{user}" (llama.cpp's reverse prompt)
TEMPLATES = {"chat": ("User:", "Bot:"), "qa": ("Q:", "A:")}
SETTABLE = ("temperature", "top_k", "top_p", "max_new_tokens", "seed", "repetition_penalty", "stop", "ignore_eos", "policy")
MAX_UNDO = 100  # undo steps kept (a step after /fork or /load holds a whole memory)
MAX_LINE = 64 << 20  # the most bytes one piped line may have (as wmgen reads any text)
HISTORY = "chat_history"  # in the state folder, beside sessions/
EXIT = object()  # what a command returns to end the chat


@dataclass(frozen=True)
class Template:
    user: str
    bot: str

    @property
    def stop(self) -> str:
        return "\n" + self.user

    def wrap(self, text: str, *, first: bool) -> str:
        return ("" if first else "\n") + f"{self.user} {text}\n{self.bot}"


def template_for(name: str | None, user: str | None, bot: str | None) -> Template | None:
    """The transcript `--template NAME` (and `--user-prefix`, `--bot-prefix`) ask
    for; None for plain continuation."""
    if name is None and user is None and bot is None:
        return None
    if name is not None and name not in TEMPLATES:
        raise UsageError(f"--template {name!r} is not one of {', '.join(TEMPLATES)}")
    default_user, default_bot = TEMPLATES[name or "chat"]
    user, bot = (default_user if user is None else user), (default_bot if bot is None else bot)
    for flag, label in (("--user-prefix", user), ("--bot-prefix", bot)):
        if not label.strip() or "\n" in label:
            raise UsageError(f"{flag} {label!r}: give a label on one line, such as 'User:'")
    return Template(user, bot)


@dataclass
class Step:
    """What `/undo` goes back to: a memory (a turn or an edit changes it; /fork and
    /load move to another) as a checkpoint of it, and the chat's place then."""

    what: str
    memory: WorkingMemory
    checkpoint: object
    session: str
    leftover: str


@dataclass
class Chat:
    """A chat's state: the model, the live memory and the session it saves to."""

    lm: Model
    memory: WorkingMemory
    session: str
    state: Path  # the state folder: sessions/ and the history file
    save: Callable[..., dict]  # save(memory, name, report=True) -> {"saved": bool, "session": name used}
    warn: Callable[[str], None]  # one line on stderr
    signals: Callable[[], AbstractContextManager]  # Ctrl-C and SIGTERM stop a turn between tokens
    console: object  # a rich console on stdout, for the memory views
    plain: bool = True  # no colour or box drawing
    interactive: bool = False  # stdin is a terminal
    autosave: bool = True  # save after every turn and edit, and on leaving (not with --no-save)
    quiet: bool = False
    template: Template | None = None
    options: dict = field(default_factory=dict)  # /set values over the settings
    out: TextIO = field(default_factory=lambda: sys.stdout)
    undo: list[Step] = field(default_factory=list)
    leftover: str = ""  # text shown but cut from memory with a stop text: read first next turn
    last: Finished | None = None
    changed: bool = False  # since the last save
    trace: object | None = None  # the ledger (--trace), following whichever memory the chat holds

    def notice(self, message: str) -> None:
        if not self.quiet:
            self.warn(message)

    def show(self, text: str) -> None:
        put(self.out, text + "\n")

    def mark(self, what: str) -> Step:
        return Step(what, self.memory, self.memory.checkpoint(), self.session, self.leftover)

    def remember(self, step: Step) -> None:
        self.undo.append(step)
        del self.undo[:-MAX_UNDO]
        self.changed = True


class Leave(Exception):
    """A signal ended the chat: exit with `code` once the memory is saved."""

    def __init__(self, code: int, why: str):
        super().__init__(why)
        self.code = code


# --- the loop ------------------------------------------------------------------------


def run_chat(chat: Chat, read_line: Callable[[], str] | None = None) -> int:
    """Turns and commands until Ctrl-D, /exit or the end of the input; the memory
    is saved after each and on leaving. Returns the exit status."""
    read_line = read_line or (terminal_lines(chat) if chat.interactive else piped_lines(sys.stdin.buffer))
    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        return loop(chat, read_line)
    except (BrokenPipeError, OutputError):  # stdout is gone: keep the memory, then end as generate ends
        after_turn(chat, report=False)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def loop(chat: Chat, read_line: Callable[[], str]) -> int:
    if chat.interactive:
        greet(chat)
    while True:
        try:
            line = read_line()
            if line.startswith("/") and not line.startswith("//"):
                if command(chat, line) is EXIT:
                    return leave(chat, 0)
            else:
                turn(chat, line[1:] if line.startswith("//") else line)
            follow(chat)
            after_turn(chat)
        except OutputError:
            raise
        except WmgenError as e:  # a bad command, span or session: one line, and the memory as it was
            chat.warn(f"error: {e}")
        except EOFError:
            if chat.interactive:
                sys.stderr.write("\n")  # Ctrl-D: leave the shell prompt on a line of its own
            return leave(chat, 0)
        except KeyboardInterrupt:  # Ctrl-C at the prompt (or in a command) clears the line
            if not chat.interactive:
                return leave(chat, 130, "interrupted")
            sys.stderr.write("\n")
        except Leave as e:
            return leave(chat, e.code, str(e))


def follow(chat: Chat) -> None:
    """The ledger goes on in the memory the chat now holds (after /load, /fork):
    its slots are recorded as put back whole."""
    memory = chat.memory
    if chat.trace is not None and memory.trace is not chat.trace:
        memory.trace = chat.trace
        chat.trace.begin()
        chat.trace.restore(memory.slots)


def terminated(signum, frame) -> None:
    raise Leave(128 + signum, f"terminated ({signal.Signals(signum).name})")


def leave(chat: Chat, code: int, why: str = "") -> int:
    fresh = after_turn(chat)
    held = chat.autosave and (fresh or sessions.path_of(chat.state, chat.session).exists())
    saved = f"the memory is saved as session '{chat.session}' ({chat.memory.fill} tokens)" if held else ""
    if why:
        chat.warn(f"{why}{'; ' + saved if saved else ''}")
    elif chat.interactive and saved:
        chat.notice(saved)
    return code


def greet(chat: Chat) -> None:
    m, t = chat.memory, chat.template
    mode = f"transcript ({t.user} / {t.bot})" if t else "plain continuation"
    held = f"session '{chat.session}', {m.fill}/{m.capacity} tokens"
    chat.notice(f"chat with {chat.lm.name} · {held} · {mode} · /help lists the commands, Ctrl-D saves and leaves")


def after_turn(chat: Chat, report: bool = True) -> bool:
    """Save the memory, if a turn or an edit changed it, as the chat's session (the
    next free name when that one is not ours to replace; the chat then saves there).
    A chat that changed nothing replaces nothing."""
    if not (chat.autosave and chat.changed):
        return False
    result = chat.save(chat.memory, chat.session, report=report)
    chat.changed = False
    if result.get("saved"):
        chat.session = result["session"]
    return bool(result.get("saved"))


# --- one turn -------------------------------------------------------------------------


def turn(chat: Chat, text: str) -> Finished:
    """Read `text` into the memory (inside the template, if any) and stream the
    model's continuation; an empty line lets the model go on. Ctrl-C stops the
    turn between tokens: what was generated stays."""
    memory = chat.memory
    wrapped = chat.template.wrap(text, first=not memory.fill and not chat.leftover) if chat.template and text else text
    read = chat.leftover + wrapped
    if not read and not memory.fill:
        raise UsageError("the memory is empty: type some text for the model to continue")
    before = (memory.counters.evictions, memory.counters.evicted, memory.counters.recomputed)
    step = chat.mark("the last turn")
    ids, pieces = [], []
    with chat.signals() as signals:
        events = chat.lm.events(read, memory=memory, should_stop=signals.stop_requested, **run_options(chat))
        chat.remember(step)
        chat.leftover = ""
        if chat.interactive and chat.template:
            sys.stderr.write(chat.template.bot)
            sys.stderr.flush()
        for event in events:
            if isinstance(event, Started) and event.unread:
                chat.notice(f"what you typed has {event.prompt_tokens} tokens; {event.unread} of them did not fit and were not read")
            if isinstance(event, Token):
                ids.append(event.id)
            if isinstance(event, (Token, Finished)) and event.text:
                put(chat.out, event.text)
                pieces.append(event.text)
            if isinstance(event, Finished):
                chat.last = event
    shown = "".join(pieces)
    if not chat.interactive or (shown and not shown.endswith("\n")):
        put(chat.out, "\n")
    if chat.template and chat.last.reason == "stop":
        cut_reverse_prompt(chat, ids, shown)
    report_turn(chat, before, signals)
    return chat.last


def run_options(chat: Chat) -> dict:
    """The sampling and run options of a turn: the settings, /set over them, and
    the template's user label as a stop text."""
    options = dict(chat.options)
    if options.get("seed") == "random":
        options["seed"] = secrets.randbits(62)
    if chat.template:
        stops = options.get("stop", chat.lm.settings.run.stop)
        options["stop"] = (*stops, chat.template.stop)
    return options


def cut_reverse_prompt(chat: Chat, ids: list[int], shown: str) -> None:
    """The model began the user's next line: take the tokens that hold it back out
    of memory (they are the newest, so nothing is recomputed), so that the next
    turn's own "\\n{user}" follows the reply. Text of theirs that was shown is read
    back at the start of the next turn."""
    decode = chat.lm.decode
    if not decode(ids)[len(shown) :].startswith(chat.template.stop):
        return  # another stop text (--stop): it stays, as generate leaves it
    kept = len(ids)
    while kept and not shown.startswith(decode(ids[:kept])):
        kept -= 1
    memory = chat.memory
    if cut := min(len(ids) - kept, memory.fill):
        memory.forget(memory.fill - cut, memory.fill)
    chat.leftover = shown[len(decode(ids[:kept])) :]


def report_turn(chat: Chat, before: tuple[int, int, int], signals) -> None:
    """Evictions are never silent; nor is a stop by Ctrl-C or a signal."""
    m, f = chat.memory, chat.last
    evictions, evicted, recomputed = (now - then for now, then in zip((m.counters.evictions, m.counters.evicted, m.counters.recomputed), before))
    if evicted:
        shape = {"policy": m.shape.policy, "recent": m.shape.recent}
        chat.notice(f"this turn evicted {evicted} tokens in {evictions} eviction{'s' * (evictions != 1)}, by policy "
                    f"{policy_words(shape)}; {recomputed} recomputed; fill {m.fill}/{m.capacity}")
    if f.reason == "eos" and not f.generated:
        chat.notice("the model ended the text (<|endoftext|>) at once; type more, or /undo")
    if signals.received == signal.SIGINT:
        chat.warn(f"stopped: the {f.generated} tokens generated stay in memory (/undo drops the turn)")
    elif signals.received is not None:
        raise Leave(128 + signals.received, f"terminated ({signal.Signals(signals.received).name})")


# --- commands -------------------------------------------------------------------------


def command(chat: Chat, line: str):
    name, _, rest = line.strip().partition(" ")
    handler = COMMANDS.get(name)
    if handler is None:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise UsageError(f"unknown command {name}; {hint}/help lists the commands (// starts a line with /)")
    return handler(chat, rest.strip())


def words(rest: str) -> list[str]:
    """Arguments split as a shell splits them (quotes group), backslashes kept."""
    lexer = shlex.shlex(rest, posix=True)
    lexer.whitespace_split, lexer.escape = True, ""
    try:
        return list(lexer)
    except ValueError as e:
        raise UsageError(f"{e} in {rest!r}") from None


ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def unescape(text: str) -> str:
    r"""`\n`, `\t` and `\\` in typed text: a newline, a tab, a backslash."""
    return re.sub(r"\\([nt\\])", lambda m: ESCAPES[m.group(1)], text)


def flags(args: list[str], names: tuple[str, ...], usage: str) -> dict[str, int]:
    """`--tail N`-style flags with whole-number values."""
    found: dict[str, int] = {}
    it = iter(args)
    for arg in it:
        key = arg.removeprefix("--")
        value = next(it, None)
        if not arg.startswith("--") or key not in names or value is None or not value.isdigit():
            raise UsageError(f"usage: {usage}")
        found[key] = int(value)
    if "head" in found and "tail" in found:
        raise UsageError("--head and --tail cannot be used together; pick one")
    return found


def show(chat: Chat, rest: str):
    view = flags(words(rest), ("tail", "head"), "/show [--tail N | --head N]")
    show_memory(chat.memory.snapshot() | {"name": chat.session}, chat.console, **view, plain=chat.plain)


def text(chat: Chat, rest: str):
    chat.show(chat.memory.text)


def attention(chat: Chat, rest: str):
    view = flags(words(rest), ("tail", "head", "layer"), "/attention [--tail N | --head N] [--layer L]")
    layer = view.pop("layer", None)
    snap = chat.memory.snapshot() | {"name": chat.session}
    snap["attention"] = {"layer": layer, "shares": chat.lm.attention(snap, layer, source="this memory")}
    show_memory(snap, chat.console, **view, plain=chat.plain)


def edit(chat: Chat, what: str, change: Callable[[], int]) -> int:
    """Make an edit undoable; a failed one leaves the memory as it was."""
    step = chat.mark(what)
    try:
        done = change()
    except BaseException:
        chat.memory.rollback(step.checkpoint)
        raise
    chat.remember(step)
    return done


def pending(chat: Chat) -> str:
    n = chat.memory.pending
    return f"{n} slot{'s' * (n != 1)} will be computed at the next turn" if n else "nothing to recompute"


def forget(chat: Chat, rest: str):
    args = words(rest)
    pinned = "--pinned" in args
    args = [a for a in args if a != "--pinned"]
    if len(args) != 1:
        raise UsageError('usage: /forget I-J [--pinned], or /forget "TEXT" [--pinned]')
    memory = chat.memory
    if SPAN.fullmatch(args[0]):
        spans = [parse_span(args[0], memory.fill)]
    else:
        spans = merged(memory.find(unescape(args[0])))
        if not spans:
            raise UsageError(f"no slots hold {unescape(args[0])!r}; /text shows the memory's text")
    where = ", ".join(show_span(a, b) for a, b in spans)
    n = edit(chat, f"/forget {where}", lambda: sum(memory.forget(a, b, pinned=pinned) for a, b in reversed(spans)))
    chat.notice(f"forgot {n} slot{'s' * (n != 1)} ({where}); fill {memory.fill}/{memory.capacity}; {pending(chat)}")


def merged(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Overlapping or touching spans as one."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(b, out[-1][1]))
        else:
            out.append((a, b))
    return out


def pin(chat: Chat, rest: str, *, on: bool = True):
    verb = "pin" if on else "unpin"
    args = words(rest)
    if len(args) != 1:
        raise UsageError(f"usage: /{verb} I-J")
    start, stop = parse_span(args[0], chat.memory.fill)
    change = chat.memory.pin if on else chat.memory.unpin
    n = edit(chat, f"/{verb} {args[0]}", lambda: change(start, stop))
    pinned = sum(1 for s in chat.memory.slots if s.pinned)
    chat.notice(f"{verb}ned {n} slot{'s' * (n != 1)} of {show_span(start, stop)}; {pinned} pinned in all; {pending(chat)}")


def unpin(chat: Chat, rest: str):
    pin(chat, rest, on=False)


def insert(chat: Chat, rest: str):
    m = re.fullmatch(r"(\d+)\s+(.+)", rest, re.S)
    if m is None:
        raise UsageError('usage: /insert I TEXT (before slot I; quote TEXT to keep spaces at its ends: " the keeper")')
    index, typed = int(m.group(1)), m.group(2)
    if len(typed) >= 2 and typed[0] == typed[-1] and typed[0] in "\"'":
        typed = typed[1:-1]
    memory, ids = chat.memory, chat.lm.encode(unescape(typed))
    evicted = edit(chat, f"/insert {index}", lambda: memory.insert(index, ids))
    room = f"; {evicted} evicted for room, by policy {memory.shape.policy}" if evicted else ""
    chat.notice(f"inserted {len(ids)} token{'s' * (len(ids) != 1)} before slot {index}{room}; fill {memory.fill}/{memory.capacity}; {pending(chat)}")


def undo(chat: Chat, rest: str):
    if not chat.undo:
        raise UsageError("nothing to undo")
    step = chat.undo.pop()
    moved = step.memory is not chat.memory
    chat.memory, chat.session, chat.leftover = step.memory, step.session, step.leftover
    chat.memory.rollback(step.checkpoint)
    chat.changed = True
    back = f"; back in session '{chat.session}'" if moved else ""
    chat.notice(f"undid {step.what}{back}; fill {chat.memory.fill}/{chat.memory.capacity}; {pending(chat)}")


def name_argument(rest: str, usage: str) -> str:
    args = words(rest)
    if len(args) != 1:
        raise UsageError(f"usage: {usage}")
    return sessions.check_name(args[0])


def save(chat: Chat, rest: str):
    name = name_argument(rest, "/save [NAME]") if rest else chat.session
    result = chat.save(chat.memory, name)
    if not result.get("saved"):
        return
    if name == chat.session:
        chat.session, chat.changed = result["session"], False
        chat.notice(f"saved session '{chat.session}'")
    else:
        chat.notice(f"saved a copy as session '{result['session']}'; this chat still saves to '{chat.session}'")


def fork(chat: Chat, rest: str):
    name = name_argument(rest, "/fork NAME")
    if name == chat.session:
        raise UsageError(f"this chat is session '{name}' already; fork under another name")
    if sessions.path_of(chat.state, name).exists():
        raise UsageError(f"session '{name}' exists; /load {name} to go on from it, or fork under another name")
    after_turn(chat)  # the original, as it is now
    original = chat.session
    step = chat.mark(f"/fork {name}")
    chat.memory, chat.session = chat.memory.fork(), name
    chat.remember(step)
    result = chat.save(chat.memory, name)
    if result.get("saved"):
        chat.session, chat.changed = result["session"], False
    kept = f"'{original}' stays as it was (/load {original} to go back)" if chat.autosave else f"'{original}' is not saved (--no-save)"
    chat.notice(f"forked: this chat goes on as session '{chat.session}'; {kept}")


def load(chat: Chat, rest: str):
    name = name_argument(rest, "/load NAME")
    snapshot = sessions.read(chat.state, name)
    memory = chat.lm.restore(snapshot, source=f"session '{name}'")
    after_turn(chat)  # the chat being left, as it is now
    step = chat.mark(f"/load {name}")
    chat.memory, chat.session, chat.leftover = memory, name, ""
    chat.remember(step)
    chat.changed = False  # it is what the file holds
    t0 = perf_counter()
    memory.logits()  # read now, so that the next turn costs only its own tokens
    chat.notice(f"loaded session '{name}': {memory.fill}/{memory.capacity} tokens, read in {perf_counter() - t0:.2f} s; this chat now saves to '{name}'")


def settings_line(chat: Chat) -> str:
    s, o, m = chat.lm.settings, chat.options, chat.memory
    values = {k: o.get(k, getattr(s.sampling if hasattr(s.sampling, k) else s.run, k, None)) for k in SETTABLE if k != "policy"}
    values["policy"] = m.shape.policy
    return " · ".join(f"{k} {v!r}" if k == "stop" else f"{k} {v}" for k, v in values.items())


def set_option(chat: Chat, rest: str):
    from wmgen.settings import coerce

    args = words(rest)
    if not args:
        chat.show(settings_line(chat))
        return
    key = args[0].replace("-", "_")
    if key not in SETTABLE:
        raise UsageError(f"/set {args[0]}: not one of {', '.join(SETTABLE)}")
    if key == "stop":  # any number of stop texts; none clears them
        chat.options["stop"] = coerce("stop", [unescape(a) for a in args[1:]], "/set stop")
    elif len(args) != 2:
        raise UsageError(f"usage: /set {key} VALUE")
    elif key == "policy":
        set_policy(chat, coerce("policy", args[1], "/set policy"))
        return
    elif key == "seed" and args[1] == "random":
        chat.options["seed"] = "random"  # a new seed every turn, whatever the settings say
    else:
        chat.options[key] = coerce(key, args[1], f"/set {key}")
    chat.notice(f"{key} {chat.options[key]!r}" if key == "stop" else f"{key} {chat.options[key]}")


def set_policy(chat: Chat, policy: str) -> None:
    memory = chat.memory
    edit(chat, f"/set policy {policy}", lambda: memory.set_policy(policy) or 0)
    chat.notice(f"policy {policy_words({'policy': policy, 'recent': memory.shape.recent})}, from the next eviction on; scores are kept")


def stats(chat: Chat, rest: str):
    m, c = chat.memory, chat.memory.counters
    pinned = sum(1 for s in m.slots if s.pinned)
    saving = f"saves to session '{chat.session}' after every turn" if chat.autosave else f"session '{chat.session}', not saved (--no-save)"
    lines = [
        f"memory     {m.fill}/{m.capacity} tokens · {pinned} pinned · evict {m.evict} · policy {m.shape.policy} · {m.pending} to compute",
        f"counters   {c.evictions} evictions ({c.evicted} tokens evicted, {c.recomputed} recomputed) · {c.seen} tokens seen",
        f"session    {saving} · {len(chat.undo)} undo steps",
        f"settings   {settings_line(chat)}",
    ]
    if chat.last is not None:
        lines.append(f"last turn  {stats_line(chat.last)}")
    chat.show("\n".join(lines))


HELP = (
    ("/show [--tail N | --head N]", "the memory, as inspect-memory shows it"),
    ("/text", "the text in memory"),
    ("/attention [--tail N] [--layer L]", "where the next token's query attends"),
    ('/forget I-J | "TEXT" [--pinned]', "drop slots I to J, or every run of slots holding TEXT (pinned ones only with --pinned)"),
    ("/pin I-J, /unpin I-J", "pin slots (no policy evicts them), or unpin them"),
    ("/insert I TEXT", "read TEXT into memory before slot I"),
    ("/undo", "back to the memory before the last turn or command that changed it"),
    ("/save [NAME]", "save now (as NAME: a copy; the chat still saves to its own session)"),
    ("/fork NAME", "go on as a new session NAME; the current one stays as it is"),
    ("/load NAME", "go on from saved session NAME"),
    ("/set [KEY VALUE]", f"set {', '.join(SETTABLE)} (no KEY: show them)"),
    ("/stats", "the memory's counters and the last turn's timings"),
    ("/help", "this list"),
    ("/exit", "save and leave (also Ctrl-D)"),
)


def show_help(chat: Chat, rest: str):
    width = max(len(usage) for usage, _ in HELP)
    lines = [f"{usage:<{width}}  {what}" for usage, what in HELP]
    lines += ["", "Slots are numbered as /show numbers them; I-J includes both ends. In text, \\n is a newline.",
              "An empty line lets the model go on; // starts a line that begins with /.",
              "Ctrl-C stops a turn (what was generated stays); Ctrl-D saves and leaves."]
    chat.show("\n".join(lines))


def leave_now(chat: Chat, rest: str):
    return EXIT


COMMANDS: dict[str, Callable] = {
    "/show": show, "/text": text, "/attention": attention, "/forget": forget, "/pin": pin, "/unpin": unpin,
    "/insert": insert, "/undo": undo, "/save": save, "/fork": fork, "/load": load, "/set": set_option,
    "/stats": stats, "/help": show_help, "/exit": leave_now, "/quit": leave_now,
}


# --- reading lines ---------------------------------------------------------------------


def piped_lines(stream) -> Callable[[], str]:
    """Lines of a pipe or file, one at a time, as they come (a script may wait for
    each reply); EOFError at the end."""

    def read() -> str:
        data = stream.readline(MAX_LINE)
        if not data:
            raise EOFError
        try:
            return data.decode("utf-8").removesuffix("\n").removesuffix("\r")
        except UnicodeDecodeError:
            raise UsageError("a line of input is not UTF-8 text; it was skipped") from None

    return read


def terminal_lines(chat: Chat) -> Callable[[], str]:
    """Lines typed at a terminal, with line editing, tab completion of commands
    (and of session names after /load, /fork, /save) and a history file in the
    state folder, as Python's own REPL has them."""
    import readline

    history = chat.state / HISTORY
    try:
        history.parent.mkdir(parents=True, exist_ok=True)
        history.touch()
        readline.read_history_file(history)
    except OSError:
        history = None
    readline.set_history_length(1000)
    readline.set_completer_delims(" \t\n")
    readline.set_completer(completer(chat))
    if "libedit" in (readline.__doc__ or ""):  # macOS's Python
        readline.parse_and_bind("bind ^I rl_complete")
    else:
        readline.parse_and_bind("tab: complete")
        readline.parse_and_bind("set show-all-if-ambiguous on")  # one Tab lists /forget and /fork

    def read() -> str:
        prompt = f"{chat.template.user} " if chat.template else "> "
        if sys.stdout.isatty():
            line = input(prompt)
        else:  # stdout is data: the prompt goes to the terminal on stderr
            sys.stderr.write(prompt)
            sys.stderr.flush()
            line = input()
        if history is not None and line.strip():
            try:
                readline.append_history_file(1, history)
            except OSError:
                pass
        return line

    return read


def completer(chat: Chat) -> Callable[[str, int], str | None]:
    import readline

    def complete(word: str, state: int) -> str | None:
        before = readline.get_line_buffer()[: readline.get_begidx()].split()
        if not before:
            choices = [c + " " for c in COMMANDS if c.startswith(word)] if word.startswith("/") else []
        elif len(before) == 1 and before[0] in ("/load", "/fork", "/save"):
            choices = [n for n in sessions.names(chat.state) if n.startswith(word)]
        elif len(before) == 1 and before[0] == "/set":
            choices = [k + " " for k in SETTABLE if k.startswith(word)]
        else:
            choices = []
        return choices[state] if state < len(choices) else None

    return complete
