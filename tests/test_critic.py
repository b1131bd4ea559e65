"""The critic (value model) of issue 2: built from the policy, read from / written to HF dirs,
and numerically unaffected by the remat policy."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlver_jax.models import (Qwen2Config, Qwen2Critic, create_model, critic_from_policy,
                              load_hf_critic, save_hf)

# Small enough to compile in a second or two, with GQA, untied and tied heads both covered
# across the tests below.
SIZES = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_layers=2, num_heads=4,
             num_kv_heads=2)


def _config(**changes) -> Qwen2Config:
    base = dict(SIZES, rope_theta=10_000.0, max_position_embeddings=512,
                tie_word_embeddings=False, bos_token_id=None, eos_token_id=None)
    base.update(changes)
    return Qwen2Config(**base)


def _ids_and_mask(vocab: int, seed: int = 0):
    """Two rows, the second left padded by 3: padding handling is part of the contract."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(2, 9))
    mask = np.ones((2, 9), np.int32)
    mask[1, :3] = 0
    return ids, mask


def _set_head(critic: Qwen2Critic, seed: int = 0) -> None:
    """A non-zero value head, so that values and backbone gradients are not trivially 0."""
    rng = np.random.default_rng(seed)
    critic.value_kernel[...] = jnp.asarray(
        rng.normal(size=critic.value_kernel.shape).astype(np.float32))
    critic.value_bias[...] = jnp.float32(0.3)


# ------------------------------------------------------------------ critic_from_policy
@pytest.mark.parametrize("tied", [False, True])
def test_critic_from_policy_copies_backbone_with_zero_head(tied):
    config = _config(tie_word_embeddings=tied)
    policy = create_model(config, seed=3)
    critic = critic_from_policy(policy)
    ids, mask = _ids_and_mask(config.vocab_size)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)

    ours, _ = critic.backbone.hidden_states(ids, mask)
    theirs, _ = policy.hidden_states(ids, mask)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    values = np.asarray(critic(ids, mask))
    assert values.shape == (2, 9) and values.dtype == np.float32
    np.testing.assert_array_equal(values, 0.0)
    # The critic carries no LM head even when the policy has an untied one.
    assert critic.backbone.lm_head is None

    # Copies, not aliases: the trainer donates the policy's buffers in its update step, which
    # would delete a critic weight that shared them.
    for path, var in nnx.to_flat_state(nnx.state(critic.backbone, nnx.Param)):
        src = policy
        for key in path:
            src = src[key] if isinstance(key, int) else getattr(src, key)
        a, b = var[...], src[...]
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert a.unsafe_buffer_pointer() != b.unsafe_buffer_pointer(), path


# --------------------------------------------------------------------- HF interop
def _make_hf_token_classifier(out_dir, torch):
    """A random `Qwen2ForTokenClassification` (num_labels=1) saved by transformers."""
    from transformers import Qwen2Config as HFConfig, Qwen2ForTokenClassification

    torch.manual_seed(0)
    hf = HFConfig(vocab_size=SIZES["vocab_size"], hidden_size=SIZES["hidden_size"],
                  intermediate_size=SIZES["intermediate_size"],
                  num_hidden_layers=SIZES["num_layers"],
                  num_attention_heads=SIZES["num_heads"],
                  num_key_value_heads=SIZES["num_kv_heads"], tie_word_embeddings=False,
                  max_position_embeddings=512, rope_theta=10_000.0, rms_norm_eps=1e-6,
                  num_labels=1, bos_token_id=1, eos_token_id=2)
    model = Qwen2ForTokenClassification(hf).eval()
    with torch.no_grad():
        # Non-trivial norms, biases and head so that a mix-up of any of them cannot pass.
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
        model.score.weight.mul_(10.0)
    model.save_pretrained(out_dir)
    return model


def _torch_values(torch, model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids, dtype=torch.long),
                    attention_mask=torch.tensor(mask, dtype=torch.long))
    return out.logits[..., 0].float().numpy()


def test_load_hf_critic_matches_transformers_token_classification(tmp_path, torch):
    ref = _make_hf_token_classifier(tmp_path, torch)
    assert ref.score.bias is not None
    config, critic = load_hf_critic(tmp_path)
    assert isinstance(critic, Qwen2Critic) and config.num_layers == SIZES["num_layers"]
    ids, mask = _ids_and_mask(config.vocab_size, seed=1)
    ours = np.asarray(critic(jnp.asarray(ids), jnp.asarray(mask)))
    theirs = _torch_values(torch, ref, ids, mask)
    assert ours.shape == theirs.shape == (2, 9)
    # Padding positions are not compared: what a model computes there is arbitrary.
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], theirs[real], atol=1e-5, rtol=0)
    assert np.abs(theirs[real]).max() > 1e-2  # the head is not ~0, so the check has teeth


def test_save_hf_critic_round_trips(tmp_path, torch):
    config = _config()
    critic = create_model(config, seed=5, cls=Qwen2Critic)
    _set_head(critic, seed=5)
    ids, mask = _ids_and_mask(config.vocab_size, seed=2)
    ids_j, mask_j = jnp.asarray(ids), jnp.asarray(mask)
    before = np.asarray(critic(ids_j, mask_j))

    save_hf(critic, config, tmp_path)
    loaded_config, loaded = load_hf_critic(tmp_path)
    assert loaded_config.num_layers == config.num_layers
    np.testing.assert_array_equal(np.asarray(loaded(ids_j, mask_j)), before)

    # The directory is a transformers token classifier too.
    from transformers import Qwen2ForTokenClassification
    ref = Qwen2ForTokenClassification.from_pretrained(tmp_path).eval()
    real = mask.astype(bool)
    np.testing.assert_allclose(_torch_values(torch, ref, ids, mask)[real], before[real],
                               atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- remat
def test_remat_policies_give_identical_values_and_gradients():
    ids, mask = _ids_and_mask(SIZES["vocab_size"], seed=3)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    weights = jnp.asarray(np.random.default_rng(4).normal(size=(2, 9)).astype(np.float32))

    def loss(model):
        return jnp.sum(model(ids, mask) * weights * mask)

    results = {}
    for remat in ("none", "full", "dots"):
        critic = create_model(_config(remat=remat), seed=7, cls=Qwen2Critic)
        _set_head(critic, seed=7)
        values = np.asarray(critic(ids, mask))
        grads = nnx.grad(loss)(critic)
        flat = {path: np.asarray(g[...]) for path, g in nnx.to_flat_state(grads)}
        results[remat] = (values, flat)

    values0, grads0 = results["none"]
    assert any(np.abs(g).max() > 0 for path, g in grads0.items() if path[0] == "backbone")
    for remat in ("full", "dots"):
        values, grads = results[remat]
        np.testing.assert_allclose(values, values0, atol=1e-6, rtol=0, err_msg=remat)
        assert grads.keys() == grads0.keys()
        for path, g in grads.items():
            # Remat changes how XLA fuses and orders the backward sums, so gradients agree to
            # float32 rounding of those sums, not bit for bit (observed: ~1e-5 of the scale).
            scale = max(1.0, float(np.abs(grads0[path]).max()))
            np.testing.assert_allclose(g, grads0[path], atol=5e-5 * scale, rtol=0,
                                       err_msg=f"{remat} {path}")
