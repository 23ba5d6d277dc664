"""`wmgen.diff.diff`: two memories compared token by token, and its two renderings.

The alignment is checked against what it promises: the ops rebuild b from a, they
tile both memories, the shared count is the longest common subsequence (computed
here by the textbook dynamic programme), and an edit shows as exactly that edit.
Snapshots are built by hand or through `snapshot.describe`, with the real GPT-2
tokenizer where the text matters.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import GPT2_TOKENIZER, needs_gpt2_tokenizer
from wmgen.diff import diff
from wmgen.render import diff_json, diff_lines, json_text, show_diff, visible

# few distinct ids, so that repeats (the hard case for an alignment) are common
tokens = st.lists(st.integers(min_value=0, max_value=5), max_size=40)
fresh_tokens = st.lists(st.integers(min_value=100, max_value=10**6), unique=True, max_size=40)


def snapshot(ids, texts=None, pinned=()) -> dict:
    """A snapshot as `snapshot.describe` lays one out, by hand."""
    texts = texts if texts is not None else [f"<{t}>" for t in ids]
    return {"slots": [{"slot": i, "position": i, "token": t, "origin": "prompt", "logprob": None, "pinned": i in pinned, "text": x}
                      for i, (t, x) in enumerate(zip(ids, texts))]}


def ids(snap: dict) -> list[int]:
    return [s["token"] for s in snap["slots"]]


def apply(ops: list[dict], a: list[int]) -> list[int]:
    """b's tokens rebuilt from a's and the ops: shared runs are copied from a."""
    out = []
    for o in ops:
        if o["op"] == "equal":
            out += a[o["a"]["start"] : o["a"]["end"]]
        else:
            out += o["b"]["tokens"]
    return out


def lcs_length(x: list, y: list) -> int:
    table = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    for i, u in enumerate(x):
        for j, v in enumerate(y):
            table[i + 1][j + 1] = table[i][j] + 1 if u == v else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def kinds(result: dict) -> set[str]:
    return {o["op"] for o in result["ops"]}


# --- the alignment ------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(tokens, tokens)
def test_applying_the_ops_to_a_gives_b(x, y):
    result = diff(snapshot(x), snapshot(y))
    assert apply(result["ops"], x) == y


@settings(max_examples=300, deadline=None)
@given(tokens, tokens)
def test_the_ops_tile_both_memories_and_say_what_they_hold(x, y):
    result = diff(snapshot(x), snapshot(y))
    at_a = at_b = 0
    for o in result["ops"]:
        a, b = o["a"], o["b"]
        assert (a["start"], b["start"]) == (at_a, at_b), "a gap or an overlap between runs"
        assert a["tokens"] == x[a["start"] : a["end"]] and b["tokens"] == y[b["start"] : b["end"]]
        assert len(a["text"]) == len(a["pinned"]) == len(a["origin"]) == len(a["tokens"])
        n, m = a["end"] - a["start"], b["end"] - b["start"]
        assert {"equal": n == m > 0 and a["tokens"] == b["tokens"], "delete": n > 0 == m, "insert": m > 0 == n,
                "replace": n > 0 and m > 0}[o["op"]], o
        at_a, at_b = a["end"], b["end"]
    assert (at_a, at_b) == (len(x), len(y))
    changes = [o["op"] != "equal" for o in result["ops"]]
    assert not any(p and q for p, q in zip(changes, changes[1:])), "two changes side by side are one"


@settings(max_examples=300, deadline=None)
@given(tokens, tokens)
def test_shared_is_the_longest_common_subsequence_and_the_totals_add_up(x, y):
    result = diff(snapshot(x), snapshot(y))
    assert result["shared"] == lcs_length(x, y)
    assert result["shared"] + result["only_a"] == len(x)
    assert result["shared"] + result["only_b"] == len(y)
    assert result["only_a"] == sum(len(o["a"]["tokens"]) for o in result["ops"] if o["op"] != "equal")
    assert result["only_b"] == sum(len(o["b"]["tokens"]) for o in result["ops"] if o["op"] != "equal")


@settings(max_examples=100, deadline=None)
@given(tokens)
def test_a_memory_against_itself_is_all_equal(x):
    result = diff(snapshot(x), snapshot(x))
    assert kinds(result) <= {"equal"} and len(result["ops"]) == (1 if x else 0)
    assert (result["shared"], result["only_a"], result["only_b"], result["repinned"]) == (len(x), 0, 0, 0)


@settings(max_examples=300, deadline=None)
@given(tokens, st.data())
def test_a_forgotten_span_shows_as_that_many_deletions_and_nothing_else(x, data):
    i = data.draw(st.integers(0, len(x)))
    j = data.draw(st.integers(i, len(x)))
    result = diff(snapshot(x), snapshot(x[:i] + x[j:]))
    assert kinds(result) <= {"equal", "delete"}
    assert (result["only_a"], result["only_b"]) == (j - i, 0)


@settings(max_examples=300, deadline=None)
@given(fresh_tokens, st.data())
def test_a_forgotten_span_of_distinct_tokens_is_exactly_that_span(x, data):
    i = data.draw(st.integers(0, len(x)))
    j = data.draw(st.integers(i, len(x)))
    result = diff(snapshot(x), snapshot(x[:i] + x[j:]))
    deleted = [(o["a"]["start"], o["a"]["end"], o["b"]["start"]) for o in result["ops"] if o["op"] == "delete"]
    assert deleted == ([(i, j, i)] if j > i else [])


@settings(max_examples=300, deadline=None)
@given(tokens, st.lists(st.integers(0, 5), max_size=10), st.data())
def test_an_insertion_shows_as_that_many_insertions_and_nothing_else(x, new, data):
    i = data.draw(st.integers(0, len(x)))
    result = diff(snapshot(x), snapshot(x[:i] + new + x[i:]))
    assert kinds(result) <= {"equal", "insert"}
    assert (result["only_a"], result["only_b"]) == (0, len(new))


@settings(max_examples=300, deadline=None)
@given(fresh_tokens, st.lists(st.integers(10, 99), min_size=1, max_size=10), st.data())
def test_an_insertion_of_new_tokens_is_exactly_that_insertion(x, new, data):
    i = data.draw(st.integers(0, len(x)))
    result = diff(snapshot(x), snapshot(x[:i] + new + x[i:]))
    inserted = [(o["a"]["start"], o["a"]["end"], o["b"]["start"], o["b"]["end"], o["b"]["tokens"]) for o in result["ops"]
                if o["op"] == "insert"]
    assert inserted == [(i, i, i, i + len(new), new)]


def test_appended_tokens_are_an_insert_at_the_end():
    x = [5, 7]
    result = diff(snapshot(x), snapshot(x + [7, 7]))
    assert [(o["op"], o["a"]["start"], o["b"]["start"]) for o in result["ops"]] == [("equal", 0, 0), ("insert", 2, 2)]


def test_shared_tokens_pinned_in_one_memory_only_are_counted():
    x = [1, 2, 3, 4]
    result = diff(snapshot(x, pinned={0, 1}), snapshot(x, pinned={1, 2, 3}))
    assert result["repinned"] == 3 and result["only_a"] == result["only_b"] == 0
    assert result["ops"][0]["a"]["pinned"] == [True, True, False, False]


def test_two_full_memories_of_unrelated_tokens_compare_quickly():
    import random
    import time

    rng = random.Random(0)
    x, y = [rng.randrange(50257) for _ in range(1024)], [rng.randrange(50257) for _ in range(1024)]
    t0 = time.perf_counter()
    result = diff(snapshot(x), snapshot(y))
    assert result["shared"] + result["only_a"] == 1024
    assert time.perf_counter() - t0 < 5, "a full diff should take milliseconds, not a dynamic programme in Python"


# --- through snapshot.describe, with a real tokenizer ---------------------------------------


@pytest.fixture(scope="module")
def gpt2():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(GPT2_TOKENIZER / "tokenizer.json"))


def described(tokenizer, token_ids: list[int], keep: int = 0) -> dict:
    from wmgen.policies import Slot
    from wmgen.snapshot import describe
    from wmgen.window import Shape

    slots = [Slot(t, "prompt") for t in token_ids]
    shape = Shape(capacity=max(2, len(slots) + 1), keep=keep, evict=1)
    return describe(slots, shape, counters={"evictions": 0, "evicted": 0, "recomputed": 0, "seen": len(slots)},
                    kv_bytes_per_token=0, token_text=lambda t: tokenizer.decode([t]))


TEXTS = [
    "The lighthouse keeper climbed the stairs every evening.\nOnce upon a time there was a small town.",
    "def fib(n):\n\treturn n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "Emoji too: 🌊🚢🌅, spaces   and\r\nline breaks\n\n and 灯台守は毎晩階段を上った。",
]


def content(lines: list[str], keep: str) -> str:
    """The text of the diff's lines (the header left out) whose prefix is in `keep`, joined."""
    return "".join(line[1:] for line in lines[2:] if line[:1] in keep and not line.startswith("@@"))


