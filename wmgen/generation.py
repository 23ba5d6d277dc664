"""The step loop: sample a token, read it into working memory, repeat. It yields
events (`wmgen.events`) and prints nothing; writers turn them into text."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator, Sequence
from time import perf_counter

from wmgen.events import Event, Evicted, Finished, Result, Started, Token
from wmgen.memory import GENERATED, PROMPT, MemoryBatch, WorkingMemory
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
    should_stop: Callable[[], bool] = lambda: False,
) -> Iterator[Event]:
    """Read the prompt into `memory`, then generate up to `run.max_new_tokens`.
    `should_stop` is asked between tokens (a signal arrived: stop cleanly)."""
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
        if should_stop():
            reason = "interrupted"
            break
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

    tail = "" if reason == "stop" else finish_text(stream, stop)
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


def finish_text(stream: TextStream, stop: StopText) -> str:
    """What was held back: a last incomplete character, a prefix of a stop text."""
    piece, stopped = stop.push(stream.close())
    return piece if stopped else piece + stop.rest()


def generate_batch(
    batch: MemoryBatch,
    tokenizer: Tokenizer,
    prompts: Sequence[Sequence[int]],
    run: RunSettings,
    sampling: Sampling,
    seeds: Sequence[int],
    *,
    eos_id: int | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> list[Result]:
    """Generate for every prompt at once, one row of `batch` each. Row r samples with
    its own generator seeded `seeds[r]`, so each row gives what `generate` gives for
    that prompt and seed alone."""
    t0 = perf_counter()
    rows = batch.rows[: len(prompts)]
    reads = [memory.read(ids) for memory, ids in zip(rows, prompts)]
    logits = [lg for lg, _ in reads]
    generators = [new_generator(seed, batch.model.device) for seed in seeds]
    streams, stops = [TextStream(tokenizer) for _ in rows], [StopText(run.stop) for _ in rows]
    eos = eos_id if eos_id is not None else tokenizer.eos_id
    generated: list[list[int]] = [[] for _ in rows]
    texts, reasons = ["" for _ in rows], [None for _ in rows]
    for step in range(run.max_new_tokens):
        if should_stop():
            reasons = [r or "interrupted" for r in reasons]
            break
        tokens, lps = [None] * len(batch.rows), [None] * len(batch.rows)
        for r, memory in enumerate(rows):
            if reasons[r] is not None:
                continue
            token = choose(logits[r], sampling, generators[r], memory.tokens)
            if token == eos and not run.ignore_eos:
                reasons[r] = "eos"
                continue
            tokens[r], lps[r] = token, logprob(logits[r], token)
        if all(t is None for t in tokens):
            break
        last = step == run.max_new_tokens - 1
        logits = batch.append(tokens, lps, compute=not last)
        for r, token in enumerate(tokens[: len(rows)]):
            if token is None:
                continue
            generated[r].append(token)
            piece, stopped = stops[r].push(streams[r].push(token))
            texts[r] += piece
            if stopped:
                reasons[r] = "stop"
    elapsed = perf_counter() - t0
    results = []
    for r, memory in enumerate(rows):
        if reasons[r] != "stop":
            texts[r] += finish_text(streams[r], stops[r])
        c = memory.counters
        results.append(Result(
            row=r, prompt_tokens=len(prompts[r]), dropped=reads[r][1], tokens=tuple(generated[r]), text=texts[r],
            reason=reasons[r] or "length", seed=seeds[r], elapsed_s=elapsed, evictions=c.evictions,
            evicted=c.evicted, recomputed=c.recomputed, fill=memory.fill, capacity=memory.capacity,
        ))  # fmt: skip
    return results
