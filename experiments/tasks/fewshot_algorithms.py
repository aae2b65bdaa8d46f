"""Few-shot algorithms of the ``fewshot`` family, selected by ``task.algorithm``.

The rule every algorithm follows: **explain what the model itself uses to decide.** An
algorithm turns one episode's support embeddings into an :class:`EpisodeClassifier`:

- ``references (W, D)``: what the explainers receive as the reference of class ``c``;
- ``similarity``: a name or a callable ``(emb (N, D), ref (N, D)) -> (N,)`` such that
  ``similarity(e(x), references[c])`` is the model's own score of class ``c``;
- ``probabilities(emb) -> (Q, W)``: the causal score the metrics read
  (``metric.score=probability``), whose argmax is the model's prediction.

Per algorithm (reference; similarity explained; causal score):

- ``protonet``: class prototype; -squared euclidean (``task.distance=euclidean``: the
  unsquared ``-||e - p||`` of easyfsl) or cosine; episode softmax.
- ``matchingnet``: class key (mean support embedding) naming the class; ``P(c | x)``,
  cosine attention over every support embedding summed over class ``c``; the same.
- ``relationnet``: class feature map (mean support embedding read as ``K x h x w``); the
  trained relation module itself; its relation score.
- ``simpleshot``: CL2N centroid; -squared euclidean after centring (training-split
  mean) and L2 normalisation; softmax over the episode's classes.

For ``matchingnet`` the score of class ``c`` depends on every individual support
embedding of the episode, which an ``(N, D)`` reference cannot hold: the episode's
support set lives in the similarity callable, and the reference only names the explained
class (exactly one of the episode's class keys; anything else is an error). Its
randomisation sanity check therefore keeps the trained support set (the explained class
is held fixed); the other algorithms recompute their references with the randomised
network.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from experiments.embedding import embed
from experiments.tasks.base import Evaluation, Unit, annotation_sizes, stack_items
from experiments.tasks.fewshot import FewShotEvaluation
from experiments.training.metrics import mean_ci95
from fam.errors import FamBenchError
from fam.layers import eval_mode
from fam.similarity import SimilarityLike, pairwise


@dataclass
class EpisodeClassifier:
    """What a few-shot model decides with on one episode (module docstring)."""

    references: Tensor
    similarity: SimilarityLike
    probabilities: Callable[[Tensor], Tensor]
    #: False when the references only name classes of a fixed support set (matchingnet)
    reference_follows_model: bool = True


class FewShotAlgorithm:
    """One few-shot algorithm: its training module and its episode classifier.

    ``config`` is the family's :class:`~experiments.tasks.fewshot.FewShotConfig`.
    Learned state beside the embedding network is held here (set live by
    :meth:`training_module`, or by :meth:`load_task_state` from the sidecar).
    """

    name: ClassVar[str]
    #: the similarity's name in settings and results
    similarity_name: ClassVar[str]
    #: the explained similarity is a non-negative score (Average Drop can read it)
    nonnegative_similarity: ClassVar[bool] = False
    score_label: ClassVar[str] = "class probability (episode softmax)"

    def __init__(self, config: Any) -> None:
        self.config = config

    # -- training -----------------------------------------------------------------------
    def training_module(self, model: nn.Module, train_set: Any, optim: dict[str, Any]):
        raise NotImplementedError

    def train_loader(self, train_set: Any, trainer: Any, seed: int):
        """A loader of its own, or ``None`` for the family's episodic one."""
        return None

    # -- learned state beside the network (the sidecar) ---------------------------------
    @property
    def requires_task_state(self) -> bool:
        return False

    def task_state(self, module: nn.Module) -> dict[str, Tensor]:
        return {}

    def load_task_state(self, state: dict[str, Tensor]) -> None:
        """Nothing to load by default."""

    # -- evaluation ---------------------------------------------------------------------
    def prepare(self, model: nn.Module, train_set: Any) -> None:
        """Compute what the classifier needs from the training split (SimpleShot's mean)."""

    def to(self, device: torch.device) -> FewShotAlgorithm:
        """Move learned modules to ``device`` in eval mode (before explaining)."""
        return self

    def classifier(self, support: Tensor, n_way: int, n_shot: int) -> EpisodeClassifier:
        """``support (W*S, D)``, class-major -> the episode's classifier."""
        raise NotImplementedError

    def accuracy(self, model: nn.Module, dataset: Any, sampler: Any, train_set: Any = None):
        """``{"mean", "ci95", "n"}`` over the sampler's episodes (the model's own rule)."""
        if train_set is not None:
            self.prepare(model, train_set)
        return episode_accuracy(model, dataset, sampler, self)

    def evaluation(self, dataset, sampler, eval_cfg, score, seed, pairs) -> Evaluation:
        return EpisodeEvaluation(
            self,
            dataset,
            sampler,
            eval_cfg.n_way,
            eval_cfg.n_shot,
            eval_cfg.n_query,
            score,
            seed,
            pairs,
        )

    def _episode_module(self, cls, model, **kwargs):
        c = self.config
        return cls(model, c.train_way, c.train_shot, c.train_query, **kwargs)


