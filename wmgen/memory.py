"""WorkingMemory: the bounded window of tokens the model holds in mind, and the keys
and values every layer computed for them.

At most `capacity` tokens, one `Slot` record each. A slot may be pinned, wherever it
sits: no policy drops it (`keep` pins the first tokens read; `keep="prompt"`: as many
as the first read into the empty memory). When a token arrives and the memory is
full, its policy (`wmgen.policies`; by default the oldest) picks `evict` unpinned
tokens to evict. GPT-2's positions are absolute, so the keys and values from the
first changed slot on are then stale: the memory's `stale` is that slot, and the
next pass recomputes from it, at compacted positions, in the same batched forward
pass that reads the next token(s). Edits (forget, insert, pin, rollback) work the
same way: they change slots and move `stale` back, and nothing before it is run
again. Between changes a token costs one incremental step. Under the attention
policy every pass also credits each slot with the attention the new slots' queries
gave it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import Tensor

from wmgen import edits, policies
from wmgen.errors import UsageError
from wmgen.formats import GROUP
from wmgen.gpt2 import GPT2, KVStore
from wmgen.policies import Slot
from wmgen.snapshot import Snapshot, describe, slots_of
from wmgen.window import Shape, check_pins, fit, kv_bytes_per_token, shape

PROMPT, GENERATED, CONTINUED, INSERTED = "prompt", "generated", "continued", "inserted"


@dataclass
class Counters:
    evictions: int = 0  # eviction events
    evicted: int = 0  # tokens dropped by them
    recomputed: int = 0  # tokens whose keys/values were computed again
    seen: int = 0  # tokens read into memory, in total


@dataclass(frozen=True)
class Checkpoint:
    """A memory's state at one moment, to go back to (`WorkingMemory.rollback`)."""

    slots: tuple[Slot, ...]
    counters: Counters
    shape: Shape
    sampling: dict | None = None
    last_evicted: tuple[int, ...] = field(default=())


