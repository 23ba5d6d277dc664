"""wmgen speed, measured against transformers in the same process.

    python benchmarks/bench.py                # everything below, about 8 minutes on 2 cores
    python benchmarks/bench.py --only decode  # one part: decode, long, sweep,
                                              # ceiling, int8, policies, startup (or batch)
    python benchmarks/bench.py --model PATH   # a real checkpoint folder instead
    python benchmarks/bench.py --only llama --llama-bench PATH/llama-bench
                                              # llama.cpp on the same weights, same sitting

By default it uses a randomly initialised model of the exact `gpt2` shape
(GPT2Config() defaults) with the real GPT-2 tokenizer from ../shared/tokenizers/gpt2,
built once and cached in benchmarks/.cache/: the cost of a forward pass does not
depend on weight values. Repetitions are interleaved (wmgen, transformers, wmgen,
...) and medians reported. The long-generation part also writes the chart
benchmarks/long-generation.png.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache" / "gpt2-random"
SHARED = HERE.parent.parent / "shared"
TOKENIZER = SHARED / "tokenizers" / "gpt2"
WIKITEXT = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"
PYDOC = SHARED / "models" / "pydoc-small"
HELDOUT = SHARED / "data" / "python-docs-heldout" / "heldout.txt"
CHART = HERE / "long-generation.png"
GREEDY = {"temperature": 0.0, "top_p": 1.0}
SAMPLED = {"temperature": 1.0, "top_p": 0.9}  # on random weights the nucleus is most of the vocabulary
PARTS = ("decode", "long", "sweep", "ceiling", "int8", "policies", "startup")  # and, asked for: batch, llama
LLAMA_FORMATS = (("f32", "float32"), ("q8_0", "int8"), ("q4_0", "int4"))  # llama.cpp's type, wmgen's --dtype
DEPTH, DEEP_TOKENS = 900, 64  # the long-context run: depth + tokens stay under gpt2's 1024 positions


def build_model() -> Path:
    if (CACHE / "model.safetensors").is_file():
        return CACHE
    if not (TOKENIZER / "tokenizer.json").is_file():
        sys.exit(f"the benchmark needs the GPT-2 tokenizer at {TOKENIZER} (../shared beside the project), or --model PATH")
    from transformers import GPT2Config, GPT2LMHeadModel

    print(f"building a random gpt2-shaped model in {CACHE} (once)", file=sys.stderr)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(CACHE)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.copy(TOKENIZER / name, CACHE / name)
    return CACHE


class Bench:
    """The models under test and the runs the parts are made of."""

    def __init__(self, folder: Path):
        from transformers import GPT2LMHeadModel

        import wmgen

        self.folder = folder
        self.lm = wmgen.load(str(folder), device="cpu", dtype="float32")
        self.tokenizer, self.model = self.lm.tokenizer, self.lm.network
        self._lm8 = None
        self._quantized: dict = {}
        self.hf = GPT2LMHeadModel.from_pretrained(folder).eval()
        self.exact_rate: float | None = None  # the exact sliding window's, once measured

    @property
    def lm8(self):
        """The same checkpoint with --dtype int8."""
        if self._lm8 is None:
            import wmgen

            self._lm8 = wmgen.load(str(self.folder), device="cpu", dtype="int8")
        return self._lm8

    @property
    def int8(self):
        return self.lm8.network

    def lm_in(self, dtype: str):
        """The checkpoint with `--dtype dtype` (loaded once)."""
        if dtype == "float32":
            return self.lm
        if dtype == "int8":
            return self.lm8
        if dtype not in self._quantized:
            import wmgen

            self._quantized[dtype] = wmgen.load(str(self.folder), device="cpu", dtype=dtype)
        return self._quantized[dtype]

    def wmgen(self, prompt: list[int], n: int, *, evict: int | None = None, lm=None, capacity: int = 1024,
              policy: str = "oldest", sampling: dict = GREEDY) -> list[float]:
        """Generate `n` tokens after `prompt` (greedily unless `sampling` says how,
        capacity 1024), through the library as the command line does: the time of
        each token since the start, prompt reading included. (One more token is
        generated and not counted: the last token of a run is never read into
        memory, so its step would be free.)"""
        from wmgen.events import Token

        lm = lm or self.lm
        memory = lm.memory(capacity, 0, evict, policy=policy)
        t0, times = time.perf_counter(), []
        for event in lm.events(prompt, memory=memory, max_new_tokens=n + 1, ignore_eos=True, seed=0, **sampling):
            if isinstance(event, Token):
                times.append(time.perf_counter() - t0)
        return times[:n]

    def transformers(self, prompt: list[int], n: int, sampling: dict = GREEDY) -> tuple[list[float], str | None]:
        """`model.generate()` for `n` tokens (greedy unless `sampling` says how): the
        time of each token since the start, and the error that stopped it early, if any."""
        from transformers import LogitsProcessor, LogitsProcessorList

        times: list[float] = []

        class Clock(LogitsProcessor):  # called once per new token, before choosing it
            def __call__(self, input_ids, scores):
                times.append(time.perf_counter() - t0)
                return scores

        ids = torch.tensor([prompt])
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                self.hf.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                    do_sample=sampling["temperature"] > 0, pad_token_id=0, logits_processor=LogitsProcessorList([Clock()]),
                    **({"temperature": sampling["temperature"], "top_p": sampling["top_p"], "top_k": 0} if sampling["temperature"] > 0 else {}),
                )
        except Exception as e:  # past n_positions GPT-2 fails: that is a result here
            return times, f"{type(e).__name__}: {str(e).splitlines()[0]}"
        return times, None


def decode_rate(times: list[float], lo: int = 8) -> float:
    """Tokens/s of decoding alone: the tokens after the `lo`-th over their time
    (prompt reading and the first steps cancel out)."""
    return rate(times, lo - 1)


def rate(times: list[float], first: int = 0) -> float:
    """Tokens/s of the tokens after the `first`-th (each token's time includes
    reading it into memory, and any eviction that made room for it)."""
    return (len(times) - 1 - first) / (times[-1] - times[first])


def prompt_of(n: int) -> list[int]:
    return list(range(1000, 1000 + n))


def bench_decode(b: Bench, reps: int) -> list[tuple]:
    """Greedy decode at a short and a long context, and sampled decode (temperature
    1, top-p 0.9) at the short one, in float32, int8 and int4 against `model.generate()`."""
    rows = []
    for context, sampling, how in ((32, GREEDY, ""), (900, GREEDY, ""), (32, SAMPLED, ", sampling: -t 1 --top-p 0.9")):
        prompt, runs = prompt_of(context), {"wmgen": [], "hf": [], **{dtype: [] for dtype in QUANTIZED}}
        for _ in range(reps):  # interleaved
            runs["wmgen"].append(decode_rate(b.wmgen(prompt, 72, sampling=sampling)))
            runs["hf"].append(decode_rate(b.transformers(prompt, 72, sampling)[0]))
            for dtype in QUANTIZED:
                runs[dtype].append(decode_rate(b.wmgen(prompt, 72, lm=b.lm_in(dtype), sampling=sampling)))
        w, h = (statistics.median(runs[k]) for k in ("wmgen", "hf"))
        rows.append((f"decode, {context}-token context{how}", f"{w:.1f}", f"{h:.1f}", f"{w / h:.2f}×"))
        for dtype in QUANTIZED:
            q = statistics.median(runs[dtype])
            rows.append((f"decode, {context}-token context{how}, `--dtype {dtype}`", f"{q:.1f}", f"{h:.1f}", f"{q / h:.2f}×"))
    return rows


def bench_long(b: Bench, new: int = 4096) -> list[tuple]:
    """4096 tokens at capacity 1024 with the default --evict, the exact sliding
    window, and model.generate(), which GPT-2 cannot take past 1024 positions."""
    prompt = prompt_of(32)
    # the short-context speed right before and right after, so that drift on a
    # shared machine during the long run shows in neither figure alone
    shorts = [decode_rate(b.wmgen(prompt, 72)) for _ in range(2)]
    ours = b.wmgen(prompt, new)
    shorts += [decode_rate(b.wmgen(prompt, 72)) for _ in range(2)]
    short = statistics.median(shorts)
    exact = exact_sliding(b)
    theirs, error = b.transformers(prompt, new)
    overall = new / ours[-1]
    chart(ours, exact, theirs, error, len(prompt), b)
    hf_rate = rate(theirs) if len(theirs) > 1 else float("nan")
    return [
        (f"{new} tokens, capacity 1024, default --evict (overall)", f"{overall:.1f}", "", ""),
        ("  ÷ wmgen's own short-context decode (just before and after)", f"{overall:.1f} / {short:.1f}", "", f"{overall / short:.2f}×"),
        (f"exact sliding window (--evict 1), per token over {EXACT_TOKENS} tokens", f"{exact:.2f}", "", ""),
        ("  default --evict ÷ exact sliding", f"{overall:.1f} / {exact:.2f}", "", f"{overall / exact:.0f}×"),
        (f"model.generate(max_new_tokens={new})", "", f"{hf_rate:.1f} until token {len(theirs)}", f"fails: {error or 'no error'}"),
    ]


def chart(ours: list[float], exact: float, theirs: list[float], error: str | None, prompt: int, b: Bench) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def windowed(times: list[float], width: int = 64) -> tuple[list[int], list[float]]:
        xs = list(range(width, len(times), width // 4))
        return xs, [width / (times[x] - times[x - width]) for x in xs]

    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=110)
    ax.plot(*windowed(ours), label="wmgen, default --evict (256)", color="tab:blue")
    if theirs:
        ax.plot(*windowed(theirs), label="transformers model.generate()", color="tab:orange")
        if error:
            ax.plot([len(theirs)], [0], marker="x", markersize=12, color="tab:red", clip_on=False)
            ax.annotate(f"model.generate() stops at token {len(theirs)}:\n{error[:60]}", (len(theirs), 0),
                        xytext=(len(theirs) + 120, 4), fontsize=8, color="tab:red")
    full_at = 1024 - prompt
    ax.plot([full_at, len(ours)], [exact, exact], linestyle="--", color="tab:green",
            label=f"exact sliding window (--evict 1), {exact:.2f} tokens/s once memory is full")
    ax.set_xlabel("tokens generated (capacity 1024, 32-token prompt)")
    ax.set_ylabel("tokens/s (over the last 64)")
    ax.set_ylim(bottom=0)
    ax.set_xlim(0, len(ours))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(f"{b.info.name if b.folder != CACHE else 'random gpt2-shaped model'}, fp32, greedy · {machine()}", fontsize=9)
    fig.tight_layout()
    fig.savefig(CHART)
    print(f"wrote {CHART.relative_to(Path.cwd()) if CHART.is_relative_to(Path.cwd()) else CHART}", file=sys.stderr)


EXACT_TOKENS = 4


def exact_sliding(b: Bench) -> float:
    """Tokens/s of the exact sliding window from a full memory, where every token
    recomputes the 1023 before it (measured once, over a few tokens)."""
    if b.exact_rate is None:
        b.exact_rate = rate(b.wmgen(prompt_of(1024), EXACT_TOKENS + 1, evict=1))
    return b.exact_rate


def bench_sweep(b: Bench) -> list[tuple]:
    """Tokens/s from a full memory of 1024 per --evict, over one eviction cycle:
    a recompute of the 1024 - evict tokens left, then evict decode steps."""
    full, rows = prompt_of(1024), [(f"from a full memory, --evict 1 ({EXACT_TOKENS} tokens)", f"{exact_sliding(b):.2f}", "", "")]
    for evict in (16, 64, 256, 512):
        # the first token evicts before its time is taken; the next `evict` hold one eviction
        rows.append((f"from a full memory, --evict {evict} ({evict} tokens)", f"{rate(b.wmgen(full, evict + 1, evict=evict)):.1f}", "", ""))
    return rows


def bandwidth() -> float:
    """Memory read bandwidth, bytes/s: the best of three sums over 1 GiB."""
    x = torch.ones(2**28)
    best = min(_timed(x.sum) for _ in range(3))
    return x.nbytes / best


def _timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def bench_ceiling(b: Bench, reps: int = 3) -> list[tuple]:
    """What one stream could reach if a step only read its weights once: memory
    bandwidth ÷ weight bytes. Each bandwidth reading is paired with decode runs
    right beside it, since a shared machine's bandwidth moves from minute to minute."""
    rows = []
    for name in ("float32", *QUANTIZED):
        lm = b.lm_in(name)
        model, pairs = lm.network, []
        for _ in range(reps):
            speed = decode_rate(b.wmgen(prompt_of(32), 72, lm=lm))
            pairs.append((bandwidth(), speed))
        bw, speed = (statistics.median(column) for column in zip(*pairs))
        share = statistics.median(s / (w / model.nbytes) for w, s in pairs)
        rows.append((f"{name}: short-context decode vs bandwidth ({bw / 1e9:.1f} GB/s) ÷ {model.nbytes / 1e6:.0f} MB of weights",
                     f"{speed:.1f} of {bw / model.nbytes:.0f}", "", f"{share:.0%} of ceiling"))
    return rows


