"""The cost of forgetting (`wmgen.forgetting`, `perplexity --cost`): each eviction's
cost is the difference of two scorings of the same tokens by `transformers`, one
over the window the memory kept and one over that window with the dropped slots
still in it."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import SAMPLE_TEXT, ok, one_line_error
from reference import Entry, Reference, received_by_eager
from wmgen.cli import app
from wmgen.forgetting import kind, spearman
from wmgen.memory import WorkingMemory
from wmgen.perplexity import score

SHAPES = [  # capacity, keep, evict, policy
    (16, 0, 4, "oldest"),
    (16, 3, 5, "oldest"),
    (14, 2, 3, "boundary"),
    (16, 2, 4, "attention"),
]


def ids_of(tokenizer, n: int) -> list[int]:
    ids = tokenizer.encode(SAMPLE_TEXT * 6)
    assert len(ids) >= n
    return ids[:n]


def hf_logprob(hf_model, window: list[int], target: int) -> float:
    with torch.no_grad():
        return float(hf_model(torch.tensor([window])).logits[0, -1].double().log_softmax(-1)[target])


def scored_nll(hf_model, ids: list[int], held: list[int], start: int, end: int) -> float:
    """The nll of tokens start+1..end, each read after `held` and the text from `start` on."""
    return -sum(hf_logprob(hf_model, [ids[i] for i in held + list(range(start, j + 1))], ids[j + 1]) for j in range(start, end))


def replay(cost, n_read: int) -> list[list[int]]:
    """The text indices the memory held after reading each token, rebuilt from what
    the cost says each eviction dropped (and where)."""
    dropped_at = {e.at: {d.index for d in e.dropped} for e in cost.evictions}
    held: list[int] = []
    windows = []
    for j in range(n_read):
        held = [i for i in held if i not in dropped_at.get(j, ())]
        held.append(j)
        windows.append(list(held))
    return windows


@pytest.mark.parametrize("capacity, keep, evict, policy", SHAPES)
def test_each_eviction_costs_the_difference_of_two_independent_scorings(loaded, hf_model, capacity, keep, evict, policy):
    model, tokenizer, _ = loaded
    ids = ids_of(tokenizer, 70)
    memory = WorkingMemory(model, capacity, keep, evict, policy=policy, tokenizer=tokenizer)
    result = score(memory, ids, tokenizer.token_bytes, cost=True)
    cost = result.cost
    assert cost is not None and len(cost.evictions) == result.evictions >= 5
    windows = replay(cost, len(ids) - 1)
    ats = [e.at for e in cost.evictions] + [len(ids) - 1]
    for e, end in zip(cost.evictions, ats[1:], strict=True):
        before = windows[e.at - 1]  # what the memory held when it had to evict
        assert len(before) == capacity and {d.index for d in e.dropped} <= set(before)
        assert e.scored == end - e.at
        forgot = kept = 0.0
        for j in range(e.at, end):  # every token read until the next eviction, and the one it predicts
            forgot -= hf_logprob(hf_model, [ids[i] for i in windows[j]], ids[j + 1])
            kept -= hf_logprob(hf_model, [ids[i] for i in before + list(range(e.at, j + 1))], ids[j + 1])
        assert e.delta == pytest.approx((forgot - kept) / e.scored, abs=1e-5), f"eviction at {e.at}"
        for d in e.dropped:
            assert (d.token, d.age) == (ids[d.index], e.at - d.index)
            assert d.score is None if policy != "attention" else d.score is not None


@pytest.mark.parametrize("capacity, keep, evict, policy", SHAPES[:3])
def test_the_dropped_slots_are_the_ones_the_rules_pick(loaded, capacity, keep, evict, policy):
    model, tokenizer, _ = loaded
    ids = ids_of(tokenizer, 70)
    memory = WorkingMemory(model, capacity, keep, evict, policy=policy, tokenizer=tokenizer)
    cost = score(memory, ids, tokenizer.token_bytes, cost=True).cost
    ref = Reference(capacity, keep, evict, policy=policy, token_text=tokenizer.token_text)
    index: dict[int, int] = {}
    expected = {}
    for j, t in enumerate(ids[:-1]):
        entries = list(ref.held)
        entry = Entry(t)
        index[id(entry)] = j
        before = ref.evictions
        ref.push(entry)
        if ref.evictions > before:
            expected[j] = sorted(index[id(entries[i])] for i in ref.last_dropped)
    assert {e.at: sorted(d.index for d in e.dropped) for e in cost.evictions} == expected


def test_the_attention_policy_drops_what_the_reference_scores_lowest(loaded, hf_model, tiny_dir):
    from transformers import GPT2LMHeadModel

    model, tokenizer, _ = loaded
    eager = GPT2LMHeadModel.from_pretrained(tiny_dir, attn_implementation="eager").eval()
    ids = ids_of(tokenizer, 50)
    memory = WorkingMemory(model, 16, 2, 4, policy="attention", tokenizer=tokenizer)
    cost = score(memory, ids, tokenizer.token_bytes, cost=True).cost
    ref = Reference(16, 2, 4, policy="attention", attend=lambda tokens, new: received_by_eager(eager, tokens, new))
    for j, t in enumerate(ids[:-1]):
        held = list(ref.held)
        before = ref.evictions
        ref.push(Entry(t))
        if ref.evictions > before:
            e = next(e for e in cost.evictions if e.at == j)
            scores = [held[i].score for i in ref.last_dropped]
            assert [d.score for d in e.dropped] == pytest.approx(scores, abs=1e-4)


def test_measuring_the_cost_changes_no_score(loaded):
    model, tokenizer, _ = loaded
    ids = ids_of(tokenizer, 90)
    for policy in ("oldest", "boundary", "attention"):
        plain = score(WorkingMemory(model, 20, 2, 6, policy=policy, tokenizer=tokenizer), ids, tokenizer.token_bytes)
        costed = score(WorkingMemory(model, 20, 2, 6, policy=policy, tokenizer=tokenizer), ids, tokenizer.token_bytes, cost=True)
        assert costed.nll_sum == plain.nll_sum and costed.evictions == plain.evictions
        assert plain.cost is None and costed.cost is not None
        assert costed.cost.total == pytest.approx(sum(e.delta * e.scored for e in costed.cost.evictions))


def test_the_bound_is_the_least_costly_run_of_slots_to_drop(loaded, hf_model):
    model, tokenizer, _ = loaded
    ids = ids_of(tokenizer, 30)
    capacity, evict = 8, 2
    memory = WorkingMemory(model, capacity, 0, evict, tokenizer=tokenizer)
    cost = score(memory, ids, tokenizer.token_bytes, bound=True).cost
    windows = replay(cost, len(ids) - 1)
    ats = [e.at for e in cost.evictions] + [len(ids) - 1]
    assert cost.tried == len(cost.evictions) * (capacity - evict + 1)
    for e, end in zip(cost.evictions, ats[1:], strict=True):
        before = windows[e.at - 1]

        kept = scored_nll(hf_model, ids, before, e.at, end)
        runs = [(scored_nll(hf_model, ids, before[:a] + before[a + evict :], e.at, end) - kept) / e.scored
                for a in range(capacity - evict + 1)]
        assert e.best == pytest.approx(min(runs), abs=1e-5)
        assert e.best <= e.delta + 1e-9
    assert cost.bound is not None and cost.bound <= cost.per_token + 1e-9


def test_a_text_that_fits_costs_nothing(loaded):
    model, tokenizer, _ = loaded
    ids = ids_of(tokenizer, 12)
    result = score(WorkingMemory(model, 32, 0, 8, tokenizer=tokenizer), ids, tokenizer.token_bytes, cost=True)
    assert result.cost is not None and result.cost.evictions == () and result.cost.total == 0.0


def test_token_kinds():
    assert [kind(t) for t in [" the", "ing", " 42", "(", "\n\n", "  ", "_init"]] == [
        "word", "word piece", "number", "punctuation", "newline", "space", "word piece"]


def test_rank_correlation():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties take their mean rank: x ranks 0, 1.5, 1.5, 3 against y ranks 0..3 -> r = 0.9487
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833, abs=1e-6)
    assert spearman([1, 2], [1, 2]) != spearman([1, 2], [1, 2])  # nan: too few pairs


# --- the command -----------------------------------------------------------------


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(SAMPLE_TEXT * 3, encoding="utf-8")
    return path


def test_cost_on_the_command_line(tiny_dir, text_file):
    runner = CliRunner()
    out = ok(runner.invoke(app, ["perplexity", str(text_file), "-m", str(tiny_dir), "--capacity", "24", "--evict", "6", "--cost"]))
    assert "forgetting:" in out and "costliest evictions" in out
    data = json.loads(ok(runner.invoke(app, ["perplexity", str(text_file), "-m", str(tiny_dir), "--capacity", "24",
                                             "--evict", "6", "--cost", "--json"])))
    cost = data["cost"]
    assert cost["evictions"] == data["evictions"] == len(cost["each"]) > 0
    assert cost["total"] == pytest.approx(sum(e["delta"] * e["scored"] for e in cost["each"]))
    assert {"text", "origin", "age", "score", "sentence_start", "kind"} <= set(cost["each"][0]["dropped"][0])
    plain = json.loads(ok(runner.invoke(app, ["perplexity", str(text_file), "-m", str(tiny_dir), "--capacity", "24",
                                              "--evict", "6", "--json"])))
    assert "cost" not in plain and plain["nll"] == data["nll"]


def test_cost_with_a_sweep_is_a_table_row_per_shape(tiny_dir, text_file):
    out = ok(CliRunner().invoke(app, ["perplexity", str(text_file), "-m", str(tiny_dir), "--capacity", "24", "--cost",
                                      "--sweep", "policy=oldest,attention"]))
    rows = [line for line in out.splitlines() if line.startswith("| oldest") or line.startswith("| attention")]
    assert len(rows) == 4  # a score row and a cost row for each


def test_cost_needs_room_for_the_larger_memory(tiny_dir, text_file):
    result = CliRunner().invoke(app, ["perplexity", str(text_file), "-m", str(tiny_dir), "--cost"])
    message = one_line_error(result, 2)
    assert "--cost" in message and "capacity of at most" in message
