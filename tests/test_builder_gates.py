"""Each quality gate on its own: content, evaluation-question leaks (by text and by entity and relation), restated
facts, exact and near duplicates; the metrics; the dose and safety detectors the gates and the report share."""

from __future__ import annotations

import pytest
from builder_support import entities_from

from utils.builder.gates import (
    GateCounts,
    LeakIndex,
    apply_gates,
    content_gate,
    exact_gate,
    leak_gate,
    near_duplicate_flags,
    near_gate,
    restated_gate,
)
from utils.builder.lint import lint
from utils.builder.report import distinct_bigram_ratio, duplicate_rate
from utils.builder.rows import Row
from utils.builder.safety import care_advice, dose_or_frequency, dosing, without_names


def row(question: str, answer: str, values: tuple[str, ...] = ("发热",), entities: tuple[str, ...] = ("甲病",),
        relation: str = "symptom") -> Row:
    return Row(question, answer, "fact", entities, ("常见症状",), relation, values)


def test_content_gate_rejects_doses_contentless_and_tautologies() -> None:
    counts = GateCounts()
    rows = [
        row("甲病有哪些症状？", "甲病的常见症状包括发热、咳嗽。", ("发热", "咳嗽")),
        row("甲药怎么用？", "甲药口服，一次2片，一日3次。", ("口服",), ("甲药",)),
        row("甲药的用法用量？", "甲药的用法用量：遵医嘱。", ("遵医嘱",), ("甲药",)),
        row("阿莫西林的成分？", "阿莫西林的主要成分是阿莫西林。", ("阿莫西林",), ("阿莫西林",)),
        row("乙药的禁忌？", "乙药的禁忌：尚不明确。", ("尚不明确",), ("乙药",)),
    ]
    kept = content_gate(rows, counts)
    assert [r.output for r in kept] == ["甲病的常见症状包括发热、咳嗽。"]
    assert counts.rejected == {"dose or frequency in the answer": 1, "no fact": 2, "contentless": 1}


def test_leaks_exact_and_near_equal_questions_are_removed() -> None:
    index = LeakIndex(["高血压患者通常会出现哪些不适？", "糖尿病需要做哪些检查？"], threshold=0.8)
    counts = GateCounts()
    rows = [
        row("高血压患者通常会出现哪些不适？", "a"),  # equal
        row("高血压患者通常会出现哪些不适", "b"),  # near-equal (bigram Jaccard 0.93)
        row(" <user>: 你好 <bot>: 你好 <user>: 糖尿病需要做哪些检查？", "c"),  # the last turn of a dialogue
        row("高血压有哪些并发症？", "d"),  # unrelated
    ]
    kept = leak_gate(rows, index, counts)
    assert [r.output for r in kept] == ["d"]
    assert (counts.leaks_exact, counts.leaks_near) == (2, 1)


def test_exact_duplicates_of_questions_and_answers_go_first_one_wins() -> None:
    counts = GateCounts()
    rows = [row("q1", "a1"), row("q1", "a2"), row("q2", "a1"), row("q3", "a3")]
    assert [(r.instruction, r.output) for r in exact_gate(rows, counts)] == [("q1", "a1"), ("q3", "a3")]
    assert (counts.duplicate_questions, counts.duplicate_answers) == (1, 1)
    assert len(exact_gate(rows, GateCounts(), unique_answers=False)) == 3


def test_near_duplicates_are_found_by_minhash_and_confirmed_exactly() -> None:
    base = "急性胰腺炎有哪些常见症状？", "急性胰腺炎的常见症状包括腹痛、恶心、呕吐、发热、腹胀、黄疸。"
    rows = [
        row(*base),
        row("急性胰腺炎有哪些常见症状", base[1]),  # near-equal: kept out
        # another disease: kept
        row("慢性胰腺炎有哪些常见症状？", "慢性胰腺炎的常见症状包括腹痛、消瘦、脂肪泻、糖尿病。"),
    ]
    counts = GateCounts()
    kept = near_gate(rows, 0.8, counts)
    assert [r.instruction for r in kept] == [base[0], "慢性胰腺炎有哪些常见症状？"]
    assert counts.near_duplicates == 1