@needs_gpt2_tokenizer
@pytest.mark.parametrize("text", TEXTS)
def test_a_forgotten_span_shows_its_tokens_as_removed_lines(gpt2, text):
    x = gpt2.encode(text).ids
    i, j = len(x) // 3, len(x) // 3 + 4
    a, b = described(gpt2, x, keep=2), described(gpt2, x[:i] + x[j:], keep=2)
    lines = diff_lines(diff(a, b), "a", "b")
    assert content(lines, "-") == "".join(visible(gpt2.decode([t])) for t in x[i:j])
    assert content(lines, "+") == ""


@needs_gpt2_tokenizer
@pytest.mark.parametrize("text", TEXTS)
def test_with_all_context_the_lines_give_back_both_texts(gpt2, text):
    x = gpt2.encode(text).ids
    y = x[:3] + gpt2.encode(" inserted words\n").ids + x[3:10] + x[14:]
    y[-2] = gpt2.encode(" changed").ids[0]
    a, b = described(gpt2, x), described(gpt2, y)
    lines = diff_lines(diff(a, b), "a", "b", context=len(x) + len(y))
    assert content(lines, " -") == "".join(visible(gpt2.decode([t])) for t in x)
    assert content(lines, " +") == "".join(visible(gpt2.decode([t])) for t in y)
    assert all("\n" not in line and "\r" not in line and "\t" not in line for line in lines[2:])


