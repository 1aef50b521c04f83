"""Curation across the whole graph: each entity's clean facts checked against the curated clinical lists
(`clinical.yaml`) and against the rest of the graph, and ranked by clinical importance.

- symptoms: a disease that is itself a symptom (黄疸, 发热) lists the symptoms of its causes, so it lists none; a large
  graph's symptom lists keep only the clinical-symptom vocabulary (no diseases, organisms, body parts, findings);
- an indication that is also an adverse effect or a contraindication of the same drug (二甲双胍 "for" 低血糖症) goes;
  an organism is an infection by it; a patent medicine never "treats" an emergency;
- a large graph's rare values (held by fewer entities than `min_holders`) go unless the vocabulary, an entity name or
  the relation's endings vouch for them: a value only one subject holds is mostly a fragment of its source sentence;
- near repeats in one list (乏力, 全身乏力) keep the shorter; precautions must be advice (忌…, 慎用, 应…);
- ranking: serious adverse effects, major complications, common indications first, so a list cut at `max_items`
  never leads with a minor item or loses the key one; a large graph's lists then by how many entities share a value
  (its symptom lists: specific signs first, then the common symptoms before the rare ones, alarm signs last: a
  list that leads with 休克 misleads about what is typical).

What is dropped is counted, by reason, for the report.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cache

from utils.builder import resources
from utils.builder.graph import Entity, GraphStats
from utils.builder.safety import alarm_symptoms, emergencies, is_emergency_disease

MIN_LISTED = {"symptom": 2, "complication": 2}  # a large graph's shorter lists are mostly what its extraction missed


@dataclass(frozen=True)
class Vocabulary:
    """The clinical-symptom vocabulary, each symptom with its group (specific, other, nonspecific)."""

    group: dict[str, str]

    def __contains__(self, symptom: object) -> bool:
        return symptom in self.group

    def nonspecific(self, symptom: str) -> bool:
        return self.group.get(symptom) == "nonspecific"

    def specific(self, symptom: str) -> bool:
        return self.group.get(symptom) == "specific"


@cache
def vocabulary() -> Vocabulary:
    groups = resources.clinical()["symptoms"]
    return Vocabulary({symptom: group for group in ("nonspecific", "other", "specific") for symptom in groups[group]})


def _rank(values: list[str], first: Sequence[str], holders: Counter[str] | None) -> list[str]:
    """`first` (in its order) ahead of the rest; then, in a large graph, values more entities share."""
    order = {value: index for index, value in enumerate(first)}

    def key(value: str) -> tuple[int, int]:
        at = order.get(value)
        if at is None:
            at = next((index for index, item in enumerate(first) if item in value), len(first))
        return at, -(holders[value] if holders is not None else 0)

    return sorted(values, key=key)


@dataclass
class GraphFacts:
    """What the whole graph says, for the checks of one entity's facts."""

    large: bool
    names: frozenset[str]
    diseases: frozenset[str]
    holders: dict[str, Counter[str]]  # relation -> value -> how many entities hold it
    relations_off: frozenset[str] = frozenset()


def is_patent_medicine(entity: Entity) -> bool:
    return bool(entity.values("function_indication")) or "中成药" in entity.values("drug_class")


