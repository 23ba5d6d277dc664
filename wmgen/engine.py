"""Continuous batching of live working memories, for `wmgen serve`.

One thread, the engine's, owns the model: every running request has a row in one
`MemoryBatch`, and each step samples a token for every row and reads them all in
one batched forward pass (`generation.Loop`, the loop `--each-line` runs). Requests
join between steps (their prompts are read then, alone) and leave as soon as they
end, so a short request never waits for a long one to finish.

Named memories (sessions) live here between requests, with their keys and values,
and are saved as the command line's session files after every request that used
them, so `wmgen inspect-memory -s NAME` reads what the server holds. Two requests
for one session never run at once: the later waits for the earlier, then continues
from its result (as two turns of a chat would). Edits to a session run on the
engine's thread too, between steps.

Nothing here knows HTTP: a request is a `Job`, its events go to the `deliver`
function it was given, and errors are wmgen's own (`UsageError`, `SessionError`,
`Busy`).
"""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from time import monotonic
from typing import TYPE_CHECKING, Any

from wmgen import session as sessions
from wmgen.errors import SessionError, UsageError, WmgenError
from wmgen.events import Event, Finished

if TYPE_CHECKING:
    from wmgen.api import Model
    from wmgen.memory import WorkingMemory
    from wmgen.settings import Settings


