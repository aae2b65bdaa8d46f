"""Relation Networks (Sung et al., CVPR 2018): ``task.algorithm=relationnet``.

A learned relation module scores the concatenated feature maps of a query and a class
(use ``model.options.pooling=flatten`` so the embedding is the map; a GAP embedding gives
``K x 1 x 1`` maps). Reference: the class feature map (mean support embedding read as
``K x h x w``). Explained similarity and causal score: the relation module itself, which
is saved as the sidecar (``relation.*`` tensors, ``feature_shape`` and ``hidden``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from experiments.embedding import gather
from experiments.tasks.fewshot.algorithm import FewShotAlgorithm, register_algorithm, split_episode
from experiments.tasks.fewshot.episodes import EpisodeClassifier
from experiments.training.base import TaskModule
from fam.errors import FamBenchError
from fam.layers import capture_layer, eval_mode, model_device, resolve_target_layer


@register_algorithm
class RelationNet(FewShotAlgorithm):
    """Relation Networks (module docstring); ``task.relation_hidden`` sets the channels of
    the relation module's conv blocks."""

    name = "relationnet"
    similarity_name = "relation_score"
    nonnegative_similarity = True
    score_label = "relation score (the relation module's output)"
    requires_task_state = True  # type: ignore[assignment]
    options = ("relation_hidden",)

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.relation: nn.Module | None = None

    def training_module(self, model, train_set, optim):
        shape = feature_shape(model, train_set)
        self.relation = RelationModule(shape, self.config.relation_hidden)
        return self._episode_module(RelationNetModule, model, relation=self.relation, **optim)

    def task_state(self, module):
        state = {
            f"relation.{k}": v.detach().cpu().clone()
            for k, v in module.relation.state_dict().items()
        }
        state["feature_shape"] = torch.tensor(module.relation.feature_shape)
        state["hidden"] = torch.tensor([module.relation.hidden, module.relation.fc_hidden])
        return state

    def load_task_state(self, state):
        hidden, fc_hidden = (int(v) for v in state["hidden"])
        relation = RelationModule(state["feature_shape"].tolist(), hidden, fc_hidden)
        prefix = "relation."
        relation.load_state_dict(
            {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        )
        self.relation = relation.eval()

    def _relation(self) -> nn.Module:
        if self.relation is None:
            raise FamBenchError(
                "relationnet has no relation module: train the model, or give the checkpoint "
                "together with its sidecar <checkpoint>.task.pt."
            )
        return self.relation

    def to(self, device):
        self._relation().to(device).eval()
        return self

    def classifier(self, support, n_way, n_shot):
        relation = self._relation()
        classes = support.view(n_way, n_shot, -1).mean(1)
        return EpisodeClassifier(classes, relation, lambda emb: relation.pairwise(emb, classes))

    def accuracy(self, model, dataset, sampler, train_set=None):
        relation = self._relation()
        with eval_mode(relation):  # the monitor runs mid-training
            return super().accuracy(model, dataset, sampler, train_set)


def feature_shape(model: nn.Module, dataset: Any) -> tuple[int, int, int]:
    """``(K, h, w)`` of the embedding read as the default target layer's map: ``D = K*h*w``
    (flatten) or ``D = K`` (GAP, read as ``K x 1 x 1``)."""
    layer = resolve_target_layer(model, None)
    images = gather(dataset, [0, 1]).to(model_device(model) or "cpu")
    with torch.no_grad(), eval_mode(model), capture_layer(layer, model=model) as cap:
        emb = model(images)
    k, h, w = cap.activations.shape[1:]
    if emb.shape[1] == k * h * w:
        return int(k), int(h), int(w)
    if emb.shape[1] == k:
        return int(k), 1, 1
    raise FamBenchError(
        f"relationnet reads the embedding as the target layer's feature map {(k, h, w)}, "
        f"but the model returns {emb.shape[1]} dimensions; use a model whose embedding is "
        "the flatten (model.options.pooling=flatten) or GAP of its last block."
    )


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
    """Relation Networks' learned similarity, a callable ``(emb (N, D), ref (N, D)) ->
    (N,)`` relation scores in ``(0, 1)``.

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
