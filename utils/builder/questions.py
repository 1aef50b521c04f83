"""Question kinds about one entity: a fact, two facts at once, a patient's case with a drug or a test, a confirmed
diagnosis, and a multi-turn dialogue. Every answer states only the entity's own (clean) facts."""

from __future__ import annotations

import random
from collections.abc import Sequence

from utils.builder import resources
from utils.builder.graph import SPECIAL_RELATIONS, Entity
from utils.builder.rows import Row, capped, emergency_tail, fill, join, phrasing, sources

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
    answer = fill(rng.choice(table["answers"]), e=entity.name, v=join(values)) + emergency_tail(entity, (relation,))
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


def fact_rows(entity: Entity, rng: random.Random) -> list[Row]:
    """One question per relation, in one of its phrasings (never the same question twice with the same answer)."""
    rows = [fact_row(entity, relation, rng) for relation in askable(entity)]
    for relation in LABEL_RELATIONS:
        if entity.values(relation):
            row = label_row(entity, relation, rng)
            if row is not None:
                rows.append(row)
    return rows


def multi_fact_rows(entity: Entity, rng: random.Random, most: int = 2) -> list[Row]:
    """Two relations asked at once: `偏头痛有哪些常见症状？需要做哪些检查？`."""
    relations = [relation for relation in askable(entity) if relation not in SPECIAL_RELATIONS]
    pairs = [(a, b) for index, a in enumerate(relations) for b in relations[index + 1 :]]
    rows = []
    for first, second in rng.sample(pairs, min(most, len(pairs))):
        one, two = phrasing(entity.kind, first), phrasing(entity.kind, second)
        assert one is not None and two is not None
        follow = rng.choice(two["follow"]).removeprefix("那")
        question = fill(rng.choice(one["questions"]), e=entity.name) + "另外，" + follow
        answer = (fill(rng.choice(one["answers"]), e=entity.name, v=join(capped(entity, first)))
                  + fill(rng.choice(two["follow_answers"]), e=entity.name, v=join(capped(entity, second)))
                  + emergency_tail(entity, (first, second)))
        values = capped(entity, first) + capped(entity, second)
        rows.append(Row(question, answer, "multi_fact", (entity.name,), sources(entity, first, second),
                        f"{first}+{second}", values))
    return rows


def dialogue_rows(entity: Entity, rng: random.Random, turns: int) -> list[Row]:
    """A multi-turn dialogue in the literature shape (` <user>: q1 <bot>: a1 <user>: q2`): the first question names
    the entity, the later ones lean on it (`那需要做哪些检查？`)."""
    relations = [relation for relation in askable(entity) if relation not in SPECIAL_RELATIONS]
    if len(relations) < 2 or turns < 2:
        return []
    chosen = rng.sample(relations, min(turns, len(relations)))
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
    history = "".join(f" <user>: {question} <bot>: {answer}" for question, answer in pairs[:-1])
    instruction = f"{history} <user>: {pairs[-1][0]}"
    last = chosen[-1]
    answer = pairs[-1][1] + emergency_tail(entity, chosen)
    return [Row(instruction, answer, "dialogue", (entity.name,), sources(entity, *chosen), "+".join(chosen),
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
    tests = capped(entity, "test", 3)
    treatment, named = treatment_phrase(entity)
    if tests and treatment:
        question = fill(rng.choice(table["confirmed_treatment"]), p=patient, c=rng.choice(tests), e=entity.name)
        lead = fill(table["treat_unique"], t=treatment)
        answer = fill(rng.choice(table["confirmed_treatment_answer"]), t=lead.removesuffix("具体方案需由医生制定。"))
        rows.append(Row(question, answer, "case", (entity.name,),
                        sources(entity, "test", "drug_treatment", "treatment", "surgery"), "treatment", named))
    return rows


def drug_case_rows(entity: Entity, rng: random.Random) -> list[Row]:
    """Questions a patient asks about a prescribed drug; the answers never advise stopping or changing it alone."""
    table = resources.phrasings()["cases"]
    patient = rng.choice(resources.phrasings()["vignette"]["patients"])
    parts, used, named = [], [], []
    for relation, limit in (("adverse", 3), ("contraindication", 2), ("precaution", 2)):
        values = capped(entity, relation, limit)
        if values:
            parts.append(fill(table["drug_notes_parts"][relation], e=entity.name, v=join(values)))
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
        answer = fill(rng.choice(table["drug_effect_answer"]), e=entity.name, x=effect)
        rows.append(Row(question, answer, "case", (entity.name,), sources(entity, "adverse"), "adverse", (effect,)))
    return rows


def test_case_rows(entity: Entity, rng: random.Random) -> list[Row]:
    table = resources.phrasings()["cases"]
    patient = rng.choice(resources.phrasings()["vignette"]["patients"])
    rows = []
    for relation, questions, answers in (("purpose", "test_purpose", "test_purpose_answer"),
                                         ("related_disease", "test_abnormal", "test_abnormal_answer")):
        values = capped(entity, relation, 4)
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


def interleave(groups: Sequence[list[Row]]) -> list[Row]:
    """Round-robin over the groups, so a small `--per_entity` still gets some of every kind."""
    out: list[Row] = []
    for index in range(max((len(group) for group in groups), default=0)):
        out.extend(group[index] for group in groups if index < len(group))
    return out
