"""The sampler against transformers and against the model's own distribution (issue 3).

Models are tiny random transformers checkpoints whose weights are scaled up (x8) so that
the next-token distribution depends on the context and is neither flat nor one-hot: with
the stock 0.02 init a tiny model mostly repeats its input, which would let cache and
padding bugs pass unnoticed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlver_jax.models import load_hf
from rlver_jax.sampling import Sampler, filter_logits
from tests.hf_fixtures import make_hf_qwen2

CONFIGS = {
    # GQA ratio 2, untied
    "gqa2-untied": dict(num_heads=4, num_kv_heads=2, tie_word_embeddings=False),
    # MHA, tied, odd sizes
    "mha-tied-odd": dict(vocab_size=101, hidden_size=36, intermediate_size=70, num_heads=3,
                         num_kv_heads=3, tie_word_embeddings=True, num_layers=3),
    # A small vocabulary for frequency tests
    "vocab13": dict(vocab_size=13, hidden_size=32, intermediate_size=48, num_heads=4,
                    num_kv_heads=2, tie_word_embeddings=False),
}
WEIGHT_SCALE = 8.0


def _save_scaled(torch, out_dir, **sizes):
    ref = make_hf_qwen2(out_dir, **sizes)
    with torch.no_grad():
        for p in ref.parameters():
            if p.ndim == 2:
                p.mul_(WEIGHT_SCALE)
    ref.save_pretrained(out_dir)
    return ref


@pytest.fixture(scope="module")
def models(tmp_path_factory, torch):
    """name -> (hf dir, torch reference, config, float32 model, Sampler)."""
    out = {}
    for name, sizes in CONFIGS.items():
        path = tmp_path_factory.mktemp(name)
        ref = _save_scaled(torch, path, **sizes)
        config, model = load_hf(path)
        out[name] = (path, ref, config, model, Sampler(model))
    return out


@functools.cache
def _jitted_forward():
    @nnx.jit
    def forward(model, ids, mask):
        return model(ids, mask)
    return forward


def full_logits(model, seqs: list[list[int]]) -> list[np.ndarray]:
    """Float64 logits [len(seq), V] of each sequence, from one left-padded forward pass.

    The block is padded to 32 x 32 (or more) so that the tests share one compiled program.
    """
    width = max(32, max(len(s) for s in seqs))
    ids = np.zeros((max(32, len(seqs)), width), np.int32)
    mask = np.zeros(ids.shape, bool)
    mask[len(seqs):, -1] = True
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = s
        mask[i, width - len(s):] = True
    logits = np.asarray(_jitted_forward()(model, jnp.asarray(ids), jnp.asarray(mask)),
                        np.float64)
    return [logits[i, width - len(s):] for i, s in enumerate(seqs)]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - np.max(x, axis=-1, keepdims=True)
    return x - np.log(np.sum(np.exp(x), axis=-1, keepdims=True))


def reference_filter(logits: np.ndarray, temperature: float, top_k: int,
                     top_p: float) -> np.ndarray:
    """transformers' warper order in NumPy: temperature, top-k, top-p (on the renormalised
    top-k distribution, removing the low tail whose mass is <= 1 - top_p, keeping at
    least one token). Returns log-probs [B, V] with -inf on removed tokens."""
    scores = np.asarray(logits, np.float64) / temperature
    if top_k > 0:
        kth = np.sort(scores, axis=-1)[:, -min(top_k, scores.shape[-1])][:, None]
        scores = np.where(scores < kth, -np.inf, scores)
    if top_p < 1.0:
        order = np.argsort(scores, axis=-1, kind="stable")  # ascending, as HF
        sorted_scores = np.take_along_axis(scores, order, axis=-1)
        cum = np.cumsum(np.exp(log_softmax(sorted_scores)), axis=-1)
        remove_sorted = cum <= 1.0 - top_p
        remove_sorted[:, -1] = False
        remove = np.zeros_like(remove_sorted)
        np.put_along_axis(remove, order, remove_sorted, axis=-1)
        scores = np.where(remove, -np.inf, scores)
    return log_softmax(scores)


def random_prompts(rng, vocab: int, lengths) -> list[list[int]]:
    return [rng.integers(3, vocab, size=n).tolist() for n in lengths]


# ----------------------------------------------------------------------- greedy parity
def _hf_greedy(torch, ref, prompt, max_new, stops):
    with torch.no_grad():
        ids = torch.tensor([prompt], dtype=torch.long)
        out = ref.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                           max_new_tokens=max_new, eos_token_id=list(stops),
                           pad_token_id=stops[0], top_k=None, top_p=None, temperature=None)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("name", ["gqa2-untied", "mha-tied-odd"])
def test_greedy_matches_transformers_with_stop_tokens(models, torch, name):
    _, ref, config, model, sampler = models[name]
    rng = np.random.default_rng(10)
    prompts = random_prompts(rng, config.vocab_size, [7, 3, 12, 5, 9])
    max_new = 10
    free = sampler.generate(model, prompts, max_new).tokens
    assert all(len(t) == max_new for t in free)
    # A stop id that row 0 emits early but some other row never emits: rows stop
    # independently. A second, unused stop id checks that the stop list is a set.
    stop = next(t for t in free[0][1:6] if any(t not in other for other in free[1:]))
    unused = next(t for t in range(config.vocab_size) if all(t not in f for f in free))
    stops = (stop, unused)
    out = sampler.generate(model, prompts, max_new, stop_token_ids=stops)
    for i, prompt in enumerate(prompts):
        assert out.tokens[i] == _hf_greedy(torch, ref, prompt, max_new, stops), i
        assert out.stopped[i] == (out.tokens[i][-1] in stops)
        assert len(out.logprobs[i]) == len(out.raw_logprobs[i]) == len(out.tokens[i])
        assert out.logprobs[i] == [0.0] * len(out.tokens[i])  # greedy: no sampling distribution
    assert out.stopped[0] and len(out.tokens[0]) < max_new
    assert not all(out.stopped)


# ------------------------------------------------------------------ sampling statistics
def test_filter_logits_matches_transformers_order():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, 50)).astype(np.float32) * 3
    # Ties at a top-k boundary are kept by both (transformers compares to the k-th value).
    logits[0, :4] = logits[0, 4]
    for temperature, top_k, top_p in [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8),
                                      (0.5, 10, 0.6), (1.0, 1, 1.0), (2.0, 0, 0.05),
                                      (1.0, 100, 0.995)]:
        ours = np.asarray(filter_logits(jnp.asarray(logits), jnp.float32(temperature),
                                        jnp.int32(top_k), jnp.float32(top_p)))
        want = reference_filter(logits, temperature, top_k, top_p)
        np.testing.assert_array_equal(np.isinf(ours), np.isinf(want))
        finite = np.isfinite(want)
        np.testing.assert_allclose(ours[finite], want[finite], atol=2e-5, rtol=0)


def _sorted_filter(logits, temperature, top_k, top_p):
    """The filter as a sort computes it (the implementation filter_logits replaced)."""
    vocab = logits.shape[-1]
    scaled = logits / temperature
    sorted_desc = -jnp.sort(-scaled, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    rank = jnp.arange(vocab)
    in_top_k = rank[None, :] < k
    probs = jax.nn.softmax(jnp.where(in_top_k, sorted_desc, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = in_top_k & ((mass_before < top_p) | (top_p >= 1.0) | (rank[None, :] == 0))
    threshold = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    return jax.nn.log_softmax(jnp.where(scaled >= threshold, scaled, -jnp.inf), axis=-1)


def _kept_by_exact_mass(logits, temperature, top_k, top_p):
    """float64: per token, the top-k-renormalised mass strictly above it, and whether it is
    in the top k (ties at the k-th value kept)."""
    scaled = logits.astype(np.float64) / temperature
    vocab = scaled.shape[-1]
    k = min(top_k, vocab) if top_k > 0 else vocab
    kth = -np.sort(-scaled, axis=-1)[:, k - 1:k]
    in_top_k = scaled >= kth
    e = np.where(in_top_k, np.exp(scaled - scaled.max(-1, keepdims=True)), 0.0)
    probs = e / e.sum(-1, keepdims=True)
    order = np.argsort(-scaled, axis=-1, kind="stable")
    sorted_probs = np.take_along_axis(probs, order, -1)
    above = np.empty_like(probs)
    np.put_along_axis(above, order, np.cumsum(sorted_probs, -1) - sorted_probs, -1)
    return above, in_top_k


def test_filter_logits_bisection_keeps_what_a_sort_keeps():
    """The sort-free filter keeps the tokens a descending sort keeps: bit for bit against
    the sort at vocabularies up to 2,048 (the tiny preset's), and at Qwen's 151,936 every
    token whose mass above it is clear of top_p by 1e-5 (exact float64 masses; within
    that band float32 sums decide either way, a sort's sequential cumsum the least
    accurately). Logits of both signs and scales, -inf entries (masked tokens), one
    dominant token, top-k and top-p together."""
    rng = np.random.default_rng(3)
    for vocab, scale in [(2048, 3.0), (50, 20.0), (300, 0.01), (151936, 1.0)]:
        logits = (rng.normal(size=(4, vocab)) * scale).astype(np.float32)
        logits[1, rng.choice(vocab, vocab // 3, replace=False)] = -np.inf
        logits[2, 7] = 1e4
        for temperature, top_k, top_p in [(0.7, 0, 0.95), (1.0, 0, 1.0), (1.3, 40, 0.9),
                                          (0.5, 1, 1.0), (2.0, 0, 1e-6), (1.0, 0, 0.99)]:
            args = (jnp.asarray(logits), jnp.float32(temperature), jnp.int32(top_k),
                    jnp.float32(top_p))
            ours = np.asarray(filter_logits(*args))
            where = f"V={vocab} T={temperature} k={top_k} p={top_p}"
            if vocab <= 2048:
                np.testing.assert_array_equal(ours, np.asarray(_sorted_filter(*args)),
                                              err_msg=where)
            above, in_top_k = _kept_by_exact_mass(logits, temperature, top_k, top_p)
            finite = np.isfinite(logits)
            surely_kept = finite & in_top_k & ((above < top_p - 1e-5) | (top_p >= 1.0))
            surely_dropped = ~finite | ~in_top_k | (above > top_p + 1e-5)
            surely_kept[np.arange(4), np.argmax(logits, -1)] = True  # the top token always
            assert np.isfinite(ours[surely_kept]).all(), where
            assert np.isinf(ours[surely_dropped & ~surely_kept]).all(), where
            kept = np.isfinite(ours)
            scaled = np.where(kept, logits / temperature, -np.inf).astype(np.float64)
            want = scaled - np.log(np.exp(scaled - scaled.max(-1, keepdims=True)).sum(
                -1, keepdims=True)) - scaled.max(-1, keepdims=True)
            np.testing.assert_allclose(ours[kept], want[kept], atol=1e-4, err_msg=where)


def _chi_square_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson chi-square goodness of fit; bins with expected count < 5 are pooled."""
    from scipy import stats

    expected = probs * counts.sum()
    small = expected < 5
    if small.any():
        counts = np.append(counts[~small], counts[small].sum())
        expected = np.append(expected[~small], expected[small].sum())
    keep = expected > 0
    return float(stats.chisquare(counts[keep], expected[keep]).pvalue)


def test_sampled_frequencies_match_softmax(models):
    pytest.importorskip("scipy")
    _, _, config, model, sampler = models["vocab13"]
    prompt = [3, 7, 1, 9, 4]
    rows = 256
    logits = full_logits(model, [prompt])[0][-1:]
    compiles = None
    for temperature, top_k, top_p in [(1.0, 0, 1.0), (0.8, 6, 0.9), (1.5, 0, 0.7)]:
        counts = np.zeros(config.vocab_size)
        for seed in range(4):
            out = sampler.generate(model, [prompt] * rows, 1, temperature=temperature,
                                   top_k=top_k, top_p=top_p, seed=seed)
            np.add.at(counts, [t[0] for t in out.tokens], 1)
        probs = np.exp(reference_filter(logits, temperature, top_k, top_p))[0]
        assert counts[probs == 0].sum() == 0
        assert _chi_square_pvalue(counts, probs) > 1e-3, (temperature, top_k, top_p, counts)
        # Sampling parameters are traced: the first setting compiles, the others do not.
        if compiles is None:
            compiles = sampler.num_compilations
        assert sampler.num_compilations == compiles


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 5, 1.0), (0.7, 0, 0.6),
                                                     (1.2, 8, 0.8), (0.6, 0, 1.0)])
