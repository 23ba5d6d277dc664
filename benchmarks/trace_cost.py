"""What `--trace` costs a decode step, in one process, interleaved.

    python benchmarks/trace_cost.py            # about 2 minutes on 2 cores
    python benchmarks/trace_cost.py --reps 7 --tokens 200

For each policy, the same greedy run (a 32-token prompt, a memory of 256 tokens that
evicts 64 at a time, so evictions and recomputes are in it) is made with no trace
and with a trace written to a file, alternately, and the decode rates' medians are
compared. Under the attention policy the ledger also holds every step's attention
(one number per slot). The model is the random gpt2-shaped one of bench.py.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench import build_model, machine, prompt_of


def run(lm, policy: str, tokens: int, trace_path: Path | None) -> float:
    """Decode tokens/s after the first 8 tokens."""
    from wmgen.events import Token
    from wmgen.trace import Trace

    memory = lm.memory(256, 0, 64, policy=policy)
    out = None
    if trace_path is not None:
        out = open(trace_path, "w", encoding="utf-8")
        memory.trace = Trace(out, memory)
    t0, times = time.perf_counter(), []
    for event in lm.events(prompt_of(32), memory=memory, max_new_tokens=tokens + 1, ignore_eos=True, temperature=0):
        if isinstance(event, Token):
            times.append(time.perf_counter() - t0)
    if out is not None:
        out.close()
    return (len(times) - 8) / (times[-1] - times[7])


def main() -> None:
    import wmgen

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=300)
    parser.add_argument("--model", type=Path)
    args = parser.parse_args()
    lm = wmgen.load(str(args.model or build_model()), device="cpu", dtype="float32")
    run(lm, "oldest", 16, None)  # warm up
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.jsonl"
        for policy in ("oldest", "attention"):
            plain, traced = [], []
            for _ in range(args.reps):
                plain.append(run(lm, policy, args.tokens, None))
                traced.append(run(lm, policy, args.tokens, path))
            p, t = statistics.median(plain), statistics.median(traced)
            rows.append((policy, f"{p:.1f}", f"{t:.1f}", f"{t / p:.3f}×", f"{path.stat().st_size / 1024:.0f} KiB"))
    print(f"\n{machine()} · gpt2-shaped, float32, capacity 256, evict 64, {args.tokens} tokens, medians of {args.reps}\n")
    print("| policy | tokens/s, no trace | tokens/s, --trace | ratio (target ≥ 0.97×) | ledger size |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {' | '.join(r)} |")


if __name__ == "__main__":
    main()
