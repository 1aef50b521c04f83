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


@dataclass(frozen=True)
class Emergencies:
    diseases: frozenset[str]
    disease_patterns: tuple[str, ...]
    not_emergency_parts: tuple[str, ...]
    symptoms: tuple[str, ...]
    pictures: tuple[tuple[str, ...], ...]
    relations: frozenset[str]


@cache
def emergencies() -> Emergencies:
    data = resources.emergencies()
    return Emergencies(frozenset(data["diseases"]), tuple(data["disease_patterns"]), tuple(data["not_emergency_parts"]),
                       tuple(data["symptoms"]), tuple(tuple(picture) for picture in data["symptom_pictures"]),
                       frozenset(data["relations"]))


def is_emergency_disease(name: str) -> bool:
    """A listed emergency (急性心肌梗死), or a name with an emergency pattern (一氧化碳中毒, 甲亢危象,
    失血性休克) that is not a chronic or late form (慢性铅中毒, 陈旧性心肌梗死), an acid-base disorder or a test."""
    known = emergencies()
    if name in known.diseases:
        return True
    return (any(pattern in name for pattern in known.disease_patterns)
            and not any(part in name for part in known.not_emergency_parts))


def alarm_symptoms(symptoms: Sequence[str]) -> list[str]:
    """The shown symptoms that are alarm signs (胸痛, 呼吸困难, 意识丧失, ...) or together make an alarm picture
    (眼压升高 with 瞳孔散大: acute glaucoma)."""
    known = emergencies()
    found = [symptom for symptom in symptoms if any(key in symptom for key in known.symptoms)]
    for picture in known.pictures:
        parts = [next((symptom for symptom in symptoms if key in symptom), None) for key in picture]
        if all(parts):
            found.extend(part for part in parts if part and part not in found)
    return found


def alarm_words(texts: Sequence[str]) -> list[str]:
    """The alarm signs named inside free text (a vignette's patient: `一位昏迷病人` -> 昏迷)."""
    return [key for key in emergencies().symptoms if any(key in text for text in texts)]


def emergency_sentence(symptoms: Sequence[str] = (), diseases: Sequence[str] = (), context: Sequence[str] = ()) -> str:
    """立即就医/拨打120 when an alarm symptom is shown (or named in `context`, e.g. the patient) or an emergency disease
    is named; else nothing."""
    data = resources.emergencies()
    alarms = alarm_symptoms(symptoms) or alarm_words(context)
    if alarms:
        return fill(data["sentence"], what=join_and(alarms[:2]))
    urgent = [name for name in diseases if is_emergency_disease(name)]
    if urgent:
        return fill(data["disease_sentence"], what=urgent[0])
    return ""


def emergency_tail(entity: Entity, relations: Sequence[str]) -> str:
    """The emergency sentence of a row about `entity` that states the given relations: the shown symptoms, and the
    entity itself, count when one of them is an emergency relation (symptom, department)."""
    if not emergencies().relations & set(relations):
        return ""
    if entity.kind == "disease" and is_emergency_disease(entity.name):  # the disease first: 急性心肌梗死属于急危重症
        return emergency_sentence(diseases=[entity.name])
    shown = [value for relation in relations if relation == "symptom" for value in capped(entity, relation)]
    return emergency_sentence(shown)