class Busy(WmgenError):
    """The server cannot take the request now (its queue is full, or it is
    stopping); try again after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class Missing(SessionError):
    """No such session."""


@dataclass
class Ask:
    """One row a request asks for: a prompt, how to run it, and which memory.

    `memory` is "new" (a fresh memory of `shape`), "continue" (session `session`,
    which must exist) or "session" (session `session` if it exists, else a new
    one). With `save`, the memory is saved as session `session` at the end."""

    ids: list[int]
    settings: Settings  # run and sampling settings of this row
    seed: int
    shape: dict  # capacity, keep, evict, policy, recent (None: the settings' or the session's)
    memory: str = "new"
    session: str | None = None
    save: bool = False
    alternatives: int = 0  # likeliest tokens noted per step (OpenAI's logprobs)
    score_prompt: bool = False  # the prompt's own logprobs too (echo with logprobs)


@dataclass
class Job:
    """A request in the engine: its rows, and where their events go.

    `deliver(kind, row, value)` is called on the engine's thread with kind
    "event" (a wmgen event; a `Finished` comes with the save's outcome in
    `Job.saved[row]` already set), "top" (a Token's alternatives, given just
    before the Token), "prompt" (the prompt's logprobs), "error" (an exception,
    then nothing more) and "done" (row None: every row has ended)."""

    asks: list[Ask]
    deliver: Callable[[str, int | None, Any], None]
    id: str = field(default_factory=lambda: secrets.token_hex(8))
    saved: dict[int, dict] = field(default_factory=dict)
    cancelled: bool = False
    rows: list = field(default_factory=list)  # generation.Row, once running
    left: int = 0

    @property
    def session(self) -> str | None:
        """The session this job continues, which no other job may use meanwhile."""
        ask = self.asks[0]
        return ask.session if ask.memory != "new" else None

    def cancel(self) -> None:
        """Stop at the next step (the client went away); what was generated is kept."""
        self.cancelled = True
        for row in self.rows:
            row.cancelled = True


@dataclass
class Call:
    """Work on a session between steps (an edit, a read), as its only user."""

    session: str
    work: Callable[[], Any]
    future: Future


class Engine:
    """The model's thread and the rows it steps; see the module's doc.

    `rows` is the most requests' rows run at once; `queue` the most jobs waiting
    for a row (beyond it, `submit` raises `Busy`); `held` the most sessions kept
    live with their keys and values (the least recently used is let go: its file
    stays, and using it again recomputes it)."""

    def __init__(self, lm: Model, state: Path, *, rows: int = 8, queue: int = 64, held: int = 16,
                 log: Callable[[str], None] = lambda line: None):
        from wmgen.generation import Loop
        from wmgen.memory import MemoryBatch

        self.lm, self.state, self.max_rows, self.max_queue, self.max_held, self.log = lm, state, rows, queue, held, log
        network = lm.network  # read the weights now, before any request
        self.batch = MemoryBatch(network, rows, lm.n_positions, empty=True)
        self.loop = Loop(self.batch.append, rows, lm.eos_id)
        self.waiting: deque[Job | Call] = deque()
        self.running: dict[int, tuple[Job, int]] = {}  # batch row -> (job, the job's row)
        self.busy: set[str] = set()
        self.held: OrderedDict[str, WorkingMemory] = OrderedDict()
        self.stopping = False
        self.generated = 0  # tokens, in all
        self.prompt_tokens = 0
        self.finished = 0
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="wmgen-engine", daemon=True)
        self._thread.start()

    # --- from any thread --------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Queue `job`; `Busy` when the queue is full or the engine is stopping."""
        if len(job.asks) > self.max_rows:
            raise UsageError(f"the request needs {len(job.asks)} rows; this server runs at most {self.max_rows} at once "
                             "(fewer prompts, or a smaller n)")
        with self._cv:
            self._check_room()
            self.waiting.append(job)
            self._cv.notify()

    def call(self, name: str, work: Callable[[], Any]) -> Future:
        """Run `work()` on the engine's thread when session `name` is free; its result
        (or exception) in the future."""
        future: Future = Future()
        with self._cv:
            self._check_room()
            self.waiting.append(Call(name, work, future))
            self._cv.notify()
        return future

    def withdraw(self, job: Job) -> None:
        """The client left: take a waiting job out of the queue, or stop a running one."""
        with self._cv:
            if job in self.waiting:
                self.waiting.remove(job)
                return
        job.cancel()

    def shutdown(self) -> None:
        """Stop: refuse new work, end the waiting jobs ("the server is stopping") and
        the running ones at their next step ("interrupted": what was generated is
        kept, and sessions are saved), then end the thread."""
        with self._cv:
            self.stopping = True
            left = list(self.waiting)
            self.waiting.clear()
            self._cv.notify()
        for item in left:
            error = Busy("the server is stopping", retry_after=5)
            if isinstance(item, Job):
                item.deliver("error", None, error)
            else:
                item.future.set_exception(error)
        for job, _ in list(self.running.values()):
            job.cancel()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread to end; whether it has."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def queued(self) -> int:
        return len(self.waiting)

    @property
    def active_rows(self) -> int:
        return len(self.running)

    @property
    def tokens_per_s(self) -> float:
        """Tokens generated per second over the last 10 seconds."""
        now = monotonic()
        recent = [(t, n) for t, n in list(self._recent) if now - t <= 10]
        if not recent:
            return 0.0
        span = max(now - recent[0][0], 1e-3)
        return sum(n for _, n in recent) / span

    def _check_room(self) -> None:
        if self.stopping:
            raise Busy("the server is stopping", retry_after=5)
        free = max(0, self.max_rows - len(self.running))  # those start at the next step, without waiting
        if len(self.waiting) >= self.max_queue + free:
            raise Busy(f"the server is busy: {len(self.waiting)} requests are waiting; try again shortly")

    # --- the engine's thread ----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self.running and not self._startable() and not self.stopping:
                    self._cv.wait()
                if self.stopping and not self.running:
                    return
                start = self._take()
            for item in start:
                if isinstance(item, Call):
                    self._do_call(item)
                else:
                    self._start(item)
            if self.running:
                self._step()

    def _startable(self) -> bool:
        free = self.max_rows - len(self.running)
        return any(self._fits(item, free) for item in self.waiting)

    def _fits(self, item: Job | Call, free: int) -> bool:
        if item.session is not None and item.session in self.busy:
            return False
        return isinstance(item, Call) or len(item.asks) <= free

    def _take(self) -> list[Job | Call]:
        """The waiting work that can start now, in order of arrival (a job whose
        session is in use, or that needs more rows than are free, waits; the jobs
        behind it do not)."""
        free, taken = self.max_rows - len(self.running), []
        for item in list(self.waiting):
            if self._fits(item, free):
                self.waiting.remove(item)
                taken.append(item)
                if item.session is not None:
                    self.busy.add(item.session)
                if isinstance(item, Job):
                    free -= len(item.asks)
        return taken

    def _release(self, name: str | None) -> None:
        if name is not None:
            with self._cv:
                self.busy.discard(name)

    def _do_call(self, call: Call) -> None:
        try:
            call.future.set_result(call.work())
        except BaseException as e:  # the caller's to report
            call.future.set_exception(e)
        finally:
            self._release(call.session)

    def _start(self, job: Job) -> None:
        """Seat the job's rows and read their prompts; an error ends the job alone."""
        from wmgen.generation import Row

        free = [r for r in range(self.max_rows) if r not in self.running]
        seated: list[int] = []
        try:
            for k, ask in enumerate(job.asks):
                r = free[k]
                memory = self._memory_for(ask, r)
                seated.append(r)
                origin = "continued" if memory.fill else "prompt"
                row = Row(r, memory, ask.ids, ask.seed, self.lm.tokenizer, ask.settings.run, ask.settings.sampling, origin=origin)
                row.alternatives = ask.alternatives
                job.rows.append(row)
                self.running[r] = (job, k)
            job.left = len(job.rows)
            for k, row in enumerate(job.rows):
                ask = job.asks[k]
                row.score_prompt = ask.score_prompt
                started = self.loop.join(row)
                row.memory.sampling = _sampling_record(ask.settings, row.seed)
                self.prompt_tokens += len(ask.ids)
                if ask.score_prompt:
                    job.deliver("prompt", k, prompt_logprobs(row))
                    row.prompt_logits = None
                job.deliver("event", k, _renumbered(started, k))
                if job.cancelled:
                    row.cancelled = True
        except Exception as e:
            for r in seated:
                self.running.pop(r, None)
                self.batch.free(r)
            self.loop.rows = [row for row in self.loop.rows if row not in job.rows]
            self._release(job.session)
            job.deliver("error", None, e)

    def _memory_for(self, ask: Ask, r: int) -> WorkingMemory:
        """Row r's memory: a new one of the asked shape, or a copy of the session's."""
        shape = {k: v for k, v in ask.shape.items() if v is not None}
        if ask.memory != "new":
            assert ask.session is not None
            held = self._session(ask.session, shape, required=ask.memory == "continue")
            if held is not None:
                placed = self.batch.place(r, held)
                placed.loaded_from = held.loaded_from
                return placed
        s = self.lm.shape(**shape, prompt_tokens=len(ask.ids))
        return self.batch.place(r, capacity=s.capacity, keep=s.keep, evict=s.evict, policy=s.policy, recent=s.recent,
                                tokenizer=self.lm.tokenizer, model_id=self.lm.name)

    def _session(self, name: str, shape: dict, *, required: bool) -> WorkingMemory | None:
        """Session `name` as this server holds it, or as its file holds it when the
        file changed since (another wmgen saved it), reshaped when `shape` asks;
        None when there is none and it is not `required`."""
        path = sessions.path_of(self.state, name)
        try:
            record = sessions.read(self.state, name)
        except SessionError:
            if path.exists() or required:
                if not path.exists():
                    raise Missing(f"no session '{name}' on this server") from None
                raise
            self.held.pop(name, None)
            return None
        mark = sessions.fingerprint(record)
        held = self.held.get(name)
        if held is not None and held.loaded_from is not None and held.loaded_from[1] == mark and not shape:
            self.held.move_to_end(name)
            return held
        memory = self.lm.restore(record, source=f"session '{name}'", **shape)
        sessions.remember(memory, self.state, name, mark)
        return memory

    def _step(self) -> None:
        try:
            events = self.loop.step()
        except Exception as e:  # a bug: end every running job with it, keep serving
            self.log(f"error in a step: {type(e).__name__}: {e}")
            for r, (job, _) in list(self.running.items()):
                self.running.pop(r)
                self.batch.free(r)
                if job.left:
                    job.left = 0
                    self._release(job.session)
                    job.deliver("error", None, e)
            self.loop.rows = []
            return
        tokens = 0
        for event in events:
            job, k = self.running[event.row]
            row = job.rows[k]
            if isinstance(event, Finished):
                self._finish(job, k, row, event)
                continue
            if event.__class__.__name__ == "Token":
                tokens += 1
                if row.alternatives:
                    job.deliver("top", k, row.top)
            job.deliver("event", k, _renumbered(event, k))
        if tokens:
            self.generated += tokens
            now = monotonic()
            self._recent.append((now, tokens))
            while self._recent and now - self._recent[0][0] > 10:
                self._recent.popleft()

    def _finish(self, job: Job, k: int, row, event: Finished) -> None:
        ask, r = job.asks[k], row.index
        job.saved[k] = self._save(ask, row.memory) if ask.save else {"saved": False, "session": None}
        self.running.pop(r)
        self.batch.free(r)
        self.finished += 1
        job.deliver("event", k, _renumbered(event, k))
        job.left -= 1
        if not job.left:
            self._release(job.session)
            job.deliver("done", None, None)

    def _save(self, ask: Ask, memory: WorkingMemory) -> dict:
        """Save the row's memory as its session and hold it (own keys and values)."""
        assert ask.session is not None
        try:
            used, conflict = sessions.store(memory, ask.session, home=self.state, fallback=True)
        except WmgenError as e:
            self.log(f"warning: session '{ask.session}' was not saved: {e}")
            return {"saved": False, "session": None, "save_error": str(e)}
        kept = memory.fork()
        kept.loaded_from = memory.loaded_from
        self.held[used] = kept
        self.held.move_to_end(used)
        while len(self.held) > self.max_held:
            self.held.popitem(last=False)
        if conflict:
            self.log(f"warning: session '{ask.session}' was saved by another run meanwhile, so it is kept; this memory is saved as '{used}'")
        return {"saved": True, "session": used} | ({"conflict": conflict} if conflict else {})

    # --- sessions, for calls ------------------------------------------------------------

    def memory_of(self, name: str) -> WorkingMemory:
        """Session `name`, live (for an edit: on the engine's thread, in a `call`)."""
        memory = self._session(name, {}, required=True)
        assert memory is not None
        self.held[name] = memory
        self.held.move_to_end(name)
        return memory

    def forget_held(self, name: str) -> None:
        self.held.pop(name, None)


