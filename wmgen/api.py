"""The public Python face of wmgen: load a model once, then generate, stream, score
and inspect through working memories. The command line and the benchmarks use this
and nothing deeper; it prints nothing and knows nothing of argv or exit codes.

    import wmgen
    lm = wmgen.load("gpt2")
    print(lm.generate("The lighthouse keeper", max_new_tokens=20, temperature=0).text)
"""

from __future__ import annotations

import json
import os
import secrets
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING

from wmgen.errors import UsageError
from wmgen.events import Event, Finished, Generation, Started, Token
from wmgen.settings import (
    Settings,
    argument,
    blame,
    callback,
    flag,
    instance,
    items,
    load_settings,
    prompt_or_ids,
    token_ids,
    utf8_text,
    whole,
)

if TYPE_CHECKING:
    from wmgen.memory import WorkingMemory
    from wmgen.perplexity import Score
    from wmgen.window import Shape

SAMPLING_KEYS = ("temperature", "top_k", "top_p", "repetition_penalty", "seed")
RUN_KEYS = ("max_new_tokens", "stop", "ignore_eos", "lookahead")
SHAPE_KEYS = ("capacity", "keep", "evict", "policy", "recent")
EMPTY_PROMPT = "the prompt is empty; give some text, or from_scratch=True to start from <|endoftext|>"


def load(model: str | None = None, *, device: str | None = None, dtype: str | None = None, config: str | None = None,
         kernels: str | None = None, **defaults) -> Model:
    """A GPT-2 checkpoint, ready to use: `model` is a hub id (`gpt2`, `distilgpt2`,
    ...) or a local folder, found by the same rules as `--model`. The tokenizer is
    read now; the weights are read on first use.

    `device` is auto, cpu, cuda or mps; `dtype` auto, float32, bfloat16, float16,
    int8 or int4. `config` is a preset name or a TOML file, applied as `--config` applies
    it; `defaults` (any of `max_new_tokens`, `temperature`, `top_k`, `top_p`,
    `repetition_penalty`, `seed`, `stop`, `ignore_eos`, `capacity`, `keep`,
    `evict`, `policy`, `recent`) override it. Left as None, a value comes from the preset (`default`
    when none is given), as on the command line. The library reads no `WMGEN_*`
    variables and no user config file.

    `kernels` forces the kernels the weights run through, as `WMGEN_KERNELS` does
    (`linear`, or one per format: `linear,onednn`; see `wmgen.kernels`).
    Left as None, the fastest are measured the first time a model's shapes are
    used on a machine, and remembered in the user's cache folder.

    Raises `UsageError` (a `ValueError`) for a bad value and `ModelError` for a
    model that cannot be found or read."""
    values = {"model": model, "device": device, "dtype": dtype, **defaults}
    unknown = sorted(set(values) - set(SAMPLING_KEYS + RUN_KEYS + SHAPE_KEYS + ("model", "device", "dtype")))
    if unknown:
        raise TypeError(f"load() got unexpected keyword arguments: {', '.join(unknown)}")
    for key, value in values.items():
        argument(key, value)  # the types a call takes; load_settings checks the values again, as flags
    values["model"] = os.fspath(model) if isinstance(model, os.PathLike) else model
    config = None if config is None else utf8_text(os.fspath(config) if isinstance(config, os.PathLike) else config, "config")
    kernels = None if kernels is None else utf8_text(kernels, "kernels")
    from wmgen.kernels import parse

    forced = parse(kernels, "kernels") if kernels else ()
    return Model(load_settings(flags=values, env={}, config=config, user_config=False, given="argument"), kernels=forced)


