"""Metrics that score explanations: faithfulness, localisation and sanity.

Every metric takes per-sample inputs and returns per-sample values on the inputs' device
(``nan`` where a sample is undefined, for the caller to exclude and count); aggregation
is the caller's (see :mod:`evaluation.summary`).
"""

from evaluation.causal import DeletionInsertionResult, auc, deletion_insertion, gaussian_blur
from evaluation.confidence import ConfidenceChange, confidence_change
from evaluation.pointing import (
    annotation_tolerance,
    boxes_to_masks,
    energy_pointing_game,
    pointing_game,
    tight_boxes,
)
from evaluation.sanity import SanityResult, randomisation_sanity, spearman

__all__ = [
    "ConfidenceChange",
    "DeletionInsertionResult",
    "SanityResult",
    "annotation_tolerance",
    "auc",
    "boxes_to_masks",
    "confidence_change",
    "deletion_insertion",
    "energy_pointing_game",
    "gaussian_blur",
    "pointing_game",
    "randomisation_sanity",
    "spearman",
    "tight_boxes",
]
