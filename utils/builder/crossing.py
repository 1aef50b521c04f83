"""Question kinds that look across entities: symptom vignettes and differentials, reverse lookups, comparisons of
entities that share something, and multi-hop questions (disease -> drug -> side effect or contraindication,
disease -> complication -> symptoms).

Vignettes and differentials show only symptoms of the curated clinical-symptom vocabulary (`clinical.yaml`). One
diagnosis is named only when no other disease of the graph lists every shown symptom and the set could point to one
disease at all (a specific sign among them, or at least four symptoms of which at most two are non-specific); a
differential lists its candidates common ones first (the curated commonness list, then how often the graph names
them) and always keeps an emergency among them (the safety pass then says to seek care now)."""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

from utils.builder import resources
from utils.builder.curation import Vocabulary, vocabulary
from utils.builder.graph import Entity
from utils.builder.progress import progress_bar
from utils.builder.questions import patients_for, treatment_phrase
from utils.builder.rows import Row, capped, fill, join, join_and, rng_for, sources
from utils.builder.safety import bigrams, is_emergency_disease

MAX_LISTED = 6
DOSAGE_FORMS = ("肠溶片", "缓释片", "控释片", "分散片", "咀嚼片", "泡腾片", "片", "胶囊", "软胶囊", "颗粒", "注射液",
                "口服液", "糖浆", "丸", "散", "膏", "乳膏", "软膏", "滴眼液", "喷雾剂", "气雾剂", "栓", "贴")


@dataclass
class GraphIndex:
    """Look-ups across the whole graph, built once per build."""

    entities: Sequence[Entity]

    @cached_property
    def by_name(self) -> dict[str, Entity]:
        return {entity.name: entity for entity in self.entities}

    @cached_property
    def diseases(self) -> list[Entity]:
        return [entity for entity in self.entities if entity.kind == "disease"]

    @cached_property
    def vague(self) -> frozenset[str]:
        return frozenset(resources.cleaning()["vague_symptoms"])

    @cached_property
    def vocabulary(self) -> Vocabulary:
        return vocabulary()

    def specific_symptoms(self, entity: Entity) -> list[str]:
        """The disease's symptoms that a vignette may show: in the clinical-symptom vocabulary, not vague."""
        return [symptom for symptom in entity.values("symptom")
                if symptom in self.vocabulary and symptom not in self.vague]

    @cached_property
    def mentions(self) -> Counter[str]:
        """How many entities name each value: how often the graph speaks of a disease, a proxy of how common it is."""
        return Counter(value for entity in self.entities for value in set(entity.all_values()))

    @cached_property
    def _common(self) -> dict[str, int]:
        return {name: index for index, name in enumerate(resources.clinical()["common_diseases"])}

    def ranked(self, names: Sequence[str]) -> list[str]:
        """Common diseases first: the curated commonness list, then the ones the graph names most, then the name."""
        return sorted(names, key=lambda name: (self._common.get(name, len(self._common)), -self.mentions[name],
                                                len(name), name))

    @cached_property
    def symptom_holders(self) -> dict[str, set[str]]:
        """specific symptom -> names of the diseases that list it."""
        holders: dict[str, set[str]] = {}
        for disease in self.diseases:
            for symptom in self.specific_symptoms(disease):
                holders.setdefault(symptom, set()).add(disease.name)
        return holders

    @cached_property
    def _symptom_texts(self) -> tuple[list[Entity], dict[str, set[int]]]:
        """The diseases with source symptom text, and a posting list of its character bigrams (-> disease numbers)."""
        texts = [disease for disease in self.diseases if disease.symptom_text]
        postings: dict[str, set[int]] = {}
        for number, disease in enumerate(texts):
            for gram in bigrams(disease.symptom_text):
                postings.setdefault(gram, set()).add(number)
        return texts, postings

    @cached_property
    def _holders(self) -> dict[str, frozenset[str]]:
        return {}

    def holders(self, symptom: str) -> frozenset[str]:
        """Every disease listing the symptom: as a clean value, or anywhere in its source symptom text (`吞咽困难` in
        `吞咽疼痛和吞咽困难`, a value that cleaning split, trimmed or dropped). So a vignette names one disease only
        when no other disease of the graph mentions every shown symptom."""
        found = self._holders.get(symptom)
        if found is None:
            names = set(self.symptom_holders.get(symptom, ()))
            texts, postings = self._symptom_texts
            lists = sorted((postings.get(gram, set()) for gram in bigrams(symptom)), key=len)
            if lists and lists[0]:
                for number in lists[0].intersection(*lists[1:]):
                    if symptom in texts[number].symptom_text:
                        names.add(texts[number].name)
            found = self._holders[symptom] = frozenset(names)
        return found

    def candidates(self, symptoms: Sequence[str]) -> list[str]:
        """Every disease that lists all the shown symptoms, common ones first (deterministic)."""
        sets = sorted((self.holders(symptom) for symptom in symptoms), key=len)
        found = set(sets[0]).intersection(*sets[1:]) if sets else set()
        return self.ranked(sorted(found))

    def diagnosable(self, shown: Sequence[str]) -> bool:
        """Whether one diagnosis may be named from these symptoms at all: a specific sign among them, or at least
        four of which at most two are non-specific (never one diagnosis from two or three non-specific symptoms)."""
        words = self.vocabulary
        return any(words.specific(symptom) for symptom in shown) or (
            len(shown) >= 4 and sum(words.nonspecific(symptom) for symptom in shown) <= 2)

    @cached_property
    def drugs_by_key(self) -> dict[str, list[Entity]]:
        """A drug name, its generic name, or its name without the dosage form -> drug entities."""
        index: dict[str, list[Entity]] = {}
        for entity in self.entities:
            if entity.kind != "drug":
                continue
            keys = {entity.name, *entity.values("generic_name")}
            keys |= {re.sub(f"(?:{'|'.join(DOSAGE_FORMS)})$", "", key) for key in list(keys)}
            for key in sorted(keys):
                if len(key) >= 2:
                    index.setdefault(key, []).append(entity)
        return index

    @cached_property
    def drugs_by_indication(self) -> dict[str, list[Entity]]:
        index: dict[str, list[Entity]] = {}
        for entity in self.entities:
            if entity.kind == "drug":
                for value in entity.values("indication"):
                    index.setdefault(value, []).append(entity)
        return index