def test_truncation_and_logprobs_against_a_forward_pass(models, temperature, top_k, top_p):
    """Every emitted token is inside the allowed set computed in NumPy from the logits of
    a forward pass over prompt + output; `raw_logprobs` are that pass's log-softmax at the
    sampling temperature (untruncated) and `logprobs` the filtered distribution's."""
    _, _, config, model, sampler = models["gqa2-untied"]
    rng = np.random.default_rng(1)
    prompts = random_prompts(rng, config.vocab_size, rng.integers(1, 14, size=8))
    out = sampler.generate(model, prompts, 10, temperature=temperature, top_k=top_k,
                           top_p=top_p, seed=3)
    seqs = [p + t for p, t in zip(prompts, out.tokens)]
    for prompt, toks, lps, raws, logits in zip(prompts, out.tokens, out.logprobs,
                                               out.raw_logprobs, full_logits(model, seqs)):
        step_logits = logits[len(prompt) - 1:len(prompt) - 1 + len(toks)]
        allowed = reference_filter(step_logits, temperature, top_k, top_p)
        at = np.arange(len(toks))
        assert np.all(np.isfinite(allowed[at, toks])), (toks, allowed)
        np.testing.assert_allclose(raws, log_softmax(step_logits / temperature)[at, toks],
                                   atol=1e-5)
        np.testing.assert_allclose(lps, allowed[at, toks], atol=1e-4)