def _renumbered(event: Event, k: int) -> Event:
    """The event with `row` as the job counts its rows."""
    from dataclasses import replace

    return replace(event, row=k)


def _sampling_record(settings: Settings, seed: int) -> dict:
    from dataclasses import asdict, replace

    return asdict(replace(settings.sampling, seed=seed))


def prompt_logprobs(row) -> list:
    """Per prompt token: None for the first, then its logprob and the likeliest
    tokens at its place (`row.alternatives` of them)."""
    from wmgen.sampling import logprob, top_logprobs

    logits, ids = row.prompt_logits, row.prompt_ids
    out: list = [None]
    for i in range(1, len(ids)):
        out.append((logprob(logits[i - 1], ids[i]), top_logprobs(logits[i - 1], row.alternatives) if row.alternatives else []))
    return out


def seeds_for(seed: int | None, samples: int) -> list[int]:
    """One seed per sample of a prompt, as `--num-samples` gives them: the seed
    (drawn when None), then each next one."""
    base = seed if seed is not None else secrets.randbits(62)
    return [(base + i) % 2**63 for i in range(samples)]


def check_prompt_fits(ids: Sequence[int], capacity: int) -> None:
    if len(ids) > capacity:
        raise UsageError(f"echo with logprobs scores the whole prompt, which has {len(ids)} tokens; the memory holds {capacity}",
                         key="echo")
