"""Batched autoregressive sampling with a KV cache: jitted prefill and while-loop decode.

Prompts are left padded into a [B, T] block; batch size, prompt length and number of new
tokens are rounded up to powers of two and cache capacity to `capacity_bucket`s, so a long run compiles a small,
bounded set of programs (`Sampler.compilations` counts them). Temperature, top-p and top-k
are traced scalars: changing them never recompiles. Weights are arguments of the jitted
functions, never constants, so the same programs serve updated policy weights.

Continuation: `generate(..., previous=state)` appends only the new suffix of each prompt
to the cache that the previous call left. A prompt that extends its row's cached tokens
(multi-turn dialogues grow by one turn at a time) keeps them all; a prompt that departs
from them part-way (think mode: the next prompt drops the old thought) rolls the row back
to the common prefix, when that prefix is at least half of the new prompt. Each
continuation first compacts the cache: every row's kept tokens are gathered, in order,
into the slots right before one common write index, so the slots that earlier calls left
dead (left padding, decode steps after a row stopped, rolled-back text) are reclaimed
and never attended over again. The compacted cache is sized to this call
(`capacity_bucket` of kept + prompt block + new tokens), so its size follows what the
dialogue holds, not how many turns it took to get there; a caller that knows its prompt
cap (`max_prompt_tokens`, the LLM user) gets that cap's capacity from the first call (and
from `fork_groups`), and its first prompts are fed in extension blocks like its
continuations, so its growing dialogues keep one capacity and compile nothing new.

Decode on CPU runs the decoder layers as an unrolled loop over per-layer, output-major
copies of the weights and reads the head as [V, D] (`decode_layers`,
`decode_weights.DecodeWeightCopies`).

Multi-host: on a mesh that spans processes every process passes its own rows (its own
dialogues) and every process must make the same sequence of calls; a process with nothing
to generate passes only `None` rows (or none at all) and still takes part. Shapes and the
continue-or-restart decision are agreed between processes, so each call runs one global
program over every process's rows (`distributed.global_rows` / `local_rows`).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlver_jax import distributed
from rlver_jax.models.projections import out_major_dot
from rlver_jax.models.qwen2 import KVCache, init_cache
from rlver_jax.sampling import continuation
from rlver_jax.sampling.decode_weights import DecodeWeightCopies
from rlver_jax.sampling.continuation import (  # noqa: F401  (re-exported)
    CAPACITY_BUCKETS_PER_OCTAVE, EXTENSION_BLOCK, SamplerState, capacity_bucket, kept_prefix,
    next_power_of_two)
from rlver_jax.sampling.token_sampling import row_keys, sample_step

NO_TOKEN = -1
# How decode runs the decoder layers: "scan" over the stacked weights (compile time flat in
# depth), "unrolled" over per-layer copies made once per set of weights (XLA:CPU copies
# each layer's slice of a stack before its matmuls, every step: `unstack_layers`), or
# "auto": unrolled on CPU, where that copy costs, scan elsewhere (GPU / TPU matmuls read
# the slice in place, and a second copy of the weights would cost device memory).
DECODE_LAYER_MODES = ("auto", "scan", "unrolled")


@dataclasses.dataclass
class SampleOutput:
    """Per prompt: generated ids (ending with the stop token when one was produced), their
    log-probs under the sampling distribution (after temperature / top-k / top-p; 0 for
    greedy), and `raw_logprobs`, under the untruncated distribution at the sampling
    temperature (temperature 1 when greedy): the distribution the trainer computes, so the
    two are compared like with like (the `logprob_gap/*` alarm, importance weights)."""

    tokens: list[list[int]]
    logprobs: list[list[float]]
    raw_logprobs: list[list[float]]
    stopped: list[bool]
    state: SamplerState | None = None
    # Prompt tokens of this process's rows that the call computed (prefilled) and that it
    # served from the previous state's cache (None: not counted, e.g. a test double).
    prefill_tokens: int | None = None
    reused_tokens: int | None = None


class Sampler:
    """Keeps compiled prefill / decode programs for one model architecture (and mesh)."""

    def __init__(self, model: nnx.Module, *, min_prompt_bucket: int = 16,
                 max_stop_tokens: int = 8, mesh=None, cache_dtype=None,
                 capacity_buckets_per_octave: int = CAPACITY_BUCKETS_PER_OCTAVE,
                 extension_block: int = EXTENSION_BLOCK, decode_layers: str = "auto"):
        if decode_layers not in DECODE_LAYER_MODES:
            raise ValueError(f"Sampler: decode_layers={decode_layers!r}, expected one of "
                             f"{DECODE_LAYER_MODES}")
        if extension_block < min_prompt_bucket or extension_block & (extension_block - 1):
            raise ValueError(f"Sampler: extension_block={extension_block} must be a power "
                             f"of two >= min_prompt_bucket={min_prompt_bucket}")
        self.graphdef = nnx.graphdef(model)
        self.config = model.config
        self.min_prompt_bucket = min_prompt_bucket
        self.max_stop_tokens = max_stop_tokens
        self.mesh = mesh
        self.cache_dtype = cache_dtype
        self.capacity_buckets_per_octave = capacity_buckets_per_octave
        self.extension_block = extension_block
        self.compilations: collections.Counter = collections.Counter()
        # Rows whose continuation dropped cached tokens (a prompt departing part-way).
        self.rolled_back_rows = 0
        self.multiprocess = distributed.spans_processes(mesh)
        self._cache_inits: dict = {}
        self._prefill = jax.jit(self._prefill_impl, donate_argnums=(1,))
        self._decode = jax.jit(self._decode_impl, donate_argnums=(1,),
                               static_argnames=("max_new_bucket",))
        # Donated only at an unchanged capacity: a resized cache has another shape, so XLA
        # could not reuse the buffers (and would warn).
        self._compact_same = jax.jit(self._compact_impl, donate_argnums=(0,),
                                     static_argnames=("capacity",))
        self._compact_resize = jax.jit(self._compact_impl, static_argnames=("capacity",))
        self._fork = jax.jit(self._fork_impl)
        self.unrolled_decode = (decode_layers == "unrolled" or
                                (decode_layers == "auto" and jax.default_backend() == "cpu"))
        self._weight_copies = DecodeWeightCopies()

    # -------------------------------------------------------------- jitted programs
    def _prefill_impl(self, weights, cache, tokens, mask):
        """Appends [B, T] tokens to the cache; returns the logits after each row's last token."""
        self.compilations["prefill", tokens.shape, cache.capacity] += 1  # runs at trace time
        model = nnx.merge(self.graphdef, weights)
        logits, cache = model(tokens, mask, cache=cache)
        return logits[:, -1], cache

    def _compact_impl(self, cache, sources, valid, index, positions, *, capacity):
        self.compilations["compact", cache.k.shape, capacity] += 1
        return continuation.gather_slots(cache, sources, valid, index, positions)

    def _fork_impl(self, cache, sources):
        """Row i of the result is row sources[i] of `cache` (a gather over the batch)."""
        self.compilations["fork", cache.valid.shape, sources.shape] += 1
        return KVCache(k=cache.k[:, sources], v=cache.v[:, sources], valid=cache.valid[sources],
                       index=cache.index, next_position=cache.next_position[sources])

    def _decode_impl(self, weights, cache, logits, alive, keys, max_new, stop_ids,
                     temperature, top_k, top_p, layers=None, head=None, *, max_new_bucket):
        """Samples until every row has stopped or `max_new` tokens.

        logits [B, V]: next-token logits of each row; alive [B] bool (padding rows False);
        keys [B] per-row PRNG keys; layers: the decoder weights per layer
        (`decode_layer_weights`) or None (scan the stacked ones); head: the output-major
        [V, D] output projection (`decode_head`) or None (the model's). Returns
        tokens/logprobs [B, M], lengths [B], stopped [B], cache. Rows that stopped feed
        nothing more into it.
        """
        self.compilations["decode", logits.shape, cache.capacity, max_new_bucket] += 1
        model = nnx.merge(self.graphdef, weights)
        batch = logits.shape[0]
        out_tokens = jnp.full((batch, max_new_bucket), NO_TOKEN, jnp.int32)
        out_lp = jnp.zeros((batch, max_new_bucket), jnp.float32)
        out_raw = jnp.zeros((batch, max_new_bucket), jnp.float32)

        def cond(carry):
            step, _, _, running, *_ = carry
            return (step < max_new) & jnp.any(running)

        def body(carry):
            step, cache, logits, running, stopped, toks, lps, raws = carry
            step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)
            token, lp, raw = sample_step(logits, step_keys, temperature, top_k, top_p)
            toks = toks.at[:, step].set(jnp.where(running, token, NO_TOKEN))
            lps = lps.at[:, step].set(jnp.where(running, lp, 0.0))
            raws = raws.at[:, step].set(jnp.where(running, raw, 0.0))
            hit_stop = jnp.any(token[:, None] == stop_ids[None, :], axis=-1) & running
            stopped = stopped | hit_stop
            still = running & ~hit_stop & (step + 1 < max_new)

            def feed(cache):
                # The sampled token enters the cache only for rows that go on.
                hidden, cache = model.hidden_states(token[:, None], still[:, None],
                                                    cache=cache, layer_weights=layers)
                if head is None:
                    return model.logits_from_hidden(hidden)[:, -1], cache
                return out_major_dot(hidden[:, -1], head.astype(hidden.dtype),
                                     preferred_element_type=jnp.float32), cache

            logits, cache = jax.lax.cond(jnp.any(still), feed, lambda c: (logits, c), cache)
            return step + 1, cache, logits, still, stopped, toks, lps, raws

        init = (jnp.zeros((), jnp.int32), cache, logits, alive, jnp.zeros_like(alive),
                out_tokens, out_lp, out_raw)
        _, cache, _, _, stopped, toks, lps, raws = jax.lax.while_loop(cond, body, init)
        return toks, lps, raws, stopped, cache

    # ---------------------------------------------------------- ahead of time
    def lower_prefill(self, weights, cache, tokens, mask):
        """The prefill program lowered for these arguments (arrays or sharded
        ShapeDtypeStructs): compile and inspect it without running (rlver_jax.plan)."""
        return self._prefill.lower(weights, cache, tokens, mask)

    def lower_decode(self, weights, cache, logits, alive, keys, max_new, stop_ids,
                     temperature, top_k, top_p, layers=None, head=None, *, max_new_bucket):
        """The decode program lowered for these arguments, as `lower_prefill`."""
        return self._decode.lower(weights, cache, logits, alive, keys, max_new, stop_ids,
                                  temperature, top_k, top_p, layers, head,
                                  max_new_bucket=max_new_bucket)

    def decode_layer_weights(self, model: nnx.Module):
        """The per-layer weights that decode reads (None when it scans the stack)."""
        return self._weight_copies.layers(model) if self.unrolled_decode else None

    def decode_head(self, model: nnx.Module):
        """The [V, D] head that decode reads, or None (the model's, when it scans)."""
        return self._weight_copies.head(model) if self.unrolled_decode else None

    # -------------------------------------------------------------------- host API
    def _place(self, x):
        """Host rows [B_local, ...] -> a device batch (global over processes when the mesh
        spans several)."""
        if self.mesh is None:
            return jnp.asarray(x)
        if self.multiprocess:
            return distributed.global_rows(x, self.mesh)
        from rlver_jax.sharding import batch_sharding
        return jax.device_put(x, batch_sharding(self.mesh, np.ndim(x), batch_size=len(x)))

    def _place_all(self, *xs):
        """`_place` of several host batches in one transfer (a call per array costs
        about as much as a small model's decode step, and a sampler call makes dozens)."""
        if self.mesh is None or self.multiprocess:
            return tuple(self._place(x) for x in xs)
        from rlver_jax.sharding import batch_sharding
        return jax.device_put(xs, tuple(batch_sharding(self.mesh, np.ndim(x),
                                                       batch_size=len(x)) for x in xs))

    def _host(self, x) -> np.ndarray:
        """This process's rows of a device batch."""
        return distributed.local_rows(x) if self.multiprocess else np.asarray(jax.device_get(x))

    def any_process(self, flag: bool) -> bool:
        """Whether `flag` holds on any process of the mesh (plain `bool` on one process):
        callers' "is there work left" tests, so that every process keeps making the same
        calls (env.generation.Generator)."""
        return distributed.any_process(flag) if self.multiprocess else bool(flag)

    def _new_cache(self, batch, capacity):
        """An empty cache of `batch` (global) rows, created in place on the mesh: nothing
        of cache size is built on one device first."""
        if self.mesh is None:
            return init_cache(self.config, batch, capacity, self.cache_dtype)
        make = self._cache_inits.get((batch, capacity))
        if make is None:
            from jax.sharding import NamedSharding, PartitionSpec
            from rlver_jax.sharding import batch_sharding, logical_to_spec
            empty = lambda: init_cache(self.config, batch, capacity, self.cache_dtype)
            shape = jax.eval_shape(empty)
            kv = NamedSharding(self.mesh, logical_to_spec(
                (None, "batch", "cache_length", "kv_heads", "head_dim"), shape.k.shape,
                dict(self.mesh.shape)))
            rows = lambda ndim: batch_sharding(self.mesh, ndim, batch_size=batch)
            shardings = KVCache(k=kv, v=kv, valid=rows(2),
                                index=NamedSharding(self.mesh, PartitionSpec()),
                                next_position=rows(1))
            make = jax.jit(empty, out_shardings=shardings)
            self._cache_inits[(batch, capacity)] = make
        return make()

    def generate(self, model: nnx.Module, prompts: Sequence[Sequence[int] | None],
                 max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, stop_token_ids: Sequence[int] = (), seed: int = 0,
                 previous: SamplerState | None = None, keep_state: bool = False,
                 max_prompt_tokens: int = 0) -> SampleOutput:
        """Samples a continuation of every prompt (a list of token ids, or None for a row
        that sits this call out: it keeps its row and its cache for a later continuation).

        With `previous` (a state from `keep_state=True`), rows whose prompt extends the
        tokens cached in that row are continued from the cache; otherwise (any active row
        not an extension) the call starts fresh. A state is consumed by the call that
        continues it (its cache buffers are donated). `max_prompt_tokens` (0: unknown): the
        longest prompt the caller's stream will pass; the cache is sized for it from the
        start (`continuation.stream_capacity`), so a dialogue's growing calls share one
        capacity and its programs instead of compiling new ones as they grow.
        """
        # Multi-host: a process whose rows all sit out still joins the collective call.
        if not prompts and not self.multiprocess:
            raise ValueError("generate: no prompts")
        active = [p is not None for p in prompts]
        if not any(active) and not self.multiprocess:
            raise ValueError("generate: every prompt is None")
        empty = [i for i, p in enumerate(prompts) if p is not None and len(p) == 0]
        if empty:
            raise ValueError(f"generate: empty prompt at index {empty[0]}")
        if max_new_tokens < 1:
            raise ValueError(f"generate: max_new_tokens={max_new_tokens} must be >= 1")
        if len(stop_token_ids) > self.max_stop_tokens:
            raise ValueError(f"generate: at most {self.max_stop_tokens} stop tokens, got "
                             f"{len(stop_token_ids)}")
        n = len(prompts)
        weights = nnx.state(model)
        max_new_bucket = next_power_of_two(max_new_tokens)
        reserve = (continuation.stream_capacity(max_prompt_tokens, max_new_tokens,
                                                self.extension_block)
                   if max_prompt_tokens > 0 else 0)
        processes = jax.process_count() if self.multiprocess else 1
        agree_max = distributed.max_over_processes if self.multiprocess else int
        agree_all = distributed.all_processes if self.multiprocess else bool

        # A continuation needs every active row (of every process) to have cached tokens
        # and to keep all of them (an extension) or at least half of its new prompt.
        # Compaction (below) reclaims every dead slot, so a continued cache never needs
        # more room than its kept tokens, the prompt block and the new tokens.
        keep: list[int] = [0] * n
        local_reuse = (previous is not None and len(previous.cached_tokens) >= n
                       and all(c is not None for p, c in zip(prompts, previous.cached_tokens)
                               if p is not None))
        if local_reuse:
            keep = [0 if p is None else kept_prefix(p, c)
                    for p, c in zip(prompts, previous.cached_tokens)]
            local_reuse = all(k == len(c) or 2 * k >= len(p) for p, c, k
                              in zip(prompts, previous.cached_tokens, keep) if p is not None)
        reuse = agree_all(local_reuse)
        width_of = lambda rows, in_blocks: continuation.prefill_width(
            agree_max(max((len(r) for r in rows), default=0)), self.min_prompt_bucket,
            self.extension_block if in_blocks else 0)

        # A continuation, and the first call of a capped stream, prefill in extension
        # blocks: the stream's prefill programs then do not depend on its prompt lengths
        # (no compile when a longer first prompt comes), and a prompt just past a power of
        # two is not padded to the next one.
        in_blocks = reuse or reserve > 0
        whole = [[] if p is None else list(p) for p in prompts]
        if reuse:
            batch = previous.cache.batch_size // processes  # this process's rows
            suffixes = [[] if p is None else list(p[k:]) for p, k in zip(prompts, keep)]
            width = width_of(suffixes, in_blocks)
            # Rows that sit out keep everything they hold; rows past this call's prompts
            # (an earlier call's padding or extra rows) are dropped.
            kept = [k if p is not None else len(c or ())
                    for p, c, k in zip(prompts, previous.cached_tokens, keep)]
            kept += [0] * (batch - n)
            self.rolled_back_rows += sum(
                p is not None and k < len(c)
                for p, c, k in zip(prompts, previous.cached_tokens, keep))
            start = agree_max(max(kept, default=0))
            capacity = capacity_bucket(max(start + width + max_new_bucket, reserve),
                                       self.capacity_buckets_per_octave)
            cache = continuation.compact(self, previous, batch, kept, start, capacity)
        else:
            batch = next_power_of_two(agree_max(n))
            suffixes = whole
            width = width_of(suffixes, in_blocks)
            cache, start, kept = None, 0, [0] * batch
        tokens = np.zeros((batch, width), np.int32)
        mask = np.zeros((batch, width), bool)
        for i, s in enumerate(suffixes):
            if s:
                tokens[i, width - len(s):] = s
                mask[i, width - len(s):] = True
        # Rows with nothing to attend to (unused rows, padding rows) hold one dummy token.
        unused = [i for i in range(batch) if kept[i] == 0 and (i >= n or not active[i])]
        mask[unused, -1] = True
        if not reuse:
            capacity = capacity_bucket(max(width + max_new_bucket, reserve),
                                       self.capacity_buckets_per_octave)
            cache = self._new_cache(batch * processes, capacity)

        logits, cache = continuation.prefill_blocks(
            self, weights, cache, tokens, mask, self.extension_block if in_blocks else width)
        alive = np.zeros((batch,), bool)
        alive[:n] = active
        # One stream per global row; every process computes the same [B_global] keys.
        keys = row_keys(jax.random.key(seed), batch * processes)
        stops = np.full((self.max_stop_tokens,), NO_TOKEN, np.int32)
        stops[:len(stop_token_ids)] = list(stop_token_ids)
        # NumPy scalars: jit transfers them with its arguments (a jnp scalar is an eager
        # dispatch each).
        toks, lps, raws, stopped, cache = self._decode(
            weights, cache, logits, self._place(alive), keys, np.int32(max_new_tokens),
            stops, np.float32(temperature), np.int32(top_k),
            np.float32(top_p), self.decode_layer_weights(model),
            self.decode_head(model), max_new_bucket=max_new_bucket)

        toks, lps, raws, stopped = (self._host(x) for x in (toks, lps, raws, stopped))
        out_tokens, out_lps, out_raws = [], [], []
        for i in range(n):
            length = int(np.sum(toks[i] != NO_TOKEN))
            out_tokens.append(toks[i, :length].tolist())
            out_lps.append(lps[i, :length].tolist())
            out_raws.append(raws[i, :length].tolist())
        state = None
        if keep_state:
            # Fed into the cache: the prompt and every generated token but the last, the
            # suffix right-aligned in this call's prefill block, generated tokens after it.
            # An unused row keeps what it held when this call continued a previous one.
            cached, slots = [], []
            for i, (p, t) in enumerate(zip(prompts, out_tokens)):
                # Compaction put row i's kept tokens right before slot `start`.
                head = list(range(start - kept[i], start))
                if p is None:
                    cached.append(previous.cached_tokens[i] if reuse else None)
                    slots.append(head if reuse and previous.cached_tokens[i] is not None
                                 else None)
                    continue
                end = start + width
                cached.append(list(p) + t[:-1])
                slots.append(head + list(range(end - len(suffixes[i]), end))
                             + list(range(end, end + len(t) - 1)))
            cached += [None] * (batch - n)
            slots += [None] * (batch - n)
            state = SamplerState(cache=cache, cached_tokens=cached, cached_slots=slots)
        computed = sum(len(x) for x, a in zip(suffixes, active) if a)
        reused = sum(k for k, a in zip(keep, active) if a) if reuse else 0
        return SampleOutput(tokens=out_tokens, logprobs=out_lps, raw_logprobs=out_raws,
                            stopped=[bool(s) for s in stopped[:n]], state=state,
                            prefill_tokens=computed, reused_tokens=reused)

    def fork_prefill(self, model: nnx.Module, prefixes: Sequence[Sequence[int]],
                     sources: Sequence[int | None], capacity: int = 0) -> SamplerState:
        """Prefills each prefix once and copies its cache row into every row that names it
        (`continuation.fork_prefill`)."""
        return continuation.fork_prefill(self, model, prefixes, sources, capacity)

    def fork_groups(self, model: nnx.Module, prompts: Sequence[Sequence[int]],
                    groups: Sequence[Any], max_prompt_tokens: int = 0,
                    max_new_tokens: int = 1) -> tuple[SamplerState | None, int]:
        """A state in which rows with equal `groups` keys share one prefill of their common
        prefix, and the tokens it computed (`continuation.fork_groups`); with
        `max_prompt_tokens`, sized for that stream as `generate` sizes it."""
        return continuation.fork_groups(self, model, prompts, groups, max_prompt_tokens,
                                        max_new_tokens)

    @property
    def num_compilations(self) -> int:
        return sum(self.compilations.values())


_SAMPLERS: dict = {}


def generate(model: nnx.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             stop_token_ids: Sequence[int] = (), seed: int = 0) -> SampleOutput:
    """One-call generation (DESIGN.md contract); reuses a cached Sampler per architecture."""
    key = (nnx.graphdef(model), None)
    sampler = _SAMPLERS.get(key)
    if sampler is None:
        sampler = _SAMPLERS[key] = Sampler(model)
    return sampler.generate(model, prompts, max_new_tokens, temperature=temperature,
                            top_p=top_p, top_k=top_k, stop_token_ids=stop_token_ids,
                            seed=seed)
