"""The stages of one training step, in the order `train.py` calls them (DESIGN.md's picture):

  profiles_for_step -> rollout -> train_batch -> score (old / reference log-probs,
  values) -> advantages -> update -> step_metrics

Each stage takes what it needs and returns what the next one reads; nothing is kept on the
side. The compiled stages (`make_scorer`, `make_advantages`) are built by factories from
explicit values, so what they freeze at trace time is visible at the call.

Multi-host (one process per host, `rlver_jax.distributed`): each process plays its share
of the step's dialogues, in lock step with the others (see `env/rollout.py`), and hands
its training rows to one global batch (`distributed.global_rows`); scoring, advantages and
the update run over all rows at once. Rollout metrics are reduced over every process's
dialogues.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from rlver_jax import build, distributed
from rlver_jax import sharding as sharding_lib
from rlver_jax.env.rollout import RolloutResult, RolloutSummary
from rlver_jax.env.users import mix_seed
from rlver_jax.rl import advantages as adv_lib
from rlver_jax.rl import batching, losses
from rlver_jax.rl.update import TrainBatch, TrainState, Updater

# Seed-stream tags (`mix_seed(seed, step, TAG)`) of what a step draws besides the rollout.
EVAL_SEED_TAG = 99
MINI_BATCH_SEED_TAG = 7


@flax.struct.dataclass
class States:
    """What the updates change: the policy's and (PPO) the critic's parameters and
    optimiser states."""

    policy: TrainState
    critic: TrainState | None = None


@dataclasses.dataclass(frozen=True)
class Batch:
    """The step's training rows. `arrays`: the collated, padded fields (`rl.batching`) as
    device arrays, over every process's rows; `rows`: this process's real rows;
    `global_rows`: the padded row count of the global batch."""

    arrays: dict[str, jax.Array]
    rows: int
    global_rows: int


def profiles_for_step(profiles: list, c, step: int) -> list:
    """The step's profiles: a seeded permutation per pass over the set, so the order is a
    pure function of (seed, step) and a resumed run continues it exactly. Multi-host: this
    process's share."""
    per_step = c.rollout.batch_dialogues // c.rollout.group_size
    n = len(profiles)
    chosen = []
    for k in range(per_step):
        epoch, pos = divmod(step * per_step + k, n)
        order = (np.random.default_rng([c.seed, epoch]).permutation(n) if c.data.shuffle
                 else np.arange(n))
        chosen.append(profiles[int(order[pos])])
    return chosen[jax.process_index()::jax.process_count()]


def rollout(parts: build.Components, states: States, profiles: list, step: int
            ) -> RolloutResult:
    """Batched dialogues of the current policy (its sampling view) with the simulated user."""
    layout = parts.layout
    with sharding_lib.logical_rules(layout.sampling_rules):
        view = build.sampling_view(parts.policy_updater, states.policy, layout)
        return parts.rollout.run(view, profiles, seed=mix_seed(parts.config.seed, step),
                                 id_prefix=f"s{step}")


def train_batch(parts: build.Components, result: RolloutResult) -> Batch:
    """Collate, bucket and pad this process's samples, then the global device batch."""
    c, layout = parts.config, parts.layout
    multiprocess = distributed.spans_processes(layout.mesh)
    arrays = batching.collate(result.samples, parts.tokenizer.pad_id)
    rows = arrays["tokens"].shape[0]
    agree = distributed.max_over_processes if multiprocess else int
    arrays = batching.pad(arrays, c.rl.mini_batches * max(c.rl.micro_batch_size, 1), agree)
    local_rows = arrays["tokens"].shape[0]
    if not multiprocess:
        return Batch({k: jnp.asarray(v) for k, v in arrays.items()}, rows, local_rows)
    # Group and dialogue ids are per process: offset them so no two processes' collide.
    # Dialogue ids index the global rows (< local rows on each process); group ids are
    # only compared (< the process's profiles).
    for key, stride in (("group_ids", c.rollout.batch_dialogues), ("dialogue_ids", local_rows)):
        ids = arrays[key]
        arrays[key] = np.where(ids >= 0, ids + jax.process_index() * stride, ids)
    return Batch({k: distributed.global_rows(v, layout.mesh, layout.rules)
                  for k, v in arrays.items()}, rows, local_rows * jax.process_count())