def curated_values(entity: Entity, relation: str, values: tuple[str, ...], graph: GraphFacts,
                   dropped: Counter[str]) -> tuple[str, ...]:
    """The values of one relation of an entity that survive the checks, ranked."""
    data = resources.clinical()
    words = vocabulary()
    kept: list[str] = []

    def drop(reason: str, count: int = 1) -> None:
        dropped[reason] += count

    if relation == "symptom" and entity.name in words:
        drop("the disease is itself a symptom", len(values))
        return ()
    if relation in graph.relations_off:
        drop(f"relation off for this graph ({relation})", len(values))
        return ()
    holders = graph.holders.get(relation, Counter())
    least = int(data["min_holders"].get(relation, 0)) if graph.large else 0
    endings = tuple(data["endings"].get(relation, ()))
    required = graph.large and relation in data["endings_required"]
    not_endings = tuple(data["not_endings"].get(relation, ()))
    markers = tuple(data["precaution_markers"])
    organisms = tuple(data["organism_endings"])
    antibacterial = relation == "indication" and any(
        part in text for text in (entity.name, *entity.values("generic_name"), *entity.values("ingredient"))
        for part in data["antibacterial_parts"])
    for value in values:
        held = holders[value]  # as the graph says it (a value said as meant below is held as the graph said it)
        if antibacterial:
            value = data["antibacterial_mislinks"].get(value, value)
        if relation == "indication" and value.endswith(organisms):
            value += "感染"
        if relation == "symptom" and graph.large and value not in words:
            drop("not in the clinical-symptom vocabulary")
        elif relation == "precaution" and graph.large and not any(marker in value for marker in markers):
            drop("fragment")
        elif (required and not value.endswith(endings)) or (not_endings and value.endswith(not_endings)):
            drop("does not end like a value of its relation")
        elif relation == "interaction" and (value in words or value in graph.diseases):
            drop("no drug")
        elif relation == "indication" and is_patent_medicine(entity) and (
                is_emergency_disease(value) or alarm_symptoms([value])):
            drop("an emergency as a patent medicine's indication")
        elif least and held < least and value not in words and value not in graph.names and not (
                endings and value.endswith(endings)):
            drop("held by too few entities of the graph")
        elif value not in kept:
            kept.append(value)
    if relation in ("symptom", "adverse", "complication", "indication", "function_indication"):
        repeats = [value for value in kept if (value not in words or relation != "symptom") and any(
            other != value and other in value and len(value) - len(other) <= 2 for other in kept)]
        drop("near repeat in one list", len(repeats))
        kept = [value for value in kept if value not in repeats]
    counts = holders if graph.large else None
    if relation == "adverse":
        kept = _rank(kept, emergencies().serious_adverse, counts)
    elif relation == "complication":
        kept = _rank(kept, data["major_complications"], counts)
    elif relation in ("indication", "function_indication") and graph.large:
        kept = _rank(kept, data["common_diseases"], counts)
    elif relation == "symptom" and graph.large:
        kept = sorted(kept, key=lambda value: (not words.specific(value), bool(alarm_symptoms([value])),
                                               -holders[value]))
    if relation == "prescription" and (len(kept) > 1 or (graph.large and kept != ["prescription"])):
        drop("an OTC label the graph also gives prescription drugs" if graph.large else "conflicting label", len(kept))
        return ()
    if relation == "drug_class" and "中成药" in kept and len(kept) > 1:
        kept.remove("中成药")  # a chemical drug's second label (盐酸二甲双胍片: 中成药, 双胍类)
        drop("conflicting label")
    if graph.large and len(kept) < MIN_LISTED.get(relation, 0):
        drop("too few left to list", len(kept))
        return ()
    return tuple(kept)


def curate(entities: Sequence[Entity], stats: GraphStats, graph_key: str = "") -> list[Entity]:
    """The entities with their facts curated; entities with nothing left, a controlled substance, or a name another
    entity already has are left out (counted by reason). The statistics of kinds and mapped facts are recounted.
    `graph_key` (cmekg) selects the relations `clinical.yaml` turns off for that graph."""
    data = resources.clinical()
    holders: dict[str, Counter[str]] = {}
    for entity in entities:
        for relation, values in entity.facts.items():
            holders.setdefault(relation, Counter()).update(values)
    graph = GraphFacts(len(entities) >= int(data["large_graph"]), frozenset(e.name for e in entities),
                       frozenset(e.name for e in entities if e.kind == "disease"), holders,
                       frozenset(data["relations_off"].get(graph_key, {})))
    controlled = set(data["controlled"])
    stats.relations_off = dict(data["relations_off"].get(graph_key, {}))
    stats.entities_by_kind.clear()
    stats.mapped_facts.clear()
    seen: set[str] = set()
    kept = []
    for entity in entities:
        if entity.name in seen:
            stats.skipped_entities["another entity has the same name"] += 1
            continue
        seen.add(entity.name)
        if entity.name in controlled:
            stats.skipped_entities["a controlled substance"] += 1
            continue
        facts = {}
        for relation, values in entity.facts.items():
            curated = curated_values(entity, relation, values, graph, stats.dropped_values)
            if curated:
                facts[relation] = curated
        harmful = set(facts.get("adverse", ())) | set(facts.get("contraindication", ()))
        if harmful & set(facts.get("indication", ())):
            stats.dropped_values["an indication that is also an adverse effect or a contraindication"] += len(
                harmful & set(facts["indication"]))
            facts["indication"] = tuple(value for value in facts["indication"] if value not in harmful)
        facts = {relation: values for relation, values in facts.items() if values}
        if not facts:
            stats.skipped_entities["no fact left after curation"] += 1
            continue
        for relation, values in facts.items():
            stats.mapped_facts[relation] += len(values)
        stats.entities_by_kind[entity.kind] += 1
        kept.append(replace(entity, facts=facts, sources={r: entity.sources[r] for r in facts}))
    return kept