class ProtoNet(FewShotAlgorithm):
    """Prototypical Networks (Snell et al., NeurIPS 2017), ``task.similarity`` euclidean or
    cosine; evaluated by :class:`~experiments.tasks.fewshot.FewShotEvaluation` as before."""

    name = "protonet"

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        # cosine logits are tau * cos (learned from 10 unless task.temperature fixes it);
        # the squared distance has no temperature (tau = 1)
        fixed = config.temperature if config.temperature is not None else 10.0
        self.log_temperature = torch.tensor(float(fixed) if self.cosine else 1.0).log()

    @property
    def cosine(self) -> bool:
        return self.config.similarity == "cosine"

    @property
    def similarity_name(self) -> str:  # type: ignore[override]
        """The score the model decides with: ``euclidean`` (``-||e - p||^2``),
        ``euclidean_distance`` (``-||e - p||``, ``task.distance=euclidean``) or ``cosine``."""
        from experiments.tasks.fewshot import DISTANCES

        if self.cosine:
            return "cosine"
        return DISTANCES[self.config.distance]

    @property
    def requires_task_state(self) -> bool:
        return self.cosine and self.config.temperature is None

    @property
    def temperature(self) -> float:
        """The model's own logit scale: the softmax over prototypes is of ``tau * s``."""
        return float(self.log_temperature.detach().exp())

    def training_module(self, model, train_set, optim):
        from experiments.training.fewshot import ProtoNetModule

        c = self.config
        module = self._episode_module(
            ProtoNetModule,
            model,
            similarity=self.similarity_name,
            temperature=c.temperature,
            **optim,
        )
        if self.cosine:
            self.log_temperature = module.log_temperature  # live, saved in the sidecar
        return module

    def task_state(self, module):
        if not self.requires_task_state:  # euclidean, or a fixed temperature: nothing learned
            return {}
        return {"log_temperature": module.log_temperature.detach().cpu().clone()}

    def load_task_state(self, state):
        if self.requires_task_state:
            self.log_temperature = state["log_temperature"].detach().clone()

    def classifier(self, support, n_way, n_shot):
        prototypes = support.view(n_way, n_shot, -1).mean(1)
        similarity, tau = self.similarity_name, self.temperature
        return EpisodeClassifier(
            prototypes,
            similarity,
            lambda emb: torch.softmax(tau * pairwise(similarity, emb, prototypes), dim=1),
        )

    def accuracy(self, model, dataset, sampler, train_set=None):
        from experiments.training.metrics import fewshot_accuracy

        return fewshot_accuracy(model, dataset, sampler, self.similarity_name)

    def evaluation(self, dataset, sampler, eval_cfg, score, seed, pairs):
        e = eval_cfg
        return FewShotEvaluation(
            dataset,
            sampler,
            e.n_way,
            e.n_shot,
            e.n_query,
            self.similarity_name,
            score,
            seed,
            pairs,
            temperature=self.temperature,
        )