def make_scorer(policy_updater: Updater, critic_updater: Updater | None, *, tis_cap: float,
                kl_reward_coef: float, kl_reward_kind: str) -> Callable:
    """A compiled `score(policy_params, critic_params, reference_params, arrays)` ->
    (scores, metrics): the trainer-side old log-probs (compared with the sampler's: the
    `logprob_gap/*` alarm), truncated importance weights, reference log-probs and the KL
    reward shaping when a reference is given, and the critic's values when one is."""

    def score(policy_params, critic_params, reference_params, arrays):
        tokens, attention = arrays["tokens"], arrays["attention_mask"]
        loss_mask = arrays["loss_mask"]
        mask_f = loss_mask.astype(jnp.float32)
        n_tok = jnp.maximum(mask_f.sum(), 1.0)
        mean = lambda x: (x * mask_f).sum() / n_tok
        old_logp, entropy = policy_updater.forward_logprobs(policy_params, tokens, attention)
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
                                                      tis_cap)
        metrics.update({f"tis/{k}": v.value() for k, v in tis_metrics.items()})
        ref_logp = jnp.zeros_like(old_logp)
        if reference_params is not None:
            ref_logp, _ = policy_updater.forward_logprobs(reference_params, tokens, attention)
            metrics["kl/policy_ref_k3"] = mean(losses.kl_penalty(old_logp, ref_logp, "k3"))
        rewards = arrays["rewards"]
        if kl_reward_coef:
            kl = losses.kl_penalty(old_logp, ref_logp, kl_reward_kind) * mask_f
            rewards = rewards - kl_reward_coef * kl
            metrics["kl/reward_penalty"] = kl.sum() / n_tok
        values = jnp.zeros_like(old_logp)
        if critic_params is not None:
            values = critic_updater.forward_values(critic_params, tokens, attention)
        scores = {"old_logp": old_logp, "ref_logp": ref_logp, "rewards": rewards,
                  "values": values, "tis_weights": tis_weights if tis_cap else None}
        return scores, metrics

    return jax.jit(score)


def make_advantages(algorithm: str, *, gamma: float, lam: float, normalize_std: bool,
                    whiten: bool) -> Callable:
    """A compiled `advantages(arrays, scores)` -> (TrainBatch, metrics): the estimator of
    `algorithm` (`rl.advantages.compute`) and the batch the update steps read."""

    def advantages(arrays, scores):
        loss_mask = arrays["loss_mask"]
        adv, returns = adv_lib.compute(
            algorithm, rewards=scores["rewards"], loss_mask=loss_mask, values=scores["values"],
            scores=arrays["scores"], group_ids=arrays["group_ids"],
            dialogue_ids=arrays["dialogue_ids"], gamma=gamma, lam=lam,
            normalize_std=normalize_std, whiten=whiten)
        mask_f = loss_mask.astype(jnp.float32)
        n_tok = jnp.maximum(mask_f.sum(), 1.0)
        metrics = {"advantage/mean": (adv * mask_f).sum() / n_tok,
                   "advantage/abs_mean": (jnp.abs(adv) * mask_f).sum() / n_tok}
        if algorithm in adv_lib.CRITIC_ALGORITHMS:
            metrics["critic/explained_variance_before"] = losses.explained_variance(
                scores["values"], returns, loss_mask)
        batch = TrainBatch(tokens=arrays["tokens"], attention_mask=arrays["attention_mask"],
                           loss_mask=loss_mask, old_logp=scores["old_logp"],
                           ref_logp=scores["ref_logp"], advantages=adv, returns=returns,
                           old_values=scores["values"], tis_weights=scores["tis_weights"])
        return batch, metrics

    return jax.jit(advantages)


@jax.jit
def take_rows(batch: TrainBatch, rows) -> TrainBatch:
    return jax.tree.map(lambda x: x[rows], batch)


