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

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cache, cached_property

from utils.builder import resources
from utils.builder.graph import Entity, GraphStats
from utils.builder.safety import alarm_symptoms, bigrams, emergencies, is_emergency_disease

MIN_LISTED = {"symptom": 3, "complication": 2, "test": 2}  # a large graph's shorter lists: what its extraction missed
MOST_SERIOUS_FIRST = 3  # serious adverse effects lead a list, but leave room for the common ones


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


OCR_PRONE = ("ingredient", "effect", "adverse", "symptom", "function_indication")
COMMON = 20  # a value this many entities hold is a common one; a one-character variant of it held once is a typo
RARE = 2


@dataclass
class GraphFacts:
    """What the whole graph says, for the checks of one entity's facts."""

    large: bool
    names: frozenset[str]
    diseases: frozenset[str]
    holders: dict[str, Counter[str]]  # relation -> value -> how many entities hold it
    relations_off: frozenset[str] = frozenset()

    @cached_property
    def _masks(self) -> dict[str, dict[str, set[str]]]:
        """relation -> a common value with one character masked (川?, ?芎) -> the common values it masks."""
        masks: dict[str, dict[str, set[str]]] = {}
        for relation in OCR_PRONE:
            table = masks.setdefault(relation, {})
            for value, count in self.holders.get(relation, Counter()).items():
                if count >= COMMON:
                    for index in range(len(value)):
                        table.setdefault(value[:index] + "?" + value[index + 1 :], set()).add(value)
        return masks

    def ocr_variant(self, relation: str, value: str) -> bool:
        """A rare value one character away from a common one of the same relation (消栓口服液: 川号、川尝 beside
        川芎): the source's OCR typo."""
        if self.holders.get(relation, Counter())[value] > RARE or len(value) < 2:
            return False
        table = self._masks.get(relation, {})
        return any(table.get(value[:index] + "?" + value[index + 1 :], set()) - {value}
                   for index in range(len(value)))


ORAL_FORMS = ("片", "胶囊", "颗粒", "丸", "口服液", "口服溶液", "糖浆", "散", "冲剂", "合剂", "滴丸", "胶丸")


def never_indicated(drug: Entity, value: str, data: dict) -> bool:
    """An indication a drug of its kind never has: an emergency for an oral drug or a patent medicine (their lists mix
    in contraindications: 格列美脲片 "for" 糖尿病酮症酸中毒), or one of the curated `never_indicated` of its kind."""
    oral = drug.name.endswith(ORAL_FORMS) or is_patent_medicine(drug)
    if oral and (is_emergency_disease(value) or alarm_symptoms([value])):
        return True
    return any(part in drug.name and value in values for part, values in data["never_indicated"].items())


def missing_key_adverse(drug: Entity, effects: Sequence[str], data: dict) -> bool:
    """Whether a drug of a kind with a key adverse effect (a sulfonylurea: hypoglycaemia) lists effects without it:
    such a list misleads about what to watch for."""
    kinds = {part for parts in data["key_adverse"].values() for part in parts if part in drug.name}
    return bool(kinds) and not any(value in effects for value, parts in data["key_adverse"].items()
                                   if kinds & set(parts))


