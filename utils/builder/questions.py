"""Question kinds about one entity: a fact, two facts at once, a patient's case with a drug or a test, a confirmed
diagnosis, and a multi-turn dialogue. Every answer states only the entity's own (clean) facts, and each relation of
an entity is answered once (`single_entity_rows`): as a patient's case, two at once, the last turn of a dialogue or a
plain question, never all of them (a row that only restates what an earlier row said teaches nothing)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from collections.abc import Set as AbstractSet

from utils.builder import resources
from utils.builder.graph import SPECIAL_RELATIONS, Entity
from utils.builder.rows import Row, capped, fill, join, phrasing, sources
from utils.builder.safety import alarms, care_advice, keeps_taking, stopped_gradually

# Relations whose answers are labels: asked through their own phrasing tables, never combined or put in dialogues.
LABEL_RELATIONS = ("contagious", "prescription", "toxicity")


def askable(entity: Entity) -> list[str]:
    """The entity's relations that have a phrasing for its kind, in the predicate map's order."""
    return [relation for relation in entity.facts if relation not in LABEL_RELATIONS
            and phrasing(entity.kind, relation) is not None]


def fact_row(entity: Entity, relation: str, rng: random.Random) -> Row:
    table = phrasing(entity.kind, relation)
    assert table is not None
    values = capped(entity, relation)
    question = fill(rng.choice(table["questions"]), e=entity.name)
    answer = fill(rng.choice(table["answers"]), e=entity.name, v=join(values))
    return Row(question, answer, "fact", (entity.name,), sources(entity, relation), relation, values)


def label_row(entity: Entity, relation: str, rng: random.Random) -> Row | None:
    """传染性 / 处方药 / 毒性: the answer depends on the label the graph gives."""
    table = resources.phrasings()[relation]
    label = entity.values(relation)[0]
    if relation == "contagious":
        answers = table["contagious" if label == "有" else "not_contagious"]
    elif relation == "prescription":
        answers = table.get(label)
    else:
        answers = table["none" if label == "无毒" else "toxic"]
    if not answers:
        return None
    question = fill(rng.choice(table["questions"]), e=entity.name)
    answer = fill(rng.choice(answers), e=entity.name, v=label)
    return Row(question, answer, "fact", (entity.name,), sources(entity, relation), relation, (label,))


def fact_rows(entity: Entity, rng: random.Random, relations: Sequence[str] | None = None) -> list[Row]:
    """One question per relation (all of them unless `relations` names some), in one of its phrasings."""
    rows = [fact_row(entity, relation, rng) for relation in (askable(entity) if relations is None else relations)]
    for relation in LABEL_RELATIONS:
        if entity.values(relation):
            row = label_row(entity, relation, rng)
            if row is not None:
                rows.append(row)
    return rows


def multi_fact_row(entity: Entity, rng: random.Random, first: str, second: str) -> Row:
    """Two relations asked at once: `偏头痛有哪些常见症状？另外，需要做哪些检查？`."""
    one, two = phrasing(entity.kind, first), phrasing(entity.kind, second)
    assert one is not None and two is not None
    follow = rng.choice(two["follow"]).removeprefix("那")
    question = fill(rng.choice(one["questions"]), e=entity.name) + "另外，" + follow
    answer = (fill(rng.choice(one["answers"]), e=entity.name, v=join(capped(entity, first)))
              + fill(rng.choice(two["follow_answers"]), e=entity.name, v=join(capped(entity, second))))
    values = capped(entity, first) + capped(entity, second)
    return Row(question, answer, "multi_fact", (entity.name,), sources(entity, first, second), f"{first}+{second}",
               values)


def dialogue_rows(entity: Entity, rng: random.Random, turns: int, last: str | None = None,
                  allowed: AbstractSet[str] | None = None) -> list[Row]:
    """A multi-turn dialogue in the literature shape (` <user>: q1 <bot>: a1 <user>: q2`): the first question names
    the entity, the later ones lean on it (`那需要做哪些检查？`); its answer is about `last` (when given), every turn
    about one of the `allowed` relations (all when None); an earlier answer gets its care advice too."""
    relations = [relation for relation in askable(entity) if relation not in SPECIAL_RELATIONS
                 and (allowed is None or relation in allowed)]
    if len(relations) < 2 or turns < 2:
        return []
    if last is None:
        chosen = rng.sample(relations, min(turns, len(relations)))
    else:
        chosen = rng.sample([relation for relation in relations if relation != last],
                            min(turns, len(relations)) - 1) + [last]
    first = chosen[0]
    opening = phrasing(entity.kind, first)
    assert opening is not None
    pairs = [(fill(rng.choice(opening["questions"]), e=entity.name),
              fill(rng.choice(opening["answers"]), e=entity.name, v=join(capped(entity, first))))]
    for relation in chosen[1:]:
        table = phrasing(entity.kind, relation)
        assert table is not None
        pairs.append((rng.choice(table["follow"]),
                      fill(rng.choice(table["follow_answers"]), e=entity.name, v=join(capped(entity, relation)))))
    final = care_advice(pairs[-1][0], pairs[-1][1], chosen[-1] == "adverse", (entity.name,))
    said = {final}
    turns_text = []
    for (question, answer), relation in zip(pairs[:-1], chosen, strict=False):
        advice = care_advice(question, answer, relation == "adverse", (entity.name,))
        turns_text.append(f" <user>: {question} <bot>: {answer}{'' if advice in said else advice}")
        said.add(advice)
    history = "".join(turns_text)
    instruction = f"{history} <user>: {pairs[-1][0]}"
    last = chosen[-1]
    return [Row(instruction, pairs[-1][1], "dialogue", (entity.name,), sources(entity, *chosen), "+".join(chosen),
                capped(entity, last))]


# --- a patient's case ---------------------------------------------------------------------------------------------


def patients_for(entity: Entity) -> tuple[str, ...]:
    """Who a vignette is about: the disease's own population when it names people, else by department."""
    data = resources.cleaning()
    table = resources.phrasings()["vignette"]
    people = [person for person in entity.values("population") if person.endswith(tuple(data["person_endings"]))
              and not any(word in person for word in data["person_exclude"])]
    if people:
        return tuple(("一名" if person.endswith(tuple(data["child_words"])) else "一位") + person for person in people)
    departments = set(entity.values("department"))
    if departments & set(table["departments_for_children"]):
        return tuple(table["child_patients"])
    if departments & set(table["departments_for_women"]):
        return tuple(table["woman_patients"])
    return tuple(table["patients"])


