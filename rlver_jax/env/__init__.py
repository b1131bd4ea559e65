"""The dialogue environment: user profiles, the user simulator and the dialogue rollout.

`profiles` reads RLVER / SAGE profile jsonl and holds the profile sets shipped with the
package; `tfds_profiles` turns profile files into a TFDS (array_record) dataset.
"""
