"""The dialogue environment: user profiles, the user simulator and the dialogue rollout.

`profiles` reads RLVER / SAGE profile jsonl and holds the profile sets shipped with the
package; `tfds_profiles` turns profile files into a TFDS (array_record) dataset.

The simulated user is pure Python, one concern per module, all re-exported by `simulator`:
`sim_settings` (SimulatorSettings, presets, levels, SUCCESS_EMOTION / FAILURE_EMOTION),
`emotion` (the emotion state machine), `sim_prompts` and `templates` (prompts; the wording is
in `prompts/*.txt`), `sim_parse` (parsers) and `policy_prompt` (the policy's chat and think
tags). `rule_judge` (with its word lists in `rule_lexicons`) is the toy rule-based user; `users`
and `rollout` run dialogues.
"""