# --- vignettes ---------------------------------------------------------------------------------------------------


def _symptom_sets(symptoms: list[str], rng: random.Random, tries: int = 8) -> list[tuple[str, ...]]:
    """Up to `tries` distinct sets of 2-4 of the disease's symptoms, each in the disease's own order."""
    sets: list[tuple[str, ...]] = []
    for _ in range(tries):
        size = rng.randint(2, min(4, len(symptoms)))
        chosen = tuple(symptoms[index] for index in sorted(rng.sample(range(len(symptoms)), size)))
        if chosen not in sets:
            sets.append(chosen)
    return sets


def _departments(index: GraphIndex, names: Sequence[str]) -> list[str]:
    counts: Counter[str] = Counter()
    for name in names:
        counts.update(index.by_name[name].values("department")[:2])
    return [department for department, _ in counts.most_common(2)]


def vignette_answer(index: GraphIndex, shown: Sequence[str], names: Sequence[str], ending: str,
                    rng: random.Random, patient_ref: str, patient: str = "") -> tuple[str, tuple[str, ...]] | None:
    """The answer to a vignette about `shown` symptoms: one disease -> a hedged diagnosis; several -> the
    differential, always with a department. None when the graph lacks what the question asks for."""
    if len(names) > 1:
        return differential_answer(index, shown, names, ending, rng, patient)
    table = resources.phrasings()["vignette"]
    disease = index.by_name[names[0]]
    parts = [fill(rng.choice(table["unique"]), s=join_and(list(shown)), e=disease.name, r=patient_ref)
             + table["unique_caution"]]
    named: list[str] = []
    departments, tests = list(disease.values("department")[:2]), list(capped(disease, "test", 3))
    if ending == "treat":
        treatment, named_treatment = treatment_phrase(disease)
        if not treatment:
            return None
        parts.append(fill(table["treat_unique"], t=treatment))
        named.extend(named_treatment)
    if ending in ("department", "advice", "treat"):
        if not departments:
            return None
        parts.append(fill(table["department"], d="或".join(departments)))
        named.extend(departments)
    if ending in ("tests", "advice"):
        if not tests:
            return None
        parts.append(fill(table["tests"], t=join(tests)))
        named.extend(tests)
    return "".join(parts), tuple(named)


def listed_candidates(names: Sequence[str], most: int = 5) -> list[str]:
    """The candidates a differential names: the first (commonest) ones, and an emergency among them whatever its
    rank (it must be triaged, not cut)."""
    listed = list(names[:most])
    urgent = next((name for name in names if is_emergency_disease(name)), None)
    if urgent is not None and urgent not in listed:
        listed[-1] = urgent
    return listed


