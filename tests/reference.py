"""The memory's rules on plain lists: the one reference model the tests hold wmgen to.

Written from the rules as the README states them, not from wmgen's code: a window of
at most `capacity` entries, some pinned (the first `keep` read, and any an edit
pins), which no policy drops; a token arriving at a full window first drops what the
policy picks; a prompt read at once drops what does not fit the same way (its last
token always stays). Edits (forget, insert, pin, unpin) act on the list directly. Under the attention policy, scores
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
    pinned: bool = False
    new: bool = False  # read, its query not yet run

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
    last_dropped: list[int] = field(default_factory=list)

    def __post_init__(self):
        if self.policy == "attention" and self.recent is None:
            self.recent = min((self.capacity - self.keep) // 2, self.capacity - self.keep - self.evict)

    @property
    def tokens(self) -> list[int]:
        return [e.token for e in self.held]

    def choose(self, entries: list[Entry], n: int) -> list[int]:
        """Which of `entries` go when at least `n` must: indices, ascending."""
        free = [i for i, e in enumerate(entries) if not e.pinned]
        if self.policy == "oldest":
            return free[:n]
        if self.policy == "boundary":
            for k in range(n - 1, min(n + self.evict, len(free))):
                if k == n - 1 and ends_a_sentence(self.token_text(entries[free[k]].token)):
                    break  # the cut already follows a sentence end
                if k >= n and ends_a_sentence(self.token_text(entries[free[k]].token)):
                    return free[: k + 1]
            return free[:n]
        candidates = [i for i in free if i < len(entries) - self.recent]
        if n >= len(candidates):
            return free[:n]
        ranked = sorted(candidates, key=lambda i: (entries[i].score, i))
        return sorted(ranked[:n])

    # --- edits, on the list itself ----------------------------------------------------

    def forget(self, start: int, stop: int) -> None:
        del self.held[start:stop]

    def insert(self, index: int, tokens: list[int]) -> None:
        need = len(self.held) + len(tokens) - self.capacity
        if need > 0:
            gone = self.choose(self.held, need)
            index -= sum(1 for i in gone if i < index)
            self.held = [e for i, e in enumerate(self.held) if i not in gone]
            self.evictions += 1
            self.evicted += len(gone)
        self.held[index:index] = [Entry(t, "inserted", new=True) for t in tokens]
        self.seen += len(tokens)

    def set_pins(self, start: int, stop: int, value: bool) -> None:
        for e in self.held[start:stop]:
            e.pinned = value

    def push(self, entry: Entry, compute: bool = True) -> list[int]:
        """Read one token as `append` does; the window the model then sees."""
        self.stream.append(entry.token)
        if len(self.held) == self.capacity:
            gone = self.choose(self.held, self.evict)
            self.held = [e for i, e in enumerate(self.held) if i not in gone]
            self.evictions += 1
            self.evicted += len(gone)
            self.last_dropped = gone
        entry.pinned = entry.pinned or len(self.held) < self.keep
        entry.new = True
        self.held.append(entry)
        self.seen += 1
        if compute:
            self.run()
        return self.tokens

    def read(self, entries: list[Entry]) -> int:
        """Read a prompt at once; how many of its tokens went unread."""
        self.stream += [e.token for e in entries]
        before = len(self.held)
        for k, e in enumerate(entries):
            e.pinned = e.pinned or before + k < self.keep
            e.new = True
        combined = self.held + list(entries)
        overflow = len(combined) - self.capacity
        gone = self.choose(combined[:-1], overflow) if overflow > 0 else []
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
        """The model reads the window: the new tokens' queries count now; each
        entry counts the new queries after it."""
        new = [j for j, e in enumerate(self.held) if e.new]
        if self.policy == "attention" and new:
            received = self.attend(self.tokens, new)
            for j, e in enumerate(self.held):
                e.received += received[j]
                e.queries += sum(1 for q in new if q > j)
        for e in self.held:
            e.new = False


def received_by_eager(eager, tokens: list[int], new: list[int]) -> list[float]:
    """Attention the queries at `new` give each earlier slot, from transformers'
    eager attention (`eager`: a model run with output_attentions): per query the
    mean over layers and heads, summed over the queries."""
    import torch

    with torch.no_grad():
        attentions = eager(torch.tensor([tokens]), output_attentions=True).attentions
    mean = torch.stack(attentions)[:, 0].double().mean(dim=(0, 1))  # [T, T]: query, slot
    return [float(sum(mean[q, j] for q in new if q > j)) for j in range(len(tokens))]


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