# ------------------------------------------------------- seeds, streams and compilations
def test_seeds_streams_and_no_recompilation(models):
    _, _, config, model, sampler = models["gqa2-untied"]
    rng = np.random.default_rng(2)
    prompts = random_prompts(rng, config.vocab_size, [4, 9, 2, 11, 6])
    kwargs = dict(temperature=1.0, max_new_tokens=12)
    a = sampler.generate(model, prompts, seed=5, **kwargs)
    before = sampler.num_compilations
    assert sampler.generate(model, prompts, seed=5, **kwargs).tokens == a.tokens
    assert sampler.generate(model, prompts, seed=6, **kwargs).tokens != a.tokens
    same = sampler.generate(model, [prompts[0]] * 5, seed=5, **kwargs).tokens
    assert len({tuple(t) for t in same}) == 5, "rows with the same prompt share a stream"
    for temperature, top_k, top_p in [(0.3, 0, 1.0), (1.0, 7, 1.0), (0.9, 0, 0.5),
                                      (0.0, 3, 0.2)]:
        sampler.generate(model, prompts, 12, temperature=temperature, top_k=top_k,
                         top_p=top_p, stop_token_ids=[5, 6])
    # Another batch in the same buckets: 7 rows (batch bucket 8), prompts <= 16, 9..16 new.
    sampler.generate(model, random_prompts(rng, config.vocab_size, [16, 1, 3, 8, 2, 5, 7]),
                     9, temperature=0.5, seed=1)
    assert sampler.num_compilations == before


