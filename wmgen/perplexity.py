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

import torch

from wmgen.memory import WorkingMemory


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
        return self.seen / self.seconds if self.seconds > 0 else 0.0

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
        }


def token_logprobs(memory: WorkingMemory, ids: Sequence[int], *, chunk: int = 512,
                   progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Log-probability of each of `ids[1:]` given what the memory held just before it."""
    ids = list(ids)
    out = []
    with torch.inference_mode():
        for start in range(0, len(ids) - 1, chunk):
            piece = ids[start : min(start + chunk, len(ids) - 1)]
            logits = memory.feed(piece, all_logits=True)  # row i predicts the token after piece[i]
            targets = torch.tensor(ids[start + 1 : start + 1 + len(piece)], device=logits.device)
            out.append(logits.log_softmax(-1).gather(-1, targets[:, None])[:, 0].cpu())
            if progress:
                progress(len(piece))
    return torch.cat(out)


def score(memory: WorkingMemory, ids: Sequence[int], token_bytes: Callable[[int], bytes], *,
          progress: Callable[[int], None] | None = None) -> Score:
    t0 = perf_counter()
    logprobs = token_logprobs(memory, ids, progress=progress)
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
    )


def looks_untrained(perplexity: float, vocab_size: int, margin: float = 0.05) -> bool:
    """A model whose perplexity is within a few percent of the vocabulary size (or
    above it) predicts no better than a uniform guess."""
    return perplexity >= vocab_size * (1 - margin)
