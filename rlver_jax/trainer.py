"""One RLVER training run: components from a config, then rollout -> advantages -> update.

`Trainer.run()` is what `python -m rlver_jax.train` calls. Each step:
  1. the step's profiles (a seeded permutation per epoch: a resumed run sees the same ones);
  2. rollout: batched policy turns and simulated-user turns (`env/rollout.py`);
  3. old log-probs (trainer-side, compared with the sampler's: the `logprob_gap/*` alarm),
     reference log-probs when a KL term is on, critic values for PPO;
  4. advantages: GAE (PPO) or group-normalised outcome rewards (GRPO);
  5. epochs x mini-batches of policy (and critic) updates;
  6. metrics.jsonl / TensorBoard / progress bar, dialogue log, Orbax checkpoint.

Multi-host (one process per host, `rlver_jax.distributed`): each process plays its share
of the step's dialogues, in lock step with the others (see `env/rollout.py`), and hands
its training rows to one global batch (`distributed.global_rows`); the update runs over
all rows at once. Rollout metrics are reduced over every process's dialogues; process 0
writes metrics, logs and plots (`log.every_process` also writes each other process's
metrics to metrics.process<N>.jsonl); checkpoints are written by all together.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rlver_jax import build, distributed
from rlver_jax import sharding as sharding_lib
from rlver_jax import storage
from rlver_jax.checkpoint import abstract_like
from rlver_jax.config_checks import validate_process_layout
from rlver_jax.env.rollout import RolloutSummary, collate, dialogue_record
from rlver_jax.env.users import mix_seed
from rlver_jax.metrics import MetricWriter
from rlver_jax.models import Qwen2, Qwen2Config
from rlver_jax.rl import advantages as adv_lib
from rlver_jax.rl import losses
from rlver_jax.rl.update import TrainBatch, TrainState
from rlver_jax.sampling import next_power_of_two


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. repeated non-finite updates)."""


def _hf_meta(config: Qwen2Config, export_dtype: str) -> dict:
    """A model's entry in the checkpoint meta: its HF config, the storage (`param_dtype`)
    and compute (`dtype`) dtypes, and `export_dtype`, the dtype its weights came in (an
    HF directory's, or the preset's), which `export` writes by default."""
    return {**config.to_hf_dict(), "param_dtype": config.param_dtype, "dtype": config.dtype,
            "export_dtype": export_dtype}


def master_dtype_note(meta: dict, key: str, config: Qwen2Config) -> str | None:
    """A one-line note when a checkpoint stores its masters in another dtype than this run
    (checkpoints written before float32 masters hold bfloat16 ones); None when they agree."""
    saved = (meta.get(key) or {}).get("param_dtype")
    if saved is None or saved == config.param_dtype:
        return None
    return (f"checkpoint {key.replace('_model', '')} weights are stored in {saved}; "
            f"continuing with {config.param_dtype} master weights (cast on restore)")