@pytest.mark.parametrize("name", ["gqa2-untied", "mha-tied-odd"])
def test_unrolled_decode_equals_the_layer_scan(models, name):
    """Decode over the per-layer output-major copies (the CPU default), with or without its
    [V, D] head, samples what the scan over the stacked weights samples: the same tokens,
    log-probs to float32 rounding (the fused products sum in another order). The copies
    are made once per set of weights; a tied head is the table itself, not a copy."""
    _, _, config, model, sampler = models[name]
    assert sampler.unrolled_decode  # "auto" on CPU
    scan = Sampler(model, decode_layers="scan")
    layers_only = Sampler(model)
    layers_only.decode_head = lambda model: None
    rng = np.random.default_rng(7)
    prompts = random_prompts(rng, config.vocab_size, [5, 12, 3])
    for kwargs in (dict(), dict(temperature=0.8, top_k=20, seed=3)):
        want = scan.generate(model, prompts, 10, **kwargs)
        for unrolled in (layers_only, sampler):
            got = unrolled.generate(model, prompts, 10, **kwargs)
            assert got.tokens == want.tokens
            for a, b in ((got.raw_logprobs, want.raw_logprobs), (got.logprobs, want.logprobs)):
                np.testing.assert_allclose(np.concatenate(a), np.concatenate(b),
                                           atol=1e-5, rtol=0)
    head = sampler.decode_head(model)
    np.testing.assert_array_equal(head, model.head_weight().T)
    assert sampler.decode_head(model) is head and scan.decode_head(model) is None
    assert (head is model.embed.get_value()) == config.tie_word_embeddings
    first = sampler.decode_layer_weights(model)
    assert len(first) == config.num_layers and sampler.decode_layer_weights(model) is first
    assert scan.decode_layer_weights(model) is None
    graphdef, state = nnx.split(model)
    other = nnx.merge(graphdef, jax.tree.map(lambda x: jnp.array(x, copy=True), state))
    assert sampler.decode_layer_weights(other) is not first
    assert sampler.decode_head(other) is not head
    with pytest.raises(ValueError, match="decode_layers='loop'"):
        Sampler(model, decode_layers="loop")


