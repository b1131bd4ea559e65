"""`python -m rlver_jax.evaluate`'s config: the SAGE / Sentient protocol against the TOY rule
judge unless a simulator LLM is named. Every field can be overridden on the command line,
e.g. `--config.simulator.hf_dir=Qwen/Qwen2.5-72B-Instruct --config.rollout.think=false`;
an unknown key is an error that names it.

The simulator section is the training config's (configs/base.py: the same keys, knobs and
sampling defaults) with evaluation defaults: the `sage` difficulty, the simulator kind
chosen from what is given, weights in the dtype they were saved in. Where the policy comes
from and where the report goes are flags (`--workdir DIR [--step N] | --hf_model DIR`,
`--profiles FILE`, `--out DIR`).
"""

import ml_collections
from ml_collections.config_dict import placeholder

from configs import base


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0                          # seed of the policy's sampling and the simulator
    c.max_dialogues = 0                 # evaluate the first N profiles (0: all)
    c.batch_size = 0                    # dialogues per batched rollout (0: all at once)
    # Policy tokenizer: empty takes the checkpoint's, or the HF model directory's.
    c.tokenizer = ""

    c.policy = ml_collections.ConfigDict()
    c.policy.dtype = ""                 # weight dtype; empty: as trained / saved

    c.rollout = ml_collections.ConfigDict()
    c.rollout.think = placeholder(bool)           # None: the training config's, else False
    c.rollout.max_turn_tokens = 0       # policy tokens per reply; 0: the training config's
    c.rollout.max_dialogue_tokens = 0   # policy context cap; 0: the model's max positions
    c.rollout.temperature = 0.0         # 0: greedy
    c.rollout.top_p = 1.0

    c.simulator = base.get_config().simulator
    # "auto": "llm" when simulator.hf_dir or simulator.preset is given, else the TOY "rule"
    # judge (lexicon scoring, template replies).
    c.simulator.kind = "auto"
    c.simulator.preset = ""             # a random-weight simulator of this preset (smoke tests)
    c.simulator.dtype = ""              # empty: as saved
    # Empty: the simulator directory's tokenizer when it holds one, else the policy's.
    c.simulator.tokenizer = ""
    c.simulator.difficulty = "sage"     # sage | hard | strict

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = placeholder(tuple)   # None: one device; e.g. (1, -1, 1) loads sharded
    c.mesh.rules = "fsdp_tensor"        # rlver_jax.sharding.RULE_PRESETS
    c.mesh.sampling_rules = "fsdp_tensor"  # the simulator's layout (as loaded for evaluation)
    return c
