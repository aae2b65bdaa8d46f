"""N-way K-shot Q-query episodes, each a pure function of ``(seed, episode)``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from experiments.data.seeding import Stream, generator
from fam.errors import FamBenchError


@dataclass(frozen=True)
class Episode:
    """One few-shot episode.

    Attributes:
        classes: ``(n_way,)`` dataset labels; the episode label of a class is its
            position in ``classes``.
        support: ``(n_way * n_shot,)`` dataset indices, class-major (the ``n_shot`` images
            of ``classes[0]`` first).
        query: ``(n_way * n_query,)`` dataset indices, class-major.
    """

    classes: Tensor
    support: Tensor
    query: Tensor

    @property
    def n_way(self) -> int:
        return len(self.classes)

    @property
    def indices(self) -> Tensor:
        """``(n_way * (n_shot + n_query),)`` dataset indices: support then query."""
        return torch.cat([self.support, self.query])

    @property
    def support_labels(self) -> Tensor:
        """``(n_way * n_shot,)`` episode labels ``0..n_way-1`` of the support images."""
        return torch.arange(self.n_way).repeat_interleave(len(self.support) // self.n_way)

    @property
    def query_labels(self) -> Tensor:
        """``(n_way * n_query,)`` episode labels of the query images."""
        return torch.arange(self.n_way).repeat_interleave(len(self.query) // self.n_way)


class EpisodeSampler:
    """Samples few-shot episodes from a dataset's labels.

    Episode ``e`` draws from a generator seeded by ``(seed, e)`` alone (never the global
    RNG), so it is the same in every process and after every restart, and any episode can
    be regenerated on its own (resume, sharding over devices). Iterating yields episodes
    ``0 .. num_episodes - 1``.

    Args:
        labels: ``(N,)`` dataset label of each index (tensor, array or list of ints).
        n_way, n_shot, n_query: episode shape; every class of ``labels`` must have at least
            ``n_shot + n_query`` images.
        num_episodes: length of the sampler.
        seed: the episode seed.
    """

    def __init__(
        self,
        labels: Sequence[int] | Tensor,
        n_way: int,
        n_shot: int,
        n_query: int,
        num_episodes: int,
        seed: int = 0,
    ) -> None:
        labels = torch.as_tensor(labels, dtype=torch.long).flatten()
        for name, value, least in (
            ("n_way", n_way, 1),
            ("n_shot", n_shot, 1),
            ("n_query", n_query, 0),
            ("num_episodes", num_episodes, 0),
        ):
            if int(value) < least:
                raise FamBenchError(f"EpisodeSampler needs {name} >= {least}, got {value}.")
        self.classes, counts = torch.unique(labels, return_counts=True)
        if n_way > len(self.classes):
            raise FamBenchError(
                f"EpisodeSampler: n_way={n_way} but the dataset has only {len(self.classes)} "
                f"classes; lower n_way or use a split with more classes."
            )
        needed = n_shot + n_query
        short = counts < needed
        if bool(short.any()):
            label = int(self.classes[short][0])
            raise FamBenchError(
                f"EpisodeSampler: class {label} has {int(counts[short][0])} images but a "
                f"{n_way}-way {n_shot}-shot {n_query}-query episode needs n_shot + n_query = "
                f"{needed} per class ({int(short.sum())} class(es) too small); lower n_shot or "
                f"n_query, or add images."
            )
        order = torch.argsort(labels, stable=True)
        # Indices of each class in dataset order, as rows of a ragged list.
        self._members = list(torch.split(order, counts.tolist()))
        self.n_way, self.n_shot, self.n_query = int(n_way), int(n_shot), int(n_query)
        self.num_episodes = int(num_episodes)
        self.seed = int(seed)

    def __len__(self) -> int:
        return self.num_episodes

    def episode(self, e: int) -> Episode:
        """Episode ``e`` (any non-negative integer, also beyond ``num_episodes``)."""
        g = generator(self.seed, Stream.EPISODE, e)
        chosen = torch.randperm(len(self.classes), generator=g)[: self.n_way]
        support, query = [], []
        for c in chosen.tolist():
            members = self._members[c]
            picked = members[
                torch.randperm(len(members), generator=g)[: self.n_shot + self.n_query]
            ]
            support.append(picked[: self.n_shot])
            query.append(picked[self.n_shot :])
        return Episode(
            classes=self.classes[chosen], support=torch.cat(support), query=torch.cat(query)
        )

    def __iter__(self) -> Iterator[Episode]:
        return (self.episode(e) for e in range(self.num_episodes))
