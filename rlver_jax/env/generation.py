"""What the dialogue rollout and the simulated user need from a generator.

`rlver_jax.sampling.Sampler` is the implementation; tests pass scripted stand-ins. env/
sees only this interface, so it never reaches into the sampler or the process layout: a
generator on a mesh that spans processes answers `any_process` collectively, so that every
process keeps making the same calls until no process has work left.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence


class Generator(Protocol):
    """Batched generation with per-row KV state (see `Sampler.generate`)."""

    multiprocess: bool

    def generate(self, model: Any, prompts: Sequence[Sequence[int] | None],
                 max_new_tokens: int, **sampling: Any) -> Any: ...

    def any_process(self, flag: bool) -> bool: ...


def any_process_of(generator: Any):
    """`generator.any_process`, or plain `bool` for a stand-in without one (one process)."""
    return getattr(generator, "any_process", bool)
