"""The builder's data files (YAML beside this module), read once and checked for the keys the code relies on."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
FILES = ("predicates", "cleaning", "clinical", "safety", "emergencies", "phrasings", "prompts", "literature")


@cache
def load(name: str) -> dict[str, Any]:
    """The parsed `utils/builder/<name>.yaml` (a mapping); a broken file is a bug in the project, so it raises."""
    if name not in FILES:
        raise KeyError(f"no builder data file {name!r}")
    with open(HERE / f"{name}.yaml", encoding="utf-8") as handle:
        data = yaml.safe_load(handle)
    if not isinstance(data, dict):
        raise TypeError(f"{HERE / name}.yaml must hold a mapping")
    return data


def predicate_map() -> dict[str, Any]:
    return load("predicates")


def cleaning() -> dict[str, Any]:
    return load("cleaning")


def clinical() -> dict[str, Any]:
    return load("clinical")


def safety() -> dict[str, Any]:
    return load("safety")


def emergencies() -> dict[str, Any]:
    return load("emergencies")


def phrasings() -> dict[str, Any]:
    return load("phrasings")


def prompts() -> dict[str, Any]:
    return load("prompts")


def literature() -> dict[str, Any]:
    return load("literature")


def data_version() -> str:
    """A short fingerprint of every data file: part of a run's manifest, so edited phrasings or maps are noticed."""
    import hashlib

    digest = hashlib.sha256()
    for name in FILES:
        digest.update((HERE / f"{name}.yaml").read_bytes())
    return digest.hexdigest()[:16]