def test_all_gates_in_order() -> None:
    counts = GateCounts()
    rows = [row("甲病有哪些症状？", "甲病的常见症状包括发热、咳嗽。", ("发热", "咳嗽"))] * 3
    assert len(apply_gates(rows, LeakIndex([], 0.8), 0.8, counts)) == 1 and counts.restated == 2
    counts = GateCounts()
    rows = [row("甲病有哪些症状？", "甲病的常见症状包括发热、咳嗽。", ("发热", "咳嗽")),
            row("甲病有哪些症状？", "甲病常表现为咳痰。", ("咳痰",))]
    assert len(apply_gates(rows, LeakIndex([], 0.8), 0.8, counts)) == 1 and counts.duplicate_questions == 1


def test_a_row_that_only_restates_earlier_facts_of_its_entity_goes() -> None:
    """At most one row per (entity, relation, value set): a dialogue or a two-fact row that says nothing an earlier
    row of the same entity did not say is removed; one that adds a fact stays; a kind that adds content of its own
    (a comparison) goes only when the very same one came before."""
    plain = row("甲病有哪些症状？", "甲病的常见症状包括发热、咳嗽。", ("发热", "咳嗽"))
    again = Row(" <user>: 甲病看什么科？ <bot>: 呼吸内科。 <user>: 那会有什么表现？", "甲病常见的表现有发热、咳嗽。",
                "dialogue", ("甲病",), (), "department+symptom", ("发热", "咳嗽"))
    more = Row("甲病有哪些症状？另外，看什么科？", "甲病常表现为发热、咳嗽。甲病可以先到呼吸内科就诊。", "multi_fact",
               ("甲病",), (), "symptom+department", ("发热", "咳嗽", "呼吸内科"))
    other = Row("乙病有哪些症状？", "乙病的常见症状包括发热、咳嗽。", "fact", ("乙病",), (), "symptom",
                ("发热", "咳嗽"))
    compare = Row("甲病和乙病的症状有什么区别？", "都可能出现发热、咳嗽。", "compare", ("甲病", "乙病"), (), "symptom",
                  ("发热", "咳嗽"))
    counts = GateCounts()
    kept = restated_gate([plain, again, more, other, compare, compare], counts)
    assert kept == [plain, more, other, compare] and counts.restated == 2
    assert lint([plain, again, more], [])["restated_fact"] == 1  # the report's counter sees what the gate removes


def test_evaluation_questions_are_kept_out_by_entity_and_relation() -> None:
    """A reworded evaluation question is still a leak: the (entity, relation) it asks about is kept out of training,
    a subtype counts as its disease (糖尿病 for 2型糖尿病), and a diagnosis question is about the disease its golden
    answer names first."""
    entities = entities_from({
        "肝硬化": {"并发症": ["上消化道出血", "肝性脑病"], "检查": ["腹部超声"], "就诊科室": ["消化内科"]},
        "2型糖尿病": {"并发症": ["糖尿病肾病", "糖尿病足"], "常见症状": ["多饮", "多尿", "多食", "体重下降"]},
        "荨麻疹": {"常见病因": ["食物过敏"], "常见症状": ["风团", "瘙痒"]},
        "麻疹": {"常见病因": ["麻疹病毒"], "常见症状": ["发热", "皮疹"]},
    })
    index = LeakIndex(["小王被确诊为肝硬化，最需要警惕的并发症有哪些？",
                       "糖尿病患者长期血糖控制不佳，可能出现哪些并发症？", "湿疹和荨麻疹的病因是否一致？",
                       "小李近半年来多饮、多尿、体重下降，他可能患有什么病？"],
                      0.8, ["", "", "", "小李可能患有2型糖尿病，建议到内分泌科就诊。"])
    pairs = index.bind(entities)
    assert {("肝硬化", "complication"), ("2型糖尿病", "complication"), ("荨麻疹", "cause"),
            ("2型糖尿病", "diagnosis")} <= pairs
    assert ("麻疹", "cause") not in pairs  # 荨麻疹 names no 麻疹
    rows = [row("肝硬化可能引起哪些并发症？", "肝硬化可能出现的并发症包括上消化道出血、肝性脑病。", ("上消化道出血",),
                ("肝硬化",), "complication"),
            row("肝硬化去哪个科？", "肝硬化一般到消化内科就诊。", ("消化内科",), ("肝硬化",), "department"),
            Row("一位患者多饮、多尿、多食和体重下降，可能是什么病？", "需要考虑2型糖尿病的可能。", "vignette",
                ("2型糖尿病",), (), "symptom", ("多饮",)),
            row("麻疹是怎么引起的？", "麻疹的常见病因包括麻疹病毒。", ("麻疹病毒",), ("麻疹",), "cause")]
    counts = GateCounts()
    kept = leak_gate(rows, index, counts)
    assert [r.entities[0] for r in kept] == ["肝硬化", "麻疹"] and kept[0].relation == "department"
    assert counts.leaks_pair == 2 and lint(kept, entities, pairs)["evaluation_pairs"] == 0


