"""The rules of the window, as pure functions (no torch): the memory's shape, its
defaults, how many slots may be pinned, and which tokens of a prompt a memory keeps.
Views that need no model use these directly; `WorkingMemory` enforces them. The
layout of a memory as data is `wmgen.snapshot`'s."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from wmgen.errors import UsageError
from wmgen.policies import POLICIES, Policy, Slot, default_recent


def default_evict(capacity: int, keep: int) -> int:
    """A quarter of the rolling part. Measured (README, "Choosing --evict"): at
    capacity 1024 the recompute then costs ~10% of decode time, and every token
    still sees at least 3/4 of the window."""
    return max(1, (capacity - keep) // 4)


class Shape(NamedTuple):
    """A memory's shape: its size, its pinned head, how much an eviction drops, and
    by which policy (`recent` is the attention policy's; None for the others)."""

    capacity: int
    keep: int
    evict: int
    policy: str = "oldest"
    recent: int | None = None


def shape(capacity: int | None, keep: int | str, evict: int | None, limit: int, prompt_tokens: int = 0,
          policy: str = "oldest", recent: int | None = None) -> Shape:
    """The shape with the defaults filled in (capacity: the model's limit; keep
    "prompt": the prompt's length; evict: `default_evict`; recent: half of the
    rolling part, or what `evict` leaves of it), checked."""
    capacity = limit if capacity is None else capacity
    keep = prompt_tokens if keep == "prompt" else int(keep)
    evict = default_evict(capacity, keep) if evict is None else evict
    check_shape(capacity, keep, evict, limit)
    if policy not in POLICIES:
        raise UsageError(f"policy {policy!r} is not one of {', '.join(POLICIES)}", key="policy")
    if policy != "attention":
        return Shape(capacity, keep, evict, policy, None)
    recent = default_recent(capacity, keep, evict) if recent is None else recent
    if not 0 <= recent <= capacity - keep - evict:
        raise UsageError(f"recent {recent} and evict {evict} do not fit in capacity - keep = {capacity - keep}; "
                         f"recent can be at most {capacity - keep - evict}", key="recent")
    return Shape(capacity, keep, evict, policy, recent)


def check_shape(capacity: int, keep: int, evict: int, limit: int) -> None:
    """The memory's own rules, in its own words; errors name the setting (`key`) so
    that whoever knows where the value came from can say so."""
    if not 2 <= capacity <= limit:
        raise UsageError(f"capacity {capacity} is outside 2..{limit} (the model's n_positions); pick a value in range", key="capacity")
    if not 0 <= keep < capacity:
        raise UsageError(f"keep {keep} leaves no room to roll in capacity {capacity}; pin fewer tokens or raise the capacity", key="keep")
    if not 1 <= evict <= capacity - keep:
        raise UsageError(f"evict {evict} must be between 1 and capacity - keep = {capacity - keep}", key="evict")


def check_pins(pinned: int, capacity: int, evict: int) -> None:
    """Pins must leave room to roll: a full memory must always find `evict`
    unpinned slots to drop."""
    if pinned > capacity - evict:
        raise UsageError(f"{pinned} pinned slots leave less than evict {evict} of capacity {capacity} to roll; "
                         f"at most {capacity - evict} can be pinned (unpin some, or lower evict)", key="pinned")


def fit(slots: Sequence[Slot], capacity: int, policy: Policy) -> tuple[list[Slot], int]:
    """What of `slots` a memory of `capacity` keeps, read all at once, and how many
    were dropped: what `policy` drops to make them fit (the newest always stays)."""
    slots = list(slots)
    overflow = len(slots) - capacity
    if overflow <= 0:
        return slots, 0
    drop = set(policy.drop(slots[:-1], overflow))
    return [s for i, s in enumerate(slots) if i not in drop], len(drop)


def kv_bytes_per_token(n_layer: int, n_embd: int, bytes_per_value: int) -> int:
    """A key and a value per layer, each `n_embd` wide."""
    return 2 * n_layer * n_embd * bytes_per_value
