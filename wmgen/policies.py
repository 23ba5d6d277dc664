"""Memory policies: which slots a full memory forgets.

One rule, one place, pure (no torch). A policy is asked "these are the slots; at least
`n` must go: which?" whenever tokens must be dropped: an eviction, a prompt that does
not fit, a snapshot restored into a smaller memory. It never drops a pinned slot,
wherever it sits (`--keep N` pins a head; an edit can pin any slot).
Whatever it drops, the memory recomputes the rest at compacted positions, so for
GPT-2's absolute positions any kept subset is exact.

- `oldest`: the `n` oldest unpinned slots (a context shift; StreamingLLM's sinks plus
  a recent window).
- `boundary`: the `n` oldest unpinned, then, unless the last of them ends a line or
  a sentence, on through the unpinned slots up to and including the next token that
  does, at most `evict` more; so memory starts at a sentence when it can.
- `attention`: the most recent `recent` slots stay; of the unpinned slots before
  them, the `n` with the lowest score go (ties: the older). A slot's score is the
  mean attention it has received (H2O's heavy hitters, kept by a mean).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

POLICIES = ("oldest", "boundary", "attention")

SENTENCE_ENDS = (".", "!", "?", "。", "！", "？")
CLOSERS = "\"')]}»”’」』）】〉》"


@dataclass(slots=True)
class Slot:
    """One token in memory: what it is, where it came from (prompt, generated,
    continued, inserted), the log-probability it was sampled with, the attention it
    has received (`attention` summed over the `queries` that gave it, each query's
    share averaged over layers and heads), whether it is `pinned` (no policy drops
    it), and whether it is `new`: read, but not yet run through the model (its own
    query has not been counted)."""

    token: int
    origin: str
    logprob: float | None = None
    attention: float = 0.0
    queries: int = 0
    pinned: bool = False
    new: bool = False

    @property
    def score(self) -> float:
        """The mean attention received; +inf until a later token has attended to it."""
        return self.attention / self.queries if self.queries else math.inf


def unpinned(slots: Sequence[Slot], end: int | None = None) -> list[int]:
    """Indices of the slots a policy may drop (of the first `end`), ascending."""
    return [i for i in range(len(slots) if end is None else max(0, end)) if not slots[i].pinned]


@dataclass(frozen=True)
class Oldest:
    name: ClassVar[str] = "oldest"
    scores: ClassVar[bool] = False  # whether the memory must keep each slot's score

    def drop(self, slots: Sequence[Slot], n: int) -> list[int]:
        """Indices of the slots to drop, ascending: `n` (fewer only when fewer are
        unpinned), none pinned."""
        return unpinned(slots)[:n]


@dataclass(frozen=True)
class Boundary:
    evict: int  # the most it drops beyond `n` to reach a boundary
    token_bytes: Callable[[int], bytes]
    name: ClassVar[str] = "boundary"
    scores: ClassVar[bool] = False

    def drop(self, slots: Sequence[Slot], n: int) -> list[int]:
        free = unpinned(slots)
        if n <= 0 or len(free) <= n:
            return free[:max(n, 0)]
        if self.ends_sentence(slots, free[n - 1]):
            return free[:n]  # memory already starts a sentence
        for k in range(n, min(n + self.evict, len(free))):
            if self.ends_sentence(slots, free[k]):
                return free[: k + 1]
        return free[:n]

    def ends_sentence(self, slots: Sequence[Slot], i: int) -> bool:
        return ends_sentence(self.token_bytes, [s.token for s in slots[max(0, i - 2) : i + 1]])


def ends_sentence(token_bytes: Callable[[int], bytes], tokens: Sequence[int]) -> bool:
    """Whether the last of `tokens` contains a newline, or ends a sentence (a closing
    quote or bracket may follow within the token). A CJK full stop split over byte
    tokens counts where its last byte is (the two tokens before the last are read)."""
    own = token_bytes(tokens[-1]).decode("utf-8", "surrogateescape")
    if "\n" in own:
        return True
    closers = len(own) - len(own.rstrip(CLOSERS))
    if closers == len(own):
        return False  # only closers (or nothing): the token before ended it, if any
    text = b"".join(token_bytes(t) for t in tokens[-3:]).decode("utf-8", "surrogateescape")
    return text[: len(text) - closers].endswith(SENTENCE_ENDS)


@dataclass(frozen=True)
class Attention:
    recent: int
    name: ClassVar[str] = "attention"
    scores: ClassVar[bool] = True

    def drop(self, slots: Sequence[Slot], n: int) -> list[int]:
        between = unpinned(slots, len(slots) - self.recent)
        if n >= len(between):  # only when a caller must drop more than the rule allows
            return unpinned(slots)[:n]
        return sorted(heapq.nsmallest(n, between, key=lambda i: (slots[i].score, i)))


Policy = Oldest | Boundary | Attention


def default_recent(capacity: int, keep: int, evict: int) -> int:
    """Half of the rolling part, or less where `evict` needs the room."""
    return min((capacity - keep) // 2, capacity - keep - evict)


def make(name: str, *, evict: int, recent: int | None = None, token_bytes: Callable[[int], bytes] | None = None) -> Policy:
    """The policy called `name` for a memory of this shape (checked by `window.shape`)."""
    if name == "oldest":
        return Oldest()
    if name == "boundary":
        if token_bytes is None:
            raise ValueError("the boundary policy reads token text: give the memory a tokenizer")
        return Boundary(evict, token_bytes)
    if name == "attention":
        return Attention(recent or 0)
    raise ValueError(f"no policy {name!r}")
