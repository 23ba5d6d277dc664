"""What each memory policy costs in quality, on a model trained enough to tell.

    python benchmarks/policies.py                 # the README's table and plot
    python benchmarks/policies.py --tokens 3000   # a quicker, smaller run

Perplexity of pydoc-small (../shared/models/pydoc-small, a small GPT-2 trained on
the Python documentation) on its held-out documentation text, for each policy ×
capacity 32, 64, 128, 256 × keep 0 and 4, with `--evict` a quarter of the rolling
part (the default) and the attention policy's default `--recent` (half of it). The
same run's scoring speed is given too. Writes benchmarks/policies.png.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"
MODEL = SHARED / "models" / "pydoc-small"
HELDOUT = SHARED / "data" / "python-docs-heldout" / "heldout.txt"
PLOT = HERE / "policies.png"
POLICIES = ("oldest", "boundary", "attention")
CAPACITIES = (32, 64, 128, 256)
KEEPS = (0, 4)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=MODEL)
    p.add_argument("--text", type=Path, default=HELDOUT)
    p.add_argument("--tokens", type=int, default=20000, help="score the first N tokens of the text (default 20000)")
    p.add_argument("--plot", type=Path, default=PLOT)
    args = p.parse_args()
    if not (args.model / "model.safetensors").is_file() or not args.text.is_file():
        sys.exit(f"needs {args.model} and {args.text} (../shared beside the project)")

    import torch
    from bench import machine

    import wmgen

    torch.manual_seed(0)
    lm = wmgen.load(str(args.model), device="cpu", dtype="float32")
    ids = lm.encode(args.text.read_text(encoding="utf-8"))[: args.tokens]
    results = {}
    t0 = time.perf_counter()
    for keep in KEEPS:
        for capacity in CAPACITIES:
            for policy in POLICIES:
                results[policy, capacity, keep] = s = lm.perplexity(ids, capacity=capacity, keep=keep, policy=policy)
                print(f"[{time.perf_counter() - t0:5.0f} s] {policy} capacity {capacity} keep {keep}: {s.perplexity:.2f}", file=sys.stderr)

    print(f"machine: {machine()}; model {args.model.name}, first {len(ids)} tokens of {args.text.name}; "
          f"evict a quarter of capacity - keep, recent half of it")
    for keep in KEEPS:
        print(f"\nkeep {keep}: perplexity (tokens/s)\n")
        print("| policy | " + " | ".join(f"capacity {c}" for c in CAPACITIES) + " |")
        print("|---|" + "---:|" * len(CAPACITIES))
        for policy in POLICIES:
            cells = [results[policy, c, keep] for c in CAPACITIES]
            print(f"| {policy} | " + " | ".join(f"{s.perplexity:.2f} ({s.tokens_per_s:.0f})" for s in cells) + " |")
    draw(results, args.plot, f"{args.model.name}, first {len(ids)} held-out tokens")
    print(f"\nwrote {args.plot}", file=sys.stderr)


def draw(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"oldest": "tab:blue", "boundary": "tab:green", "attention": "tab:red"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for keep, style in zip(KEEPS, ("-", "--")):
        for policy in POLICIES:
            ys = [results[policy, c, keep].perplexity for c in CAPACITIES]
            ax.plot(CAPACITIES, ys, style, marker="o", color=colours[policy], label=f"{policy}, keep {keep}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(CAPACITIES, [str(c) for c in CAPACITIES])
    ax.set_xlabel("capacity (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
