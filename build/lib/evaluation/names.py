"""Names of the per-sample metric columns, shared by the runner and the leaderboard."""

GROUND_TRUTH_METRICS: tuple[str, ...] = ("pointing_game", "energy_pointing_game")
CONFIDENCE_METRICS: tuple[str, ...] = ("average_drop", "increase_in_confidence")
#: one value per sample and method, in results.csv column order
SAMPLE_METRICS: tuple[str, ...] = (
    "deletion_auc",
    "insertion_auc",
    *GROUND_TRUTH_METRICS,
    *CONFIDENCE_METRICS,
)
#: ground-truth metrics scored against the *other* object of a two-object image (synthetic
#: pairs mode): landing there is the failure being measured, so lower is better.
OTHER_OBJECT_METRICS: tuple[str, ...] = tuple(f"{m}_other" for m in GROUND_TRUTH_METRICS)
LOWER_IS_BETTER: frozenset[str] = frozenset({"deletion_auc", "average_drop", *OTHER_OBJECT_METRICS})
