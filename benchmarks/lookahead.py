"""Lookup decoding (`--lookahead`): what a check costs, how often drafts are kept, and
the speed that follows, against plain runs in the same process.

    python benchmarks/lookahead.py            # about 6 minutes on 2 cores
    python benchmarks/lookahead.py --reps 5

Three parts:
- the cost of checking drafts: one forward pass over 1 + k tokens, in plain steps,
  on the random `gpt2`-shaped model (benchmarks/.cache, as bench.py builds it), per
  format;
- pydoc-small (../shared/models/pydoc-small) continuing held-out documentation that
  quotes code, greedily: the share of draft tokens kept and tokens/s, with the
  tokens checked equal to a plain run's;
- where nothing matches: sampled text (-t 1) on the random `gpt2` shape, whose
  tokens are near-uniform over 50,257 and so never repeat, and greedy text on it,
  which loops (and so flatters lookup: said beside the figure).
Every figure is a median over `--reps` interleaved runs (plain, lookahead, plain, ...).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench import PYDOC, build_model, machine, prompt_of  # noqa: E402

HELDOUT = HERE.parent.parent / "shared" / "data" / "python-docs-heldout" / "heldout.txt"
LOOKAHEAD = 8


def run(lm, prompt: list[int], n: int, lookahead: int, **sampling) -> tuple[list[int], float, object]:
    """Tokens, decode tokens/s (after the first token) and the `Finished` event."""
    from wmgen.events import Finished, Token

    tokens, times, end = [], [], None
    t0 = time.perf_counter()
    for event in lm.events(prompt, max_new_tokens=n, ignore_eos=True, lookahead=lookahead, **sampling):
        if isinstance(event, Token):
            tokens.append(event.id)
            times.append(time.perf_counter() - t0)
        elif isinstance(event, Finished):
            end = event
    return tokens, (len(times) - 1) / (times[-1] - times[0]), end


def compare(lm, prompts: list[list[int]], n: int, reps: int, **sampling) -> tuple[float, float, float, bool]:
    """Median tokens/s plain and with lookahead, the share of draft tokens kept, and
    whether every run gave the plain run's tokens."""
    plain, ahead, kept, drafted, same = [], [], 0, 0, True
    for _ in range(reps):
        for prompt in prompts:
            tokens, speed, _ = run(lm, prompt, n, 0, **sampling)
            plain.append(speed)
            looked, speed, end = run(lm, prompt, n, LOOKAHEAD, **sampling)
            ahead.append(speed)
            kept, drafted = kept + end.accepted, drafted + end.drafted
            same = same and looked == tokens
    return statistics.median(plain), statistics.median(ahead), kept / drafted if drafted else 0.0, same


def check_costs(lm, reps: int) -> list[float]:
    """Seconds of one pass over 1 + k new tokens after a 32-token context, over one token's."""
    net = lm.network
    store = net.new_store(64)
    costs = {}
    with torch.inference_mode():
        net.forward(torch.tensor([prompt_of(32)]), 0, store)
        for m in (1, 2, 3, 5, 9):
            ids = torch.tensor([prompt_of(m)])
            best = float("inf")
            for _ in range(reps * 4):
                t = time.perf_counter()
                net.logits(net.forward(ids, 32, store, alone=True)[0], group=1)
                best = min(best, time.perf_counter() - t)
            costs[m] = best
    return [costs[m] / costs[1] for m in (2, 3, 5, 9)]


def heldout_prompts(lm, count: int, width: int) -> list[list[int]]:
    """`count` windows of `width` tokens from the held-out documentation, each from
    a part that quotes code (a `::` block or a `>>>` session)."""
    text = HELDOUT.read_text(encoding="utf-8")
    prompts, at = [], 0
    while len(prompts) < count:
        at = min((i for i in (text.find(">>> ", at), text.find("::\n", at)) if i >= 0), default=-1)
        if at < 0:
            break
        ids = lm.encode(text[max(0, at - 1500) : at + 200])
        if len(ids) >= width:
            prompts.append(ids[-width:])
        at += 4000
    return prompts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    import wmgen

    rows = []
    folder = build_model()
    random = {dtype: wmgen.load(str(folder), device="cpu", dtype=dtype) for dtype in ("float32", "int8", "int4")}
    for dtype, lm in random.items():
        costs = check_costs(lm, args.reps)
        rows.append((f"gpt2 shape, {dtype}: a check of 1 + 1 / 2 / 4 / 8 tokens, in plain steps",
                     " / ".join(f"{c:.2f}" for c in costs), "", ""))
    if (PYDOC / "model.safetensors").is_file() and HELDOUT.is_file():
        small = wmgen.load(str(PYDOC), device="cpu", dtype="float32")
        prompts = heldout_prompts(small, 6, 300)
        plain, ahead, kept, same = compare(small, prompts, 200, args.reps, temperature=0)
        rows.append((f"pydoc-small, greedy, {len(prompts)} held-out passages quoting code (300-token prompts, 200 new tokens)",
                     f"{plain:.0f} → {ahead:.0f} tokens/s", f"{kept:.0%} of draft tokens kept; tokens {'identical' if same else 'DIFFER'}",
                     f"{ahead / plain:.2f}×"))
    else:
        rows.append(("pydoc-small", f"skipped: no model at {PYDOC}", "", ""))
    lm = random["float32"]
    for how, sampling in (("sampled, -t 1 (nothing repeats)", {"temperature": 1.0, "seed": 3}),
                          ("greedy (random weights loop: flattering)", {"temperature": 0})):
        plain, ahead, kept, same = compare(lm, [prompt_of(32)], 128, args.reps, **sampling)
        rows.append((f"gpt2 shape, float32, {how}, 128 new tokens", f"{plain:.1f} → {ahead:.1f} tokens/s",
                     f"{kept:.0%} kept; tokens {'identical' if same else 'DIFFER'}", f"{ahead / plain:.2f}×"))
    print(f"machine: {machine()}; --lookahead {LOOKAHEAD}; medians of {args.reps} interleaved runs")
    print("| what | measured | drafts | ratio to plain |\n|---|---|---|---|")
    for r in rows:
        print(f"| {' | '.join(r)} |")


if __name__ == "__main__":
    main()
