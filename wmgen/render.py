"""Writers: events in, text out. stdout carries only data; everything else goes to
stderr."""

from __future__ import annotations

import json
import math
import unicodedata
from dataclasses import asdict
from typing import TextIO

from wmgen.errors import OutputError
from wmgen.events import Event, Evicted, Finished, Generation, Started, Token


class PipeClosed(BrokenPipeError):
    """The reader of stdout went away (`| head`); a BrokenPipeError, so that whatever
    command meets it ends quietly."""


def put(out: TextIO, text: str) -> None:
    """Write and flush: a closed pipe is `PipeClosed`, any other failure `OutputError`."""
    try:
        out.write(text)
        out.flush()
    except BrokenPipeError:
        raise PipeClosed from None
    except OSError as e:
        raise OutputError(f"cannot write to standard output: {e.strerror or e}") from None


class TextWriter:
    """The continuation as plain text, flushed token by token."""

    def __init__(self, out: TextIO, *, echo_text: str | None = None):
        self.out = out
        self.echo_text = echo_text
        self.wrote_any = False

    def write(self, event: Event, **end) -> None:
        if isinstance(event, Started) and self.echo_text:
            self._put(self.echo_text)
        elif isinstance(event, (Token, Finished)):
            self._put(event.text)

    def _put(self, text: str) -> None:
        if text:
            put(self.out, text)
            self.wrote_any = True


def put_line(out: TextIO, obj, *, indent: int | None = None) -> None:
    """One JSON document (on a line of its own unless indented), flushed."""
    put(out, json_text(obj, indent=indent) + "\n")


