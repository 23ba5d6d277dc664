"""Scoring text through a WorkingMemory: what a memory shape costs in quality and speed.

Text is read through the same `WorkingMemory` generation uses, in batched chunks;
each token is scored with the log-probability the model gives it from what is in
memory just before it. Token 0 has no context and is not scored.

Correspondence with the strided sliding window of the Hugging Face guide "Perplexity
of fixed-length models" (`max_length` L, `stride` S): a memory with `capacity = L - 1`,
`evict = S`, `keep = 0` scores exactly the same tokens with exactly the same contexts
(the guide's window holds the scored token itself, wmgen's memory holds only what
precedes it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from time import perf_counter
from typing import TYPE_CHECKING, Protocol

import torch

from wmgen.memory import WorkingMemory

if TYPE_CHECKING:
    from wmgen.forgetting import Cost


@dataclass(frozen=True)
class Score:
    tokens: int  # tokens scored
    nll_sum: float  # total negative log-likelihood, nats
    bytes: int  # UTF-8 bytes of the scored tokens
    evictions: int
    recomputed: int
    seen: int
    seconds: float
    capacity: int
    keep: int
    evict: int
    policy: str = "oldest"
    recent: int | None = None
    cost: Cost | None = None  # what forgetting cost, when it was measured

    @property
    def scoring_seconds(self) -> float:
        """The time the scoring itself took (without measuring the cost)."""
        return self.seconds - (self.cost.seconds if self.cost else 0.0)

    @property
    def nll(self) -> float:
        return self.nll_sum / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)

    @property
    def bits_per_byte(self) -> float:
        return self.nll_sum / math.log(2) / self.bytes if self.bytes else float("nan")

    @property
    def tokens_per_s(self) -> float:
        return self.seen / self.scoring_seconds if self.scoring_seconds > 0 else 0.0

    @property
    def recompute_share(self) -> float:
        """Share of the token computations that were recomputations."""
        total = self.seen + self.recomputed
        return self.recomputed / total if total else 0.0

    def as_dict(self) -> dict:
        return {
            "tokens": self.tokens,
            "nll": self.nll,
            "perplexity": self.perplexity,
            "bits_per_byte": self.bits_per_byte,
            "bytes": self.bytes,
            "capacity": self.capacity,
            "keep": self.keep,
            "evict": self.evict,
            "policy": self.policy,
            "recent": self.recent,
            "evictions": self.evictions,
            "recomputed": self.recomputed,
            "recompute_share": self.recompute_share,
            "seconds": self.seconds,
            "tokens_per_s": self.tokens_per_s,
        } | ({"cost": self.cost.as_dict()} if self.cost else {})


class Watch(Protocol):
    """What follows a scoring pass by pass (`wmgen.forgetting`)."""

    def before(self, memory: WorkingMemory, evicting: bool) -> None: ...

    def after(self, memory: WorkingMemory, ids: Sequence[int], start: int, stop: int, logprobs: torch.Tensor) -> None: ...


def token_logprobs(memory: WorkingMemory, ids: Sequence[int], *, chunk: int = 512,
                   progress: Callable[[int], None] | None = None, watch: Watch | None = None) -> torch.Tensor:
    """Log-probability of each of `ids[1:]` given what the memory held just before it.

    The text is read one forward pass at a time, as `WorkingMemory.feed` would read
    it (an eviction when the memory is full, then as many tokens as fit), at most
    `chunk` tokens a pass; `watch` sees each pass."""
    ids = list(ids)
    out = []
    start = 0
    with torch.inference_mode():
        while start < len(ids) - 1:
            evicting = memory.fill == memory.capacity
            stop = min(start + max(1, min(memory.room, chunk)), len(ids) - 1)
            if watch is not None:
                watch.before(memory, evicting)
            out.append(pass_logprobs(memory, ids, start, stop))
            if watch is not None:
                watch.after(memory, ids, start, stop, out[-1])
            if progress:
                progress(stop - start)
            start = stop
    return torch.cat(out)


def pass_logprobs(memory: WorkingMemory, ids: Sequence[int], start: int, stop: int) -> torch.Tensor:
    """Read `ids[start:stop]` into the memory; the log-probability of each next token."""
    logits = memory.feed(ids[start:stop], all_logits=True)  # row i predicts the token after ids[start + i]
    assert logits is not None  # computed: feed returns None only with compute=False
    targets = torch.tensor(ids[start + 1 : stop + 1], device=logits.device)
    return logits.log_softmax(-1).gather(-1, targets[:, None])[:, 0].cpu()


def score(memory: WorkingMemory, ids: Sequence[int], token_bytes: Callable[[int], bytes], *,
          progress: Callable[[int], None] | None = None, cost: bool = False, bound: bool = False) -> Score:
    """Score `ids[1:]`; with `cost`, also what each eviction cost (`wmgen.forgetting`),
    and with `bound`, what the least costly of other choices would have."""
    from wmgen.forgetting import Forgetting

    watch = Forgetting(token_bytes, bound=bound) if cost or bound else None
    t0 = perf_counter()
    logprobs = token_logprobs(memory, ids, progress=progress, watch=watch)
    seconds = perf_counter() - t0
    c = memory.counters
    return Score(
        tokens=len(logprobs),
        nll_sum=-float(logprobs.double().sum()),
        bytes=sum(len(token_bytes(t)) for t in ids[1:]),
        evictions=c.evictions,
        recomputed=c.recomputed,
        seen=c.seen,
        seconds=seconds,
        capacity=memory.capacity,
        keep=memory.keep,
        evict=memory.evict,
        policy=memory.shape.policy,
        recent=memory.recent,
        cost=watch.result() if watch is not None else None,
    )


def looks_untrained(perplexity: float, vocab_size: int, margin: float = 0.05) -> bool:
    """A model whose perplexity is within a few percent of the vocabulary size (or
    above it) predicts no better than a uniform guess."""
    return perplexity >= vocab_size * (1 - margin)
