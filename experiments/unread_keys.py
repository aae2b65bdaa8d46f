"""Keys the chosen run never reads: refused, naming what would read them.

Hydra and the schema refuse keys that exist nowhere (a typo). A key that exists but that
the chosen experiment, data, task and model do not read would be silently ignored while
the user believes it changed the run (and it may still change the fingerprint, so a new
model is trained for identical numbers). :func:`check_unread_keys` is the one place that
knows which keys each choice reads; it looks only at the keys given on the command line
(an experiment file's own values are the experiment's, checked by
``test_the_shipped_experiments_pass_the_settings_check``).
"""

from __future__ import annotations

from typing import Any

from fam.errors import FamBenchError

#: what only few-shot episodes read
FEWSHOT_EVAL_KEYS = ("eval.num_episodes", "eval.n_way", "eval.n_shot", "eval.n_query")
#: what only the neighbour tasks (retrieval, contrastive) read
NEIGHBOUR_EVAL_KEYS = ("eval.num_queries", "eval.unit_size")
#: trainer keys read only while a model is trained (evaluation reads accelerator and
#: devices; metric.amp, not trainer.precision, sets its precision)
TRAINING_KEYS = (
    "trainer.max_steps",
    "trainer.lr",
    "trainer.weight_decay",
    "trainer.optimizer",
    "trainer.batch_size",
    "trainer.precision",
    "trainer.deterministic",
    "trainer.channels_last",
    "trainer.gradient_clip_val",
    "trainer.log_every_n_steps",
    "trainer.num_workers",
)
#: task keys of each built-in family read only while its model is trained: the episode
#: shape of training, the miner and sampler, the augmentations. (The loss, the algorithm and
#: its temperature, projector and queue also name the checkpoint's kind and must match it,
#: so they stay allowed beside a checkpoint.)
TASK_TRAINING_KEYS = {
    "fewshot": ("task.train_way", "task.train_shot", "task.train_query"),
    "retrieval": ("task.miner", "task.margin", "task.samples_per_class"),
    "contrastive": (
        "task.min_scale",
        "task.cj_prob",
        "task.cj_strength",
        "task.random_gray_scale",
        "task.gaussian_blur",
        "task.hf_prob",
    ),
}
#: the built-in tasks that explain test queries (a plugin task reads what it reads)
NEIGHBOUR_TASKS = ("retrieval", "contrastive")
#: datasets generated in memory (no data.root)
GENERATED_DATA = ("synthetic",)


def given_keys(overrides: list[str]) -> dict[str, str]:
    """``key -> value`` of the command line's ``key=value`` overrides (group choices such
    as ``experiment=...`` and the method defaults ``+method@...`` left out)."""
    given = {}
    for arg in overrides:
        key, sep, value = arg.partition("=")
        if key.startswith("~"):  # a deletion sets nothing
            continue
        key = key.lstrip("+")
        if sep and "." in key and "@" not in key and "/" not in key:
            given[key] = value
    return given


def _within(key: str, names: tuple[str, ...]) -> bool:
    return any(key == n or key.startswith(n + ".") for n in names)


def check_unread_keys(run: Any, overrides: list[str]) -> None:
    """Refuse a command-line key that ``run`` (a :class:`~experiments.config.RunConfig`)
    never reads, naming what would read it."""
    task = str(run.task.get("name", "fewshot"))
    for key, value in given_keys(overrides).items():
        reason = None
        if _within(key, NEIGHBOUR_EVAL_KEYS) and task == "fewshot":
            reason = (
                "sets the test queries of task=retrieval and task=contrastive; task=fewshot "
                "explains the queries of eval.num_episodes episodes (eval.n_way x "
                "eval.n_query each)"
            )
        elif _within(key, FEWSHOT_EVAL_KEYS) and task in NEIGHBOUR_TASKS:
            reason = (
                f"shapes the episodes of task=fewshot; task={task} explains eval.num_queries "
                "test queries in units of eval.unit_size"
            )
        elif key == "data.root" and run.data.root is not None and run.data.name in GENERATED_DATA:
            reason = (
                f"is where a dataset read from disk lies (data=imagefolder, data=manifest, "
                f"...); data={run.data.name} is generated in memory"
            )
        elif (
            _within(key, TRAINING_KEYS) or _within(key, TASK_TRAINING_KEYS.get(task, ()))
        ) and run.model.checkpoint:
            reason = (
                f"is read only while a model is trained; model.checkpoint="
                f"{run.model.checkpoint} is loaded as it is (drop model.checkpoint to train)"
            )
        if reason is not None:
            raise FamBenchError(
                f"{key}={value} would be ignored: it {reason}. Drop the override, or choose "
                "what reads it."
            )