class WorkingMemory:
    """A bounded window of tokens and their keys and values; see the module's doc.

    `tokenizer`, `model_id` and `sampling` (the settings of the last run, with its
    seed) are what a snapshot says about the memory besides its slots; the library
    sets them. One call at a time: a memory used from two threads at once raises
    `UsageError` in the second."""

    def __init__(self, model: GPT2, capacity: int, keep: int | str = 0, evict: int | None = None, *,
                 policy: str = "oldest", recent: int | None = None, store: KVStore | None = None,
                 tokenizer=None, model_id: str | None = None):
        self.pin_prompt = keep == "prompt"  # keep, evict and recent are settled by the first read
        self._asked = (evict, policy, recent)
        self.model = model
        self.tokenizer = tokenizer
        self._reshape(shape(capacity, 0 if self.pin_prompt else keep, evict, model.config.n_positions, policy=policy, recent=recent))
        self.store = store or model.new_store(self.capacity)  # allocated once; steps write in place
        self.model_id = model_id
        self.sampling: dict | None = None
        self.slots: list[Slot] = []
        self.stale = 0  # the first slot whose keys/values are not current; all from it on are run again
        self.counters = Counters()
        self.last_evicted: tuple[int, ...] = ()  # the positions the latest eviction dropped
        self._guard = threading.Lock()
        self._user: int | None = None  # the thread using the memory now
        self.trace = None  # a `wmgen.trace.Trace` writing the memory's ledger, when one is asked for
        self.loaded_from: tuple | None = None  # (session file, its fingerprint) as read or saved: see `session.store`

    def _reshape(self, s: Shape) -> None:
        self.shape = s
        token_bytes = self.tokenizer.token_bytes if self.tokenizer is not None else None
        self.policy = policies.make(s.policy, evict=s.evict, recent=s.recent, token_bytes=token_bytes)

    def _settle(self, prompt_tokens: int) -> None:
        """`keep="prompt"`: pin the first tokens read (and default `evict` to suit)."""
        if self.pin_prompt and not self.slots:
            evict, policy, recent = self._asked
            self._reshape(shape(self.capacity, prompt_tokens, evict, self.model.config.n_positions, policy=policy, recent=recent))
            self.pin_prompt = False

    @contextmanager
    def claimed(self) -> Iterator[None]:
        """Hold the memory for one call (or one whole run, as `Model.events` does);
        another thread that tries meanwhile gets a `UsageError`, not a broken memory."""
        me = threading.get_ident()
        with self._guard:
            if self._user is not None and self._user != me:
                raise UsageError("this memory is in use by another thread; a memory serves one call at a time "
                                 "(give each thread its own, with Model.memory or WorkingMemory.fork)")
            outer = self._user is None
            self._user = me
        try:
            yield
        finally:
            if outer:
                self._user = None

    @property
    def capacity(self) -> int:
        return self.shape.capacity

    @property
    def keep(self) -> int:
        return self.shape.keep

    @property
    def evict(self) -> int:
        return self.shape.evict

    @property
    def recent(self) -> int | None:
        return self.shape.recent

    def __len__(self) -> int:
        return len(self.slots)

    @property
    def fill(self) -> int:
        return len(self.slots)

    @property
    def tokens(self) -> list[int]:
        return [s.token for s in self.slots]

    @property
    def pinned(self) -> list[int]:
        """The pinned slots' indices."""
        return [i for i, s in enumerate(self.slots) if s.pinned]

    @property
    def pending(self) -> int:
        """Slots whose keys and values the next pass computes (new or stale)."""
        return self.fill - self.stale

    @property
    def room(self) -> int:
        """How many tokens the next read takes in one pass: the free slots, or what
        the next eviction would free when the memory is full (0: pins fill it)."""
        if self.fill < self.capacity:
            return self.capacity - self.fill
        return len(self.policy.drop(self.slots, self.evict))

    @property
    def text(self) -> str:
        """The text of the tokens in memory (needs `tokenizer`)."""
        return self.tokenizer.decode(self.tokens) if self.tokenizer is not None else ""

    @property
    def kv_bytes_per_token(self) -> int:
        """What the store holds per token: a key and a value per layer, in its dtype."""
        c = self.model.config
        return kv_bytes_per_token(c.n_layer, c.n_embd, self.store.keys.dtype.itemsize)

    @property
    def kv_bytes(self) -> int:
        """Bytes of keys and values held for the tokens in memory."""
        return self.kv_bytes_per_token * self.fill

    # --- reading ---------------------------------------------------------------------

    def append(self, token: int, *, origin: str = GENERATED, logprob: float | None = None, compute: bool = True):
        """Read one token; the logits `[V]` for the token after it (None without `compute`)."""
        return self.feed([token], origin=origin, logprobs=[logprob], compute=compute)

    def feed(
        self,
        ids: Sequence[int],
        *,
        origin: str = PROMPT,
        logprobs: Sequence[float | None] | None = None,
        all_logits: bool = False,
        compute: bool = True,
        alone: bool = False,
    ) -> Tensor | None:
        """Read tokens as if appended one at a time (evicting as it goes), in as few
        batched forward passes as the evictions allow. Returns the logits for the
        token after the last one `[V]`, or with `all_logits` after each one `[T, V]`.
        With `compute=False` the tokens are only recorded (evicting as needed); the
        next pass that needs them computes their keys and values. With `alone`, no
        token's activations share a quantization scale with another's (dynamic
        int8), so each token's logits are those one-token steps would give."""
        ids = list(ids)
        if not ids:
            raise ValueError("feed needs at least one token")
        with self.claimed():
            self._settle(len(ids))
            logprobs = list(logprobs) if logprobs is not None else [None] * len(ids)
            out = []
            i = 0
            while i < len(ids):
                self._begin()  # a step of the ledger: one pass
                if self.fill == self.capacity:
                    self._evict()
                n = min(self.capacity - self.fill, len(ids) - i)
                self._add(ids[i : i + n], origin, logprobs[i : i + n])
                if compute:
                    out.append(self._forward(n if all_logits else 1, alone=alone))
                i += n
            if not compute:
                return None
            return torch.cat(out) if all_logits else out[-1][-1]

    def read(self, ids: Sequence[int], *, origin: str = PROMPT) -> tuple[Tensor, int]:
        """Read a prompt in one forward pass; the logits `[V]` for the token after it,
        and how many prompt tokens were dropped unread. What does not fit is dropped
        at once, as the policy picks, from memory and prompt alike (pinned slots and
        the prompt's last token stay). With no tokens, the logits after what the
        memory holds (computing what an edit left stale)."""
        ids = list(ids)
        if not ids and not self.slots:
            raise ValueError("read needs at least one token")
        with self.claimed():
            self._begin()
            self._settle(len(ids))
            before = self.fill
            self._add(ids, origin, [None] * len(ids))
            overflow = self.fill - self.capacity
            drop = self.policy.drop(self.slots[:-1], overflow) if overflow > 0 else []
            if len(drop) < overflow:
                raise UsageError(self._no_room(overflow))
            from_memory = sum(1 for i in drop if i < before)
            if drop:
                self._drop(drop, "evict" if from_memory else "unread")
            if from_memory:
                self.counters.evictions += 1
                self.counters.evicted += from_memory
            unread = len(drop) - from_memory
            self.counters.seen -= unread
            return self._forward(1)[-1], unread

    def take_back(self, n: int, *, logprobs: Sequence[float] = ()) -> None:
        """Drop the last `n` slots, read by the last pass and not wanted after all
        (a draft's tokens past the first the model would not choose), as if they had
        never been read; their keys and values are overwritten by the next pass.
        `logprobs`, when given, become those of the slots then last (a draft's kept
        tokens, whose log-probabilities the pass itself gave)."""
        with self.claimed():
            if n:
                del self.slots[len(self.slots) - n :]
                self.counters.seen -= n
                self.stale = min(self.stale, self.fill)
            for slot, lp in zip(self.slots[len(self.slots) - len(logprobs) :], logprobs):
                slot.logprob = lp

    def logits(self) -> Tensor:
        """The logits `[V]` for the token after what the memory holds, computing
        whatever is pending first (after an edit: from its first changed slot on)."""
        with self.claimed():
            if not self.slots:
                raise UsageError("the memory is empty: read some text first")
            return self._forward(1)[-1]

    def _add(self, ids: Sequence[int], origin: str, logprobs: Sequence[float | None], at: int | None = None) -> None:
        """New slots for `ids` (before slot `at`; default: at the end). Slots read
        into the first `keep` places are pinned."""
        at = self.fill if at is None else at
        new = [Slot(t, origin, lp, pinned=at + k < self.keep and at == self.fill, new=True) for k, (t, lp) in enumerate(zip(ids, logprobs))]
        self.slots[at:at] = new
        self.stale = min(self.stale, at)
        self.counters.seen += len(new)
        if self.trace is not None:
            self.trace.read(at, new)

    # --- editing ---------------------------------------------------------------------

    def forget(self, start: int, stop: int, *, pinned: bool = False) -> int:
        """Drop slots `start..stop-1` (as `range` counts), anywhere; a span holding a
        pinned slot only with `pinned=True`. Returns how many went. The slots after
        them are recomputed at their new positions by the next pass."""
        with self.claimed():
            before = self.slots
            self.slots = edits.forget(self.slots, start, stop, pinned=pinned)
            self.stale = min(self.stale, start)
            if self.trace is not None:
                self._begin()
                self.trace.drop(range(start, stop), before, "forget", self.shape.policy, self.fill)
            return stop - start

    def pin(self, start: int, stop: int) -> int:
        """Pin slots `start..stop-1`: no policy drops them. Returns how many were not
        pinned before. Refused when the pins would leave fewer than `evict` slots to
        roll. Nothing is recomputed."""
        with self.claimed():
            changed = edits.set_pins(self.slots, start, stop, True, capacity=self.capacity, evict=self.evict)
            self._trace_pins(start, stop, True)
            return changed

    def unpin(self, start: int, stop: int) -> int:
        """Unpin slots `start..stop-1`; returns how many were pinned."""
        with self.claimed():
            changed = edits.set_pins(self.slots, start, stop, False, capacity=self.capacity, evict=self.evict)
            self._trace_pins(start, stop, False)
            return changed

    def insert(self, index: int, ids: Sequence[int], *, origin: str = INSERTED) -> int:
        """Read `ids` into memory before slot `index` (0..fill; fill appends), as
        unpinned slots of `origin`. A full memory first evicts what its policy
        picks to make room. Returns how many slots were evicted for it."""
        with self.claimed():
            new = [Slot(t, origin, new=True) for t in ids]
            slots, drop = edits.insert(self.slots, index, new, capacity=self.capacity, policy=self.policy)
            first = next(i for i, s in enumerate(slots) if s is new[0])
            if self.trace is not None:
                self._begin()
                if drop:
                    self.trace.drop(drop, self.slots, "evict", self.shape.policy, len(slots) - len(new))
                self.trace.read(first, new)
            self.slots, self.stale = slots, min(self.stale, first, *drop)
            self.counters.seen += len(new)
            if drop:
                self.last_evicted = tuple(drop)
                self.counters.evictions += 1
                self.counters.evicted += len(drop)
            return len(drop)

    def find(self, text: str) -> list[tuple[int, int]]:
        """Where `text` occurs in memory: `(start, stop)` spans of the slots that
        hold each occurrence (as `range` counts), in order, not overlapping."""
        return edits.find([self.tokenizer.token_bytes(t) for t in self.tokens], text)

    def checkpoint(self) -> Checkpoint:
        """The memory as it is now, to `rollback` to (undo)."""
        return Checkpoint(tuple(replace(s) for s in self.slots), replace(self.counters), self.shape, self.sampling, self.last_evicted)

    def rollback(self, checkpoint: Checkpoint) -> None:
        """Go back to `checkpoint` exactly: its slots, pins, scores, counters and
        shape. Only the slots from the first one that differs from now on are
        recomputed (by the next pass)."""
        with self.claimed():
            slots = [replace(s) for s in checkpoint.slots]
            same = 0
            for now, then in zip(self.slots[: self.stale], slots):
                if now.token != then.token:
                    break
                same += 1
            self._reshape(checkpoint.shape)
            self.slots, self.stale = slots, same
            self.counters = replace(checkpoint.counters)
            self.sampling, self.last_evicted = checkpoint.sampling, checkpoint.last_evicted
            if self.trace is not None:
                self._begin()
                self.trace.restore(self.slots)

    def fork(self, *, store: KVStore | None = None, capacity: int | None = None) -> WorkingMemory:
        """A copy with its own keys and values (copied, so nothing is recomputed), in
        `store` when given (of at least `capacity` slots). With `capacity`, a memory of
        that size (at least this one's fill) holding the same slots: what
        `wmgen.forgetting` scores through to learn what an eviction cost."""
        capacity = self.capacity if capacity is None else capacity
        if capacity < self.fill:
            raise UsageError(f"a fork of capacity {capacity} cannot hold the {self.fill} slots in memory", key="capacity")
        with self.claimed():
            twin = WorkingMemory(self.model, capacity, self.keep, self.evict, policy=self.shape.policy,
                                 recent=self.recent, store=store, tokenizer=self.tokenizer, model_id=self.model_id)
            twin.pin_prompt, twin._asked = self.pin_prompt, self._asked
            twin.store.copy_from(self.store, self.stale)
            twin.slots, twin.stale = [replace(s) for s in self.slots], self.stale
            twin.counters, twin.sampling, twin.last_evicted = replace(self.counters), self.sampling, self.last_evicted
            return twin

    def set_policy(self, policy: str, recent: int | None = None) -> None:
        """Forget by another policy from now on (scores are kept for the slots)."""
        with self.claimed():
            self._reshape(shape(self.capacity, self.keep, self.evict, self.model.config.n_positions, policy=policy, recent=recent))

    def _begin(self) -> None:
        if self.trace is not None:
            self.trace.begin()

    def _trace_pins(self, start: int, stop: int, value: bool) -> None:
        if self.trace is not None:
            self._begin()
            self.trace.pin(list(range(start, stop)), value)

    def _no_room(self, need: int) -> str:
        return (f"{len(self.pinned)} pinned slots leave no room for {need} more in capacity {self.capacity}; "
                "unpin some, or raise the capacity")

    # --- as data ---------------------------------------------------------------------

    def restore(self, snapshot: Snapshot | dict) -> int:
        """Put a snapshot's tokens back without running the model (the next pass
        computes their keys and values with its own tokens, in one batch), with
        their pins and scores; when this memory pins another head than the
        snapshot's `keep`, the head pins follow this one. Tokens that do not fit
        this memory are dropped like a prompt's; returns how many."""
        if self.pin_prompt:
            raise UsageError("keep 'prompt' pins what a new memory reads first; to restore a memory, give a count", key="keep")
        with self.claimed():
            slots = slots_of(snapshot)
            if self.keep != snapshot["keep"]:
                for i, s in enumerate(slots):
                    s.pinned = i < self.keep or (s.pinned and i >= snapshot["keep"])
            check_pins(sum(s.pinned for s in slots), self.capacity, self.evict)
            self.slots, dropped = fit(slots, self.capacity, self.policy)
            self.counters = Counters(**snapshot.get("counters", {}))
            self.stale = 0
            if self.trace is not None:
                self._begin()
                self.trace.restore(self.slots)
            return dropped

    def snapshot(self) -> Snapshot:
        """The memory as plain data, as session files hold it; see `wmgen.snapshot`."""
        tok = self.tokenizer
        with self.claimed():
            return describe(
                self.slots, self.shape, counters=asdict(self.counters),
                kv_bytes_per_token=self.kv_bytes_per_token, token_text=tok.token_text if tok else None,
                model=self.model_id, tokenizer=tok.fingerprint if tok else None, sampling=self.sampling, text=self.text,
            )

    @torch.inference_mode()
    def attention(self) -> Tensor:
        """How the last slot's query (the one that predicts the next token) spreads
        its attention over the slots: `[layers, heads, fill]`, rows summing to 1.
        Runs only what is pending (and the last slot)."""
        per_layer: list[Tensor] = []
        with self.claimed():
            if not self.slots:
                raise UsageError("the memory is empty: nothing to attend to")
            self._forward(1, attention_out=per_layer)
        return torch.stack(per_layer)[:, 0]

    def mark_computed(self) -> None:
        """Every slot's keys and values are current (a batched step computed them)."""
        for s in self.slots[self.stale :]:
            s.new = False
        self.stale = self.fill

    # --- the engine ------------------------------------------------------------------

    def _evict(self) -> None:
        drop = self.policy.drop(self.slots, self.evict)
        if not drop:
            raise UsageError(self._no_room(1))
        self._drop(drop, "evict")
        self.last_evicted = tuple(drop)
        self.counters.evictions += 1
        self.counters.evicted += len(drop)

    def _drop(self, indices: Sequence[int], why: str) -> None:
        """Forget the slots at `indices` (ascending); from the first of them on, the
        keys and values no longer sit at their slots' positions."""
        gone = set(indices)
        before = self.slots
        self.slots = [s for i, s in enumerate(self.slots) if i not in gone]
        if self.trace is not None:
            self.trace.drop(indices, before, why, self.shape.policy, self.fill)
        self.stale = min(self.stale, indices[0])

    @torch.inference_mode()
    def _forward(self, last: int, attention_out: list[Tensor] | None = None, alone: bool = False) -> Tensor:
        """Compute keys/values for every slot from `stale` on (stale ones again, new
        ones for the first time); the float32 logits of the last `last` slots."""
        start = min(self.stale, self.fill - last)  # the logits wanted need their slots run
        ids = torch.tensor([self.tokens[start:]], device=self.model.device)
        fresh = [i for i in range(start, self.fill) if self.slots[i].new]
        received = torch.zeros(1, self.fill, device=self.model.device) if self.policy.scores and fresh else None
        hidden = self.model.forward(ids, start, self.store, received=received, queries=[i - start for i in fresh],
                                    attention_out=attention_out, alone=alone)
        # counted once the pass is done: an interrupted pass leaves them to the next
        self.counters.recomputed += self.fill - start - len(fresh)
        self.mark_computed()
        if received is not None:
            self.credit(received[0], fresh)
        return self.model.logits(hidden[0, -last:], group=1 if alone else GROUP).float()

    def credit(self, received: Tensor, new: Sequence[int]) -> None:
        """Add to each slot the attention the queries of the slots `new` gave it:
        `received` `[fill]`, summed over those queries, layers and heads; each slot
        counts the new queries after it."""
        c = self.model.config
        shares = (received / (c.n_layer * c.n_head)).tolist()
        if self.trace is not None:
            self.trace.received(shares)
        fresh, later = set(new), 0
        for j in range(self.fill - 1, -1, -1):
            slot = self.slots[j]
            slot.attention += shares[j]
            slot.queries += later
            later += j in fresh


