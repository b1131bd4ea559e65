"""rl/batching.py: samples -> right-padded arrays, bucketed rows and columns."""

import numpy as np
import pytest

from rlver_jax.env.rollout import Sample
from rlver_jax.rl.batching import collate, pad, padded_rows


def samples():
    return [
        Sample("a", 0, tokens=[5, 6, 7, 8, 9], loss_mask=[0, 0, 1, 1, 0],
               logprobs=[0, 0, -1.0, -2.0, 0], raw_logprobs=[0, 0, -1.5, -2.5, 0], reward=0.7),
        Sample("b", 0, tokens=list(range(10, 30)), loss_mask=[0] * 5 + [1] * 3 + [0] * 4
               + [1] * 8, logprobs=[0.0] * 20, raw_logprobs=[0.0] * 20, reward=0.2),
        Sample("b", 0, tokens=[4, 4], loss_mask=[0, 1], logprobs=[0.0] * 2,
               raw_logprobs=[0.0] * 2, reward=0.2),     # a second turn of dialogue b
        Sample("c", 3, tokens=[1, 2, 3], loss_mask=[0, 0, 0], logprobs=[0.0] * 3,
               raw_logprobs=[0.0] * 3, reward=0.5),
    ]


def test_collate_shapes_padding_and_rewards():
    s = samples()
    out = collate(s, pad_id=99)
    assert out["tokens"].shape == (4, 32)  # longest 20 -> next power of two
    for key in ("attention_mask", "loss_mask", "sampler_raw_logprobs", "rewards"):
        assert out[key].shape == (4, 32)
    assert "sampler_logprobs" not in out   # the filtered log-probs: nothing reads them
    assert out["tokens"].dtype == np.int32 and out["rewards"].dtype == np.float32
    np.testing.assert_array_equal(out["tokens"][0], [5, 6, 7, 8, 9] + [99] * 27)
    np.testing.assert_array_equal(out["attention_mask"].sum(1), [5, 20, 2, 3])
    np.testing.assert_array_equal(out["loss_mask"][1, :20], s[1].loss_mask)
    assert out["loss_mask"][:, 20:].sum() == 0
    np.testing.assert_allclose(out["sampler_raw_logprobs"][0, :5], [0, 0, -1.5, -2.5, 0])
    # The reward sits on the last policy token only (not on the trailing non-policy token).
    expected = np.zeros((4, 32), np.float32)
    expected[0, 3], expected[1, 19], expected[2, 1] = 0.7, 0.2, 0.2
    np.testing.assert_allclose(out["rewards"], expected)
    np.testing.assert_allclose(out["scores"], [0.7, 0.2, 0.2, 0.5])
    np.testing.assert_array_equal(out["group_ids"], [0, 0, 0, 3])
    np.testing.assert_array_equal(out["dialogue_ids"], [0, 1, 1, 2])  # dense, by dialogue
    # Widths are powers of two, at least `length_multiple`.
    assert collate(s[:1], pad_id=0)["tokens"].shape == (1, 16)
    assert collate(s[:1], pad_id=0, length_multiple=64)["tokens"].shape == (1, 64)
    with pytest.raises(ValueError, match="max_length"):
        collate(s, pad_id=0, max_length=16)


@pytest.mark.parametrize("rows,split,expected", [(3, 1, 4), (4, 1, 4), (5, 1, 8), (3, 8, 8),
                                                 (9, 6, 18), (1, 1, 1)])
def test_padded_rows_is_a_power_of_two_divisible_by_the_split(rows, split, expected):
    assert padded_rows(rows, split) == expected


def test_pad_adds_empty_rows_and_agreed_columns():
    out = collate(samples(), pad_id=99)
    padded = pad(out, split=1, agree=lambda n: n + 16 if n == 32 else n)  # another host: 48
    assert padded["tokens"].shape == (4, 48) and padded["scores"].shape == (4,)
    padded = pad(out, split=3)
    assert padded["tokens"].shape == (6, 32)
    np.testing.assert_array_equal(padded["tokens"][:4], out["tokens"])
    for key in ("tokens", "attention_mask", "loss_mask", "rewards", "scores"):
        assert not padded[key][4:].any(), key
    # Padding rows belong to no dialogue: the advantage estimators skip them.
    np.testing.assert_array_equal(padded["dialogue_ids"], [0, 1, 1, 2, -1, -1])
