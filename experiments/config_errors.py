"""Config mistakes as one paragraph: the key that is wrong and the nearest valid one.

Hydra and OmegaConf report an unknown key as "Could not override 'eval.num_episode'" and
suggest appending it with ``+``, which would be silently ignored; these helpers name the
key, the nearest valid key and its siblings instead, and never suggest a ``+key``.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from evaluation.plain import flatten

_KEY_PATTERNS = (
    r"[Cc]ould not override '([^']+)'",
    r"[Cc]ould not append to config\. An item is already at '([^']+)'",
    r"full_key: ([\w.\[\]@/-]+)",
)


def explain_error(
    err: BaseException, overrides: list[str], config_dir: Path, schema: type
) -> str | None:
    """A one-paragraph message for a Hydra/OmegaConf compose error, or ``None`` if it is
    not a config mistake. An unknown key gets the nearest valid key (never a ``+key``).
    ``config_dir``: the folder ``overrides`` were composed in; ``schema``: the run's config
    dataclass (what each key takes)."""
    if not isinstance(err, HydraException | OmegaConfBaseException):
        return None
    cause = err.__cause__
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        err = cause  # "Error merging override k=v" says neither what is wrong nor the fix
    text = " ".join(str(err).split("Config search path:")[0].split())
    if "Available options in" in text:  # an unknown group choice (experiment=..., model=...)
        head, _, options = text.partition("Available options in")
        group, _, names = options.partition(":")
        return (
            f"{head.rstrip('.')}. Available options in {group.strip()}: "
            f"{', '.join(names.split())}. (python run.py --help lists the groups.)"
        )
    key = next((m.group(1) for p in _KEY_PATTERNS if (m := re.search(p, text))), None)
    if key is None or not any(k in text for k in ("not in", "not found", "Could not")):
        if "Value '" in text or "could not be converted" in text or "Invalid value" in text:
            return type_error(text, schema)
        return f"{text} (python run.py --help lists the config groups and their options.)"
    if "could not be converted" in text or "Invalid value" in text:
        return type_error(text, schema)
    return unknown_key_message(key, overrides, config_dir)


#: how a schema type is named in messages, with an example value
_TYPE_NAMES = {
    int: ("an integer", "3"),
    float: ("a number", "0.5"),
    bool: ("true or false", "true"),
    str: ("a string", "name"),
}


def expected_type(key: str, schema: type) -> tuple[str, str] | None:
    """``(what key takes, an example value)`` from the dataclass ``schema`` (the run's
    :class:`~experiments.config.RunConfig`), or ``None`` for keys outside it (task,
    method, options)."""
    node: Any = schema
    for part in key.split("."):
        if not dataclasses.is_dataclass(node):
            return None
        hints = typing.get_type_hints(node)
        if part not in hints:
            return None
        node = hints[part]
    optional = False
    if isinstance(node, types.UnionType) or typing.get_origin(node) is typing.Union:
        args = [a for a in typing.get_args(node) if a is not type(None)]
        optional = len(args) < len(typing.get_args(node))
        node = args[0] if len(args) == 1 else node
    if node not in _TYPE_NAMES:
        return None
    name, example = _TYPE_NAMES[node]
    return (f"{name} or null" if optional else name), example


def type_error(text: str, schema: type) -> str:
    """A wrong value as one sentence: the key, what it takes (in the dataclass ``schema``),
    the value given."""
    key = re.search(r"full_key: ([\w.\[\]-]+)", text)
    value = re.search(r"Value '([^']*)'", text)
    expected = expected_type(key.group(1), schema) if key else None
    if key and expected:
        what, example = expected
        given = f", got {value.group(1)!r}" if value else ""
        return (
            f"Wrong value type: {key.group(1)} takes {what}{given}; e.g. {key.group(1)}={example}."
        )
    text = re.sub(r"\s*(object_type|reference_type)=\S+", "", text)
    return f"Wrong value type: {text.replace('full_key:', 'key:')}"


def unknown_key_message(key: str, overrides: list[str], config_dir: Path) -> str:
    """``key`` is not in the config composed from ``overrides`` in ``config_dir``: name it,
    its nearest valid key and its siblings."""
    if key == "model._target_":
        value = next((o.split("=", 1)[1] for o in overrides if "model._target_=" in o), "...")
        return (
            f"model._target_={value} is not a model key: build your own model with "
            f"model=custom model.target={value} (its keyword arguments as "
            "+model.kwargs.<name>=...). Nothing was trained."
        )
    if key.startswith("model.kwargs."):
        # kwargs is an open mapping, empty in the model config: the key is new to Hydra but
        # the model reads it; Hydra adds a new key with a leading +
        value = next((o.split("=", 1)[1] for o in overrides if o.startswith(key + "=")), "...")
        return (
            f"`{key}` is not in the model config yet (model.kwargs starts empty), so Hydra "
            f"cannot override it: add it with a leading +, `+{key}={value}`. The model's "
            "keyword arguments are checked against its signature when it is built."
        )
    base = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != key]
    try:
        cfg = compose_config_plain(base, config_dir)
    except Exception:  # noqa: BLE001 - the suggestion is best effort
        cfg = {}
    model = cfg.get("model") or {}
    if key.startswith("model.options.") and model.get("target"):
        name = key.removeprefix("model.options.")
        return (
            f"`{key}` is an option of a built-in model; model=custom builds "
            f"{model['target']} with its keyword arguments: pass +model.kwargs.{name}=<value>. "
            "Nothing was trained."
        )
    valid = sorted(flatten(cfg))
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    siblings = sorted(
        {k[len(parent) + 1 :].split(".")[0] for k in valid if k.startswith(parent + ".")}
        if parent
        else {k.split(".")[0] for k in valid}
    )
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f" Did you mean `{close[0]}`?" if close else ""
    where = f" Valid keys under `{parent}`: {', '.join(siblings)}." if siblings else ""
    return (
        f"Unknown config key `{key}`: nothing reads it, so the run would ignore it.{hint}"
        f"{where} (python run.py --cfg job prints the whole config.)"
    )


def compose_config_plain(overrides: list[str], config_dir: Path) -> dict:
    """``config.yaml`` of ``config_dir`` composed with ``overrides``, unresolved, as dicts."""
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=False)
