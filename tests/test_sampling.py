"""Sampling: seeded, greedy at temperature 0, and the same filters as transformers'
own logits processors (repetition penalty, temperature, top-k, top-p, in that order)."""

from __future__ import annotations

import functools

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from wmgen.generation import Started, Token, generate
from wmgen.memory import WorkingMemory
from wmgen.sampling import choose, keep_top_k, keep_top_p, new_generator, penalize_repetition, probabilities
from wmgen.sampling import draw as sample
from wmgen.settings import RunSettings, Sampling

PROMPT = "Once upon a time there was"


def generated_tokens(loaded, sampling: Sampling, n: int = 20) -> tuple[list[int], int]:
    model, tokenizer, _ = loaded
    memory = WorkingMemory(model, model.config.n_positions)
    run = RunSettings(max_new_tokens=n, ignore_eos=True)
    events = list(generate(memory, tokenizer, tokenizer.encode(PROMPT), run, sampling))
    seed = next(e.seed for e in events if isinstance(e, Started))
    return [e.id for e in events if isinstance(e, Token)], seed


def transformers_filter(logits: torch.Tensor, s: Sampling, history: list[int]) -> torch.Tensor:
    """`logits` [V] through transformers' processors, in generate()'s order."""
    scores = logits[None].clone()
    input_ids = torch.tensor([history], dtype=torch.long)
    if s.repetition_penalty != 1.0 and history:
        scores = RepetitionPenaltyLogitsProcessor(penalty=s.repetition_penalty)(input_ids, scores)
    scores = TemperatureLogitsWarper(s.temperature)(input_ids, scores)
    if s.top_k > 0:
        scores = TopKLogitsWarper(top_k=s.top_k)(input_ids, scores)
    if s.top_p < 1.0:
        scores = TopPLogitsWarper(top_p=s.top_p)(input_ids, scores)
    return scores[0]


