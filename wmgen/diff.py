"""Two memories compared token by token: which tokens they share and which are only
in one. Pure: snapshots in (the layout `window.describe` makes and session files
hold), plain data out; no torch, no files.

The alignment is a longest common subsequence of the two token-id sequences, so
`shared` is the most tokens any alignment can share: a span forgotten from a memory
shows as that many deletions and nothing else, an insertion as insertions only.
(difflib's SequenceMatcher is not an LCS: for a memory with a span forgotten it can
report insertions too.)
"""

from __future__ import annotations

from collections.abc import Sequence

OPS = ("equal", "delete", "insert", "replace")


def diff(a: dict, b: dict) -> dict:
    """How snapshot `b` differs from snapshot `a`, slot by slot.

    Returns `{"shared", "only_a", "only_b", "repinned", "ops"}`:
    - `shared`: tokens in both (matched in order), `only_a` / `only_b`: tokens in one
      only; `shared + only_a == len(a's slots)`, `shared + only_b == len(b's slots)`;
    - `repinned`: shared tokens pinned in one memory and not in the other;
    - `ops`: the whole of both memories in order, as runs, each
      `{"op": "equal" | "delete" | "insert" | "replace", "a": SIDE, "b": SIDE}` where a
      SIDE is `{"start", "end", "tokens", "text", "origin", "pinned"}`: the slots
      `start` to `end` (end excluded, counted from 0) of that memory and their token
      ids, texts (null where the snapshot has none), origins and pins. `delete`
      covers slots of a only (b's side is empty, at the slot where they would be),
      `insert` slots of b only, `replace` a run of each, `equal` the same tokens in
      both. Applying the ops to a's tokens gives b's.
    """
    slots_a, slots_b = a["slots"], b["slots"]
    x, y = [s["token"] for s in slots_a], [s["token"] for s in slots_b]
    ops: list[dict] = [
        {"op": op, "a": side(slots_a, i1, i2), "b": side(slots_b, j1, j2)}
        for op, i1, i2, j1, j2 in opcodes(x, y)
    ]
    shared = sum(o["a"]["end"] - o["a"]["start"] for o in ops if o["op"] == "equal")
    repinned = sum(
        pa != pb for o in ops if o["op"] == "equal" for pa, pb in zip(o["a"]["pinned"], o["b"]["pinned"])
    )
    return {"shared": shared, "only_a": len(x) - shared, "only_b": len(y) - shared, "repinned": repinned, "ops": ops}


def side(slots: Sequence[dict], start: int, end: int) -> dict:
    run = slots[start:end]
    return {
        "start": start,
        "end": end,
        "tokens": [s["token"] for s in run],
        "text": [s.get("text") for s in run],
        "origin": [s.get("origin") for s in run],
        "pinned": [bool(s.get("pinned", False)) for s in run],
    }


def opcodes(x: Sequence, y: Sequence) -> list[tuple[str, int, int, int, int]]:
    """`(op, i1, i2, j1, j2)` runs turning `x` into `y` along a longest common
    subsequence, in SequenceMatcher's layout: `x[i1:i2]` becomes `y[j1:j2]`."""
    ops: list[tuple[str, int, int, int, int]] = []
    i = j = 0  # where the last match left off
    for mi, mj in [*matches(x, y), (len(x), len(y))]:  # the last pair closes the last change
        if mi > i or mj > j:
            ops.append(("replace" if mi > i and mj > j else "delete" if mi > i else "insert", i, mi, j, mj))
        if mi == len(x):
            break
        if ops and ops[-1][0] == "equal":  # the match right after the last one
            ops[-1] = ("equal", ops[-1][1], mi + 1, ops[-1][3], mj + 1)
        else:
            ops.append(("equal", mi, mi + 1, mj, mj + 1))
        i, j = mi + 1, mj + 1
    return ops


def matches(x: Sequence, y: Sequence) -> list[tuple[int, int]]:
    """The index pairs `(i, j)`, `x[i] == y[j]`, of a longest common subsequence, in
    order. A shared head and tail are matched as they stand (so an appended or a cut
    tail aligns where a reader expects); the middle by `lcs`."""
    head = 0
    while head < min(len(x), len(y)) and x[head] == y[head]:
        head += 1
    tail = 0
    while tail < min(len(x), len(y)) - head and x[-1 - tail] == y[-1 - tail]:
        tail += 1
    middle = lcs(x[head : len(x) - tail], y[head : len(y) - tail])
    return (
        [(k, k) for k in range(head)]
        + [(i + head, j + head) for i, j in middle]
        + [(len(x) - tail + k, len(y) - tail + k) for k in range(tail)]
    )


def lcs(x: Sequence, y: Sequence) -> list[tuple[int, int]]:
    """A longest common subsequence of `x` and `y` as index pairs, in order.

    The table of LCS lengths is kept one row per item of `x`, each row an integer
    used as a bit vector over `y` (Allison and Dix, 1986; Hyyrö's form): bit `j` of
    row `i` is 0 where `lcs(x[:i], y[:j + 1])` is one longer than `lcs(x[:i], y[:j])`.
    That is the usual dynamic programme, with a whole row per big-integer addition,
    so two full 1024-token memories take milliseconds. The walk back is the usual one."""
    at: dict = {}  # item -> the bits of y where it stands
    for j, item in enumerate(y):
        at[item] = at.get(item, 0) | 1 << j
    ones = (1 << len(y)) - 1
    rows = [ones]
    row = ones
    for item in x:
        u = row & at.get(item, 0)
        row = ((row + u) | (row - u)) & ones
        rows.append(row)

    def length(i: int, j: int) -> int:  # lcs(x[:i], y[:j]): the 0 bits below j
        return j - (rows[i] & ((1 << j) - 1)).bit_count()

    pairs = []
    i, j = len(x), len(y)
    while i and j:
        if x[i - 1] == y[j - 1]:
            pairs.append((i - 1, j - 1))
            i, j = i - 1, j - 1
        elif length(i - 1, j) >= length(i, j - 1):
            i -= 1
        else:
            j -= 1
    return pairs[::-1]
