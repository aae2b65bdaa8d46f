"""Own data under an existing experiment: ``experiment=E data=X`` with X not E's dataset.

The experiment file sets its protocol (task, model, methods, evaluation) and options of
its own dataset. Run on another dataset, the command line is completed before Hydra
composes it (:func:`with_own_data`):

- the run is named ``E@X`` (``results.csv``'s ``experiment`` column, the leaderboard
  headings, ``outputs/E@X/...``), so it is never mistaken for E's published numbers;
  ``name=...`` on the command line wins;
- each ``data.options.<key>`` of the experiment file that dataset X does not take
  (``images_per_class`` of the synthetic shapes under ``data=manifest``) is dropped
  (``~data.options.<key>``), with a printed note. An option the user set on the command
  line is never dropped: it stays the dataset's error.

Sweeps (``-m experiment=a,b``) are left as they are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from experiments.data.factory import LOADERS, accepted_options


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _value(overrides: list[str], key: str) -> str | None:
    found = [o.split("=", 1)[1] for o in overrides if "=" in o and _key(o) == key]
    return found[-1] if found else None


def _yaml(dirs: list[Path], group: str, name: str) -> dict[str, Any] | None:
    for folder in dirs:
        path = folder / group / f"{name}.yaml"
        if path.is_file():
            node = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
            return node if isinstance(node, dict) else {}
    return None


def _default(defaults: list[Any], group: str) -> str | None:
    """The choice of ``group`` in a defaults list (``- data: x`` or ``- override /data: x``)."""
    for entry in defaults or []:
        if not isinstance(entry, dict):
            continue
        for key, value in entry.items():
            if key.removeprefix("override ").strip("/") == group:
                return str(value)
    return None


def with_own_data(overrides: list[str], dirs: list[Path]) -> tuple[list[str], list[str]]:
    """``(overrides completed for another dataset, notes to print)`` (module docstring).
    ``dirs``: the config folders the run searches, ``conf/`` first
    (:func:`experiments.config.method_dirs`).

    Idempotent: the completed overrides complete to themselves with no notes."""
    data = _value(overrides, "data")
    if data is None or any(o.startswith("-") for o in overrides):
        return overrides, []
    root = _yaml(dirs[:1], "", "config") or {}
    experiment = _value(overrides, "experiment") or _default(root.get("defaults"), "experiment")
    if not experiment or "," in experiment or "," in data or experiment == "null":
        return overrides, []
    spec = _yaml(dirs, "experiment", experiment)
    if spec is None:  # an unknown experiment: Hydra names it
        return overrides, []
    own = _default(spec.get("defaults"), "data") or _default(root.get("defaults"), "data")
    if own == data:
        return overrides, []
    added, notes = [], []
    if _value(overrides, "name") is None:
        added.append(f"name={experiment}@{data}")
    given = set(map(_key, overrides))
    options = ((spec.get("data") or {}).get("options") or {}) if isinstance(spec, dict) else {}
    target = _yaml(dirs, "data", data)
    if options and target is not None:
        takes = set(_accepted(str(target.get("name", data)))) | set(target.get("options") or {})
        for key, value in options.items():
            if key in takes or f"data.options.{key}" in given:
                continue
            added.append(f"~data.options.{key}")
            notes.append(
                f"data.options.{key}={value} comes from experiment={experiment} (for its "
                f"dataset {own}); dataset {data} does not take it, so it is dropped."
            )
    return [*overrides, *added], notes


def _accepted(name: str) -> list[str]:
    return accepted_options(name) if name.lower() in LOADERS else []
