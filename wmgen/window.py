"""The rules of the window, as pure functions (no torch): the memory's shape, its
defaults, and which tokens of a prompt a memory keeps. Views that need no model use
these directly; `WorkingMemory` enforces them."""

from __future__ import annotations

from collections.abc import Sequence

from wmgen.errors import UsageError


def default_evict(capacity: int, keep: int) -> int:
    """A quarter of the rolling part. Measured (README, "Choosing --evict"): at
    capacity 1024 the recompute then costs ~10% of decode time, and every token
    still sees at least 3/4 of the window."""
    return max(1, (capacity - keep) // 4)


def shape(capacity: int | None, keep: int | str, evict: int | None, limit: int, prompt_tokens: int = 0) -> tuple[int, int, int]:
    """`(capacity, keep, evict)` with the defaults filled in (capacity: the model's
    limit; keep "prompt": the prompt's length; evict: `default_evict`), checked."""
    capacity = limit if capacity is None else capacity
    keep = prompt_tokens if keep == "prompt" else keep
    evict = default_evict(capacity, keep) if evict is None else evict
    check_shape(capacity, keep, evict, limit)
    return capacity, keep, evict


def check_shape(capacity: int, keep: int, evict: int, limit: int) -> None:
    """The memory's own rules, in its own words; errors name the setting (`key`) so
    that whoever knows where the value came from can say so."""
    if not 2 <= capacity <= limit:
        raise UsageError(f"capacity {capacity} is outside 2..{limit} (the model's n_positions); pick a value in range", key="capacity")
    if not 0 <= keep < capacity:
        raise UsageError(f"keep {keep} leaves no room to roll in capacity {capacity}; pin fewer tokens or raise the capacity", key="keep")
    if not 1 <= evict <= capacity - keep:
        raise UsageError(f"evict {evict} must be between 1 and capacity - keep = {capacity - keep}", key="evict")


def fit(ids: Sequence[int], capacity: int, keep: int) -> tuple[list[int], int]:
    """The pinned head and the most recent tokens of `ids` that fit `capacity`, and
    how many were dropped from between them: what reading `ids` into an empty memory
    keeps."""
    ids = list(ids)
    dropped = max(0, len(ids) - capacity)
    return ids[:keep] + ids[keep + dropped :], dropped


def kv_bytes_per_token(n_layer: int, n_embd: int, bytes_per_value: int) -> int:
    """A key and a value per layer, each `n_embd` wide."""
    return 2 * n_layer * n_embd * bytes_per_value


def describe(
    tokens: Sequence[int],
    origins: Sequence[str],
    logprobs: Sequence[float | None],
    *,
    capacity: int,
    keep: int,
    evict: int,
    counters: dict,
    kv_bytes_per_token: int,
    token_text=None,
    **about,
) -> dict:
    """A memory as plain data (the layout of snapshots and session files): shape,
    counters, and one record per slot, with the token's text when `token_text` is
    given. `about` (model id, tokenizer fingerprint, sampling settings) is included
    as given."""
    slots = [
        {"slot": i, "position": i, "token": t, "origin": o, "logprob": lp, "pinned": i < keep}
        | ({"text": token_text(t)} if token_text else {})
        for i, (t, o, lp) in enumerate(zip(tokens, origins, logprobs))
    ]
    return {
        "capacity": capacity,
        "keep": keep,
        "evict": evict,
        "fill": len(slots),
        "kv_bytes": kv_bytes_per_token * len(slots),
        "kv_bytes_per_token": kv_bytes_per_token,
        "counters": dict(counters),
        **about,
        "slots": slots,
    }
