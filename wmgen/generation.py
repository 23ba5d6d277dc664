"""The step loop, for one row or many: sample a token per row, read it into working
memory, repeat. It yields events (`wmgen.events`) and prints nothing; writers turn
them into text."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator, Sequence
from time import perf_counter

from wmgen.events import Event, Evicted, Finished, Generation, Started, Token
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


class Row:
    """One prompt's run: its memory, sampler, text stream, stop text and outcome."""

    def __init__(self, index: int, memory: WorkingMemory, prompt_ids: Sequence[int], seed: int, tokenizer: Tokenizer, run: RunSettings):
        self.index, self.memory, self.prompt_ids, self.seed = index, memory, prompt_ids, seed
        self.generator = new_generator(seed, memory.model.device)
        self.stream, self.stop = TextStream(tokenizer), StopText(run.stop)
        self.reason: str | None = None
        self.generated = 0
        self.first_token_s = 0.0

    def finish(self, t0: float, prefill_s: float) -> Finished:
        tail = "" if self.reason == "stop" else finish_text(self.stream, self.stop)
        m, c = self.memory, self.memory.counters
        return Finished(
            reason=self.reason or "length", text=tail, prompt_tokens=len(self.prompt_ids), generated=self.generated,
            prefill_s=prefill_s, first_token_s=self.first_token_s, elapsed_s=perf_counter() - t0,
            evictions=c.evictions, evicted=c.evicted, recomputed=c.recomputed, fill=m.fill, capacity=m.capacity,
            row=self.index,
        )


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
    seed = sampling.seed if sampling.seed is not None else secrets.randbits(63)

    def step(tokens, logprobs, compute):
        return [memory.append(tokens[0], origin=GENERATED, logprob=logprobs[0], compute=compute)]

    return run_rows([memory], [prompt_ids], [seed], step, tokenizer, run, sampling, eos_id=eos_id, origin=origin, should_stop=should_stop)


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
) -> Iterator[Event]:
    """Generate for every prompt at once, one row of `batch` each; the events of
    every row, each marked with its `row`. Row r samples with its own generator
    seeded `seeds[r]`, so each row gives what `generate` gives for that prompt and
    seed alone. Steps where several rows take a plain step read the weights once."""
    rows = batch.rows[: len(prompts)]
    spare = [None] * (len(batch.rows) - len(rows))

    def step(tokens, logprobs, compute):
        return batch.append([*tokens, *spare], [*logprobs, *spare], compute=compute)

    return run_rows(rows, prompts, seeds, step, tokenizer, run, sampling, eos_id=eos_id, origin=PROMPT, should_stop=should_stop)


def run_rows(
    memories: Sequence[WorkingMemory],
    prompts: Sequence[Sequence[int]],
    seeds: Sequence[int],
    step: Callable,
    tokenizer: Tokenizer,
    run: RunSettings,
    sampling: Sampling,
    *,
    eos_id: int | None,
    origin: str,
    should_stop: Callable[[], bool],
) -> Iterator[Event]:
    """The loop itself. `step(tokens, logprobs, compute)` reads `tokens[r]` into
    row r (None: the row has finished) and gives each row's next logits."""
    t0 = perf_counter()
    rows = [Row(r, m, ids, seed, tokenizer, run) for r, (m, ids, seed) in enumerate(zip(memories, prompts, seeds))]
    logits = []
    for row in rows:
        row_logits, unread = row.memory.read(row.prompt_ids, origin=origin)
        logits.append(row_logits)
        yield Started(prompt_tokens=len(row.prompt_ids), unread=unread, fill=row.memory.fill, seed=row.seed, row=row.index)
    prefill_s = perf_counter() - t0
    eos = eos_id if eos_id is not None else tokenizer.eos_id
    for index in range(run.max_new_tokens):
        if should_stop():
            for row in rows:
                row.reason = row.reason or "interrupted"
            break
        tokens: list[int | None] = [None] * len(rows)
        lps: list[float | None] = [None] * len(rows)
        for row in rows:
            if row.reason is not None:
                continue
            history = row.memory.tokens if sampling.repetition_penalty != 1 else ()  # only the penalty reads it
            token = choose(logits[row.index], sampling, row.generator, history)
            if token == eos and not run.ignore_eos:
                row.reason = "eos"
                continue
            if index == 0:
                row.first_token_s = perf_counter() - t0
            tokens[row.index], lps[row.index] = token, logprob(logits[row.index], token)
        if all(t is None for t in tokens):
            break
        before = [(row.memory.counters.evicted, row.memory.counters.recomputed) for row in rows]
        logits = step(tokens, lps, index < run.max_new_tokens - 1)  # the last token's logits are never read
        for row, token in zip(rows, tokens):
            if token is None:
                continue
            c = row.memory.counters
            evicted = c.evicted - before[row.index][0]
            if evicted:
                yield Evicted(evicted=evicted, recomputed=c.recomputed - before[row.index][1], fill=row.memory.fill,
                              row=row.index, positions=row.memory.last_evicted)
            row.generated += 1
            piece, stopped = row.stop.push(row.stream.push(token))
            yield Token(index=index, id=token, text=piece, logprob=lps[row.index], fill=row.memory.fill, evicted=evicted, row=row.index)
            if stopped:
                row.reason = "stop"
    for row in rows:
        yield row.finish(t0, prefill_s)


def finish_text(stream: TextStream, stop: StopText) -> str:
    """What was held back: a last incomplete character, a prefix of a stop text."""
    piece, stopped = stop.push(stream.close())
    return piece if stopped else piece + stop.rest()


def collect(events: Iterator[Event], prompts: Sequence[str]) -> Iterator[Generation]:
    """The events of one or many rows, gathered into one `Generation` per row, each
    given as soon as its row has finished."""
    rows: dict[int, dict] = {}
    for event in events:
        if isinstance(event, Started):
            rows[event.row] = {"start": event, "text": [], "tokens": [], "logprobs": []}
        elif isinstance(event, Token):
            row = rows[event.row]
            row["text"].append(event.text)
            row["tokens"].append(event.id)
            row["logprobs"].append(event.logprob)
        elif isinstance(event, Finished):
            row = rows.pop(event.row)
            start = row["start"]
            yield Generation(
                prompt=prompts[event.row], text="".join(row["text"]) + event.text, tokens=tuple(row["tokens"]),
                logprobs=tuple(row["logprobs"]), reason=event.reason, prompt_tokens=start.prompt_tokens,
                unread=start.unread, seed=start.seed, stats=event,
            )