class MemoryBatch:
    """Working memories that share one key/value store, a row each, so that a step
    for all of them is one batched forward pass (the weights are read once for all
    rows). Each row is a full `WorkingMemory`: prompts, evictions and recomputes run
    row by row; only the plain incremental steps are batched. The store has one slot
    beyond `capacity`, where rows that sit a batched step out write harmlessly.

    Rows may come and go: `place(r, memory)` seats a copy of any memory of this
    model (of up to `capacity` tokens, in any shape) in row r, and `free(r)` empties
    it, so a server can batch the memories of whatever requests are running."""

    def __init__(self, model: GPT2, rows: int, capacity: int, keep: int | str | Sequence[int | str] = 0,
                 evict: int | None | Sequence[int | None] = None, *, empty: bool = False, **about):
        self.model = model
        self.capacity = capacity
        self.store = model.new_store(capacity + 1, batch=rows)
        keeps = [keep] * rows if isinstance(keep, (int, str)) else list(keep)
        evicts = [evict] * rows if evict is None or isinstance(evict, int) else list(evict)
        self.rows: list[WorkingMemory | None] = [
            None if empty else WorkingMemory(model, capacity, keeps[r], evicts[r], store=self.store.row(r), **about) for r in range(rows)
        ]

    def place(self, r: int, memory: WorkingMemory | None = None, **shape) -> WorkingMemory:
        """Seat a memory in row r: a copy of `memory` (its keys and values copied,
        nothing recomputed), or with `shape` (`capacity`, `keep`, `evict`, `policy`,
        `recent`, `tokenizer`, `model_id`) a new empty one. Returns the row's memory."""
        if self.rows[r] is not None:
            raise UsageError(f"row {r} of the batch is taken")
        store = self.store.row(r)
        if memory is None:
            placed = WorkingMemory(self.model, shape.pop("capacity"), shape.pop("keep", 0), shape.pop("evict", None), store=store, **shape)
        else:
            if memory.capacity > self.capacity:
                raise UsageError(f"a memory of capacity {memory.capacity} does not fit a batch of capacity {self.capacity}")
            placed = memory.fork(store=store)
        self.rows[r] = placed
        return placed

    def free(self, r: int) -> None:
        """Empty row r (its store is written over by the next memory placed there)."""
        self.rows[r] = None

    def append(self, tokens: Sequence[int | None], logprobs: Sequence[float | None], compute: bool | Sequence[bool] = True) -> Tensor:
        """Read `tokens[r]` into row r (None: row r sits out). The logits `[rows, V]`
        for each row's next token (rows that sat out, or whose `compute[r]` is
        false, get zeros)."""
        out = torch.zeros(len(self.rows), self.model.config.vocab_size)
        wanted = [compute] * len(self.rows) if isinstance(compute, bool) else list(compute)
        plain = [
            r for r, (m, t) in enumerate(zip(self.rows, tokens))
            if t is not None and m is not None and wanted[r] and m.fill < m.capacity and m.stale == m.fill
        ]
        batched = plain if len(plain) > 1 else []
        for r, (memory, token, lp) in enumerate(zip(self.rows, tokens, logprobs)):
            if token is None or memory is None:
                continue
            if r in batched:
                memory.feed([token], origin=GENERATED, logprobs=[lp], compute=False)
            else:  # alone: an eviction and recompute, no compute at all, or a batch of one
                logits = memory.append(token, logprob=lp, compute=wanted[r])
                if logits is not None:
                    out[r] = logits
        if batched:
            out[batched] = self._step(batched, tokens)
        return out

    @torch.inference_mode()
    def _step(self, batched: list[int], tokens) -> Tensor:
        spare = self.capacity  # the slot past capacity
        slots = [spare] * len(self.rows)
        rows = {r: row for r in batched if (row := self.rows[r]) is not None}
        for r, row in rows.items():
            slots[r] = row.fill - 1
        positions = [s if s != spare else 0 for s in slots]
        ids = [t if t is not None and r in batched else 0 for r, t in enumerate(tokens)]
        device = self.model.device
        width = max(slots[r] for r in batched) + 1
        scoring = any(row.policy.scores for row in rows.values())
        received = torch.zeros(len(self.rows), width, device=device) if scoring else None
        hidden = self.model.decode_rows(
            torch.tensor(ids, device=device), torch.tensor(slots, device=device),
            torch.tensor(positions, device=device), self.store, width=width, received=received,
        )
        for r, row in rows.items():
            row.mark_computed()
            if received is not None and row.policy.scores:
                row.credit(received[r, : row.fill], [row.fill - 1])
        return self.model.batch_logits(hidden[batched]).float().cpu()
