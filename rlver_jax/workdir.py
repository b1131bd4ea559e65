"""What a training run reads and writes in its workdir, around the step.

checkpoints/   Orbax steps: the trained states (`checkpoint_items`) and a JSON meta
               (`checkpoint_meta`: config, model configs, tokenizer, data cursor); `restore`
               resumes from the latest one
metrics.jsonl  one record per step (`open_writer`; TensorBoard / W&B beside it)
config.json    the run's config
dialogues.jsonl  a few dialogues of every step (`env.dialogue_log.write_dialogues`)
plots/         training curves and emotion trajectories (`write_plots`)

Process 0 writes metrics, logs and plots (`log.every_process` also writes each other
process's metrics to metrics.process<N>.jsonl); checkpoints are written by all together.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_collections

from rlver_jax import storage
from rlver_jax.build import Components
from rlver_jax.checkpoint import abstract_like
from rlver_jax.env.dialogue_log import write_dialogues
from rlver_jax.metrics import MetricWriter
from rlver_jax.models import Qwen2Config
from rlver_jax.rl.update import TrainState


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. repeated non-finite updates)."""


def is_main() -> bool:
    return jax.process_index() == 0


def hf_meta(config: Qwen2Config, export_dtype: str) -> dict:
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


def checkpoint_items(states) -> dict:
    items = {"policy_params": states.policy.params, "policy_opt": states.policy.opt_state}
    if states.critic is not None:
        items.update(critic_params=states.critic.params, critic_opt=states.critic.opt_state)
    return items


def checkpoint_meta(parts: Components, states, step: int) -> dict:
    c = parts.config
    meta = {"step": step, "config": c.to_dict(),
            "policy_model": hf_meta(parts.policy.config, parts.policy.export_dtype),
            "tokenizer": parts.tokenizer.spec,
            "policy_update_step": int(states.policy.step),
            "profiles_seen": step * (c.rollout.batch_dialogues // c.rollout.group_size)}
    if states.critic is not None:
        meta["critic_model"] = hf_meta(parts.critic.config, parts.critic.export_dtype)
        meta["critic_update_step"] = int(states.critic.step)
    return json.loads(json.dumps(meta, default=str))


def restore(checkpointer, parts: Components, states):
    """(start step, states, notes): the latest checkpoint's states, or step 0 and `states`
    as they are when there is none. Leaves restore in the targets' dtypes: older
    checkpoints' bf16 masters are cast up (one note each)."""
    step = checkpointer.latest_step()
    if step is None:
        return 0, states, []
    step, items, meta = checkpointer.restore(step, abstract_like(checkpoint_items(states)))
    notes = [master_dtype_note(meta, "policy_model", parts.policy.config)]
    policy = TrainState(step=jnp.int32(meta["policy_update_step"]),
                        params=items["policy_params"], opt_state=items["policy_opt"])
    critic = None
    if states.critic is not None:
        notes.append(master_dtype_note(meta, "critic_model", parts.critic.config))
        critic = TrainState(step=jnp.int32(meta["critic_update_step"]),
                            params=items["critic_params"], opt_state=items["critic_opt"])
    return step, states.replace(policy=policy, critic=critic), [n for n in notes if n]


def open_writer(c: ml_collections.ConfigDict, workdir: str, start: int) -> MetricWriter:
    """The metrics writer of this process, positioned at `start`; process 0 also writes
    config.json."""
    if not is_main():
        return MetricWriter(workdir, c.total_steps, start_step=start, tensorboard=False,
                            progress=False, enabled=c.log.every_process,
                            filename=f"metrics.process{jax.process_index()}.jsonl")
    config = json.loads(json.dumps(c.to_dict(), default=str))
    writer = MetricWriter(workdir, c.total_steps, start_step=start,
                          tensorboard=c.log.tensorboard, progress=c.log.progress,
                          wandb_project=c.log.get("wandb_project", ""),
                          wandb_mode=c.log.get("wandb_mode", "online"), run_config=config)
    storage.write_text(storage.join(workdir, "config.json"),
                       json.dumps(c.to_dict(), indent=2, default=str))
    return writer


def log_dialogues(c: ml_collections.ConfigDict, workdir: str, result, step: int) -> None:
    n = c.log.dialogues_per_step
    if is_main() and n > 0:
        write_dialogues(storage.join(workdir, "dialogues.jsonl"), result.dialogues[:n], step)


def write_plots(workdir: str) -> None:
    from rlver_jax import plots
    from rlver_jax.metrics import read_metrics
    metrics_path = storage.join(workdir, "metrics.jsonl")
    if not storage.path(metrics_path).exists():
        return
    records = read_metrics(metrics_path)
    plot_dir = storage.join(workdir, "plots")
    if records:
        plots.plot_training_curves(records, storage.join(plot_dir, "training_curves.png"))
    log = storage.path(storage.join(workdir, "dialogues.jsonl"))
    if log.exists():
        dialogues = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        last_step = dialogues[-1]["step"] if dialogues else None
        recent = [d for d in dialogues if d["step"] == last_step]
        first = [d for d in dialogues if d["step"] == dialogues[0]["step"]]
        plots.plot_emotion_trajectories(
            first, storage.join(plot_dir, "emotion_first_step.png"),
            title=f"Emotion per turn, step {dialogues[0]['step']}")
        plots.plot_emotion_trajectories(
            recent, storage.join(plot_dir, "emotion_last_step.png"),
            title=f"Emotion per turn, step {last_step}")