def treatment_phrase(entity: Entity) -> tuple[str, tuple[str, ...]]:
    """`A、B等药物，以及C` from the treatment relations (never a dose), and the values it names."""
    drugs = capped(entity, "drug_treatment", 3)
    other = capped(entity, "treatment", 2) + capped(entity, "surgery", 2)
    parts = ([f"{join(drugs)}等药物"] if drugs else []) + ([join(other)] if other else [])
    return "，以及".join(parts), drugs + other


def confirmed_rows(entity: Entity, rng: random.Random) -> list[Row]:
    """A patient already diagnosed: which complications to watch for, what treatment follows the exams."""
    table = resources.phrasings()["vignette"]
    patient = rng.choice(patients_for(entity))
    rows = []
    complications = capped(entity, "complication")
    if complications:
        question = fill(rng.choice(table["confirmed_complication"]), p=patient, e=entity.name)
        answer = fill(rng.choice(table["confirmed_complication_answer"]), e=entity.name, v=join(complications))
        rows.append(Row(question, answer, "case", (entity.name,), sources(entity, "complication"), "complication",
                        complications))
    treatment, named = treatment_phrase(entity)
    if entity.values("drug_treatment") or entity.values("treatment"):  # never surgery alone: 高血压急症 "治疗: 透析"
        question = fill(rng.choice(table["confirmed_treatment"]), p=patient, e=entity.name)
        lead = fill(table["treat_unique"], t=treatment)
        answer = fill(rng.choice(table["confirmed_treatment_answer"]), t=lead.removesuffix("具体方案需由医生制定。"))
        used = [relation for relation in ("drug_treatment", "treatment", "surgery") if entity.values(relation)]
        rows.append(Row(question, answer, "case", (entity.name,), sources(entity, *used), "+".join(used), named))
    return rows


def counselled(effects: Sequence[str], shown: int = 3) -> list[str]:
    """The adverse effects a counselling answer names: the first ones of the ranked list (the key effect of the drug's
    class, the common ones) and its first serious one, which a patient must know to act on."""
    serious = [effect for effect in effects if alarms(f"可能引起{effect}", adverse_context=True).adverse][:1]
    return [effect for effect in effects if effect not in serious][: shown - len(serious)] + serious


