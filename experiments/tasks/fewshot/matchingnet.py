"""Matching Networks (Vinyals et al., NeurIPS 2016): ``task.algorithm=matchingnet``.

Cosine attention over the individual support embeddings, without full-context
embeddings; ``task.temperature`` null = learned (from 10, saved in the sidecar).
Reference: the class key (mean support embedding) naming the class. Explained
similarity and causal score: ``P(c | x)``, the attention summed over class ``c``.

The score of class ``c`` depends on every individual support embedding of the episode,
which an ``(N, D)`` reference cannot hold: the episode's support set lives in the
similarity callable (:class:`MatchingScore`), and the reference only names the explained
class (exactly one of the episode's class keys; anything else is an error). Its
randomisation sanity check therefore keeps the trained support set (the explained class
is held fixed).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from experiments.tasks.fewshot.algorithm import FewShotAlgorithm, register_algorithm, split_episode
from experiments.tasks.fewshot.episodes import EpisodeClassifier
from experiments.training.base import TaskModule
from fam.errors import FamBenchError


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


class MatchingScore:
    """Matching Networks' class probability as a similarity callable.

    ``__call__(emb (N, D), ref (N, D)) -> (N,)``: ``P(c | emb)`` of the class ``c`` whose
    key (``keys (W, D)``, the mean support embeddings) equals ``ref``; the attention runs
    over ``support (W*S, D)`` (class-major) at temperature ``tau``.
    """

    def __init__(self, support: Tensor, keys: Tensor, tau: float) -> None:
        self.support, self.keys, self.tau = support, keys, tau

    def probabilities(self, emb: Tensor) -> Tensor:
        return matching_probabilities(emb, self.support.to(emb.dtype), len(self.keys), self.tau)

    def class_of(self, ref: Tensor) -> Tensor:
        keys = self.keys.to(ref.dtype)
        gap = (ref[:, None] - keys[None]).abs().amax(-1)  # (N, W)
        best, index = gap.min(1)
        scale = keys.abs().amax().clamp_min(1e-12)
        if bool((best > 1e-5 * scale).any()):
            raise FamBenchError(
                "A matchingnet reference must be one of the episode's class keys (the mean "
                "support embedding of the explained class); the support set itself lives in "
                "the similarity callable."
            )
        return index

    def __call__(self, emb: Tensor, ref: Tensor) -> Tensor:
        probs = self.probabilities(emb)
        return probs.gather(1, self.class_of(ref)[:, None])[:, 0]


@register_algorithm
class MatchingNet(FewShotAlgorithm):
    """Matching Networks (module docstring)."""

    name = "matchingnet"
    similarity_name = "matching_probability"
    nonnegative_similarity = True
    score_label = "class probability (attention over the support set)"
    options = ("temperature",)

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        fixed = config.temperature if config.temperature is not None else 10.0
        self.log_temperature = torch.tensor(fixed).log()

    @property
    def requires_task_state(self) -> bool:
        return self.config.temperature is None

    def training_module(self, model, train_set, optim):
        module = self._episode_module(
            MatchingNetModule, model, temperature=self.config.temperature, **optim
        )
        self.log_temperature = module.log_temperature  # live, for the monitor
        return module

    def task_state(self, module):
        return {"log_temperature": module.log_temperature.detach().cpu().clone()}

    def load_task_state(self, state):
        self.log_temperature = state["log_temperature"].detach().clone()

    def classifier(self, support, n_way, n_shot):
        keys = support.view(n_way, n_shot, -1).mean(1)
        score = MatchingScore(support, keys, float(self.log_temperature.detach().exp()))
        return EpisodeClassifier(keys, score, score.probabilities, reference_follows_model=False)


class MatchingNetModule(TaskModule):
    """Matching Networks' episode training, without full-context embeddings.

    Loss: NLL of ``P(true class | query)`` (:func:`matching_probabilities`). The cosine
    attention is sharpened by ``tau``: learned as a log-parameter starting at 10 when
    ``temperature=None`` (like ProtoNet's cosine variant), else fixed. What it learns
    beside the network (``log_temperature``) is saved as the sidecar.
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