def bench_int8(b: Bench, windows: int = 2, width: int = 512) -> list[tuple]:
    """Fidelity of --dtype int8 and int4: next-token distributions vs float32 on the
    same weights, both as generation sees them (one token per step) and as a prompt
    read in one pass sees them (int8: activations in groups of 16). On the
    benchmark's model over WikiText-2 test text (the size of the quantization noise:
    its distributions are nearly flat), and on pydoc-small over its held-out text,
    with perplexity (what the noise does to a trained model)."""
    import wmgen

    rows = []
    if WIKITEXT.is_file():
        ids = b.tokenizer.encode(WIKITEXT.read_text(encoding="utf-8")[: 6_000 * windows])[: windows * width]
        for dtype in QUANTIZED:
            rows += fidelity_rows(f"{b.folder.name}, {len(ids)} WikiText-2 tokens", dtype, b.model, b.lm_in(dtype).network, ids, width)
    else:
        rows.append(("quantized fidelity", "skipped: no WikiText-2 at " + str(WIKITEXT), "", ""))
    if not (PYDOC / "model.safetensors").is_file():
        return rows + [("quantized on pydoc-small", "skipped: no model at " + str(PYDOC), "", "")]
    small = {dtype: wmgen.load(str(PYDOC), device="cpu", dtype=dtype) for dtype in ("float32", *QUANTIZED)}
    text = HELDOUT.read_text(encoding="utf-8")
    width = small["float32"].n_positions
    ids = small["float32"].encode(text[: 12_000 * windows])[: windows * width]
    for dtype in QUANTIZED:
        rows += fidelity_rows(f"pydoc-small, {len(ids)} held-out tokens", dtype, small["float32"].network, small[dtype].network, ids, width)
    four = fidelity_rows(f"pydoc-small, {len(ids)} held-out tokens", "int4", small["int8"].network, small["int4"].network, ids, width)
    rows.append((four[0][0].replace("int4 vs float32", "int4 vs int8"), *four[0][1:]))
    exact = small["float32"].perplexity(text, max_tokens=20_000).perplexity
    for dtype in QUANTIZED:
        quant = small[dtype].perplexity(text, max_tokens=20_000).perplexity
        rows.append((f"pydoc-small perplexity, first 20,000 held-out tokens (capacity 512, evict 128): {dtype} vs float32",
                     f"{quant:.3f} vs {exact:.3f}", "", f"{quant / exact - 1:+.2%}"))
    return rows


