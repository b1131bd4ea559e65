"""Export: a training checkpoint -> an HF directory that transformers loads with equal logits."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from rlver_jax.checkpoint import Checkpointer
from rlver_jax.export import ExportError, export_workdir, main, parse_size
from rlver_jax.workdir_models import load_critic_from_workdir, load_policy_from_workdir
from rlver_jax.models import PRESETS, Qwen2, Qwen2Critic
from rlver_jax.sharding import make_mesh
from rlver_jax.tokenizer import ChatTokenizer

# The tiny preset (its vocab is the tiny tokenizer's), untied so that lm_head is exported too.
CONFIG = PRESETS["tiny"].replace(tie_word_embeddings=False, hidden_size=32, intermediate_size=64,
                                 num_heads=4, num_kv_heads=2)
STEPS = (2, 5)


def random_model(cls, config, seed):
    """A model with random values everywhere (biases, norms and the value head included, so
    that a swapped or dropped tensor cannot pass). Filled from numpy: `create_model`'s
    jitted RNG init compiles for ~20 s on a busy 2-core CPU."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)
    state = jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.1, x.shape), x.dtype), state)
    return nnx.merge(graphdef, state)


@functools.cache
def _jitted_forward(graphdef):
    return jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))


def flax_out(model, ids):
    """Logits (or values) of a model; one compile per model structure, shared by tests."""
    graphdef, state = nnx.split(model)
    return np.asarray(_jitted_forward(graphdef)(state, jnp.asarray(ids)))


