"""FAM and the shared explainer machinery (layers, capture, similarities, maps)."""

from fam.errors import FamBenchError
from fam.explainer import CAMExplainer, Explainer
from fam.fam import FAM, closed_form
from fam.layers import capture_layer, eval_mode, resolve_target_layer
from fam.maps import minmax_normalise, upsample, weighted_sum
from fam.similarity import SIMILARITIES, SimilarityTarget, resolve_similarity

__all__ = [
    "FAM",
    "SIMILARITIES",
    "CAMExplainer",
    "Explainer",
    "FamBenchError",
    "SimilarityTarget",
    "capture_layer",
    "closed_form",
    "eval_mode",
    "minmax_normalise",
    "resolve_similarity",
    "resolve_target_layer",
    "upsample",
    "weighted_sum",
]
