"""Writers: events in, text out. stdout carries only data; everything else goes to
stderr."""

from __future__ import annotations

from typing import TextIO

from wmgen.generation import Event, Finished, Started, Token


class PipeClosed(Exception):
    """The reader of stdout went away (`| head`)."""


class TextWriter:
    """The continuation as plain text, flushed token by token."""

    def __init__(self, out: TextIO, *, echo_text: str | None = None):
        self.out = out
        self.echo_text = echo_text
        self.wrote_any = False

    def write(self, event: Event) -> None:
        if isinstance(event, Started) and self.echo_text:
            self._put(self.echo_text)
        elif isinstance(event, Token):
            self._put(event.text)
        elif isinstance(event, Finished):
            self._put(event.text)

    def _put(self, text: str) -> None:
        if not text:
            return
        try:
            self.out.write(text)
            self.out.flush()
        except BrokenPipeError:
            raise PipeClosed from None
        self.wrote_any = True


def stats_line(f: Finished) -> str:
    return (
        f"prompt {f.prompt_tokens} tokens · generated {f.generated} tokens · "
        f"first token {f.first_token_s:.2f} s · {f.tokens_per_s:.1f} tokens/s · "
        f"evictions {f.evictions} ({f.evicted} evicted, {f.recomputed} recomputed) · "
        f"fill {f.fill}/{f.capacity} · stop: {f.reason}"
    )