QUANTIZED = ("int8", "int4")


def fidelity_rows(what: str, name: str, exact_model, quant_model, ids: list[int], width: int) -> list[tuple]:
    """Mean KL, share of same top tokens and relative logit error of `quant_model`
    (`--dtype name`) against `exact_model` over `ids` in windows of `width`."""
    stats = {"one token per step": [], "a prompt read at once": []}
    with torch.inference_mode():
        for w in range(0, len(ids), width):
            window = torch.tensor([ids[w : w + width]])
            exact = exact_model.logits(exact_model.forward(window, 0, exact_model.new_store(width))[0]).float()
            q, store = quant_model, quant_model.new_store(width)
            steps = torch.cat([q.logits(q.forward(window[:, i : i + 1], i, store)[0]) for i in range(window.shape[1])])
            whole = q.logits(q.forward(window, 0, q.new_store(width))[0])
            for part, quant in (("one token per step", steps.float()), ("a prompt read at once", whole.float())):
                p_log, q_log = exact.log_softmax(-1), quant.log_softmax(-1)
                stats[part].append((
                    (p_log.exp() * (p_log - q_log)).sum(-1),
                    (exact.argmax(-1) == quant.argmax(-1)).float(),
                    (quant - exact).norm(dim=-1) / exact.norm(dim=-1),
                ))
    rows = []
    for part, parts in stats.items():
        kl, same, rel = (torch.cat(column).mean().item() for column in zip(*parts))
        rows.append((f"{name} vs float32, {part}, {what}: mean KL (nats) · same top token · logit error ‖Δ‖/‖fp32‖",
                     f"{kl:.1e} · {same:.1%} · {rel:.1%}", "", ""))
    return rows