class Model:
    """A loaded GPT-2 checkpoint and its tokenizer.

    One `Model` serves any number of working memories, one after another or from
    several threads at once (the weights are only read; loading them on first use
    is guarded by a lock). A `WorkingMemory` is not thread-safe: one run at a time
    per memory. Token counts are tokens, times are seconds, log-probabilities are
    natural logarithms (nats)."""

    def __init__(self, settings: Settings, *, loading: Callable[[str], AbstractContextManager] | None = None,
                 kernels: Sequence[str] = ()):
        """`settings` as `wmgen.settings.load_settings` builds them; `loading(name)`
        is entered while the weights are read (the command line shows a spinner);
        `kernels` forces kernels (names from `wmgen.kernels`)."""
        from wmgen.model import load_tokenizer

        self.settings = settings
        self.info, self.tokenizer = load_tokenizer(settings.model.name)
        self.name = model_id(settings.model.name)
        self._network = None
        self._forced_kernels = tuple(kernels)
        self._loading = loading or (lambda name: nullcontext())
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<wmgen.Model {self.name} ({self.settings.model.device}, {self.settings.model.dtype})>"

    # --- the network ------------------------------------------------------------

    @property
    def network(self):
        """The network (`wmgen.gpt2.GPT2`), read from the checkpoint on first use."""
        if self._network is None:
            with self._lock:
                if self._network is None:
                    from wmgen.model import load_model
                    from wmgen.settings import kernel_cache

                    with self._loading(self.info.name):
                        self._network = load_model(self.info, device=self.settings.model.device, dtype=self.settings.model.dtype,
                                                   forced_kernels=self._forced_kernels, kernel_cache=kernel_cache(os.environ))
        return self._network

    @property
    def kernels(self):
        """The kernels the weights run through (`wmgen.kernels.Choice`): one per shape
        of weight, and whether they were measured now, read from the cache (in
        `$WMGEN_HOME`, else the user's cache folder) or forced. Reads the weights."""
        return self.network.kernels

    @property
    def n_positions(self) -> int:
        """The most tokens the model can read at once."""
        return self.info.n_positions

    @property
    def eos_id(self) -> int | None:
        eos = self.info.raw.get("eos_token_id")
        return eos if isinstance(eos, int) else self.tokenizer.eos_id

    def encode(self, text: str, *, from_scratch: bool = False) -> list[int]:
        """Token ids of `text`; `from_scratch` puts `<|endoftext|>` first (a new document)."""
        return self._ids(utf8_text(text, "text"), from_scratch, "text")

    def decode(self, ids: Sequence[int]) -> str:
        """The text of token ids."""
        return self.tokenizer.decode(token_ids(ids, self.info.vocab_size, "ids"))

    # --- working memory -----------------------------------------------------------

    def shape(self, capacity: int | None = None, keep: int | str | None = None, evict: int | None = None, *,
              policy: str | None = None, recent: int | None = None, prompt_tokens: int = 0) -> Shape:
        """A memory's `Shape` (`capacity`, `keep`, `evict`, `policy`, `recent`): the
        values given, else the settings', with the defaults filled in and checked
        against the model (no weights read); `keep="prompt"` pins `prompt_tokens`."""
        given, values = self._shape_values(capacity, keep, evict, policy, recent)
        return self._fresh_shape(given, values, whole(prompt_tokens, "prompt_tokens"))

    def memory(self, capacity: int | None = None, keep: int | str | None = None, evict: int | None = None, *,
               policy: str | None = None, recent: int | None = None) -> WorkingMemory:
        """A new, empty working memory of `capacity` tokens (default: the settings',
        else the model's limit), the first `keep` pinned (a count, or "prompt": the
        first tokens read), `evict` tokens dropped at a time when full (default: a
        quarter of capacity - keep), chosen by `policy` (oldest, boundary or
        attention; `recent`: the attention policy's untouchable recent tokens,
        default half of capacity - keep). Its keys and values are allocated now, once."""
        return self._new_memory(*self._shape_values(capacity, keep, evict, policy, recent))

    def restore(self, snapshot: dict, *, capacity: int | None = None, keep: int | None = None, evict: int | None = None,
                policy: str | None = None, recent: int | None = None, source: str = "the snapshot") -> WorkingMemory:
        """A memory holding a snapshot's tokens (their keys and values are computed
        by the next pass, with its own tokens). It keeps the snapshot's shape and
        policy (with the slots' scores) unless `capacity`, `keep`, `evict`,
        `policy` or `recent` is given; when capacity or keep change and evict is not
        given, evict takes its default (and so does recent). Tokens that no longer
        fit are dropped as the policy drops a prompt's."""
        from wmgen.memory import WorkingMemory

        snapshot = self._snapshot(snapshot, utf8_text(source, "source"))
        capacity, keep, evict, policy, recent = (argument(k, v) for k, v in zip(SHAPE_KEYS, (capacity, keep, evict, policy, recent)))
        if keep == "prompt":
            raise UsageError("keep 'prompt' pins a new memory's first tokens; a continued memory keeps a count (give a number)", key="keep")
        from wmgen.window import shape

        asked = {"capacity": capacity, "keep": keep, "evict": evict, "policy": policy, "recent": recent}
        cap = snapshot["capacity"] if capacity is None else capacity
        kept = snapshot["keep"] if keep is None else keep
        same = (cap, kept) == (snapshot["capacity"], snapshot["keep"])
        evict = snapshot["evict"] if evict is None and same else evict
        policy = snapshot.get("policy", "oldest") if policy is None else policy
        if recent is None and same and evict == snapshot["evict"]:
            recent = snapshot.get("recent")
        try:
            s = shape(cap, kept, evict, self.n_positions, policy=policy, recent=recent)
        except UsageError as e:
            if e.key is not None and asked.get(e.key) is not None:
                raise  # the caller's value
            from wmgen.errors import SessionError

            raise SessionError(f"{source} cannot be used with {self.info.name}: {e}") from None
        memory = WorkingMemory(self.network, s.capacity, s.keep, s.evict, policy=s.policy, recent=s.recent,
                               tokenizer=self.tokenizer, model_id=self.name)
        memory.restore(snapshot)
        memory.sampling = snapshot.get("sampling")
        return memory

    def _snapshot(self, snapshot, source: str) -> dict:
        """`snapshot` if this model can use it: a memory's snapshot (as
        `WorkingMemory.snapshot` and `sessions.read` give it) that holds to the session
        schema, made with this tokenizer, its tokens in the vocabulary."""
        from wmgen import session
        from wmgen.errors import SessionError
        from wmgen.snapshot import shape_of
        from wmgen.window import shape

        if not isinstance(snapshot, dict):
            raise UsageError(f"snapshot: expected a memory's snapshot (a dict), not {type(snapshot).__name__}")
        try:  # what a session file could hold: plain JSON data
            snapshot = json.loads(json.dumps(snapshot))
        except (TypeError, ValueError, RecursionError) as e:
            raise SessionError(f"{source} cannot be used: it is not plain data ({str(e)[:80]})") from None
        record = {"schema_version": session.SCHEMA_VERSION} | snapshot
        for key in ("model", "tokenizer"):  # None: a memory made without a Model (WorkingMemory itself)
            record[key] = "" if record.get(key) is None else record[key]
        try:
            session.validate(record)
        except session.OtherVersion as e:
            raise SessionError(f"{source} is of schema version {e.args[0]}; this wmgen reads {session.SCHEMA_VERSION}") from None
        except session.Unusable as e:
            raise SessionError(f"{source} cannot be used: {e}") from None
        self.check_tokenizer(snapshot, source)
        beyond = next((s for s in snapshot["slots"] if not 0 <= s["token"] < self.info.vocab_size), None)
        if beyond is not None:
            raise SessionError(f"{source} cannot be used: slot {beyond['slot']} holds token {beyond['token']}, "
                               f"outside the vocabulary of {self.info.name} (0..{self.info.vocab_size - 1})")
        s = shape_of(snapshot)
        try:
            shape(s.capacity, s.keep, s.evict, self.n_positions, policy=s.policy, recent=s.recent)
        except UsageError as e:
            raise SessionError(f"{source} cannot be used with {self.info.name}: {e}") from None
        return snapshot

    def check_tokenizer(self, snapshot: dict, source: str = "the snapshot") -> None:
        """A memory made with another tokenizer means other tokens: refuse it."""
        from wmgen.errors import SessionError

        if snapshot.get("tokenizer") not in (None, self.tokenizer.fingerprint):
            raise SessionError(f"{source} was made with another tokenizer (model {snapshot.get('model')}); use --model {snapshot.get('model')}")

    # --- generating -----------------------------------------------------------------

    def events(self, prompt: str | Sequence[int] = "", *, memory: WorkingMemory | None = None, from_scratch: bool = False,
               should_stop: Callable[[], bool] | None = None, **options) -> Iterator[Event]:
        """Generate from `prompt` (text, or token ids), yielding the events
        `--format jsonl` writes: `Started`, then per token `Token` (and `Evicted`
        when the step evicted), then `Finished`.

        With `memory`, the prompt is read after what the memory holds (as `-c` does)
        and the memory is left holding the result; without, a fresh memory is made
        (`capacity`, `keep`, `evict` may shape it). `options`: `max_new_tokens`,
        `temperature` (0 is greedy), `top_k`, `top_p`, `repetition_penalty`, `seed`,
        `stop` (a string or strings), `ignore_eos`, `lookahead` (draft tokens per step, see
        `wmgen.lookup`); the model's settings otherwise.
        `should_stop()` is asked between tokens. Stopping early (break, an exception,
        Ctrl-C) leaves the memory consistent: the tokens read so far are in it."""
        from wmgen.generation import generate
        from wmgen.memory import CONTINUED, PROMPT

        run_settings, shape = self._run(options)
        should_stop = callback(should_stop, "should_stop")
        ids = self._ids(prompt, from_scratch)
        if memory is not None:
            self._own(memory)
        if not ids and (memory is None or not memory.tokens):
            raise UsageError(EMPTY_PROMPT)
        if memory is None:
            given, values = self._shape_values(*shape)
            self._fresh_shape(given, values, len(ids))  # checked before the weights are read
            memory = self._new_memory(given, values)
        else:
            if any(v is not None for v in shape):
                raise UsageError("capacity, keep, evict, policy and recent shape a new memory; this one has its own (make another with Model.memory)")
        origin = CONTINUED if memory.tokens else PROMPT
        events = generate(memory, self.tokenizer, ids, run_settings.run, run_settings.sampling, eos_id=self.eos_id,
                          origin=origin, should_stop=should_stop or (lambda: False))
        return self._recording(events, memory, run_settings.sampling)

    @staticmethod
    def _recording(events: Iterator[Event], memory: WorkingMemory, sampling) -> Iterator[Event]:
        """The events, with the run's sampling settings (and seed) noted on the memory."""
        with memory.claimed():  # the whole run: another thread gets a UsageError, not a broken memory
            for event in events:
                if isinstance(event, Started):
                    memory.sampling = asdict(replace(sampling, seed=event.seed))
                yield event

    def stream(self, prompt: str | Sequence[int] = "", **options) -> Iterator[str]:
        """The generated text, piece by piece, exactly as the command line streams it:
        the pieces join to the whole continuation. Same arguments as `events`."""
        events = self.events(prompt, **options)  # checked now, not at the first piece
        return (event.text for event in events if isinstance(event, (Token, Finished)) and event.text)

    def generate(self, prompt: str | Sequence[int] = "", **options) -> Generation:
        """Generate and return the result: `text`, `tokens`, `logprobs` (nats),
        `reason` (length, eos, stop, interrupted), `prompt_tokens`, `unread`,
        `seed`, and `stats` (the `Finished` event: seconds, tokens/s, counters).
        Same arguments as `events`."""
        from wmgen.generation import collect

        return next(collect(self.events(prompt, **options), [prompt if isinstance(prompt, str) else self.decode(prompt)]))

    def generate_each(self, prompts: Sequence[str | Sequence[int]], *, seed: int | Sequence[int] | None = None, batch_size: int = 8,
                      from_scratch: bool = False, should_stop: Callable[[], bool] | None = None, **options) -> Iterator[Generation]:
        """Generate for several prompts, `batch_size` rows at a time (each step reads
        the weights once for all rows); results in input order, each batch's as it
        ends. Every row has its own memory, shaped for its own prompt, and its own
        sampler: `seed` (one for all rows, or one per row; drawn at random when
        None) makes each row give exactly what it gives alone with that seed.
        Same options as `events`; every argument is checked when called, before the
        first result is asked for."""
        batch_size = whole(batch_size, "batch_size", low=1, key="batch_size")
        run_settings, shape = self._run(options)
        should_stop = callback(should_stop, "should_stop")
        prompts = items(prompts, "prompts", "a list of prompts (each text or token ids)")
        ids = [self._ids(p, from_scratch, f"prompts[{i}]") for i, p in enumerate(prompts)]
        for i, row in enumerate(ids):
            if not row:
                raise UsageError(f"prompts[{i}] is empty; give some text, or from_scratch=True to start from <|endoftext|>")
        given, values = self._shape_values(*shape)
        shapes = [self._fresh_shape(given, values, len(row)) for row in ids]  # every row checked before any work
        seeds = self._seeds(seed, len(ids), run_settings.sampling.seed)
        texts = [p if isinstance(p, str) else self.decode(p) for p in prompts]
        return self._batches(ids, texts, shapes, values, seeds, run_settings, batch_size, should_stop)

    def _batches(self, ids, texts, shapes, values, seeds, run_settings, batch_size, should_stop) -> Iterator[Generation]:
        from wmgen.generation import collect, generate_batch
        from wmgen.memory import MemoryBatch

        for start in range(0, len(ids), batch_size):
            chunk = range(start, min(start + batch_size, len(ids)))
            batch = MemoryBatch(self.network, len(chunk), shapes[start].capacity, [values[1]] * len(chunk), values[2],
                                policy=values[3], recent=values[4], tokenizer=self.tokenizer, model_id=self.name)
            events = generate_batch(batch, self.tokenizer, [ids[i] for i in chunk], run_settings.run, run_settings.sampling,
                                    [seeds[i] for i in chunk], eos_id=self.eos_id, should_stop=should_stop or (lambda: False))
            done = sorted(collect(events, [texts[i] for i in chunk]), key=lambda g: g.stats.row)
            for g in done:
                yield replace(g, stats=replace(g.stats, row=start + g.stats.row))
            if should_stop is not None and should_stop():
                return

    def generate_many(self, prompts: Sequence[str | Sequence[int]], **options) -> list[Generation]:
        """`generate_each`, gathered into a list (in input order)."""
        return list(self.generate_each(prompts, **options))

    # --- scoring and inspecting -------------------------------------------------------

    def perplexity(self, text: str | Sequence[int], *, capacity: int | None = None, keep: int | None = None, evict: int | None = None,
                   policy: str | None = None, recent: int | None = None, max_tokens: int | None = None,
                   progress: Callable[[int], None] | None = None, memory: WorkingMemory | None = None,
                   cost: bool = False, bound: bool = False) -> Score:
        """Score `text` (or token ids) through a fresh working memory: every token but
        the first gets the log-probability the model gives it from what is in memory
        just before it. The `Score` has `perplexity`, `nll` (nats per token),
        `bits_per_byte`, `tokens` scored, counters and `seconds`, as `wmgen
        perplexity` prints them. `progress(n)` is called as tokens are scored.
        With `memory` (an empty one of this model's, made with `memory()`), the
        text is scored through it instead, and it is left holding the end.
        With `cost`, every eviction's cost is measured too (`Score.cost`, see
        `wmgen.forgetting`), and with `bound`, the least costly of other choices of
        slots to drop (about capacity times slower)."""
        from wmgen.perplexity import score

        ids = self._ids(text, False, "text")
        if max_tokens is not None:
            ids = ids[: whole(max_tokens, "max_tokens")]
        progress = callback(progress, "progress")
        if len(ids) < 2:
            raise UsageError(f"the text has {len(ids)} token(s); scoring needs at least 2")
        if memory is not None:
            self._own(memory)
            if memory.fill or any(v is not None for v in (capacity, keep, evict, policy, recent)):
                raise UsageError("perplexity scores through an empty memory with its own shape: give memory= or a shape, not both")
        else:
            given, values = self._shape_values(capacity, keep, evict, policy, recent)
            if values[1] == "prompt":
                with self._blame(given):
                    raise UsageError("keep 'prompt' has no meaning for perplexity; give a count", key="keep")
            memory = self._new_memory(given, values)
        cost, bound = flag(cost, "cost"), flag(bound, "bound")
        if cost or bound:
            self.check_cost(memory.shape)
        return score(memory, ids, self.tokenizer.token_bytes, progress=progress, cost=cost, bound=bound)

    def check_cost(self, s: Shape) -> None:
        """Whether the cost of forgetting can be measured for a memory of shape `s`:
        each eviction is scored again through a memory larger by what it drops
        (twice `evict` at most, under the boundary policy), which the model must read."""
        most = s.evict * (2 if s.policy == "boundary" else 1)
        if s.capacity + most > self.n_positions:
            raise UsageError(f"measuring the cost of forgetting scores through a memory {most} tokens larger than capacity "
                             f"{s.capacity}, more than {self.info.name} reads ({self.n_positions}); "
                             f"give a capacity of at most {self.n_positions - most}", key="capacity")

    def preview(self, text: str | Sequence[int], *, from_scratch: bool = False, capacity: int | None = None,
                keep: int | str | None = None, evict: int | None = None, policy: str | None = None,
                recent: int | None = None) -> dict:
        """How `text` (or token ids) would fill a new memory, as a snapshot
        (tokenizer only, no weights read), with `prompt_tokens` and `unread` (tokens
        that would not fit). It takes the shape `generate` would take, and refuses
        what `generate` would refuse, in the same words."""
        from wmgen import policies
        from wmgen.model import VALUE_BYTES, kv_dtype, store_shape
        from wmgen.settings import kernel_cache
        from wmgen.snapshot import describe
        from wmgen.window import fit, kv_bytes_per_token

        ids = self._ids(text, from_scratch, "text")
        if not ids:
            raise UsageError(EMPTY_PROMPT)
        s = self._fresh_shape(*self._shape_values(capacity, keep, evict, policy, recent), len(ids))
        policy_ = policies.make(s.policy, evict=s.evict, recent=s.recent, token_bytes=self.tokenizer.token_bytes)
        kept, unread = fit([policies.Slot(t, "prompt", pinned=i < s.keep) for i, t in enumerate(ids)], s.capacity, policy_)
        value_bytes = VALUE_BYTES[kv_dtype(self.settings.model.dtype, self.settings.model.device, store_shape(self.info),
                                           kernel_cache(os.environ))]
        snap = describe(
            kept, s, counters={"evictions": 0, "evicted": 0, "recomputed": 0, "seen": len(kept)},
            kv_bytes_per_token=kv_bytes_per_token(self.info.n_layer, self.info.n_embd, value_bytes),
            token_text=self.tokenizer.token_text, model=self.name, tokenizer=self.tokenizer.fingerprint,
            sampling=None, text=self.decode([slot.token for slot in kept]),
        )
        return snap | {"prompt_tokens": len(ids), "unread": unread}

    def attention(self, snapshot: dict, layer: int | None = None, *, source: str = "the snapshot") -> list[float]:
        """Per slot of a snapshot, the share of attention the last slot's query (the
        one that predicts the next token) gives it: the mean over heads, and over
        layers unless `layer` is given. The shares sum to 1."""
        from wmgen.memory import WorkingMemory

        snapshot = self._snapshot(snapshot, utf8_text(source, "source"))
        layer = None if layer is None else whole(layer, "layer", low=None, high=None, key="layer")
        fill = len(snapshot["slots"])
        if not fill:
            raise UsageError("the memory is empty: nothing to attend to")
        if layer is not None and not 0 <= layer < self.info.n_layer:
            raise UsageError(f"layer {layer}: the model has layers 0..{self.info.n_layer - 1}", key="layer")
        if fill > self.n_positions:
            raise UsageError(f"the memory holds {fill} tokens, more than {self.info.name} can read ({self.n_positions})")
        memory = WorkingMemory(self.network, max(2, fill), 0, 1)
        memory.restore(snapshot | {"keep": 0, "slots": [slot | {"pinned": False} for slot in snapshot["slots"]]})
        weights = memory.attention()  # [layers, heads, fill]
        picked = weights.mean(dim=(0, 1)) if layer is None else weights[layer].mean(dim=0)
        return [round(float(x), 6) for x in picked]

    # --- helpers -----------------------------------------------------------------------

    def _ids(self, prompt: str | Sequence[int], from_scratch: bool, where: str = "prompt") -> list[int]:
        """A prompt's token ids (checked: text or ids, see `settings.prompt_or_ids`)."""
        prompt = prompt_or_ids(prompt, self.info.vocab_size, where)
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        return ([self.tokenizer.eos_id] if flag(from_scratch, "from_scratch") else []) + ids

    def _own(self, memory: WorkingMemory) -> None:
        instance(memory, "wmgen.memory", "WorkingMemory", "memory")
        if memory.model is not self.network:
            raise UsageError("this memory belongs to another model; make one with this model's memory()")
        if memory.tokenizer is None:
            memory.tokenizer, memory.model_id = self.tokenizer, self.name

    def _run(self, options: dict) -> tuple[Settings, tuple]:
        """The model's settings with this call's options over them (checked), and the
        call's memory shape (None where not given)."""
        unknown = sorted(set(options) - set(SAMPLING_KEYS + RUN_KEYS + SHAPE_KEYS))
        if unknown:
            raise TypeError(f"unexpected keyword arguments: {', '.join(unknown)}")
        sampling = {k: argument(k, v) for k, v in options.items() if k in SAMPLING_KEYS and v is not None}
        run = {k: argument(k, v) for k, v in options.items() if k in RUN_KEYS and v is not None}
        s = self.settings
        settings = replace(s, sampling=replace(s.sampling, **sampling), run=replace(s.run, **run))
        shape = tuple(argument(k, options.get(k)) for k in SHAPE_KEYS)
        return settings, shape

    def _shape_values(self, capacity, keep, evict, policy=None, recent=None) -> tuple[set[str], tuple]:
        """Which shape values the caller gave (checked), and the values with the
        settings' filling in (for None, or "auto")."""
        given = {k: argument(k, v) for k, v in zip(SHAPE_KEYS, (capacity, keep, evict, policy, recent))}
        m = asdict(self.settings.memory)
        return {k for k, v in given.items() if v is not None}, tuple(m[k] if v is None else v for k, v in given.items())

    def _fresh_shape(self, given: set[str], values: tuple, prompt_tokens: int) -> Shape:
        """The shape a new memory takes for a prompt of `prompt_tokens` tokens, checked:
        the one decision `events`, `generate_each`, `shape` and `preview` make, so a
        preview refuses what a run refuses, in the same words."""
        from wmgen.window import shape

        capacity, keep, evict, policy, recent = values
        with self._blame(given):
            return shape(capacity, keep, evict, self.n_positions, prompt_tokens, policy, recent)

    def _new_memory(self, given: set[str], values: tuple) -> WorkingMemory:
        """A new, empty memory of this shape (`keep="prompt"` settles at its first read)."""
        from wmgen.memory import WorkingMemory

        self._fresh_shape(given, values, 0)  # checked before the weights are read
        capacity, keep, evict, policy, recent = values
        with self._blame(given):
            return WorkingMemory(self.network, capacity, keep, evict, policy=policy, recent=recent, tokenizer=self.tokenizer, model_id=self.name)

    @contextmanager
    def _blame(self, given: set[str]):
        """An engine error about a setting: name the settings' source for it (a flag,
        a variable, a config key) unless the caller gave the value."""
        try:
            yield
        except UsageError as e:
            if e.key is None or e.key in given:
                raise
            raise blame(e, self.settings) from None

    @staticmethod
    def _seeds(seed, rows: int, default: int | None) -> list[int]:
        """One seed per row: `seed` for all (an int; None: the settings', else drawn;
        "random": drawn), or one each (a list of ints)."""
        if seed is None or isinstance(seed, str) or hasattr(type(seed), "__index__"):
            one = default if seed is None else argument("seed", seed)
            return [secrets.randbits(62) if one is None else one] * rows
        seeds = [argument("seed", s) for s in items(seed, "seed", "a seed (an int), or one per prompt (a list of ints)")]
        if None in seeds:
            raise UsageError("seed: one seed per prompt means an int for each", key="seed")
        if len(seeds) != rows:
            raise UsageError(f"{len(seeds)} seeds for {rows} prompts; give one seed, or one per prompt", key="seed")
        return seeds


def model_id(name: str) -> str:
    """A hub id as given; a local folder as an absolute path, so `-c` works from anywhere."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else name
