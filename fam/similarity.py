"""Similarity functions ``s(emb, ref) -> (N,)`` and the target callable built on them.

Every explainer and metric in the suite explains the same scalar: the similarity of an
image's embedding to a reference embedding (a prototype, the other SimCLR view, a
retrieved gallery image).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from fam.errors import FamBenchError

SimilarityFn = Callable[[Tensor, Tensor], Tensor]
SimilarityLike = str | SimilarityFn

COSINE_EPS = 1e-8


def cosine(emb: Tensor, ref: Tensor) -> Tensor:
    """Cosine similarity per row: ``(N, D), (N, D) -> (N,)``."""
    return F.cosine_similarity(emb, ref, dim=1, eps=COSINE_EPS)


def dot(emb: Tensor, ref: Tensor) -> Tensor:
    """Dot product per row: ``(N, D), (N, D) -> (N,)``."""
    return (emb * ref).sum(dim=1)


def euclidean(emb: Tensor, ref: Tensor) -> Tensor:
    """Negative squared Euclidean distance per row (ProtoNet's logit): ``(N,)``."""
    return -(emb - ref).pow(2).sum(dim=1)


def euclidean_distance(emb: Tensor, ref: Tensor) -> Tensor:
    """Negative Euclidean distance per row, ``-||e - r||`` (easyfsl's ProtoNet logit,
    ``-torch.cdist``): ``(N,)``."""
    return -(emb - ref).pow(2).sum(dim=1).sqrt()


SIMILARITIES: dict[str, SimilarityFn] = {
    "cosine": cosine,
    "dot": dot,
    "euclidean": euclidean,
    "euclidean_distance": euclidean_distance,
}


def resolve_similarity(similarity: SimilarityLike) -> tuple[str | None, SimilarityFn]:
    """Return ``(name, fn)``; ``name`` is ``None`` for a user callable."""
    if isinstance(similarity, str):
        if similarity not in SIMILARITIES:
            raise FamBenchError(
                f"Unknown similarity {similarity!r}. Use one of {sorted(SIMILARITIES)} or pass "
                "a callable (emb, ref) -> (N,)."
            )
        return similarity, SIMILARITIES[similarity]
    if callable(similarity):
        return None, similarity
    raise FamBenchError(
        f"similarity must be a name {sorted(SIMILARITIES)} or a callable (emb, ref) -> (N,), "
        f"got {type(similarity).__name__}."
    )


class SimilarityTarget:
    """The explained score as a value: ``target(emb) -> (N,)`` against a fixed reference.

    ``reference`` is ``(N, D)``; ``similarity`` a name or a callable. Calling it on
    embeddings ``(N, D)`` returns ``s(emb, reference)``.
    """

    def __init__(self, reference: Tensor, similarity: SimilarityLike = "cosine") -> None:
        self.reference = reference
        self.name, self.fn = resolve_similarity(similarity)

    def __call__(self, emb: Tensor) -> Tensor:
        score = self.fn(emb, self.reference.to(emb.dtype))
        if score.shape != emb.shape[:1]:
            raise FamBenchError(
                f"The similarity callable returned shape {tuple(score.shape)}; it must return "
                f"one score per image, shape ({emb.shape[0]},)."
            )
        return score


def as_float(t: Tensor) -> Tensor:
    """Upcast half/bf16 tensors to float32 (weights are always computed in fp32)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def pairwise(similarity: SimilarityLike, emb: Tensor, refs: Tensor) -> Tensor:
    """Similarity of every embedding to every reference: ``(B, D), (C, D) -> (B, C)``.

    Named similarities broadcast the same per-row formula as :data:`SIMILARITIES` (so
    ``pairwise(s, e, r)[i, j] == s(e[i:i+1], r[j:j+1])`` exactly); a callable is applied
    to all ``B*C`` pairs at once.
    """
    name, fn = resolve_similarity(similarity)
    if name == "euclidean":
        return -(emb[:, None] - refs[None]).pow(2).sum(dim=-1)
    if name == "euclidean_distance":
        return -(emb[:, None] - refs[None]).pow(2).sum(dim=-1).sqrt()
    if name == "cosine":
        return F.cosine_similarity(emb[:, None], refs[None], dim=-1, eps=COSINE_EPS)
    if name == "dot":
        return (emb[:, None] * refs[None]).sum(dim=-1)
    b, c = emb.shape[0], refs.shape[0]
    return fn(emb.repeat_interleave(c, 0), refs.repeat(b, 1)).view(b, c)
