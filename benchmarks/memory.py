"""What each weight format costs in memory on the large GPT-2s: peak RSS of a whole
`wmgen generate` run for a random model of the `gpt2-xl` shape (48 layers, 1600
wide, 25 heads: 1.56B parameters), in float32, int8 and int4.

    python benchmarks/memory.py               # about 10 minutes on 2 cores, 7 GB of disk
    python benchmarks/memory.py --shape gpt2  # the small one, for a quick look

The checkpoint is built once in benchmarks/.cache/ (random weights: memory and
speed do not depend on their values) with the real GPT-2 tokenizer. Each run is its
own process, measured by /usr/bin/time; it loads the weights (mapped from the file,
quantized as they are read), reads a short prompt and generates 16 tokens greedily.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench import TOKENIZER, machine  # noqa: E402

SHAPES = {"gpt2-xl": dict(n_embd=1600, n_layer=48, n_head=25), "gpt2-large": dict(n_embd=1280, n_layer=36, n_head=20),
          "gpt2": dict(n_embd=768, n_layer=12, n_head=12)}


def build(name: str) -> Path:
    """A random checkpoint of the shape `name`, written tensor by tensor (no model object:
    the float32 weights of gpt2-xl are 6.2 GB)."""
    import torch
    from safetensors.torch import save_file

    folder = HERE / ".cache" / f"{name}-random"
    if (folder / "model.safetensors").is_file():
        return folder
    if not (TOKENIZER / "tokenizer.json").is_file():
        sys.exit(f"the benchmark needs the GPT-2 tokenizer at {TOKENIZER}")
    print(f"building a random {name}-shaped model in {folder} (once)", file=sys.stderr)
    folder.mkdir(parents=True, exist_ok=True)
    shape = SHAPES[name]
    E, L, V, P = shape["n_embd"], shape["n_layer"], 50257, 1024
    g = torch.Generator().manual_seed(0)

    def normal(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=g) * 0.02

    tensors = {"transformer.wte.weight": normal(V, E), "transformer.wpe.weight": normal(P, E),
               "transformer.ln_f.weight": torch.ones(E), "transformer.ln_f.bias": torch.zeros(E)}
    for i in range(L):
        h = f"transformer.h.{i}."
        for norm in ("ln_1", "ln_2"):
            tensors[h + norm + ".weight"], tensors[h + norm + ".bias"] = torch.ones(E), torch.zeros(E)
        for part, (rows, cols) in {"attn.c_attn": (E, 3 * E), "attn.c_proj": (E, E), "mlp.c_fc": (E, 4 * E), "mlp.c_proj": (4 * E, E)}.items():
            tensors[h + part + ".weight"], tensors[h + part + ".bias"] = normal(rows, cols), torch.zeros(cols)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": V, "n_positions": P, "n_ctx": P,
              "n_embd": E, "n_layer": L, "n_head": shape["n_head"], "activation_function": "gelu_new",
              "layer_norm_epsilon": 1e-5, "bos_token_id": 50256, "eos_token_id": 50256, "tie_word_embeddings": True}
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    for file in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.copy(TOKENIZER / file, folder / file)
    return folder


def measure(folder: Path, dtype: str) -> tuple[float, float, str]:
    """Peak RSS in MiB, wall seconds, and the run's stats line."""
    command = ["/usr/bin/time", "-v", sys.executable, "-m", "wmgen", "generate", "The lighthouse keeper", "-m", str(folder),
               "--dtype", dtype, "-n", "16", "-t", "0", "--ignore-eos", "--no-save", "--stats"]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1)) / 1024
    h, m, s = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", done.stderr).groups()
    stats = next((line for line in done.stderr.splitlines() if line.startswith("prompt ")), "")
    return rss, int(h or 0) * 3600 + int(m) * 60 + float(s), stats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="gpt2-xl")
    args = p.parse_args()
    if not Path("/usr/bin/time").is_file():
        sys.exit("the benchmark needs /usr/bin/time (Debian's package time)")
    folder = build(args.shape)
    weights = (folder / "model.safetensors").stat().st_size
    rows = []
    for dtype in ("float32", "int8", "int4"):
        rss, seconds, stats = measure(folder, dtype)
        speed = re.search(r"([\d.]+) tokens/s", stats)
        rows.append((dtype, f"{rss:,.0f}", f"{rss * 2**20 / weights:.2f}", f"{seconds:.1f}", speed.group(1) if speed else "?"))
        print(f"{dtype}: {rss:.0f} MiB", file=sys.stderr)
    print(f"machine: {machine()}; {args.shape} shape, {weights / 1e9:.2f} GB of float32 weights in the file; 16 greedy tokens")
    print("| --dtype | peak RSS, MiB | ÷ float32 file | wall s (load + 16 tokens) | tokens/s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {' | '.join(r)} |")


if __name__ == "__main__":
    main()