def random_cases(n: int, vocab: int = 50, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def uniform(lo, hi):
        return lo + (hi - lo) * float(torch.rand((), generator=g))

    for _ in range(n):
        logits = torch.randn(vocab, generator=g) * uniform(0.5, 4.0)
        history = torch.randint(0, vocab, (int(torch.randint(0, 20, (), generator=g)),), generator=g).tolist()
        yield logits, history, uniform, g


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square test of `counts` against `probs`; the p-value, from the
    chi-square survival function Q(df/2, x/2) (the regularized upper incomplete gamma)."""
    counts, probs = counts.double(), probs.double()
    expected = counts.sum() * probs
    assert expected.min() >= 5, "too few expected draws per cell for the chi-square approximation"
    statistic = ((counts - expected) ** 2 / expected).sum()
    df = len(probs) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), statistic / 2))


def draw(logits: torch.Tensor, s: Sampling, n: int, seed: int, history=()) -> torch.Tensor:
    """How often each token comes out of `n` calls of `choose`."""
    g = new_generator(seed, "cpu")
    counts = torch.zeros(logits.shape[-1], dtype=torch.long)
    for _ in range(n):
        counts[choose(logits, s, g, history)] += 1
    return counts


# --- seeds and greedy ------------------------------------------------------------------


def test_the_same_seed_gives_the_same_tokens(loaded):
    s = Sampling(temperature=1.0, seed=1234)
    first, seed = generated_tokens(loaded, s)
    assert seed == 1234
    assert generated_tokens(loaded, s)[0] == first


def test_different_seeds_give_different_runs(loaded):
    """So that the repeat above says something: the runs do depend on the seed."""
    runs = {tuple(generated_tokens(loaded, Sampling(temperature=1.5, seed=seed))[0]) for seed in (1, 2, 3)}
    assert len(runs) > 1


def test_a_random_seed_is_reported_and_replays_the_run(loaded):
    first, seed = generated_tokens(loaded, Sampling(temperature=1.5, seed=None))
    assert generated_tokens(loaded, Sampling(temperature=1.5, seed=seed))[0] == first


def test_top_k_1_equals_greedy(loaded):
    greedy, _ = generated_tokens(loaded, Sampling(temperature=0))
    assert generated_tokens(loaded, Sampling(temperature=2.0, top_k=1, seed=6))[0] == greedy


def test_temperature_0_is_argmax():
    g = new_generator(0, "cpu")
    for logits, _, _, _ in random_cases(50):
        assert choose(logits, Sampling(temperature=0), g) == int(logits.argmax())
        # the filters never drop the most likely token, so they change nothing at temperature 0
        assert choose(logits, Sampling(temperature=0, top_k=3, top_p=0.2), g) == int(logits.argmax())


def test_temperature_0_with_a_repetition_penalty_is_argmax_of_the_penalized_logits():
    g = new_generator(0, "cpu")
    for logits, history, _, _ in random_cases(50, seed=1):
        s = Sampling(temperature=0, repetition_penalty=1.7)
        penalized = RepetitionPenaltyLogitsProcessor(penalty=1.7)(torch.tensor([history]), logits[None].clone())[0]
        expected = int(penalized.argmax()) if history else int(logits.argmax())
        assert choose(logits, s, g, history) == expected


# --- the distribution draws come from ----------------------------------------------------

# Pearson's chi-square at significance 0.001: for 8 tokens (df = 7) the critical value is
# 24.32. With a fixed seed the test is deterministic; a correct sampler fails it for one
# seed in a thousand, a sampler off by a few percent on any token fails it for nearly all.
SIGNIFICANCE = 1e-3
DRAWS = 20_000
SMALL_LOGITS = torch.tensor([1.2, -0.3, 0.5, 2.0, -1.0, 0.0, 1.6, -0.6])


@functools.cache
def draws_at(temperature: float) -> torch.Tensor:
    return draw(SMALL_LOGITS, Sampling(temperature=temperature), DRAWS, seed=42)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_draws_follow_softmax_of_logits_over_temperature(temperature):
    counts = draws_at(temperature)
    expected = torch.softmax(SMALL_LOGITS.double() / temperature, -1)
    p = chi_square_p_value(counts, expected)
    assert p > SIGNIFICANCE, f"draws at T={temperature} are not softmax(logits/T): p = {p:.2e}, {counts.tolist()}"


def test_chi_square_check_rejects_a_wrong_temperature():
    """The test above has teeth: draws at T=1 do not pass for softmax(logits / 0.85)."""
    assert chi_square_p_value(draws_at(1.0), torch.softmax(SMALL_LOGITS.double() / 0.85, -1)) < SIGNIFICANCE


def test_filtered_draws_follow_the_transformers_distribution():
    s = Sampling(temperature=0.9, top_k=6, top_p=0.85, repetition_penalty=1.3)
    history = [0, 3, 5]
    probs = transformers_filter(SMALL_LOGITS, s, history).double().softmax(-1)
    survivors = probs > 0
    assert 1 < int(survivors.sum()) < len(SMALL_LOGITS), "the filters should keep some tokens and drop others"
    counts = draw(SMALL_LOGITS, s, DRAWS // 2, seed=43, history=history)
    assert counts[~survivors].sum() == 0, "a filtered-out token was drawn"
    p = chi_square_p_value(counts[survivors], probs[survivors])
    assert p > SIGNIFICANCE, f"p = {p:.2e}, counts {counts.tolist()}, expected {(probs * (DRAWS // 2)).tolist()}"


# --- filters agree with transformers' logits processors ---------------------------------


def assert_same_filter(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs)), "different tokens survive"
    torch.testing.assert_close(ours.softmax(-1), theirs.softmax(-1), atol=1e-6, rtol=1e-5)


def test_top_k_keeps_the_tokens_transformers_keeps():
    for logits, _, uniform, _ in random_cases(200, seed=2):
        k = int(uniform(1, 60))
        theirs = TopKLogitsWarper(top_k=k)(torch.zeros(1, 0, dtype=torch.long), logits[None].clone())[0]
        assert_same_filter(keep_top_k(logits, k), theirs)


def test_top_p_keeps_the_tokens_transformers_keeps():
    for logits, _, uniform, _ in random_cases(200, seed=3):
        p = uniform(0.01, 0.999)
        theirs = TopPLogitsWarper(top_p=p)(torch.zeros(1, 0, dtype=torch.long), logits[None].clone())[0]
        ours = keep_top_p(logits, p)
        assert_same_filter(ours, theirs)
        assert torch.isfinite(ours).any()


def nucleus_in_float64(logits: torch.Tensor, p: float, rounding: float = 2e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-p's set computed in float64, as `(kept, edge)`: `edge` marks the tokens whose
    mass before them lies within float32 `rounding` of p. A float32 sum over tens of
    thousands of tokens rounds differently by order and by CPU (transformers adds
    ascending, wmgen descending; AVX2 and AVX-512 vectorize differently), so either
    answer is right for those tokens and only for those."""
    probs = logits.double().softmax(-1)
    order = probs.argsort(descending=True)
    before = torch.empty_like(probs).scatter_(0, order, probs[order].cumsum(0) - probs[order])
    kept = before < p
    kept[order[0]] = True
    return kept, (before - p).abs() <= rounding


@pytest.mark.parametrize("spread", [0.1, 1.0, 3.0, 8.0])  # flat to peaked, at gpt2's vocabulary size
def test_top_p_keeps_the_tokens_transformers_keeps_over_a_whole_vocabulary(spread):
    g = torch.Generator().manual_seed(int(spread * 10))
    for p in (1e-7, 0.3, 0.9, 0.99, 0.999):
        logits = torch.randn(50257, generator=g) * spread
        theirs = TopPLogitsWarper(top_p=p)(torch.zeros(1, 0, dtype=torch.long), logits[None].clone())[0]
        ours = keep_top_p(logits, p)
        exact, edge = nucleus_in_float64(logits, p)
        assert int(exact.sum()) > 1 or p < 0.5, "the cases should keep more than one token"
        for kept in (torch.isfinite(ours), torch.isfinite(theirs)):
            assert torch.equal(kept[~edge], exact[~edge]), "a token away from the rounding edge survives wrongly"
        rows = keep_top_p(torch.stack([logits, logits.flip(0)]), p)  # a batch ranks every token
        assert torch.equal(rows[0], ours)
        flipped = torch.isfinite(rows[1].flip(0))  # (summed in another order: the edge may differ)
        assert torch.equal(flipped[~edge], exact[~edge])


def test_a_draw_never_picks_a_token_of_probability_zero_at_either_end():
    probs = torch.zeros(50257)
    probs[[1, 2, 50255]] = torch.tensor([0.25, 0.5, 0.25])
    g = new_generator(7, "cpu")
    drawn = {sample(probs, g) for _ in range(400)}
    assert drawn == {1, 2, 50255}
    weights = torch.tensor([0.0, 3.0, 0.0])  # need not add up to 1
    assert {sample(weights, g) for _ in range(50)} == {1}


def test_a_draw_at_the_top_of_the_unit_interval_takes_the_last_possible_token(monkeypatch):
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.tensor(1.0 - 2**-53, dtype=torch.float64))
    probs = torch.tensor([0.1, 0.2, 0.7, 0.0, 0.0])
    assert sample(probs, new_generator(0, "cpu")) == 2


def test_repetition_penalty_matches_transformers():
    for logits, history, uniform, _ in random_cases(200, seed=4):
        if not history:
            continue
        penalty = uniform(0.5, 2.5)
        theirs = RepetitionPenaltyLogitsProcessor(penalty=penalty)(torch.tensor([history]), logits[None].clone())[0]
        torch.testing.assert_close(penalize_repetition(logits, history, penalty), theirs)


def test_probabilities_equal_transformers_processors_in_generate_order():
    for logits, history, uniform, g in random_cases(300, seed=5):
        s = Sampling(
            temperature=uniform(0.2, 2.5),
            top_k=int(torch.randint(0, 55, (), generator=g)),  # 0 is off; above the vocabulary too
            top_p=1.0 if uniform(0, 1) < 0.3 else uniform(0.05, 0.999),
            repetition_penalty=1.0 if uniform(0, 1) < 0.3 else uniform(0.6, 2.0),
        )
        theirs = transformers_filter(logits, s, history)
        ours = probabilities(logits, s, history)
        assert torch.equal(ours > 0, torch.isfinite(theirs)), f"different tokens survive for {s}"
        torch.testing.assert_close(ours, theirs.softmax(-1), atol=1e-6, rtol=1e-5)
