"""What forgetting costs, measured exactly, on a model trained enough to tell.

    python benchmarks/forgetting.py                  # the README's tables and plot
    python benchmarks/forgetting.py --tokens 1500    # a quicker, smaller run

pydoc-small (../shared/models/pydoc-small, a small GPT-2 trained on the Python
documentation) scores its held-out documentation through memories of capacity 32,
64 and 128 (keep 0, evict a quarter, the attention policy's default recent) under
each policy, with `perplexity --cost`: every eviction's cost is the tokens up to the
next eviction scored again through a memory that kept what it dropped.

1. By policy and capacity: the cost per token scored after an eviction and per
   token evicted, the distribution of per-eviction costs, and what measuring costs
   in time (against a plain scoring of the same text in the same process).
2. The bound (`--cost-bound`): at each eviction, every run of `evict` consecutive
   unpinned slots is tried as the thing to drop (and the policy's own choice); the
   least costly bounds the best choice from above. Capacity 32 and 64, on fewer tokens.
3. What kinds of tokens cost most: at every other eviction of the attention policy at
   capacity 64, each unpinned slot is dropped alone, and what that alone costs is
   set against its kind, its age, its attention score and whether it starts a
   sentence. Every scored token is the text's, so all are of origin "prompt".

Writes benchmarks/forgetting.png (the distribution of per-eviction costs).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"
MODEL = SHARED / "models" / "pydoc-small"
HELDOUT = SHARED / "data" / "python-docs-heldout" / "heldout.txt"
PLOT = HERE / "forgetting.png"
POLICIES = ("oldest", "boundary", "attention")
CAPACITIES = (32, 64, 128)


def quantiles(xs: list[float]) -> list[float]:
    q = statistics.quantiles(xs, n=20, method="inclusive")  # 5%, 10%, ..., 95%
    return [q[0], q[4], q[9], q[14], q[18], max(xs)]


def probe(lm, ids: list[int], capacity: int, every: int):
    """(slot features, cost) for each unpinned slot dropped alone, at every
    `every`-th eviction of the attention policy; and the actual evictions."""
    import torch

    from wmgen.forgetting import Dropped, Forgetting, kind
    from wmgen.perplexity import pass_logprobs, token_logprobs
    from wmgen.policies import ends_sentence

    token_bytes = lm.tokenizer.token_bytes

    @dataclass
    class Probe(Forgetting):
        count: int = 0
        pairs: list = field(default_factory=list)
        _alone: list = field(default_factory=list)
        _all: object = None

        def before(self, memory, evicting):
            super().before(memory, evicting)
            self._alone = []
            if not evicting:
                return
            self.count += 1
            if self.count % every:
                return
            self._all = memory.fork(capacity=memory.capacity + memory.room)  # keeps everything
            for i, slot in enumerate(memory.slots):
                if slot.pinned:
                    continue
                j = self.held[i]
                text = token_bytes(slot.token).decode("utf-8", "replace")
                features = Dropped(j, slot.token, text, slot.origin, 0, slot.score if slot.queries else None,
                                   j == 0 or ends_sentence(token_bytes, ids[max(0, j - 3): j]), kind(text))
                alone = memory.fork()
                alone.forget(i, i + 1)
                self._alone.append((features, alone))

        def after(self, memory, ids_, start, stop, logprobs):
            super().after(memory, ids_, start, stop, logprobs)
            if not self._alone:
                return
            kept = -float(pass_logprobs(self._all, ids_, start, stop).double().sum())
            for features, alone in self._alone:
                nll = -float(pass_logprobs(alone, ids_, start, stop).double().sum())
                age = start - features.index
                self.pairs.append((features, age, (nll - kept) / (stop - start), self.count))
            self._alone = []

    memory = lm.memory(capacity, 0, policy="attention")
    watch = Probe(token_bytes)
    with torch.inference_mode():
        token_logprobs(memory, ids, watch=watch)
    return watch.pairs, watch.result()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=MODEL)
    p.add_argument("--text", type=Path, default=HELDOUT)
    p.add_argument("--tokens", type=int, default=4000, help="score the first N tokens of the text (default 4000)")
    p.add_argument("--bound-tokens", type=int, default=600, help="tokens for the bound (default 600)")
    p.add_argument("--plot", type=Path, default=PLOT)
    args = p.parse_args()
    if not (args.model / "model.safetensors").is_file() or not args.text.is_file():
        sys.exit(f"needs {args.model} and {args.text} (../shared beside the project)")

    import torch
    from bench import machine

    import wmgen
    from wmgen.forgetting import spearman

    torch.manual_seed(0)
    lm = wmgen.load(str(args.model), device="cpu", dtype="float32")
    ids = lm.encode(args.text.read_text(encoding="utf-8"))[: args.tokens]
    t0 = time.perf_counter()

    def say(what: str) -> None:
        print(f"[{time.perf_counter() - t0:5.0f} s] {what}", file=sys.stderr)

    print(f"machine: {machine()}; model {args.model.name}, first {len(ids)} tokens of {args.text.name}; "
          "keep 0, evict a quarter of capacity, recent half of it\n")

    # 1. by policy and capacity
    runs = {}
    for capacity in CAPACITIES:
        for policy in POLICIES:
            t = time.perf_counter()
            plain = lm.perplexity(ids, capacity=capacity, policy=policy)
            plain_s = time.perf_counter() - t
            t = time.perf_counter()
            costed = lm.perplexity(ids, capacity=capacity, policy=policy, cost=True)
            runs[policy, capacity] = (plain, costed, (time.perf_counter() - t) / plain_s)
            say(f"{policy} capacity {capacity}: perplexity {plain.perplexity:.3f}, cost {costed.cost.per_token:+.4f}")
    print("Cost of forgetting, by policy and capacity (nats; per token = per token scored between an eviction "
          "and the next; time = a scoring with --cost ÷ one without)\n")
    print("| policy | capacity | perplexity | evictions | per token scored | per token evicted | "
          "evictions that helped | --cost time |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for (policy, capacity), (plain, costed, slower) in runs.items():
        c = costed.cost
        helped = sum(e.delta < 0 for e in c.evictions) / len(c.evictions)
        print(f"| {policy} | {capacity} | {plain.perplexity:.3f} | {len(c.evictions)} | {c.per_token:+.4f} | "
              f"{c.per_evicted:+.4f} | {helped:.0%} | {slower:.2f}× |")
    print("\nPer-eviction cost (nats per token scored after it): quantiles\n")
    print("| policy | capacity | 5% | 25% | median | 75% | 95% | max |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for (policy, capacity), (_, costed, _) in runs.items():
        qs = quantiles([e.delta for e in costed.cost.evictions])
        print(f"| {policy} | {capacity} | " + " | ".join(f"{q:+.4f}" for q in qs) + " |")
    att = runs["attention", 64][1].cost
    scored = [(statistics.fmean(d.score for d in e.dropped if d.score is not None), e.delta)
              for e in att.evictions if any(d.score is not None for d in e.dropped)]
    print(f"\nattention, capacity 64: rank correlation of an eviction's mean dropped score with its cost: "
          f"{spearman([s for s, _ in scored], [c for _, c in scored]):+.3f} over {len(scored)} evictions")
    print("\nThe costliest evictions (attention, capacity 64):\n")
    for e in att.costliest(5):
        text = "".join(d.text for d in e.dropped).replace("\n", "\\n").replace("|", "\\|")
        print(f"- {e.delta:+.3f} nats × {e.scored} tokens at token {e.at}: `{text[:70]}`")

    # 2. the bound
    bound_ids = ids[: args.bound_tokens]
    print(f"\nThe bound, on the first {len(bound_ids)} tokens: the least costly of every run of `evict` consecutive "
          "slots (and the policy's choice), at each eviction\n")
    print("| policy | capacity | cost per token scored | best tried | choices per eviction | time |")
    print("|---|---:|---:|---:|---:|---:|")
    for capacity in (32, 64):
        for policy in POLICIES:
            t = time.perf_counter()
            s = lm.perplexity(bound_ids, capacity=capacity, policy=policy, bound=True)
            c = s.cost
            print(f"| {policy} | {capacity} | {c.per_token:+.4f} | {c.bound:+.4f} | {c.tried / len(c.evictions):.0f} | "
                  f"{time.perf_counter() - t:.0f} s |")
            say(f"bound {policy} {capacity}")

    # 3. what kinds of tokens cost most, each dropped alone
    pairs, _ = probe(lm, ids, 64, every=2)
    say(f"probe: {len(pairs)} slots")
    costs = [c for *_, c, _ in pairs]
    print(f"\nEach slot dropped alone (attention, capacity 64, every other eviction: {len(pairs)} slots): "
          f"mean cost {statistics.fmean(costs):+.5f} nats per token scored after\n")

    ages = ((8, "1-8"), (16, "9-16"), (32, "17-32"), (64, "33-64"), (128, "65-128"), (10**9, "> 128"))

    def table(title: str, key, order: tuple = ()) -> None:
        groups = defaultdict(list)
        for f, age, cost, _ in pairs:
            groups[key(f, age)].append(cost)
        print(f"| {title} | slots | mean cost | median | share costing > 0.01 |\n|---|---:|---:|---:|---:|")
        for k in sorted(groups, key=lambda k: (order.index(k) if k in order else len(order), k)):
            g = groups[k]
            print(f"| {k} | {len(g)} | {statistics.fmean(g):+.5f} | {statistics.median(g):+.5f} | "
                  f"{sum(c > 0.01 for c in g) / len(g):.0%} |")
        print()

    table("kind", lambda f, age: f.kind)
    table("starts a sentence", lambda f, age: "yes" if f.sentence_start else "no")
    table("age (tokens)", lambda f, age: next(label for top, label in ages if age <= top), tuple(label for _, label in ages))
    with_score = [(f.score, cost, n) for f, _, cost, n in pairs if f.score is not None]
    ranked = sorted(range(len(with_score)), key=lambda i: with_score[i][0])
    decile = {i: 1 + 10 * r // len(ranked) for r, i in enumerate(ranked)}
    print("| score decile (1 = least attended) | slots | mean cost | median |\n|---|---:|---:|---:|")
    for d in range(1, 11):
        g = [with_score[i][1] for i in decile if decile[i] == d]
        print(f"| {d} | {len(g)} | {statistics.fmean(g):+.5f} | {statistics.median(g):+.5f} |")
    overall = spearman([s for s, _, _ in with_score], [c for _, c, _ in with_score])
    within = []
    for n in {n for *_, n in with_score}:
        mine = [(s, c) for s, c, m in with_score if m == n]
        r = spearman([s for s, _ in mine], [c for _, c in mine])
        if r == r:
            within.append(r)
    print(f"\nrank correlation of a slot's score with what dropping it alone costs: {overall:+.3f} over all slots, "
          f"{statistics.fmean(within):+.3f} on average within one eviction ({len(within)} evictions)")

    draw(runs, args.plot)
    say(f"wrote {args.plot}")


def draw(runs, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CAPACITIES), figsize=(11, 3.6), sharey=True)
    colours = {"oldest": "tab:blue", "boundary": "tab:green", "attention": "tab:red"}
    for ax, capacity in zip(axes, CAPACITIES, strict=True):
        deltas = {policy: [e.delta for e in runs[policy, capacity][1].cost.evictions] for policy in POLICIES}
        lo = min(min(d) for d in deltas.values())
        hi = max(max(d) for d in deltas.values())
        bins = [lo + (hi - lo) * k / 40 for k in range(41)]
        for policy, d in deltas.items():
            ax.hist(d, bins=bins, histtype="step", color=colours[policy], label=policy, density=True)
        ax.set_yscale("log")
        ax.set_title(f"capacity {capacity}")
        ax.set_xlabel("cost of one eviction, nats per token after it")
    axes[0].set_ylabel("density")
    axes[0].legend(fontsize=8)
    fig.suptitle("pydoc-small, held-out documentation: what each eviction cost (exact)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
