"""benchmarks/quality.py's questions and statistics (the experiment runs on the real model: see its docstring)."""

import random
import sys

from conftest import REPO

from utils.builder.graph import Entity

sys.path.insert(0, str(REPO / "benchmarks"))
import quality

WORDINGS = {"department": ["{e}看哪个科？", "{e}看"], "symptom": ["{e}有什么症状？", "{e}的症状是"]}


def disease(name, department, symptoms):
    facts = {"department": (department,), "symptom": tuple(symptoms)}
    return Entity(name, "disease", facts, {relation: ("x",) for relation in facts}, symptom_text="\n".join(symptoms))


def test_wrong_options_are_other_departments_values_and_never_the_diseases_own():
    group = [disease("甲病", "眼科", ["眼痛", "视力下降"]), disease("乙病", "眼科", ["畏光"]),
             disease("丙病", "骨科", ["关节痛", "眼痛加重"]), disease("丁病", "皮肤科", ["瘙痒", "皮疹"]),
             disease("戊病", "心内科", ["胸痛", "心悸"]), disease("己病", "骨科", ["腰痛"])]
    questions = quality.mc_questions(group, "trained", WORDINGS, random.Random(0))
    first = next(q for q in questions if q["entity"] == "甲病" and q["relation"] == "symptom")
    assert first["right"] == "眼痛" and first["question"] == "甲病有什么症状？" and first["opening"] == "甲病的症状是"
    for q in questions:
        entity = next(e for e in group if e.name == q["entity"])
        wrong = [o for o in q["options"] if o != q["right"]]
        assert len(set(q["options"])) == 4 and q["right"] == entity.values(q["relation"])[0]
        for option in wrong:
            owners = [e for e in group if option in e.values(q["relation"])]
            assert all(set(o.values("department")).isdisjoint(entity.values("department")) for o in owners)
            assert not any(option in own or own in option for own in entity.values(q["relation"]))
    # 眼痛加重 contains 甲病's 眼痛, 畏光 is a symptom of a disease of 甲病's department: never wrong options for 甲病
    assert not any(o in ("眼痛加重", "畏光") for q in questions if q["entity"] == "甲病" for o in q["options"])


def test_intervals():
    assert quality.wilson(0, 10) == [0.0, 27.8] and quality.wilson(10, 10) == [72.2, 100.0]
    rise = quality.compare([0] * 30 + [1] * 10, [1] * 35 + [0] * 5, seed=0)
    assert rise["before"] == 25.0 and rise["after"] == 87.5 and rise["rises_beyond_interval"]
    assert rise["change_95"][0] > 0 and rise["change_95"][0] < rise["change"] < rise["change_95"][1]
    same = quality.compare([1, 0] * 20, [0, 1] * 20, seed=0)
    assert same["change"] == 0 and not same["rises_beyond_interval"] and same["change_95"][0] < 0 < same["change_95"][1]
