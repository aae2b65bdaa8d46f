"""Counter-based seeds: one independent torch generator per (seed, ...) tuple.

Everything random in the data package draws from a generator seeded by
:func:`derive_seed` of the identifying integers (dataset seed, class, index, episode...),
never from the global RNG, so any item or episode can be regenerated on its own, in any
order, in any process.
"""

from __future__ import annotations

from enum import IntEnum

import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part and on their order."""
    state = 0x6A09E667F3BCC909
    for part in parts:
        state = _splitmix64(state ^ (int(part) & _MASK64))
    return state >> 1


def generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded from ``derive_seed(*parts)``."""
    return torch.Generator().manual_seed(derive_seed(*parts))


class Stream(IntEnum):
    """Named seed streams: ``derive_seed(seed, Stream.X, ...)`` keeps the draws of one
    purpose independent of every other's (values fixed: they define published runs)."""

    EPISODE = 3  # which classes and images make few-shot episode e
    QUERY_ORDER = 7  # which test queries a contrastive / retrieval run explains
    UNIT = 11  # torch's global RNG at the start of each evaluation unit
    EXPLAINER = 13  # methods with their own RNG (random maps), per unit
    TIES = 17  # the random order of tied pixels in deletion / insertion, per unit
