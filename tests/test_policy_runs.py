"""Memory policies end to end: generation through each policy against the reference
model driven by transformers, batched rows and int8, and the policy as a user sets
it (flag, config key, variable), sees it (sessions, inspect-memory, JSON Lines) and
gets it wrong (one-line errors)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from conftest import ok, one_line_error
from reference import Reference, received_by_eager, reference_greedy
from wmgen.cli import app

PROMPT = "The lighthouse keeper climbed the stairs. It was late."
POLICIES = ("oldest", "boundary", "attention")
runner = CliRunner()


@pytest.fixture(scope="module")
def lm(tiny_dir, one_torch_thread):
    import wmgen

    return wmgen.load(str(tiny_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def eager(tiny_dir):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(tiny_dir, attn_implementation="eager").eval()


def reference(eager, tok, policy: str, capacity: int, keep: int, evict: int, recent: int | None = None) -> tuple[Reference, object]:
    """The reference memory for `policy`, and a step function: a fresh transformers
    forward over a window."""

    def attend(tokens: list[int], new: list[int]) -> list[float]:
        return received_by_eager(eager, tokens, new)

    def logits_of(window: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return eager(torch.tensor([window])).logits[0, -1]

    ref = Reference(capacity, keep, evict, policy, recent, token_text=lambda t: tok.decode([t]), attend=attend)
    return ref, logits_of


def invoke(*args: str, input: str | None = None, env: dict | None = None):
    return runner.invoke(app, list(args), input=input, env=env)


# --- generation follows the rules -----------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("keep", [0, 3])
def test_greedy_tokens_under_each_policy_equal_the_reference_driven_by_transformers(lm, eager, tok, policy, keep):
    ids = lm.encode(PROMPT)
    ref, logits_of = reference(eager, tok, policy, capacity=16, keep=keep, evict=4)
    expected = reference_greedy(ref, logits_of, ids, 40)
    mem = lm.memory(capacity=16, keep=keep, evict=4, policy=policy)
    out = lm.generate(ids, memory=mem, max_new_tokens=40, temperature=0, ignore_eos=True)
    assert list(out.tokens) == expected
    assert out.stats.evictions == ref.evictions > 3 and out.stats.evicted == ref.evicted


def test_attention_evictions_drop_the_least_attended_and_leave_exact_logits(lm, eager, tok, hf_model):
    ids = lm.encode(PROMPT)
    mem = lm.memory(capacity=12, keep=2, evict=3, policy="attention", recent=4)
    events = list(lm.events(ids, memory=mem, max_new_tokens=30, temperature=0, ignore_eos=True))
    evictions = [e for e in events if type(e).__name__ == "Evicted"]
    assert evictions and all(len(e.positions) == 3 for e in evictions)
    assert all(2 <= p < 12 - 4 for e in evictions for p in e.positions), "pinned or recent slots were dropped"
    assert any(e.positions != (2, 3, 4) for e in evictions), "attention dropped the oldest block every time"
    with torch.no_grad():
        expected = hf_model(torch.tensor([mem.tokens])).logits[0, -1]
    got = lm.memory(capacity=12, keep=2, evict=3, policy="attention", recent=4)
    logits, _ = got.read(mem.tokens)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("policy", POLICIES)
def test_batched_rows_under_each_policy_give_what_each_gives_alone(lm, policy):
    prompts = [PROMPT, "Once upon a time", "The sea. The sky.\nThe end"]
    options = dict(max_new_tokens=30, temperature=0.8, ignore_eos=True, capacity=12, evict=3, policy=policy)
    together = lm.generate_many(prompts, seed=5, **options)
    for prompt, row in zip(prompts, together):
        alone = lm.generate(prompt, seed=5, **options)
        assert row.tokens == alone.tokens, (policy, prompt)
        assert row.stats.evictions == alone.stats.evictions > 0


def test_a_batched_step_accumulates_scores_as_a_step_alone_does(lm):
    mems = []
    for batch in (True, False):
        from wmgen.memory import MemoryBatch

        if batch:
            rows = MemoryBatch(lm.network, 2, 12, 0, 3, policy="attention", tokenizer=lm.tokenizer)
            logits = [rows.rows[r].read(lm.encode(p))[0] for r, p in enumerate(["a b c", PROMPT])]
            for _ in range(8):
                tokens = [int(x.argmax()) for x in logits]
                logits = list(rows.append(tokens, [None, None]))
            mems.append(rows.rows)
        else:
            alone = []
            for p in ["a b c", PROMPT]:
                m = lm.memory(capacity=12, keep=0, evict=3, policy="attention")
                x, _ = m.read(lm.encode(p))
                for _ in range(8):
                    x = m.append(int(x.argmax()))
                alone.append(m)
            mems.append(alone)
    for together, alone in zip(*mems):
        assert together.tokens == alone.tokens
        assert [s.queries for s in together.slots] == [s.queries for s in alone.slots]
        assert [s.score for s in together.slots] == pytest.approx([s.score for s in alone.slots], abs=1e-6)


@pytest.mark.parametrize("policy", POLICIES)
def test_int8_runs_every_policy_and_its_batched_rows_match_alone(tiny_dir, int8_model, policy):
    import wmgen

    lm8 = wmgen.load(str(tiny_dir), device="cpu", dtype="int8")
    options = dict(max_new_tokens=24, temperature=0, ignore_eos=True, capacity=10, evict=3, policy=policy)
    together = lm8.generate_many([PROMPT, "Once upon a time"], **options)
    for prompt, row in zip([PROMPT, "Once upon a time"], together):
        assert row.tokens == lm8.generate(prompt, **options).tokens
        assert row.stats.evictions > 0 and row.stats.fill <= 10


# --- the command line ---------------------------------------------------------------


def session(home, name: str = "last") -> dict:
    return json.loads((home / "sessions" / f"{name}.json").read_text(encoding="utf-8"))


@pytest.fixture
def home(tmp_path):
    return tmp_path / "wmgen-home"  # WMGEN_HOME, as conftest's isolated_home sets it


def test_policy_flag_is_saved_with_scores_and_kept_by_continue(tiny_dir, home):
    ok(invoke("generate", "-m", str(tiny_dir), "--policy", "attention", "--recent", "5", "--capacity", "16",
              "--evict", "4", "-n", "30", "-t", "0", "--ignore-eos", PROMPT))
    saved = session(home)
    assert (saved["policy"], saved["recent"]) == ("attention", 5)
    scores = [s["score"] for s in saved["slots"]]
    assert all(s is None or (isinstance(s, float) and 0 <= s <= 1) for s in scores)
    assert scores[-1] is None, "the newest token has not been attended to yet"
    assert sum(s["queries"] for s in saved["slots"]) > 0
    ok(invoke("generate", "-m", str(tiny_dir), "-c", "-n", "10", "-t", "0", "--ignore-eos", " And"))
    again = session(home)
    assert (again["policy"], again["recent"]) == ("attention", 5), "-c keeps the session's policy"
    assert again["counters"]["seen"] > saved["counters"]["seen"]
    ok(invoke("generate", "-m", str(tiny_dir), "-c", "--policy", "boundary", "-n", "5", "-t", "0", " And"))
    changed = session(home)
    assert changed["policy"] == "boundary" and "recent" not in changed and "score" not in changed["slots"][0]


def test_policy_comes_from_a_config_file_and_from_the_environment(tiny_dir, home, tmp_path):
    config = tmp_path / "memory.toml"
    config.write_text('[memory]\npolicy = "boundary"\n', encoding="utf-8")
    r = invoke("generate", "-m", str(tiny_dir), "--config", str(config), "--format", "jsonl", "-n", "3", "-t", "0", PROMPT)
    start = json.loads(ok(r).splitlines()[0])
    assert start["settings"]["memory"]["policy"] == "boundary"
    r = invoke("generate", "-m", str(tiny_dir), "--format", "jsonl", "-n", "3", "-t", "0", PROMPT, env={"WMGEN_POLICY": "attention"})
    start = json.loads(ok(r).splitlines()[0])
    assert start["settings"]["memory"]["policy"] == "attention" and start["settings"]["memory"]["recent"] == 32  # half of the tiny model's 64
    assert session(home)["policy"] == "attention"


@pytest.mark.parametrize(
    "args, env, needle",
    [
        (["--policy", "newest"], None, "--policy: 'newest' is not one of oldest, boundary, attention"),
        (["--policy", "attention", "--capacity", "16", "--evict", "4", "--recent", "13"], None, "recent can be at most 12"),
        (["--recent", "-1"], None, "recent -1 must be at least 0"),
        ([], {"WMGEN_POLICY": "lru"}, "WMGEN_POLICY: 'lru' is not one of oldest, boundary, attention"),
        (["--capacity", "16"], {"WMGEN_POLICY": "attention", "WMGEN_RECENT": "20"}, "WMGEN_RECENT"),
    ],
)
def test_bad_policy_settings_are_one_line_errors(tiny_dir, args, env, needle):
    line = one_line_error(invoke("generate", "-m", str(tiny_dir), *args, "-n", "2", PROMPT, env=env), 2)
    assert needle in line


@pytest.mark.parametrize("change, needle", [
    ({"policy": "lru"}, "must be one of oldest, boundary, attention"),
    ({"capacity": 4096}, "cannot be used with"),  # more than the model's positions
    ({"policy": "attention", "recent": 10**6}, "'recent'"),
])
def test_a_session_that_cannot_fit_is_unusable_in_every_command_with_status_1(tiny_dir, home, change, needle):
    ok(invoke("generate", "-m", str(tiny_dir), "-n", "3", "-t", "0", PROMPT))
    path = home / "sessions" / "last.json"
    record = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps(record | change), encoding="utf-8")
    for args in (["generate", "-m", str(tiny_dir), "-c", "-n", "2", "more"], ["inspect-memory", "--attention"]):
        line = one_line_error(invoke(*args), 1)
        assert "session 'last'" in line and "cannot be used" in line and needle in line, args


def test_inspect_memory_shows_the_policy_and_each_slots_score(tiny_dir, home):
    ok(invoke("generate", "-m", str(tiny_dir), "--policy", "attention", "--capacity", "16", "-n", "20", "-t", "0", "--ignore-eos", PROMPT))
    shown = ok(invoke("inspect-memory", "--no-color"))
    assert "policy" in shown and "attention (the least attended go; the last 8 tokens stay)" in shown
    assert "score" in shown.splitlines()[next(i for i, line in enumerate(shown.splitlines()) if "slot" in line and "origin" in line)]
    data = json.loads(ok(invoke("inspect-memory", "--json")))
    assert data["policy"] == "attention" and data["recent"] == 8
    assert all("score" in s and "queries" in s for s in data["slots"])


def test_inspect_memory_previews_a_prompt_under_a_policy(tiny_dir):
    text = "One two three four. Five six seven eight nine ten eleven twelve"
    data = json.loads(ok(invoke("inspect-memory", "-m", str(tiny_dir), "--prompt", text, "--capacity", "8", "--evict", "2",
                                "--policy", "boundary", "--json")))
    assert data["policy"] == "boundary"
    oldest = json.loads(ok(invoke("inspect-memory", "-m", str(tiny_dir), "--prompt", text, "--capacity", "8", "--evict", "2", "--json")))
    assert data["unread"] >= oldest["unread"] and data["fill"] <= oldest["fill"]
    line = one_line_error(invoke("inspect-memory", "--policy", "attention"), 2)
    assert "--prompt" in line


def test_jsonl_eviction_events_list_the_positions_the_policy_dropped(tiny_dir):
    r = invoke("generate", "-m", str(tiny_dir), "--policy", "attention", "--capacity", "16", "--keep", "2", "--evict", "4",
               "--recent", "6", "--format", "jsonl", "-n", "40", "-t", "0", "--ignore-eos", PROMPT)
    events = [json.loads(line) for line in ok(r).splitlines()]
    evictions = [e for e in events if e["type"] == "eviction"]
    assert evictions
    for e in evictions:
        assert len(e["positions"]) == e["evicted"] == 4
        assert e["positions"] == sorted(e["positions"]) and all(2 <= p < 16 - 6 for p in e["positions"])


def test_perplexity_sweeps_policies_and_reports_each(tiny_dir, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"Sentence {i} is here." for i in range(40)), encoding="utf-8")
    rows = json.loads(ok(invoke("perplexity", str(text), "-m", str(tiny_dir), "--json", "--sweep", "policy=oldest,boundary,attention",
                                "capacity=16,32", "--evict", "4")))
    assert [(r["policy"], r["capacity"]) for r in rows] == [(p, c) for p in POLICIES for c in (16, 32)]
    assert all(math.isfinite(r["perplexity"]) for r in rows)
    assert len({round(r["perplexity"], 6) for r in rows if r["capacity"] == 16}) > 1, "the policies scored alike"
    line = one_line_error(invoke("perplexity", str(text), "-m", str(tiny_dir), "--sweep", "policy=oldest,lru"), 2)
    assert "'lru' is not one of oldest, boundary, attention" in line


def test_a_saved_attention_memory_loads_back_with_its_policy_and_scores(lm, tmp_path):
    import wmgen

    mem = lm.memory(capacity=16, keep=1, evict=4, policy="attention", recent=5)
    lm.generate(PROMPT, memory=mem, max_new_tokens=25, temperature=0, ignore_eos=True)
    wmgen.sessions.save(mem, "scored", home=tmp_path)
    back = wmgen.sessions.load("scored", lm, home=tmp_path)
    saved_tokens = back.tokens
    assert back.shape == mem.shape
    assert [s.queries for s in back.slots] == [s.queries for s in mem.slots]
    assert [s.score for s in back.slots] == pytest.approx([s.score for s in mem.slots], rel=1e-12)
    first = lm.generate(" more", memory=mem, max_new_tokens=12, temperature=0, ignore_eos=True)
    again = lm.generate(" more", memory=back, max_new_tokens=12, temperature=0, ignore_eos=True)
    assert first.tokens == again.tokens, "a loaded memory continues as the one it was saved from"
    plain = wmgen.sessions.load("scored", lm, home=tmp_path, policy="oldest")
    assert plain.shape.policy == "oldest" and plain.recent is None and plain.tokens == saved_tokens
