"""What generation yields: small frozen records, no behaviour, no torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Started:
    prompt_tokens: int  # tokens in the prompt
    dropped: int  # prompt tokens that did not fit and were never read
    fill: int  # tokens in memory after reading the prompt
    seed: int  # the seed used (drawn at random when none was given)


@dataclass(frozen=True)
class Evicted:
    dropped: int  # tokens evicted
    recomputed: int  # tokens whose keys/values were recomputed
    fill: int


@dataclass(frozen=True)
class Token:
    index: int  # 0 for the first generated token
    id: int
    text: str  # the exact new piece of text (may be empty while bytes or a stop text wait)
    logprob: float  # the model's log-probability of the token
    fill: int
    evicted: int  # tokens evicted by this step


@dataclass(frozen=True)
class Finished:
    reason: str  # "length", "eos", "stop"
    text: str  # text held back until the end (a last partial character, a stop-text prefix)
    prompt_tokens: int
    generated: int
    prefill_s: float  # reading the prompt
    first_token_s: float  # from the start of generation to the first token
    elapsed_s: float
    evictions: int
    evicted: int
    recomputed: int
    fill: int
    capacity: int

    @property
    def tokens_per_s(self) -> float:
        decode = self.elapsed_s - self.prefill_s
        return self.generated / decode if decode > 0 else 0.0


Event = Started | Evicted | Token | Finished


@dataclass(frozen=True)
class Result:
    """One finished row of a batched run."""

    row: int
    prompt_tokens: int
    dropped: int
    tokens: tuple[int, ...]  # generated token ids
    text: str  # the generated text (cut at a stop text)
    reason: str  # "length", "eos", "stop", "interrupted"
    seed: int
    elapsed_s: float  # for the whole batch this row ran in
    evictions: int
    evicted: int
    recomputed: int
    fill: int
    capacity: int