PIPELINE_SCRIPT = """
import sys
from transformers import pipeline
generator = pipeline("text-generation", model=sys.argv[1], device="cpu")
out = generator("The lighthouse keeper", max_new_tokens=1, do_sample=False)
sys.stdout.write(out[0]["generated_text"]); sys.stdout.flush()
"""


def first_byte(command: list[str]) -> tuple[float, float]:
    """Seconds until the command's first byte on stdout, and its peak RSS in MiB."""
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


def bench_startup(b: Bench, reps: int) -> list[tuple]:
    """Wall time of `wmgen --help`; time to first token and peak RSS of a `wmgen
    generate` process vs a `transformers` pipeline script on the same model."""
    beside = Path(sys.executable).with_name("wmgen")  # the environment running this script
    wmgen = str(beside) if beside.is_file() else shutil.which("wmgen") or sys.exit("wmgen is not installed in this environment")
    folder = str(b.folder)
    helps = [first_byte([wmgen, "--help"])[0] for _ in range(reps + 2)]
    ours, theirs = [], []
    for _ in range(reps):  # interleaved
        ours.append(first_byte([wmgen, "generate", "-m", folder, "-n", "1", "-t", "0", "--no-save", "The lighthouse keeper"]))
        theirs.append(first_byte([sys.executable, "-c", PIPELINE_SCRIPT, folder]))
    torch_rss = statistics.median(first_byte([sys.executable, "-c", "import torch; print(1)"])[1] for _ in range(reps))
    t_ours, t_theirs = (statistics.median(o[0] for o in runs) for runs in (ours, theirs))
    rss_ours, rss_theirs = (statistics.median(o[1] for o in runs) for runs in (ours, theirs))
    kv = 1024 * b.model.config.n_layer * 2 * b.model.config.n_embd * 4
    budget = torch_rss + (b.model.nbytes + kv) / 2**20 + 120
    return [
        ("`wmgen --help`, wall s (first byte)", f"{statistics.median(helps):.2f}", "", ""),
        ("time to first token, s (process start to first byte)", f"{t_ours:.2f}", f"{t_theirs:.2f} (pipeline script)", f"{t_ours / t_theirs:.2f}×"),
        ("peak RSS, MiB", f"{rss_ours:.0f}", f"{rss_theirs:.0f} (pipeline script)", f"{rss_ours / rss_theirs:.2f}×"),
        ("  target: `import torch` RSS + weights + KV (1024 tokens) + 120 MiB", f"{budget:.0f}", "", f"{rss_ours / budget:.2f}×"),
    ]