def model_meta(config):
    return {**config.to_hf_dict(), "param_dtype": config.param_dtype, "dtype": config.dtype}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A workdir as training leaves it: two steps of policy + critic with optimiser states."""
    root = tmp_path_factory.mktemp("run")
    tx = optax.adamw(1e-3)
    models = {}
    ckpt = Checkpointer(root / "checkpoints", save_every=1, keep=3)
    for step in STEPS:
        policy = random_model(Qwen2, CONFIG, seed=step)
        critic = random_model(Qwen2Critic, CONFIG, seed=100 + step)
        policy_params = nnx.state(policy, nnx.Param)
        critic_params = nnx.state(critic, nnx.Param)
        items = {"policy_params": policy_params, "policy_opt": tx.init(policy_params),
                 "critic_params": critic_params, "critic_opt": tx.init(critic_params)}
        meta = {"policy_model": model_meta(CONFIG), "critic_model": model_meta(CONFIG),
                "tokenizer": "tiny", "step": step, "config": {"algo": "ppo", "seed": 0}}
        assert ckpt.save(step, items, meta)
        models[step] = (policy, critic)
    ckpt.close()
    return root, models


IDS = np.random.default_rng(0).integers(0, CONFIG.vocab_size, size=(2, 9))


def run_cli(*args):
    return main(["rlver_jax.export", *args])


def test_cli_exports_policy_that_transformers_loads(workdir, tmp_path, torch, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, models = workdir
    out = tmp_path / "hf"
    assert run_cli(f"--workdir={root}", f"--out={out}") == 0
    printed = capsys.readouterr().out
    assert "step 5" in printed and "model.safetensors" in printed
    for name in ("config.json", "model.safetensors", "generation_config.json",
                 "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    assert not list(tmp_path.glob("hf.export-*"))

    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor(IDS)).logits.numpy()
    ours = flax_out(models[5][0], IDS)
    np.testing.assert_allclose(theirs, ours, atol=1e-5, rtol=0)

    tok = AutoTokenizer.from_pretrained(out)
    chat = ChatTokenizer.tiny()
    # Plain-text ids are not compared: transformers 5 maps model_type "qwen2" to its own
    # Qwen2Tokenizer (byte-level pre-tokenizer) whatever tokenizer_config.json says, which
    # splits the sentencepiece-based tiny vocab differently. The real Qwen2.5 vocab is
    # unaffected; the chat tokens and template are what generation depends on.
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [chat.im_start_id,
                                                                           chat.im_end_id]
    text = "I have been feeling low lately."
    messages = [{"role": "user", "content": text}]
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == chat.render_text(messages, add_generation_prompt=True)
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == list(chat.eos_ids)


def test_export_earlier_step_in_bfloat16_sharded_files(workdir, tmp_path, torch):
    from transformers import AutoModelForCausalLM

    root, models = workdir
    out = tmp_path / "bf16"
    assert run_cli(f"--workdir={root}", f"--out={out}", "--step=2", "--dtype=bfloat16",
                   "--max_shard_size=100KB") == 0
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1

    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert next(hf.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        theirs = hf.float()(torch.tensor(IDS)).logits.numpy()
    # Our step-2 policy with its weights rounded to bfloat16, computed in float32.
    policy = models[2][0]
    graphdef, state = nnx.split(policy)
    rounded = nnx.merge(graphdef, jax.tree.map(
        lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), state))
    ours = flax_out(rounded, IDS)
    np.testing.assert_allclose(theirs, ours, atol=1e-5, rtol=0)


def test_export_critic(workdir, tmp_path, torch):
    from transformers import AutoModelForTokenClassification

    root, models = workdir
    out = tmp_path / "critic"
    files = export_workdir(root, out, model="critic")
    assert "model.safetensors" in files and "config.json" in files
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForTokenClassification"]
    assert config["num_labels"] == 1

    hf = AutoModelForTokenClassification.from_pretrained(out).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor(IDS)).logits.numpy()[..., 0]
    ours = flax_out(models[5][1], IDS)
    np.testing.assert_allclose(theirs, ours, atol=1e-5, rtol=0)


def test_refuses_non_empty_out_unless_overwrite(workdir, tmp_path, capsys):
    root, _ = workdir
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert run_cli(f"--workdir={root}", f"--out={out}") == 1
    err = capsys.readouterr().err
    assert str(out) in err and "--overwrite" in err
    assert (out / "notes.txt").read_text() == "keep me"

    assert run_cli(f"--workdir={root}", f"--out={out}", "--overwrite") == 0
    assert sorted(os.listdir(out)) and not (out / "notes.txt").exists()
    assert (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    # An empty directory is fine without --overwrite.
    (tmp_path / "empty").mkdir()
    assert run_cli(f"--workdir={root}", f"--out={tmp_path / 'empty'}") == 0


def test_clear_errors(workdir, tmp_path, capsys):
    root, _ = workdir
    with pytest.raises(ExportError, match=r"workdir not found: .*nowhere"):
        export_workdir(tmp_path / "nowhere", tmp_path / "o")
    (tmp_path / "fresh").mkdir()
    with pytest.raises(ExportError, match=r"no checkpoint directory in workdir .*fresh"):
        export_workdir(tmp_path / "fresh", tmp_path / "o")
    (tmp_path / "fresh" / "checkpoints").mkdir()
    with pytest.raises(ExportError, match=r"no checkpoints in .*fresh"):
        export_workdir(tmp_path / "fresh", tmp_path / "o")
    with pytest.raises(ExportError, match=r"no checkpoint for step 3 .*available steps: \[2, 5\]"):
        export_workdir(root, tmp_path / "o", step=3)
    with pytest.raises(ExportError, match="would contain the workdir"):
        export_workdir(root, root, overwrite=True)
    assert not (tmp_path / "o").exists()

    assert run_cli(f"--workdir={root}") == 2  # --out is required
    assert "--out" in capsys.readouterr().err
    assert run_cli(f"--workdir={root}", f"--out={tmp_path / 'o'}", "--step=3") == 1
    assert "available steps: [2, 5]" in capsys.readouterr().err
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30
    assert parse_size("100KB") == 100_000 and parse_size("123") == 123


def test_load_from_workdir_onto_mesh(workdir):
    root, models = workdir
    mesh = make_mesh((2, 2, 2))
    config, policy, meta = load_policy_from_workdir(root, mesh=mesh)
    assert config == CONFIG and meta["step"] == 5 and meta["tokenizer"] == "tiny"
    embed = policy.embed[...]
    assert len(embed.addressable_shards) == 8 and embed.sharding.spec == P("tensor", "fsdp")
    np.testing.assert_array_equal(np.asarray(embed), np.asarray(models[5][0].embed[...]))
    _, critic, _ = load_critic_from_workdir(root, step=2)
    np.testing.assert_array_equal(np.asarray(critic.value_kernel[...]),
                                  np.asarray(models[2][1].value_kernel[...]))
