"""WorkingMemory: the bounded window of tokens the model holds in mind, and the keys
and values every layer computed for them.

At most `capacity` tokens; the first `keep` are pinned (`keep="prompt"`: as many as
the first tokens read into the empty memory). When a token arrives and the
memory is full, the oldest `evict` unpinned tokens are evicted. GPT-2's positions
are absolute, so the keys and values after the pinned head are then stale: they are
recomputed, at positions `keep..`, in the same batched forward pass that reads the
next token(s). Between evictions a token costs one incremental step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from wmgen.errors import UsageError
from wmgen.gpt2 import GPT2, KVStore
from wmgen.window import describe, fit, kv_bytes_per_token, shape

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
                 store: KVStore | None = None, tokenizer=None, model_id: str | None = None):  # fmt: skip
        self.pin_prompt = keep == "prompt"  # keep and evict are settled by the first read
        self._evict_given = evict
        self.capacity, self.keep, self.evict = shape(capacity, 0 if self.pin_prompt else keep, evict, model.config.n_positions)
        self.model = model
        self.store = store or model.new_store(capacity)  # allocated once; steps write in place
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.sampling: dict | None = None
        self.tokens: list[int] = []
        self.origins: list[str] = []
        self.logprobs: list[float | None] = []
        self.valid = 0  # leading slots whose keys/values are current
        self.counters = Counters()
        self._seen_at_forward = 0

    def _settle(self, prompt_tokens: int) -> None:
        """`keep="prompt"`: pin the first tokens read (and default `evict` to suit)."""
        if self.pin_prompt and not self.tokens:
            _, self.keep, self.evict = shape(self.capacity, prompt_tokens, self._evict_given, self.model.config.n_positions)
            self.pin_prompt = False

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def fill(self) -> int:
        return len(self.tokens)

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
            self.tokens += ids[i : i + n]
            self.origins += [origin] * n
            self.logprobs += logprobs[i : i + n]
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
        as a block: the oldest unpinned tokens, first from memory, then from the
        prompt (its pinned head, if any, stays)."""
        ids = list(ids)
        if not ids and not self.tokens:
            raise ValueError("read needs at least one token")
        self._settle(len(ids))
        before = self.fill
        dropped = max(0, before + len(ids) - self.capacity)
        self.tokens += ids
        self.origins += [origin] * len(ids)
        self.logprobs += [None] * len(ids)
        from_memory = max(0, min(dropped, before - self.keep))
        if dropped:
            cut = slice(self.keep, self.keep + dropped)
            for column in (self.tokens, self.origins, self.logprobs):
                del column[cut]
            self.valid = min(self.valid, self.keep)
        if from_memory:
            self.counters.evictions += 1
            self.counters.evicted += from_memory
        unread = dropped - from_memory
        self.counters.seen += len(ids) - unread
        return self._forward(1)[-1], unread

    def restore(self, snapshot: dict) -> int:
        """Put a snapshot's tokens back without running the model (the next pass
        computes their keys and values with its own tokens, in one batch). Tokens that
        do not fit this memory are dropped like a prompt's; returns how many."""
        if self.pin_prompt:
            raise UsageError("keep 'prompt' pins what a new memory reads first; to restore a memory, give a count", key="keep")
        slots = snapshot["slots"]
        ids, dropped = fit(range(len(slots)), self.capacity, self.keep)
        self.tokens = [slots[i]["token"] for i in ids]
        self.origins = [slots[i]["origin"] for i in ids]
        self.logprobs = [slots[i].get("logprob") for i in ids]
        self.counters = Counters(**snapshot.get("counters", {}))
        self.valid = 0
        self._seen_at_forward = self.counters.seen
        return dropped

    def snapshot(self) -> dict:
        """The memory as plain data, as session files hold it; see `wmgen.window.describe`."""
        tok = self.tokenizer
        return describe(
            self.tokens, self.origins, self.logprobs,
            capacity=self.capacity, keep=self.keep, evict=self.evict, counters=asdict(self.counters),
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
        self.valid = self.fill
        return torch.stack(per_layer)[:, 0]

    def mark_computed(self) -> None:
        """Every slot's keys and values are current (a batched step computed them)."""
        self.valid = self.fill
        self._seen_at_forward = self.counters.seen

    def _evict(self) -> None:
        drop = min(self.evict, self.fill - self.keep)
        cut = slice(self.keep, self.keep + drop)
        for column in (self.tokens, self.origins, self.logprobs):
            del column[cut]
        self.valid = min(self.valid, self.keep)
        self.counters.evictions += 1
        self.counters.evicted += drop

    @torch.inference_mode()
    def _forward(self, last: int) -> Tensor:
        """Compute keys/values for every slot from `valid` on (stale ones again,
        new ones for the first time); the float32 logits of the last `last` slots."""
        start = min(self.valid, self.fill - last)  # the logits wanted need their slots run
        ids = torch.tensor([self.tokens[start:]], device=self.model.device)
        hidden = self.model.forward(ids, start, self.store)
        # counted once the pass is done: an interrupted pass leaves them to the next
        fresh = self.counters.seen - self._seen_at_forward
        self.counters.recomputed += self.fill - start - fresh
        self._seen_at_forward = self.counters.seen
        self.valid = self.fill
        return self.model.logits(hidden[0, -last:]).float()


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
        hidden = self.model.decode_rows(
            torch.tensor(ids, device=device), torch.tensor(slots, device=device),
            torch.tensor(positions, device=device), self.store, width=max(slots[r] for r in batched) + 1,
        )  # fmt: skip
        for r in batched:
            self.rows[r].mark_computed()
        return self.model.batch_logits(hidden[batched]).float().cpu()
