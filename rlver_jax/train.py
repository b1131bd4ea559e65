"""`python -m rlver_jax.train [--config FILE[:ARG]] [--config.key=value ...] [--workdir DIR]`

`train(config, workdir)` is one RLVER run: the components from the config (`build.py`),
then every step's stages (`step.py`) in the order of DESIGN.md's picture, then the
step's record, dialogue log and checkpoint (`workdir.py`). Re-running on a workdir that
holds checkpoints resumes from the latest one. The command line (flags, one-line errors)
is `train_cli.py`; with no flags it runs the embedded default (`configs/tiny.py`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import jax
import ml_collections

from rlver_jax import build, storage
from rlver_jax import sharding as sharding_lib
from rlver_jax import step as stages
from rlver_jax import workdir as files
from rlver_jax.checkpoint import PreemptionGuard
from rlver_jax.config_checks import validate_process_layout
from rlver_jax.distributed import spans_processes
from rlver_jax.rl.advantages import CRITIC_ALGORITHMS
from rlver_jax.workdir import TrainingError


@dataclasses.dataclass
class Outcome:
    """What `train` returns: one record per step run, and the final trained states."""

    history: list[dict]
    states: stages.States


@dataclasses.dataclass(frozen=True)
class Programs:
    """The step's compiled stages, built once per run from the config's values."""

    score: Callable
    advantages: Callable


def make_programs(parts: build.Components) -> Programs:
    rl = parts.config.rl
    # Unset: on for PPO, off for the group baselines (configs/base.py says why).
    whiten = (rl.algorithm in CRITIC_ALGORITHMS if rl.whiten_advantages is None
              else bool(rl.whiten_advantages))
    return Programs(
        score=stages.make_scorer(parts.policy_updater, parts.critic_updater,
                                 tis_cap=rl.tis_cap, kl_reward_coef=rl.kl_reward_coef,
                                 kl_reward_kind=rl.kl_reward_kind),
        advantages=stages.make_advantages(rl.algorithm, gamma=rl.gamma, lam=rl.lam,
                                          normalize_std=rl.grpo_normalize_std, whiten=whiten))


def train_step(parts: build.Components, programs: Programs, states: stages.States, step: int):
    """One step, under the mesh and the training rules: (new states, the step's metrics,
    the rollout)."""
    clock = stages.Clock()
    profiles = stages.profiles_for_step(parts.profiles, parts.config, step)
    result = stages.rollout(parts, states, profiles, step)
    clock.lap("rollout_s")
    batch = stages.train_batch(parts, result)
    scores, score_metrics = programs.score(
        states.policy.params, states.critic.params if states.critic else None,
        parts.reference_params, batch.arrays)
    train_batch, adv_metrics = programs.advantages(batch.arrays, scores)
    clock.lap("scoring_s", (train_batch, score_metrics, adv_metrics))
    states, update_metrics = stages.update(parts, states, train_batch, batch.global_rows, step)
    clock.lap("update_s")
    metrics = stages.step_metrics(parts, result, batch.rows, clock.total(), score_metrics,
                                  adv_metrics, update_metrics)
    return states, metrics, result


def train(c: ml_collections.ConfigDict, workdir: str) -> Outcome:
    workdir = os.fspath(workdir)
    parts = build.build(c)
    validate_process_layout(c, jax.process_count(), spans_processes(parts.layout.mesh))
    programs = make_programs(parts)
    storage.makedirs(workdir)
    checkpointer = build.build_checkpointer(c, workdir)
    start, states, notes = files.restore(checkpointer, parts,
                                         stages.States(parts.policy_state, parts.critic_state))
    writer = files.open_writer(c, workdir, start)
    if start:
        for note in [f"resumed from step {start} in {workdir}", *notes]:
            writer.log(note)
    history, bad_in_a_row = [], 0
    try:
        with PreemptionGuard() as guard, jax.set_mesh(parts.layout.mesh), \
                sharding_lib.logical_rules(parts.layout.rules):
            for step in range(start, c.total_steps):
                states, metrics, result = train_step(parts, programs, states, step)
                bad_in_a_row = bad_in_a_row + 1 if metrics["update/skipped"] else 0
                if bad_in_a_row:
                    writer.log(f"step {step}: non-finite loss or gradient, update skipped "
                               f"({bad_in_a_row} in a row)")
                    if bad_in_a_row >= c.rl.max_consecutive_nonfinite:
                        raise TrainingError(
                            f"{bad_in_a_row} consecutive steps with a non-finite loss or "
                            f"gradient (last at step {step}); stopping. The last good "
                            f"checkpoint (step {checkpointer.latest_step()}) is kept in "
                            f"{storage.join(workdir, 'checkpoints')}")
                if c.eval.every and (step + 1) % c.eval.every == 0:
                    metrics.update(stages.evaluate(parts, states, step))
                writer.write(step, metrics)
                history.append({"step": step, **metrics})
                files.log_dialogues(c, workdir, result, step)

                done = step + 1
                stop = guard.should_stop(done)  # agreed by every process
                # A skipped update left the parameters as they were: nothing new to save.
                if not metrics["update/skipped"] or stop:
                    checkpointer.save(done, files.checkpoint_items(states),
                                      files.checkpoint_meta(parts, states, done),
                                      force=done == c.total_steps or stop)
                if stop:
                    writer.log(f"pre-emption signal: saved step {done}, exiting")
                    break
    finally:
        checkpointer.wait()
        checkpointer.close()
        writer.close()
        if files.is_main() and c.log.plots:
            files.write_plots(workdir)
    return Outcome(history, states)


if __name__ == "__main__":
    from rlver_jax import train_cli
    train_cli.run()
