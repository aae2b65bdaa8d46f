"""Settings the end-to-end tests share: the tiny synthetic few-shot run they start from.

Test modules import them by name (``from conftest import TINY, tiny``), as they import
``custom_nets`` and ``format_writers``.
"""

from __future__ import annotations

from collections.abc import Sequence

#: A tiny synthetic few-shot run on the CPU: 16 px images, an 8-filter Conv-4 trained for
#: 2 steps of 3-way 2-shot 2-query episodes, one 3-way 2-shot 1-query test episode, FAM
#: and the centre map scored by the pointing game. :func:`tiny` derives a test's variant.
TINY = [
    "data.image_size=16",
    "model.options.hidden=8",
    "data.options.images_per_class=6",
    "trainer.max_steps=2",
    "trainer.batch_size=8",
    "task.train_way=3",
    "task.train_shot=2",
    "task.train_query=2",
    "eval.num_episodes=1",
    "eval.n_way=3",
    "eval.n_shot=2",
    "eval.n_query=1",
    "methods=[fam,center]",
    "metrics=[pointing_game]",
    "trainer.accelerator=cpu",
    "eval.progress=false",
]


def tiny(*changes: str, drop: Sequence[str] = ()) -> list[str]:
    """:data:`TINY` with each ``key=value`` of ``changes`` in place of that key's value
    (appended when TINY does not set the key), without the keys named in ``drop``."""
    new = {c.split("=", 1)[0]: c for c in changes}
    kept = [new.pop(o.split("=", 1)[0], o) for o in TINY if o.split("=", 1)[0] not in drop]
    return [*kept, *new.values()]