# a few real token texts, whitespace and line breaks among them
PIECES = ["The", " light", "house", "\n", " ", "\t", "  ", ".", " keeper", "\r\n", "🌊", "a\x1bb"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, len(PIECES) - 1), max_size=30), st.lists(st.integers(0, len(PIECES) - 1), max_size=30),
       st.integers(0, 4))
def test_each_hunk_is_the_text_of_its_slots_and_every_change_is_in_one(x, y, context):
    a, b = snapshot(x, [PIECES[t] for t in x]), snapshot(y, [PIECES[t] for t in y])
    result = diff(a, b)
    hunks = split_hunks(diff_lines(result, "a", "b", context=context))
    for (i, n, j, m), body in hunks:
        assert content(["", "", *body], " -") == "".join(visible(PIECES[t]) for t in x[i : i + n])
        assert content(["", "", *body], " +") == "".join(visible(PIECES[t]) for t in y[j : j + m])
    starts = [(i, j) for (i, _, j, _), _ in hunks]
    assert starts == sorted(starts) and all(i1 + n1 <= i2 for ((i1, n1, _, _), _), ((i2, _, _, _), _) in zip(hunks, hunks[1:]))
    for o in result["ops"]:
        if o["op"] != "equal":  # inside one hunk, with at most `context` shared tokens before it
            (lo, hi), (blo, bhi) = (o["a"]["start"], o["a"]["end"]), (o["b"]["start"], o["b"]["end"])
            assert any(i <= lo and hi <= i + n and j <= blo and bhi <= j + m for (i, n, j, m), _ in hunks), o
    assert bool(hunks) == (x != y)


def split_hunks(lines: list[str]) -> list[tuple[tuple[int, int, int, int], list[str]]]:
    import re

    assert lines[0].startswith("--- ") and lines[1].startswith("+++ ")
    hunks = []
    for line in lines[2:]:
        m = re.fullmatch(r"@@ -(\d+),(\d+) \+(\d+),(\d+) @@", line)
        if m:
            hunks.append((tuple(int(g) for g in m.groups()), []))
        else:
            assert line[:1] in " -+", line
            hunks[-1][1].append(line)
    return hunks


# --- the unified text -----------------------------------------------------------------------


def test_the_unified_text_of_two_changes_far_apart():
    x = list(range(100, 120))  # 20 distinct tokens, text "t100", "t101", ...
    text = {t: f"t{t}" for t in range(100, 200)} | {999: " new\n"}
    y = x[:3] + [999] + x[4:15] + x[16:]  # slot 3 replaced, slot 15 forgotten
    a, b = snapshot(x, [text[t] for t in x], pinned={0, 1}), snapshot(y, [text[t] for t in y])
    context = 2
    # hunk 1: slots 1..5 of a (2 shared, the replaced slot 3, 2 shared); the same slots of b
    first = (3 - context, 2 * context + 1, 3 - context, 2 * context + 1)
    # hunk 2: slots 13..17 of a around the forgotten slot 15; in b those are 13, 14, 15, 16
    second = (15 - context, 2 * context + 1, 15 - context, 2 * context)
    # between them slots 4..14 are shared: 11 > 2 * context, so two hunks
    assert diff_lines(diff(a, b), "story", "last", context=context) == [
        "--- story\t20 tokens, 2 pinned",
        "+++ last\t19 tokens, 0 pinned",
        f"@@ -{first[0]},{first[1]} +{first[2]},{first[3]} @@",
        " t101t102",
        "-t103",
        "+·new↵",
        " t104t105",
        f"@@ -{second[0]},{second[1]} +{second[2]},{second[3]} @@",
        " t113t114",
        "-t115",
        " t116t117",
    ]


