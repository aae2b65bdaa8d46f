"""Few-shot algorithms beyond ProtoNet: Matching Networks, Relation Networks, SimpleShot.

Each trains ``self.model`` (the explained embedding network); what it learns beside the
network (a temperature, a relation module) lives on the task module and is saved next to
the cached weights as the task family's sidecar (see ``experiments/training/train.py``).
Episode batches are laid out as for :class:`~experiments.training.fewshot.ProtoNetModule`:
``W*S`` support images then ``W*Q`` queries, each class-major.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from experiments.training.base import TaskModule
from fam.errors import FamBenchError


def split_episode(emb: Tensor, n_way: int, n_shot: int, n_query: int) -> tuple[Tensor, Tensor]:
    """``(W*(S+Q), D) -> support (W*S, D), query (W*Q, D)``; a wrong size is an error."""
    n_support = n_way * n_shot
    if emb.shape[0] != n_support + n_way * n_query:
        raise FamBenchError(
            f"Episode batch has {emb.shape[0]} images; {n_way}-way {n_shot}-shot "
            f"{n_query}-query needs {n_support + n_way * n_query}."
        )
    return emb[:n_support], emb[n_support:]


def matching_probabilities(
    query: Tensor, support: Tensor, n_way: int, temperature: Tensor | float
) -> Tensor:
    """Matching Networks' class probabilities ``(Q, D), (W*S, D) -> (Q, W)``.

    Attention ``a_i = softmax_i(tau * cos(q, s_i))`` over the individual support
    embeddings (class-major), summed per class: ``P(c | q) = sum_{i in c} a_i``.
    """
    cos = F.cosine_similarity(query[:, None], support[None], dim=-1, eps=1e-8)
    attention = torch.softmax(temperature * cos, dim=1)
    return attention.view(len(query), n_way, -1).sum(-1)


class MatchingNetModule(TaskModule):
    """Matching Networks (Vinyals et al., NeurIPS 2016) without full-context embeddings.

    Loss: NLL of ``P(true class | query)`` (:func:`matching_probabilities`). The cosine
    attention is sharpened by ``tau``: learned as a log-parameter starting at 10 when
    ``temperature=None`` (like ProtoNet's cosine variant), else fixed.
    """

    def __init__(
        self,
        model: nn.Module,
        n_way: int,
        n_shot: int,
        n_query: int,
        temperature: float | None = None,
        **optim,
    ) -> None:
        super().__init__(model, **optim)
        self.n_way, self.n_shot, self.n_query = n_way, n_shot, n_query
        log_tau = torch.tensor(math.log(10.0 if temperature is None else temperature))
        if temperature is None:
            self.log_temperature = nn.Parameter(log_tau)
        else:
            self.register_buffer("log_temperature", log_tau)

    def loss(self, images: Tensor) -> Tensor:
        emb = self.model(self.images(images)).float()
        support, query = split_episode(emb, self.n_way, self.n_shot, self.n_query)
        probs = matching_probabilities(query, support, self.n_way, self.log_temperature.exp())
        target = torch.arange(self.n_way, device=emb.device).repeat_interleave(self.n_query)
        return F.nll_loss(probs.clamp_min(1e-12).log(), target)


def _relation_block(in_channels: int, out_channels: int, pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2, ceil_mode=True))
    return nn.Sequential(*layers)


class RelationModule(nn.Module):
    """Relation Networks' learned similarity (Sung et al., CVPR 2018), a callable
    ``(emb (N, D), ref (N, D)) -> (N,)`` relation scores in ``(0, 1)``.

    Both arguments are embeddings of the explained network, read as feature maps
    ``feature_shape = (K, h, w)`` (``D = K*h*w``: the network's ``flatten`` pooling; a GAP
    embedding is read as ``K x 1 x 1``). The maps are concatenated along channels and
    scored by two conv-BN-ReLU blocks (each max-pooled while the map is at least 2 px)
    and two linear layers with a sigmoid, the paper's module.
    """

    def __init__(self, feature_shape: Sequence[int], hidden: int = 64, fc_hidden: int = 8):
        super().__init__()
        k, h, w = (int(v) for v in feature_shape)
        self.feature_shape = (k, h, w)
        self.hidden, self.fc_hidden = int(hidden), int(fc_hidden)
        pool1 = min(h, w) >= 2
        h1, w1 = (math.ceil(h / 2), math.ceil(w / 2)) if pool1 else (h, w)
        pool2 = min(h1, w1) >= 2
        h2, w2 = (math.ceil(h1 / 2), math.ceil(w1 / 2)) if pool2 else (h1, w1)
        self.blocks = nn.Sequential(
            _relation_block(2 * k, hidden, pool1), _relation_block(hidden, hidden, pool2)
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(hidden * h2 * w2, fc_hidden), nn.ReLU(), nn.Linear(fc_hidden, 1)
        )

    def forward(self, emb: Tensor, ref: Tensor) -> Tensor:
        shape = (-1, *self.feature_shape)
        pair = torch.cat([emb.reshape(shape), ref.reshape(shape).to(emb.dtype)], dim=1)
        return torch.sigmoid(self.head(self.blocks(pair))[:, 0])

    def pairwise(self, query: Tensor, refs: Tensor) -> Tensor:
        """Relation score of every query to every class feature: ``(Q, D), (W, D) -> (Q, W)``."""
        q, w = len(query), len(refs)
        return self(query.repeat_interleave(w, 0), refs.repeat(q, 1)).view(q, w)


class RelationNetModule(TaskModule):
    """Relation Networks trained episodically with the paper's MSE to one-hot targets.

    A class's feature is the mean of its support embeddings (the paper sums them; the
    mean keeps the scale the same for any number of shots). ``relation`` (a
    :class:`RelationModule`) is trained with the network and saved as the sidecar.
    """

    def __init__(
        self,
        model: nn.Module,
        n_way: int,
        n_shot: int,
        n_query: int,
        relation: RelationModule,
        **optim,
    ) -> None:
        super().__init__(model, **optim)
        self.n_way, self.n_shot, self.n_query = n_way, n_shot, n_query
        self.relation = relation

    def loss(self, images: Tensor) -> Tensor:
        emb = self.model(self.images(images)).float()
        support, query = split_episode(emb, self.n_way, self.n_shot, self.n_query)
        classes = support.view(self.n_way, self.n_shot, -1).mean(1)
        scores = self.relation.pairwise(query, classes)
        target = torch.arange(self.n_way, device=emb.device).repeat_interleave(self.n_query)
        return F.mse_loss(scores, F.one_hot(target, self.n_way).to(scores.dtype))


class SimpleShotModule(TaskModule):
    """SimpleShot (Wang et al., 2019): the network is trained as a plain classifier of the
    training classes (linear head, cross-entropy on class-balanced batches); the head is
    training-only. Few-shot inference is nearest centroid on CL2N features (see
    ``experiments.tasks.fewshot_algorithms``)."""

    def __init__(self, model: nn.Module, embedding_dim: int, num_classes: int, **optim) -> None:
        super().__init__(model, **optim)
        self.head = nn.Linear(embedding_dim, num_classes)

    def loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        images, labels = batch
        return F.cross_entropy(self.head(self.model(self.images(images)).float()), labels)
