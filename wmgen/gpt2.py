"""GPT-2 forward pass over a preallocated key/value store.

The weights are held in a format (`wmgen.formats`: the checkpoint's own float
tensors, used in place where the fastest kernel here takes their layout, or int8 or
int4), each shape by the kernel that runs it fastest here (`wmgen.kernels`); the
forward pass only calls them. The key/value store is allocated once for a fixed
number of slots; a forward pass over tokens at slots `start..start+T-1` writes
their keys and values there and attends to slots `0..start+T-1`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from wmgen import formats, kernels
from wmgen.formats import GROUP, Format, Projection, convert, quantized_engine
from wmgen.kernels import Choice

ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}


@dataclass(frozen=True)
class GPT2Config:
    vocab_size: int
    n_positions: int
    n_embd: int
    n_layer: int
    n_head: int
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    eos_token_id: int | None = None

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


PROJECTIONS = {"c_attn": "attn.c_attn", "c_proj": "attn.c_proj", "c_fc": "mlp.c_fc", "mlp_proj": "mlp.c_proj"}


@dataclass
class Block:
    ln_1: tuple[Tensor, Tensor]
    c_attn: Projection  # fused query/key/value projection, E -> 3E
    c_proj: Projection
    ln_2: tuple[Tensor, Tensor]
    c_fc: Projection
    mlp_proj: Projection


class KVStore:
    """Keys and values for `slots` positions of every layer, written in place.

    A batch-1 store is left unfilled: a pass reads only the slots it or an earlier
    pass wrote, so its pages are touched as tokens arrive (a short run of a 1024-slot
    gpt2 memory never touches most of its 75 MB). A batched one is zeroed: a row
    shorter than the others is masked out of their widest slots, and a masked slot
    must still hold a finite number (0 × NaN is NaN)."""

    def __init__(self, config: GPT2Config, slots: int, *, batch: int = 1, dtype, device):
        shape = (config.n_layer, batch, config.n_head, slots, config.head_dim)
        new = torch.empty if batch == 1 else torch.zeros
        self.keys = new(shape, dtype=dtype, device=device)
        self.values = new(shape, dtype=dtype, device=device)

    @property
    def slots(self) -> int:
        return self.keys.shape[3]

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def row(self, r: int) -> "KVStore":
        """Row `r` of a batched store, as a batch-1 store sharing its memory."""
        view = KVStore.__new__(KVStore)
        view.keys, view.values = self.keys[:, r : r + 1], self.values[:, r : r + 1]
        return view

    def update(self, layer: int, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write `k`, `v` `[B, H, T, D]` at slots `start..start+T-1` of `layer`; the
        keys and values of slots `0..start+T-1`, `[B, H, start+T, D]` (views)."""
        end = start + k.shape[2]
        keys, values = self.keys[layer], self.values[layer]
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        return keys[:, :, :end], values[:, :, :end]

    def update_rows(self, layer: int, slots: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write one key and value per row, `k`, `v` `[B, H, D]`, row r's at slot
        `slots[r]` of `layer`; the layer's whole keys and values `[B, H, S, D]`."""
        keys, values = self.keys[layer], self.values[layer]
        rows = torch.arange(keys.shape[0], device=keys.device)
        keys[rows, :, slots] = k.to(keys.dtype)
        values[rows, :, slots] = v.to(values.dtype)
        return keys, values

    def copy_from(self, other: "KVStore", slots: int) -> None:
        """The first `slots` keys and values of every layer, copied from `other` (a fork)."""
        self.keys[:, :, :, :slots] = other.keys[:, :, :, :slots]
        self.values[:, :, :, :slots] = other.values[:, :, :, :slots]


class GPT2:
    """The GPT-2 network as functions over its weight tensors."""

    def __init__(self, config: GPT2Config, weights: dict[str, Tensor], *, weight_format: str | Format | None = None,
                 kv_dtype: torch.dtype | None = None, forced_kernels: tuple[str, ...] = (),
                 kernel_cache: Path | None = None):
        """Takes the tensors out of `weights` as it goes (so that converted ones can
        be freed at once). Every projection and the output head are held in
        `weight_format` (`wmgen.formats`: a name, int8 or int4, or a `Format`; None:
        the weights' own dtype); layer norms and position embeddings stay as loaded.
        Keys and values are stored in `kv_dtype` (None: the activations' dtype); the
        loader decides it (`wmgen.model.kv_dtype`).

        Each shape of weight gets the kernel that runs it fastest here (see
        `wmgen.kernels`), read from `kernel_cache` or measured now and kept there
        (None: measured, not kept); the first of `forced_kernels` of the format's
        kind is used instead where given."""
        self.config = config
        self._kv_dtype = kv_dtype
        for name in list(weights):
            weights[name.removeprefix("transformer.")] = weights.pop(name)
        w = weights

        def pair(prefix: str) -> tuple[Tensor, Tensor]:
            return w.pop(f"{prefix}.weight"), w.pop(f"{prefix}.bias")

        wte = w.pop("wte.weight")  # [V, E]
        self.wpe = w.pop("wpe.weight")
        fmt = self.format = weight_format if isinstance(weight_format, Format) else formats.named(weight_format or "", self.wpe.dtype)
        self.ln_f = pair("ln_f")
        norms = [(pair(f"h.{i}.ln_1"), pair(f"h.{i}.ln_2")) for i in range(config.n_layer)]
        layers = []
        for i in range(config.n_layer):  # each layer's float weights are let go once quantized
            layers.append({part: fmt.prepare(*pair(f"h.{i}.{path}")) for part, path in PROJECTIONS.items()})
        head = fmt.tied(wte)
        del wte
        self.kernels, measured = self._choose_kernels(layers, head, forced_kernels, kernel_cache)
        chosen = self.kernels.kernels
        ready = {key: iter(made) for key, made in measured.items()}  # built while measuring: layers in order
        del measured
        self._head = fmt.build(chosen["head " + fmt.shape_key(head)], *head)
        self.embedding = fmt.embedding(head, self._head)
        del head
        made = self._convert(layers, chosen, ready)
        self.blocks = [Block(ln_1=ln_1, ln_2=ln_2, **parts) for (ln_1, ln_2), parts in zip(norms, made)]
        self.activation = ACTIVATIONS[config.activation_function]
        self.scale = 1.0 / math.sqrt(config.head_dim)

    def _convert(self, layers: list[dict], chosen: dict[str, str], ready: dict[str, Iterator]) -> list[dict]:
        """Each layer's projections (emptying `layers`) by their chosen kernels: those
        built while measuring (`ready`, per shape in layer order), the rest converted
        now, `format.threads` at a time (see `convert`; float copies one at a time:
        two at once were ~20% slower here, both threads faulting in fresh pages)."""
        fmt = self.format
        made, jobs = [{} for _ in layers], {}
        for i in range(len(layers)):
            layer, layers[i] = layers[i], None  # each source is let go as soon as it is converted
            for part, args in layer.items():
                key = fmt.shape_key(args)
                done = next(ready.get(key, iter(())), None)
                if done is not None:
                    made[i][part] = done
                else:
                    jobs.setdefault(chosen[key], []).append((i, part, args))
        while jobs:
            kernel, todo = jobs.popitem()
            with quantized_engine(kernel if kernel in formats.Int8Linear.ENGINES else None):  # torch-wide: one engine at a time
                for i, part, converted in convert(todo, lambda args, kernel=kernel: fmt.build(kernel, *args), threads=fmt.threads):
                    made[i][part] = converted
        return made

    def _choose_kernels(self, layers: list[dict], head: tuple, forced: tuple[str, ...], cache: Path | None) -> tuple[Choice, dict]:
        """A kernel per shape of projection and for the head, and the projections
        built while measuring (see `wmgen.kernels.choose`)."""
        fmt = self.format

        def role(key: str, options: tuple[str, ...], inputs: int, samples: Callable[[], list[tuple]]) -> kernels.Role:
            return kernels.Role(key, options, inputs, samples, fmt.build, fmt.tolerance, self.dtype)

        groups: dict[str, list[tuple]] = {}
        for layer in layers:
            for args in layer.values():
                groups.setdefault(fmt.shape_key(args), []).append(args)
        candidates = fmt.candidates(self.device, self.dtype)
        roles = [role(key, candidates, fmt.shape(group[0])[0], lambda g=group: kernels.sample(g, math.prod(fmt.shape(g[0]))))
                 for key, group in groups.items()]
        inputs, outputs = fmt.shape(head)
        n = max(1, kernels.SAMPLE_WEIGHTS // inputs)  # enough of the head (its first output columns) to time it out of cache
        roles.append(role("head " + fmt.shape_key(head), fmt.candidates(self.device, self.dtype, head=True), inputs,
                          lambda: [fmt.sample(head, n)]))
        weights = inputs * outputs + sum(math.prod(fmt.shape(args)) for group in groups.values() for args in group)
        unmeasured = ("kernels are measured on the CPU only" if self.device.type != "cpu" else
                      "a model this small is not measured" if weights < kernels.SMALL_WEIGHTS else
                      f"one kernel runs {fmt.name} here" if all(len(r.candidates) == 1 for r in roles) else "")
        return kernels.choose(roles, dtype=fmt.name, forced=next((k for k in forced if k in fmt.kind), None),
                              cache=cache, unmeasured=unmeasured)

    @property
    def kv_dtype(self) -> torch.dtype:
        """The dtype keys and values are stored in, as the loader decided it
        (`wmgen.model.kv_dtype`, which a preview asks too); else the activations'."""
        return self._kv_dtype or self.dtype

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of activations (float32 for quantized weights), and of keys and
        values except where `kv_dtype` says otherwise."""
        return self.wpe.dtype

    @property
    def device(self) -> torch.device:
        return self.wpe.device

    @property
    def head(self) -> Tensor | None:
        """The output head as an `[E, V]` matrix (None for quantized weights)."""
        return self.format.dense(self._head)

    @property
    def nbytes(self) -> int:
        """Bytes of weights held."""
        total = self._head.nbytes + self.embedding.nbytes + sum(t.nbytes for t in (self.wpe, *self.ln_f))
        for b in self.blocks:
            total += sum(t.nbytes for t in (*b.ln_1, *b.ln_2)) + sum(m.nbytes for m in (b.c_attn, b.c_proj, b.c_fc, b.mlp_proj))
        return total

    def new_store(self, slots: int, batch: int = 1) -> KVStore:
        return KVStore(self.config, slots, batch=batch, dtype=self.kv_dtype, device=self.device)

    def forward(
        self,
        ids: Tensor,
        start: int,
        store: KVStore,
        *,
        attn_mask: Tensor | None = None,
        attention_out: list[Tensor] | None = None,
        received: Tensor | None = None,
        queries: Sequence[int] = (),
        alone: bool = False,
    ) -> Tensor:
        """Hidden states `[B, T, E]` (after the final layer norm) for `ids` `[B, T]`
        placed at slots and positions `start..start+T-1`.

        `attn_mask`, when given, is a boolean `[B or 1, 1, T, start+T]` mask of the
        slots each query may attend to; otherwise the pass is causal. When
        `attention_out` is a list, the last query's attention weights over the
        slots, `[B, H, start+T]`, are appended to it per layer. When `received` is a
        float32 `[B, start+T]` tensor, the attention that the `queries` (indices
        into this pass's T tokens) give each slot before their own is added to it,
        summed over queries, heads and layers (causal passes only). With `alone`,
        each token's activations are quantized on their own (dynamic int8), as a
        one-token step quantizes them.
        """
        cfg = self.config
        B, T = ids.shape
        end = start + T
        if end > store.slots:
            raise ValueError(f"slots {start}..{end - 1} do not fit a store of {store.slots}")
        H, D, E = cfg.n_head, cfg.head_dim, cfg.n_embd
        x = self.embed(ids.flatten()).view(B, T, E) + self.wpe[start:end]
        if attn_mask is None and T > 1 and start > 0:
            attn_mask = causal_mask(T, start, self.device)
        causal = attn_mask is None and T > 1
        group = GROUP if B == 1 and not alone else 1  # dynamic int8 never quantizes two sequences together
        eps = cfg.layer_norm_epsilon
        scoring = received is not None and len(queries) > 0
        own = torch.full((B,), end - 1, device=self.device) if scoring and T == 1 else None
        counted = torch.tensor(list(queries), device=self.device) if scoring and T > 1 else None
        for layer, b in enumerate(self.blocks):
            h = F.layer_norm(x, (E,), *b.ln_1, eps)
            qkv = b.c_attn(h.view(B * T, E), group)
            q, k, v = qkv.view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)
            k_all, v_all = store.update(layer, start, k, v)
            q = q.to(k_all.dtype)
            if attention_out is not None:
                attention_out.append(last_query_attention(q, k_all, attn_mask, self.scale))
            if own is not None:
                a = attend_received(q, k_all, v_all, self.scale, received, own)
            else:
                if counted is not None:
                    receive(q[:, :, counted], k_all, self.scale, received, counted + start)
                a = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=attn_mask, is_causal=causal)
            a = a.transpose(1, 2).reshape(B * T, E).to(x.dtype)
            x = x + b.c_proj(a, group).view(B, T, E)
            x = x + self._mlp(b, x.view(B * T, E), group).view(B, T, E)
        return F.layer_norm(x, (E,), *self.ln_f, eps)

    def decode_rows(self, ids: Tensor, slots: Tensor, positions: Tensor, store: KVStore, width: int,
                    received: Tensor | None = None) -> Tensor:
        """One token per row of a batched store: row r's token goes to slot
        `slots[r]` at position `positions[r]` and attends to its slots
        `0..slots[r]` (of the first `width`). Hidden states `[B, E]`. `received`
        `[B, width]`, when given, gets the attention each row's query gives each of
        its slots before its own, summed over heads and layers."""
        cfg = self.config
        B, H, D, E = ids.shape[0], cfg.n_head, cfg.head_dim, cfg.n_embd
        x = self.embed(ids) + self.wpe[positions]
        seen = (torch.arange(width, device=self.device)[None, :] <= slots[:, None])[:, None, None, :]
        rounded = store.keys.dtype != x.dtype  # keys and values kept in a narrower dtype than activations
        ends = (slots + 1).tolist() if rounded else None
        eps = cfg.layer_norm_epsilon
        for layer, b in enumerate(self.blocks):
            h = F.layer_norm(x, (E,), *b.ln_1, eps)
            q, k, v = b.c_attn(h, 1).view(B, 3, H, D).unbind(1)  # rows are sequences: group 1
            keys, values = store.update_rows(layer, slots, k, v)
            q = q.to(keys.dtype)
            if received is not None:
                a = attend_received(q[:, :, None], keys[:, :, :width], values[:, :, :width], self.scale, received, slots)
            elif rounded:  # each row over its own slots, as it runs alone: rounding differs with the width
                a = torch.cat([F.scaled_dot_product_attention(q[r : r + 1, :, None], keys[r : r + 1, :, : ends[r]],
                                                              values[r : r + 1, :, : ends[r]]) for r in range(B)])
            else:
                a = F.scaled_dot_product_attention(q[:, :, None], keys[:, :, :width], values[:, :, :width], attn_mask=seen)
            x = x + b.c_proj(a.reshape(B, E).to(x.dtype), 1)
            x = x + self._mlp(b, x, 1)
        return F.layer_norm(x, (E,), *self.ln_f, eps)

    def _mlp(self, b: Block, x: Tensor, group: int) -> Tensor:
        """The feed-forward half of a block, `[N, E]` in and out (before the residual)."""
        h = F.layer_norm(x, (self.config.n_embd,), *b.ln_2, self.config.layer_norm_epsilon)
        return b.mlp_proj(self.activation(b.c_fc(h, group)), group)

    def embed(self, ids: Tensor) -> Tensor:
        """Token embeddings `[N, E]` for `ids` `[N]` (the rows of the tied head)."""
        return self.embedding(ids)

    def logits(self, hidden: Tensor, group: int = GROUP) -> Tensor:
        """Next-token logits from hidden states (the head is tied to `wte`); `group`
        as for `wmgen.formats.Int8Linear`."""
        return self._head(hidden.reshape(-1, hidden.shape[-1]), group).view(*hidden.shape[:-1], -1)

    def batch_logits(self, hidden: Tensor) -> Tensor:
        """`logits` for a few sequences' rows at once (`Format.batch_head`); rows are
        sequences, never quantized together."""
        return self.format.batch_head(self._head)(hidden, 1)


def causal_mask(T: int, start: int, device) -> Tensor:
    """`[1, 1, T, start+T]`: query i (at slot start+i) sees slots 0..start+i."""
    slots = torch.arange(start + T, device=device)
    queries = torch.arange(start, start + T, device=device)
    return (slots[None, :] <= queries[:, None])[None, None]


def last_query_attention(q: Tensor, k: Tensor, attn_mask: Tensor | None, scale: float) -> Tensor:
    """Softmax attention weights of the last query over all slots, `[B, H, S]`."""
    scores = (q[:, :, -1:] @ k.transpose(-1, -2)).float() * scale
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask[:, :, -1:], float("-inf"))
    return scores.softmax(-1)[:, :, 0]


def attend_received(q: Tensor, k: Tensor, v: Tensor, scale: float, received: Tensor, own: Tensor) -> Tensor:
    """Attention of one query per row, `q` `[B, H, 1, D]` at slot `own[r]`, over slots
    `0..own[r]` of `k`, `v` `[B, H, S, D]`, with its weights at hand: they are added
    to `received` `[B, S]` (summed over heads, the query's own slot left out), and
    the output `[B, H, 1, D]` is returned. Done by hand because the fused kernel
    does not give the weights; one pass over the keys either way."""
    slots = torch.arange(k.shape[2], device=k.device)
    scores = (q @ k.transpose(-1, -2)).float() * scale  # [B, H, 1, S]
    scores = scores.masked_fill((slots[None, :] > own[:, None])[:, None, None], float("-inf"))
    weights = scores.softmax(-1)
    received += weights[:, :, 0].sum(1).masked_fill(slots[None, :] >= own[:, None], 0)
    return weights.to(v.dtype) @ v


def receive(q: Tensor, k: Tensor, scale: float, received: Tensor, at: Tensor, chunk: int = 256) -> None:
    """Add to `received` `[B, S]` the attention that queries `q` `[B, H, T, D]`, at
    slots `at` `[T]`, give each slot before their own (causal), summed over queries
    and heads. In chunks of queries, to bound the `[T, S]` weights held."""
    S = k.shape[2]
    slots = torch.arange(S, device=k.device)
    for i in range(0, q.shape[2], chunk):
        part = q[:, :, i : i + chunk]
        own = at[i : i + chunk]
        scores = (part @ k.transpose(-1, -2)).float() * scale  # [B, H, t, S]
        weights = scores.masked_fill(slots[None, :] > own[:, None], float("-inf")).softmax(-1)
        received += weights.masked_fill(slots[None, :] >= own[:, None], 0).sum((1, 2))