def bench_batch(b: Bench, reps: int, n: int = 48) -> list[tuple]:
    """Total tokens/s of B prompts run as one batch vs the same prompts one by one."""

    def together(prompts) -> float:
        return _timed(lambda: b.lm.generate_many(prompts, max_new_tokens=n + 1, ignore_eos=True, temperature=0, capacity=1024, seed=0))

    rows = []
    for size in (1, 4, 8):
        prompts = [list(range(1000 + 40 * r, 1032 + 40 * r)) for r in range(size)]
        one, alone = [], []
        for _ in range(reps):
            one.append(size * n / together(prompts))
            alone.append(size * n / sum(b.wmgen(p, n)[-1] for p in prompts))
        mt, ma = statistics.median(one), statistics.median(alone)
        rows.append((f"{size} prompts × {n} tokens, one batch vs one by one", f"{mt:.1f}", f"{ma:.1f} (wmgen, one by one)", f"{mt / ma:.2f}×"))
    return rows


POLICIES = ("oldest", "boundary", "attention")


def bench_policies(b: Bench, reps: int) -> list[tuple]:
    """Each policy's speed: decoding at a 900-token context (no eviction: what the
    attention policy's scoring costs a step), and 600 tokens at capacity 256 (six
    evictions, each policy choosing its own tokens to drop)."""
    prompt = prompt_of(900)
    steady = {p: [] for p in POLICIES}
    rolling = {p: [] for p in POLICIES}
    for _ in range(reps):  # interleaved
        for p in POLICIES:
            steady[p].append(decode_rate(b.wmgen(prompt, 72, policy=p)))
            rolling[p].append(600 / b.wmgen(prompt_of(32), 600, capacity=256, policy=p)[-1])
    base, base_rolling = statistics.median(steady["oldest"]), statistics.median(rolling["oldest"])
    rows = []
    for p in POLICIES:
        s, r = statistics.median(steady[p]), statistics.median(rolling[p])
        rows.append((f"--policy {p}: decode at a 900-token context (÷ oldest)", f"{s:.1f}", "", f"{s / base:.3f}×"))
        rows.append((f"--policy {p}: 600 tokens at capacity 256, 6 evictions (÷ oldest)", f"{r:.1f}", "", f"{r / base_rolling:.3f}×"))
    return rows