class Trainer:
    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        parts = build.build(config)
        self.config = c = config
        self.workdir = os.fspath(workdir)
        self.is_main = jax.process_index() == 0
        self.layout = parts.layout
        self.mesh, self.rules = parts.layout.mesh, parts.layout.rules
        self.sampling_rules = parts.layout.sampling_rules
        self.tokenizer = parts.tokenizer
        self.profiles = parts.profiles
        self.multiprocess = distributed.spans_processes(self.mesh)
        validate_process_layout(c, jax.process_count(), self.multiprocess)
        self.ppo = c.rl.algorithm == "ppo"
        self._restore_notes: list[str] = []
        # Unset: on for PPO, off for GRPO (configs/base.py says where each default is from).
        self.whiten_advantages = (self.ppo if c.rl.whiten_advantages is None
                                  else bool(c.rl.whiten_advantages))
        self.policy_config, self.policy_model = parts.policy.config, parts.policy.model
        self.policy_export_dtype = parts.policy.export_dtype
        if parts.critic is not None:
            self.critic_config, self.critic_model = parts.critic.config, parts.critic.model
            self.critic_export_dtype = parts.critic.export_dtype
        self.reference_params = parts.reference_params
        self.sim_settings, self.user = parts.sim_settings, parts.user
        self.policy_updater, self.policy_state = parts.policy_updater, parts.policy_state
        self.critic_updater, self.critic_state = parts.critic_updater, parts.critic_state
        self.rollout_settings = parts.rollout_settings
        self.policy_sampler = parts.policy_sampler
        self.rollout = parts.rollout
        self._prepare = jax.jit(self._prepare_impl)

    # ------------------------------------------------------------------- data
    def profiles_for_step(self, step: int) -> list:
        """The step's profiles: a seeded permutation per pass over the set, so the order is
        a pure function of (seed, step) and a resumed run continues it exactly."""
        c = self.config
        per_step = c.rollout.batch_dialogues // c.rollout.group_size
        n = len(self.profiles)
        chosen = []
        for k in range(per_step):
            epoch, pos = divmod(step * per_step + k, n)
            order = (np.random.default_rng([c.seed, epoch]).permutation(n) if c.data.shuffle
                     else np.arange(n))
            chosen.append(self.profiles[int(order[pos])])
        # Multi-host: each process plays its share of the step's dialogues.
        return chosen[jax.process_index()::jax.process_count()]

    # ----------------------------------------------------------------- a step
    def sampling_view(self) -> Qwen2:
        return build.sampling_view(self.policy_updater, self.policy_state, self.layout)

    def _pad_batch(self, arrays: dict) -> tuple[dict, int]:
        """Pads this process's [rows, T] training arrays with empty rows (and columns) to
        the shape every process agrees on; returns them and the global row count.

        Rows: a power of two (few compiled shapes), divisible by the update split. With
        several processes rows and width are the largest any process needs (in think mode
        each host has its own number of samples), and the global batch holds every
        process's rows.
        """
        c = self.config
        agree = distributed.max_over_processes if self.multiprocess else int
        rows, width = arrays["tokens"].shape[0], arrays["tokens"].shape[1]
        split = c.rl.mini_batches * max(c.rl.micro_batch_size, 1)
        padded_rows = max(next_power_of_two(agree(rows)), split)
        padded_rows = -(-padded_rows // split) * split
        padded_width = agree(width)
        pad = lambda v: np.pad(v, [(0, padded_rows - rows)] + [(0, padded_width - width)]
                               * (v.ndim - 1))
        arrays = {k: pad(v) for k, v in arrays.items()}
        processes = jax.process_count() if self.multiprocess else 1
        return arrays, padded_rows * processes

    def _device_rows(self, x: np.ndarray) -> jax.Array:
        """Host rows -> a device batch (the global batch over every process's rows)."""
        if self.multiprocess:
            return distributed.global_rows(x, self.mesh, self.rules)
        return jnp.asarray(x)

    def train_step(self, step: int) -> dict[str, float]:
        c = self.config
        t_start = time.perf_counter()
        profiles = self.profiles_for_step(step)
        with sharding_lib.logical_rules(self.sampling_rules):
            result = self.rollout.run(self.sampling_view(), profiles, seed=mix_seed(c.seed, step),
                                      id_prefix=f"s{step}")
        t_rollout = time.perf_counter() - t_start
        arrays = collate(result.samples, self.tokenizer.pad_id)
        rows = arrays["tokens"].shape[0]
        arrays, padded_rows = self._pad_batch(arrays)
        local_rows = arrays["tokens"].shape[0]

        t0 = time.perf_counter()
        row_advantage = (self._grpo_row_advantages(result, local_rows) if not self.ppo
                         else np.zeros((local_rows,), np.float32))
        batch, prep_metrics = self._prepare(
            self.policy_state.params, None if not self.ppo else self.critic_state.params,
            self.reference_params, {k: self._device_rows(v) for k, v in arrays.items()},
            self._device_rows(row_advantage))
        metrics = {k: float(v) for k, v in prep_metrics.items()}
        t_prep = time.perf_counter() - t0

        t0 = time.perf_counter()
        update_metrics = self._update(batch, padded_rows, step)
        t_update = time.perf_counter() - t0
        metrics.update(update_metrics)
        if self.multiprocess:
            # Metrics over every process's dialogues (each process holds only its own).
            parts = distributed.gather_objects((result.summary, rows))
            metrics.update(RolloutSummary.merge([p[0] for p in parts]).metrics())
            rows = sum(p[1] for p in parts)
        else:
            metrics.update(result.metrics)
        # The rollout counts the simulator's tokens (rollout/simulator_*; none for the rule
        # user).
        step_sim_tokens = metrics.get("rollout/simulator_tokens", 0.0)
        step_s = time.perf_counter() - t_start
        metrics.update({
            "time/step_s": step_s, "time/rollout_s": t_rollout, "time/logprobs_s": t_prep,
            "time/update_s": t_update,
            "time/policy_sampling_s": result.timing["policy_s"],
            "time/simulator_s": result.timing["analyzer_s"] + result.timing["actor_s"],
            "tokens/simulator": float(step_sim_tokens),
            "tokens/train_rows": float(rows),
            "throughput/tokens_per_s": (metrics["tokens/policy"] + step_sim_tokens)
            / max(step_s, 1e-9),
            "throughput/policy_tokens_per_s": metrics["tokens/policy"] / max(step_s, 1e-9),
            "compile/sampler_programs": float(self.policy_sampler.num_compilations),
        })
        self._last_rollout = result
        return metrics

    def _grpo_row_advantages(self, result, rows: int) -> np.ndarray:
        """Group-normalised dialogue rewards, one per training row [rows]. Computed per
        dialogue: in think mode a dialogue has one sample per turn and must count once in
        its group's statistics."""
        c = self.config
        dialogue_ids = [st.dialogue_id for st in result.dialogues]
        rewards = np.array([self.rollout.final_reward(st) for st in result.dialogues],
                           np.float32)
        groups = np.repeat(np.arange(len(dialogue_ids) // c.rollout.group_size),
                           c.rollout.group_size)
        adv = np.asarray(adv_lib.grpo(jnp.asarray(rewards), jnp.asarray(groups),
                                      normalize_std=c.rl.grpo_normalize_std))
        by_id = dict(zip(dialogue_ids, adv))
        per_row = np.zeros((rows,), np.float32)
        for i, s in enumerate(result.samples):
            per_row[i] = by_id[s.dialogue_id]
        return per_row

    def _prepare_impl(self, policy_params, critic_params, reference_params, arrays,
                      row_advantage):
        """Everything between the rollout and the update, in one compiled program:
        old / reference log-probs, values, KL reward shaping, advantages, and metrics."""
        c = self.config
        tokens, attention = arrays["tokens"], arrays["attention_mask"]
        loss_mask = arrays["loss_mask"]
        mask_f = loss_mask.astype(jnp.float32)
        n_tok = jnp.maximum(mask_f.sum(), 1.0)
        mean = lambda x: (x * mask_f).sum() / n_tok
        old_logp, entropy = self.policy_updater.forward_logprobs(policy_params, tokens,
                                                                 attention)
        # Like with like: the trainer's log-probs are of the untruncated distribution (at
        # the sampling temperature), so they are compared with the sampler's log-probs of
        # that same distribution ("raw"), not with the top-p / top-k filtered one (which
        # differs by the renormalisation whenever a filter is on).
        sampler_logp = arrays["sampler_raw_logprobs"]
        gap = jnp.abs(old_logp - sampler_logp) * mask_f
        metrics = {"logprob_gap/mean_abs": gap.sum() / n_tok,
                   "logprob_gap/max_abs": gap.max(),
                   "policy/entropy_rollout": mean(entropy)}
        # Truncated importance sampling against the same raw sampler log-probs: it corrects
        # the numerical sampler/trainer mismatch (bf16 sampling copy, other kernels), which
        # is what the trainer's objective can see. The filtered log-probs would fold the
        # deliberate top-p / top-k truncation into the weight, a bias (< 1 on every kept
        # token) that no trainer-side term models.
        tis_weights, tis_metrics = losses.tis_weights(old_logp, sampler_logp, loss_mask,
                                                      c.rl.tis_cap)
        metrics.update({f"tis/{k}": v.value() for k, v in tis_metrics.items()})
        if not c.rl.tis_cap:
            tis_weights = None
        ref_logp = jnp.zeros_like(old_logp)
        if reference_params is not None:
            ref_logp, _ = self.policy_updater.forward_logprobs(reference_params, tokens,
                                                               attention)
            metrics["kl/policy_ref_k3"] = mean(losses.kl_penalty(old_logp, ref_logp, "k3"))
        rewards = arrays["rewards"]
        if c.rl.kl_reward_coef:
            kl = losses.kl_penalty(old_logp, ref_logp, c.rl.kl_reward_kind) * mask_f
            rewards = rewards - c.rl.kl_reward_coef * kl
            metrics["kl/reward_penalty"] = kl.sum() / n_tok
        values = jnp.zeros_like(old_logp)
        if critic_params is not None:
            values = self.critic_updater.forward_values(critic_params, tokens, attention)
            advantages, returns = adv_lib.gae(rewards, values, loss_mask, c.rl.gamma, c.rl.lam)
            metrics["critic/explained_variance_before"] = losses.explained_variance(
                values, returns, loss_mask)
        else:
            advantages = adv_lib.broadcast_sequence_advantage(row_advantage, loss_mask)
            returns = jnp.zeros_like(advantages)
        if self.whiten_advantages:  # returns above are taken before whitening
            advantages = adv_lib.masked_whiten(advantages, loss_mask)
        metrics["advantage/mean"] = mean(advantages)
        metrics["advantage/abs_mean"] = mean(jnp.abs(advantages))
        batch = TrainBatch(tokens=tokens, attention_mask=attention, loss_mask=loss_mask,
                           old_logp=old_logp, ref_logp=ref_logp, advantages=advantages,
                           returns=returns, old_values=values, tis_weights=tis_weights)
        return batch, metrics

    @staticmethod
    @jax.jit
    def _take_rows(batch: TrainBatch, rows) -> TrainBatch:
        return jax.tree.map(lambda x: x[rows], batch)

    def _update(self, batch: TrainBatch, rows: int, step: int) -> dict[str, float]:
        c = self.config
        sums: dict[str, float] = {}
        count = 0
        skipped = 0.0
        for epoch in range(c.rl.epochs):
            order = np.random.default_rng([c.seed, step, epoch, 7]).permutation(rows)
            for part in np.array_split(order, c.rl.mini_batches):
                # One mini-batch is the whole batch: row order does not change the update.
                mini = batch if c.rl.mini_batches == 1 else self._take_rows(batch, part)
                self.policy_state, pm = self.policy_updater.step(self.policy_state, mini)
                out = {f"policy/{k}": float(v) for k, v in pm.items()}
                skipped = max(skipped, float(pm["skipped"]))
                if self.ppo:
                    self.critic_state, cm = self.critic_updater.step(self.critic_state, mini)
                    out.update({f"critic/{k}": float(v) for k, v in cm.items()})
                    skipped = max(skipped, float(cm["skipped"]))
                for k, v in out.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
        metrics = {k: v / count for k, v in sums.items()}
        metrics["update/skipped"] = skipped
        return metrics

    # -------------------------------------------------------------- checkpoints
    def _items(self) -> dict:
        items = {"policy_params": self.policy_state.params,
                 "policy_opt": self.policy_state.opt_state}
        if self.ppo:
            items.update(critic_params=self.critic_state.params,
                         critic_opt=self.critic_state.opt_state)
        return items

    def _meta(self, step: int) -> dict:
        meta = {"step": step, "config": self.config.to_dict(),
                "policy_model": _hf_meta(self.policy_config, self.policy_export_dtype),
                "tokenizer": self.tokenizer.spec,
                "policy_update_step": int(self.policy_state.step),
                "profiles_seen": step * (self.config.rollout.batch_dialogues
                                         // self.config.rollout.group_size)}
        if self.ppo:
            meta["critic_model"] = _hf_meta(self.critic_config, self.critic_export_dtype)
            meta["critic_update_step"] = int(self.critic_state.step)
        return json.loads(json.dumps(meta, default=str))

    def _restore(self, checkpointer) -> int:
        step = checkpointer.latest_step()
        if step is None:
            return 0
        # Leaves restore in the targets' dtypes: older checkpoints' bf16 masters are cast up.
        targets = abstract_like(self._items())
        step, items, meta = checkpointer.restore(step, targets)
        self._restore_notes = [note for note in (
            master_dtype_note(meta, "policy_model", self.policy_config),
            master_dtype_note(meta, "critic_model", self.critic_config) if self.ppo else None)
            if note]
        self.policy_state = TrainState(step=jnp.int32(meta["policy_update_step"]),
                                       params=items["policy_params"],
                                       opt_state=items["policy_opt"])
        if self.ppo:
            self.critic_state = TrainState(step=jnp.int32(meta["critic_update_step"]),
                                           params=items["critic_params"],
                                           opt_state=items["critic_opt"])
        return step

    # -------------------------------------------------------------------- run
    def run(self) -> list[dict]:
        from rlver_jax.checkpoint import Checkpointer, PreemptionGuard

        c = self.config
        storage.makedirs(self.workdir)
        checkpointer = Checkpointer(storage.join(self.workdir, "checkpoints"),
                                    save_every=c.checkpoint.every, keep=c.checkpoint.keep,
                                    async_save=c.checkpoint.async_save)
        start = self._restore(checkpointer)
        if self.is_main:
            writer = MetricWriter(self.workdir, c.total_steps, start_step=start,
                                  tensorboard=c.log.tensorboard, progress=c.log.progress,
                                  wandb_project=c.log.get("wandb_project", ""),
                                  wandb_mode=c.log.get("wandb_mode", "online"),
                                  run_config=json.loads(json.dumps(c.to_dict(), default=str)))
        else:
            writer = MetricWriter(self.workdir, c.total_steps, start_step=start,
                                  tensorboard=False, progress=False,
                                  enabled=c.log.every_process,
                                  filename=f"metrics.process{jax.process_index()}.jsonl")
        if start:
            writer.log(f"resumed from step {start} in {self.workdir}")
            for note in self._restore_notes:
                writer.log(note)
        if self.is_main:
            storage.write_text(storage.join(self.workdir, "config.json"),
                               json.dumps(c.to_dict(), indent=2, default=str))
        history = []
        bad_in_a_row = 0
        try:
            with PreemptionGuard() as guard, jax.set_mesh(self.mesh), \
                    sharding_lib.logical_rules(self.rules):
                for step in range(start, c.total_steps):
                    metrics = self.train_step(step)
                    if metrics["update/skipped"]:
                        bad_in_a_row += 1
                        writer.log(f"step {step}: non-finite loss or gradient, update skipped "
                                   f"({bad_in_a_row} in a row)")
                        if bad_in_a_row >= c.rl.max_consecutive_nonfinite:
                            raise TrainingError(
                                f"{bad_in_a_row} consecutive steps with a non-finite loss or "
                                f"gradient (last at step {step}); stopping. The last good "
                                f"checkpoint (step {checkpointer.latest_step()}) is kept in "
                                f"{os.path.join(self.workdir, 'checkpoints')}")
                    else:
                        bad_in_a_row = 0
                    if c.eval.every and (step + 1) % c.eval.every == 0:
                        metrics.update(self.evaluate_during_training(step))
                    writer.write(step, metrics)
                    history.append({"step": step, **metrics})
                    self._log_dialogues(step)
                    done = step + 1
                    # A skipped update left the parameters as they were: nothing new to save.
                    stop = guard.should_stop(done)  # agreed by every process
                    if not metrics["update/skipped"] or stop:
                        checkpointer.save(done, self._items(), self._meta(done),
                                          force=done == c.total_steps or stop)
                    if stop:
                        writer.log(f"pre-emption signal: saved step {done}, exiting")
                        break
        finally:
            checkpointer.wait()
            checkpointer.close()
            writer.close()
            if self.is_main and c.log.plots:
                self._plots()
        return history

    def _log_dialogues(self, step: int) -> None:
        n = self.config.log.dialogues_per_step
        if not self.is_main or n <= 0:
            return
        storage.append_text(storage.join(self.workdir, "dialogues.jsonl"), "".join(
            json.dumps(dialogue_record(st, step), ensure_ascii=False) + "\n"
            for st in self._last_rollout.dialogues[:n]))

    def _plots(self) -> None:
        from rlver_jax import plots
        from rlver_jax.metrics import read_metrics
        metrics_path = storage.join(self.workdir, "metrics.jsonl")
        if not storage.path(metrics_path).exists():
            return
        records = read_metrics(metrics_path)
        plot_dir = storage.join(self.workdir, "plots")
        if records:
            plots.plot_training_curves(records, storage.join(plot_dir, "training_curves.png"))
        log = storage.path(storage.join(self.workdir, "dialogues.jsonl"))
        if log.exists():
            dialogues = [json.loads(line) for line in log.read_text().splitlines()
                         if line.strip()]
            last_step = dialogues[-1]["step"] if dialogues else None
            recent = [d for d in dialogues if d["step"] == last_step]
            first = [d for d in dialogues if d["step"] == dialogues[0]["step"]]
            plots.plot_emotion_trajectories(
                first, storage.join(plot_dir, "emotion_first_step.png"),
                title=f"Emotion per turn, step {dialogues[0]['step']}")
            plots.plot_emotion_trajectories(
                recent, storage.join(plot_dir, "emotion_last_step.png"),
                title=f"Emotion per turn, step {last_step}")

    def evaluate_during_training(self, step: int) -> dict[str, float]:
        """A held-out evaluation under the evaluation simulator (`eval.*`), as
        `python -m rlver_jax.evaluate` runs it; metrics prefixed `eval/`."""
        from rlver_jax.evaluate import evaluate_policy
        c = self.config
        profiles = build.resolve_profiles(c.eval.profiles)[:c.eval.max_dialogues]
        if self.multiprocess:
            profiles = distributed.host_shard(profiles)  # the report covers all of them
        settings = build.simulator_settings(c, c.eval.difficulty, use_first_talk=True)
        user = build.with_settings(self.user, settings)
        with sharding_lib.logical_rules(self.sampling_rules):
            report = evaluate_policy(
                self.sampling_view(), self.tokenizer, user, profiles, settings,
                dataclasses.replace(self.rollout_settings, temperature=c.eval.temperature),
                self.policy_sampler, seed=mix_seed(c.seed, step, 99), id_prefix=f"eval{step}-")
        return report.metrics("eval/")
