"""--lookahead: drafts looked up in the working memory, checked in one pass.

What must hold: the tokens are the ones a plain run gives (greedy, and sampled with
the same seed: a draft token is kept when the token drawn at its place is it, and
the draw that refused it is the next token), and the memory goes through the same
states, evicting at the same steps. Speed is for `benchmarks/`.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import ok, one_line_error
from wmgen import lookup
from wmgen.cli import app
from wmgen.events import Evicted, Finished, Token
from wmgen.lookup import Pace

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Text that repeats itself: what lookup decoding is for (and random weights loop on anything).
REPEATING = "the cat sat on the mat. the cat sat on the mat. the cat sat on the"


# --- drafts ----------------------------------------------------------------------------


def test_a_draft_is_what_followed_the_latest_occurrence_of_the_tail():
    tokens = [5, 1, 2, 7, 8, 1, 2, 9, 4, 1, 2]
    assert lookup.draft(tokens, 3) == ([9, 4, 1], 2)  # [1, 2] last seen before 9
    assert lookup.draft(tokens, 1) == ([9], 2)


def test_a_draft_prefers_the_longest_match_to_the_latest():
    tokens = [3, 1, 2, 6, 6, 0, 1, 2, 7, 3, 1, 2]
    draft, matched = lookup.draft(tokens, 2)
    assert (draft, matched) == ([6, 6], 3), "[3, 1, 2] matched at the start beats [1, 2] matched later"


def test_there_is_no_draft_without_an_earlier_occurrence():
    assert lookup.draft([1, 2, 3, 4], 5) == ([], 0)
    assert lookup.draft([4], 5) == ([], 0)
    assert lookup.draft([1, 2, 1], 0) == ([], 0)


def test_a_draft_that_runs_into_the_tail_goes_on_repeating():
    assert lookup.draft([7, 7, 7, 7], 5) == ([7] * 5, 3)
    assert lookup.draft([4, 1, 2, 3, 1, 2], 5) == ([3, 1, 2, 3, 1], 2)


# --- how long a draft is -----------------------------------------------------------------


def test_pace_drafts_long_where_drafts_are_kept_and_not_where_they_are_refused():
    pace = Pace(8)
    for _ in range(40):
        pace.checked(3, 8, 8)
    assert pace.length(8, 3) == 8
    for _ in range(60):
        pace.checked(3, pace.length(8, 3) or 1, 0)
    lengths = [pace.length(8, 3) for _ in range(lookup.PROBE * 3)]
    assert lengths.count(0) >= len(lengths) - 3, "refused drafts must stop drafting"
    assert 1 in lengths, "a probe now and then, to see whether drafts pay again"
    assert pace.length(8, 0) == 0 and pace.length(0, 3) == 0


def test_pace_weighs_measured_pass_costs():
    cheap, dear = Pace(6), Pace(6)
    for pace, cost in ((cheap, 1.05), (dear, 3.0)):
        for _ in range(10):
            pace.checked(2, 4, 2)
            pace.passed(1, 0.010)
            for m in range(2, 8):
                pace.passed(m, 0.010 * cost)
    assert cheap.length(6, 2) >= 2
    assert dear.length(6, 2) == 0 or dear.idle == 0, "a check that costs three steps does not pay for two tokens"


# --- exactness against a plain run ---------------------------------------------------------


def run(lm, prompt: str, lookahead: int, **options):
    memory = lm.memory(options.pop("capacity", 48), options.pop("keep", 0), options.pop("evict", 8))
    events = list(lm.events(lm.encode(prompt), memory=memory, lookahead=lookahead, **options))
    tokens = [e.id for e in events if isinstance(e, Token)]
    evictions = [(sum(isinstance(x, Token) for x in events[:i]), e.evicted) for i, e in enumerate(events) if isinstance(e, Evicted)]
    end = next(e for e in events if isinstance(e, Finished))
    return tokens, evictions, memory, end, events


@pytest.fixture(scope="module")
def lm(tiny_dir):
    import wmgen

    return wmgen.load(str(tiny_dir), device="cpu", dtype="float32")


def test_greedy_tokens_and_memory_are_a_plain_runs_and_drafts_were_kept(lm):
    plain = run(lm, REPEATING, 0, max_new_tokens=120, temperature=0, ignore_eos=True)
    ahead = run(lm, REPEATING, 8, max_new_tokens=120, temperature=0, ignore_eos=True)
    assert ahead[0] == plain[0]
    assert ahead[1] == plain[1] and len(plain[1]) >= 3, "evictions fall at the same tokens"
    assert ahead[2].tokens == plain[2].tokens and ahead[2].counters == plain[2].counters
    assert [s.logprob for s in ahead[2].slots] == pytest.approx([s.logprob for s in plain[2].slots], abs=1e-4)
    end = ahead[3]
    assert end.drafted > 0 and end.accepted > 0 and end.generated == 120
    assert plain[3].drafted == 0
    fills = [e.fill for e in ahead[4] if isinstance(e, Token)]
    assert fills == [e.fill for e in plain[4] if isinstance(e, Token)], "each token reports the fill a plain run's does"


def test_sampled_tokens_with_a_seed_are_a_plain_runs(lm):
    options = dict(max_new_tokens=80, temperature=0.7, top_k=5, seed=11, ignore_eos=True)
    plain, ahead = run(lm, REPEATING, 0, **options), run(lm, REPEATING, 6, **options)
    assert ahead[0] == plain[0] and ahead[2].tokens == plain[2].tokens
    assert ahead[3].drafted > 0


def test_repetition_penalty_sees_each_drafts_own_history(lm):
    options = dict(max_new_tokens=60, temperature=0, repetition_penalty=1.3, ignore_eos=True)
    assert run(lm, REPEATING, 6, **options)[0] == run(lm, REPEATING, 0, **options)[0]


def test_a_stop_text_inside_a_kept_draft_ends_the_memory_where_a_plain_run_does(lm):
    plain = run(lm, REPEATING, 0, max_new_tokens=60, temperature=0, ignore_eos=True)
    text = lm.tokenizer.decode(plain[0])
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    options = dict(max_new_tokens=60, temperature=0, ignore_eos=True, stop=stop)
    p, a = run(lm, REPEATING, 0, **options), run(lm, REPEATING, 8, **options)
    assert a[3].reason == p[3].reason == "stop"
    assert a[0] == p[0] and a[2].tokens == p[2].tokens


def test_the_token_budget_is_kept_exactly(lm):
    for n in (1, 2, 7, 33):
        tokens = run(lm, REPEATING, 8, max_new_tokens=n, temperature=0, ignore_eos=True)[0]
        assert len(tokens) == n


def test_end_of_text_ends_a_lookahead_run_where_it_ends_a_plain_one(lm):
    eos = lm.tokenizer.eos_id
    prompt = lm.tokenizer.decode([eos]) + REPEATING
    for seed in range(6):
        options = dict(max_new_tokens=60, temperature=1.5, seed=seed)
        p, a = run(lm, prompt, 0, **options), run(lm, prompt, 8, **options)
        assert a[0] == p[0] and a[3].reason == p[3].reason and a[2].tokens == p[2].tokens


def test_int8_greedy_lookahead_is_a_plain_int8_run(tiny_dir):
    import wmgen
    from wmgen.formats import int8_available

    if not int8_available():
        pytest.skip("this torch has no int8 kernels")
    lm8 = wmgen.load(str(tiny_dir), device="cpu", dtype="int8")
    plain = run(lm8, REPEATING, 0, max_new_tokens=80, temperature=0, ignore_eos=True)
    ahead = run(lm8, REPEATING, 8, max_new_tokens=80, temperature=0, ignore_eos=True)
    assert ahead[0] == plain[0] and ahead[3].accepted > 0


def test_lookahead_under_the_attention_policy_runs_plain_steps(lm):
    memory = lm.memory(48, 0, 8, policy="attention")
    events = list(lm.events(lm.encode(REPEATING), memory=memory, lookahead=8, max_new_tokens=30, temperature=0))
    end = next(e for e in events if isinstance(e, Finished))
    assert end.drafted == 0, "scores would count attention from draft tokens taken back"


# --- the command line -------------------------------------------------------------------------


def test_generate_with_lookahead_prints_the_plain_text_and_says_what_it_kept(tiny_dir):
    base = ["generate", REPEATING, "-m", str(tiny_dir), "-n", "60", "-t", "0", "--ignore-eos", "--no-save"]
    plain = runner.invoke(app, base)
    ahead = runner.invoke(app, [*base, "--lookahead", "8", "--stats"])
    assert ok(ahead) == ok(plain)
    assert "lookahead kept" in ahead.stderr and "draft tokens" in ahead.stderr, ahead.stderr
    end = json.loads(ok(runner.invoke(app, [*base, "--lookahead", "8", "--format", "json"])))
    assert end["stats"]["drafted"] >= end["stats"]["accepted"] > 0


@pytest.mark.parametrize("value", ["-1", "65", "many"])
def test_a_bad_lookahead_is_a_one_line_usage_error(tiny_dir, value):
    line = one_line_error(runner.invoke(app, ["generate", "hi", "-m", str(tiny_dir), "--no-save", "--lookahead", value]), 2)
    assert "lookahead" in line, line


def test_lookahead_comes_from_the_environment_and_config_like_any_setting(tiny_dir, tmp_path, monkeypatch):
    config = tmp_path / "run.toml"
    config.write_text("[run]\nlookahead = 4\n")
    base = ["generate", REPEATING, "-m", str(tiny_dir), "-n", "40", "-t", "0", "--ignore-eos", "--no-save", "--format", "json"]
    from_config = json.loads(ok(runner.invoke(app, [*base, "--config", str(config)])))
    assert from_config["stats"]["drafted"] > 0
    monkeypatch.setenv("WMGEN_LOOKAHEAD", "0")
    off = json.loads(ok(runner.invoke(app, base)))
    assert off["stats"]["drafted"] == 0 and off["tokens"] == from_config["tokens"]