def route_fits(name: str, route: str, data: dict) -> bool:
    """A route the product's dosage form allows (盐酸阿米替林注射液 is not taken by mouth, a tablet not injected)."""
    forms = data["route_forms"]
    injected = any(word in route for word in forms["injection_routes"])
    if any(word in name for word in forms["injection_names"]):
        return injected
    return not (injected and name.endswith(ORAL_FORMS))


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
    off = next((key for key in (relation, f"{relation}@{entity.kind}") if key in graph.relations_off), None)
    if off:
        drop(f"relation off for this graph ({off})", len(values))
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
    leading = tuple(data["leading_words"].get(relation, ()))
    holding = tuple(data["not_holding"].get(relation, ()))
    typos = tuple(data["typos"])
    wrong = set(data["reviewed_wrong"].get(entity.name, {}).get(relation, ()))
    organ_first = tuple(data["organ_first"]) if relation in ("effect", "function_indication") else ()
    for value in values:
        held = holders[value]  # as the graph says it (a value said as meant below is held as the graph said it)
        prefix = next((word for word in leading if value.startswith(word) and len(value) > len(word) + 1), "")
        value = value[len(prefix):]
        if antibacterial:
            value = data["antibacterial_mislinks"].get(value, value)
        if relation == "indication" and value.endswith(organisms):
            value += "感染"
        if value in wrong:
            drop("found wrong by a review")
        elif any(typo in value for typo in typos):
            drop("a typo of the source")
        elif (holding and any(word in value for word in holding)) or (organ_first and value.startswith(organ_first)
                                                                       and len(value) == 3) or (
                relation in ("precaution", "contraindication") and re.search(r"[和及与、][\u4e00-\u9fff]$", value)):
            drop("fragment")  # ... or a sentence cut after its last word (宜定期监测血常规和肝)
        elif relation == "symptom" and graph.large and value not in words:
            drop("not in the clinical-symptom vocabulary")
        elif relation == "precaution" and graph.large and not any(marker in value for marker in markers):
            drop("fragment")
        elif (required and not value.endswith(endings)) or (not_endings and value.endswith(not_endings)):
            drop("does not end like a value of its relation")
        elif relation == "interaction" and (value in words or value in graph.diseases):
            drop("no drug")
        elif relation == "test" and value in graph.diseases:
            drop("a disease is no test")
        elif relation == "brand_name" and value in entity.values("generic_name"):
            drop("a brand name that is the generic name")
        elif relation == "alias" and graph.large and value in graph.names:
            drop("an alias that is another entity of the graph")
        elif relation == "alias" and graph.large and entity.kind == "disease" and not bigrams(value) & bigrams(
                entity.name):  # 人类免疫缺陷病毒病 "也叫" 口腔毛状黏膜白斑病: a manifestation, not a name
            drop("a disease alias sharing no word with the name")
        elif relation == "indication" and never_indicated(entity, value, data):
            drop("an indication the drug's kind never has")
        elif least and held < least and value not in words and value not in graph.names and not (
                endings and value.endswith(endings)):
            drop("held by too few entities of the graph")
        elif value not in kept:
            kept.append(value)
    if relation in ("symptom", "adverse", "complication", "indication", "function_indication", "test"):
        repeats = [value for value in kept if (value not in words or relation != "symptom") and any(
            other != value and other in value and len(value) - len(other) <= 2 for other in kept)]
        drop("near repeat in one list", len(repeats))
        kept = [value for value in kept if value not in repeats]
    if relation == "ingredient":  # 麻黄 beside 盐酸伪麻黄碱 is a piece of it, not another ingredient
        pieces = [value for value in kept if any(value != other and value in other for other in kept)]
        drop("a piece of another ingredient", len(pieces))
        kept = [value for value in kept if value not in pieces]
    counts = holders if graph.large else None
    if relation == "adverse" and missing_key_adverse(entity, kept, data):
        drop("a list without the key adverse effect of its kind (格列本脲片 without 低血糖)", len(kept))
        return ()
    if relation == "adverse":
        kept = _rank(kept, (), counts)
        key = [value for value in kept if any(part in entity.name for part in data["key_adverse"].get(value, ()))]
        serious = [value for value in kept if value not in key
                   and any(word in value for word in emergencies().serious_adverse)][:MOST_SERIOUS_FIRST]
        kept = key + serious + [value for value in kept if value not in key and value not in serious]
    elif relation == "complication":
        kept = _rank(kept, data["major_complications"], counts)
    elif relation in ("indication", "function_indication") and graph.large:
        kept = _rank(kept, data["common_diseases"], counts)
    elif relation == "symptom" and graph.large:
        kept = sorted(kept, key=lambda value: (not words.specific(value), bool(alarm_symptoms([value])),
                                               -holders[value]))
    if relation == "contagious" and graph.large and kept == ["无"]:
        drop("a 'not contagious' the graph states for infections too (小儿扁桃体炎)")
        return ()
    if relation in OCR_PRONE and graph.large:
        typos = [value for value in kept if value not in words and graph.ocr_variant(relation, value)]
        drop("an OCR variant of a common value", len(typos))
        kept = [value for value in kept if value not in typos]
    if relation == "prescription" and (len(kept) > 1 or (graph.large and kept != ["prescription"])):
        drop("an OTC label the graph also gives prescription drugs" if graph.large else "conflicting label", len(kept))
        return ()
    if relation == "route":
        wrong = [value for value in kept if not route_fits(entity.name, value, data)]
        drop("a route its dosage form rules out", len(wrong))
        kept = [value for value in kept if value not in wrong]
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
        if any(typo in entity.name for typo in data["typos"]):
            stats.skipped_entities["a typo in the name"] += 1
            continue
        if entity.kind == "drug" and entity.name.endswith(tuple(data["disease_name_endings"])):
            stats.skipped_entities["a drug named like a disease"] += 1  # 晕动病 "的通用名是苯巴比妥东莨菪碱片"
            continue
        facts = {}
        for relation, values in entity.facts.items():
            curated = curated_values(entity, relation, values, graph, stats.dropped_values)
            if curated:
                facts[relation] = curated
        treated = set(entity.values("indication")) | set(entity.values("function_indication"))
        if treated & set(facts.get("adverse", ())):  # 复方联苯双酯片 "causes" 肝炎, which it is given for
            stats.dropped_values["an adverse effect the drug is given for"] += len(treated & set(facts["adverse"]))
            facts["adverse"] = tuple(value for value in facts["adverse"] if value not in treated)
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
