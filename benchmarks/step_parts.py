"""A batch-1 decode step by kind of operation: inside the step, and the same call warm.

The step is written out here with a clock read around each operation (a profiler, or
a `TorchFunctionMode`, adds more than the small operations cost). Before timing, its
logits are checked against `GPT2.forward` and the head on the same store: it is the
step `wmgen generate` runs, with clocks. Then, per kind, the same calls on the same
tensors are timed back to back, where their data stays in cache: the ratio is what
the step's weight stream, pushing everything else out of cache, costs each of them.

    python benchmarks/step_parts.py [--dtype int8] [--depth 32,900]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from bench import build_model, machine  # noqa: E402


class Clock:
    """Seconds per kind, and each kind's calls (of the last step) to replay warm."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, list] = {}

    def __call__(self, kind: str, func, *args):
        start = time.perf_counter()
        out = func(*args)
        self.seconds[kind] = self.seconds.get(kind, 0.0) + time.perf_counter() - start
        self.calls.setdefault(kind, []).append((func, args))
        return out


def step(net, token: torch.Tensor, pos: int, store, clock: Clock) -> torch.Tensor:
    """Logits `[1, V]` for `token` `[1]` at slot and position `pos`: `GPT2.forward`'s
    batch-1, one-token path, operation for operation."""
    cfg = net.config
    H, D, E, eps = cfg.n_head, cfg.head_dim, cfg.n_embd, cfg.layer_norm_epsilon
    end = pos + 1
    x = clock("the rest", lambda: net.embed(token) + net.wpe[pos:end])
    for layer, b in enumerate(net.blocks):
        h = clock("layer norms", F.layer_norm, x, (E,), *b.ln_1, eps)
        qkv = clock("weights", b.c_attn, h, 1)
        q, k, v = clock("the rest", lambda qkv=qkv: qkv.view(1, 1, 3, H, D).permute(2, 0, 3, 1, 4))
        keys, values = clock("writing keys and values", store.update, layer, pos, k, v)
        a = clock("attention", F.scaled_dot_product_attention, q.to(keys.dtype), keys, values)
        a = clock("the rest", lambda a=a, dtype=x.dtype: a.transpose(1, 2).reshape(1, E).to(dtype))
        x = clock("adds", torch.add, x, clock("weights", b.c_proj, a, 1))
        h = clock("layer norms", F.layer_norm, x, (E,), *b.ln_2, eps)
        f = clock("GELU", net.activation, clock("weights", b.c_fc, h, 1))
        x = clock("adds", torch.add, x, clock("weights", b.mlp_proj, f, 1))
    x = clock("layer norms", F.layer_norm, x, (E,), *net.ln_f, eps)
    return clock("weights", net.logits, x)


def parts(lm, depth: int, steps: int = 100) -> list[tuple[str, float, float]]:
    """(kind, ms per step inside steps, ms for the same calls warm)."""
    net = lm.network
    store = net.new_store(1024)
    token = torch.tensor([5])
    with torch.inference_mode():
        net.forward(torch.randint(0, net.config.vocab_size, (1, depth)), 0, store)
        reference = net.logits(net.forward(token[None], depth, store)[:, -1])
        ours = step(net, token, depth, store, Clock())
        if not torch.equal(ours, reference):
            sys.exit(f"the timed step is not GPT2.forward's (logits differ by {(ours - reference).abs().max():.3g}); update it")
        for _ in range(10):
            step(net, token, depth, store, Clock())
        clock = Clock()
        for _ in range(steps):
            clock.calls.clear()
            step(net, token, depth, store, clock)
        rows = []
        for kind, seconds in sorted(clock.seconds.items(), key=lambda kv: (kv[0] != "weights", -kv[1])):
            calls = clock.calls[kind]
            for func, args in calls:
                func(*args)
            start = time.perf_counter()
            for _ in range(steps):
                for func, args in calls:
                    func(*args)
            rows.append((kind, seconds / steps * 1e3, (time.perf_counter() - start) / steps * 1e3))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="int8")
    parser.add_argument("--depth", default="32,900")
    parser.add_argument("--model", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    import wmgen

    folder = args.model or build_model()
    print(f"CPU: {machine()} · {folder.name}")
    for dtype in args.dtype.split(","):
        lm = wmgen.load(str(folder), device="cpu", dtype=dtype)
        for depth in (int(d) for d in args.depth.split(",")):
            rows = parts(lm, depth)
            total = sum(inside for _, inside, _ in rows)
            print(f"\n{dtype}, a step at {depth} tokens: {total:.2f} ms\n")
            print("| operation | in the step, ms | share | the same calls warm, ms | in the step / warm |")
            print("|---|---:|---:|---:|---:|")
            for kind, inside, warm in rows:
                print(f"| {kind} | {inside:.3f} | {inside / total:.0%} | {warm:.3f} | {inside / warm:.1f}× |", flush=True)


if __name__ == "__main__":
    main()
