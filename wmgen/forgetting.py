"""The cost of forgetting, measured exactly, eviction by eviction.

While a text is scored (`wmgen.perplexity`), every eviction is also undone in a
twin: a fork of the memory just before the eviction, larger by the slots it drops,
so that it holds everything the real memory held. The tokens read until the next
eviction are scored a second time through the twin. Both memories compute every
kept token at its own compacted position, so the difference of the two scorings is
what forgetting those slots cost the model, and nothing else: the eviction's Δ nll,
in nats per token scored.

With `bound`, each eviction is also tried with other choices of slots to drop (every
run of as many consecutive unpinned slots, and the policy's own choice): the least
costly of them bounds what the best choice could have cost (from above: the search
is not exhaustive).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from time import perf_counter

import torch

from wmgen.memory import WorkingMemory
from wmgen.perplexity import pass_logprobs
from wmgen.policies import ends_sentence


@dataclass(frozen=True)
class Dropped:
    """A token an eviction dropped."""

    index: int  # where it is in the text
    token: int
    text: str
    origin: str
    age: int  # tokens read since it was
    score: float | None  # the attention it had received per query (the attention policy), None before any
    sentence_start: bool  # the token before it in the text ended a sentence (or it is the first)
    kind: str  # word, word piece, number, punctuation, space or newline

    def as_dict(self) -> dict:
        return {"index": self.index, "token": self.token, "text": self.text, "origin": self.origin, "age": self.age,
                "score": self.score, "sentence_start": self.sentence_start, "kind": self.kind}


@dataclass(frozen=True)
class Eviction:
    at: int  # the text index of the first token read after it
    scored: int  # tokens scored from then until the next eviction
    delta: float  # nats per scored token: forgetting's nll minus keeping's
    dropped: tuple[Dropped, ...]
    best: float | None = None  # with a bound: the least delta among the choices tried

    @property
    def total(self) -> float:
        """Nats the eviction cost over the tokens it was scored on."""
        return self.delta * self.scored

    def as_dict(self) -> dict:
        return {"at": self.at, "scored": self.scored, "delta": self.delta, "total": self.total,
                "best": self.best, "text": "".join(d.text for d in self.dropped),
                "dropped": [d.as_dict() for d in self.dropped]}


@dataclass(frozen=True)
class Cost:
    evictions: tuple[Eviction, ...]
    seconds: float  # the time the second scorings took (and the bound's)
    tried: int = 0  # choices scored for the bound, over all evictions

    @property
    def total(self) -> float:
        """Nats all evictions cost, each over the tokens up to the next one."""
        return sum(e.total for e in self.evictions)

    @property
    def scored(self) -> int:
        return sum(e.scored for e in self.evictions)

    @property
    def evicted(self) -> int:
        return sum(len(e.dropped) for e in self.evictions)

    @property
    def per_token(self) -> float:
        """Nats per token scored after an eviction."""
        return self.total / self.scored if self.scored else 0.0

    @property
    def per_evicted(self) -> float:
        """Nats per token evicted."""
        return self.total / self.evicted if self.evicted else 0.0

    @property
    def bound(self) -> float | None:
        """With a bound: nats per token scored after an eviction, had each eviction
        dropped the least costly of the choices tried."""
        if not self.evictions or any(e.best is None for e in self.evictions):
            return None
        return sum((e.best or 0.0) * e.scored for e in self.evictions) / self.scored

    def costliest(self, n: int = 5) -> list[Eviction]:
        return sorted(self.evictions, key=lambda e: (-e.total, e.at))[:n]

    def as_dict(self) -> dict:
        return {"evictions": len(self.evictions), "evicted": self.evicted, "total": self.total,
                "per_token": self.per_token, "per_evicted": self.per_evicted, "bound": self.bound,
                "seconds": self.seconds, "tried": self.tried,
                "costliest": [e.as_dict() for e in self.costliest()],
                "each": [e.as_dict() for e in self.evictions]}


@dataclass
class Forgetting:
    """A `perplexity.Watch` that scores every eviction's counterfactual (see the
    module's doc). `token_bytes` reads the dropped tokens' text."""

    token_bytes: Callable[[int], bytes]
    bound: bool = False
    evictions: list[Eviction] = field(default_factory=list)
    seconds: float = 0.0
    tried: int = 0
    held: list[int] = field(default_factory=list)  # the text index of each slot in memory, as it reads
    _twin: WorkingMemory | None = None  # the memory as it was before the latest eviction, larger
    _choices: list[WorkingMemory] = field(default_factory=list)  # other drops, for the bound
    _open: dict = field(default_factory=dict)  # the latest eviction's figures so far

    def before(self, memory: WorkingMemory, evicting: bool) -> None:
        if not evicting:
            return
        self._close()
        t0 = perf_counter()
        self._twin = memory.fork(capacity=memory.capacity + memory.room)
        self._choices = self._alternatives(memory) if self.bound else []
        self.seconds += perf_counter() - t0

    def after(self, memory: WorkingMemory, ids: Sequence[int], start: int, stop: int, logprobs: torch.Tensor) -> None:
        if memory.last_evicted and self._twin is not None and not self._open:
            self._open = {"at": start, "dropped": self._dropped(memory, ids, start), "forgot": 0.0, "kept": 0.0,
                          "choices": [0.0] * len(self._choices), "scored": 0}
            gone = set(memory.last_evicted)
            self.held = [j for i, j in enumerate(self.held) if i not in gone]
        self.held.extend(range(start, stop))
        if self._twin is None:
            return
        t0 = perf_counter()
        kept = -float(pass_logprobs(self._twin, ids, start, stop).double().sum())
        self._open["forgot"] += -float(logprobs.double().sum())
        self._open["kept"] += kept
        self._open["scored"] += stop - start
        for k, choice in enumerate(self._choices):
            self._open["choices"][k] += -float(pass_logprobs(choice, ids, start, stop).double().sum())
        self.seconds += perf_counter() - t0

    def result(self) -> Cost:
        self._close()
        return Cost(tuple(self.evictions), self.seconds, self.tried)

    def _close(self) -> None:
        o, self._open, self._twin, self._choices = self._open, {}, None, []
        if not o:
            return
        n = o["scored"]
        best = min([(c - o["kept"]) / n for c in o["choices"]] + [(o["forgot"] - o["kept"]) / n]) if self.bound else None
        self.evictions.append(Eviction(o["at"], n, (o["forgot"] - o["kept"]) / n, o["dropped"], best))

    def _dropped(self, memory: WorkingMemory, ids: Sequence[int], start: int) -> tuple[Dropped, ...]:
        assert self._twin is not None  # the memory before the eviction
        out = []
        for i in memory.last_evicted:
            slot, j = self._twin.slots[i], self.held[i]
            text = self.token_bytes(slot.token).decode("utf-8", "replace")
            out.append(Dropped(j, slot.token, text, slot.origin, start - j, slot.score if slot.queries else None,
                               j == 0 or ends_sentence(self.token_bytes, ids[max(0, j - 3) : j]), kind(text)))
        return tuple(out)

    def _alternatives(self, memory: WorkingMemory) -> list[WorkingMemory]:
        """Forks of the memory before the eviction, each dropping another run of as
        many consecutive unpinned slots as the policy drops."""
        n, chosen = memory.room, memory.policy.drop(memory.slots, memory.evict)
        out = []
        for a in range(memory.fill - n + 1):
            span = list(range(a, a + n))
            if span == chosen or any(memory.slots[i].pinned for i in span):
                continue
            choice = memory.fork()
            choice.forget(a, a + n)
            out.append(choice)
        self.tried += len(out) + 1
        return out


def kind(text: str) -> str:
    """What sort of token a token's text is."""
    if "\n" in text:
        return "newline"
    bare = text.strip()
    if not bare:
        return "space"
    if bare[0].isdigit():
        return "number"
    if bare[0].isalpha() or bare[0] == "_":
        return "word" if text[0].isspace() else "word piece"
    return "punctuation"


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman's rank correlation (ties take their mean rank); nan under 3 pairs."""
    if len(xs) != len(ys) or len(xs) < 3:
        return math.nan
    rx, ry = _ranks(xs), _ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx, vy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(vx * vy) if vx and vy else math.nan


def _ranks(xs: Sequence[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks
