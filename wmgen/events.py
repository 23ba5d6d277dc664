"""What generation yields: small frozen records, no behaviour, no torch.

One word per concept: tokens *evicted* left a full memory to make room; prompt
tokens *unread* did not fit and were never read; tokens *recomputed* had their keys
and values computed again. `row` is the prompt's index in a batched run (0 alone).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Started:
    prompt_tokens: int  # tokens in the prompt
    unread: int  # prompt tokens that did not fit and were never read
    fill: int  # tokens in memory after reading the prompt
    seed: int  # the seed used (drawn at random when none was given)
    row: int = 0


@dataclass(frozen=True)
class Evicted:
    evicted: int  # tokens evicted
    recomputed: int  # tokens whose keys/values were recomputed
    fill: int
    row: int = 0
    positions: tuple[int, ...] = ()  # where the evicted tokens were, before the eviction


@dataclass(frozen=True)
class Token:
    index: int  # 0 for the first generated token
    id: int
    text: str  # the exact new piece of text (may be empty while bytes or a stop text wait)
    logprob: float  # the model's log-probability of the token, nats
    fill: int
    evicted: int  # tokens evicted by this step
    row: int = 0


@dataclass(frozen=True)
class Finished:
    reason: str  # "length", "eos", "stop", "interrupted"
    text: str  # text held back until the end (a last partial character, a stop-text prefix)
    prompt_tokens: int
    generated: int  # tokens generated
    prefill_s: float  # seconds reading the prompt(s)
    first_token_s: float  # seconds from the start to the first token
    elapsed_s: float  # seconds from the start to the end
    evictions: int  # the memory's counters, since it was made
    evicted: int
    recomputed: int
    fill: int
    capacity: int
    row: int = 0
    drafted: int = 0  # lookahead: draft tokens checked (`wmgen.lookup`)
    accepted: int = 0  # of them, those kept

    @property
    def tokens_per_s(self) -> float:
        decode = self.elapsed_s - self.prefill_s
        return self.generated / decode if decode > 0 else 0.0


Event = Started | Evicted | Token | Finished


@dataclass(frozen=True)
class Generation:
    """A finished run of one prompt: what `--format json` prints."""

    prompt: str
    text: str  # the generated text (cut at a stop text)
    tokens: tuple[int, ...]  # generated token ids
    logprobs: tuple[float, ...]  # their log-probabilities, nats
    reason: str  # "length", "eos", "stop", "interrupted"
    prompt_tokens: int
    unread: int
    seed: int
    stats: Finished  # timings (seconds) and the memory's counters
