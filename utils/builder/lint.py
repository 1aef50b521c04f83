"""Clinical lint of the rows a build writes: counters a clinician would ask for, checked on the final rows of either
backend, whatever path made them (the report prints them; the target of each is in docs/building_data.md).

- alarm sign without 120: the question or answer shows an alarm sign, a serious adverse effect or an emergency
  disease, and the answer does not name 120;
- single diagnosis from few non-specific symptoms: a vignette naming one disease from symptoms that could not point
  to one (no specific sign, fewer than four, or more than two non-specific ones);
- dose or interval: a dose, strength, dosing frequency or interval in an answer (OCR forms included; a follow-up
  interval such as "每六个月复查一次" is none);
- tautology: a row stating as a fact of an entity its own name or a part of it (a cause, a complication, an ingredient);
- excipient: an ingredient row listing an excipient (淀粉, 滑石粉, 蔗糖);
- invented reassurance: "不会被传染", "不用担心" and the like;
- contentless: nothing left once names and template words are taken out;
- restated fact: a row every fact of which an earlier row of the same entity already stated;
- evaluation pairs: rows about an (entity, relation) an evaluation question asks about.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from functools import cache
from typing import Any

from utils.builder import resources
from utils.builder.curation import vocabulary
from utils.builder.gates import ADDS_CONTENT, fact_units, named_in, row_pairs
from utils.builder.graph import Entity, predicate_map
from utils.builder.rows import Row
from utils.builder.safety import care_advice, contentless, dosing, items, reassurance, without_names


@cache
def _tautology_relations() -> frozenset[str]:
    return frozenset(name for name, spec in predicate_map().relations.items() if spec.no_name_parts)


def shown_symptoms(question: str) -> list[str]:
    """The vocabulary symptoms a question shows (longest first; a word inside a longer one found is not shown)."""
    return named_in(question, sorted((word for word in vocabulary().group if word in question), key=len, reverse=True))


def single_diagnosis_unsupported(row: Row) -> bool:
    if row.kind not in ("vignette", "llm_case"):
        return False
    shown = shown_symptoms(row.instruction)
    words = vocabulary()
    return not (any(words.specific(symptom) for symptom in shown)
                or (len(shown) >= 4 and sum(words.nonspecific(symptom) for symptom in shown) <= 2))


def tautology(row: Row, subjects: Mapping[str, Entity]) -> bool:
    """A value of the row that is its subject's name, or a part of it that the subject holds in a relation where
    that says nothing (a cause, a complication, an ingredient: 慢性肥厚性咽炎 "并发咽炎")."""
    if not row.entities or row.kind in ADDS_CONTENT:
        return False
    name = row.entities[0]
    entity = subjects.get(name)
    sensitive = {value for relation in _tautology_relations() for value in entity.values(relation)} if entity else set()
    return any(value == name or (value in name and value in sensitive) for value in row.values)


def excipient(row: Row) -> bool:
    """An excipient among the ingredients a row states (a dialogue: its last turn), or inside one of them (吐温80
    （包衣材料）)."""
    relations = row.relation.split("+")
    if "ingredient" not in (relations[-1:] if row.kind == "dialogue" else relations):
        return False
    excipients = set(resources.cleaning()["excipients"])
    return any(item in excipients for value in row.values for item in [value, *items(value)])


def lint(rows: Sequence[Row], entities: Sequence[Entity], eval_pairs: AbstractSet[tuple[str, str]] = frozenset(),
         ) -> dict[str, Any]:
    """The counters over the rows, in row order (restatement depends on it)."""
    subjects = {entity.name: entity for entity in entities}
    stated: set[tuple[str, str]] = set()
    counts = dict.fromkeys(("alarm_sign_without_120", "single_diagnosis_from_few_nonspecific_symptoms",
                            "dose_or_interval", "tautology", "excipient", "invented_reassurance", "contentless",
                            "restated_fact", "evaluation_pairs"), 0)
    for row in rows:
        question = row.instruction.rsplit("<user>:", 1)[-1]
        adverse = "adverse" in row.relation or "不良反应" in row.output or "副作用" in row.output
        counts["alarm_sign_without_120"] += bool(care_advice(question, row.output, adverse, row.entities))
        counts["single_diagnosis_from_few_nonspecific_symptoms"] += single_diagnosis_unsupported(row)
        counts["dose_or_interval"] += bool(dosing(without_names(row.output, row.entities)))
        counts["tautology"] += tautology(row, subjects)
        counts["excipient"] += excipient(row)
        counts["invented_reassurance"] += bool(reassurance(row.output))
        counts["contentless"] += contentless(row.output, row.entities)
        if row.kind not in ADDS_CONTENT:
            units = fact_units(row)
            counts["restated_fact"] += bool(units) and units <= stated
            stated |= units
        counts["evaluation_pairs"] += bool(eval_pairs and row_pairs(row) & eval_pairs)
    total = max(len(rows), 1)
    return counts | {"contentless_share": round(counts["contentless"] / total, 5),
                     "restated_share": round(counts["restated_fact"] / total, 5)}
