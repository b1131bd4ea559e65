"""Tiny random Qwen2 checkpoints written by transformers itself, for parity tests."""

from __future__ import annotations

import os


def make_hf_qwen2(out_dir: str | os.PathLike, *, vocab_size=97, hidden_size=48,
                  intermediate_size=80, num_layers=2, num_heads=4, num_kv_heads=2,
                  tie_word_embeddings=False, seed=0, rope_theta=10_000.0,
                  max_shard_size=None, dtype="float32", head_dim=None):
    """Saves a random `Qwen2ForCausalLM` to `out_dir` and returns the torch model (eval)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    kwargs = {} if head_dim is None else {"head_dim": head_dim}
    config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, tie_word_embeddings=tie_word_embeddings,
        max_position_embeddings=512, rope_theta=rope_theta, rms_norm_eps=1e-6,
        bos_token_id=1, eos_token_id=2, **kwargs)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        # Non-trivial biases and norms so that a mix-up of them cannot pass.
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    save_kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.to(getattr(torch, dtype)).save_pretrained(out_dir, **save_kwargs)
    return model.float()