# ------------------------------------------------------------------------ prefix reuse
def test_prefix_reuse_equals_fresh_call_and_grows_the_cache(models):
    path, _, config, model, sampler = models["gqa2-untied"]
    rng = np.random.default_rng(3)
    prompts = random_prompts(rng, config.vocab_size, [5, 9, 3, 7, 2])
    probe = sampler.generate(model, prompts, 10).tokens
    # Row 1 stops early and row 0 does not, so rows hold different numbers of tokens.
    stops = [next(t for t in probe[1][1:6] if t not in probe[0])]
    first = sampler.generate(model, prompts, 10, stop_token_ids=stops, keep_state=True)
    assert first.stopped[1] and not first.stopped[0]
    assert len(first.tokens[1]) < len(first.tokens[0])
    capacity = first.state.cache.capacity
    # Each row appends its own output and an extension of its own length.
    extended = [p + t + random_prompts(rng, config.vocab_size, [n])[0]
                for p, t, n in zip(prompts, first.tokens, [2, 13, 4, 1, 9])]
    cont = sampler.generate(model, extended, 10, stop_token_ids=stops, keep_state=True,
                            previous=first.state)
    fresh = sampler.generate(model, extended, 10, stop_token_ids=stops, keep_state=True)
    assert cont.tokens == fresh.tokens
    np.testing.assert_allclose(np.concatenate(cont.raw_logprobs),
                               np.concatenate(fresh.raw_logprobs), atol=1e-5)
    # The continuation compacted the old cache (dropping the slots row 1 left after it
    # stopped) into a larger one that holds exactly the cached tokens.
    assert cont.state.cache.capacity > capacity
    assert any(key[0] == "compact" for key in sampler.compilations)
    assert_only_cached_slots_valid(cont.state)

    # A third turn with a 4th prompt: the batch's padding row must not be reused (it
    # holds a dummy token), so this falls back to a fresh prefill and still matches.
    third = [p + t + [7, 8] for p, t in zip(extended, cont.tokens)] + [[9, 10, 11]]
    again = sampler.generate(model, third, 10, previous=cont.state)
    assert again.tokens == sampler.generate(model, third, 10).tokens


def test_rollback_continuation_equals_fresh_call(models):
    """Prompts that depart from their row's cached tokens part-way (think mode drops the
    old thought): each row rolls back to the common prefix, leaving holes in the cache,
    and samples what a fresh prefill of the same prompts samples."""
    path, _, config, model, sampler = models["gqa2-untied"]
    rng = np.random.default_rng(5)
    prompts = random_prompts(rng, config.vocab_size, [12, 17, 9, 14])
    first = sampler.generate(model, prompts, 8, keep_state=True)
    new = lambda n: random_prompts(rng, config.vocab_size, [n])[0]
    departed = [
        prompts[0] + first.tokens[0][:2] + new(5),  # keeps 2 generated tokens, drops the rest
        prompts[1][:-3] + new(6),                   # departs inside the old prompt
        prompts[2] + first.tokens[2] + new(3),      # a plain extension: keeps everything
        list(prompts[3]),                           # the same prompt again: re-feeds its last
    ]
    cont = sampler.generate(model, departed, 8, keep_state=True, previous=first.state)
    fresh = sampler.generate(model, departed, 8, keep_state=True)
    assert cont.prefill_tokens < fresh.prefill_tokens  # continued
    assert_only_cached_slots_valid(cont.state)  # what was rolled back is gone
    assert cont.tokens == fresh.tokens
    np.testing.assert_allclose(np.concatenate(cont.raw_logprobs),
                               np.concatenate(fresh.raw_logprobs), atol=1e-5)
    # A second roll-back on top of the holes of the first one (the state is consumed).
    again = [p[:len(p) - 2] + new(4) for p in departed]
    a = sampler.generate(model, again, 8, previous=cont.state, keep_state=True)
    b = sampler.generate(model, again, 8)
    assert a.tokens == b.tokens and a.reused_tokens > 0
    assert_only_cached_slots_valid(a.state)

    # Less than half of a new prompt in common: a fresh prefill, not a continuation.
    unrelated = [p[:2] + new(20) for p in prompts]
    c = sampler.generate(model, unrelated, 8, previous=a.state, keep_state=True)
    assert int(c.state.cache.index) == int(
        sampler.generate(model, unrelated, 8, keep_state=True).state.cache.index)