def differential_answer(index: GraphIndex, shown: Sequence[str], names: Sequence[str], ending: str,
                        rng: random.Random, patient: str = "") -> tuple[str, tuple[str, ...]] | None:
    """Several diseases fit: name them, say which department to see, and (when asked) which tests tell them apart."""
    table = resources.phrasings()["vignette"]
    listed = listed_candidates(names)
    departments = _departments(index, listed)
    if not departments:
        return None
    parts = [fill(rng.choice(table["differential"]), s=join_and(list(shown)), n=join(listed)),
             fill(table["department_differential"], d="或".join(departments))]
    named = listed + departments
    if ending in ("tests", "advice"):
        tests = list(dict.fromkeys(test for name in listed for test in index.by_name[name].values("test")[:1]))[:4]
        if not tests:
            return None
        parts.append(fill(table["tests_differential"], t=join(tests)))
        named.extend(tests)
    if ending == "treat":
        parts.append(table["treat_differential"])
    return "".join(parts), tuple(named)


def vignette_rows(entity: Entity, index: GraphIndex, seed: int, max_candidates: int,
                  kinds: frozenset[str] = frozenset(("vignette", "differential"))) -> list[Row]:
    """Up to two case vignettes from the disease's symptoms: one whose symptom set points to this disease alone
    and may point to one disease at all (a diagnosis), one whose set several diseases share (a differential)."""
    symptoms = index.specific_symptoms(entity)
    if len(symptoms) < 2:
        return []
    rng = rng_for(seed, "vignette", entity.name)
    table = resources.phrasings()["vignette"]
    unique, shared = None, None
    for shown in _symptom_sets(symptoms, rng):
        names = index.candidates(shown)
        if names == [entity.name] and unique is None and "vignette" in kinds and index.diagnosable(shown):
            unique = (shown, names)
        elif 1 < len(names) <= max_candidates and shared is None and "differential" in kinds:
            shared = (shown, names)
    rows = []
    for found in (unique, shared):
        if found is None:
            continue
        shown, names = found
        patient = rng.choice(patients_for(entity))
        ending = rng.choice(list(table["endings"]))
        answered = vignette_answer(index, shown, names, ending, rng, "该患儿" if "儿" in patient else "该患者", patient)
        if answered is None:
            continue
        question = fill(rng.choice(table["openings"]), p=patient, s=join_and(list(shown))) + table["endings"][ending]
        kind = "vignette" if len(names) == 1 else "differential"
        rows.append(Row(question, answered[0], kind, tuple(listed_candidates(names)), sources(entity, "symptom"),
                        "symptom", tuple(shown) + answered[1]))
    return rows


# --- reverse lookups ----------------------------------------------------------------------------------------------

REVERSE_KIND = {"adverse": "drug", "drug_class": "drug", "indication": "drug", "effect": "herb"}
REVERSE_MAX_HOLDERS = {"adverse": 40, "indication": 40, "drug_class": 200, "symptom": 60}


def reverse_rows(index: GraphIndex, seed: int, kinds: frozenset[str] = frozenset(("reverse", "differential")),
                 progress: bool = False) -> list[Row]:
    """From a value back to the entities holding it: `哪些药物可能引起便秘？`. Which diseases show a symptom is a
    differential: only for symptoms of the clinical vocabulary, common diseases first, an emergency always named."""
    specs = resources.phrasings()["reverse"]
    rows: list[Row] = []
    for relation, spec in progress_bar(list(specs.items()), "reverse look-ups", "relations", progress):
        kind = "differential" if relation == "symptom" else "reverse"
        if kind not in kinds:
            continue
        holders: dict[str, list[Entity]] = {}
        for entity in index.entities:
            if entity.kind == REVERSE_KIND.get(relation, "disease"):
                for value in entity.values(relation):
                    holders.setdefault(value, []).append(entity)
        most = REVERSE_MAX_HOLDERS.get(relation, 10**9)
        for value, found in holders.items():
            if len(found) < int(spec["min"]) or len(found) > most:
                continue
            if relation == "symptom" and (value not in index.vocabulary or value in index.vague):
                continue
            if relation == "symptom":
                shown = [index.by_name[name] for name in listed_candidates(index.ranked([e.name for e in found]),
                                                                           MAX_LISTED)]
            else:
                shown = found[: 8 if relation == "department" else MAX_LISTED]
            rng = rng_for(seed, "reverse", relation, value)
            question = fill(rng.choice(spec["questions"]), v=value)
            answer = fill(rng.choice(spec["answers"]), v=value, n=join([e.name for e in shown]))
            predicates = tuple(dict.fromkeys(p for e in shown for p in e.sources.get(relation, ())))
            rows.append(Row(question, answer, kind, tuple(e.name for e in shown), predicates, relation,
                            (value, *[e.name for e in shown])))
    return rows