@pytest.mark.parametrize(("text", "found"), [
    ("每次I6mg", True), ("一次l5毫克", True), ("1D0单位", True), ("O.5g", True), ("餐前30分钟服用", True),
    ("6小时内重复服用", True), ("间隔4小时", True), ("每4小时一次", True), ("0.5g", True), ("一日3次", True),
    ("高危人群应每六个月左右复查一次肝脏超声", False),  # a follow-up interval is no dose
    ("每六个月复查一次，并口服药物一日3次", True),
    ("ICU监护", False), ("COX2抑制剂", False), ("维生素D", False), ("2型糖尿病", False),
])
def test_doses_and_intervals_including_ocr_forms_are_found(text: str, found: bool) -> None:
    assert bool(dosing(text)) is found, text
    if found:
        assert dose_or_frequency(text)  # the knowledge gate drops what the report would count


def test_care_advice_names_120_for_alarm_signs_serious_adverse_effects_and_emergencies() -> None:
    assert "立即停药" in care_advice("", "甲药可能引起恶心、过敏性休克等不良反应。", adverse_context=True)
    assert "120" in care_advice("", "乙病常表现为胸痛、出汗。")
    assert "肠套叠属于急危重症" in care_advice("", "小儿腹痛可见于肠套叠、肠系膜淋巴结炎。")
    assert care_advice("", "慢性肠梗阻的常见症状包括腹胀。") == ""  # a chronic form is no emergency
    assert care_advice("", "甲药的禁忌包括休克、严重心力衰竭。") == ""  # who must not take it: no sign to act on
    assert care_advice("", "胰岛素可能引起昏迷等不良反应。", True, ("胰岛素注射液",)).count("不要自行停药") == 1
    assert care_advice("", "已拨打120。甲病可有昏迷。") == ""
    # a drug not to be stopped abruptly (its precaution says so, or the build knows it) is never "stopped now"
    nitrate = care_advice("", "甲片可能引起晕厥等不良反应；不应突然停止用药。", True, ("甲片",))
    assert "不要自行停药" in nitrate and "立即停药" not in nitrate
    assert "立即停药" not in care_advice("", "乙片可能引起晕厥等不良反应。", True, ("乙片",), keep=True)
    assert "120" in care_advice("", "多器官功能衰竭通常由内科诊治。", names=("多器官功能衰竭",))  # by its name
    assert care_advice("", "吸附破伤风疫苗可能引起头痛、红肿等不良反应。", True, ("吸附破伤风疫苗",)) == ""
    # a name is no dose: the gate and the lint read the answer without the row's entity names
    assert dose_or_frequency("盘龙七片的给药方式为口服。") and not dose_or_frequency(
        without_names("盘龙七片的给药方式为口服。", ("盘龙七片",)))
    assert dose_or_frequency("力度伸含有维生素C1克。")  # a mass right after a letter is a dose


def test_metrics_are_defined_as_documented() -> None:
    # distinct bigrams / all bigrams: 甲乙丙 -> 甲乙, 乙丙; 甲乙 -> 甲乙: 2 distinct of 3
    assert distinct_bigram_ratio(["甲乙丙", "甲 乙"]) == round(2 / 3, 4)
    assert duplicate_rate(["a", "a", "b", "c"]) == 0.25


def test_the_near_duplicate_gate_shows_progress(capsys) -> None:
    texts = [f"第{n}种病有哪些症状？第{n}种病的症状包括发热。" for n in range(5000)]  # more than one chunk
    flags = near_duplicate_flags(texts, 0.8, progress=True)
    assert len(flags) == len(texts)
    err = capsys.readouterr().err
    assert "near duplicates" in err and "5000/5000" in err
