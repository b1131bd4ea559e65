"""The paper's ablation grid: --config=configs/rlver.py:ALGO,THINK,DIFFICULTY,POLICY[,SIM]

  ALGO        ppo | grpo
  THINK       think | nothink
  DIFFICULTY  sage | hard | strict
  POLICY      a policy preset: qwen2.5-0.5b | qwen2.5-1.5b | qwen2.5-3b | qwen2.5-7b
  SIM         the simulator preset (default qwen2.5-7b; e.g. qwen2.5-72b)

Example: --config=configs/rlver.py:grpo,think,hard,qwen2.5-7b,qwen2.5-72b
  --config.policy.hf_dir=/models/Qwen2.5-7B-Instruct
  --config.simulator.hf_dir=/models/Qwen2.5-72B-Instruct
"""

from configs import base

ALGOS = ("ppo", "grpo")
THINK = {"think": True, "nothink": False}
DIFFICULTIES = ("sage", "hard", "strict")
POLICIES = ("qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b", "qwen2.5-7b")


def get_config(arg: str = "ppo,think,hard,qwen2.5-7b"):
    parts = [p.strip() for p in arg.split(",")]
    if len(parts) not in (4, 5):
        raise ValueError(f"configs/rlver.py: expected ALGO,THINK,DIFFICULTY,POLICY[,SIM], "
                         f"got {arg!r}")
    algo, think, difficulty, policy = parts[:4]
    for name, value, allowed in (("ALGO", algo, ALGOS), ("THINK", think, tuple(THINK)),
                                 ("DIFFICULTY", difficulty, DIFFICULTIES),
                                 ("POLICY", policy, POLICIES)):
        if value not in allowed:
            raise ValueError(f"configs/rlver.py: {name}={value!r}, expected one of {allowed}")
    c = base.get_config()
    c.rl.algorithm = algo
    c.rollout.think = THINK[think]
    c.simulator.difficulty = difficulty
    c.policy.preset = policy
    if len(parts) == 5:
        c.simulator.preset = parts[4]
    if algo == "grpo":
        # RLVER's GRPO: 4 rollouts per profile sharing the profile and opening; no critic.
        c.rollout.group_size = 4
    return c
