"""The neighbour task families, contrastive (SimCLR and other self-supervised algorithms)
and retrieval: explain a test query against a nearest neighbour.

- ``contrastive``: a query image is classified as the field classifies a self-supervised
  embedding and the FAM authors' code does (:mod:`.knn`): a weighted kNN
  vote over the bank of training-split images (``task.bank_size`` of them, or all;
  cosine, ``task.knn_k`` = 20 neighbours, weights ``exp(s / task.knn_temperature)``,
  T = 0.07). With ``task.reference=knn_class`` (default) it is explained against the mean
  normalised bank embedding of the predicted class among those neighbours;
  ``task.reference=nearest`` explains it against its nearest bank item. Both are fixed,
  deterministic references (an augmented view would make the explained score depend on
  augmentation randomness). With ``task.holdout_per_class > 0`` the last
  ``holdout_per_class`` images of every training class (in index order) are held out:
  the encoder never trains on them, they are not in the bank, and they are the queries,
  the kNN test set and the linear probe's test set. That is how an evaluation split with
  other classes than the training split (the synthetic shapes: 64 train / 20 test
  classes) still gets a kNN accuracy and a probe on the classes the bank holds.
- ``retrieval``: a test query is explained against the embedding of its top-1 gallery
  image (cosine, the query itself excluded; gallery = the test split, leave-one-out). In
  ``pairs`` mode (``SyntheticShapes(mode="pairs")``) the query is re-rendered to hold an
  object of the retrieved image's class (the ground truth) and one of another test class
  (``other_masks``, ``other_label``).

The score the faithfulness metrics read (``metric.score``, DESIGN.md section 4):

- ``probability`` (default) under ``task.reference=knn_class`` (contrastive's default):
  the kNN classifier's probability of the predicted class, the normalised vote
  ``sum_{i in top-k, y_i = c} w_i / sum_{i in top-k} w_i``, with the bank held fixed and
  the neighbours re-found for every perturbed image (few-shot's episode probability is its
  counterpart).
- ``probability`` under ``task.reference=nearest`` (contrastive) and for retrieval: the
  softmax, at temperature ``metric.temperature``, of the
  perturbed query's similarities to the reference and to a fixed set of distractors, the
  ``metric.distractors`` (K) nearest other bank items of the *unperturbed* query (the
  reference and, for retrieval, the query itself excluded), by default only items of
  other classes than the reference's (``metric.distractor_classes=other``; ``any`` admits
  the reference's class). Same-class distractors are near copies of the reference: the
  probability then stays near ``1/(K+1)`` whatever is deleted (measured: mask vs random
  deletion AUC 0.085 vs 0.123 with them, 0.096 vs 0.186 without, at T=0.02).
  ``metric.temperature=null`` is the training loss's temperature where it has one
  (SimCLR's NT-Xent ``task.temperature``) and :data:`.family.RETRIEVAL_TEMPERATURE` for
  the pml losses, which have none. The raw cosine of non-negative pooled embeddings can barely
  move when pixels are deleted (DESIGN.md section 4); the probability asks whether the
  query still picks its reference over the nearest items of other classes.
- ``similarity``: the raw similarity to the reference.

Average Drop / Increase in Confidence read the probability, or ``max(cosine, 0)`` under
``metric.score=similarity`` (a reference that has become dissimilar counts as a full drop).

Modules:

- :mod:`.family`: the families :class:`Contrastive` and :class:`Retrieval` and their
  configs (``conf/task/contrastive.yaml``, ``conf/task/retrieval.yaml``);
- :mod:`.queries`: :class:`~.queries.NeighbourEvaluation`, the evaluation of both (units
  of queries, their references, distractors and scores);
- :mod:`.knn`: the weighted kNN vote, its probability and the kNN-class reference;
- :mod:`.task_metrics`: ``task_metrics.csv`` and the training monitors: kNN accuracy,
  Recall@K, the linear probe;
- :mod:`.contrastive_algorithms`: the contrastive algorithms (simclr, moco, byol,
  simsiam), each a training module that checks its own options where some do not apply
  to it;
- :mod:`.metric_learning`: retrieval's training (pml losses and miners);
- :mod:`.holdout`: contrastive's held-out images (``task.holdout_per_class``).

Adding a contrastive algorithm: subclass :class:`ContrastiveModule` (a ``TaskModule``)
with ``algorithm = "<name>"``, ``loss(batch)`` on ``(view_a, view_b, labels)`` batches,
``from_config(model, embedding_dim, config, optim)`` and, when some options do not apply
to it, ``check_config(config)``; decorate it with :func:`register_algorithm` (or call it)
before the config is built, and select it with ``task.algorithm=<name>``. A built-in one
goes into :mod:`.contrastive_algorithms`, with a line in ``conf/task/contrastive.yaml``'s
comment. A retrieval loss is a row of :data:`.metric_learning.LOSSES`.
"""

from experiments.tasks.neighbour.contrastive_algorithms import (
    ALGORITHMS,
    ContrastiveModule,
    register_algorithm,
)
from experiments.tasks.neighbour.family import (
    Contrastive,
    ContrastiveConfig,
    Retrieval,
    RetrievalConfig,
)

__all__ = [
    "ALGORITHMS",
    "Contrastive",
    "ContrastiveConfig",
    "ContrastiveModule",
    "Retrieval",
    "RetrievalConfig",
    "register_algorithm",
]
