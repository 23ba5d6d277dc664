"""GPT-2 forward pass over a preallocated key/value store.

The weights are the checkpoint's own tensors, used in place where the kernel that
runs fastest here takes them as they are (GPT-2's `Conv1D` layers store `[in, out]`
matrices, which `addmm` reads; the tied head is `wte`'s `[V, E]`, which `linear`
reads), else converted once to its layout, which replaces them (see
`wmgen.kernels`). The key/value store is allocated once for a fixed
number of slots; a forward pass over tokens at slots `start..start+T-1` writes
their keys and values there and attends to slots `0..start+T-1`.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from wmgen import kernels
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


def _can_pack() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def contiguous(t: Tensor, rows: int = 64) -> Tensor:
    """`t` with its elements in row-major order: `t` itself if they already are. The
    transpose of a row-major matrix is copied a band of `rows` of its source rows at a
    time (64 rows of gpt2's 768 fit in L2): 1.5-2x faster than `.contiguous()`, whose
    small square tiles write to a new page in every row of a wide matrix (on the CPU;
    a GPU transposes in one call)."""
    if t.is_contiguous() or t.dim() != 2 or not t.t().is_contiguous() or t.device.type != "cpu":
        return t.contiguous()
    source = t.t()
    out = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    for start in range(0, source.shape[0], rows):
        out[:, start : start + rows].copy_(source[start : start + rows].t())
    return out


class Linear:
    """`x @ W + b` for an `[in, out]` weight (GPT-2's Conv1D matrices, or the
    transposed view of the tied head), `x` of shape `[N, in]`, by one of the kernels
    `wmgen.kernels` chooses between: `addmm` on a row-major `[in, out]` matrix,
    `linear` on a row-major `[out, in]` one, or `packed` in oneDNN's blocked layout
    (which also serves a few batched rows for little more than the cost of one). The
    weight is used in place when its layout is the kernel's, else copied once into
    it; the copy replaces the original, so there is still one copy. `bias` may be
    None (the output head).
    """

    PACK = _can_pack()

    def __init__(self, weight: Tensor, bias: Tensor | None, *, kernel: str = "addmm", rows: int = 1):
        self.kernel = kernel
        self.bias = bias
        self.weight = self.packed = None
        if kernel == "packed":
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.t(), rows)  # rows: a layout hint
        elif kernel == "linear":
            self.weight = contiguous(weight.t())  # [out, in]
        else:
            self.weight = contiguous(weight)  # [in, out]

    @classmethod
    def kernels(cls, device: torch.device, dtype: torch.dtype) -> tuple[str, ...]:
        """The kernels that run here, the default first."""
        packed = cls.PACK and device.type == "cpu" and dtype == torch.float32
        return ("addmm", "linear", "packed") if packed else ("addmm", "linear")

    def __call__(self, x: Tensor, group: int = 0) -> Tensor:
        """`group` is for `Int8Linear`'s sake: float32 rows never affect each other."""
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        if self.kernel == "linear":
            return F.linear(x, self.weight, self.bias)
        return x @ self.weight if self.bias is None else torch.addmm(self.bias, x, self.weight)

    def dense(self) -> Tensor:
        """The weight as an `[in, out]` matrix (a view unless packed)."""
        if self.packed is not None:
            return self.packed.to_dense().t()
        return self.weight.t() if self.kernel == "linear" else self.weight

    @property
    def nbytes(self) -> int:
        bias = self.bias.nbytes if self.bias is not None else 0
        return (self.packed if self.packed is not None else self.weight).nbytes + bias


def int8_available() -> bool:
    """Whether any of the int8 kernels `Int8Linear` chooses between runs here: fbgemm
    (x86), oneDNN's quantized engine, or `_weight_int8pack_mm` (any CPU)."""
    return bool(Int8Linear.kernels())


def quantize_rows(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per row of `w` `[out, in]`: the int8 matrix and one float32
    scale per row, `w ≈ q * scale[:, None]`. The int8 matrix is contiguous whatever
    the layout of `w` (kernels that read it in place need its rows)."""
    high, low = w.amax(1), w.amin(1)  # in the layout of `w`: a transposed view is read in place
    scale = (torch.maximum(high, -low).float() / 127).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.div(w, scale[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return contiguous(q), scale


class Int8Linear:
    """`x @ W + b` with `W` in int8, one scale per output channel, by one of the
    kernels `wmgen.kernels` chooses between. A quarter of the bytes of float32 for a
    batch-1 step to read; results differ from float32 by quantization error
    (measured in the README).

    `fbgemm` and `onednn` are dynamic: each call quantizes `x` to 7 bits (so int8
    dot products without VNNI cannot saturate), multiplies in int32 and returns
    float32. Rows that share a call share one activation scale. So rows are
    quantized in groups of `group` (a prompt's tokens: ~30% less error than one
    scale for a whole window, at the same speed), and independent sequences one
    row at a time (`group=1`), so that a row's result never depends on the rows
    beside it. `int8pack` multiplies float activations by the int8 weights
    directly: rows never affect each other, and it reads the matrix in place.
    """

    GROUP = 16
    ENGINES = ("fbgemm", "onednn")  # the kernels that are torch's quantized engines

    def __init__(self, q: Tensor, scale: Tensor, bias: Tensor | None, *, kernel: str = "fbgemm"):
        """From `quantize_rows` of the `[out, in]` weight."""
        self.kernel = kernel
        self.nbytes = q.nbytes + scale.nbytes + (bias.nbytes if bias is not None else 0)
        self.q, self.scale, self.bias, self.packed = q, scale, bias, None
        if kernel != "int8pack":
            self.packed = _prepack(q, scale, bias, kernel)
            self.q = self.scale = self.bias = None  # the packed copy is the one kept

    @classmethod
    def from_weight(cls, weight: Tensor, bias: Tensor, *, kernel: str = "fbgemm") -> "Int8Linear":
        """From a float `[in, out]` (Conv1D) weight."""
        return cls(*quantize_rows(weight.t()), bias, kernel=kernel)

    @staticmethod
    def kernels() -> tuple[str, ...]:
        """The kernels that run here, the default first."""
        engines = torch.backends.quantized.supported_engines if hasattr(torch.ops.quantized, "linear_dynamic") else ()
        found = {"fbgemm": "fbgemm" in engines, "onednn": "onednn" in engines, "int8pack": hasattr(torch.ops.aten, "_weight_int8pack_mm")}
        return tuple(name for name, ok in found.items() if ok)

    def __call__(self, x: Tensor, group: int = GROUP) -> Tensor:
        if self.packed is None:
            y = torch.ops.aten._weight_int8pack_mm(x, self.q, self.scale)
            return y if self.bias is None else y.add_(self.bias)
        if x.shape[0] <= group:
            return torch.ops.quantized.linear_dynamic(x, self.packed, True)
        return torch.cat([torch.ops.quantized.linear_dynamic(part, self.packed, True) for part in x.split(group)])


def _prepack(q: Tensor, scale: Tensor, bias: Tensor | None, engine: str):
    """`q` and its scales in the layout of the quantized engine `engine`."""
    zero = torch.zeros(q.shape[0], dtype=torch.long)
    with quantized_engine(engine):
        with warnings.catch_warnings():  # torch flags quantized tensors as legacy; its kernels are what runs fastest here
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch._make_per_channel_quantized_tensor(q, scale.double(), zero, 0)
        return torch.ops.quantized.linear_prepack(qweight, None if bias is None else bias.float())


@contextmanager
def quantized_engine(engine: str | None):
    """Torch's quantized engine set to `engine` (None: left alone), and set back as it
    was. The setting is torch-wide: threads that pack weights at once must all have
    the same engine set around them (each then sets it to what it already is)."""
    before = torch.backends.quantized.engine
    if engine is None or engine == before:
        yield
        return
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = before


def convert(jobs: list[tuple], work: Callable[[object], object], threads: int = 2) -> list[tuple]:
    """`(*key, work(source))` for each job `(*key, source)`, in order, by `threads`
    threads taking the jobs one by one. Packing a weight for int8 runs on one core,
    without the GIL: two at a time take ~30% less time. A job is let go as soon as
    it is taken, so each source can be freed once converted, as one thread
    converting them in turn would."""
    results: list = [None] * len(jobs)
    taken = iter(range(len(jobs)))
    lock = threading.Lock()
    failed: list[BaseException] = []

    def worker() -> None:
        try:
            while not failed:
                with lock:
                    n = next(taken, None)
                    if n is None:
                        return
                    *key, source = jobs[n]
                    jobs[n] = None
                results[n] = (*key, work(source))
                del source
        except BaseException as e:  # raised in the caller's thread
            failed.append(e)

    helpers = [threading.Thread(target=worker, daemon=True) for _ in range(threads - 1)]
    for t in helpers:
        t.start()
    worker()
    for t in helpers:
        t.join()
    if failed:
        raise failed[0]
    return results


PROJECTIONS = {"c_attn": "attn.c_attn", "c_proj": "attn.c_proj", "c_fc": "mlp.c_fc", "mlp_proj": "mlp.c_proj"}


def shape_key(args: tuple, int8: bool) -> str:
    """`in x out` of a projection, from `Linear`'s `[in, out]` weight or `Int8Linear`'s `[out, in]` one."""
    rows, cols = args[0].shape
    return f"{cols}x{rows}" if int8 else f"{rows}x{cols}"


def head_key(head: tuple, int8: bool) -> str:
    return "head " + shape_key(head, int8)


def head_sample(head: tuple, int8: bool) -> tuple:
    """Enough of the head (its first output columns) to time it out of cache."""
    n = max(1, kernels.SAMPLE_WEIGHTS // head[0].shape[1 if int8 else 0])
    if int8:
        q, scale, bias = head
        return q[:n], scale[:n], bias
    weight, bias = head
    return weight[:, :n].contiguous(), bias


@dataclass
class Block:
    ln_1: tuple[Tensor, Tensor]
    c_attn: Linear | Int8Linear  # fused query/key/value projection, E -> 3E
    c_proj: Linear | Int8Linear
    ln_2: tuple[Tensor, Tensor]
    c_fc: Linear | Int8Linear
    mlp_proj: Linear | Int8Linear


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

    def __init__(self, config: GPT2Config, weights: dict[str, Tensor], *, int8: bool = False,
                 kv_dtype: torch.dtype | None = None, forced_kernels: tuple[str, ...] = (),
                 kernel_cache: Path | None = None):
        """Takes the tensors out of `weights` as it goes (so that repacked ones can be
        freed at once). With `int8`, every projection and the output head are
        quantized to int8 (`Int8Linear`); layer norms and position embeddings stay
        float32. Keys and values are stored in `kv_dtype` (None: the activations'
        dtype); the loader decides it (`wmgen.model.kv_dtype`).

        Each shape of weight gets the kernel that runs it fastest here (see
        `wmgen.kernels`), read from `kernel_cache` or measured now and kept there
        (None: measured, not kept); the first of `forced_kernels` of this kind (float
        or int8) is used instead where given."""
        self.config = config
        self.int8 = int8
        self._kv_dtype = kv_dtype
        for name in list(weights):
            weights[name.removeprefix("transformer.")] = weights.pop(name)
        w = weights

        def pair(prefix: str) -> tuple[Tensor, Tensor]:
            return w.pop(f"{prefix}.weight"), w.pop(f"{prefix}.bias")

        wte = w.pop("wte.weight")  # [V, E]
        self.wpe = w.pop("wpe.weight")
        self.ln_f = pair("ln_f")
        norms = [(pair(f"h.{i}.ln_1"), pair(f"h.{i}.ln_2")) for i in range(config.n_layer)]
        layers = [{part: pair(f"h.{i}.{path}") for part, path in PROJECTIONS.items()} for i in range(config.n_layer)]
        if int8:
            for layer in layers:  # in place: each layer's float weights are freed once quantized
                for part, (weight, bias) in list(layer.items()):
                    layer[part] = (*quantize_rows(weight.t()), bias)
            # Token embeddings keep their own int8 rows (dequantized as read); the
            # head reads them in place (int8pack) or packs a copy of its own (two
            # int8 copies, together half the bytes of the one float32 matrix).
            self.embedding, self.embedding_scale = quantize_rows(wte)
            head = (self.embedding, self.embedding_scale, None)
        else:
            # Token embeddings are the head's columns ([E, V], a copy made for the
            # addmm kernel) or rows ([V, E]), so there is one copy of the matrix.
            head = (wte.t(), None)
        del wte
        self.kernels, measured = self._choose_kernels(layers, head, forced_kernels, kernel_cache)
        chosen = self.kernels.kernels
        ready = {key: iter(made) for key, made in measured.items()}  # built while measuring: layers in order
        del measured
        build = Int8Linear if int8 else Linear
        self._head = build(*head, kernel=chosen[head_key(head, int8)])
        del head
        made = self._convert(layers, chosen, ready)
        self.blocks = [Block(ln_1=ln_1, ln_2=ln_2, **parts) for (ln_1, ln_2), parts in zip(norms, made)]
        self._batch_head: Linear | bool | None = None
        self.activation = ACTIVATIONS[config.activation_function]
        self.scale = 1.0 / math.sqrt(config.head_dim)

    def _convert(self, layers: list[dict], chosen: dict[str, str], ready: dict[str, Iterator]) -> list[dict]:
        """Each layer's projections (emptying `layers`) by their chosen kernels: those
        built while measuring (`ready`, per shape in layer order), the rest converted
        now: int8 packing two at a time (see `convert`); float copies one at a time
        (two at once were ~20% slower here: both threads fault in fresh pages)."""
        build = Int8Linear if self.int8 else Linear
        made, jobs = [{} for _ in layers], {}
        for i in range(len(layers)):
            layer, layers[i] = layers[i], None  # each source is let go as soon as it is converted
            for part, args in layer.items():
                key = shape_key(args, self.int8)
                done = next(ready.get(key, iter(())), None)
                if done is not None:
                    made[i][part] = done
                else:
                    jobs.setdefault(chosen[key], []).append((i, part, args))
        while jobs:
            kernel, todo = jobs.popitem()
            with quantized_engine(kernel if kernel in Int8Linear.ENGINES else None):  # torch-wide: one engine at a time
                for i, part, converted in convert(todo, lambda args, kernel=kernel: build(*args, kernel=kernel), threads=2 if self.int8 else 1):
                    made[i][part] = converted
        return made

    def _choose_kernels(self, layers: list[dict], head: tuple, forced: tuple[str, ...], cache: Path | None) -> tuple[Choice, dict]:
        """A kernel per shape of projection and for the head, and the projections
        built while measuring (see `wmgen.kernels.choose`)."""
        int8 = self.int8
        if int8:
            candidates = head_candidates = Int8Linear.kernels()
            build, tolerance, kind = Int8Linear, 0.05, kernels.INT8  # dynamic and static activations differ by ~2%
        else:
            candidates = Linear.kernels(self.device, self.dtype)
            head_candidates = tuple(k for k in candidates if k != "packed")  # embeddings read the head's plain matrix
            build, tolerance, kind = Linear, 1e-5, kernels.FLOAT

        def role(key: str, options: tuple[str, ...], inputs: int, samples: Callable[[], list[tuple]]) -> kernels.Role:
            return kernels.Role(key, options, inputs, samples, lambda kernel, *args: build(*args, kernel=kernel), tolerance, self.dtype)

        groups: dict[str, list[tuple]] = {}
        for layer in layers:
            for args in layer.values():
                groups.setdefault(shape_key(args, int8), []).append(args)
        inputs = 1 if int8 else 0  # the dimension of a weight that `x` meets
        roles = [role(key, candidates, group[0][0].shape[inputs], lambda g=group: kernels.sample(g, g[0][0].numel()))
                 for key, group in groups.items()]
        roles.append(role(head_key(head, int8), head_candidates, head[0].shape[inputs], lambda: [head_sample(head, int8)]))
        weights = head[0].numel() + sum(args[0].numel() for group in groups.values() for args in group)
        unmeasured = ("kernels are measured on the CPU only" if self.device.type != "cpu" else
                      "a model this small is not measured" if weights < kernels.SMALL_WEIGHTS else "")
        return kernels.choose(roles, dtype="int8" if int8 else str(self.dtype).removeprefix("torch."),
                              forced=next((k for k in forced if k in kind), None), cache=cache, unmeasured=unmeasured)

    @property
    def kv_dtype(self) -> torch.dtype:
        """The dtype keys and values are stored in, as the loader decided it
        (`wmgen.model.kv_dtype`, which a preview asks too); else the activations'."""
        return self._kv_dtype or self.dtype

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of activations (float32 in int8 mode), and of keys and values
        except where `kv_dtype` says otherwise."""
        return self.wpe.dtype

    @property
    def device(self) -> torch.device:
        return self.wpe.device

    @property
    def head(self) -> Tensor | None:
        """The output head as an `[E, V]` matrix (None in int8 mode)."""
        return None if self.int8 else self._head.dense()

    @property
    def nbytes(self) -> int:
        """Bytes of weights held."""
        if self.int8:
            head = self.embedding.nbytes + self.embedding_scale.nbytes + (self._head.nbytes if self._head.packed is not None else 0)
        else:
            head = self._head.nbytes
        total = head + sum(t.nbytes for t in (self.wpe, *self.ln_f))
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
    ) -> Tensor:
        """Hidden states `[B, T, E]` (after the final layer norm) for `ids` `[B, T]`
        placed at slots and positions `start..start+T-1`.

        `attn_mask`, when given, is a boolean `[B or 1, 1, T, start+T]` mask of the
        slots each query may attend to; otherwise the pass is causal. When
        `attention_out` is a list, the last query's attention weights over the
        slots, `[B, H, start+T]`, are appended to it per layer. When `received` is a
        float32 `[B, start+T]` tensor, the attention that the `queries` (indices
        into this pass's T tokens) give each slot before their own is added to it,
        summed over queries, heads and layers (causal passes only).
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
        group = Int8Linear.GROUP if B == 1 else 1  # int8 never quantizes two sequences together
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
        """Token embeddings `[N, E]` for `ids` `[N]` (the columns of the tied head)."""
        if self.int8:
            return self.embedding[ids].float() * self.embedding_scale[ids, None]
        if self._head.kernel == "linear":
            return self._head.weight[ids]  # [V, E]: rows
        return self._head.weight[:, ids].t()

    def logits(self, hidden: Tensor, group: int = Int8Linear.GROUP) -> Tensor:
        """Next-token logits from hidden states (the head is tied to `wte`); `group`
        as for `Int8Linear`."""
        return self._head(hidden.reshape(-1, hidden.shape[-1]), group).view(*hidden.shape[:-1], -1)

    def batch_logits(self, hidden: Tensor) -> Tensor:
        """`logits` for a few rows at once. Through a oneDNN-packed copy of the head,
        made on first use (154 MB for gpt2, so only batched runs pay for it): for
        8 rows it is ~3x faster than the plain matrix, which small batches read
        once per row."""
        if self.int8:
            return self.logits(hidden, group=1)  # rows are sequences
        if self._batch_head is None:
            packs = "packed" in Linear.kernels(self.device, self.dtype)
            self._batch_head = Linear(self.head, None, kernel="packed", rows=8) if packs else False
        if self._batch_head is False:  # no oneDNN here: share the plain matrix
            return self.logits(hidden)
        return self._batch_head(hidden)


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
