"""Which kernel computes `x @ W + b` fastest on this machine, found by timing them.

A batch-1 decode step reads every weight once, so its speed is the speed at which a
kernel streams a matrix from memory, and that differs between CPUs: oneDNN's packed
layout is ~20% faster than `addmm` on an AMD EPYC (AVX2) and ~30% slower on an Intel
Xeon (AVX-512). So the first time a model's shapes are met on a machine, each
candidate is timed on the model's own weights and the fastest is used. The choice is
kept in a small JSON file, keyed by CPU model and vector extensions, threads, torch version, dtype and
shape, so later runs pay nothing.

Float kernels (GPT-2 stores its projections `[in, out]`, and the tied head `[out, in]`;
a kernel that wants the other layout makes a copy, which replaces the original):
  addmm     `addmm(b, x, W)` on a row-major `[in, out]` matrix
  linear    `F.linear` on a row-major `[out, in]` matrix
  packed    oneDNN's blocked layout, CPU float32 only (not for the head: the token
            embeddings read the head's rows, which a packed matrix cannot give)
int8 kernels (int8 weights with one scale per output channel, float activations):
  fbgemm    fbgemm's dynamic kernel: activations quantized to 7 bits per call
  onednn    oneDNN's dynamic kernel, the same quantization
  int8pack  `_weight_int8pack_mm`: float activations times the int8 weights
int4 kernels (4-bit weights, a scale and zero per group of inputs):
  int4pack  `_weight_int4pack_mm_for_cpu`: bfloat16 activations times the 4-bit
            weights in its blocked layout (measured against its float32 path,
            ~30x slower, and `_dyn_quant_matmul_4bit`, a reference loop off ARM)

Torch is imported only where a kernel is timed: `parse` serves the command line.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from wmgen import files
from wmgen.errors import UsageError

FLOAT = ("addmm", "linear", "packed")
INT8 = ("fbgemm", "onednn", "int8pack")
INT4 = ("int4pack",)
KINDS = (FLOAT, INT8, INT4)  # a format's kernels: one of each may be forced
VERSION = 1  # of the cache file's layout

# Of each shape, the first layers' weights are timed, up to this many: 24 MB in
# float32, far past L2; a round reads them in every candidate's layout, past L3.
SAMPLE_WEIGHTS = 6 << 20
# A model with fewer weights than this is not measured: they stay in the caches, so
# its steps are overhead, whatever the kernel, and timings would be noise.
SMALL_WEIGHTS = 8 << 20
ROUNDS_S = 0.25  # rounds stop after this long, once MIN_ROUNDS are done
MIN_ROUNDS, MAX_ROUNDS = 2, 8  # timed rounds, after one warm-up round
LOSING = 2.0  # a kernel this much slower than the best after two rounds is not timed again
BUSY = 0.75  # a measurement with less of its threads' time than this is not trusted
CLOSE = 0.03  # a kernel must beat the default by more than this to replace it


def parse(text: str, where: str = "WMGEN_KERNELS") -> tuple[str, ...]:
    """The kernels `text` forces: one name, or one per format (`linear,onednn`)."""
    names = tuple(name.strip() for name in text.split(","))
    known = all(any(n in kind for kind in KINDS) for n in names)
    if not known or any(sum(n in kind for n in names) > 1 for kind in KINDS):
        shown = repr(text) if len(text) <= 40 else repr(text[:40]) + "..."
        raise UsageError(f"{where}: {shown} is not a kernel choice; give one of {', '.join(sum(KINDS, ()))}, "
                         "or one float, one int8 and one int4 kernel separated by commas (linear,onednn)")
    return names


@dataclass
class Role:
    """One shape of weight a model holds: the projections of that shape in every
    layer, or the output head. `samples()` gives some of them (as `build` takes
    them; see `sample`), and `build(kernel, *sample)` a function from `x`
    `[1, inputs]` to `x @ W + b` by that kernel."""

    key: str  # "768x2304" ([in, out]), "head 768x50257"
    candidates: tuple[str, ...]  # those that run here; the first is the default
    inputs: int
    samples: Callable[[], list[tuple]]
    build: Callable[..., Callable]
    tolerance: float  # relative difference allowed from the first candidate's result
    dtype: object = None  # of the activations (a torch dtype); None: float32


@dataclass(frozen=True)
class Choice:
    """The kernel chosen per role, and how it was chosen."""

    dtype: str
    kernels: dict[str, str]  # role key -> kernel
    how: str  # measured, cached, forced, or default
    seconds: float = 0.0  # spent measuring
    path: Path | None = None
    note: str = ""  # why the defaults, or what went wrong with the cache file
    saved: bool = False  # a measured choice, written to `path`
    timings: dict[str, dict[str, float]] = field(default_factory=dict)  # role -> kernel -> µs per call, as measured now

    def __str__(self) -> str:
        chosen = " · ".join(f"{key} {kernel}" for key, kernel in self.kernels.items())
        how = {
            "measured": f"measured now in {self.seconds:.2f} s" + (f", saved in {self.path}" if self.saved else ""),
            "cached": f"read from {self.path}",
            "forced": "forced",
            "default": "defaults",
        }[self.how]
        return f"{self.dtype} {chosen} ({how}{'; ' + self.note if self.note else ''})"


def choose(roles: list[Role], *, dtype: str, forced: str | None = None, cache: Path | None = None,
           unmeasured: str = "") -> tuple[Choice, dict[str, list]]:
    """A kernel for every role: the `forced` one (the first candidate for a role
    that cannot run it), else each role's first candidate where `unmeasured` says
    why not to measure, else the cached one, else the fastest measured now (and
    cached). With the choice come the kernels built on each measured role's
    samples by its chosen kernel, in sample order, for the caller to use rather
    than build again."""
    if forced is not None:
        return _forced(roles, forced, dtype), {}
    if unmeasured:
        return Choice(dtype, {r.key: r.candidates[0] for r in roles}, "default", note=unmeasured), {}
    prefix = machine_key(dtype)
    entries, note = read_cache(cache) if cache is not None else ({}, "")
    known = {r.key: entries[f"{prefix} · {r.key}"]["kernel"] for r in roles if _usable(entries.get(f"{prefix} · {r.key}"), r)}
    todo = [r for r in roles if r.key not in known]
    if not todo:
        return Choice(dtype, known, "cached", path=cache), {}
    start = time.perf_counter()
    timings, built, share = measure_roles(todo)
    busy = share < BUSY  # a busy machine's timings say little: defaults now, measured again next time
    chosen = {r.key: r.candidates[0] if busy else fastest(timings[r.key], r.candidates[0]) for r in todo}
    saved = False
    if busy:
        note = f"the CPUs were busy (measuring had {share:.0%} of its threads' time): defaults used, not saved"
    elif cache is not None:
        entries.update({f"{prefix} · {key}": {"kernel": chosen[key], "us": timings[key]} for key in chosen})
        problem = write_cache(cache, entries)
        saved, note = not problem, "; ".join(n for n in (note, problem) if n)
    choice = Choice(dtype, {r.key: known.get(r.key) or chosen[r.key] for r in roles}, "measured",
                    time.perf_counter() - start, cache, note, saved, timings)
    return choice, {key: built[key, kernel] for key, kernel in chosen.items()}


def _forced(roles: list[Role], kernel: str, dtype: str) -> Choice:
    if not any(kernel in r.candidates for r in roles):
        runnable = sorted({k for r in roles for k in r.candidates}, key=sum(KINDS, ()).index)
        raise UsageError(f"the forced kernel {kernel!r} does not run {dtype} weights here; use one of {', '.join(runnable)}")
    return Choice(dtype, {r.key: kernel if kernel in r.candidates else r.candidates[0] for r in roles}, "forced")


def fastest(times: dict[str, float], default: str) -> str:
    """The fastest kernel, unless the default is within `CLOSE` of it: a near tie is
    noise, and the default converts nothing."""
    best = min(times, key=times.get, default=default)  # none: no candidate agreed with the default (NaN weights)
    return default if times.get(default, float("inf")) <= times[best] * (1 + CLOSE) else best


def _usable(entry, role: Role) -> bool:
    return isinstance(entry, dict) and entry.get("kernel") in role.candidates


# --- the dtype keys and values are stored in ----------------------------------------------

STORES = ("float32", "bfloat16")  # for quantized weights on a CPU with native bfloat16; float32 the default


def store_dtype(heads: int, head_dim: int, slots: int, cache: Path | None) -> Choice:
    """The dtype to keep keys and values in, timed as a step reads them: one query's
    attention over all `slots` and over a quarter of them, in float32 and in
    bfloat16 (the query cast to the store's dtype and the result back, as a step
    does). bfloat16 halves the bytes read, but whether that pays depends on the
    CPU's attention kernel: on an Intel Xeon (AVX-512 BF16) a gpt2 step at 900
    tokens was 18% shorter with it; on an AMD EPYC with the same flags it was 45%
    longer. Cached with the kernels (see `choose`)."""
    role = Role(f"attention {heads}x{head_dim}x{slots}", STORES, heads * head_dim,
                lambda: [_store_sample(heads, head_dim, slots)], _attention, tolerance=0.05)
    return choose([role], dtype="keys and values", cache=cache)[0]


def _store_sample(heads: int, head_dim: int, slots: int) -> tuple:
    import torch

    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, heads, slots, head_dim, generator=g) for _ in range(2))


def _attention(dtype: str, keys, values) -> Callable:
    """One query `x` `[1, heads * head_dim]` attending over `keys`, `values` stored in
    `dtype`: over all their slots and over the first quarter, the outputs stacked."""
    import torch
    import torch.nn.functional as F

    k, v = keys.to(getattr(torch, dtype)), values.to(getattr(torch, dtype))
    heads, slots, head_dim = k.shape[1], k.shape[2], k.shape[3]

    def attend(x):
        q = x.view(1, heads, 1, head_dim).to(k.dtype)
        return torch.cat([F.scaled_dot_product_attention(q, k[:, :, :n], v[:, :, :n]).to(x.dtype)
                          for n in (slots, max(1, slots // 4))])

    return attend


# --- timing --------------------------------------------------------------------------


def measure_roles(roles: list[Role]) -> tuple[dict[str, dict[str, float]], dict[tuple[str, str], list], float]:
    """Microseconds per call of each candidate of each role, the kernels built for
    it, and the share of its threads' time the process had (see `threads_share`). Every
    round calls every candidate on every sample in turn, so that a weight has left
    the caches by the time it is read again (as in a decode step). Candidates whose
    result differs from the default's are left out. When a first pass over the
    defaults finds the machine busy, nothing else is built or timed."""
    import torch

    with torch.inference_mode():
        xs = {r.key: torch.randn(1, r.inputs, dtype=r.dtype or torch.float32) for r in roles}
        samples = {r.key: r.samples() for r in roles}
        built = {(r.key, r.candidates[0]): [r.build(r.candidates[0], *s) for s in samples[r.key]] for r in roles}
        reference = {r.key: [f(xs[r.key]) for f in built[r.key, r.candidates[0]]] for r in roles}
        share = threads_share()
        if share < BUSY:
            return {}, built, share
        calls = {}
        for r in roles:
            for kernel in r.candidates:
                if (r.key, kernel) not in built:
                    built[r.key, kernel] = [r.build(kernel, *s) for s in samples[r.key]]
                fns = built[r.key, kernel]
                if all(_close(f(xs[r.key]), ref, r.tolerance) for f, ref in zip(fns, reference[r.key])):
                    calls[r.key, kernel] = (xs[r.key], fns)
        best = _rounds(calls)
    timings = {r.key: {k: round(best[r.key, k] * 1e6, 1) for k in r.candidates if (r.key, k) in best} for r in roles}
    return timings, built, share


def threads_share() -> float:
    """The share of its threads' time the process has, over ~15 ms of a parallel
    operation (shorter spans fall between the clock ticks that count other
    threads' time, on some systems): below 1, other processes take turns with its
    threads, and every parallel call waits for the slowest thread."""
    import torch

    x = torch.zeros(1 << 24)  # 64 MB: work for every thread, from memory
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(8):
        x.add_(1.0)
    return (time.process_time() - cpu) / (time.perf_counter() - start) / torch.get_num_threads()


def _rounds(calls: dict) -> dict[tuple[str, str], float]:
    """Seconds per call: each call's best over the rounds, averaged over the
    samples (a call slowed by another process in one round is fast in another).
    Rounds go on while time allows."""
    best = {key: [float("inf")] * len(fns) for key, (x, fns) in calls.items()}
    order, start = list(calls), time.perf_counter()
    for n in range(MAX_ROUNDS + 1):
        for key in order if n % 2 else reversed(order):  # alternate, so no kernel always follows the same one
            x, fns = calls[key]
            times = best[key]
            for i, f in enumerate(fns):
                t = time.perf_counter()
                f(x)
                if n:  # round 0 warms up: page faults, allocations
                    times[i] = min(times[i], time.perf_counter() - t)
        if n >= 2:
            mean = {key: sum(best[key]) / len(best[key]) for key in order}
            order = [k for k in order if mean[k] <= LOSING * min(mean[j] for j in order if j[0] == k[0])]
        if n >= MIN_ROUNDS and time.perf_counter() - start > ROUNDS_S:
            break
    return {key: sum(times) / len(times) for key, times in best.items()}


def _close(y, reference, tolerance: float) -> bool:
    return bool((y - reference).norm() <= tolerance * reference.norm())


def sample(weights: list[tuple], each: int) -> list[tuple]:
    """The first of `weights` (each of `each` weights) that together hold at most
    `SAMPLE_WEIGHTS`; one at least."""
    return weights[: max(1, min(len(weights), SAMPLE_WEIGHTS // max(each, 1)))]


# --- the machine and the cache file ----------------------------------------------------


def machine_key(dtype: str) -> str:
    """What a choice holds for: this CPU (its name and the vector extensions that
    decide kernels' speed: some virtual machines name an AVX2 and an AVX-512 EPYC
    alike), thread count, torch and dtype."""
    import torch

    flags = cpu_flags()
    isa = "+".join(f for f in VECTOR_FLAGS if f in flags)
    return f"{cpu_model()}{f' ({isa})' if isa else ''} · {torch.get_num_threads()} threads · torch {torch.__version__} · {dtype}"


VECTOR_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")


def cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine() or "unknown CPU"


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them (`avx512_bf16`, ...); none elsewhere."""
    return set(_cpuinfo("flags").split())


def _cpuinfo(field: str) -> str:
    """The first value of `field` in /proc/cpuinfo, "" where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def read_cache(path: Path) -> tuple[dict, str]:
    """The cache's entries, and a note when a file was there but could not be used
    (it is then measured afresh and replaced)."""
    try:
        data = files.parse_json(files.utf8(files.read_regular(path, 1 << 20)))
    except FileNotFoundError:
        return {}, ""
    except (files.FileProblem, ValueError, OSError) as e:
        return {}, f"ignored {path}: {files.one_line(e)}"
    if not isinstance(data, dict) or data.get("version") != VERSION or not isinstance(data.get("kernels"), dict):
        return {}, f"ignored {path}: not a kernel cache of version {VERSION}"
    return data["kernels"], ""


def write_cache(path: Path, entries: dict) -> str:
    """Replace the cache file at once (a temporary file renamed into place); a note
    if it cannot be written (the choice then holds for this run only)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".kernels.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"version": VERSION, "kernels": entries}, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:
        return f"not saved in {path}: {e.strerror or e}"
    return ""
