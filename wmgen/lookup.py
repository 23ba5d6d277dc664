"""Lookup decoding: drafts found in the working memory itself, checked in one pass.

Text often repeats what it has read: a summary quotes its source, code reuses its
names, a long memory holds the phrase about to be written. So before a step, the
memory's last few tokens are looked up in the memory (prompt and generated text
alike); the tokens that followed their latest earlier occurrence are a draft of what
comes next. The draft is read with the step's own token in one forward pass, which
costs little more than one token (a step reads every weight once, however many
tokens it carries), and kept up to the first token the model would not have chosen
itself. `wmgen.generation` runs the check; this module finds drafts and decides how
long they should be (`Pace`), and knows nothing of the model.
"""

from __future__ import annotations

from collections.abc import Sequence

LONGEST = 3  # tokens of the memory's tail matched at most: a longer match predicts no better
PRIOR = 0.5  # the chance a draft's next token is kept, before any is checked
WEIGHT = 0.15  # of each new observation in the running estimates
MARGIN = 1.03  # a draft must promise this much more speed than a plain step
PROBE = 32  # steps without drafts, then one short draft to see whether matches pay again


def draft(tokens: Sequence[int], limit: int, longest: int = LONGEST) -> tuple[list[int], int]:
    """The tokens that followed the latest earlier occurrence of the longest tail of
    `tokens` (up to `longest`) found in them, `limit` of them (where they run out at
    the end, the repeat they describe continues); and how many tokens of the tail
    matched (0: no draft)."""
    if limit < 1 or len(tokens) < 2:
        return [], 0
    last, end = tokens[-1], len(tokens) - 1
    best, matched = -1, 0
    for j in range(end - 1, -1, -1):  # latest first
        if tokens[j] != last:
            continue
        n = 1
        while n < longest and j - n >= 0 and tokens[j - n] == tokens[end - n]:
            n += 1
        if n > matched:
            best, matched = j, n
            if n == longest:
                break
    if best < 0:
        return [], 0
    found = list(tokens[best + 1 : best + 1 + limit])
    while len(found) < limit:  # past the tail: the text repeats with period end - best, so the draft goes on repeating
        found.append(found[len(found) - (end - best)])
    return found, matched


class Pace:
    """How long a draft should be, from what drafts have earned so far.

    A check of `m` tokens costs `cost(m)` steps' time (measured as the run goes;
    before that, 1 + 0.2 (m - 1), near what gpt2 shapes cost on 2 cores). A draft of
    `k` whose tokens are each kept with chance `p` (given the ones before it were;
    estimated per length of match) yields `1 + p + ... + p^k` tokens for `cost(k+1)`.
    The length that yields most per second is drafted, if it beats a plain step;
    otherwise none, and a short probe every `PROBE` steps keeps the estimate honest."""

    def __init__(self, most: int):
        self.most = most
        self.kept = [PRIOR] * (LONGEST + 1)  # by tokens matched
        self.seconds: dict[int, float] = {}  # tokens in a pass -> running mean of its time
        self.idle = 0
        self.drafted = self.accepted = self.checks = 0  # totals, for the run's stats

    def cost(self, m: int) -> float:
        """A pass over `m` tokens, in plain steps."""
        one = self.seconds.get(1)
        if one and m in self.seconds:
            return self.seconds[m] / one
        return 1 + 0.2 * (m - 1)

    def length(self, available: int, matched: int) -> int:
        """Tokens of an `available`-token draft worth checking (0: take a plain step)."""
        limit = min(available, self.most)
        if limit < 1 or matched < 1:
            return 0
        p = self.kept[min(matched, LONGEST)]
        best, best_gain, expected, chance = 0, 1.0, 1.0, 1.0
        for k in range(1, limit + 1):
            chance *= p
            expected += chance
            gain = expected / self.cost(k + 1)
            if gain > best_gain:
                best, best_gain = k, gain
        if best and best_gain >= MARGIN:
            self.idle = 0
            return best
        self.idle += 1
        if self.idle >= PROBE:
            self.idle = 0
            return 1
        return 0

    def passed(self, tokens: int, seconds: float) -> None:
        """A pass over `tokens` tokens took `seconds`."""
        before = self.seconds.get(tokens)
        self.seconds[tokens] = seconds if before is None else before + WEIGHT * (seconds - before)

    def checked(self, matched: int, drafted: int, accepted: int) -> None:
        """Of a draft of `drafted` tokens (from a match of `matched`), `accepted` were kept."""
        i = min(matched, LONGEST)
        reached = min(drafted, accepted + 1)  # the positions whose outcome was seen
        for n in range(reached):
            kept = 1.0 if n < accepted else 0.0
            self.kept[i] += WEIGHT * (kept - self.kept[i])
        self.drafted += drafted
        self.accepted += accepted
        self.checks += 1
