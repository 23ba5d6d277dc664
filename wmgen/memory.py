"""WorkingMemory: the bounded window of tokens the model holds in mind, and the keys
and values every layer computed for them.

At most `capacity` tokens, one `Slot` record each; the first `keep` are pinned
(`keep="prompt"`: as many as the first tokens read into the empty memory). When a
token arrives and the memory is full, its policy (`wmgen.policies`; by default the
oldest) picks `evict` unpinned tokens to evict. GPT-2's positions are absolute, so
the keys and values from the first evicted slot on are then stale: they are
recomputed, at compacted positions, in the same batched forward pass that reads the
next token(s). Between evictions a token costs one incremental step. Under the
attention policy every pass also credits each slot with the attention the new
tokens' queries gave it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from wmgen.errors import UsageError
from wmgen import policies
from wmgen.gpt2 import GPT2, KVStore
from wmgen.policies import Slot
from wmgen.window import Shape, describe, fit, kv_bytes_per_token, shape

PROMPT, GENERATED, CONTINUED = "prompt", "generated", "continued"


@dataclass
class Counters:
    evictions: int = 0  # eviction events
    evicted: int = 0  # tokens dropped by them
    recomputed: int = 0  # tokens whose keys/values were computed again
    seen: int = 0  # tokens read into memory, in total


class WorkingMemory:
    """A bounded window of tokens and their keys and values; see the module's doc.

    `tokenizer`, `model_id` and `sampling` (the settings of the last run, with its
    seed) are what a snapshot says about the memory besides its slots; the library
    sets them. Not thread-safe: one memory serves one run at a time."""

    def __init__(self, model: GPT2, capacity: int, keep: int | str = 0, evict: int | None = None, *,
                 policy: str = "oldest", recent: int | None = None, store: KVStore | None = None,
                 tokenizer=None, model_id: str | None = None):  # fmt: skip
        self.pin_prompt = keep == "prompt"  # keep, evict and recent are settled by the first read
        self._asked = (evict, policy, recent)
        self.model = model
        self.tokenizer = tokenizer
        self._reshape(shape(capacity, 0 if self.pin_prompt else keep, evict, model.config.n_positions, policy=policy, recent=recent))
        self.store = store or model.new_store(self.capacity)  # allocated once; steps write in place
        self.model_id = model_id
        self.sampling: dict | None = None
        self.slots: list[Slot] = []
        self.valid = 0  # leading slots whose keys/values are current
        self.counters = Counters()
        self.last_evicted: tuple[int, ...] = ()  # the positions the latest eviction dropped
        self.unrun = 0  # the newest slots, read but not yet run through the model

    def _reshape(self, s: Shape) -> None:
        self.shape = s
        token_bytes = self.tokenizer.token_bytes if self.tokenizer is not None else None
        self.policy = policies.make(s.policy, keep=s.keep, evict=s.evict, recent=s.recent, token_bytes=token_bytes)

    def _settle(self, prompt_tokens: int) -> None:
        """`keep="prompt"`: pin the first tokens read (and default `evict` to suit)."""
        if self.pin_prompt and not self.slots:
            evict, policy, recent = self._asked
            self._reshape(shape(self.capacity, prompt_tokens, evict, self.model.config.n_positions, policy=policy, recent=recent))
            self.pin_prompt = False

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
    def text(self) -> str:
        """The text of the tokens in memory (needs `tokenizer`)."""
        return self.tokenizer.decode(self.tokens) if self.tokenizer is not None else ""

    @property
    def kv_bytes_per_token(self) -> int:
        c = self.model.config
        return kv_bytes_per_token(c.n_layer, c.n_embd, self.model.dtype.itemsize)

    @property
    def kv_bytes(self) -> int:
        """Bytes of keys and values held for the tokens in memory."""
        return self.kv_bytes_per_token * self.fill

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
    ) -> Tensor | None:
        """Read tokens as if appended one at a time (evicting as it goes), in as few
        batched forward passes as the evictions allow. Returns the logits for the
        token after the last one `[V]`, or with `all_logits` after each one `[T, V]`.
        With `compute=False` the tokens are only recorded (evicting as needed); the
        next pass that needs them computes their keys and values."""
        ids = list(ids)
        if not ids:
            raise ValueError("feed needs at least one token")
        self._settle(len(ids))
        logprobs = list(logprobs) if logprobs is not None else [None] * len(ids)
        out = []
        i = 0
        while i < len(ids):
            if self.fill == self.capacity:
                self._evict()
            n = min(self.capacity - self.fill, len(ids) - i)
            self.slots += [Slot(t, origin, lp) for t, lp in zip(ids[i : i + n], logprobs[i : i + n])]
            self.unrun += n
            self.counters.seen += n
            if compute:
                out.append(self._forward(n if all_logits else 1))
            i += n
        if not compute:
            return None
        return torch.cat(out) if all_logits else out[-1][-1]

    def read(self, ids: Sequence[int], *, origin: str = PROMPT) -> tuple[Tensor, int]:
        """Read a prompt in one forward pass; the logits `[V]` for the token after it,
        and how many prompt tokens were dropped unread. What does not fit is dropped
        at once, as the policy picks, from memory and prompt alike (the pinned head
        and the prompt's last token stay)."""
        ids = list(ids)
        if not ids and not self.slots:
            raise ValueError("read needs at least one token")
        self._settle(len(ids))
        before = self.fill
        self.slots += [Slot(t, origin) for t in ids]
        self.unrun += len(ids)
        overflow = self.fill - self.capacity
        drop = self.policy.drop(self.slots[:-1], overflow) if overflow > 0 else []
        from_memory = sum(1 for i in drop if i < before)
        if drop:
            self._drop(drop)
        if from_memory:
            self.counters.evictions += 1
            self.counters.evicted += from_memory
        unread = len(drop) - from_memory
        self.counters.seen += len(ids) - unread
        return self._forward(1)[-1], unread

    def restore(self, snapshot: dict) -> int:
        """Put a snapshot's tokens back without running the model (the next pass
        computes their keys and values with its own tokens, in one batch). Tokens that
        do not fit this memory are dropped like a prompt's; returns how many."""
        if self.pin_prompt:
            raise UsageError("keep 'prompt' pins what a new memory reads first; to restore a memory, give a count", key="keep")
        slots = [Slot(s["token"], s["origin"], s.get("logprob"), *scored(s)) for s in snapshot["slots"]]
        self.slots, dropped = fit(slots, self.capacity, self.policy)
        self.counters = Counters(**snapshot.get("counters", {}))
        self.valid = 0
        self.unrun = 0  # restored slots are recomputed, not read anew
        return dropped

    def snapshot(self) -> dict:
        """The memory as plain data, as session files hold it; see `wmgen.window.describe`."""
        tok = self.tokenizer
        return describe(
            self.slots, self.shape, counters=asdict(self.counters),
            kv_bytes_per_token=self.kv_bytes_per_token, token_text=tok.token_text if tok else None,
            model=self.model_id, tokenizer=tok.fingerprint if tok else None, sampling=self.sampling, text=self.text,
        )  # fmt: skip

    @torch.inference_mode()
    def attention(self) -> Tensor:
        """How the last slot's query (the one that predicts the next token) spreads
        its attention over the slots: `[layers, heads, fill]`, rows summing to 1."""
        per_layer: list[Tensor] = []
        ids = torch.tensor([self.tokens], device=self.model.device)
        self.model.forward(ids, 0, self.store, attention_out=per_layer)
        self.unrun = 0
        self.valid = self.fill
        return torch.stack(per_layer)[:, 0]

    def mark_computed(self) -> None:
        """Every slot's keys and values are current (a batched step computed them)."""
        self.valid = self.fill
        self.unrun = 0

    def _evict(self) -> None:
        drop = self.policy.drop(self.slots, min(self.evict, self.fill - self.keep))
        self._drop(drop)
        self.last_evicted = tuple(drop)
        self.counters.evictions += 1
        self.counters.evicted += len(drop)

    def _drop(self, indices: Sequence[int]) -> None:
        """Forget the slots at `indices` (ascending); from the first of them on, the
        keys and values no longer sit at their slots' positions."""
        gone = set(indices)
        self.unrun -= sum(1 for i in gone if i >= self.fill - self.unrun)
        self.slots = [s for i, s in enumerate(self.slots) if i not in gone]
        self.valid = min(self.valid, indices[0])

    @torch.inference_mode()
    def _forward(self, last: int) -> Tensor:
        """Compute keys/values for every slot from `valid` on (stale ones again,
        new ones for the first time); the float32 logits of the last `last` slots."""
        start = min(self.valid, self.fill - last)  # the logits wanted need their slots run
        ids = torch.tensor([self.tokens[start:]], device=self.model.device)
        fresh = self.unrun
        received = torch.zeros(1, self.fill, device=self.model.device) if self.policy.scores else None
        hidden = self.model.forward(ids, start, self.store, received=received, counted=fresh)
        # counted once the pass is done: an interrupted pass leaves them to the next
        self.counters.recomputed += self.fill - start - fresh
        self.unrun = 0
        self.valid = self.fill
        if received is not None:
            self.credit(received[0], fresh)
        return self.model.logits(hidden[0, -last:]).float()

    def credit(self, received: Tensor, new: int) -> None:
        """Add to each slot the attention the last `new` slots' queries gave it:
        `received` `[fill]`, summed over those queries, layers and heads."""
        c = self.model.config
        first = self.fill - new  # the first new query's slot
        shares = (received / (c.n_layer * c.n_head)).tolist()
        for j, (slot, share) in enumerate(zip(self.slots, shares)):
            slot.attention += share
            slot.queries += new if j < first else self.fill - 1 - j


def scored(record: dict) -> tuple[float, int]:
    """A snapshot slot's attention sum and query count (none before policies were)."""
    queries = record.get("queries") or 0
    score = record.get("score")
    return (score * queries if score is not None and queries else 0.0), (queries if score is not None else 0)


class MemoryBatch:
    """Working memories that share one key/value store, a row each, so that a step
    for all of them is one batched forward pass (the weights are read once for all
    rows). Each row is a full `WorkingMemory`: prompts, evictions and recomputes run
    row by row; only the plain incremental steps are batched. The store has one slot
    beyond `capacity`, where rows that sit a batched step out write harmlessly."""

    def __init__(self, model: GPT2, rows: int, capacity: int, keep: int | str | Sequence[int | str] = 0,
                 evict: int | None | Sequence[int | None] = None, **about):  # fmt: skip
        self.model = model
        self.store = model.new_store(capacity + 1, batch=rows)
        keeps = [keep] * rows if isinstance(keep, (int, str)) else list(keep)
        evicts = [evict] * rows if evict is None or isinstance(evict, int) else list(evict)
        self.rows = [WorkingMemory(model, capacity, keeps[r], evicts[r], store=self.store.row(r), **about) for r in range(rows)]

    def append(self, tokens: Sequence[int | None], logprobs: Sequence[float | None], *, compute: bool = True) -> Tensor:
        """Read `tokens[r]` into row r (None: row r sits out). The logits `[rows, V]`
        for each row's next token (rows that sat out get zeros)."""
        out = torch.zeros(len(self.rows), self.model.config.vocab_size)
        plain = [
            r for r, (m, t) in enumerate(zip(self.rows, tokens))
            if t is not None and compute and m.fill < m.capacity and m.valid == m.fill
        ]  # fmt: skip
        batched = plain if len(plain) > 1 else []
        for r, (memory, token, lp) in enumerate(zip(self.rows, tokens, logprobs)):
            if token is None:
                continue
            if r in batched:
                memory.feed([token], origin=GENERATED, logprobs=[lp], compute=False)
            else:  # alone: an eviction and recompute, no compute at all, or a batch of one
                logits = memory.append(token, logprob=lp, compute=compute)
                if logits is not None:
                    out[r] = logits
        if batched:
            out[batched] = self._step(batched, tokens)
        return out

    @torch.inference_mode()
    def _step(self, batched: list[int], tokens) -> Tensor:
        spare = self.rows[0].capacity  # the slot past capacity
        slots = [spare] * len(self.rows)
        for r in batched:
            slots[r] = self.rows[r].fill - 1
        positions = [s if s != spare else 0 for s in slots]
        ids = [t if t is not None and r in batched else 0 for r, t in enumerate(tokens)]
        device = self.model.device
        width = max(slots[r] for r in batched) + 1
        scoring = any(self.rows[r].policy.scores for r in batched)
        received = torch.zeros(len(self.rows), width, device=device) if scoring else None
        hidden = self.model.decode_rows(
            torch.tensor(ids, device=device), torch.tensor(slots, device=device),
            torch.tensor(positions, device=device), self.store, width=width, received=received,
        )  # fmt: skip
        for r in batched:
            row = self.rows[r]
            row.mark_computed()
            if row.policy.scores:
                row.credit(received[r, : row.fill], 1)
        return self.model.batch_logits(hidden[batched]).float().cpu()
