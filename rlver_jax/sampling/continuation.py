"""The sampler's continuation machinery: what a call keeps of a row's cached tokens, the
compaction that moves the kept tokens back to back, cache capacity buckets, and the GRPO
group fork (one prefill of a group's common head, copied into the group's rows).

`Sampler.generate(previous=...)` and `Sampler.fork_prefill` / `fork_groups` are the entry
points; these functions take the sampler for its jitted programs and device placement.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx

from rlver_jax.models.qwen2 import KVCache


def next_power_of_two(n: int, minimum: int = 1) -> int:
    n = max(int(n), minimum, 1)
    return 1 << (n - 1).bit_length()


# A continuation prefills its new tokens in blocks of at most this many (a power of two):
# the cache then needs room for one block past the kept tokens and the longest new suffix,
# not for that suffix rounded up to a power of two (up to twice its length). Each row's
# suffix is left padded to whole blocks, and that padding sits inside the slots every
# decode step of the call attends over, so the block is small: a 1,030-token turn in
# 1,024-token blocks computed 2,048 slots per row (simulator shape, actor turn 2).
EXTENSION_BLOCK = 256

# Cache capacities of continued calls: this many sizes per octave (power-of-two interval),
# so a continued cache wastes at most 1 / (this) of its slots while a long run still
# compiles a bounded set of programs (a few per octave of dialogue length).
CAPACITY_BUCKETS_PER_OCTAVE = 4


def capacity_bucket(n: int, per_octave: int = CAPACITY_BUCKETS_PER_OCTAVE) -> int:
    """The smallest capacity >= n of the form m * 2^e / per_octave (m in per_octave+1 ..
    2 * per_octave): n rounded up to a multiple of 1 / per_octave of its octave's start."""
    top = next_power_of_two(n)
    step = max(top // (2 * per_octave), 1)
    return -(-max(int(n), 1) // step) * step


def prefill_width(longest: int, min_bucket: int, extension_block: int = 0) -> int:
    """The [B, T] block width for prompts of up to `longest` tokens: a power of two (at
    least `min_bucket`), or, fed in `extension_block`s (0: in one pass) and longer than
    one, whole blocks, none of them empty."""
    width = next_power_of_two(longest, min_bucket)
    if extension_block and width > extension_block:
        width = -(-longest // extension_block) * extension_block
    return width


def stream_capacity(max_prompt_tokens: int, max_new_tokens: int,
                    extension_block: int = EXTENSION_BLOCK) -> int:
    """Slots a continued stream needs for prompts of up to `max_prompt_tokens`: the kept
    tokens, one extension block and the new tokens (before `capacity_bucket`). A stream
    sized so from its first call keeps one capacity, hence one set of compiled programs,
    however its dialogues grow; it is also what the memory planner counts."""
    return max_prompt_tokens + extension_block + next_power_of_two(max_new_tokens)


@dataclasses.dataclass
class SamplerState:
    """What a call leaves behind for a continuation: the cache and, per row, the tokens in it."""

    cache: KVCache
    # None marks a row that cannot be continued: a padding row (it holds a dummy token) or
    # a row that the last call did not use (its slots may hold another call's tokens).
    cached_tokens: list[list[int] | None]
    # Per row, the cache slot of each cached token (a call leaves holes: padding, slots
    # after a row stopped; the next continuation compacts them away).
    cached_slots: list[list[int] | None]


def kept_prefix(prompt: Sequence[int], cached: Sequence[int]) -> int:
    """How many cached tokens a continuation keeps: the common prefix of the prompt and the
    cached tokens, leaving at least one prompt token to feed (its logits start sampling)."""
    limit = min(len(prompt) - 1, len(cached))
    differ = np.flatnonzero(np.asarray(prompt[:limit]) != np.asarray(cached[:limit]))
    return int(differ[0]) if len(differ) else limit


def gather_slots(cache: KVCache, sources, valid, index, positions) -> KVCache:
    """A cache whose slot j of row b is slot sources[b, j] of `cache` (sources, valid
    [B, capacity]); writing resumes at slot `index`, row b at rotary position
    positions[b]. Keys keep their rotary phase and the gather keeps slot order, so
    attention sees the same keys in the same causal order."""
    take = jax.vmap(lambda x, rows: x[:, rows], in_axes=(1, 0), out_axes=1)
    return KVCache(k=take(cache.k, sources), v=take(cache.v, sources), valid=valid,
                   index=index, next_position=positions)


def compact(sampler, previous: SamplerState, batch: int, kept: list[int], start: int,
            capacity: int) -> KVCache:
    """The previous cache with row i's first kept[i] cached tokens moved, in order, to
    slots [start - kept[i], start) of a `capacity`-slot cache and nothing else valid:
    what is rolled back and every hole (padding, slots left by rows that stopped
    early) is gone, and row i resumes at rotary position kept[i]."""
    sources = np.zeros((batch, capacity), np.int32)
    valid = np.zeros((batch, capacity), bool)
    for i, k in enumerate(kept):
        if k:
            sources[i, start - k:start] = previous.cached_slots[i][:k]
            valid[i, start - k:start] = True
    run = (sampler._compact_same if capacity == previous.cache.capacity
           else sampler._compact_resize)
    sources, valid, positions = sampler._place_all(sources, valid, np.asarray(kept, np.int32))
    return run(previous.cache, sources, valid, np.int32(start), positions, capacity=capacity)


def prefill_blocks(sampler, weights, cache, tokens: np.ndarray, mask: np.ndarray, block: int):
    """Appends host [B, W] tokens to the cache `block` columns at a time (W a multiple of
    it); returns the logits after each row's last token and the cache."""
    logits = None
    for b0 in range(0, tokens.shape[1], block):
        logits, cache = sampler._prefill(weights, cache, *sampler._place_all(
            tokens[:, b0:b0 + block], mask[:, b0:b0 + block]))
    return logits, cache


def fork_prefill(sampler, model: nnx.Module, prefixes: Sequence[Sequence[int]],
                 sources: Sequence[int | None], capacity: int = 0) -> SamplerState:
    """Prefills each prefix once and copies its cache row into every row that names it.

    Row i of the returned state holds `prefixes[sources[i]]` (None: a row left unused),
    ready for `generate(previous=...)`: a GRPO group's rows share their profile, so
    their common prompt head is computed once per group instead of once per row.
    `capacity` (0: just the prefixes): the cache's slots, fed in extension blocks, as
    for the stream the state starts (the continuation keeps that capacity, and no
    program depends on the prefixes' lengths). Single-process meshes only (a multi-host
    caller prefills every row instead).
    """
    if sampler.multiprocess:
        raise ValueError("fork_prefill: not available on a mesh that spans processes")
    if not prefixes or any(len(p) == 0 for p in prefixes):
        raise ValueError("fork_prefill: every prefix must hold at least one token")
    bad = [s for s in sources if s is not None and not 0 <= s < len(prefixes)]
    if bad:
        raise ValueError(f"fork_prefill: source {bad[0]} outside 0..{len(prefixes) - 1}")
    weights = nnx.state(model)
    block = sampler.extension_block if capacity else 0
    width = prefill_width(max(len(p) for p in prefixes), sampler.min_prompt_bucket, block)
    if capacity and capacity < width:
        raise ValueError(f"fork_prefill: capacity {capacity} below the prefixes' {width}")
    groups = next_power_of_two(len(prefixes))
    tokens = np.zeros((groups, width), np.int32)
    mask = np.zeros((groups, width), bool)
    for g, p in enumerate(prefixes):
        tokens[g, width - len(p):] = p
        mask[g, width - len(p):] = True
    mask[len(prefixes):, -1] = True  # padding rows: one dummy token, as in generate
    cache = sampler._new_cache(groups, capacity or width)
    _, cache = prefill_blocks(sampler, weights, cache, tokens, mask, block or width)
    batch = next_power_of_two(len(sources))
    rows = np.zeros((batch,), np.int32)  # unused rows copy row 0; they are never continued
    rows[:len(sources)] = [0 if s is None else s for s in sources]
    cache = sampler._fork(cache, sampler._place(rows))
    cached = [None if s is None else list(prefixes[s]) for s in sources]
    slots = [None if s is None else list(range(width - len(prefixes[s]), width))
             for s in sources]
    pad = [None] * (batch - len(sources))
    return SamplerState(cache=cache, cached_tokens=cached + pad, cached_slots=slots + pad)


def fork_groups(sampler, model: nnx.Module, prompts: Sequence[Sequence[int]],
                groups: Sequence[Any], max_prompt_tokens: int = 0,
                max_new_tokens: int = 1) -> tuple[SamplerState | None, int]:
    """A state to continue `prompts` from in which rows with equal `groups` keys share
    one prefill of their common prefix (`fork_prefill`), and the number of tokens that
    prefill computed; (None, 0) when no group has two rows (nothing to share) or on a
    mesh that spans processes. `max_prompt_tokens` / `max_new_tokens`, as for
    `generate`: the state's cache is sized for that stream (`stream_capacity`)."""
    if sampler.multiprocess:
        return None, 0
    members: dict[Any, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    if all(len(rows) == 1 for rows in members.values()):
        return None, 0
    prefixes, sources = [], [0] * len(prompts)
    for rows in members.values():
        first = prompts[rows[0]]
        common = len(first) - 1  # the continuation feeds at least one token
        for r in rows[1:]:
            common = min(common, kept_prefix(prompts[r], first))
        if common < 1:
            return None, 0
        for r in rows:
            sources[r] = len(prefixes)
        prefixes.append(list(first[:common]))
    capacity = (capacity_bucket(stream_capacity(max_prompt_tokens, max_new_tokens,
                                                sampler.extension_block),
                                sampler.capacity_buckets_per_octave)
                if max_prompt_tokens > 0 else 0)
    return (fork_prefill(sampler, model, prefixes, sources, capacity),
            sum(len(p) for p in prefixes))