def test_changes_closer_than_twice_the_context_share_a_hunk():
    x = list(range(10))
    y = x[:2] + x[3:6] + x[7:]  # slots 2 and 6 forgotten: 3 shared tokens between them
    lines = diff_lines(diff(snapshot(x), snapshot(y)), "a", "b", context=2)
    assert [line for line in lines if line.startswith("@@")] == ["@@ -0,9 +0,7 @@"]  # slots 0..8 of a: 2 context each side
    lines = diff_lines(diff(snapshot(x), snapshot(y)), "a", "b", context=1)
    assert [line for line in lines if line.startswith("@@")] == ["@@ -1,3 +1,2 @@", "@@ -5,3 +4,2 @@"]


def test_an_insertion_at_the_start_and_at_the_end():
    x = [1, 2, 3]
    lines = diff_lines(diff(snapshot(x), snapshot([9] + x + [8])), "a", "b", context=1)
    assert lines[2:] == ["@@ -0,1 +0,2 @@", "+<9>", " <1>", "@@ -2,1 +3,2 @@", " <3>", "+<8>"]


def test_a_line_break_ends_a_line_of_the_diff():
    texts = ["one", "\n", "two", " three", "\n", "four"]
    lines = diff_lines(diff(snapshot([]), snapshot(list(range(6)), texts)), "a", "b")
    assert lines[2:] == ["@@ -0,0 +0,6 @@", "+one↵", "+two·three↵", "+four"]


def test_a_token_without_text_is_shown_by_its_id():
    a = {"slots": [{"token": 5, "origin": "prompt", "pinned": False}]}
    b = {"slots": [{"token": 5, "origin": "prompt", "pinned": False}, {"token": 6, "origin": "generated", "pinned": False}]}
    result = diff(a, b)
    assert result["ops"][1]["b"]["text"] == [None]
    assert diff_lines(result, "a", "b")[2:] == ["@@ -0,1 +0,2 @@", " ⟨5⟩", "+⟨6⟩"]


def test_the_same_memory_gives_the_header_only():
    x = snapshot([1, 2, 3])
    assert diff_lines(diff(x, x), "a", "a") == ["--- a\t3 tokens, 0 pinned", "+++ a\t3 tokens, 0 pinned"]


def test_names_with_line_breaks_stay_on_the_header_lines():
    lines = diff_lines(diff(snapshot([1]), snapshot([2])), "a\nb", "c\td")
    assert lines[0].startswith("--- a\\nb\t") and lines[1].startswith("+++ c\\td\t")


def test_show_diff_writes_the_lines_to_a_stream_and_to_a_console_unwrapped():
    import io

    from rich.console import Console

    a, b = snapshot(list(range(40))), snapshot(list(range(40, 80)))
    lines = diff_lines(diff(a, b), "a", "b")
    stream = io.StringIO()
    show_diff(diff(a, b), "a", "b", stream)
    assert stream.getvalue() == "".join(line + "\n" for line in lines)
    console = Console(file=io.StringIO(), width=20, color_system=None)
    show_diff(diff(a, b), "a", "b", console)
    assert max(map(len, lines)) > 20
    assert [line.rstrip() for line in console.file.getvalue().splitlines()] == [line.expandtabs(8) for line in lines]


# --- JSON -----------------------------------------------------------------------------------


def test_diff_json_is_the_result_with_the_names_as_strict_json():
    a, b = snapshot([1, 2, 3], ["x", "y\ud800", "z"]), snapshot([1, 3, 4])
    result = diff(a, b)
    doc = diff_json(result, "story", "last")
    assert doc == {"a": "story", "b": "last", **result}
    parsed = json.loads(json_text(doc), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert parsed == json.loads(json.dumps(doc))
    json_text(doc).encode("utf-8")
