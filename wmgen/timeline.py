"""`wmgen timeline`: a trace (`wmgen.trace`) drawn as what the memory held over time.

x is the step, y the tokens in the order they were read; a cell is filled wherever a
token is in memory at that step. Its colour is the attention the slot received
(under the attention policy, which measures it), else the token's origin.
Evictions are marked where they fall (a red tick for each token dropped, and the
step, below the axis), with the slots recomputed after them; pinned rows are marked
on the left. As a picture (PNG or SVG, with matplotlib) or, without `-o`, as a view
for the terminal.
"""

from __future__ import annotations

import math
from pathlib import Path

ORIGIN_COLOURS = {"prompt": "#4c72b0", "generated": "#55a868", "continued": "#8172b2", "inserted": "#dd8452"}
ORIGIN_STYLES = {"prompt": "blue", "generated": "green", "continued": "magenta", "inserted": "yellow"}
LABELS_UP_TO = 90  # token labels on the y axis when at most this many rows


def draw(view: dict, path: str, *, title: str | None = None) -> tuple[int, int]:
    """The picture, written to `path` (.png or .svg); its size in pixels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import ListedColormap, LogNorm
    from matplotlib.patches import Patch

    rows, held, received = view["rows"], view["held"], view["received"]
    ids = sorted(rows)
    steps = view["steps"] + 1
    index = {uid: y for y, uid in enumerate(ids)}
    scored = bool(received)
    grid = np.full((len(ids), steps), np.nan)
    origins = sorted({r["origin"] for r in rows.values()})
    for uid, ss in held.items():
        y = index[uid]
        for s in ss:
            grid[y, s] = received.get((uid, s), np.nan) if scored else origins.index(rows[uid]["origin"])
    if scored:  # held but not yet attended to: the smallest colour, not a hole
        held_mask = np.zeros_like(grid, dtype=bool)
        for uid, ss in held.items():
            held_mask[index[uid], ss] = True
        positive = grid[np.isfinite(grid) & (grid > 0)]
        floor = float(positive.min()) if positive.size else 1e-4
        grid = np.where(held_mask & ~(np.isfinite(grid) & (grid > 0)), floor, grid)

    height = min(16.0, max(3.0, 0.16 * len(ids) + 1.5))
    width = min(20.0, max(6.0, 0.06 * steps + 3))
    fig, ax = plt.subplots(figsize=(width, height), dpi=100)
    if scored:
        finite = grid[np.isfinite(grid)]
        image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis", origin="upper",
                          norm=LogNorm(vmin=max(float(finite.min()), 1e-6), vmax=max(float(finite.max()), 1e-5)))
        fig.colorbar(image, ax=ax, label="attention received in the step (summed over its new queries; mean over layers and heads)")
    else:
        cmap = ListedColormap([ORIGIN_COLOURS.get(o, "#999999") for o in origins])
        ax.imshow(grid, aspect="auto", interpolation="nearest", cmap=cmap, vmin=-0.5, vmax=len(origins) - 0.5, origin="upper")
        ax.legend(handles=[Patch(color=ORIGIN_COLOURS.get(o, "#999999"), label=o) for o in origins], loc="upper left",
                  fontsize=8, framealpha=0.8)
    for step, _, _ in view["evictions"]:
        ax.axvline(step - 0.5, color="#c44e52", linewidth=0.6, alpha=0.6)
    for step, again in view["recomputed"]:  # the slots computed again at their new positions
        ys = [index[uid] for uid in again if uid in index]
        if ys:
            ax.vlines(step, min(ys) - 0.5, max(ys) + 0.5, color="#c44e52", linewidth=2.5, alpha=0.35)
    for uid, ss in held.items():
        last = ss[-1]
        if last < view["steps"] and uid in view.get("dropped", {}):
            ax.plot(last + 0.5, index[uid], marker="|", color="#c44e52", markersize=5)
    for uid in ids:
        if rows[uid]["pinned"]:
            ax.plot(-0.9, index[uid], marker=">", color="#c44e52", markersize=4, clip_on=False)
    if len(ids) <= LABELS_UP_TO:
        ax.set_yticks(range(len(ids)))
        ax.set_yticklabels([_label(rows[uid]["text"]) for uid in ids], fontsize=max(4, min(8, int(400 / max(len(ids), 1)))))
    else:
        ax.set_ylabel("tokens, in the order they were read")
    ax.set_xlabel(f"step ({len(view['evictions'])} evictions: red lines; the slots recomputed after each: red bars; pinned: ▸)")
    ax.set_title(title or f"what the memory held: {view.get('model')} · capacity {view.get('capacity')} · policy {view.get('policy')}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    size = tuple(int(round(v)) for v in fig.get_size_inches() * fig.dpi)
    plt.close(fig)
    return size[0], size[1]


def _label(text: str) -> str:
    from wmgen.render import VISIBLE

    shown = text.translate(VISIBLE)
    return shown if len(shown) <= 14 else shown[:13] + "…"


def show(view: dict, console, *, width: int | None = None, plain: bool = False) -> None:
    """The timeline on a terminal: a line per group of tokens, a column per group of
    steps; █ where held, · where not yet read or gone, ▼ over an eviction."""
    from rich.text import Text

    rows, held = view["rows"], view["held"]
    ids = sorted(rows)
    steps = view["steps"] + 1
    label = 16
    columns = max(10, (width or console.width or 100) - label - 4)
    per_column = max(1, math.ceil(steps / columns))
    per_line = max(1, math.ceil(len(ids) / 60))
    used = math.ceil(steps / per_column)
    marks = [" "] * used
    for step, _, _ in view["evictions"]:
        marks[min(step // per_column, used - 1)] = "▼"
    console.print(Text(" " * (label + 2) + "".join(marks), style="" if plain else "red"))
    for start in range(0, len(ids), per_line):
        group = ids[start : start + per_line]
        first = rows[group[0]]
        pinned = any(rows[u]["pinned"] for u in group)
        name = _label("".join(rows[u]["text"] for u in group))
        line = Text(("*" if pinned else " ") + name.ljust(label)[:label] + " ")
        cells = [False] * used
        for uid in group:
            for s in held.get(uid, []):
                cells[s // per_column] = True
        line.append("".join("█" if c else "·" for c in cells), style="" if plain else ORIGIN_STYLES.get(first["origin"], ""))
        console.print(line)
    every = f"{per_column} steps a column" if per_column > 1 else "a step a column"
    tokens = f"{per_line} tokens a line" if per_line > 1 else "a token a line"
    console.print(Text(f"{len(ids)} tokens over {steps} steps ({every}, {tokens}); {len(view['evictions'])} evictions (▼); "
                       f"* pinned; colour: origin", style="dim" if not plain else ""))


def check_path(path: str) -> str:
    from wmgen.errors import UsageError

    suffix = Path(path).suffix.lower()
    if suffix not in (".png", ".svg"):
        raise UsageError(f"-o {path}: the picture is a .png or an .svg")
    parent = Path(path).parent
    if not parent.is_dir():
        raise UsageError(f"-o {path}: the folder {parent} does not exist")
    return path
