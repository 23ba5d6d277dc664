"""The memory's rules on plain lists: the one reference model the tests hold wmgen to.

Written from the rules as the README states them, not from wmgen's code: a window of
at most `capacity` entries, the first `keep` pinned; a token arriving at a full
window first drops what the policy picks; a prompt read at once drops what does not
fit the same way (its last token always stays). Under the attention policy, scores
come from `attend`, which the tests build on `transformers`' eager attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

SENTENCE_END = ("\n", ".", "!", "?", "。", "！", "？")
CLOSING = set("\"')]}»”’」』）】〉》")


@dataclass
class Entry:
    token: int
    origin: str = "prompt"
    logprob: float | None = None
    received: float = 0.0  # attention received, summed over the queries counted
    queries: int = 0

    @property
    def score(self) -> float:
        return self.received / self.queries if self.queries else math.inf


def ends_a_sentence(text: str) -> bool:
    """A line break anywhere, or a sentence end followed by nothing but closers."""
    if "\n" in text:
        return True
    stripped = text
    while stripped and stripped[-1] in CLOSING:
        stripped = stripped[:-1]
    return bool(stripped) and stripped[-1] in SENTENCE_END


@dataclass
class Reference:
    capacity: int
    keep: int
    evict: int
    policy: str = "oldest"
    recent: int | None = None
    token_text: object = None  # token id -> its text (boundary)
    attend: object = None  # (window tokens, new queries) -> attention received per slot (attention)
    held: list[Entry] = field(default_factory=list)
    stream: list[int] = field(default_factory=list)  # every token offered, in order
    seen: int = 0
    evicted: int = 0
    evictions: int = 0
    pending: int = 0  # tokens read whose queries have not run yet
    last_dropped: list[int] = field(default_factory=list)

    def __post_init__(self):
        if self.policy == "attention" and self.recent is None:
            self.recent = min((self.capacity - self.keep) // 2, self.capacity - self.keep - self.evict)

    @property
    def tokens(self) -> list[int]:
        return [e.token for e in self.held]

    def choose(self, entries: list[Entry], n: int) -> list[int]:
        """Which of `entries` go when at least `n` must: indices, ascending."""
        k = self.keep
        if self.policy == "oldest":
            return list(range(k, k + n))
        if self.policy == "boundary":
            for i in range(k + n - 1, min(k + n + self.evict, len(entries))):
                if i == k + n - 1 and ends_a_sentence(self.token_text(entries[i].token)):
                    break  # the cut already follows a sentence end
                if i >= k + n and ends_a_sentence(self.token_text(entries[i].token)):
                    return list(range(k, i + 1))
            return list(range(k, k + n))
        candidates = list(range(k, len(entries) - self.recent))
        ranked = sorted(candidates, key=lambda i: (entries[i].score, i))
        return sorted(ranked[:n])

    def push(self, entry: Entry, compute: bool = True) -> list[int]:
        """Read one token as `append` does; the window the model then sees."""
        self.stream.append(entry.token)
        if len(self.held) == self.capacity:
            n = min(self.evict, len(self.held) - self.keep)
            gone = self.choose(self.held, n)
            self.pending -= sum(1 for i in gone if i >= len(self.held) - self.pending)
            self.held = [e for i, e in enumerate(self.held) if i not in gone]
            self.evictions += 1
            self.evicted += len(gone)
            self.last_dropped = gone
        self.held.append(entry)
        self.seen += 1
        self.pending += 1
        if compute:
            self.run()
        return self.tokens

    def read(self, entries: list[Entry]) -> int:
        """Read a prompt at once; how many of its tokens went unread."""
        self.stream += [e.token for e in entries]
        before = len(self.held)
        combined = self.held + list(entries)
        overflow = len(combined) - self.capacity
        gone = self.choose(combined[:-1], overflow) if overflow > 0 else []
        self.pending += len(entries) - sum(1 for i in gone if i >= len(combined) - self.pending - len(entries))
        self.held = [e for i, e in enumerate(combined) if i not in gone]
        from_memory = sum(1 for i in gone if i < before)
        if from_memory:
            self.evictions += 1
            self.evicted += from_memory
        unread = len(gone) - from_memory
        self.seen += len(entries) - unread
        self.run()
        return unread

    def run(self) -> None:
        """The model reads the window: the pending tokens' queries count now."""
        if self.policy == "attention" and self.pending:
            received = self.attend(self.tokens, self.pending)
            first = len(self.held) - self.pending
            for j, e in enumerate(self.held):
                e.received += received[j]
                e.queries += self.pending if j < first else len(self.held) - 1 - j
        self.pending = 0


def reference_windows(stream: list[int], capacity: int, keep: int, evict: int, **policy) -> list[list[int]]:
    """The window after each token of `stream`, read one at a time."""
    ref = Reference(capacity, keep, evict, **policy)
    return [ref.push(Entry(t)) for t in stream]


def reference_greedy(ref: Reference, logits_of, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens through the reference memory: the prompt read at once, then each
    token chosen from `logits_of(window)`, a fresh forward over the window."""
    ref.read([Entry(t) for t in prompt])
    out = []
    for _ in range(n):
        token = int(logits_of(ref.tokens).argmax())
        out.append(token)
        ref.push(Entry(token, "generated"))
    return out