class MatchingScore:
    """Matching Networks' class probability as a similarity callable.

    ``__call__(emb (N, D), ref (N, D)) -> (N,)``: ``P(c | emb)`` of the class ``c`` whose
    key (``keys (W, D)``, the mean support embeddings) equals ``ref``; the attention runs
    over ``support (W*S, D)`` (class-major) at temperature ``tau``.
    """

    def __init__(self, support: Tensor, keys: Tensor, tau: float) -> None:
        self.support, self.keys, self.tau = support, keys, tau

    def probabilities(self, emb: Tensor) -> Tensor:
        from experiments.training.fewshot_algorithms import matching_probabilities

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


class MatchingNet(FewShotAlgorithm):
    """Matching Networks (Vinyals et al., NeurIPS 2016): cosine attention over the
    individual support embeddings; ``task.temperature`` null = learned (sidecar)."""

    name = "matchingnet"
    similarity_name = "matching_probability"
    nonnegative_similarity = True
    score_label = "class probability (attention over the support set)"

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        fixed = config.temperature if config.temperature is not None else 10.0
        self.log_temperature = torch.tensor(fixed).log()

    @property
    def requires_task_state(self) -> bool:
        return self.config.temperature is None

    def training_module(self, model, train_set, optim):
        from experiments.training.fewshot_algorithms import MatchingNetModule

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


class RelationNet(FewShotAlgorithm):
    """Relation Networks (Sung et al., CVPR 2018): a learned relation module on the
    concatenated feature maps (use ``model.options.pooling=flatten`` so the embedding is
    the map; a GAP embedding gives ``K x 1 x 1`` maps). The module is the similarity
    callable and is saved as the sidecar (``relation.*`` tensors and ``feature_shape``)."""

    name = "relationnet"
    similarity_name = "relation_score"
    nonnegative_similarity = True
    score_label = "relation score (the relation module's output)"
    requires_task_state = True  # type: ignore[assignment]

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.relation: nn.Module | None = None

    def training_module(self, model, train_set, optim):
        from experiments.training.fewshot_algorithms import RelationModule, RelationNetModule

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
        from experiments.training.fewshot_algorithms import RelationModule

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


class CL2NDistance:
    """SimpleShot's score ``-|| normalise(emb - mean) - ref ||^2`` with ``ref`` a CL2N
    centroid; ``(N, D), (N, D) -> (N,)``."""

    def __init__(self, mean: Tensor) -> None:
        self.mean = mean

    def transform(self, emb: Tensor) -> Tensor:
        return F.normalize(emb - self.mean.to(emb), dim=1)

    def __call__(self, emb: Tensor, ref: Tensor) -> Tensor:
        return -(self.transform(emb) - ref).pow(2).sum(1)


class SimpleShot(FewShotAlgorithm):
    """SimpleShot (Wang et al., arXiv 1911.04623): a plain classifier of the training
    classes, evaluated by nearest centroid on CL2N features (centred with the training
    split's mean embedding, then L2-normalised). The mean is recomputed from the
    training split with the evaluated network, so a checkpoint needs no sidecar.
    Probabilities: softmax of ``-d^2 / T`` (``T = task.temperature``, default 1)."""

    name = "simpleshot"
    similarity_name = "cl2n_euclidean"

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.mean: Tensor | None = None

    def training_module(self, model, train_set, optim):
        from experiments.training.batches import labels_of
        from experiments.training.fewshot_algorithms import SimpleShotModule

        dim = embed(model, train_set, torch.arange(2)).shape[1]
        classes = int(labels_of(train_set).max()) + 1
        return SimpleShotModule(model, dim, classes, **optim)

    def train_loader(self, train_set, trainer, seed):
        from torch.utils.data import DataLoader

        from experiments.training.batches import IndexedBatches, pass_through

        w = trainer.num_workers
        return DataLoader(
            IndexedBatches(train_set),
            batch_size=min(trainer.batch_size, len(train_set)),
            shuffle=True,
            collate_fn=pass_through,
            drop_last=True,
            num_workers=w,
            persistent_workers=w > 0,
        )

    def prepare(self, model, train_set):
        self.mean = embed(model, train_set).mean(0)

    def classifier(self, support, n_way, n_shot):
        if self.mean is None:
            raise FamBenchError("simpleshot needs the training-split mean: call prepare first.")
        score = CL2NDistance(self.mean.to(support.device))
        centroids = score.transform(support).view(n_way, n_shot, -1).mean(1)
        t = self.config.temperature or 1.0

        def probabilities(emb: Tensor) -> Tensor:
            d = (score.transform(emb)[:, None] - centroids[None]).pow(2).sum(-1)
            return torch.softmax(-d / t, dim=1)

        return EpisodeClassifier(centroids, score, probabilities)


