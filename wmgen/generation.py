"""The step loop: sample a token, read it into working memory, repeat. It yields
events (`wmgen.events`) and prints nothing; writers turn them into text."""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Sequence
from time import perf_counter

from wmgen.events import Event, Evicted, Finished, Started, Token
from wmgen.memory import GENERATED, PROMPT, WorkingMemory
from wmgen.sampling import choose, logprob, new_generator
from wmgen.settings import RunSettings, Sampling
from wmgen.tokens import TextStream, Tokenizer


class StopText:
    """Holds back text that could be the start of a stop text; finds the first stop."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.text = ""
        self.emitted = 0

    def push(self, piece: str) -> tuple[str, bool]:
        """The text now safe to emit, and whether a stop text was reached."""
        self.text += piece
        if not self.stops:
            return self._emit(len(self.text)), False
        window = max(0, self.emitted - max(map(len, self.stops)))
        hits = [i for s in self.stops if (i := self.text.find(s, window)) >= 0]
        if hits:
            return self._emit(min(hits)), True
        return self._emit(len(self.text) - self._held()), False

    def _held(self) -> int:
        """Length of the longest tail of the text that starts some stop text."""
        tail = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.text)), tail, -1):
                if self.text.endswith(s[:n]):
                    tail = n
                    break
        return tail

    def _emit(self, upto: int) -> str:
        piece, self.emitted = self.text[self.emitted : upto], max(self.emitted, upto)
        return piece

    def rest(self) -> str:
        return self._emit(len(self.text))


def generate(
    memory: WorkingMemory,
    tokenizer: Tokenizer,
    prompt_ids: Sequence[int],
    run: RunSettings,
    sampling: Sampling,
    *,
    eos_id: int | None = None,
    origin: str = PROMPT,
) -> Iterator[Event]:
    """Read the prompt into `memory`, then generate up to `run.max_new_tokens`."""
    t0 = perf_counter()
    seed = sampling.seed if sampling.seed is not None else secrets.randbits(63)
    generator = new_generator(seed, memory.model.device)
    logits, dropped = memory.read(prompt_ids, origin=origin)
    prefill_s = perf_counter() - t0
    yield Started(prompt_tokens=len(prompt_ids), dropped=dropped, fill=memory.fill, seed=seed)

    stream, stop = TextStream(tokenizer), StopText(run.stop)
    eos = eos_id if eos_id is not None else tokenizer.eos_id
    reason, generated, first_token_s = "length", 0, 0.0
    for index in range(run.max_new_tokens):
        token = choose(logits, sampling, generator, memory.tokens)
        if token == eos and not run.ignore_eos:
            reason = "eos"
            break
        if index == 0:
            first_token_s = perf_counter() - t0
        lp = logprob(logits, token)
        last = index == run.max_new_tokens - 1
        before = memory.counters.evicted, memory.counters.recomputed
        logits = memory.append(token, origin=GENERATED, logprob=lp, compute=not last)
        evicted = memory.counters.evicted - before[0]
        if evicted:
            recomputed = memory.counters.recomputed - before[1]
            yield Evicted(dropped=evicted, recomputed=recomputed, fill=memory.fill)
        generated += 1
        piece, stopped = stop.push(stream.push(token))
        yield Token(index=index, id=token, text=piece, logprob=lp, fill=memory.fill, evicted=evicted)
        if stopped:
            reason = "stop"
            break

    tail = "" if reason == "stop" else stop.push(stream.close())[0] + stop.rest()
    c = memory.counters
    yield Finished(
        reason=reason,
        text=tail,
        prompt_tokens=len(prompt_ids),
        generated=generated,
        prefill_s=prefill_s,
        first_token_s=first_token_s,
        elapsed_s=perf_counter() - t0,
        evictions=c.evictions,
        evicted=c.evicted,
        recomputed=c.recomputed,
        fill=memory.fill,
        capacity=memory.capacity,
    )
