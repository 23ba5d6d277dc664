"""The command-line options more than one command takes, written once as
`Annotated` types: `generate` and `chat` read the same model, sampling, memory and
session options, with the same flags and help. (No torch here: `wmgen --help`
imports this.)"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

POLICY_HELP = ("What a full memory forgets: oldest (default), boundary (the oldest, cut at the end of a sentence or line) "
               "or attention (the least attended, keeping --recent tokens).")
RECENT_HELP = "With --policy attention: the most recent tokens, always kept. (default: half of capacity - keep)"
DTYPE_HELP = "auto, float32, bfloat16, float16, int8 or int4 (opt-in, CPU: quantized weights, faster and smaller, approximate; see README)."

# sampling and the run
MaxNewTokens = Annotated[Optional[int], typer.Option("-n", "--max-new-tokens", help="Tokens to generate at most. (default: 100)", show_default=False)]
Temperature = Annotated[Optional[float], typer.Option("-t", "--temperature", help="Softmax temperature; 0 is greedy. (default: 1.0)", show_default=False)]
TopK = Annotated[Optional[int], typer.Option("--top-k", help="Sample from the k most likely tokens; 0 is off.", show_default=False)]
TopP = Annotated[Optional[float], typer.Option("--top-p", help="Sample from the smallest set of tokens with this much probability, in (0, 1]; 1 is off.", show_default=False)]
RepetitionPenalty = Annotated[Optional[float], typer.Option("--repetition-penalty", help="Penalise tokens already in memory (> 1 discourages repeats); 1 is off.", show_default=False)]
Seed = Annotated[Optional[int], typer.Option("--seed", help="Seed for sampling: same seed and settings, same text.", show_default=False)]
Stop = Annotated[Optional[list[str]], typer.Option("--stop", help="Stop when this text appears (not printed). Repeatable.", show_default=False)]
Lookahead = Annotated[Optional[int], typer.Option("--lookahead", help="Draft up to N tokens per step from text already in memory and check them in one pass (lookup decoding): the same tokens, faster on text that repeats its input; 0 is off. (default: 0)", show_default=False)]
IgnoreEos = Annotated[Optional[bool], typer.Option("--ignore-eos", help="Keep going past <|endoftext|>.", show_default=False)]

# the memory's shape
Capacity = Annotated[Optional[int], typer.Option("--capacity", help="Working memory size in tokens. (default: the model's limit, 1024 for gpt2)", show_default=False)]
Keep = Annotated[Optional[str], typer.Option("--keep", help="Pinned tokens at the head of memory, a count or 'prompt'. (default: 0)", show_default=False)]
Evict = Annotated[Optional[int], typer.Option("--evict", help="Tokens dropped per eviction; 1 is the exact sliding window. (default: a quarter of capacity - keep)", show_default=False)]
Policy = Annotated[Optional[str], typer.Option("--policy", help=POLICY_HELP, show_default=False)]
Recent = Annotated[Optional[int], typer.Option("--recent", help=RECENT_HELP, show_default=False)]

# the model
Model = Annotated[Optional[str], typer.Option("--model", "-m", help="Hub id or local folder of a GPT-2 checkpoint. (default: gpt2)", show_default=False)]
Device = Annotated[Optional[str], typer.Option("--device", help="auto, cpu, cuda or mps.", show_default=False)]
Dtype = Annotated[Optional[str], typer.Option("--dtype", help=DTYPE_HELP, show_default=False)]
Config = Annotated[Optional[str], typer.Option("--config", help="A preset name (default, precise, creative, balanced, longform) or a .toml file.", show_default=False)]

# sessions and reporting
Continue = Annotated[bool, typer.Option("-c", "--continue", help="Continue from the saved memory of the session, and save back to it.")]
NoSave = Annotated[bool, typer.Option("--no-save", help="Do not save the final memory.")]
Quiet = Annotated[bool, typer.Option("-q", "--quiet", help="No notices on stderr.")]
TracePath = Annotated[Optional[str], typer.Option("--trace", help="Write the memory's ledger to this file as it happens: every read, eviction and edit, as JSON Lines (see wmgen timeline).", show_default=False)]
NoColor = Annotated[bool, typer.Option("--no-color", help="No colour (also NO_COLOR).")]