ALGORITHMS: dict[str, type[FewShotAlgorithm]] = {
    cls.name: cls for cls in (ProtoNet, MatchingNet, RelationNet, SimpleShot)
}


def algorithm_for(config: Any) -> FewShotAlgorithm:
    return ALGORITHMS[config.algorithm](config)


def feature_shape(model: nn.Module, dataset: Any) -> tuple[int, int, int]:
    """``(K, h, w)`` of the embedding read as the default target layer's map: ``D = K*h*w``
    (flatten) or ``D = K`` (GAP, read as ``K x 1 x 1``)."""
    from experiments.embedding import gather
    from fam.layers import capture_layer, model_device, resolve_target_layer

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


def episode_accuracy(
    model: nn.Module, dataset: Any, sampler: Any, algorithm: FewShotAlgorithm
) -> dict[str, float]:
    """Accuracy of ``algorithm``'s classifier over every episode (each image embedded once)."""
    episodes = [sampler.episode(e) for e in range(len(sampler))]
    if not episodes:
        raise FamBenchError("The episode sampler has no episodes; set num_episodes >= 1.")
    used = torch.unique(torch.cat([ep.indices for ep in episodes]))
    emb = embed(model, dataset, used)
    row = torch.full((int(used.max()) + 1,), -1, dtype=torch.long)
    row[used] = torch.arange(len(used))
    row = row.to(emb.device)
    accuracies = []
    with torch.no_grad():
        for ep in episodes:
            support = emb[row[ep.support.to(emb.device)]]
            query = emb[row[ep.query.to(emb.device)]]
            clf = algorithm.classifier(support, ep.n_way, len(ep.support) // ep.n_way)
            pred = clf.probabilities(query).argmax(1)
            accuracies.append((pred == ep.query_labels.to(emb.device)).float().mean())
    return mean_ci95(torch.stack(accuracies).cpu())


class EpisodeEvaluation(FewShotEvaluation):
    """Episodes explained with an algorithm's :class:`EpisodeClassifier` (module docstring):
    the same episodes, queries and pairs mode as ProtoNet's evaluation."""

    def __init__(self, algorithm, dataset, sampler, n_way, n_shot, n_query, score, seed, pairs):
        super().__init__(
            dataset,
            sampler,
            n_way,
            n_shot,
            n_query,
            algorithm.similarity_name,
            score,
            seed,
            pairs,
        )
        self.algorithm = algorithm
        self.score_label = (
            algorithm.score_label if score == "probability" else f"{algorithm.similarity_name}"
        )

    @property
    def confidence_available(self) -> bool:
        return self.score == "probability" or self.algorithm.nonnegative_similarity

    def queries(self, e: int, device: torch.device) -> dict[str, Any]:
        """The query images of episode ``e`` (as :class:`FewShotEvaluation` draws them)."""
        from experiments.data.seeding import derive_seed

        episode = self.sampler.episode(e)
        classes = torch.as_tensor(episode.classes).long()
        position = torch.arange(self.n_way).repeat_interleave(self.n_query)
        out: dict[str, Any] = {"other_masks": None, "other_labels": None, "classes": classes}
        if self.pairs:
            offset = torch.tensor(
                [derive_seed(self.seed, e, j) % (self.n_way - 1) for j in range(len(position))]
            )
            other = (position + 1 + offset) % self.n_way
            keys = e * len(position) + torch.arange(len(position))
            batch = self.dataset.pairs(classes[position], classes[other], keys)
            out.update(
                images=batch["image"].to(device),
                masks=batch["mask"].bool().to(device),
                other_masks=batch["other_mask"].bool().to(device),
                labels=classes[position].tolist(),
                other_labels=classes[other].tolist(),
                index=keys.tolist(),
                extras={"annotation_sizes": annotation_sizes(self.dataset, len(keys))},
            )
        else:
            query_idx = torch.as_tensor(episode.query).tolist()
            extras: dict[str, Any] = {}
            images, masks, labels = stack_items(self.dataset, query_idx, device, extras)
            out.update(images=images, masks=masks, labels=labels, index=query_idx, extras=extras)
        out["position"] = position.to(device)
        out["support"] = stack_items(
            self.dataset, torch.as_tensor(episode.support).tolist(), device
        )[0]
        return out

    def unit(self, e: int, model: nn.Module, device: torch.device) -> Unit:
        self.algorithm.to(device)
        q = self.queries(e, device)
        position, support_images = q["position"], q["support"]
        n_way, n_shot = self.n_way, self.n_shot

        def classifier_of(net: nn.Module) -> EpisodeClassifier:
            return self.algorithm.classifier(embed(net, support_images), n_way, n_shot)

        clf = classifier_of(model)
        similarity = clf.similarity
        simfn = similarity if callable(similarity) else (lambda a, b: pairwise(similarity, a, b))
        score, nonnegative = self.score, self.algorithm.nonnegative_similarity

        def explaining(explained: Tensor) -> dict[str, Any]:
            """Reference and scores of the class ``explained (N,)`` (episode positions)."""
            reference = clf.references[explained]

            def embedding_probability(emb: Tensor, index: Tensor) -> Tensor:
                probs = clf.probabilities(emb)
                return probs.gather(1, explained[index][:, None])[:, 0]

            def probability(x: Tensor, index: Tensor) -> Tensor:
                return embedding_probability(model(x).float(), index)

            def raw_similarity(x: Tensor, index: Tensor) -> Tensor:
                return simfn(model(x).float(), reference[index])

            confidence_fn = None
            if score == "probability":
                confidence_fn = probability
            elif nonnegative:
                confidence_fn = raw_similarity
            if clf.reference_follows_model:

                def reference_fn(net: nn.Module) -> Tensor:
                    return classifier_of(net).references[explained]
            else:

                def reference_fn(net: nn.Module) -> Tensor:
                    return reference

            return {
                "reference": reference,
                "score_fn": probability if score == "probability" else raw_similarity,
                "confidence_fn": confidence_fn,
                "reference_fn": reference_fn,
                "embedding_score": embedding_probability,
            }

        images = q["images"]
        with torch.no_grad(), eval_mode(model):
            predicted = torch.cat(
                [
                    clf.probabilities(model(images[i : i + 256]).float())
                    for i in range(0, len(images), 256)
                ]
            ).argmax(1)
        n = len(position)
        classes = q["classes"]
        columns = {
            "sample_id": [e * n + j for j in range(n)],
            "episode": [e] * n,
            "index": q["index"],
            "label": q["labels"],
            "predicted_label": classes[predicted.cpu()].tolist(),
            "correct": (predicted == position).tolist(),
        }
        if q["other_labels"] is not None:
            columns["other_label"] = q["other_labels"]
        common = dict(
            unit=e,
            images=images,
            similarity=similarity,
            masks=q["masks"],
            other_masks=q["other_masks"],
            boxes=q["extras"].get("boxes"),
            annotation_sizes=q["extras"].get("annotation_sizes"),
            columns=columns,
        )
        as_predicted = Unit(**common, **explaining(predicted), explains="predicted")
        return Unit(**common, **explaining(position), explains="true", predicted_unit=as_predicted)

    def task_metrics(self, model: nn.Module) -> dict[str, float]:
        self.algorithm.to(next(iter(model.parameters())).device)
        acc = episode_accuracy(model, self.dataset, self.sampler, self.algorithm)
        return {
            "fewshot_accuracy": float(acc["mean"]),
            "fewshot_accuracy_ci95": float(acc["ci95"]),
            "episodes": int(acc["n"]),
        }
