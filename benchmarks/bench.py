"""wmgen speed, measured against transformers in the same process.

    python benchmarks/bench.py                 # decode speed, batches, eviction sweep
    python benchmarks/bench.py --only decode   # one part (decode, startup, batch, evict)

Uses a randomly initialised model of the exact `gpt2` shape (GPT2Config() defaults)
with the real GPT-2 tokenizer from ../shared/tokenizers/gpt2, built once and cached
in benchmarks/.cache/. The cost of a forward pass does not depend on weight values.
Repetitions are interleaved (wmgen, transformers, wmgen, ...) and medians reported.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache" / "gpt2-random"
TOKENIZER = HERE.parent.parent / "shared" / "tokenizers" / "gpt2"


def build_model() -> Path:
    if (CACHE / "model.safetensors").is_file():
        return CACHE
    if not (TOKENIZER / "tokenizer.json").is_file():
        sys.exit(f"benchmarks need the GPT-2 tokenizer at {TOKENIZER} (../shared beside the project)")
    import shutil

    from transformers import GPT2Config, GPT2LMHeadModel

    print(f"building a random gpt2-shaped model in {CACHE} (once)", file=sys.stderr)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(CACHE)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.copy(TOKENIZER / name, CACHE / name)
    return CACHE


def wmgen_run(model, prompt_ids, n: int, capacity: int = 1024, evict: int | None = None) -> float:
    """Seconds to read the prompt and generate `n` tokens greedily with wmgen."""
    from wmgen.generation import generate
    from wmgen.memory import WorkingMemory
    from wmgen.settings import RunSettings, Sampling

    memory = WorkingMemory(model, capacity, 0, evict)
    t = time.perf_counter()
    for _ in generate(memory, TOK, prompt_ids, RunSettings(max_new_tokens=n, ignore_eos=True), Sampling(temperature=0)):
        pass
    return time.perf_counter() - t


def batch_run(model, prompts, n: int) -> float:
    """Seconds to generate `n` tokens for every prompt as one batch."""
    from wmgen.generation import generate_batch
    from wmgen.memory import MemoryBatch
    from wmgen.settings import RunSettings, Sampling

    batch = MemoryBatch(model, len(prompts), 1024)
    t = time.perf_counter()
    generate_batch(batch, TOK, prompts, RunSettings(max_new_tokens=n, ignore_eos=True), Sampling(temperature=0), [0] * len(prompts))
    return time.perf_counter() - t


def bench_batch(model, reps: int, n: int = 48) -> list[tuple]:
    """Total tokens/s of B prompts run as one batch vs the same prompts one by one."""
    rows = []
    for size in (1, 4, 8):
        prompts = [list(range(1000 + 40 * r, 1032 + 40 * r)) for r in range(size)]
        together, alone = [], []
        for _ in range(reps):
            together.append(size * n / batch_run(model, prompts, n))
            alone.append(size * n / sum(wmgen_run(model, p, n) for p in prompts))
        mt, ma = statistics.median(together), statistics.median(alone)
        rows.append((f"{size} prompts × {n} tokens, one batch vs one by one", f"{mt:.1f}", f"{ma:.1f} (wmgen, one by one)", f"{mt / ma:.2f}×"))
    return rows


def hf_run(hf, prompt_ids, n: int) -> float:
    ids = torch.tensor([prompt_ids])
    t = time.perf_counter()
    with torch.inference_mode():
        hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return time.perf_counter() - t


def decode_rate(run, lo: int, hi: int, reps: int) -> list[float]:
    """Tokens/s of decoding alone: (hi - lo) tokens over t(hi) - t(lo), prefill cancels."""
    return [(hi - lo) / (run(hi) - run(lo)) for _ in range(reps)]


def bench_decode(model, hf, reps: int) -> list[tuple]:
    rows = []
    for context in (32, 900):
        prompt = list(range(1000, 1000 + context))
        w, h = [], []
        for _ in range(reps):  # interleaved
            w += decode_rate(lambda n: wmgen_run(model, prompt, n), 8, 72, 1)
            h += decode_rate(lambda n: hf_run(hf, prompt, n), 8, 72, 1)
        mw, mh = statistics.median(w), statistics.median(h)
        rows.append((f"decode, {context}-token context", f"{mw:.1f}", f"{mh:.1f}", f"{mw / mh:.2f}×"))
    return rows


def bench_evict(model, reps: int, tokens: int = 1536) -> list[tuple]:
    """Generation from a full 1024-token memory for `tokens` tokens, per --evict."""
    prompt = list(range(1000, 2024))
    rows = []
    for evict in (16, 64, 128, 256, 384, 512):
        times = [wmgen_run(model, prompt, tokens, evict=evict) - wmgen_run(model, prompt, 1, evict=evict) for _ in range(reps)]
        rate = tokens / statistics.median(times)
        rows.append((f"{tokens} tokens from a full memory, --evict {evict}", f"{rate:.1f}", "", ""))
    return rows


PIPELINE_SCRIPT = """
import sys
from transformers import pipeline
generator = pipeline("text-generation", model=sys.argv[1], device="cpu")
out = generator("The lighthouse keeper", max_new_tokens=1, do_sample=False)
sys.stdout.write(out[0]["generated_text"]); sys.stdout.flush()
"""


def first_byte(command: list[str]) -> tuple[float, float]:
    """Seconds until the command's first byte on stdout, and its peak RSS in MB."""
    import os
    import subprocess

    # /usr/bin/time reports the command's own peak RSS (a child forked from this
    # process would start with this process's pages counted)
    timed = ["/usr/bin/time", "-f", "%M"] if os.path.exists("/usr/bin/time") else []
    t = time.perf_counter()
    proc = subprocess.Popen(timed + command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    proc.stdout.read(1)
    elapsed = time.perf_counter() - t
    proc.stdout.read()
    stderr = proc.communicate()[1].decode().strip().splitlines()
    rss_kb = float(stderr[-1]) if timed and stderr and stderr[-1].isdigit() else float("nan")
    return elapsed, rss_kb / 1024


def bench_startup(folder: Path, reps: int) -> list[tuple]:
    """Wall time of `wmgen --help`; time to first token and peak RSS of a `wmgen
    generate` process vs a `transformers` pipeline script on the same model."""
    import shutil

    wmgen = shutil.which("wmgen") or sys.exit("wmgen is not installed in this environment")
    helps = [first_byte([wmgen, "--help"])[0] for _ in range(reps + 2)]
    ours = [first_byte([wmgen, "generate", "-m", str(folder), "-n", "1", "-t", "0", "--no-save", "The lighthouse keeper"]) for _ in range(reps)]
    theirs = [first_byte([sys.executable, "-c", PIPELINE_SCRIPT, str(folder)]) for _ in range(reps)]
    torch_rss = statistics.median(first_byte([sys.executable, "-c", "import torch; print(1)"])[1] for _ in range(reps))
    t_ours, t_theirs = statistics.median(o[0] for o in ours), statistics.median(o[0] for o in theirs)
    rss_ours, rss_theirs = statistics.median(o[1] for o in ours), statistics.median(o[1] for o in theirs)
    return [
        ("`wmgen --help`, wall s (first byte)", f"{statistics.median(helps):.2f}", "", ""),
        ("time to first token, s (process start to first byte)", f"{t_ours:.2f}", f"{t_theirs:.2f} (pipeline script)", f"{t_ours / t_theirs:.2f}×"),
        ("peak RSS, MB", f"{rss_ours:.0f}", f"{rss_theirs:.0f} (pipeline script)", f"{rss_ours / rss_theirs:.2f}×"),
        ("peak RSS of `python -c 'import torch'`, MB", f"{torch_rss:.0f}", "", ""),
    ]


def table(rows) -> str:
    out = ["| what | wmgen tokens/s | transformers tokens/s | ratio |", "|---|---|---|---|"]
    out += [f"| {' | '.join(r)} |" for r in rows]
    return "\n".join(out)


def main() -> None:
    global TOK
    p = argparse.ArgumentParser()
    p.add_argument("--only", choices=["decode", "evict", "batch", "startup"])
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    folder = build_model()
    from transformers import GPT2LMHeadModel

    from wmgen.model import load_model, load_tokenizer

    info, TOK = load_tokenizer(str(folder))
    model = load_model(info, device="cpu", dtype="float32")
    hf = GPT2LMHeadModel.from_pretrained(folder).eval()
    rows = []
    if args.only in (None, "decode"):
        rows += bench_decode(model, hf, args.reps)
    if args.only in (None, "startup"):
        rows += bench_startup(folder, args.reps)
    if args.only in (None, "batch"):
        rows += bench_batch(model, args.reps)
    if args.only in (None, "evict"):
        rows += bench_evict(model, max(1, args.reps - 2))
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, fp32, batch 1")
    print(table(rows))


TOK = None

if __name__ == "__main__":
    main()
