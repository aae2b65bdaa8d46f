"""The evaluation of the neighbour tasks (contrastive, retrieval),
:class:`NeighbourEvaluation`: one query against its nearest bank item, scored by the
probability over the reference and its distractors or by the raw similarity, or
(contrastive's default, ``reference="knn_class"``) against the class its weighted kNN
vote predicts, scored by that vote's probability (see :mod:`experiments.tasks.neighbour`
and :mod:`experiments.tasks.neighbour.knn` for the definitions)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from experiments.data.seeding import derive_seed
from experiments.embedding import embed
from experiments.tasks.base import TaskEvaluation, Unit, stack_items
from experiments.tasks.neighbour.knn import knn_class_reference, knn_probability
from experiments.training.batches import labels_of
from fam.errors import FamBenchError
from fam.similarity import resolve_similarity


class NeighbourEvaluation(TaskEvaluation):
    """Explain each query against its nearest bank item, or against its kNN class.

    ``reference``: ``"nearest"`` (the nearest bank item's embedding) or ``"knn_class"``
    (the mean normalised bank embedding of the class the weighted vote of the
    ``knn_k`` nearest predicts, at ``knn_temperature``; the probability score is then that
    vote's probability of the predicted class). ``queries``: indices of ``dataset``
    explained, in order (units of ``unit_size``);
    ``bank``: the dataset the neighbour comes from; ``neighbours``: bank index of each
    query's neighbour and ``distractor_ids`` ``(Q, K)`` the bank indices of its next K
    nearest items (computed once by :meth:`find_neighbours`, with the bank's embeddings).
    ``score``: ``"probability"`` or ``"similarity"`` (module docstring).
    """

    untrained_baseline = True

    def __init__(
        self,
        name: str,
        dataset: Any,
        bank: Any,
        queries: Tensor,
        unit_size: int,
        similarity: str,
        score: str = "probability",
        distractors: int = 10,
        temperature: float = 0.5,
        pairs: bool = False,
        seed: int = 0,
        other_classes: bool = True,
        reference: str = "nearest",
        knn_k: int = 20,
        knn_temperature: float = 0.07,
    ) -> None:
        resolve_similarity(similarity)
        if reference not in ("nearest", "knn_class"):
            raise FamBenchError(
                f"task.reference must be 'knn_class' or 'nearest', got {reference!r}."
            )
        if score not in ("probability", "similarity"):
            raise FamBenchError(
                f"metric.score must be 'probability' or 'similarity', got {score!r}."
            )
        if distractors < 1 or temperature <= 0:
            raise FamBenchError(
                "The task probability needs metric.distractors >= 1 and metric.temperature "
                f"> 0 (got {distractors} and {temperature})."
            )
        self.name, self.dataset, self.bank = name, dataset, bank
        self.queries, self.unit_size, self.similarity = queries, unit_size, similarity
        self.score, self.distractors, self.temperature = score, distractors, temperature
        self.pairs, self.seed, self.other_classes = pairs, seed, other_classes
        self.reference, self.knn_k, self.knn_temperature = reference, knn_k, knn_temperature
        self.knn: dict[str, Tensor] | None = None
        self.neighbours: Tensor | None = None
        self.distractor_ids: Tensor | None = None
        self.bank_ids: Tensor | None = None
        self.bank_emb: Tensor | None = None
        self.metrics_fn = None
        self.num_classes: int | None = None
        if score != "probability":
            self.score_label = f"{similarity} similarity to the reference"
        elif reference == "knn_class":
            self.score_label = (
                f"kNN probability of the predicted class (k={knn_k}, T={knn_temperature:g})"
            )
        else:
            self.score_label = (
                f"probability of the reference against {distractors} distractors "
                f"(T={temperature:g})"
            )

    @property
    def score_settings(self) -> dict[str, Any]:
        """The score's own settings (they go into ``settings_id``)."""
        if self.score != "probability":
            return {}
        if self.reference == "knn_class":
            return {"score_knn_k": self.knn_k, "score_knn_temperature": self.knn_temperature}
        return {
            "score_distractors": self.distractors,
            "score_distractor_classes": "other" if self.other_classes else "any",
            "score_temperature": self.temperature,
        }

    @property
    def confidence_available(self) -> bool:
        # the probability and max(cos, 0) are non-negative; a clamped distance or dot is not
        return self.score == "probability" or self.similarity == "cosine"

    @property
    def num_units(self) -> int:
        return -(-len(self.queries) // self.unit_size)

    def chance(self) -> float | None:
        return None if not self.num_classes else 1.0 / self.num_classes

    def task_metrics(self, model: nn.Module) -> dict[str, float]:
        return self.metrics_fn(model)

    def _embed_items(self, model, dataset, ids: Tensor, device, batch_size: int) -> Tensor:
        return torch.cat(
            [
                embed(model, stack_items(dataset, ids[i : i + batch_size].tolist(), device)[0])
                for i in range(0, len(ids), batch_size)
            ]
        )

    def find_neighbours(self, model, device, batch_size, exclude_self, bank_indices=None):
        """Nearest bank item of every query (cosine) and its next K nearest (the
        distractors); ``exclude_self`` when the bank is the evaluation split itself
        (retrieval's leave-one-out gallery)."""
        bank_ids = torch.arange(len(self.bank)) if bank_indices is None else bank_indices
        bank_emb = self._embed_items(model, self.bank, bank_ids, device, batch_size)
        bank_unit = F.normalize(bank_emb, dim=1)
        query_emb = self._embed_items(model, self.dataset, self.queries, device, batch_size)
        own = self.queries if exclude_self else None
        rows, distractors = [], []
        for i in range(0, len(self.queries), batch_size):
            emb = query_emb[i : i + batch_size]
            sims = F.normalize(emb, dim=1) @ bank_unit.T
            if exclude_self:
                q = self.queries[i : i + batch_size].to(device)
                sims = sims.masked_fill(bank_ids.to(device)[None, :] == q[:, None], float("-inf"))
            rows.append(sims.argmax(1).cpu())
        rows = torch.cat(rows)
        self.bank_ids, self.bank_emb = bank_ids, bank_emb.cpu()
        self.bank_labels = labels_of(self.bank)[bank_ids]
        if self.reference == "knn_class":
            labels = self.bank_labels.to(bank_unit.device)
            parts = [
                knn_class_reference(
                    query_emb[i : i + batch_size],
                    bank_unit,
                    labels,
                    self.knn_k,
                    self.knn_temperature,
                )
                for i in range(0, len(self.queries), batch_size)
            ]
            predicted, reference, members, member = (
                torch.cat([part[j] for part in parts]).cpu() for j in range(4)
            )
            # the nearest member of the predicted class stands for the reference's image
            # (figures, the reference_index column)
            rows = members.gather(1, member.float().argmax(1, keepdim=True))[:, 0]
            self.knn = {
                "predicted": predicted,
                "reference": reference,
                "members": members,
                "member": member,
            }
        self.neighbours, self.reference_rows = bank_ids[rows], rows
        if self.reference == "knn_class":
            return  # the kNN probability needs no distractors
        for i in range(0, len(self.queries), batch_size):
            mine = None if own is None else own[i : i + batch_size]
            emb = query_emb[i : i + batch_size]
            distractors.append(self._distractors_of(emb, rows[i : i + batch_size], mine).cpu())
        self.distractor_ids = torch.cat(distractors)

    def _pair_queries(self, u: int, ref_labels: list[int], device) -> dict:
        """Pair images holding an object of the reference's class and one of another."""
        n_classes = int(self.dataset.num_classes)
        a = torch.tensor(ref_labels)
        offset = torch.tensor(
            [derive_seed(self.seed, u, j) % (n_classes - 1) for j in range(len(a))]
        )
        b = (a + 1 + offset) % n_classes
        sl = slice(u * self.unit_size, (u + 1) * self.unit_size)
        batch = self.dataset.pairs(a, b, self.queries[sl])
        return {
            "images": batch["image"].to(device),
            "masks": batch["mask"].bool().to(device),
            "other_masks": batch["other_mask"].bool().to(device),
            "other_labels": b.tolist(),
        }

    def _distractors_of(self, emb: Tensor, reference_rows: Tensor, own: Tensor | None) -> Tensor:
        """Bank rows ``(N, K)`` of the distractors of ``emb``: its K nearest bank items
        other than the reference (bank row ``reference_rows``) and the query's own item;
        with ``other_classes`` only items whose label differs from the reference's."""
        device = emb.device
        bank_unit = F.normalize(self.bank_emb.to(device), dim=1)
        sims = F.normalize(emb, dim=1) @ bank_unit.T
        rows = torch.arange(len(self.bank_ids), device=device)
        reference_rows = reference_rows.to(device)
        drop = rows[None, :] == reference_rows[:, None]
        if own is not None:
            drop |= self.bank_ids.to(device)[None, :] == own.to(device)[:, None]
        if self.other_classes:
            labels = self.bank_labels.to(device)
            drop |= labels[None, :] == labels[reference_rows][:, None]
        sims = sims.masked_fill(drop, float("-inf"))
        k = min(self.distractors, int((~drop).sum(1).min()))
        if k < 1:
            raise FamBenchError(
                "No bank item is left to serve as a distractor; use a larger bank or "
                "metric.distractor_classes=any."
            )
        return sims.topk(k, dim=1).indices

    def unit(self, u: int, model: nn.Module, device: torch.device) -> Unit:
        if self.neighbours is None:
            raise RuntimeError("find_neighbours must run before units are evaluated")
        sl = slice(u * self.unit_size, (u + 1) * self.unit_size)
        queries, neighbours = self.queries[sl].tolist(), self.neighbours[sl].tolist()
        extras: dict = {}
        images, masks, labels = stack_items(self.dataset, queries, device, extras)
        ref_images, _, ref_labels = stack_items(self.bank, neighbours, device)
        if self.knn is not None:
            return self._knn_unit(
                u, sl, model, device, queries, neighbours, images, masks, labels, extras, ref_images
            )
        reference = embed(model, ref_images)
        distractor_rows = self.distractor_ids[sl]
        other_masks, other_labels = None, None
        correct = [a == b for a, b in zip(labels, ref_labels, strict=True)]
        if self.pairs:
            pair = self._pair_queries(u, ref_labels, device)
            images, masks = pair["images"], pair["masks"]
            other_masks, other_labels = pair["other_masks"], pair["other_labels"]
            labels = list(ref_labels)
            # the distractors of the pair image itself, unperturbed
            own = self.queries[sl] if self.bank is self.dataset else None
            distractor_rows = self._distractors_of(
                embed(model, images), self.reference_rows[sl], own
            ).cpu()
        distractors = self.bank_emb[distractor_rows].to(device)  # (N, K, D)
        _, fn = resolve_similarity(self.similarity)
        temperature = self.temperature

        def similarity(x: Tensor, index: Tensor) -> Tensor:
            return fn(model(x).float(), reference[index])

        def embedding_probability(emb: Tensor, index: Tensor) -> Tensor:
            own_sim = fn(emb, reference[index].to(emb.dtype))
            others = distractors[index].to(emb.dtype)  # (B, K, D)
            b, k, d = others.shape
            other_sims = fn(emb.repeat_interleave(k, 0), others.reshape(b * k, d)).view(b, k)
            logits = torch.cat([own_sim[:, None], other_sims], dim=1) / temperature
            return torch.softmax(logits, dim=1)[:, 0]

        def probability(x: Tensor, index: Tensor) -> Tensor:
            return embedding_probability(model(x).float(), index)

        def shifted_cosine(x: Tensor, index: Tensor) -> Tensor:
            return similarity(x, index).clamp_min(0)

        if self.score == "probability":
            score_fn, confidence_fn = probability, probability
        else:
            confidence = shifted_cosine if self.similarity == "cosine" else None
            score_fn, confidence_fn = similarity, confidence
        columns = {
            "sample_id": queries,
            "episode": [u] * len(queries),
            "index": queries,
            "label": labels,
            "reference_index": neighbours,
            "reference_label": ref_labels,
            "correct": correct,
        }
        if other_labels is not None:
            columns["other_label"] = other_labels
        return Unit(
            unit=u,
            images=images,
            reference=reference,
            score_fn=score_fn,
            confidence_fn=confidence_fn,
            reference_fn=lambda net: embed(net, ref_images),
            similarity=self.similarity,
            masks=masks,
            boxes=extras.get("boxes"),
            annotation_sizes=extras.get("annotation_sizes"),
            other_masks=other_masks,
            reference_images=ref_images,
            embedding_score=embedding_probability,
            columns=columns,
        )

    def _knn_unit(
        self,
        u,
        sl,
        model,
        device,
        queries,
        neighbours,
        images,
        masks,
        labels,
        extras,
        ref_images,
    ) -> Unit:
        """A unit explained against its kNN class (``reference="knn_class"``)."""
        knn = self.knn
        predicted = knn["predicted"][sl].to(device)
        reference = knn["reference"][sl].to(device)
        members, member = knn["members"][sl], knn["member"][sl]
        bank_unit = F.normalize(self.bank_emb.to(device), dim=1)
        bank_labels = self.bank_labels.to(device)
        k, temperature = self.knn_k, self.knn_temperature
        _, fn = resolve_similarity(self.similarity)

        def similarity(x: Tensor, index: Tensor) -> Tensor:
            return fn(model(x).float(), reference[index])

        def embedding_probability(emb: Tensor, index: Tensor) -> Tensor:
            # the bank is fixed; the perturbed image finds its own k neighbours
            return knn_probability(emb, bank_unit, bank_labels, predicted[index], k, temperature)

        def probability(x: Tensor, index: Tensor) -> Tensor:
            return embedding_probability(model(x).float(), index)

        def shifted_cosine(x: Tensor, index: Tensor) -> Tensor:
            return similarity(x, index).clamp_min(0)

        def reference_fn(net: nn.Module) -> Tensor:
            # the same members, embedded by ``net`` (the sanity check's randomised model)
            rows = members[member]
            emb = F.normalize(
                embed(net, stack_items(self.bank, self.bank_ids[rows].tolist(), device)[0]).float(),
                dim=1,
            )
            owner = torch.arange(len(members)).repeat_interleave(member.sum(1)).to(device)
            summed = torch.zeros(len(members), emb.shape[1], device=device).index_add_(
                0, owner, emb
            )
            return summed / member.sum(1, keepdim=True).to(device)

        if self.score == "probability":
            score_fn, confidence_fn = probability, probability
        else:
            score_fn, confidence_fn = similarity, shifted_cosine
        predicted_labels = knn["predicted"][sl].tolist()
        return Unit(
            unit=u,
            images=images,
            reference=reference,
            score_fn=score_fn,
            confidence_fn=confidence_fn,
            reference_fn=reference_fn,
            similarity=self.similarity,
            masks=masks,
            boxes=extras.get("boxes"),
            annotation_sizes=extras.get("annotation_sizes"),
            reference_images=ref_images,
            embedding_score=embedding_probability,
            columns={
                "sample_id": queries,
                "episode": [u] * len(queries),
                "index": queries,
                "label": labels,
                "reference_index": neighbours,
                "reference_label": predicted_labels,
                "correct": [a == b for a, b in zip(labels, predicted_labels, strict=True)],
            },
        )
