"""The random streams of a run, by name: every random draw of a run comes from a seed of (run seed, stream, counters),
so that a resumed run draws what an uninterrupted one would, and N processes draw what one process does.

=================  =====================================================================================  ==========
stream             what it draws                                                                         counters
=================  =====================================================================================  ==========
``EPOCH_ORDER``    the data order of an epoch: one permutation of the data set (``epoch_order``)          epoch
``STEP_DRAWS``     a step's draws for the whole global batch: the objective's (t, noise, a policy's       step
                   uniforms), then the crops and flips
``PCA_PATCHES``    the patches the l-DAE's PCA fit samples, per process                                   rank
``EVAL_NOISE``     the noise of ``noisy_input`` features in evaluation, per process                       rank
=================  =====================================================================================  ==========
"""
from enum import IntEnum
from typing import Union

import torch

__all__ = ['Stream', 'seed_of', 'generator', 'epoch_order']

_MASK = (1 << 63) - 1
_U64 = (1 << 64) - 1


class Stream(IntEnum):
    EPOCH_ORDER = 1
    STEP_DRAWS = 2
    PCA_PATCHES = 3
    EVAL_NOISE = 4


def seed_of(seed: int, stream: Stream, *counters: int) -> int:
    """A 63-bit seed from (run seed, stream, counters...) by splitmix64-style mixing (counter-based: no state)."""
    x = seed & _MASK
    for i, c in enumerate((int(stream), *counters)):
        x = (x + (c + 1) * (0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019 * i)) & _U64
        x ^= x >> 30
        x = (x * 0xBF58476D1CE4E5B9) & _U64
        x ^= x >> 27
        x = (x * 0x94D049BB133111EB) & _U64
        x ^= x >> 31
    return x & _MASK


def generator(seed: int, stream: Stream, *counters: int, device: Union[str, torch.device] = 'cpu') -> torch.Generator:
    """A generator on ``device`` seeded by ``seed_of(seed, stream, *counters)``."""
    return torch.Generator(device).manual_seed(seed_of(seed, stream, *counters))


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the data set in ``epoch`` (a permutation of n, on the CPU: a 1.28M permutation costs ~50 ms)."""
    return torch.randperm(n, generator=generator(seed, Stream.EPOCH_ORDER, epoch))