def json_text(obj, *, indent: int | None = None) -> str:
    """`obj` as strict JSON, the only JSON wmgen prints: a number that is not finite
    (an infinite score, a log-probability of -inf, a NaN) is null, as JSON has no
    Infinity or NaN; a string that is not valid Unicode (a lone surrogate from a
    session file) is written with `\\u` escapes, as UTF-8 cannot carry it."""
    obj = finite(obj)
    text = json.dumps(obj, ensure_ascii=False, indent=indent, allow_nan=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(obj, ensure_ascii=True, indent=indent, allow_nan=False)
    return text


def finite(obj):
    """`obj` with every float that is not finite replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def end_record(f: Finished) -> dict:
    """The `end` event's fields (also a result's `stats`)."""
    record = asdict(f) | {"tokens_per_s": f.tokens_per_s}
    del record["row"]
    return record


def generation_record(g: Generation) -> dict:
    """One prompt's result as plain data: the layout of `--format json`, and of each
    row of a batched run."""
    stats = end_record(g.stats)
    del stats["text"]
    return {
        "prompt": g.prompt, "text": g.text, "tokens": list(g.tokens), "logprobs": list(g.logprobs), "reason": g.reason,
        "prompt_tokens": g.prompt_tokens, "unread": g.unread, "seed": g.seed, "stats": stats,
    }


class JsonlWriter:
    """One JSON object per event, one per line, flushed as it happens: `start`,
    `token` (one per token), `eviction`, `end`. `end` also says whether the
    memory was saved (`saved`, `session`, and `save_error` when saving failed)."""

    def __init__(self, out: TextIO, *, about: dict):
        self.out = out
        self.about = about

    def write(self, event: Event, **end) -> None:
        record = asdict(event)
        del record["row"]
        if isinstance(event, Started):
            record = {"type": "start", **self.about, **record}
        elif isinstance(event, Token):
            record = {"type": "token", **record}
            if not event.evicted:
                del record["evicted"]
        elif isinstance(event, Evicted):
            record = {"type": "eviction", **record}
        else:
            record = {"type": "end", **end_record(event), **end}
        put_line(self.out, record)


class JsonWriter:
    """One JSON object when generation ends: `generation_record` with the model,
    the settings and whether the memory was saved."""

    def __init__(self, out: TextIO, *, prompt: str, about: dict):
        self.out = out
        self.prompt = prompt
        self.about = about
        self.events: list[Event] = []

    def write(self, event: Event, **end) -> None:
        from wmgen.generation import collect

        self.events.append(event)
        if isinstance(event, Finished):
            g = next(collect(iter(self.events), [self.prompt]))
            put_line(self.out, {**self.about, **generation_record(g), **end}, indent=1)


def stats_line(f: Finished) -> str:
    return (
        f"prompt {f.prompt_tokens} tokens · generated {f.generated} tokens · "
        f"first token {f.first_token_s:.2f} s · {f.tokens_per_s:.1f} tokens/s · "
        f"evictions {f.evictions} ({f.evicted} evicted, {f.recomputed} recomputed) · "
        f"fill {f.fill}/{f.capacity} · stop: {f.reason}"
        + (f" · lookahead kept {f.accepted} of {f.drafted} draft tokens" if f.drafted else "")
    )


# --- inspect-memory views ------------------------------------------------------

VISIBLE = str.maketrans({" ": "·", "\n": "↵", "\t": "→", "\r": "␍"})
HEADER_WIDTH = 100  # a header value or a listed model longer than this is cut in the middle
TOKEN_WIDTH = 80  # the text of one slot (a real GPT-2 token is far shorter)

# characters a one-line place shows as escapes: controls (line feeds, tabs, terminal
# escapes, NEL), format characters (bidi overrides, zero widths), line and paragraph
# separators, and lone surrogates
ESCAPED = frozenset(("Cc", "Cf", "Cs", "Zl", "Zp"))
SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape(c: str) -> str:
    if c in SHORT_ESCAPES:
        return SHORT_ESCAPES[c]
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def one_line(text: str, width: int | None = None) -> str:
    """A user-controlled string (a model, a policy, a path, a token's text) made fit
    for a one-line place, a header row or a listing line: control characters, line
    and paragraph separators and lone surrogates are shown as escapes (`\\n`,
    `\\t`, `\\x1b`, `\\u2028`), and with a `width`, a longer string is cut in the
    middle to `width` characters, `…` marking the cut. The one place for it."""
    pieces = [escape(c) if unicodedata.category(c) in ESCAPED else c for c in text]
    if width is None or sum(map(len, pieces)) <= width:
        return "".join(pieces)
    head, tail, room = [], [], width - 1
    for take_head in (True, False):  # the head gets the larger half
        budget = (room + 1) // 2 if take_head else room - sum(map(len, head))
        source = pieces if take_head else reversed(pieces)
        kept = head if take_head else tail
        for piece in source:
            if len(piece) > budget:
                break
            kept.append(piece)
            budget -= len(piece)
    return "".join(head) + "…" + "".join(reversed(tail))


def shown(value, width: int | None = HEADER_WIDTH, absent: str = "—") -> str:
    """A value from a snapshot as one line: `absent` when it is missing or null."""
    return absent if value is None else one_line(str(value), width)


def visible(text: str, width: int | None = None) -> str:
    """Token text with whitespace made visible (`·` `↵` `→` `␍`) and other control
    characters escaped, so that it stays on its line."""
    return one_line(text.translate(VISIBLE), width)


def figure(value, digits: int) -> str:
    """A number with `digits` decimals; a huge one in e-notation, one too large for a
    float as `inf`."""
    try:
        x = float(value)
    except OverflowError:
        x = math.inf if value > 0 else -math.inf
    return f"{x:.{digits}f}" if not math.isfinite(x) or abs(x) < 1e9 else f"{x:.3e}"


def human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    for unit, size in (("KiB", 2**10), ("MiB", 2**20), ("GiB", 2**30)):
        if n < 1024 * size or unit == "GiB":
            value = n / size if n < 2**1000 else math.inf  # n / size overflows a float from 2**1024
            return f"{value:.1f} {unit}" if value < 1e6 else f"{value:.3g} {unit}"
    raise AssertionError("unreachable")


def fill_bar(fill: int, capacity: int, width: int = 30) -> str:
    full = round(width * fill / capacity) if capacity else 0
    return "█" * full + "░" * (width - full)


def memory_header(snap: dict, width: int = HEADER_WIDTH) -> list[tuple[str, str]]:
    """(key, value) rows; every value is one line of at most `width` characters,
    whatever the snapshot holds."""
    c = snap.get("counters", {})
    pinned = sum(1 for s in snap["slots"] if s.get("pinned"))
    rows = [
        ("session", snap.get("name", "(preview)")),
        ("model", shown(snap.get("model"), None, absent="?")),
        ("fill", f"{fill_bar(snap['fill'], snap['capacity'])} {snap['fill']}/{snap['capacity']} tokens"),
        ("pinned", f"{pinned} (keep {snap['keep']})"),
        ("evict", f"{snap['evict']} tokens at a time"),
        ("policy", policy_words(snap)),
        ("evictions", f"{c.get('evictions', 0)} ({c.get('evicted', 0)} tokens evicted, {c.get('recomputed', 0)} recomputed)"),
        ("tokens seen", str(c.get("seen", snap["fill"]))),
        ("kv held", f"{human_bytes(snap['kv_bytes'])} ({human_bytes(snap['kv_bytes_per_token'])} per token)"),
    ]
    if snap.get("prompt_tokens") is not None:
        rows.append(("prompt", f"{shown(snap['prompt_tokens'], None)} tokens, {shown(snap.get('unread'), None, absent='0')} unread (did not fit)"))
    if snap.get("saved_at"):
        rows.append(("saved", snap["saved_at"]))
    return [(k, one_line(str(v), width)) for k, v in rows]


def policy_words(snap: dict) -> str:
    policy = snap.get("policy") or "oldest"
    if policy == "attention":
        recent = snap.get("recent")
        if recent is None:  # a session from before `recent` was saved: -c takes the default
            return "attention (the least attended go; recent not saved)"
        return f"attention (the least attended go; the last {shown(recent, None)} tokens stay)"
    words = {"oldest": "oldest (the oldest unpinned tokens go)", "boundary": "boundary (the oldest go, up to a sentence end)"}
    return words.get(policy, shown(policy, None))


def select_slots(slots: list[dict], head: int | None, tail: int | None) -> list[dict]:
    if head is not None:
        return slots[:head]
    if tail is not None:
        return slots[-tail:] if tail else []
    return slots


def attention_bar(share: float, top: float, width: int = 20) -> str:
    if not (math.isfinite(share) and math.isfinite(top) and top > 0):
        return ""
    return "█" * max(0, round(width * share / top))


def cells(*values: str) -> list:
    """Table cells shown as they are: rich would read `[...]` in a model name or a
    token as markup."""
    from rich.text import Text

    return [Text(v) for v in values]


def show_memory(snap: dict, console, *, head: int | None = None, tail: int | None = None, plain: bool = False) -> None:
    """The header and a table of slots; the pinned region set apart."""
    from rich import box
    from rich.table import Table

    header = Table.grid(padding=(0, 2))
    header.add_column(style="bold" if not plain else "")
    header.add_column(no_wrap=True)
    for k, v in memory_header(snap, min(HEADER_WIDTH, max(24, console.width - len("tokens seen  ")))):
        header.add_row(*cells(k, v))
    console.print(header)

    attention = snap.get("attention")
    shares = attention["shares"] if attention else None
    top = max(shares) if shares else 0.0
    table = Table(box=None if plain else box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for name, justify in (("slot", "right"), ("pos", "right"), ("id", "right"), ("text", "left"), ("origin", "left"), ("logprob", "right")):
        table.add_column(name, justify=justify)
    scored = snap.get("policy") == "attention"
    if scored:
        table.add_column("score", justify="right")
    if shares is not None:
        where = "all layers" if attention.get("layer") is None else f"layer {attention['layer']}"
        table.add_column(f"attention ({where})", justify="left")
    slots = select_slots(snap["slots"], head, tail)
    for i, s in enumerate(slots):
        lp = "" if s.get("logprob") is None else figure(s["logprob"], 2)
        row = [str(s["slot"]), str(s["position"]), str(s["token"]), visible(s.get("text", ""), TOKEN_WIDTH),
               shown(s["origin"]) + (" (pinned)" if s.get("pinned") else ""), lp]
        if scored:
            row.append("—" if s.get("score") is None else figure(s["score"], 4))
        if shares is not None:
            share = shares[s["slot"]]
            row.append(f"{share:6.1%} {attention_bar(share, top)}")
        style = "cyan" if s.get("pinned") and not plain else None
        table.add_row(*cells(*row), style=style)
        if s.get("pinned") and i + 1 < len(slots) and not slots[i + 1].get("pinned"):
            table.add_section()  # the pinned region ends here
    console.print(table)
    if len(slots) < snap["fill"]:
        console.print(f"({len(slots)} of {snap['fill']} slots shown)")


def show_sessions(rows: list[dict], console, *, plain: bool = False) -> None:
    """The list on a terminal: a table, one session a row, long values cut."""
    from rich import box
    from rich.table import Table

    if not rows:
        console.print("no saved sessions")
        return
    table = Table(box=None if plain else box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for name in ("name", "model", "fill", "tokens seen", "saved"):
        table.add_column(name)
    for r in rows:
        if "error" in r:
            table.add_row(*cells(shown(r["name"]), "unreadable: " + shown(r["error"], None), "", "", ""))
        else:
            table.add_row(*cells(shown(r["name"]), shown(r["model"]), f"{r['fill']}/{r['capacity']}", shown(r["seen"]), shown(r["saved_at"])))
    console.print(table)


def session_lines(rows: list[dict]) -> str:
    """The list for a pipe: one session per line, tab-separated, nothing cut:
    name, model, fill/capacity, tokens seen, saved (or name, "unreadable", why).
    Tabs, line breaks and other control characters in a value are escaped (`\\t`,
    `\\n`), so that a line is a session and a tab separates fields; a value the
    session lacks is an empty field."""

    def field(value) -> str:
        return shown(value, None, absent="")

    lines = []
    for r in rows:
        if "error" in r:
            lines.append(f"{field(r['name'])}\tunreadable\t{field(r['error'])}")
        else:
            lines.append("\t".join([field(r["name"]), field(r["model"]), f"{r['fill']}/{r['capacity']}", field(r["seen"]), field(r["saved_at"])]))
    return "".join(line + "\n" for line in lines)


# --- the diff of two memories --------------------------------------------------


def diff_json(result: dict, name_a: str, name_b: str) -> dict:
    """`wmgen.sessions.diff`'s result as a document: the two names as `a` and `b`,
    then the result as it is (print it with `put_line`, which keeps it strict JSON)."""
    return {"a": name_a, "b": name_b, **result}


def diff_lines(result: dict, name_a: str, name_b: str, context: int = 3) -> list[str]:
    """The diff as `diff -u` writes one, over token text instead of lines:

        --- NAME_A<TAB>N tokens, P pinned
        +++ NAME_B<TAB>M tokens, Q pinned
        @@ -I,N +J,M @@
         ·shared·tokens
        -·only·in·a
        +·only·in·b

    A hunk's numbers are slots, counted from 0 as `inspect-memory` counts them: the
    hunk covers slots I to I+N-1 of a and J to J+M-1 of b (with N or M 0, I or J is
    the slot it stands before). Each hunk has up to `context` shared tokens on each
    side; hunks closer than that merge. A line holds a run of consecutive tokens of
    one kind (' ' shared, '-' only in a, '+' only in b), broken after a token that
    holds a line break; token text is shown with `visible` (`·` a space, `↵` a line
    break, other control characters escaped), and a token without text as `⟨id⟩`.
    So the ' ' and '-' lines of a hunk, joined, are a's text over its slots, and
    the ' ' and '+' lines b's. Two memories with the same tokens give the header
    only."""
    ops = result["ops"]
    lines = [
        f"--- {one_line(name_a)}\t{side_size(ops, 'a')}",
        f"+++ {one_line(name_b)}\t{side_size(ops, 'b')}",
    ]
    for hunk in hunks(ops, context):
        (a1, b1), (a2, b2) = hunk[0][1], hunk[-1][2]
        lines.append(f"@@ -{a1},{a2 - a1} +{b1},{b2 - b1} @@")
        for op, (i1, j1), (i2, j2) in hunk:
            if op == "equal":
                lines += token_lines(" ", op_side(ops, "a", i1, i2))
            if op in ("delete", "replace"):
                lines += token_lines("-", op_side(ops, "a", i1, i2))
            if op in ("insert", "replace"):
                lines += token_lines("+", op_side(ops, "b", j1, j2))
    return lines


def show_diff(result: dict, name_a: str, name_b: str, out, context: int = 3) -> None:
    """`diff_lines` to a rich console (coloured where it has colour) or to a text
    stream; long lines stay whole, never wrapped."""
    lines = diff_lines(result, name_a, name_b, context)
    if not hasattr(out, "print"):
        put(out, "".join(line + "\n" for line in lines))
        return
    from rich.text import Text

    styles = {"-": "red", "+": "green", "@": "cyan"}
    for n, line in enumerate(lines):
        style = "bold" if n < 2 else styles.get(line[:1])
        out.print(Text(line, style=style or ""), soft_wrap=True)


def side_size(ops: list[dict], side: str) -> str:
    tokens = sum(len(o[side]["tokens"]) for o in ops)
    pinned = sum(sum(o[side]["pinned"]) for o in ops)
    return f"{tokens} tokens, {pinned} pinned"


def hunks(ops: list[dict], context: int) -> list[list[tuple[str, tuple[int, int], tuple[int, int]]]]:
    """The changes with `context` shared tokens around them, grouped as difflib's
    `get_grouped_opcodes` groups lines: each hunk a list of (op, (a start, b start),
    (a end, b end))."""
    runs = [(o["op"], (o["a"]["start"], o["b"]["start"]), (o["a"]["end"], o["b"]["end"])) for o in ops]
    if not any(op != "equal" for op, _, _ in runs):
        return []
    if runs[0][0] == "equal":  # only the last `context` of a shared head
        _, (i1, j1), (i2, j2) = runs[0]
        k = max(0, (i2 - i1) - context)
        runs[0] = ("equal", (i1 + k, j1 + k), (i2, j2))
    if runs[-1][0] == "equal":  # only the first `context` of a shared tail
        _, (i1, j1), (i2, j2) = runs[-1]
        k = min(i2 - i1, context)
        runs[-1] = ("equal", (i1, j1), (i1 + k, j1 + k))
    groups, group = [], []
    for op, (i1, j1), (i2, j2) in runs:
        if op == "equal" and i2 - i1 > 2 * context and group:  # a long shared run ends one hunk, starts the next
            group.append((op, (i1, j1), (i1 + context, j1 + context)))
            groups.append(group)
            group = []
            i1, j1 = i2 - context, j2 - context
        group.append((op, (i1, j1), (i2, j2)))
    if group and not (len(group) == 1 and group[0][0] == "equal"):
        groups.append(group)
    return [[run for run in g if run[1] != run[2]] for g in groups]


def op_side(ops: list[dict], side: str, start: int, end: int) -> list[tuple[int, str | None]]:
    """(token, text) of slots `start` to `end` of one memory, read from the ops."""
    found = []
    for o in ops:
        s = o[side]
        lo, hi = max(start, s["start"]), min(end, s["end"])
        found += [(s["tokens"][k - s["start"]], s["text"][k - s["start"]]) for k in range(lo, hi)]
    return found


LINE_BREAKS = frozenset("\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029")  # where str.splitlines breaks


def token_lines(prefix: str, tokens: list[tuple[int, str | None]]) -> list[str]:
    """`prefix` lines of visible token text, a line broken after each token that
    holds a line break."""
    lines, line = [], []
    for token, text in tokens:
        line.append(f"⟨{token}⟩" if text is None else visible(text))
        if text is not None and not LINE_BREAKS.isdisjoint(text):
            lines.append(prefix + "".join(line))
            line = []
    if line:
        lines.append(prefix + "".join(line))
    return lines


# --- perplexity ------------------------------------------------------------------


def score_table(results, about: dict) -> str:
    """Plain text: one line of key figures for a single run, a table for a sweep."""
    if len(results) == 1:
        r = results[0]
        return (
            f"{one_line(str(about['file']))}: {r.tokens} tokens scored · perplexity {r.perplexity:.3f} · "
            f"{r.bits_per_byte:.4f} bits/byte · nll {r.nll:.4f}\n"
            f"memory: capacity {r.capacity}, keep {r.keep}, evict {r.evict}, policy {policy_label(r)} · {r.evictions} evictions, "
            f"{r.recomputed} tokens recomputed ({r.recompute_share:.0%}) · {r.seconds:.1f} s, {r.tokens_per_s:.0f} tokens/s"
        )
    lines = ["| policy | capacity | keep | evict | perplexity | bits/byte | tokens/s | recompute share |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {policy_label(r)} | {r.capacity} | {r.keep} | {r.evict} | {r.perplexity:.3f} | {r.bits_per_byte:.4f} | "
                     f"{r.tokens_per_s:.0f} | {r.recompute_share:.0%} |")
    return "\n".join(lines)


def cost_table(results) -> str:
    """What forgetting cost (`Score.cost`): key figures and the costliest evictions for
    one run, a table for a sweep."""
    if len(results) > 1:
        lines = ["| policy | capacity | keep | evict | evictions | cost, nats per token after one | per token evicted | best tried |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in results:
            c = r.cost
            best = "" if c.bound is None else f"{c.bound:+.4f}"
            lines.append(f"| {policy_label(r)} | {r.capacity} | {r.keep} | {r.evict} | {len(c.evictions)} | {c.per_token:+.4f} | "
                         f"{c.per_evicted:+.4f} | {best} |")
        return "\n".join(lines)
    r = results[0]
    c = r.cost
    if not c.evictions:
        return "forgetting: nothing was evicted (the text fits in memory), so nothing was lost"
    slower = r.seconds / r.scoring_seconds if r.scoring_seconds > 0 else float("nan")
    lines = [f"forgetting: {len(c.evictions)} evictions dropped {c.evicted} tokens · cost {c.per_token:+.4f} nats per token "
             f"scored after one, {c.per_evicted:+.4f} per token evicted · measured in {c.seconds:.1f} s more ({slower:.1f}× the scoring)"]
    if c.bound is not None:
        lines.append(f"best of {c.tried} choices tried ({c.tried / len(c.evictions):.0f} an eviction): {c.bound:+.4f} nats per token scored after one")
    lines.append("costliest evictions (nats per token × the tokens scored up to the next one):")
    for e in c.costliest(5):
        ages = sorted(d.age for d in e.dropped)
        age = f"age {ages[0]}" if ages[0] == ages[-1] else f"ages {ages[0]}-{ages[-1]}"
        lines.append(f"  {e.delta:+.4f} × {e.scored} at token {e.at}: {one_line(''.join(d.text for d in e.dropped), 60)} ({age})")
    return "\n".join(lines)


def policy_label(r) -> str:
    return f"attention (recent {r.recent})" if r.policy == "attention" else r.policy


def plot_sweep(results, path: str, *, title: str) -> None:
    """A PNG of perplexity against tokens/s, one labelled point per memory shape."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from wmgen.errors import UsageError

        raise UsageError("--plot needs matplotlib: pip install matplotlib") from None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = {"oldest": "tab:blue", "boundary": "tab:green", "attention": "tab:red"}
    for policy in dict.fromkeys(r.policy for r in results):
        mine = [r for r in results if r.policy == policy]
        ax.scatter([r.tokens_per_s for r in mine], [r.perplexity for r in mine], color=colours.get(policy), label=policy)
    if len({r.policy for r in results}) > 1:
        ax.legend(fontsize=8)
    for r in results:
        ax.annotate(f"C={r.capacity} E={r.evict}" + (f" K={r.keep}" if r.keep else ""), (r.tokens_per_s, r.perplexity),
                    textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("tokens/s (scoring)")
    ax.set_ylabel("perplexity")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except OSError as e:
        from wmgen.errors import UsageError

        raise UsageError(f"cannot write {path}: {e.strerror}") from None
    finally:
        plt.close(fig)