def llama_files(binary: Path, folder: Path) -> dict[str, Path]:
    """The benchmark's checkpoint as llama.cpp's GGUF files, one per format: converted
    with the `convert_hf_to_gguf.py` of the source tree `binary` was built in
    (build/bin/llama-bench), quantized with the `llama-quantize` beside it, and kept
    in benchmarks/.cache/gguf/. The converter reads `n_ctx`, which transformers 5 no
    longer writes, so it converts a copy of the folder whose config says it."""
    import json

    source = next((d for d in binary.resolve().parents if (d / "convert_hf_to_gguf.py").is_file()), None)
    if source is None:
        sys.exit(f"no convert_hf_to_gguf.py in the folders above {binary}: give the llama-bench built in a llama.cpp source tree")
    out = HERE / ".cache" / "gguf"
    out.mkdir(parents=True, exist_ok=True)
    files = {kind: out / f"{folder.name}-{kind}.gguf" for kind, _ in LLAMA_FORMATS}
    if not files["f32"].is_file():
        copy = out / "hf"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(folder, copy)
        config = json.loads((copy / "config.json").read_text())
        config.setdefault("n_ctx", config.get("n_positions", 1024))
        (copy / "config.json").write_text(json.dumps(config))
        env = {**os.environ, "PYTHONPATH": str(source / "gguf-py")}
        subprocess.run([sys.executable, str(source / "convert_hf_to_gguf.py"), str(copy), "--outtype", "f32",
                        "--outfile", str(files["f32"])], check=True, env=env, capture_output=True)
        shutil.rmtree(copy)
    for kind, path in files.items():
        if not path.is_file():
            subprocess.run([str(binary.parent / "llama-quantize"), str(files["f32"]), str(path), kind.upper()],
                           check=True, capture_output=True)
    return files


def llama_rate(binary: Path, model: Path, *args: str) -> float:
    """llama-bench's median tokens/s over its samples (2 threads, generation only)."""
    import json

    done = subprocess.run([str(binary), "-m", str(model), "-t", str(torch.get_num_threads()), "-p", "0", "-r", "5", "-o", "json", *args],
                          check=True, capture_output=True, text=True)
    return statistics.median(json.loads(done.stdout)[0]["samples_ts"])


