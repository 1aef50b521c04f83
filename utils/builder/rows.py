"""The row every question kind produces, and the small text helpers they share."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

from utils.builder import resources
from utils.builder.graph import Entity, predicate_map


@dataclass(frozen=True, slots=True)
class Row:
    """One instruction row with its provenance (question kind, relation, entities, source predicates) and the facts
    it states (`values`, used by the content gate; not written out)."""

    instruction: str
    output: str
    kind: str
    entities: tuple[str, ...]
    predicates: tuple[str, ...] = ()
    relation: str = ""
    values: tuple[str, ...] = ()

    def record(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"kind": self.kind}
        if self.relation:
            meta["relation"] = self.relation
        meta["entities"] = list(self.entities)
        meta["predicates"] = list(self.predicates)
        return {"instruction": self.instruction, "input": "", "output": self.output, "meta": meta}


def fill(template: str, **slots: str) -> str:
    """`str.format` without its brace pitfalls: a value holding `{` stays as written."""
    for name, value in slots.items():
        template = template.replace("{" + name + "}", value)
    return template


def join(values: Sequence[str]) -> str:
    return "、".join(values)


def join_and(values: Sequence[str]) -> str:
    """`甲、乙和丙`: the way a patient lists symptoms."""
    return values[0] if len(values) == 1 else "、".join(values[:-1]) + "和" + values[-1]


def capped(entity: Entity, relation: str, limit: int | None = None) -> tuple[str, ...]:
    """The values an answer may list: at most the relation's `max_items` (or `limit`)."""
    spec = predicate_map().relations.get(relation)
    most = limit if limit is not None else (spec.max_items if spec else 6)
    return entity.values(relation)[:most]


def rng_for(seed: int, *parts: str) -> random.Random:
    """A generator of its own for one entity or key: adding an entity changes no other entity's rows."""
    return random.Random(":".join([str(seed), *parts]))


@cache
def phrasing(kind: str, relation: str) -> dict[str, list[str]] | None:
    data = resources.phrasings()
    return data["kind_facts"].get(kind, {}).get(relation) or data["facts"].get(relation)


def sources(entity: Entity, *relations: str) -> tuple[str, ...]:
    """The source predicates behind the relations a row uses, in order, without repeats."""
    seen: list[str] = []
    for relation in relations:
        for predicate in entity.sources.get(relation, ()):
            if predicate not in seen:
                seen.append(predicate)
    return tuple(seen)