def test_group_fork_equals_per_row_prefill(models):
    """GRPO groups: one prefill of each group's common prefix, copied into the group's
    rows (`fork_groups`), then a continuation, samples what a per-row prefill samples; the
    prefill counts say what was computed and what was served from the cache."""
    path, _, config, model, sampler = models["gqa2-untied"]
    rng = np.random.default_rng(7)
    heads = random_prompts(rng, config.vocab_size, [15, 11])
    tails = random_prompts(rng, config.vocab_size, [3, 5, 1, 4, 2])
    groups = [0, 0, 0, 1, 1]
    prompts = [heads[g] + t for g, t in zip(groups, tails)]
    state, forked = sampler.fork_groups(model, prompts, groups)
    assert forked == 15 + 11  # each head once (the common prefix, short of the last token)
    assert state.cached_tokens[:5] == [heads[g] for g in groups]
    cont = sampler.generate(model, prompts, 6, previous=state, keep_state=True)
    fresh = sampler.generate(model, prompts, 6, keep_state=True)
    assert cont.tokens == fresh.tokens
    np.testing.assert_allclose(np.concatenate(cont.raw_logprobs),
                               np.concatenate(fresh.raw_logprobs), atol=1e-5)
    assert (cont.prefill_tokens, cont.reused_tokens) == (sum(map(len, tails)), 3 * 15 + 2 * 11)
    assert (fresh.prefill_tokens, fresh.reused_tokens) == (sum(map(len, prompts)), 0)
    # The forked state continues like any other: the next turn extends every row.
    nxt = [p + t + [5, 6] for p, t in zip(prompts, cont.tokens)]
    a = sampler.generate(model, nxt, 4, previous=cont.state)
    assert a.tokens == sampler.generate(model, nxt, 4).tokens and a.prefill_tokens < 5 * 4
    # Nothing to share: no state.
    assert sampler.fork_groups(model, prompts, [0, 1, 2, 3, 4]) == (None, 0)
    with pytest.raises(ValueError, match="source 2 outside 0..1"):
        sampler.fork_prefill(model, heads, [0, 2])


# --------------------------------------------------------------------- sharding, dtypes
def test_sharded_greedy_equals_single_device(models):
    from rlver_jax.sharding import make_mesh

    path, _, config, model, sampler = models["gqa2-untied"]
    mesh = make_mesh((2, 1, 4))
    _, sharded = load_hf(path, mesh=mesh)
    assert len(sharded.layers.up_kernel[...].sharding.device_set) == 8
    rng = np.random.default_rng(4)
    prompts = random_prompts(rng, config.vocab_size, [3, 10, 6, 1, 8, 4, 12, 2])
    want = sampler.generate(model, prompts, 10, stop_token_ids=[11])
    got = Sampler(sharded, mesh=mesh).generate(sharded, prompts, 10, stop_token_ids=[11])
    assert got.tokens == want.tokens
    np.testing.assert_allclose(np.concatenate(got.raw_logprobs),
                               np.concatenate(want.raw_logprobs), atol=1e-5)


