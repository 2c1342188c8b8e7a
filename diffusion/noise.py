"""Where a sampler's randomness comes from: one abstraction, a callable `noise(like)` returning standard normal
noise shaped like `like` (k-diffusion's `noise_sampler`). Each request makes its own from its seed, so no
global RNG is ever involved and a request's noise never depends on what else runs."""

from collections.abc import Callable, Sequence

import torch

Noise = Callable[[torch.Tensor], torch.Tensor]
# Several requests batched together: each keeps its own generator for its own rows. A None generator marks
# alignment padding, which gets zeros.
Sources = Sequence[tuple[torch.Generator | None, int]]


def from_generator(generator: torch.Generator) -> Noise:
    """Successive draws of one request: x_T first, then each noisy step's z, as torch.randn would give them."""
    return lambda like: torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)


def from_sources(sources: Sources) -> Noise:
    """Batched requests: each source draws its own rows, exactly what it would draw alone."""

    def noise(like: torch.Tensor) -> torch.Tensor:
        shape = like.shape[1:]
        return torch.cat(
            [
                torch.randn((rows, *shape), generator=g, device=like.device, dtype=like.dtype)
                if g is not None
                else torch.zeros((rows, *shape), device=like.device, dtype=like.dtype)
                for g, rows in sources
            ]
        )

    return noise


class Tape:
    """Replays noise drawn in advance, one slot per call (a CUDA graph's static buffer, or a block of rows of a
    whole draw); with no buffer it hands out zeros and counts the calls."""

    def __init__(self, slots: torch.Tensor | None = None):
        self.slots, self.calls = slots, 0

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.zeros_like(like) if self.slots is None else self.slots[self.calls - 1, : like.shape[0]]


def forbidden(reason: str) -> Noise:
    """For runs that must be deterministic (e.g. the timestep search): drawing noise is a bug, said loudly."""

    def noise(_like: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(f"a sampler drew noise, but {reason}")

    return noise


def initial_noise(n: int, noise: Noise, device, dtype=torch.float32) -> torch.Tensor:
    """x_T: the first draw of a run's noise, [n, 2]."""
    return noise(torch.empty((n, 2), device=device, dtype=dtype))
