"""From logits to a token: pure functions of their inputs and a seeded generator.

Order, as in `transformers`: repetition penalty, temperature, top-k, top-p, then a
draw from the softmax of what is left. Temperature 0 is greedy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from wmgen.settings import Sampling


def penalize_repetition(logits: Tensor, history: Sequence[int], penalty: float) -> Tensor:
    """CTRL's penalty: logits of tokens already in `history` move toward "less likely"."""
    if penalty == 1.0 or not history:
        return logits
    ids = torch.tensor(sorted(set(history)), device=logits.device)
    seen = logits[ids]
    logits = logits.clone()
    logits[ids] = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits


def keep_top_k(logits: Tensor, k: int) -> Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


def keep_top_p(logits: Tensor, p: float) -> Tensor:
    """The smallest set of most likely tokens whose probability adds up to >= p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    drop_sorted = cumulative - sorted_logits.softmax(-1) >= p  # mass before this token already >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def probabilities(logits: Tensor, s: Sampling, history: Sequence[int] = ()) -> Tensor:
    """The distribution a sampled token is drawn from (temperature > 0)."""
    logits = penalize_repetition(logits, history, s.repetition_penalty)
    logits = keep_top_k(logits / s.temperature, s.top_k)
    return keep_top_p(logits, s.top_p).softmax(-1)


def choose(logits: Tensor, s: Sampling, generator: torch.Generator, history: Sequence[int] = ()) -> int:
    """The next token: argmax at temperature 0, else a draw from `probabilities`."""
    if s.temperature == 0:
        return int(penalize_repetition(logits, history, s.repetition_penalty).argmax())
    probs = probabilities(logits, s, history)
    return int(torch.multinomial(probs, 1, generator=generator))


def new_generator(seed: int, device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def logprob(logits: Tensor, token: int) -> float:
    """The model's own log-probability of `token` (before any sampling filter)."""
    return float(logits[token] - torch.logsumexp(logits, -1))
