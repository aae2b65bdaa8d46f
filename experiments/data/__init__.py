"""Datasets and episode sampling.

API (all samples are dicts ``{"image": (3, S, S) float, "label": int, "index": int,
"mask": (S, S) bool}``, "mask" only when ``dataset.has_masks``; every dataset exposes
``labels`` (``(N,)`` long tensor, no image decoding), ``classes`` (names), ``has_masks``,
``mean``, ``std``, ``image_size``):

- ``SyntheticShapes(split="train"|"val"|"test", image_size=32, images_per_class=600,
  seed=0, mode="single"|"pairs", normalise=True)``: 100 classes (10 shapes x 10
  appearances) split 64/16/20 (fixed). ``ds[i]`` is image ``i % images_per_class`` of split
  class ``i // images_per_class``, a pure function of ``(seed, class, index)``. In
  ``mode="pairs"``, ``ds.pair(class_a, class_b, key) -> dict(image, label=class_a,
  mask=mask_a, other_label=class_b, other_mask=mask_b)`` (split labels, int key; disjoint
  masks) and the batched ``ds.pairs(a, b, keys)`` with ``(N,)`` tensors.
  ``normalise=False`` returns raw ``[0, 1]`` images (e.g. for SimCLR augmentation);
  ``denormalise(x, ds.mean, ds.std)`` undoes normalisation. There is no ``transform``
  hook on any dataset: augmentations (SimCLR views) wrap the dataset, built with
  ``normalise=False``, so masks are never silently out of step with a transformed image.
- ``EpisodeSampler(labels, n_way, n_shot, n_query, num_episodes, seed)``:
  ``sampler.episode(e) -> Episode(classes, support, query)``: ``classes`` ``(n_way,)``
  dataset labels, ``support`` ``(n_way*n_shot,)`` / ``query`` ``(n_way*n_query,)`` dataset
  indices, class-major; episode label = position in ``classes``
  (``episode.support_labels`` / ``episode.query_labels``). Depends on ``(seed, e)`` only.
  Iterating yields episodes ``0..num_episodes-1``.
- ``build_dataset(name, root, split, image_size, **options)``: names ``synthetic``,
  ``miniimagenet``, ``tieredimagenet``, ``imagefolder``, ``cub``, ``cifar10``, ``stl10``,
  ``sop``, ``cars196`` (see :mod:`experiments.data.formats` for layouts). Options: all
  take ``normalise``; ``synthetic``: ``images_per_class, seed, mode, max_classes, clutter``;
  ``miniimagenet``: ``source="auto"|"csv"|"pickle"``; ``cub``:
  ``protocol="fewshot"|"retrieval"|"official"``,
  ``masks="auto"|"segmentation"|"box"|"none"``; ``cars196``: ``protocol="retrieval"|
  "official"``, ``masks="box"|"none"``. Masks: synthetic (exact), cub, cars196 only.
  Splits: ``train``/``val``/``test`` (few-shot), ``train``/``test`` (classification,
  retrieval). Retrieval uses the standard SOP/Cars/CUB protocol: the whole test set as
  query and gallery, each query excluded from its own ranking (experiments.tasks).
"""

from experiments.data.common import IMAGENET_MEAN, IMAGENET_STD, denormalise, normalise_image
from experiments.data.episodes import Episode, EpisodeSampler
from experiments.data.factory import LOADERS, build_dataset
from experiments.data.synthetic import SyntheticShapes

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LOADERS",
    "Episode",
    "EpisodeSampler",
    "SyntheticShapes",
    "build_dataset",
    "denormalise",
    "normalise_image",
]
