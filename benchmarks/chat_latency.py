"""A turn's time to first token: `wmgen chat`, whose memory stays live between
turns, against `wmgen generate -c`, a new process that loads the model and reads
the saved memory again, on the same ~500-token memory.

    python benchmarks/chat_latency.py              # about a minute on 2 cores
    python benchmarks/chat_latency.py --reps 9 --model PATH

Both are real processes, run as a user runs them. `generate -c` is timed from
process start to its first byte on stdout. `chat` is fed through a pipe: a line
is written and timed to the first byte of the reply; after it the benchmark waits
as a person typing would (--pause), and chat saves the memory meanwhile. Each turn
types the same text and asks for one token, greedily. The model is the random
gpt2-shaped one of bench.py (benchmarks/.cache/gpt2-random).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import WIKITEXT, build_model, machine

WMGEN = [sys.executable, "-m", "wmgen"]
TURN = " And then"


def environment(home: Path) -> dict:
    return os.environ | {"WMGEN_HOME": str(home), "HF_HUB_OFFLINE": "1"}


def saved_memory(folder: Path, home: Path, tokens: int, source: Path) -> Path:
    """Session 'base': the first ~`tokens` tokens of `source`, read by `generate`."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    text = tok.decode(tok.encode(source.read_text(encoding="utf-8")[: 40 * tokens]).ids[: tokens - 1])
    prompt = home / "prompt.txt"
    prompt.write_text(text, encoding="utf-8")
    subprocess.run([*WMGEN, "generate", "-m", str(folder), "-f", str(prompt), "-n", "1", "-t", "0", "-q", "-s", "base"],
                   check=True, stdout=subprocess.DEVNULL, env=environment(home))
    return home / "sessions" / "base.json"


def copy_session(home: Path, base: Path, name: str) -> None:
    shutil.copy(base, home / "sessions" / f"{name}.json")


def generate_turn(folder: Path, home: Path, base: Path) -> float:
    """`wmgen generate -c`, process start to first byte, on a fresh copy of the memory."""
    copy_session(home, base, "gen")
    argv = [*WMGEN, "generate", "-m", str(folder), "-c", "-s", "gen", "-n", "1", "-t", "0", "--ignore-eos", "-q", TURN]
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, env=environment(home))
    proc.stdout.read(1)
    elapsed = time.perf_counter() - t0
    proc.stdout.read()
    if proc.wait():
        sys.exit(f"generate -c failed with status {proc.returncode}")
    return elapsed


class Chat:
    """A `wmgen chat` process on pipes, started from a copy of the memory."""

    def __init__(self, folder: Path, home: Path, base: Path):
        copy_session(home, base, "chat")
        argv = [*WMGEN, "chat", "-m", str(folder), "-s", "chat", "-n", "1", "-t", "0", "--ignore-eos", "-q"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=environment(home), bufsize=0)
        self.out = self.proc.stdout.fileno()

    def turn(self, pause: float) -> float:
        """A line written, timed to the reply's first byte; then, after `pause`
        (the rest of the reply and the save come in it), what it wrote is read."""
        t0 = time.perf_counter()
        self.proc.stdin.write((TURN + "\n").encode())
        if not select.select([self.out], [], [], 120)[0]:
            sys.exit("chat did not answer in 120 s")
        elapsed = time.perf_counter() - t0
        time.sleep(pause)
        while select.select([self.out], [], [], 0)[0]:
            if not os.read(self.out, 1 << 16):
                sys.exit(f"chat ended early, status {self.proc.wait()}")
        return elapsed

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.stdout.read()
        if self.proc.wait(timeout=60):
            sys.exit(f"chat failed with status {self.proc.returncode}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5, help="turns of each kind (default 5)")
    p.add_argument("--tokens", type=int, default=500, help="tokens in the memory (default 500)")
    p.add_argument("--pause", type=float, default=0.5, help="seconds between chat turns (default 0.5)")
    p.add_argument("--model", type=Path, help="a checkpoint folder instead of the random gpt2-shaped model")
    p.add_argument("--text", type=Path, default=WIKITEXT, help="the text the memory is read from (default: WikiText-2's test set)")
    args = p.parse_args()
    folder = args.model or build_model()
    with tempfile.TemporaryDirectory() as scratch:
        home = Path(scratch)
        base = saved_memory(folder, home, args.tokens, args.text)
        fill = json.loads(base.read_text())["fill"]
        chat = Chat(folder, home, base)
        chat.turn(args.pause)  # the first reply: the process has started and read the memory
        ours, theirs = [], []
        for _ in range(args.reps):  # interleaved
            ours.append(chat.turn(args.pause))
            theirs.append(generate_turn(folder, home, base))
        chat.close()
    t_chat, t_gen = statistics.median(ours), statistics.median(theirs)
    print(f"machine: {machine()}; memory {fill} tokens; median of {args.reps} turns, one greedy token each")
    print("| what | time to first token, s | ratio |")
    print("|---|---:|---:|")
    print(f"| `wmgen generate -c` (a new process: start-up, then the memory read again) | {t_gen:.3f} | 1× |")
    print(f"| `wmgen chat`, a turn (the memory live) | {t_chat:.3f} | {t_gen / t_chat:.1f}× faster |")


if __name__ == "__main__":
    main()
