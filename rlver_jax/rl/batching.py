"""Samples -> the train batch: collate (right-pad into [B, T] arrays), bucket and pad.

Shapes are bucketed so that the scoring and update programs compile for few shapes:
T is a power of two (at least `length_multiple`), and B a power of two divisible by the
update's split (mini-batches x micro-batch size). Padding rows and columns are all zero:
their masks are 0, so no loss, advantage or metric reads them.

Multi-host: each process collates its own samples; `pad` then takes the largest row and
column counts any process needs (`agree`), so every process hands the same shape to the
global batch.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from rlver_jax.sampling import next_power_of_two

# The per-row fields ([B]); every other field is per token ([B, T]).
ROW_FIELDS = ("scores", "group_ids", "dialogue_ids")


def collate(samples: Sequence, pad_id: int, length_multiple: int = 16,
            max_length: int | None = None) -> dict[str, np.ndarray]:
    """Right-padded numpy arrays of a list of samples (`env.rollout.Sample`).

    Per token [B, T]: tokens, attention_mask, loss_mask, sampler_raw_logprobs (the
    sampler's log-probs of the untruncated distribution, what the trainer's log-probs are
    compared with), rewards (the sample's reward on its last policy token). Per row [B]:
    scores (the sample's reward), group_ids (the sample's GRPO group), dialogue_ids (a
    dense index of the sample's dialogue: in think mode a dialogue has a sample per turn).
    """
    longest = max((len(s.tokens) for s in samples), default=1)
    width = next_power_of_two(longest, length_multiple)
    if max_length is not None and longest > max_length:
        raise ValueError(f"sample of {longest} tokens exceeds max_length={max_length}")
    b = len(samples)
    out = {
        "tokens": np.full((b, width), pad_id, np.int32),
        "attention_mask": np.zeros((b, width), np.int32),
        "loss_mask": np.zeros((b, width), np.int32),
        "sampler_raw_logprobs": np.zeros((b, width), np.float32),
        "rewards": np.zeros((b, width), np.float32),
        "scores": np.zeros((b,), np.float32),
        "group_ids": np.zeros((b,), np.int32),
        "dialogue_ids": np.zeros((b,), np.int32),
    }
    dialogue_index: dict[str, int] = {}
    for i, s in enumerate(samples):
        n = len(s.tokens)
        out["tokens"][i, :n] = s.tokens
        out["attention_mask"][i, :n] = 1
        out["loss_mask"][i, :n] = s.loss_mask
        out["sampler_raw_logprobs"][i, :n] = s.raw_logprobs
        policy_positions = np.flatnonzero(np.asarray(s.loss_mask))
        if len(policy_positions):
            out["rewards"][i, policy_positions[-1]] = s.reward
        out["scores"][i] = s.reward
        out["group_ids"][i] = s.group_id
        out["dialogue_ids"][i] = dialogue_index.setdefault(s.dialogue_id, len(dialogue_index))
    return out


def padded_rows(rows: int, split: int) -> int:
    """The bucketed row count: a power of two, at least `split` and divisible by it."""
    n = max(next_power_of_two(rows), split)
    return -(-n // split) * split


def pad(arrays: dict[str, np.ndarray], split: int, agree: Callable[[int], int] = int
        ) -> dict[str, np.ndarray]:
    """Pads collated arrays with empty rows (and columns) to the bucketed shape.

    `split` is what the row count must divide into (mini-batches x micro-batch size);
    `agree` maps a local count to the one every process uses (the maximum over
    processes; the identity in a single process). Padding rows get dialogue id -1.
    """
    rows, width = arrays["tokens"].shape
    n_rows = padded_rows(agree(rows), split)
    n_width = agree(width)
    out = {}
    for key, value in arrays.items():
        widths = [(0, n_rows - rows)] + [(0, n_width - width)] * (value.ndim - 1)
        out[key] = np.pad(value, widths, constant_values=-1 if key == "dialogue_ids" else 0)
    return out