def shared_symptom_rows(entity: Entity, index: GraphIndex, seed: int, max_candidates: int) -> list[Row]:
    """Two symptoms several diseases have in common -> which diseases (a differential, never one diagnosis)."""
    symptoms = index.specific_symptoms(entity)
    if len(symptoms) < 2:
        return []
    rng = rng_for(seed, "shared", entity.name)
    spec = resources.phrasings()["shared_symptoms"]
    for _ in range(4):
        first, second = rng.sample(symptoms, 2)
        names = index.candidates((first, second))
        if 2 <= len(names) <= max_candidates:
            shown = listed_candidates(names)  # the same candidates as a vignette's differential of the same set
            question = fill(rng.choice(spec["questions"]), a=first, b=second)
            answer = fill(rng.choice(spec["answers"]), a=first, b=second, n=join(shown))
            return [Row(question, answer, "differential", tuple(shown), sources(entity, "symptom"), "symptom",
                        (first, second, *shown))]
    return []


# --- comparisons --------------------------------------------------------------------------------------------------


def _contrast(a: Entity, b: Entity, relation: str, spec: dict, prefix: str, tail: str = "") -> tuple[str, tuple]:
    ours, theirs = a.values(relation), b.values(relation)
    shared = [value for value in ours if value in theirs][:4]
    only_a = [value for value in ours if value not in theirs][:3]
    only_b = [value for value in theirs if value not in ours][:3]
    parts = [fill(spec[f"{prefix}_shared"], a=a.name, b=b.name, v=join(shared), c=join(a.values("drug_class")[:1]))]
    extra = [fill(spec[f"{prefix}_only"], x=x.name, v=join(values))
             for x, values in ((a, only_a), (b, only_b)) if values]
    text = parts[0] + ("；" + "；".join(extra) if extra else "") + "。" + tail
    return text, tuple(shared + only_a + only_b)


def disease_partner(entity: Entity, index: GraphIndex) -> tuple[Entity, int] | None:
    """The disease of the same department (or class) sharing most vocabulary symptoms with this one (at least 2)."""
    counts: Counter[str] = Counter()
    for symptom in index.specific_symptoms(entity):
        holders = index.symptom_holders.get(symptom, set())
        if len(holders) <= 200:
            counts.update(holders)
    counts.pop(entity.name, None)
    related = set(entity.values("department")) | set(entity.values("parent"))

    def kin(name: str) -> bool:
        other = index.by_name[name]
        return bool(related & (set(other.values("department")) | set(other.values("parent"))))

    best = min((item for item in counts.items() if item[1] >= 2 and kin(item[0])),
               key=lambda item: (-item[1], item[0]), default=None)
    return (index.by_name[best[0]], best[1]) if best else None


def comparison_rows(entity: Entity, index: GraphIndex, seed: int, compared: set[tuple[str, str]]) -> list[Row]:
    """Diseases that share symptoms (and causes, when they share one); drugs of one class that share indications.
    `compared` holds the pairs already compared (either way round), so no pair is asked twice."""
    spec = resources.phrasings()["compare"]
    rng = rng_for(seed, "compare", entity.name)
    rows = []
    partner: Entity | None = None
    if entity.kind == "disease":
        found = disease_partner(entity, index)
        partner = found[0] if found else None
    elif entity.kind == "drug":
        partner = drug_partner(entity, index)
    if partner is None or tuple(sorted((entity.name, partner.name))) in compared:
        return []
    compared.add(tuple(sorted((entity.name, partner.name))))  # type: ignore[arg-type]
    if entity.kind == "disease":
        answer, values = _contrast(entity, partner, "symptom", spec, "symptoms", spec["symptoms_tail"])
        question = fill(rng.choice(spec["symptoms_questions"]), a=entity.name, b=partner.name)
        rows.append(Row(question, answer, "compare", (entity.name, partner.name), sources(entity, "symptom"),
                        "symptom", values))
        if set(entity.values("cause")) & set(partner.values("cause")):
            answer, values = _contrast(entity, partner, "cause", spec, "causes")
            question = fill(rng.choice(spec["causes_questions"]), a=entity.name, b=partner.name)
            rows.append(Row(question, answer, "compare", (entity.name, partner.name), sources(entity, "cause"),
                            "cause", values))
    else:
        answer, values = _contrast(entity, partner, "indication", spec, "drugs", spec["drugs_tail"])
        question = fill(rng.choice(spec["drugs_questions"]), a=entity.name, b=partner.name)
        rows.append(Row(question, answer, "compare", (entity.name, partner.name),
                        sources(entity, "indication", "drug_class"), "indication", values))
    return rows


