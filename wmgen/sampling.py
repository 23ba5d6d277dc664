"""From logits to a token: pure functions of their inputs and a seeded generator.

Order, as in `transformers`: repetition penalty, temperature, top-k, top-p, then a
draw from the softmax of what is left. Temperature 0 is greedy.
"""

from __future__ import annotations

import math
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
    kind = torch.finfo(logits.dtype)
    if not kind.tiny <= penalty <= kind.max:  # the penalty itself would round to 0, inf or a few bits
        penalized = _penalize_in_float64(seen, penalty)
    else:
        penalized = torch.where(seen > 0, seen / penalty, seen * penalty)
        if not math.isfinite(penalized.sum()) and _broken(penalized, seen):  # a logit overflowed
            penalized = _penalize_in_float64(seen, penalty)
    logits = logits.clone()
    logits[ids] = penalized
    return logits


def _broken(penalized: Tensor, seen: Tensor) -> bool:
    """NaN anywhere, or a finite logit turned infinite."""
    return bool((penalized.isnan() | (penalized.isinf() & seen.isfinite())).any())


def _penalize_in_float64(seen: Tensor, penalty: float) -> Tensor:
    """The penalty where the logits' dtype cannot take it: in float64, finite logits
    kept finite (clamped to the dtype's range, so the order at the extremes can
    tie), -inf kept -inf."""
    x = seen.double()
    penalized = torch.where(x > 0, x / penalty, x * penalty)
    big = torch.finfo(seen.dtype).max
    return torch.where(x.isfinite(), penalized.clamp(-big, big), x).to(seen.dtype)


def divide_by_temperature(logits: Tensor, temperature: float) -> Tensor:
    """`logits / temperature`. A temperature so close to 0 that float32 overflows
    (or so large that it rounds to inf) is done in float64 after moving the largest
    logit to 0: the same softmax, without inf - inf."""
    scaled = logits / temperature
    if math.isfinite(scaled.amax()):  # NaN or inf in it would show in the max
        return scaled
    x = logits.double()
    return ((x - x.amax(-1, keepdim=True)) / temperature).to(logits.dtype)


def keep_top_k(logits: Tensor, k: int) -> Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


def keep_top_p(logits: Tensor, p: float) -> Tensor:
    """The smallest set of most likely tokens whose probability adds up to >= p;
    never empty (a p below float32's smallest number would otherwise drop all).

    Only tokens of probability >= (1 - p) / V are ranked: those below hold less than
    1 - p together, so the set ends before them (in a peaked distribution, a few
    hundred of gpt2's 50,257 tokens)."""
    if p >= 1.0:
        return logits
    probs = logits.softmax(-1)
    kept = None
    if probs.dim() == 1:
        among = (probs >= (1.0 - p) / probs.shape[-1]).nonzero().flatten()
        kept = _nucleus(probs, among[descending(probs[among])], p, whole=False)
    if kept is None:  # a batch of rows, or rounding left the set open among those ranked
        kept = _nucleus(probs, descending(probs), p, whole=True)
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, *kept)
    return logits.masked_fill(~keep, float("-inf"))


def _nucleus(probs: Tensor, order: Tensor, p: float, *, whole: bool) -> tuple[Tensor, Tensor] | None:
    """Of the tokens in `order` (most likely first), whether each is in the set, as
    `(order, kept)`; None if the set does not end among them and they are not the
    `whole` vocabulary."""
    top = probs.gather(-1, order)
    ends = top.cumsum(-1) - top >= p  # mass before this token already >= p
    if not whole and not bool(ends.any()):
        return None
    ends[..., 0] = False
    return order, ~ends


def descending(values: Tensor) -> Tensor:
    """The indices that sort `values` (along the last dimension) from largest to
    smallest, equals in no set order. On the CPU through numpy, whose sort runs ~5x
    faster than torch's over a vocabulary."""
    if values.device.type == "cpu" and values.dim() == 1 and values.dtype == torch.float32:
        import numpy as np

        return torch.from_numpy(np.argsort(-values.numpy()))
    return torch.sort(values, descending=True).indices


def probabilities(logits: Tensor, s: Sampling, history: Sequence[int] = ()) -> Tensor:
    """The distribution a token is drawn from: at temperature 0, all on the argmax.
    `logits` may hold -inf (masked tokens), never only -inf."""
    logits = penalize_repetition(logits, history, s.repetition_penalty)
    if s.temperature == 0:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    logits = keep_top_k(divide_by_temperature(logits, s.temperature), s.top_k)
    return keep_top_p(logits, s.top_p).softmax(-1)


def choose(logits: Tensor, s: Sampling, generator: torch.Generator, history: Sequence[int] = ()) -> int:
    """The next token: argmax at temperature 0, else a draw from `probabilities`."""
    if s.temperature == 0:
        return first_max(penalize_repetition(logits, history, s.repetition_penalty))
    return draw(probabilities(logits, s, history), generator)


def first_max(logits: Tensor) -> int:
    """The index of the largest logit, the first of equals (as `argmax`, ~3x faster
    over a vocabulary on the CPU)."""
    return int(logits.max(-1).indices)


def draw(probs: Tensor, generator: torch.Generator) -> int:
    """A token drawn from `probs` `[V]` (>= 0, not all 0, need not add up to 1): the
    first whose cumulative probability passes one uniform number. One random number
    a token, where `torch.multinomial` makes one per vocabulary entry (~1 ms for
    50,257). It sums in float64, so no token's share is lost to rounding (in float32
    on Apple's GPU, which has no float64)."""
    wide = torch.float32 if probs.device.type == "mps" else torch.float64
    cumulative = probs.to(wide).cumsum(-1)
    u = torch.rand((), generator=generator, dtype=wide, device=probs.device)
    token = int(torch.searchsorted(cumulative, u * cumulative[-1], right=True))
    if token >= probs.shape[-1]:  # u * total rounded up to the total
        token = int(probs.nonzero()[-1])
    return token


def new_generator(seed: int, device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def logprob(logits: Tensor, token: int) -> float:
    """The model's own log-probability of `token` (before any sampling filter)."""
    return float(logits[token] - torch.logsumexp(logits, -1))


def top_logprobs(logits: Tensor, n: int) -> list[tuple[int, float]]:
    """The `n` likeliest tokens and the model's own log-probabilities of them."""
    logprobs = logits.float().log_softmax(-1)
    values, ids = torch.topk(logprobs, min(n, logprobs.shape[-1]))
    return list(zip(ids.tolist(), values.tolist()))
