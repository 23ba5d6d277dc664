"""The step loop, for one row or many: sample a token per row, read it into working
memory, repeat. It yields events (`wmgen.events`) and prints nothing; writers turn
them into text."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator, Sequence
from time import perf_counter

from torch import Tensor

from wmgen import lookup
from wmgen.events import Event, Evicted, Finished, Generation, Started, Token
from wmgen.lookup import Pace
from wmgen.memory import GENERATED, PROMPT, MemoryBatch, WorkingMemory
from wmgen.sampling import choose, logprob, new_generator, top_logprobs
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
    """One prompt's run: its memory, sampler, text stream, stop text and outcome.
    `run` and `sampling` are its own, so rows of one loop may differ in both."""

    def __init__(self, index: int, memory: WorkingMemory, prompt_ids: Sequence[int], seed: int, tokenizer: Tokenizer,
                 run: RunSettings, sampling: Sampling, *, origin: str = PROMPT, t0: float | None = None):
        self.index, self.memory, self.prompt_ids, self.seed = index, memory, prompt_ids, seed
        self.run, self.sampling, self.origin = run, sampling, origin
        self.generator = new_generator(seed, memory.model.device)
        self.stream, self.stop = TextStream(tokenizer), StopText(run.stop)
        self.reason: str | None = None
        self.generated = 0
        self.t0 = perf_counter() if t0 is None else t0
        self.prefill_s = 0.0
        self.first_token_s = 0.0
        self.logits: Tensor | None = None  # for the next token
        self.alternatives = 0  # how many of the likeliest tokens to note at each step (`top`)
        self.top: list[tuple[int, float]] = []  # the likeliest tokens and their logprobs, for the last token
        self.cancelled = False  # set from anywhere: the row stops at the next step ("interrupted")
        self.score_prompt = False  # keep the logits after every prompt token (`prompt_logits`); the prompt must fit
        self.prompt_logits: Tensor | None = None
        self.pace = Pace(run.lookahead) if run.lookahead and lookup_fits(memory, sampling) else None
        self.held: int | None = None  # a token already chosen (where a draft was refused), read at the next step

    def finish(self) -> Finished:
        tail = "" if self.reason == "stop" else finish_text(self.stream, self.stop)
        m, c = self.memory, self.memory.counters
        return Finished(
            reason=self.reason or "length", text=tail, prompt_tokens=len(self.prompt_ids), generated=self.generated,
            prefill_s=self.prefill_s, first_token_s=self.first_token_s, elapsed_s=perf_counter() - self.t0,
            evictions=c.evictions, evicted=c.evicted, recomputed=c.recomputed, fill=m.fill, capacity=m.capacity,
            row=self.index, drafted=self.pace.drafted if self.pace else 0, accepted=self.pace.accepted if self.pace else 0,
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
        return [memory.append(tokens[0], origin=GENERATED, logprob=logprobs[0], compute=compute[0])]

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
    memories = [m for m in batch.rows[: len(prompts)] if m is not None]
    return run_rows(memories, prompts, seeds, batch.append, tokenizer, run, sampling, eos_id=eos_id, origin=PROMPT,
                    should_stop=should_stop, places=len(batch.rows))


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
    places: int | None = None,
) -> Iterator[Event]:
    """Rows that start together and run to their ends: a `Loop` all of them join
    at once. `step` as `Loop` takes it."""
    t0 = perf_counter()
    loop = Loop(step, places or len(memories), tokenizer.eos_id if eos_id is None else eos_id)
    rows = [Row(r, m, ids, seed, tokenizer, run, sampling, origin=origin, t0=t0)
            for r, (m, ids, seed) in enumerate(zip(memories, prompts, seeds))]
    for row in rows:
        yield loop.join(row)
    prefill_s = perf_counter() - t0
    for row in rows:
        row.prefill_s = prefill_s  # the rows were read together
    while loop.rows:
        if should_stop():
            yield from loop.stop()
            break
        yield from loop.step()


class Loop:
    """Rows that step together, and join and leave between steps (continuous
    batching): each step samples a token for every row, reads them all with one
    `step(tokens, logprobs, compute)` call, and gives every row's events; a row
    leaves with its `Finished` as soon as it ends.

    `step` takes lists with one place per row index (None where a row has no token
    this step; `compute[r]`: whether row r's next logits are wanted) and gives the
    next logits, indexable by row index."""

    def __init__(self, step: Callable, places: int, eos_id: int | None):
        self._step, self.places, self.eos = step, places, eos_id
        self.rows: list[Row] = []

    def join(self, row: Row) -> Started:
        """Read the row's prompt into its memory (alone: prompts differ in length),
        and take it into the steps that follow."""
        if row.score_prompt:  # the same pass, keeping every position's logits
            scored = row.memory.feed(row.prompt_ids, origin=row.origin, all_logits=True)
            assert scored is not None
            row.prompt_logits, row.logits, unread = scored, scored[-1], 0
        else:
            row.logits, unread = row.memory.read(row.prompt_ids, origin=row.origin)
        row.prefill_s = perf_counter() - row.t0
        self.rows.append(row)
        return Started(prompt_tokens=len(row.prompt_ids), unread=unread, fill=row.memory.fill, seed=row.seed, row=row.index)

    def stop(self) -> list[Event]:
        """End every row now ("interrupted"); their `Finished` events."""
        for row in self.rows:
            row.reason = row.reason or "interrupted"
        return self._leave()

    def step(self) -> list[Event]:
        """One token for every row still running (or more, for a row alone that
        looks ahead); the events of the step, with a `Finished` for each row that
        ended in it."""
        if len(self.rows) == 1 and self.places == 1 and self.rows[0].pace is not None:
            return self._look_ahead(self.rows[0])
        tokens: list[int | None] = [None] * self.places
        lps: list[float | None] = [None] * self.places
        compute = [False] * self.places
        for row in self.rows:
            if row.reason is None and row.cancelled:
                row.reason = "interrupted"
            if row.reason is None and row.generated >= row.run.max_new_tokens:
                row.reason = "length"
            if row.reason is not None:
                continue
            logits = row.logits
            assert logits is not None  # every row has read its prompt
            history = row.memory.tokens if row.sampling.repetition_penalty != 1 else ()  # only the penalty reads it
            token = choose(logits, row.sampling, row.generator, history)
            if token == self.eos and not row.run.ignore_eos:
                row.reason = "eos"
                continue
            if row.generated == 0:
                row.first_token_s = perf_counter() - row.t0
            if row.alternatives:
                row.top = top_logprobs(logits, row.alternatives)
            tokens[row.index], lps[row.index] = token, logprob(logits, token)
            compute[row.index] = row.generated < row.run.max_new_tokens - 1  # the last token's logits are never read
        events: list[Event] = []
        if any(t is not None for t in tokens):
            before = {row.index: (row.memory.counters.evicted, row.memory.counters.recomputed) for row in self.rows}
            next_logits = self._step(tokens, lps, compute)
            for row in self.rows:
                chosen, lp = tokens[row.index], lps[row.index]
                if chosen is None or lp is None:
                    continue
                row.logits = next_logits[row.index]
                c = row.memory.counters
                evicted = c.evicted - before[row.index][0]
                if evicted:
                    events.append(Evicted(evicted=evicted, recomputed=c.recomputed - before[row.index][1], fill=row.memory.fill,
                                          row=row.index, positions=row.memory.last_evicted))
                piece, stopped = row.stop.push(row.stream.push(chosen))
                events.append(Token(index=row.generated, id=chosen, text=piece, logprob=lp, fill=row.memory.fill,
                                    evicted=evicted, row=row.index))
                row.generated += 1
                if stopped:
                    row.reason = "stop"
                elif row.generated >= row.run.max_new_tokens:
                    row.reason = "length"
        return events + self._leave()

    def _look_ahead(self, row: Row) -> list[Event]:
        """A step of a row alone that drafts (`wmgen.lookup`): the next token, and
        the draft the memory suggests after it, read in one pass; kept up to the
        first draft token that the token chosen at its place (as a plain step would
        choose it, with the same random draw) differs from. That chosen token is held
        for the next step. A draft never reaches past the memory's free slots, so
        the memory evicts exactly where a plain run's does, and a plain step is
        taken where it must evict."""
        m, run, pace = row.memory, row.run, row.pace
        assert pace is not None and row.logits is not None
        if row.cancelled or row.generated >= run.max_new_tokens:
            row.reason = row.reason or ("interrupted" if row.cancelled else "length")
            return self._leave()
        token = row.held if row.held is not None else self._choose(row, row.logits, m.tokens)
        row.held = None
        if token == self.eos and not run.ignore_eos:
            row.reason = "eos"
            return self._leave()
        if row.generated == 0:
            row.first_token_s = perf_counter() - row.t0
        left = run.max_new_tokens - row.generated - 1  # tokens still to come after this one
        room = m.capacity - m.fill - 1  # free slots after this one's
        found, matched = lookup.draft(m.tokens + [token], min(left, room)) if left > 0 and room > 0 else ([], 0)
        ids = [token] + found[: pace.length(len(found), matched)]
        lps = [logprob(row.logits, token)]
        tops = [top_logprobs(row.logits, row.alternatives) if row.alternatives else []]
        before = (m.counters.evicted, m.counters.recomputed)
        start = perf_counter()
        if len(ids) == 1:
            next_logits = m.append(token, origin=GENERATED, logprob=lps[0], compute=left > 0)
            pace.passed(1, perf_counter() - start)
            accepted = ids
        else:
            logits = m.feed(ids, origin=GENERATED, logprobs=[lps[0]] + [None] * (len(ids) - 1), all_logits=True, alone=True)
            assert logits is not None
            pace.passed(len(ids), perf_counter() - start)
            history = m.tokens
            accepted = [token]
            for i, proposed in enumerate(ids[1:]):
                chosen = self._choose(row, logits[i], history[: len(history) - len(ids) + i + 1])
                if chosen != proposed or (chosen == self.eos and not run.ignore_eos):
                    row.held = chosen
                    break
                accepted.append(chosen)
                lps.append(logprob(logits[i], chosen))
                tops.append(top_logprobs(logits[i], row.alternatives) if row.alternatives else [])
            pace.checked(matched, len(ids) - 1, len(accepted) - 1)
            m.take_back(len(ids) - len(accepted), logprobs=lps)
            next_logits = logits[len(accepted) - 1]
        row.logits = next_logits
        events: list[Event] = []
        evicted = m.counters.evicted - before[0]
        if evicted:
            events.append(Evicted(evicted=evicted, recomputed=m.counters.recomputed - before[1], fill=m.fill,
                                  row=row.index, positions=m.last_evicted))
        for n, (chosen, lp, top) in enumerate(zip(accepted, lps, tops)):
            row.top = top
            piece, stopped = row.stop.push(row.stream.push(chosen))
            events.append(Token(index=row.generated, id=chosen, text=piece, logprob=lp, fill=m.fill - (len(accepted) - 1 - n),
                                evicted=evicted if n == 0 else 0, row=row.index))
            row.generated += 1
            if stopped:  # a plain run's memory ends at the token that completed the stop text
                row.reason, row.held = "stop", None
                m.take_back(len(accepted) - 1 - n)
                break
        if row.reason is None and row.generated >= run.max_new_tokens:
            row.reason = "length"
        return events + self._leave()

    @staticmethod
    def _choose(row: Row, logits: Tensor, history: Sequence[int]) -> int:
        return choose(logits, row.sampling, row.generator, history if row.sampling.repetition_penalty != 1 else ())

    def _leave(self) -> list[Event]:
        done = [row for row in self.rows if row.reason is not None]
        self.rows = [row for row in self.rows if row.reason is None]
        return [row.finish() for row in done]


def lookup_fits(memory: WorkingMemory, sampling: Sampling) -> bool:
    """Whether a run on `memory` can look ahead and stay exact: not where the memory
    traces each step, nor under a policy that scores slots by the attention new
    tokens give them (a draft token taken back would have scored them)."""
    return memory.trace is None and not memory.policy.scores


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
