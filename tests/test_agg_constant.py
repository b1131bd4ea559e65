"""`rl.agg_constant`: the C of the `*-norm` aggregation modes (issue #17, item 5)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from rlver_jax.rl import losses
from rlver_jax.config_checks import ConfigError, agg_constant, validate_config


def test_default_is_the_configured_maximum_response_length():
    c = base.get_config()
    assert c.rl.agg_constant == 0
    c.rollout.think, c.rollout.max_turn_tokens, c.rollout.max_dialogue_tokens = True, 96, 640
    assert agg_constant(c) == 96.0        # think: one sample is one turn
    c.rollout.think = False
    assert agg_constant(c) == 640.0       # no-think: one sample is the whole dialogue
    c.rl.agg_constant = 50
    assert agg_constant(c) == 50.0
    c.rl.agg_constant = -1
    with pytest.raises(ConfigError, match="rl.agg_constant"):
        validate_config(c)


@pytest.mark.parametrize("width", [4, 8])
def test_norm_mode_does_not_depend_on_the_padded_width(width):
    """Two sequences with token losses (1, 2, 3) and (4): Dr.GRPO's value with C = 6 is
    mean over sequences of (sum / C) = (6/6 + 4/6) / 2, however wide the batch is padded."""
    c = base.get_config()
    c.rollout.think, c.rollout.max_turn_tokens = True, 6
    x = np.full((2, width), 9.0, np.float32)
    x[0, :3], x[1, :1] = (1.0, 2.0, 3.0), 4.0
    mask = np.zeros((2, width), np.int32)
    mask[0, :3], mask[1, :1] = 1, 1
    term = losses.aggregate(jnp.asarray(x), jnp.asarray(mask), "seq-mean-token-sum-norm",
                            constant_normaliser=agg_constant(c))
    assert float(term.value()) == pytest.approx((6.0 / 6 + 4.0 / 6) / 2)


def test_the_builder_passes_it_to_the_update_step():
    from rlver_jax.build import update_settings
    c = base.get_config()
    c.rl.agg_mode, c.rollout.think, c.rollout.max_turn_tokens = "seq-mean-token-sum-norm", True, 77
    settings = update_settings(c)
    assert settings.agg_mode == "seq-mean-token-sum-norm"
    assert settings.constant_normaliser == 77.0