def test_bfloat16_generation_runs_and_mostly_agrees(models):
    """bfloat16 weights keep ~3 significant digits, so logits move by ~1e-2 of their scale:
    the first greedy token can only flip where float32's top-2 gap is that small. We require
    agreement on every row with a clear gap and on >= 75% of all rows."""
    path, _, config, model, _ = models["gqa2-untied"]
    _, model16 = load_hf(path, dtype="bfloat16")
    rng = np.random.default_rng(5)
    prompts = random_prompts(rng, config.vocab_size, rng.integers(1, 16, size=32))
    out16 = Sampler(model16).generate(model16, prompts, 4)
    assert all(len(t) == 4 for t in out16.tokens)
    assert np.all(np.isfinite(np.concatenate(out16.raw_logprobs)))
    first16 = np.array([t[0] for t in out16.tokens])
    # float32 greedy first tokens (the sampler's greedy equals argmax: tested above).
    last = np.stack([l[-1] for l in full_logits(model, prompts)])
    first32 = np.argmax(last, axis=-1)
    top2 = np.sort(last, axis=-1)[:, -2:]
    gap = (top2[:, 1] - top2[:, 0]) / np.max(np.abs(last), axis=-1)
    assert np.all(first16[gap > 0.05] == first32[gap > 0.05])
    assert np.mean(first16 == first32) >= 0.75


def assert_only_cached_slots_valid(state):
    """Every used row's valid slots are exactly the slots of its cached tokens: no hole
    (padding, rolled-back or never-fed slot) is left marked valid."""
    valid = np.asarray(state.cache.valid)
    for row, (tokens, slots) in enumerate(zip(state.cached_tokens, state.cached_slots)):
        if tokens is not None:
            assert len(slots) == len(tokens)
            np.testing.assert_array_equal(np.flatnonzero(valid[row]), sorted(slots))


def test_continuations_reclaim_the_dead_slots(models):
    """Each turn keeps one generated token and drops the other 15: the dead slots must not
    pile up. Compaction puts the kept tokens back to back, so the write index grows by
    what the prompts grow by (4 tokens a turn), not by the 16-slot prompt block and the
    15 decode slots each call takes, and the capacity stays near a fresh prefill's."""
    path, _, config, model, sampler = models["gqa2-untied"]
    rng = np.random.default_rng(11)
    prompts = random_prompts(rng, config.vocab_size, [10, 6])
    out = sampler.generate(model, prompts, 16, keep_state=True)
    indices = []
    for _ in range(6):
        prompts = [p + t[:1] + random_prompts(rng, config.vocab_size, [3])[0]
                   for p, t in zip(prompts, out.tokens)]
        fresh = sampler.generate(model, prompts, 16, keep_state=True)
        out = sampler.generate(model, prompts, 16, keep_state=True, previous=out.state)
        assert out.tokens == fresh.tokens and out.prefill_tokens == 2 * 3
        assert out.state.cache.capacity <= 2 * fresh.state.cache.capacity
        assert_only_cached_slots_valid(out.state)
        indices.append(int(out.state.cache.index))
    np.testing.assert_array_equal(np.diff(indices), 4)


def test_capacity_bucket():
    from rlver_jax.sampling.sampler import capacity_bucket

    assert [capacity_bucket(n) for n in (1, 5, 8, 9, 2049, 2560, 2561, 4096)] == [
        1, 5, 8, 10, 2560, 2560, 3072, 4096]
    assert capacity_bucket(2049, per_octave=1) == 4096


def test_long_extensions_are_prefilled_in_blocks(models):
    """An extension longer than `extension_block` is fed in whole blocks of that width
    (the cache needs room for the suffix plus under one block, not its power of two), and
    samples what a fresh prefill samples."""
    path, _, config, model, _ = models["gqa2-untied"]
    sampler = Sampler(model, extension_block=16)
    rng = np.random.default_rng(13)
    prompts = random_prompts(rng, config.vocab_size, [9, 4])
    first = sampler.generate(model, prompts, 4, keep_state=True)
    longer = [p + t + random_prompts(rng, config.vocab_size, [n])[0]
              for p, t, n in zip(prompts, first.tokens, [35, 20])]
    cont = sampler.generate(model, longer, 4, previous=first.state, keep_state=True)
    widths = {key[1][1] for key in sampler.compilations if key[0] == "prefill"}
    assert widths == {16}  # the first prompts' block and three extension blocks
    assert cont.tokens == sampler.generate(model, longer, 4).tokens
    assert cont.prefill_tokens == 35 + 20 + 2  # and each row's last sampled token
    assert_only_cached_slots_valid(cont.state)
    with pytest.raises(ValueError, match="extension_block=24 must be a power of two"):
        Sampler(model, extension_block=24)


