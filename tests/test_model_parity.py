"""The Flax Qwen2 against transformers' PyTorch reference on tiny random checkpoints."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from rlver_jax.models import (PRESETS, CheckpointFormatError, Qwen2Config, count_params,
                              init_cache, load_hf, save_hf)
from tests.hf_fixtures import make_hf_qwen2

CONFIGS = {
    # GQA ratio 2, untied
    "gqa2-untied": dict(num_heads=4, num_kv_heads=2, tie_word_embeddings=False),
    # GQA ratio 1 (MHA), tied, odd sizes
    "mha-tied-odd": dict(vocab_size=101, hidden_size=36, intermediate_size=70, num_heads=3,
                         num_kv_heads=3, tie_word_embeddings=True, num_layers=3),
    # GQA ratio 4, untied, 3 layers
    "gqa4": dict(hidden_size=64, num_heads=8, num_kv_heads=2, num_layers=3,
                 tie_word_embeddings=False),
}


def torch_logits(torch, model, ids, mask=None):
    with torch.no_grad():
        t_ids = torch.tensor(np.asarray(ids), dtype=torch.long)
        t_mask = None if mask is None else torch.tensor(np.asarray(mask), dtype=torch.long)
        return model(input_ids=t_ids, attention_mask=t_mask).logits.float().numpy()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers(tmp_path, torch, name):
    ref = make_hf_qwen2(tmp_path, **CONFIGS[name])
    config, model = load_hf(tmp_path)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, config.vocab_size, size=(2, 11))
    ours = np.asarray(model(jnp.asarray(ids)))
    theirs = torch_logits(torch, ref, ids)
    assert ours.shape == theirs.shape == (2, 11, config.vocab_size)
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)


def test_left_padded_batch_matches_rows_alone_and_transformers(tmp_path, torch):
    ref = make_hf_qwen2(tmp_path, **CONFIGS["gqa2-untied"])
    config, model = load_hf(tmp_path)
    rng = np.random.default_rng(1)
    lengths = [9, 5, 1]
    width = max(lengths)
    ids = np.zeros((3, width), np.int64)
    mask = np.zeros((3, width), np.int64)
    rows = []
    for r, n in enumerate(lengths):
        row = rng.integers(3, config.vocab_size, size=n)
        rows.append(row)
        ids[r, width - n:] = row
        mask[r, width - n:] = 1
    batched = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    theirs = torch_logits(torch, ref, ids, mask)
    for r, n in enumerate(lengths):
        alone = np.asarray(model(jnp.asarray(rows[r][None])))[0]
        np.testing.assert_allclose(batched[r, width - n:], alone, atol=1e-5, rtol=0)
        np.testing.assert_allclose(batched[r, width - n:], theirs[r, width - n:], atol=1e-5,
                                   rtol=0)


def test_prefill_then_cached_decode_equals_full_forward(tmp_path, torch):
    make_hf_qwen2(tmp_path, **CONFIGS["gqa4"])
    config, model = load_hf(tmp_path)
    rng = np.random.default_rng(2)
    ids = rng.integers(0, config.vocab_size, size=(2, 12))
    # Row 1 is left padded by 3 in the prompt.
    mask = np.ones((2, 12), np.int64)
    mask[1, :3] = 0
    full = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    cache = init_cache(config, batch_size=2, capacity=16)
    logits, cache = model(jnp.asarray(ids[:, :7]), jnp.asarray(mask[:, :7]), cache=cache)
    np.testing.assert_allclose(np.asarray(logits)[0], full[0, :7], atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(logits)[1, 3:], full[1, 3:7], atol=1e-5, rtol=0)
    for t in range(7, 12):
        step, cache = model(jnp.asarray(ids[:, t:t + 1]), cache=cache)
        np.testing.assert_allclose(np.asarray(step)[:, 0], full[:, t], atol=1e-5, rtol=0)
    assert int(cache.index) == 12
    np.testing.assert_array_equal(np.asarray(cache.next_position), [12, 9])


def test_cache_holes_do_not_change_logits(tmp_path, torch):
    """A shorter chunk appended with left padding leaves a hole; positions stay exact."""
    make_hf_qwen2(tmp_path, **CONFIGS["gqa2-untied"])
    config, model = load_hf(tmp_path)
    rng = np.random.default_rng(3)
    a = rng.integers(3, config.vocab_size, size=(2, 4))
    b = rng.integers(3, config.vocab_size, size=(2, 3))
    chunk_mask = np.array([[1, 1, 1], [0, 0, 1]])  # row 1 appends one token only
    cache = init_cache(config, batch_size=2, capacity=8)
    _, cache = model(jnp.asarray(a), cache=cache)
    logits, cache = model(jnp.asarray(b), jnp.asarray(chunk_mask), cache=cache)
    row0 = np.asarray(model(jnp.asarray(np.concatenate([a[0], b[0]])[None])))[0, -1]
    row1 = np.asarray(model(jnp.asarray(np.concatenate([a[1], b[1, 2:]])[None])))[0, -1]
    np.testing.assert_allclose(np.asarray(logits)[0, -1], row0, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(logits)[1, -1], row1, atol=1e-5, rtol=0)


@pytest.mark.parametrize("tied", [False, True])
def test_export_round_trip_loads_in_transformers(tmp_path, torch, tied):
    from transformers import AutoModelForCausalLM

    make_hf_qwen2(tmp_path / "src", tie_word_embeddings=tied)
    config, model = load_hf(tmp_path / "src")
    files = save_hf(model, config, tmp_path / "out")
    assert "config.json" in files and "generation_config.json" in files
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").float().eval()
    ids = np.random.default_rng(4).integers(0, config.vocab_size, size=(2, 7))
    np.testing.assert_allclose(torch_logits(torch, reloaded, ids),
                               np.asarray(model(jnp.asarray(ids))), atol=1e-5, rtol=0)


def test_sharded_index_round_trip(tmp_path, torch):
    make_hf_qwen2(tmp_path / "src", max_shard_size="20KB")
    index = json.loads((tmp_path / "src" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    config, model = load_hf(tmp_path / "src")
    files = save_hf(model, config, tmp_path / "out", max_shard_bytes=30_000)
    assert "model.safetensors.index.json" in files
    assert sum(f.endswith(".safetensors") for f in files) > 1
    config2, model2 = load_hf(tmp_path / "out")
    assert config2 == config
    ids = jnp.arange(10)[None] % config.vocab_size
    np.testing.assert_array_equal(np.asarray(model(ids)), np.asarray(model2(ids)))


def test_bfloat16_export_and_forward(tmp_path, torch):
    make_hf_qwen2(tmp_path / "src")
    config, model32 = load_hf(tmp_path / "src")
    _, model16 = load_hf(tmp_path / "src", dtype="bfloat16")
    assert model16.embed[...].dtype == jnp.bfloat16
    ids = jnp.asarray(np.random.default_rng(5).integers(0, config.vocab_size, size=(2, 9)))
    l32, l16 = np.asarray(model32(ids)), np.asarray(model16(ids))
    assert l16.dtype == np.float32  # logits are float32 whatever the compute dtype
    # bfloat16 keeps ~3 significant digits: errors of a few 1e-2 on O(1) logits.
    assert np.max(np.abs(l16 - l32)) < 5e-2 * max(1.0, np.max(np.abs(l32)))
    save_hf(model16, config, tmp_path / "out16", dtype="bfloat16")
    hf = json.loads((tmp_path / "out16" / "config.json").read_text())
    assert hf["torch_dtype"] == "bfloat16"
    _, again = load_hf(tmp_path / "out16", dtype="bfloat16")
    np.testing.assert_array_equal(np.asarray(again(ids)), l16)


def test_config_reads_both_transformers_layouts(tmp_path):
    base = PRESETS["qwen2.5-7b"].to_hf_dict()
    v4 = {k: v for k, v in base.items() if k not in ("rope_parameters", "dtype")}
    v5 = {k: v for k, v in base.items() if k not in ("rope_theta", "torch_dtype")}
    for layout in (v4, v5):
        path = tmp_path / "config.json"
        path.write_text(json.dumps(layout))
        assert Qwen2Config.from_json_file(path) == PRESETS["qwen2.5-7b"]


PARAM_COUNTS = {
    "qwen2.5-0.5b": 494_032_768, "qwen2.5-1.5b": 1_543_714_304, "qwen2.5-3b": 3_085_938_688,
    "qwen2.5-7b": 7_615_616_512, "qwen2.5-14b": 14_770_033_664,
    "qwen2.5-32b": 32_763_876_352, "qwen2.5-72b": 72_706_203_648,
}


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_preset_parameter_counts(name):
    assert count_params(PRESETS[name]) == PARAM_COUNTS[name]


def test_missing_tensor_and_shape_mismatch_errors(tmp_path, torch):
    from safetensors.numpy import load_file, save_file

    make_hf_qwen2(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    shape = weights[name].shape
    weights[name] = np.zeros((shape[0] + 1, shape[1]), np.float32)
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointFormatError, match=rf"{name}.*\(81, 48\).*\(80, 48\)"):
        load_hf(tmp_path)
    del weights[name]
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointFormatError, match=f"missing tensor '{name}'"):
        load_hf(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointFormatError, match="neither model.safetensors"):
        load_hf(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_hf(tmp_path / "nope")