def drug_partner(entity: Entity, index: GraphIndex) -> Entity | None:
    """A drug of the same class sharing at least two indications, not the same product in another form."""
    drug_class = entity.values("drug_class")[:1]
    indications = set(entity.values("indication"))
    if not drug_class or len(indications) < 2:
        return None
    generic = set(entity.values("generic_name")) | {entity.name}
    best: tuple[int, str] | None = None
    for value in sorted(indications):
        for other in index.drugs_by_indication.get(value, [])[:300]:
            if other.name == entity.name or other.values("drug_class")[:1] != drug_class:
                continue
            if other.name[:2] == entity.name[:2] or generic & (set(other.values("generic_name")) | {other.name}):
                continue
            shared = len(indications & set(other.values("indication")))
            if shared >= 2 and (best is None or (-shared, other.name) < (-best[0], best[1])):
                best = (shared, other.name)
    return index.by_name[best[1]] if best else None


# --- multi-hop -----------------------------------------------------------------------------------------------------


def treats(drug: Entity, disease: str) -> bool:
    """Whether the drug's own indications name the disease (糖尿病 for 2型糖尿病, 原发性高血压 for 高血压)."""
    return any(value == disease or (len(value) >= 2 and value in disease) or disease in value
               for value in drug.values("indication"))


def linked_drugs(entity: Entity, index: GraphIndex) -> list[Entity]:
    """Drug entities this disease is linked to from both sides: its 药物治疗 values found as drugs whose own
    indications name the disease; else drugs whose indications name the disease."""
    found: list[Entity] = []
    for value in entity.values("drug_treatment"):
        for drug in index.drugs_by_key.get(value, [])[:3]:
            if drug not in found and treats(drug, entity.name):
                found.append(drug)
    if not found:
        found = list(index.drugs_by_indication.get(entity.name, [])[:20])
    return found


def multi_hop_rows(entity: Entity, index: GraphIndex, seed: int) -> list[Row]:
    if entity.kind != "disease":
        return []
    spec = resources.phrasings()["multi_hop"]
    rng = rng_for(seed, "hop", entity.name)
    rows = []
    drugs = linked_drugs(entity, index)
    for relation, questions, answers in (("adverse", "drug_adverse", "drug_adverse_answer"),
                                         ("contraindication", "drug_contra", "drug_contra_answer")):
        usable = [drug for drug in drugs if drug.values(relation)]
        if usable:
            drug = rng.choice(usable)
            values = capped(drug, relation, 4)
            question = fill(rng.choice(spec[questions]), d=entity.name, e=drug.name)
            answer = fill(rng.choice(spec[answers]), d=entity.name, e=drug.name, v=join(values))
            link = ("drug_treatment",) if entity.values("drug_treatment") else ()
            rows.append(Row(question, answer, "multi_hop", (entity.name, drug.name),
                            sources(entity, *link) + sources(drug, "indication", relation), f"drug→{relation}",
                            values + (drug.name,)))
    complications = [index.by_name[name] for name in entity.values("complication")
                     if name in index.by_name and index.by_name[name].kind == "disease"
                     and index.by_name[name].values("symptom") and name != entity.name]
    if complications:
        other = rng.choice(complications)
        values = capped(other, "symptom", 5)
        question = fill(rng.choice(spec["complication_symptom"]), d=entity.name, c=other.name)
        answer = fill(rng.choice(spec["complication_symptom_answer"]), d=entity.name, c=other.name, v=join(values))
        rows.append(Row(question, answer, "multi_hop", (entity.name, other.name),
                        sources(entity, "complication") + sources(other, "symptom"), "complication→symptom",
                        values + (other.name,)))
    return rows
