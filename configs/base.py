"""The base RLVER configuration: Qwen2.5-7B-Instruct policy, PPO, think mode, `hard` user.

Defaults are the reference run's hyper-parameters (RLVER.md). Every field can be
overridden on the command line, e.g. `--config.rl.clip_high=0.28`; an unknown key is an
error that names it.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from rlver_jax import config_files


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 1000
    # Policy tokenizer: "qwen2.5" (bundled), "tiny" (CPU presets), an HF tokenizer dir or hub id.
    c.tokenizer = "qwen2.5"

    c.policy = ml_collections.ConfigDict()
    c.policy.preset = "qwen2.5-7b"      # architecture when no hf_dir is given (random init)
    c.policy.hf_dir = ""                # real weights: a local HF directory or a hub id[@rev]
    # Numerics of a trained model: `param_dtype` stores the master weights (and, through
    # them, the gradients and Adam moments); `dtype` is what the matmuls compute in. bf16
    # masters would swallow the reference run's lr-1e-6 updates (bf16's spacing near a
    # weight of 0.02 is ~1e-4), so trained models keep float32 masters.
    c.policy.param_dtype = "float32"
    c.policy.dtype = "bfloat16"
    c.policy.remat = "full"
    # Attention implementation per model (models/attention.py): "auto" picks per backend.
    c.policy.attention = "auto"

    c.critic = ml_collections.ConfigDict()
    c.critic.hf_dir = ""                # empty: initialise from the policy weights
    c.critic.param_dtype = "float32"
    c.critic.dtype = "bfloat16"
    c.critic.attention = "auto"

    c.reference = ml_collections.ConfigDict()
    c.reference.hf_dir = ""             # empty: the initial policy; built only for a KL term
    # Never trained: stored in the policy's compute dtype (policy.dtype).

    c.simulator = ml_collections.ConfigDict()
    c.simulator.kind = "llm"            # "llm" (in-process model) or "rule" (TOY judge)
    c.simulator.preset = "qwen2.5-7b"
    c.simulator.hf_dir = ""
    c.simulator.tokenizer = ""          # empty: the policy tokenizer
    c.simulator.dtype = "bfloat16"      # never trained: its weights are stored in this dtype
    c.simulator.attention = "auto"
    c.simulator.difficulty = "hard"     # sage | hard | strict
    # One knob per SimulatorSettings field (env/simulator.py), generated from the dataclass;
    # a knob that is set overrides the difficulty preset, unset (None) keeps the preset's
    # value, and "off" turns an optional bound off (delta_clamp, end_below, ...). E.g.
    # --config.simulator.overrides.start_emotion=40 --config.simulator.overrides.delta_clamp=off
    c.simulator.overrides = config_files.simulator_knobs()
    c.simulator.temperature = 0.7
    c.simulator.top_p = 0.95
    c.simulator.max_analyzer_tokens = 512
    c.simulator.max_actor_tokens = 384
    c.simulator.max_prompt_tokens = 8192
    # Keep the simulator's KV cache per dialogue across turns (False: re-prefill every
    # prompt; for comparison only, the outputs are the same).
    c.simulator.reuse_cache = True

    c.data = ml_collections.ConfigDict()
    # A shipped set name (en_train, en_eval, zh_train, zh_eval) or a jsonl path, e.g.
    # ../shared/data/rlver/train_profile.jsonl
    c.data.train_profiles = "en_train"
    c.data.shuffle = True

    c.rollout = ml_collections.ConfigDict()
    c.rollout.think = True
    c.rollout.batch_dialogues = 32      # dialogues per step (profiles x group_size)
    c.rollout.group_size = 1            # GRPO sets 4
    # The reference run's 5k tokens per turn (RLVER.md): think-mode thoughts run long, and a
    # turn cut short is a truncated turn (see truncated_turn). The per-dialogue cap below
    # bounds the whole training sequence (prompts included), not only the responses.
    c.rollout.max_turn_tokens = 5120
    c.rollout.max_dialogue_tokens = 10240
    c.rollout.temperature = 1.0
    c.rollout.top_p = 1.0
    c.rollout.top_k = 0
    c.rollout.unclosed_think = "pass"   # or "zero_reward"
    # A turn cut at max_turn_tokens (counted in rollout/truncated_turns): "pass" trains it
    # as sampled and lets the user read the cut text (the reference code's behaviour, the
    # default); "zero_reward" ends the dialogue with reward 0; "mask" takes the cut turn
    # out of the loss (the reward then sits on an earlier complete turn) and goes on.
    c.rollout.truncated_turn = "pass"

    c.rl = ml_collections.ConfigDict()
    c.rl.algorithm = "ppo"              # ppo | grpo | rloo (rl/advantages.py)
    c.rl.actor_lr = 1e-6
    c.rl.actor_warmup_ratio = 0.02
    c.rl.critic_lr = 5e-6
    c.rl.critic_warmup_ratio = 0.05
    c.rl.clip_low = 0.2
    c.rl.clip_high = 0.2
    c.rl.dual_clip = 0.0                # 0 disables; else c > 1
    c.rl.value_clip = 0.5
    c.rl.entropy_coef = 0.001
    c.rl.gamma = 1.0
    c.rl.lam = 1.0
    c.rl.kl_loss_coef = 0.0
    c.rl.kl_loss_kind = "k3"
    c.rl.kl_reward_coef = 0.0
    c.rl.kl_reward_kind = "k1"
    c.rl.epochs = 1
    c.rl.mini_batches = 1
    c.rl.micro_batch_size = 0           # 0: whole mini-batch in one pass
    c.rl.max_grad_norm = 1.0
    # AdamW's decoupled weight decay, as the reference optimiser applies it: verl's actor and
    # critic `optim.weight_decay` default to 0.01 (torch.optim.AdamW over every parameter),
    # and RLVER's scripts do not override it. optax.adamw decays every parameter as well.
    c.rl.weight_decay = 0.01
    # Truncated importance sampling (0 = off; 2.0 is typical): each policy token's
    # policy-gradient term is weighted by min(exp(trainer_old_logp - sampler_logp), tis_cap),
    # correcting for the sampler (bf16 weights, other kernels) not being the trainer's
    # policy. Uses the sampler's untruncated log-probs (see losses.tis_weights).
    c.rl.tis_cap = 0.0
    c.rl.agg_mode = "token-mean"
    # C of the `*-norm` aggregation modes (Dr.GRPO: sum of a sequence's token losses / C).
    # 0: the configured maximum response length, rollout.max_turn_tokens in think mode (a
    # sample is one turn) and rollout.max_dialogue_tokens without it (a sample is the whole
    # dialogue); never the padded batch width, which changes from step to step.
    c.rl.agg_constant = 0
    c.rl.grpo_normalize_std = True
    # Whitening of the advantages over the loss-masked tokens; None: the algorithm's default.
    # PPO: on, as verl's GAE estimator does (core_algos.compute_gae_advantage_return
    # whitens over the response mask; returns are taken before whitening). GRPO: off, its
    # advantage is already (R - mean_g) / (std_g + 1e-6) (RLVER.md), as verl's GRPO does.
    c.rl.whiten_advantages = placeholder(bool)
    c.rl.logprob_chunk = 1024
    c.rl.max_consecutive_nonfinite = 3

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (-1, 1, 1)           # (data, fsdp, tensor); -1 takes the remaining devices
    c.mesh.rules = "fsdp_tensor"          # training layout (rlver_jax.sharding.RULE_PRESETS)
    c.mesh.sampling_rules = "sampling"    # rollout layout of the policy copy and the simulator

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 50
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True

    c.log = ml_collections.ConfigDict()
    c.log.dialogues_per_step = 4        # dialogues written to WORKDIR/dialogues.jsonl per step
    c.log.tensorboard = True
    c.log.plots = True
    c.log.progress = True
    c.log.every_process = False         # multi-host: also write metrics.process<N>.jsonl
    c.log.wandb_project = ""            # Weights & Biases project ('' = off; needs [wandb])
    c.log.wandb_mode = "online"         # online | offline (files under WORKDIR/wandb)

    c.eval = ml_collections.ConfigDict()
    c.eval.every = 0                    # 0: no evaluation during training
    c.eval.profiles = "en_eval"
    c.eval.difficulty = "sage"
    c.eval.max_dialogues = 16
    c.eval.temperature = 0.0
    return c
