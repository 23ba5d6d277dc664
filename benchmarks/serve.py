"""`wmgen serve` against a cold `wmgen generate`, and under load, in one run.

    python benchmarks/serve.py                        # about 3 minutes on 2 cores
    python benchmarks/serve.py --clients 8 --requests 6 --tokens 32
    python benchmarks/serve.py --model PATH

On loopback only. The server is a real `wmgen serve` process on a free port, the
clients real HTTP clients (httpx, in threads of this process; each waits on its
socket), and `wmgen generate` real processes. The model is the random gpt2-shaped
one of bench.py (benchmarks/.cache/gpt2-random): speed does not depend on the
weights. Three parts:

- latency: the first token of a short request from a warm server (streamed),
  and `wmgen generate --server` as a whole process, each against a cold `wmgen
  generate` (whole process, to its first byte on stdout); medians, interleaved;
- concurrency: total tokens/s of 8 streaming clients at once against one alone;
- load: N clients x M requests each, as fast as they are answered: throughput,
  latency percentiles and errors.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from bench import build_model, first_byte, machine

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from serving import Served  # noqa: E402

PROMPTS = ["The lighthouse keeper", "Once upon a time", "In the beginning", "def main():", "Dear diary,", "The weather today",
           "Chapter one.", "import numpy as np"]


def first_token(url: str, prompt: str) -> float:
    """Seconds from sending a streamed request to its first token."""
    t = time.perf_counter()
    body = {"prompt": prompt, "max_tokens": 1, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: ") and '"text"' in line:
                elapsed = time.perf_counter() - t
                break
        for _ in lines:
            pass
    return elapsed


def stream_tokens(url: str, prompt: str, tokens: int) -> int:
    """One streamed request of `tokens` tokens; the tokens that came."""
    got = 0
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 1.0, "seed": 1, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                got += sum(1 for c in chunk["choices"] if c.get("finish_reason") is None)
    return got


def together(n: int, work) -> tuple[float, list]:
    """`work(i)` in n threads started at once: wall seconds, results."""
    results: list = [None] * n
    barrier = threading.Barrier(n)

    def run(i):
        barrier.wait()
        results[i] = work(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return time.perf_counter() - t, results


def bench_latency(served: Served, folder: Path, home: Path, reps: int) -> list[tuple]:
    env_cmd = [sys.executable, "-m", "wmgen", "generate"]
    cold, client, warm = [], [], []
    for i in range(reps):
        prompt = PROMPTS[i % len(PROMPTS)]
        cold.append(first_byte([*env_cmd, "-m", str(folder), "-n", "1", "-t", "0", "--no-save", "-q", "--no-stdin", prompt])[0])
        client.append(first_byte([*env_cmd, "--server", served.url, "-n", "1", "-t", "0", "--no-save", "-q", "--no-stdin", prompt])[0])
        warm.append(first_token(served.url, prompt))
    c, s, w = (statistics.median(x) for x in (cold, client, warm))
    return [
        ("cold `wmgen generate` (whole process), first byte", f"{c:.3f} s", "1.00×"),
        ("warm server, first token of a streamed request", f"{w:.3f} s", f"{w / c:.3f}× (target ≤ 0.1×)"),
        ("`wmgen generate --server` (whole process), first byte", f"{s:.3f} s", f"{s / c:.3f}× (target ≤ 0.2×)"),
    ]


def bench_concurrency(served: Served, tokens: int, clients: int = 8) -> list[tuple]:
    served.wait_idle()
    wall1, got1 = together(1, lambda i: stream_tokens(served.url, PROMPTS[0], tokens))
    one = sum(got1) / wall1
    wall8, got8 = together(clients, lambda i: stream_tokens(served.url, PROMPTS[i % len(PROMPTS)], tokens))
    many = sum(got8) / wall8
    return [
        ("one streaming client", f"{one:.1f} tokens/s", "1.00×"),
        (f"{clients} streaming clients at once, in all", f"{many:.1f} tokens/s", f"{many / one:.2f}× (target ≥ 2.5×)"),
    ]


def bench_load(served: Served, clients: int, requests: int, tokens: int) -> list[tuple]:
    served.wait_idle()
    latencies: list[float] = []
    errors: list[str] = []
    generated = [0]
    lock = threading.Lock()

    def client(i):
        with httpx.Client(timeout=600) as http:
            for j in range(requests):
                body = {"prompt": PROMPTS[(i + j) % len(PROMPTS)], "max_tokens": tokens, "temperature": 0.8, "seed": i * 1000 + j}
                t = time.perf_counter()
                try:
                    r = http.post(f"{served.url}/v1/completions", json=body)
                    ok = r.status_code == 200
                except httpx.HTTPError as e:
                    ok, r = False, e
                with lock:
                    if ok:
                        latencies.append(time.perf_counter() - t)
                        generated[0] += r.json()["usage"]["completion_tokens"]
                    else:
                        errors.append(str(getattr(r, "status_code", r)))

    wall, _ = together(clients, client)
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [latencies[0]] * 99
    return [
        (f"{clients} clients × {requests} requests of {tokens} tokens", f"{len(latencies) / wall:.2f} requests/s", ""),
        ("tokens generated per second, in all", f"{generated[0] / wall:.1f}", ""),
        ("latency p50 / p90 / p99", f"{q[49]:.2f} / {q[89]:.2f} / {q[98]:.2f} s", ""),
        ("errors", str(len(errors)) + (f" ({', '.join(sorted(set(errors)))})" if errors else ""), "none expected"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a checkpoint folder (default: the random gpt2-shaped one)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=48, help="tokens per request (concurrency and load)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=4, help="requests per client (load)")
    parser.add_argument("--max-rows", type=int, default=8)
    args = parser.parse_args()
    folder = args.model or build_model()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        os.environ["WMGEN_HOME"] = str(home)
        t = time.perf_counter()
        served = Served(folder, home, "--max-rows", str(args.max_rows), "-q", threads=None)
        print(f"server ready in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        try:
            first_token(served.url, "warm up")
            rows = [("**latency**", "", "")] + bench_latency(served, folder, home, args.reps)
            rows += [("**concurrency**", "", "")] + bench_concurrency(served, args.tokens, args.clients)
            rows += [("**load**", "", "")] + bench_load(served, args.clients, args.requests, args.tokens)
        finally:
            code = served.stop()
        print(f"\n{machine()} · model {folder.name} · server --max-rows {args.max_rows} (stopped with exit {code})\n")
        print("| what | measured | ratio |\n|---|---|---|")
        for r in rows:
            print(f"| {' | '.join(r)} |")


if __name__ == "__main__":
    main()