def update(parts: build.Components, states: States, batch: TrainBatch, rows: int, step: int
           ) -> tuple[States, dict[str, float]]:
    """epochs x mini-batches of policy (and critic) optimiser steps; metrics averaged over
    them, `update/skipped` 1 when any step met a non-finite loss or gradient."""
    c = parts.config
    policy, critic = states.policy, states.critic
    sums: dict[str, float] = {}
    count = 0
    skipped = 0.0
    for epoch in range(c.rl.epochs):
        order = np.random.default_rng([c.seed, step, epoch, MINI_BATCH_SEED_TAG]
                                      ).permutation(rows)
        for part in np.array_split(order, c.rl.mini_batches):
            # One mini-batch is the whole batch: row order does not change the update.
            mini = batch if c.rl.mini_batches == 1 else take_rows(batch, part)
            policy, pm = parts.policy_updater.step(policy, mini)
            out = {f"policy/{k}": float(v) for k, v in pm.items()}
            skipped = max(skipped, float(pm["skipped"]))
            if critic is not None:
                critic, cm = parts.critic_updater.step(critic, mini)
                out.update({f"critic/{k}": float(v) for k, v in cm.items()})
                skipped = max(skipped, float(cm["skipped"]))
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
    metrics = {k: v / count for k, v in sums.items()}
    metrics["update/skipped"] = skipped
    return States(policy, critic), metrics


def step_metrics(parts: build.Components, result: RolloutResult, rows: int,
                 timing: dict[str, float], *stage_metrics: dict[str, Any]) -> dict[str, float]:
    """The step's record for metrics.jsonl: the stages' metrics, the rollout's (over every
    process's dialogues), token counts, timings and throughput."""
    metrics: dict[str, float] = {}
    for m in stage_metrics:
        metrics.update({k: float(v) for k, v in m.items()})
    if distributed.spans_processes(parts.layout.mesh):
        # Each process holds only its own dialogues.
        gathered = distributed.gather_objects((result.summary, rows))
        metrics.update(RolloutSummary.merge([p[0] for p in gathered]).metrics())
        rows = sum(p[1] for p in gathered)
    else:
        metrics.update(result.metrics)
    # The rollout counts the simulator's tokens (none for the rule user).
    sim_tokens = metrics.get("rollout/simulator_tokens", 0.0)
    step_s = timing["step_s"]
    metrics.update({
        "time/step_s": step_s, "time/rollout_s": timing["rollout_s"],
        "time/logprobs_s": timing["scoring_s"], "time/update_s": timing["update_s"],
        "time/policy_sampling_s": result.timing["policy_s"],
        "time/simulator_s": result.timing["analyzer_s"] + result.timing["actor_s"],
        "tokens/simulator": float(sim_tokens),
        "tokens/train_rows": float(rows),
        "throughput/tokens_per_s": (metrics["tokens/policy"] + sim_tokens) / max(step_s, 1e-9),
        "throughput/policy_tokens_per_s": metrics["tokens/policy"] / max(step_s, 1e-9),
        "compile/sampler_programs": float(parts.policy_sampler.num_compilations),
    })
    return metrics


def evaluate(parts: build.Components, states: States, step: int) -> dict[str, float]:
    """A held-out evaluation under the evaluation simulator (`eval.*`), as
    `python -m rlver_jax.evaluate` runs it; metrics prefixed `eval/`."""
    from rlver_jax.evaluate import evaluate_policy
    c, layout = parts.config, parts.layout
    profiles = build.resolve_profiles(c.eval.profiles)[:c.eval.max_dialogues]
    if distributed.spans_processes(layout.mesh):
        profiles = distributed.host_shard(profiles)  # the report covers all of them
    settings = build.simulator_settings(c, c.eval.difficulty, use_first_talk=True)
    with sharding_lib.logical_rules(layout.sampling_rules):
        report = evaluate_policy(
            build.sampling_view(parts.policy_updater, states.policy, layout), parts.tokenizer,
            build.with_settings(parts.user, settings), profiles, settings,
            dataclasses.replace(parts.rollout_settings, temperature=c.eval.temperature),
            parts.policy_sampler, seed=mix_seed(c.seed, step, EVAL_SEED_TAG),
            id_prefix=f"eval{step}-")
    return report.metrics("eval/")


class Clock:
    """Wall time of the step's stages (`time/*` metrics)."""

    def __init__(self):
        self.start = self._last = time.perf_counter()
        self.times: dict[str, float] = {}

    def lap(self, name: str, outputs=None) -> None:
        """Ends stage `name` once its `outputs` (device arrays, dispatched asynchronously)
        are ready."""
        jax.block_until_ready(outputs)
        now = time.perf_counter()
        self.times[name] = now - self._last
        self._last = now

    def total(self) -> dict[str, float]:
        return {**self.times, "step_s": time.perf_counter() - self.start}
