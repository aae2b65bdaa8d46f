"""Task families, registered by name (see :mod:`experiments.tasks.base`).

``TASKS`` maps ``task.name`` to its :class:`~experiments.tasks.base.TaskFamily` class;
:func:`family_for` builds the family of a run from its ``task`` config node, importing a
user's family from ``task.family`` (a dotted path) when the name is not built in.
"""

from __future__ import annotations

import importlib
from typing import Any

from experiments.config import typed_node
from experiments.tasks.base import TaskEvaluation, TaskFamily, Unit, query_order, stack_items
from experiments.tasks.fewshot import FewShot
from experiments.tasks.neighbour import Contrastive, Retrieval
from fam.errors import FamBenchError

TASKS: dict[str, type[TaskFamily]] = {}


def register(cls: type[TaskFamily]) -> type[TaskFamily]:
    """Class decorator / call: make ``cls`` available as ``task.name == cls.name``."""
    if not getattr(cls, "name", None) or not hasattr(cls, "Config"):
        raise TypeError("a task family needs class attributes `name` and `Config`")
    TASKS[cls.name] = cls
    return cls


def _import(path: str) -> Any:
    module, _, attr = path.replace(":", ".").rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise FamBenchError(
            f"task.family={path!r} cannot be imported ({err}); give the dotted path of a "
            "TaskFamily subclass on the Python path."
        ) from None


def family_class(name: str, family: str | None = None) -> type[TaskFamily]:
    if family:
        cls = _import(family)
        if not (isinstance(cls, type) and issubclass(cls, TaskFamily)):
            raise FamBenchError(f"task.family={family!r} is not a TaskFamily subclass.")
        return register(cls)
    if name not in TASKS:
        raise FamBenchError(
            f"Unknown task {name!r}. Registered task families: {sorted(TASKS)}; a family of "
            "your own is named by task.family=<dotted path> in its conf/task/<name>.yaml."
        )
    return TASKS[name]


def family_for(node: dict[str, Any]) -> TaskFamily:
    """The task family of a ``task`` config node, its config checked and typed."""
    node = dict(node)
    family = node.pop("family", None)
    cls = family_class(str(node.get("name", "")), family)
    node.setdefault("name", cls.name)
    return cls(typed_node("task", cls.Config, node))


def _register_builtins() -> None:
    for cls in (FewShot, Contrastive, Retrieval):
        register(cls)


_register_builtins()

__all__ = [
    "TASKS",
    "TaskEvaluation",
    "TaskFamily",
    "Unit",
    "family_class",
    "family_for",
    "query_order",
    "register",
    "stack_items",
]
