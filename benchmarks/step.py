"""Where a decode step's time goes: the whole step against its weight reads alone.

A batch-1 step is timed twice in the same process, interleaved: whole (`forward` of
one token and the head, as `wmgen generate` runs it), and as only its projections
and head called in the same order on inputs of the same shapes. The difference is
what lies outside the weight reads: layer norms, activations, attention, the key
and value writes, and dispatching each operation from Python.

    python benchmarks/step.py [--dtype float32,int8,int4] [--depth 32,900]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench import build_model, machine  # noqa: E402


def weights_only(net):
    """The step's projections and head, in model order, on fixed inputs."""
    E = net.config.n_embd
    x, wide = torch.randn(1, E), torch.randn(1, 4 * E)
    calls = []
    for b in net.blocks:
        calls += [(b.c_attn, x), (b.c_proj, x), (b.c_fc, x), (b.mlp_proj, wide)]

    def run():
        for f, inp in calls:
            f(inp, 1)
        net.logits(x[None])

    return run


def timed(f, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - start) / n


def measure(lm, depth: int, rounds: int = 5, n: int = 20) -> tuple[float, float]:
    """Median ms per whole step and per weight-only step."""
    net = lm.network
    store = net.new_store(max(1024, depth + n + 8))
    token = torch.tensor([[5]])
    with torch.inference_mode():
        if depth:
            net.forward(torch.randint(0, net.config.vocab_size, (1, depth)), 0, store)

        def step():
            net.logits(net.forward(token, depth, store)[:, -1])

        alone = weights_only(net)
        step(), alone()
        whole, part = [], []
        for _ in range(rounds):
            whole.append(timed(step, n))
            part.append(timed(alone, n))
    return statistics.median(whole) * 1e3, statistics.median(part) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32,int8,int4")
    parser.add_argument("--depth", default="32,900")
    parser.add_argument("--model", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    import wmgen

    folder = args.model or build_model()
    print(f"CPU: {machine()} · {folder.name}\n")
    print("| format | context | step, ms | weights alone, ms | outside the weights |")
    print("|---|---:|---:|---:|---:|")
    for dtype in args.dtype.split(","):
        lm = wmgen.load(str(folder), device="cpu", dtype=dtype)
        for depth in (int(d) for d in args.depth.split(",")):
            whole, part = measure(lm, depth)
            print(f"| {dtype} | {depth} | {whole:.2f} | {part:.2f} | {whole - part:.2f} ms, {(whole - part) / whole:.0%} |",
                  flush=True)


if __name__ == "__main__":
    main()