def test_a_stream_sized_for_its_prompt_cap_keeps_one_capacity(models):
    """With `max_prompt_tokens`, a dialogue's growing calls share one cache capacity (the
    cap's `stream_capacity`) from the first call on: after the first continuation (its
    compaction and extension programs) no turn compiles anything, and each samples what
    a fresh call samples."""
    from rlver_jax.sampling.continuation import capacity_bucket, stream_capacity

    _, _, config, model, fresh = models["gqa2-untied"]
    sampler = Sampler(model, extension_block=16)
    cap, new = 96, 4
    rng = np.random.default_rng(21)
    prompts = random_prompts(rng, config.vocab_size, [5, 3])
    state, compiles, capacities = None, [], []
    for turn in range(5):
        out = sampler.generate(model, prompts, new, previous=state, keep_state=True,
                               max_prompt_tokens=cap)
        assert (out.reused_tokens > 0) == (turn > 0)
        assert out.tokens == fresh.generate(model, prompts, new).tokens
        state = out.state
        capacities.append(state.cache.capacity)
        compiles.append(sampler.num_compilations)
        prompts = [p + t + random_prompts(rng, config.vocab_size, [n])[0]
                   for p, t, n in zip(prompts, out.tokens, [6, 9])]
    assert set(capacities) == {capacity_bucket(stream_capacity(cap, new, 16))}
    assert compiles[2:] == [compiles[1]] * 3
    assert len(prompts[1]) < cap


def test_a_capped_streams_first_call_is_prefilled_in_blocks(models):
    """With `max_prompt_tokens`, a fresh call also feeds its prompts in extension blocks:
    one prefill program serves first prompts of any length up to the cap (no compile for
    a longer one, no power-of-two padding past a block), and it samples what one
    full-width prefill samples."""
    _, _, config, model, fresh = models["gqa2-untied"]
    sampler = Sampler(model, extension_block=16)
    rng = np.random.default_rng(23)
    compiles = []
    for lengths in ([40, 17], [50, 33], [7, 12]):
        prompts = random_prompts(rng, config.vocab_size, lengths)
        out = sampler.generate(model, prompts, 4, keep_state=True, max_prompt_tokens=64)
        assert out.tokens == fresh.generate(model, prompts, 4).tokens
        assert out.prefill_tokens == sum(lengths)
        assert_only_cached_slots_valid(out.state)
        compiles.append(sampler.num_compilations)
    widths = {key[1][1] for key in sampler.compilations if key[0] == "prefill"}
    assert widths == {16}
    assert compiles[1:] == [compiles[0]] * 2


def test_a_capped_streams_group_fork_is_sized_for_the_stream(models):
    """`fork_groups(..., max_prompt_tokens=)` prefills the groups' heads in extension blocks
    straight into a cache of the stream's capacity: the continuation keeps that capacity
    (no resizing compaction), heads of other lengths reuse the same programs, and the
    tokens are those of a per-row prefill."""
    from rlver_jax.sampling.continuation import capacity_bucket, stream_capacity

    _, _, config, model, fresh = models["gqa2-untied"]
    sampler = Sampler(model, extension_block=16)
    cap, new = 80, 4
    capacity = capacity_bucket(stream_capacity(cap, new, 16))
    rng = np.random.default_rng(29)
    compiles = []
    for head_lengths in ([37, 20], [45, 9]):
        heads = random_prompts(rng, config.vocab_size, head_lengths)
        tails = random_prompts(rng, config.vocab_size, [3, 5, 2, 4])
        groups = [0, 0, 1, 1]
        prompts = [heads[g] + t for g, t in zip(groups, tails)]
        state, forked = sampler.fork_groups(model, prompts, groups, max_prompt_tokens=cap,
                                            max_new_tokens=new)
        assert forked == sum(head_lengths) and state.cache.capacity == capacity
        out = sampler.generate(model, prompts, new, previous=state, keep_state=True,
                               max_prompt_tokens=cap)
        assert out.state.cache.capacity == capacity
        assert out.tokens == fresh.generate(model, prompts, new).tokens
        assert_only_cached_slots_valid(out.state)
        compiles.append(sampler.num_compilations)
    assert compiles[1] == compiles[0]
    assert not [key for key in sampler.compilations if key[0] == "compact"
                and key[1][2] != capacity]
    widths = {key[1][1] for key in sampler.compilations if key[0] == "prefill"}
    assert widths == {16}
