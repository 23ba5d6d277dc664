"""Writers: events in, text out. stdout carries only data; everything else goes to
stderr."""

from __future__ import annotations

from typing import TextIO

import json
from dataclasses import asdict

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
    put(out, json.dumps(obj, ensure_ascii=False, indent=indent) + "\n")


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
    }  # fmt: skip


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
    )


# --- inspect-memory views ------------------------------------------------------

VISIBLE = str.maketrans({" ": "·", "\n": "↵", "\t": "→", "\r": "␍"})


def visible(text: str) -> str:
    """Token text with whitespace made visible."""
    return text.translate(VISIBLE)


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def fill_bar(fill: int, capacity: int, width: int = 30) -> str:
    full = round(width * fill / capacity) if capacity else 0
    return "█" * full + "░" * (width - full)


def memory_header(snap: dict) -> list[tuple[str, str]]:
    c = snap.get("counters", {})
    pinned = min(snap["keep"], snap["fill"])
    rows = [
        ("session", snap.get("name", "(preview)")),
        ("model", str(snap.get("model", "?"))),
        ("fill", f"{fill_bar(snap['fill'], snap['capacity'])} {snap['fill']}/{snap['capacity']} tokens"),
        ("pinned", f"{pinned} (keep {snap['keep']})"),
        ("evict", f"{snap['evict']} tokens at a time"),
        ("policy", policy_words(snap)),
        ("evictions", f"{c.get('evictions', 0)} ({c.get('evicted', 0)} tokens evicted, {c.get('recomputed', 0)} recomputed)"),
        ("tokens seen", str(c.get("seen", snap["fill"]))),
        ("kv held", f"{human_bytes(snap['kv_bytes'])} ({human_bytes(snap['kv_bytes_per_token'])} per token)"),
    ]
    if "prompt_tokens" in snap:
        rows.append(("prompt", f"{snap['prompt_tokens']} tokens, {snap.get('unread', 0)} unread (did not fit)"))
    if snap.get("saved_at"):
        rows.append(("saved", snap["saved_at"]))
    return rows


def policy_words(snap: dict) -> str:
    policy = snap.get("policy", "oldest")
    if policy == "attention":
        return f"attention (the least attended go; the last {snap.get('recent')} tokens stay)"
    return {"oldest": "oldest (the oldest unpinned tokens go)", "boundary": "boundary (the oldest go, up to a sentence end)"}.get(policy, policy)


def select_slots(slots: list[dict], head: int | None, tail: int | None) -> list[dict]:
    if head is not None:
        return slots[:head]
    if tail is not None:
        return slots[-tail:] if tail else []
    return slots


def attention_bar(share: float, top: float, width: int = 20) -> str:
    return "█" * max(0, round(width * share / top)) if top > 0 else ""


def show_memory(snap: dict, console, *, head: int | None = None, tail: int | None = None, plain: bool = False) -> None:
    """The header and a table of slots; the pinned region set apart."""
    from rich import box
    from rich.table import Table

    header = Table.grid(padding=(0, 2))
    header.add_column(style="bold" if not plain else "")
    header.add_column()
    for k, v in memory_header(snap):
        header.add_row(k, v)
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
        lp = "" if s.get("logprob") is None else f"{s['logprob']:.2f}"
        row = [str(s["slot"]), str(s["position"]), str(s["token"]), visible(s.get("text", "")), s["origin"] + (" (pinned)" if s.get("pinned") else ""), lp]
        if scored:
            row.append("—" if s.get("score") is None else f"{s['score']:.4f}")
        if shares is not None:
            share = shares[s["slot"]]
            row.append(f"{share:6.1%} {attention_bar(share, top)}")
        style = "cyan" if s.get("pinned") and not plain else None
        table.add_row(*row, style=style)
        if s.get("pinned") and i + 1 < len(slots) and not slots[i + 1].get("pinned"):
            table.add_section()  # the pinned region ends here
    console.print(table)
    shown = len(slots)
    if shown < snap["fill"]:
        console.print(f"({shown} of {snap['fill']} slots shown)")


def show_sessions(rows: list[dict], console, *, plain: bool = False) -> None:
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
            table.add_row(r["name"], f"unreadable: {r['error']}", "", "", "")
        else:
            table.add_row(r["name"], str(r["model"]), f"{r['fill']}/{r['capacity']}", str(r["seen"]), str(r["saved_at"]))
    console.print(table)


def session_lines(rows: list[dict]) -> str:
    """The list for a pipe: one session per line, tab-separated, nothing cut:
    name, model, fill/capacity, tokens seen, saved (or name, "unreadable", why)."""
    lines = []
    for r in rows:
        if "error" in r:
            lines.append(f"{r['name']}\tunreadable\t{r['error']}")
        else:
            lines.append(f"{r['name']}\t{r['model']}\t{r['fill']}/{r['capacity']}\t{r['seen']}\t{r['saved_at']}")
    return "".join(line + "\n" for line in lines)


# --- perplexity ------------------------------------------------------------------


def score_table(results, about: dict) -> str:
    """Plain text: one line of key figures for a single run, a table for a sweep."""
    if len(results) == 1:
        r = results[0]
        return (
            f"{about['file']}: {r.tokens} tokens scored · perplexity {r.perplexity:.3f} · "
            f"{r.bits_per_byte:.4f} bits/byte · nll {r.nll:.4f}\n"
            f"memory: capacity {r.capacity}, keep {r.keep}, evict {r.evict}, policy {policy_label(r)} · {r.evictions} evictions, "
            f"{r.recomputed} tokens recomputed ({r.recompute_share:.0%}) · {r.seconds:.1f} s, {r.tokens_per_s:.0f} tokens/s"
        )
    lines = ["| policy | capacity | keep | evict | perplexity | bits/byte | tokens/s | recompute share |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in results:
        lines.append(f"| {policy_label(r)} | {r.capacity} | {r.keep} | {r.evict} | {r.perplexity:.3f} | {r.bits_per_byte:.4f} | "
                     f"{r.tokens_per_s:.0f} | {r.recompute_share:.0%} |")  # fmt: skip
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
                    textcoords="offset points", xytext=(4, 4), fontsize=8)  # fmt: skip
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
