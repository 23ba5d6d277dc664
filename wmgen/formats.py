"""Weight formats: how a checkpoint's projections and tied head are held and multiplied.

A format quantizes each weight (or keeps it), names the kernels that multiply it on
this machine (`wmgen.kernels` times them and picks one per shape), builds a
projection by one of them, embeds tokens from the tied matrix, and says how far its
kernels' results may differ from each other. `GPT2` takes a format and never asks
which one it holds: a new format is a new class here.

  Float  the checkpoint's own matrices, in float32, bfloat16 or float16
  Int8   int8 weights, one scale per output channel; float32 activations
  Int4   4-bit weights, a scale and a zero point per group of 32 inputs; float32
         activations, rounded to bfloat16 at the kernel (the only dtype its fast
         path takes)

A projection is called as `proj(x, group)` with `x` `[N, in]`: `group` is how many
rows may share one activation scale (dynamic int8 only; see `Int8Linear`).
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from wmgen import kernels

GROUP = 16  # rows of one sequence that may share an activation scale (see Int8Linear)


class Projection(Protocol):
    kernel: str

    def __call__(self, x: Tensor, group: int = GROUP) -> Tensor: ...

    @property
    def nbytes(self) -> int: ...


class Embedding(Protocol):
    """Token embeddings `[N, E]` for ids `[N]`, and the bytes they hold of their own."""

    def __call__(self, ids: Tensor) -> Tensor: ...

    @property
    def nbytes(self) -> int: ...


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
        self.weight: Any = None  # the plain matrix, or
        self.packed: Any = None  # oneDNN's blocked copy
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
        self.q: Any = q
        self.scale: Any = scale
        self.bias: Any = bias
        self.packed: Any = None
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


def convert(jobs: list, work: Callable[[object], object], threads: int = 2) -> list[tuple]:
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


class Int4Weight:
    """A `[out, in]` matrix in 4 bits: `w ≈ (q - 8) * scale + zero` per group of
    `group` inputs, `q` in 0..15 held two to a byte (`nibbles` `[out, in/2]`, the
    even input in the low half), `scale` and `zero` `[out, in/group]` in bfloat16,
    the dtype the kernel takes. Asymmetric (min to max per group): the error is
    half a step of the group's range, not of twice its largest magnitude."""

    def __init__(self, nibbles: Tensor, scale: Tensor, zero: Tensor, group: int):
        self.nibbles, self.scale, self.zero, self.group = nibbles, scale, zero, group

    @classmethod
    def quantize(cls, w: Tensor, group: int) -> "Int4Weight":
        """From a float `[out, in]` matrix (`in` a multiple of `group`)."""
        rows, cols = w.shape
        g = w.float().reshape(rows, cols // group, group)
        low, high = g.amin(-1), g.amax(-1)
        # The stored (bfloat16) scale and zero are the ones the nibbles are chosen for.
        scale = ((high - low) / 15).clamp(min=torch.finfo(torch.bfloat16).tiny).to(torch.bfloat16)
        zero = (low + 8 * scale.float()).to(torch.bfloat16)
        q = torch.div(g - zero.float()[..., None], scale.float()[..., None]).round_().add_(8).clamp_(0, 15).to(torch.uint8)
        q = q.reshape(rows, cols)
        return cls((q[:, ::2] | q[:, 1::2] << 4).contiguous(), scale, zero, group)

    @property
    def shape(self) -> tuple[int, int]:
        return self.nibbles.shape[0], self.nibbles.shape[1] * 2

    @property
    def nbytes(self) -> int:
        return self.nibbles.nbytes + self.scale.nbytes + self.zero.nbytes

    def values(self, rows: Tensor | slice = slice(None)) -> Tensor:
        """`q` of `rows` as int32 `[n, in]`."""
        n = self.nibbles[rows]
        return torch.stack((n & 15, n >> 4), -1).reshape(n.shape[0], -1).to(torch.int32)

    def dequantize(self, rows: Tensor | slice = slice(None)) -> Tensor:
        """Rows of the matrix `[n, in]` in float32."""
        q = self.values(rows).float().sub_(8)
        n, cols = q.shape
        q = q.view(n, cols // self.group, self.group) * self.scale[rows].float()[..., None] + self.zero[rows].float()[..., None]
        return q.view(n, cols)

    def head(self, n: int) -> "Int4Weight":
        """Its first `n` rows (output channels)."""
        return Int4Weight(self.nibbles[:n], self.scale[:n], self.zero[:n], self.group)


class Int4Linear:
    """`x @ W + b` with `W` an `Int4Weight`, by `_weight_int4pack_mm_for_cpu`: float
    activations rounded to bfloat16 (its fast path; float32 ones take a loop ~30x
    slower) times the 4-bit weights in its blocked layout, bfloat16 out, returned
    in float32. Rows never affect each other. The kernel wants a multiple of 16
    output channels, so the matrix is padded with zero rows, sliced off the result."""

    TILE = 16

    def __init__(self, w: Int4Weight, bias: Tensor | None, *, kernel: str = "int4pack"):
        self.kernel, self.bias, self.group = kernel, bias, w.group
        self.out = w.shape[0]
        pad = -self.out % self.TILE
        q = F.pad(w.values(), (0, 0, 0, pad))
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        self.scales = F.pad(torch.stack((w.scale, w.zero), -1), (0, 0, 0, 0, 0, pad)).transpose(0, 1).contiguous()  # [in/g, out, 2]
        self.nbytes = self.packed.nbytes + self.scales.nbytes + (bias.nbytes if bias is not None else 0)

    @staticmethod
    def kernels() -> tuple[str, ...]:
        return ("int4pack",) if hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") else ()

    def __call__(self, x: Tensor, group: int = GROUP) -> Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.packed, self.group, self.scales)
        y = y[:, : self.out].float()
        return y if self.bias is None else y.add_(self.bias)


# --- token embeddings: rows of the tied matrix -----------------------------------------


class HeadRows:
    """Token embeddings read from a float head's own matrix (one copy of it)."""

    nbytes = 0  # the head's

    def __init__(self, head: Linear):
        assert head.weight is not None, "a packed head cannot give rows"
        self.head, self.weight = head, head.weight

    def __call__(self, ids: Tensor) -> Tensor:
        if self.head.kernel == "linear":
            return self.weight[ids]  # [V, E]: rows
        return self.weight[:, ids].t()


class Int8Rows:
    """Token embeddings from int8 rows and their scales, dequantized as read."""

    def __init__(self, q: Tensor, scale: Tensor, *, shared: bool):
        self.q, self.scale = q, scale
        self.nbytes = 0 if shared else q.nbytes + scale.nbytes  # shared: the head reads the same matrix

    def __call__(self, ids: Tensor) -> Tensor:
        return self.q[ids].float() * self.scale[ids, None]


class Int4Rows:
    """Token embeddings from the tied matrix's 4-bit rows, dequantized as read
    (the kernel's blocked layout cannot give a row, so the head keeps its own copy)."""

    def __init__(self, w: Int4Weight):
        self.w = w
        self.nbytes = w.nbytes

    def __call__(self, ids: Tensor) -> Tensor:
        return self.w.dequantize(ids)


# --- the formats ------------------------------------------------------------------------


class Format:
    """How weights are held (see the module's docstring). `prepare` takes one of
    GPT-2's Conv1D projections (`[in, out]` weight, bias) to what `build` takes;
    `tied` the `[V, E]` token matrix to the head's. `shape` is `(in, out)` of
    what `prepare` or `tied` made; `sample` its first `n` output channels."""

    name: str  # as --dtype says it
    kind: tuple[str, ...]  # its kernels' names (see `wmgen.kernels`)
    tolerance: float  # relative difference allowed between two of its kernels
    threads = 1  # converting weights to a kernel's layout: how many at once

    def candidates(self, device: torch.device, dtype: torch.dtype, *, head: bool = False) -> tuple[str, ...]:
        raise NotImplementedError

    def prepare(self, weight: Tensor, bias: Tensor) -> tuple:
        raise NotImplementedError

    def tied(self, wte: Tensor) -> tuple:
        raise NotImplementedError

    def build(self, kernel: str, *args) -> Projection:
        raise NotImplementedError

    def embedding(self, head_args: tuple, head: Projection) -> Embedding:
        raise NotImplementedError

    def shape(self, args: tuple) -> tuple[int, int]:
        raise NotImplementedError

    def sample(self, args: tuple, n: int) -> tuple:
        raise NotImplementedError

    def dense(self, head: Projection) -> Tensor | None:
        """The head as an `[E, V]` float matrix; None for a quantized one."""
        return None

    def batch_head(self, head: Projection) -> Projection:
        """What multiplies a few sequences' rows by the head at once."""
        return head

    def shape_key(self, args: tuple) -> str:
        inputs, outputs = self.shape(args)
        return f"{inputs}x{outputs}"


class Float(Format):
    """The checkpoint's matrices as they are (float32, bfloat16 or float16)."""

    kind = kernels.FLOAT
    tolerance = 1e-5

    def __init__(self, dtype: torch.dtype):
        self.name = str(dtype).removeprefix("torch.")
        self._batch_head: Projection | None = None

    def candidates(self, device, dtype, *, head=False):
        found = Linear.kernels(device, dtype)
        return tuple(k for k in found if k != "packed") if head else found  # embeddings read the head's plain matrix

    def prepare(self, weight, bias):
        return weight, bias

    def tied(self, wte):
        return wte.t(), None  # [E, V]: a view, copied once by the kernel that wants it

    def build(self, kernel, *args):
        return Linear(*args, kernel=kernel)

    def embedding(self, head_args, head):
        return HeadRows(head)

    def shape(self, args):
        return tuple(args[0].shape)

    def sample(self, args, n):
        weight, bias = args
        return weight[:, :n].contiguous(), bias if bias is None else bias[:n]

    def dense(self, head):
        return head.dense()

    def batch_head(self, head):
        """Through a oneDNN-packed copy of the head, made on first use (154 MB for
        gpt2, so only batched runs pay for it): for 8 rows it is ~3x faster than the
        plain matrix, which small batches read once per row. Where oneDNN is
        missing, the head itself."""
        if self._batch_head is None:
            weight = head.dense()
            packs = "packed" in Linear.kernels(weight.device, weight.dtype)
            self._batch_head = Linear(weight, None, kernel="packed", rows=8) if packs else head
        return self._batch_head


class Int8(Format):
    """int8 weights, one scale per output channel (`quantize_rows`); token
    embeddings keep their own int8 rows (the head reads them in place with
    int8pack, or packs a copy: two int8 copies, half the bytes of one float32)."""

    name = "int8"
    kind = kernels.INT8
    tolerance = 0.05  # dynamic and static activations differ by ~2%
    threads = 2  # packing runs on one core without the GIL: two at a time take ~30% less time

    def candidates(self, device, dtype, *, head=False):
        return Int8Linear.kernels()

    def prepare(self, weight, bias):
        return (*quantize_rows(weight.t()), bias)

    def tied(self, wte):
        return (*quantize_rows(wte), None)

    def build(self, kernel, *args):
        return Int8Linear(*args, kernel=kernel)

    def embedding(self, head_args, head):
        q, scale, _ = head_args
        return Int8Rows(q, scale, shared=head.kernel == "int8pack")

    def shape(self, args):
        rows, cols = args[0].shape
        return cols, rows

    def sample(self, args, n):
        q, scale, bias = args
        return q[:n], scale[:n], bias if bias is None else bias[:n]


class Int4(Format):
    """4-bit weights in groups of `GROUP` inputs (`Int4Weight`); the tied matrix
    once more in 4 bits for the token embeddings."""

    name = "int4"
    kind = kernels.INT4
    tolerance = 0.01
    GROUP = 32  # Q4's block: 32 was as fast as 128 on gpt2's shapes here, and finer

    def candidates(self, device, dtype, *, head=False):
        return Int4Linear.kernels() if device.type == "cpu" else ()

    def prepare(self, weight, bias):
        return Int4Weight.quantize(weight.t(), self.GROUP), bias

    def tied(self, wte):
        return Int4Weight.quantize(wte, self.GROUP), None

    def build(self, kernel, *args):
        return Int4Linear(*args, kernel=kernel)

    def embedding(self, head_args, head):
        return Int4Rows(head_args[0])

    def shape(self, args):
        rows, cols = args[0].shape
        return cols, rows

    def sample(self, args, n):
        w, bias = args
        return w.head(n), bias if bias is None else bias[:n]


QUANTIZED = {"int8": Int8, "int4": Int4}


def named(name: str, dtype: torch.dtype) -> Format:
    """The format `--dtype name` loads (`dtype`: the activations' dtype)."""
    return QUANTIZED[name]() if name in QUANTIZED else Float(dtype)


def available(name: str) -> bool:
    """Whether a kernel for the quantized format `name` runs here."""
    return bool(Int8Linear.kernels() if name == "int8" else Int4Linear.kernels())
