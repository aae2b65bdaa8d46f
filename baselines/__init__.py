"""Baseline explainers, one module per method, all on :mod:`fam.explainer`.

Every class takes ``(model, target_layer, **options)`` and is called like
:class:`fam.FAM`: ``explainer(images, reference, similarity="cosine", upsample=True)``.
Adding a method is one module here and one YAML file in ``conf/method/``.
"""

from baselines.center_map import CenterMap
from baselines.constant_map import ConstantMap
from baselines.eigencam import EigenCAM
from baselines.gradcam import GradCAM
from baselines.gradcam_plusplus import GradCAMPlusPlus
from baselines.layercam import LayerCAM
from baselines.mask_oracle import MaskOracle
from baselines.random_map import RandomMap
from baselines.relevancecam import RelevanceCAM
from baselines.scorecam import ScoreCAM
from baselines.xgradcam import XGradCAM

__all__ = [
    "CenterMap",
    "ConstantMap",
    "EigenCAM",
    "GradCAM",
    "GradCAMPlusPlus",
    "LayerCAM",
    "MaskOracle",
    "RandomMap",
    "RelevanceCAM",
    "ScoreCAM",
    "XGradCAM",
]