def drug_case_rows(entity: Entity, rng: random.Random) -> list[Row]:
    """Questions a patient asks about a prescribed drug; the answers never advise stopping or changing it alone."""
    table = resources.phrasings()["cases"]
    patient = rng.choice(resources.phrasings()["vignette"]["patients"])
    parts, used, named = [], [], []
    for relation, limit in (("adverse", 3), ("contraindication", None), ("precaution", None)):
        values = counselled(capped(entity, relation)) if relation == "adverse" else capped(entity, relation, limit)
        if values:
            part = fill(table["drug_notes_parts"][relation], e=entity.name, v=join(values))
            parts.append(part.removeprefix(entity.name + "的") if used else part)
            used.append(relation)
            named.extend(values)
    rows = []
    if len(parts) >= 2:
        question = fill(rng.choice(table["drug_notes"]), p=patient, e=entity.name)
        rows.append(Row(question, "；".join(parts) + table["drug_notes_tail"], "case", (entity.name,),
                        sources(entity, *used), "+".join(used), tuple(named)))
    adverse = capped(entity, "adverse")
    for effect in rng.sample(adverse, min(1, len(adverse))):
        question = fill(rng.choice(table["drug_effect"]), p=patient, e=entity.name, x=effect)
        serious = alarms(f"可能引起{effect}", adverse_context=True).adverse and not any(
            keeps_taking(name) for name in (entity.name, *entity.values("generic_name"))) and not stopped_gradually(
            "".join(entity.values("precaution")))
        answer = fill(rng.choice(table["drug_effect_serious_answer" if serious else "drug_effect_answer"]),
                      e=entity.name, x=effect)
        rows.append(Row(question, answer, "case", (entity.name,), sources(entity, "adverse"), "adverse", (effect,)))
    return rows


def test_case_rows(entity: Entity, rng: random.Random) -> list[Row]:
    table = resources.phrasings()["cases"]
    patient = rng.choice(resources.phrasings()["vignette"]["patients"])
    rows = []
    for relation, questions, answers in (("purpose", "test_purpose", "test_purpose_answer"),
                                         ("related_disease", "test_abnormal", "test_abnormal_answer")):
        values = capped(entity, relation)
        if values:
            question = fill(rng.choice(table[questions]), p=patient, e=entity.name)
            answer = fill(rng.choice(table[answers]), e=entity.name, v=join(values))
            rows.append(Row(question, answer, "case", (entity.name,), sources(entity, relation), relation, values))
    return rows


def case_rows(entity: Entity, rng: random.Random) -> list[Row]:
    if entity.kind == "drug":
        return drug_case_rows(entity, rng)
    if entity.kind == "test":
        return test_case_rows(entity, rng)
    if entity.kind == "disease":
        return confirmed_rows(entity, rng)
    return []


def single_entity_rows(entity: Entity, rng: random.Random, turns: int, kinds: AbstractSet[str],
                       combinable: AbstractSet[str] | None = None) -> list[Row]:
    """The rows about one entity, each relation answered once: patient cases first (a relation a case states in full
    is not asked again), then one dialogue whose last turn answers a relation of its own, two relations asked at once,
    and a plain question for each relation left (label relations always plainly). Dialogues and two-relation rows
    combine only `combinable` relations (all when None)."""
    cases = case_rows(entity, rng) if "case" in kinds else []
    done = {relation for row in cases for relation in row.relation.split("+")
            if set(capped(entity, relation)) <= set(row.values)}
    left = [relation for relation in askable(entity) if relation not in done]
    pool = [relation for relation in left if relation not in SPECIAL_RELATIONS
            and (combinable is None or relation in combinable)]
    rows = list(cases)
    if "dialogue" in kinds and len(pool) >= 3:
        last = rng.choice(pool)
        rows += dialogue_rows(entity, rng, turns, last, combinable)
        left.remove(last)
        pool.remove(last)
    if "multi_fact" in kinds and len(pool) >= 3:
        first, second = rng.sample(pool, 2)
        rows.append(multi_fact_row(entity, rng, first, second))
        left = [relation for relation in left if relation not in (first, second)]
    if "fact" in kinds:
        rows += fact_rows(entity, rng, left)
    return rows


def interleave(groups: Sequence[list[Row]]) -> list[Row]:
    """Round-robin over the groups, so a small `--per_entity` still gets some of every kind."""
    out: list[Row] = []
    for index in range(max((len(group) for group in groups), default=0)):
        out.extend(group[index] for group in groups if index < len(group))
    return out