def bench_llama(b: Bench, binary: Path | None, reps: int) -> list[tuple]:
    """llama.cpp's `llama-bench` and wmgen on the same weights, interleaved in rounds:
    tg128 (128 tokens after an empty context) against 128 greedy tokens after a
    32-token prompt, and 64 tokens at a depth of 900 (flash attention off, its
    faster setting on these CPUs) against 64 after a 900-token prompt; per format,
    f32 / Q8_0 / Q4_0 against float32 / int8 / int4."""
    if binary is None:
        return [("llama.cpp", "skipped: give --llama-bench PATH (or WMGEN_LLAMA_BENCH) to a llama-bench built from source", "", "")]
    files = llama_files(binary, b.folder)
    runs: dict = {(kind, where): ([], []) for kind, _ in LLAMA_FORMATS for where in ("short", "deep")}
    for _ in range(reps):
        for kind, dtype in LLAMA_FORMATS:
            lm = b.lm_in(dtype)
            ours, theirs = runs[kind, "short"]
            theirs.append(llama_rate(binary, files[kind], "-n", "128"))
            ours.append(decode_rate(b.wmgen(prompt_of(32), 128, lm=lm)))
            ours, theirs = runs[kind, "deep"]
            theirs.append(llama_rate(binary, files[kind], "-n", str(DEEP_TOKENS), "-d", str(DEPTH), "-fa", "0"))
            ours.append(decode_rate(b.wmgen(prompt_of(DEPTH), DEEP_TOKENS, lm=lm)))
    rows = []
    for kind, dtype in LLAMA_FORMATS:
        for where, what in (("short", "short context (tg128)"), ("deep", f"at {DEPTH} tokens (-d {DEPTH} -fa 0)")):
            ours, theirs = (statistics.median(r) for r in runs[kind, where])
            rows.append((f"{dtype} vs llama.cpp {kind.upper()}, {what}", f"{ours:.1f}", f"{theirs:.1f}", f"{ours / theirs:.2f}×"))
    return rows


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def table(rows, against: str = "transformers") -> str:
    out = [f"| what | wmgen | {against} | ratio |", "|---|---|---|---|"]
    out += [f"| {' | '.join(r)} |" for r in rows]
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=[*PARTS, "batch", "llama"], action="append", help="run only these parts (repeatable)")
    p.add_argument("--reps", type=int, default=3, help="repetitions for decode, startup and batch (default 3)")
    p.add_argument("--model", type=Path, help="a checkpoint folder to measure instead of the random gpt2-shaped model")
    p.add_argument("--llama-bench", type=Path, default=os.environ.get("WMGEN_LLAMA_BENCH") or None,
                   help="llama.cpp's llama-bench, built in its source tree, for the llama part (also WMGEN_LLAMA_BENCH)")
    args = p.parse_args()
    parts = args.only or PARTS
    t0 = time.perf_counter()
    b = Bench(args.model or build_model())
    rows, llama_rows = [], []
    for part in parts:
        print(f"[{time.perf_counter() - t0:5.0f} s] {part}", file=sys.stderr)
        if part == "decode":
            rows += bench_decode(b, args.reps)
        elif part == "long":
            rows += bench_long(b)
        elif part == "sweep":
            rows += bench_sweep(b)
        elif part == "ceiling":
            rows += bench_ceiling(b)
        elif part == "int8":
            rows += bench_int8(b)
        elif part == "policies":
            rows += bench_policies(b, args.reps)
        elif part == "startup":
            rows += bench_startup(b, args.reps)
        elif part == "batch":
            rows += bench_batch(b, args.reps)
        elif part == "llama":
            llama_rows = bench_llama(b, args.llama_bench, args.reps)
    print(f"machine: {machine()}; fp32 unless marked, batch 1, greedy unless marked; {time.perf_counter() - t0:.0f} s in all")
    for lm in (b.lm, b._lm8, *b._quantized.values()):
        if lm is not None:
            print(f"kernels: {lm.kernels}")
    if rows:
        print(table(rows))
    if llama_rows:
        print(table(llama_rows, against="llama.cpp"))


if __name__ == "__main__":
    main()
