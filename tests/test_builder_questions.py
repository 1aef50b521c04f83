"""Question kinds: the vignette rule, differentials, emergencies, question/answer agreement, comparisons, multi-hop,
dialogues, each relation answered once, every kind of entity yielding rows, and the quality of rows built from a
deterministic subset of the real cMeKG graph."""

from __future__ import annotations

import random
import re

import pytest
from builder_support import cmekg_neighbourhood, cmekg_raw, cmekg_subset, entities_from

from utils.builder import resources
from utils.builder.crossing import GraphIndex, comparison_rows, multi_hop_rows, vignette_rows
from utils.builder.gates import GateCounts, LeakIndex, apply_gates
from utils.builder.graph import entity_name, predicate_map
from utils.builder.knowledge import TemplateOptions, entity_rows, template_options, template_rows, with_safety
from utils.builder.lint import lint
from utils.builder.literature import dialogue_turns
from utils.builder.questions import fact_rows
from utils.builder.report import SAMPLE_ROWS, distinct_bigram_ratio, duplicate_rate, sample
from utils.builder.safety import contentless, dose_or_frequency, is_emergency_disease, without_names

GRAPH = {
    # 咳嗽 and 咳痰 together: 甲病 and 乙病 (ambiguous, a differential); 咳嗽 and 盗汗: only 甲病, but two non-specific
    # symptoms never make one diagnosis; four with at most two non-specific ones may (痰中带血, 声音嘶哑)
    "甲病": {"常见症状": ["咳嗽", "咳痰", "盗汗", "痰中带血", "声音嘶哑"], "就诊科室": ["呼吸内科"], "检查": ["胸部CT"],
           "药物治疗": ["甲药"],
           "多发群体": ["老年人"], "高危因素": ["吸烟"], "并发症": ["丙病"], "常见病因": ["感染"]},
    "乙病": {"常见症状": ["咳嗽", "咳痰", "咯血"], "就诊科室": ["呼吸内科"], "检查": ["痰培养"],
           "常见病因": ["感染", "吸烟"]},
    "丙病": {"常见症状": ["胸痛", "呼吸困难"], "就诊科室": ["急诊科"]},
    "丁病": {"常见症状": ["皮疹", "瘙痒"], "就诊科室": ["皮肤科"]},
    "甲药": {"成份": ["乙成分"], "适应症": ["甲病"], "不良反应": ["恶心", "肝损害"], "禁忌": ["孕妇禁用"],
           "用法用量": ["口服，一次2片，一日3次"]},
    "急性心肌梗死": {"常见症状": ["胸骨后疼痛", "大汗", "恶心"], "就诊科室": ["心血管内科"]},
}


@pytest.fixture(scope="module")
def small() -> tuple[list, GraphIndex]:
    entities = entities_from(GRAPH)
    return entities, GraphIndex(entities)


def named(entities: list, name: str):
    return next(entity for entity in entities if entity.name == name)


def test_an_ambiguous_symptom_set_gets_a_differential_and_a_unique_one_a_diagnosis(small) -> None:
    entities, index = small
    assert index.candidates(("咳嗽", "咳痰")) == ["甲病", "乙病"]  # 甲病, which a drug treats, is the commoner
    assert index.candidates(("咳嗽", "盗汗")) == ["甲病"] and not index.diagnosable(("咳嗽", "盗汗"))
    assert index.diagnosable(("咳嗽", "盗汗", "痰中带血", "声音嘶哑"))
    rows = [row for seed in range(40) for row in vignette_rows(named(entities, "甲病"), index, seed, 8)]
    shows = {row.kind for row in rows}
    assert shows == {"vignette", "differential"}
    for row in rows:
        if row.kind == "differential":
            assert "甲病" in row.output and "乙病" in row.output
            assert "无法确定" in row.output or "不止一种" in row.output
            assert "呼吸内科" in row.output  # the department to see
            assert "可能患有" not in row.output and "首先考虑" not in row.output
        else:
            assert row.entities == ("甲病",) and "乙病" not in row.output and "不能确诊" in row.output
            assert index.diagnosable([s for s in GRAPH["甲病"]["常见症状"] if s in row.instruction]), row.instruction
    # The same symptom set gets the same differential, whoever it was drawn from, common candidates first.
    differentials = [row.output for row in rows if row.kind == "differential"]
    assert all("甲病、乙病等" in text for text in differentials)


def test_a_differential_leads_with_common_causes_and_keeps_an_emergency() -> None:
    symptoms = ["腹痛", "呕吐"]
    graph = {name: {"常见症状": symptoms, "就诊科室": ["普外科"]} for name in
             ("罕见甲病", "罕见乙病", "罕见丙病", "罕见丁病", "罕见戊病", "急性胃肠炎", "肠套叠")}
    entities = entities_from(graph)
    index = GraphIndex(entities)
    rows = [row for entity in entities for seed in range(3)
            for row in vignette_rows(entity, index, seed, 8) if row.kind == "differential"]
    assert rows
    for row in rows:
        assert row.entities[0] == "急性胃肠炎" and "肠套叠" in row.entities  # common first; the emergency kept
        assert "肠套叠属于急危重症" in with_safety(row).output


def test_emergencies_say_seek_care_now(small) -> None:
    entities, index = small
    heart = named(entities, "急性心肌梗死")
    symptom_row = with_safety(next(row for row in fact_rows(heart, random.Random(0)) if row.relation == "symptom"))
    assert "立即就医" in symptom_row.output and "120" in symptom_row.output
    rows = [with_safety(row) for seed in range(20) for row in vignette_rows(heart, index, seed, 8)]
    assert all("拨打120" in row.output for row in rows if "胸骨后疼痛" in row.instruction)


def test_a_serious_adverse_effect_says_stop_the_drug_and_seek_care(small) -> None:
    entities = entities_from({"甲药": {"适应症": ["甲病"], "不良反应": ["恶心", "过敏性休克"]}})
    rows = [with_safety(row) for row in fact_rows(entities[0], random.Random(0)) if row.relation == "adverse"]
    assert rows and all("立即停药" in row.output and "120" in row.output for row in rows)


def test_no_reassurance_the_graph_does_not_state() -> None:
    (entity,) = entities_from({"甲病": {"常见症状": ["皮疹", "瘙痒"], "传染性": ["无"]}})
    answers = {row.output for seed in range(30) for row in fact_rows(entity, random.Random(seed))
               if row.relation == "contagious"}
    assert answers and not [text for text in answers if "不会被传染" in text or "放心" in text]


def test_questions_and_answers_agree(small) -> None:
    entities, _ = small
    rows = {row.relation: row for row in fact_rows(named(entities, "甲病"), random.Random(1))}
    assert "老年人" in rows["population"].output and "吸烟" not in rows["population"].output
    assert "吸烟" in rows["risk_factor"].output and "老年人" not in rows["risk_factor"].output
    drug = {row.relation: row for row in fact_rows(named(entities, "甲药"), random.Random(1))}
    assert "乙成分" in drug["ingredient"].output
    assert "route" in drug and "口服" in drug["route"].output and not dose_or_frequency(drug["route"].output)


def test_comparisons_only_between_entities_that_share_something(small) -> None:
    entities, index = small
    compared: set[tuple[str, str]] = set()
    rows = comparison_rows(named(entities, "甲病"), index, 42, compared)
    assert {row.entities for row in rows} == {("甲病", "乙病")}
    assert any("都可能出现咳嗽、咳痰" in row.output for row in rows)
    assert any(row.relation == "cause" and "感染" in row.output for row in rows)  # they share a cause
    assert comparison_rows(named(entities, "乙病"), index, 42, compared) == []  # the pair is done
    assert comparison_rows(named(entities, "丁病"), index, 42, set()) == []  # nothing in common with anyone


def test_multi_hop_follows_the_graph(small) -> None:
    entities, index = small
    rows = [with_safety(row) for row in multi_hop_rows(named(entities, "甲病"), index, 42)]
    by_relation = {row.relation: row for row in rows}
    assert set(by_relation) == {"drug→adverse", "drug→contraindication", "complication→symptom"}
    assert "甲药" in by_relation["drug→adverse"].output and "肝损害" in by_relation["drug→adverse"].output
    assert "孕妇禁用" in by_relation["drug→contraindication"].output
    hop = by_relation["complication→symptom"]
    assert "丙病" in hop.instruction and "胸痛" in hop.output and "120" in hop.output  # 胸痛 is an alarm sign


def test_dialogues_are_multi_turn_in_the_published_shape(small) -> None:
    entities, index = small
    rows = [row for row in entity_rows(named(entities, "甲病"), index, TemplateOptions(per_entity=99), set())
            if row.kind == "dialogue"]
    assert rows
    turns = dialogue_turns(rows[0].instruction)
    assert turns is not None and len(turns) == 5 and turns[0][1].count("甲病") and "甲病" not in turns[-1][1]


def test_each_relation_of_an_entity_is_answered_once(small) -> None:
    """A relation answered in a dialogue's last turn, a two-relation question or a patient's case is not asked
    again as a plain question: no row only restates another."""
    entities, index = small
    rows = entity_rows(named(entities, "甲病"), index, TemplateOptions(per_entity=99), set())
    own = [row for row in rows if row.kind in ("fact", "multi_fact", "dialogue", "case")]
    answered = [relation for row in own for relation in
                ([row.relation.split("+")[-1]] if row.kind == "dialogue" else row.relation.split("+"))]
    assert len(answered) == len(set(answered)), answered
    assert {"fact", "multi_fact", "dialogue"} <= {row.kind for row in own}
    assert lint(own, entities)["restated_fact"] == 0


def test_an_entity_of_every_kind_with_usable_facts_yields_rows() -> None:
    """A test without a stated kind (its name says it), a formula, a procedure, a herb, a drug, a disease: each gets
    rows, and the report would list any entity that got none."""
    entities = entities_from({
        "糖化血红蛋白检查": {"用途": ["反映近2至3个月平均血糖水平"], "所属分类": ["血"]},
        "小柴胡汤": {"组成": ["柴胡", "黄芩", "人参"], "功用": ["和解少阳"], "主治": ["寒热往来", "口苦"]},
        "甲草": {"性味": ["味苦"], "功效": ["清热解毒"], "入药部位": ["根"]},
        "甲药": {"适应症": ["甲病"], "不良反应": ["恶心"]},
        "甲病": {"常见症状": ["发热", "咳嗽"], "就诊科室": ["呼吸内科"]},
    })
    from utils.builder.graph import Entity

    entities.append(Entity("阑尾切除术", "procedure", {"indication": ("急性阑尾炎",), "complication": ("切口感染",)},
                           {"indication": ("适应症",), "complication": ("并发症",)}))
    rows = apply_gates(template_rows(entities, TemplateOptions()), LeakIndex([], 0.8), 0.8, GateCounts())
    subjects = {row.entities[0] for row in rows}
    assert subjects >= {entity.name for entity in entities}, {entity.kind for entity in entities}
    test_row = next(row for row in rows if row.entities[0] == "糖化血红蛋白检查")
    assert "反映近2至3个月平均血糖水平" in test_row.output


@pytest.fixture(scope="module")
def cmekg_rows() -> list:
    entities = list(cmekg_subset())
    rows = template_rows(entities, TemplateOptions())
    return apply_gates(rows, LeakIndex([], 0.8), 0.8, GateCounts())


def test_rows_from_real_cmekg_meet_the_quality_targets(cmekg_rows: list) -> None:
    rows = cmekg_rows
    assert len(rows) > 5000
    # every kind (multi-hop needs the drug-disease links cMeKG's review turned off: tested on the small graph)
    assert {"fact", "multi_fact", "case", "vignette", "differential", "reverse", "compare",
            "dialogue"} <= {row.kind for row in rows}
    assert not [row.output for row in rows if dose_or_frequency(without_names(row.output, row.entities))]
    assert not [row.output for row in rows if contentless(row.output, row.entities)]
    assert duplicate_rate([row.instruction for row in rows]) <= 0.01
    assert duplicate_rate([row.output for row in rows]) <= 0.05
    assert distinct_bigram_ratio(sample([row.instruction for row in rows], SAMPLE_ROWS, 42)) >= 0.10
    assert max(row.output.count("、") for row in rows if row.kind == "fact") < 15  # no answer lists 16+ items
    for row in rows:
        assert row.predicates or row.kind == "reverse", row  # provenance
        if row.kind == "vignette":
            assert len(row.entities) == 1


def test_no_vignette_names_one_disease_when_the_graph_has_several(cmekg_rows: list) -> None:
    index = GraphIndex(list(cmekg_subset()))
    vignettes = [row for row in cmekg_rows if row.kind == "vignette"]
    assert len(vignettes) > 50
    for row in vignettes:
        shown = [value for value in row.values if value in row.instruction and value in index.symptom_holders]
        assert index.candidates(shown) == list(row.entities), row


# --- clinical checks on the real graph, independent of the builder's own look-ups ---------------------------------

_TEMPLATE_SLOT = re.compile(r"\\\{([a-z])\\\}")


def _template_regex(template: str) -> str:
    """A phrasing template as a regular expression: `{s}` (and `{a}`, `{b}`) capture, `{p}` matches the patient."""
    return _TEMPLATE_SLOT.sub(lambda m: f"(?P<{m.group(1)}>.+?)", re.escape(template))


def shown_symptoms(row) -> frozenset[str] | None:
    """The symptom set a vignette or a shared-symptom question shows, read back from its text: `甲、乙和丙` -> {甲, 乙,
    丙}. A value that itself joins symptoms with 和 falls apart here, as a reader would take it."""
    data = resources.phrasings()
    openings = sorted(data["vignette"]["openings"], key=len, reverse=True)
    endings = "|".join(map(re.escape, data["vignette"]["endings"].values()))
    patterns = [f"^{_template_regex(opening)}(?:{endings})$" for opening in openings]
    patterns += [f"^{_template_regex(question)}$" for question in data["shared_symptoms"]["questions"]]
    for pattern in patterns:
        match = re.match(pattern, row.instruction)
        if match:
            text = "和".join(match.group(slot) for slot in ("s", "a", "b") if slot in match.groupdict())
            return frozenset(part for part in re.split("[、和]", text) if part)
    return None


def reverse_lookup(row) -> bool:
    """`哪些疾病会出现咯血？`: a differential from one symptom, not a symptom set."""
    return any(re.match(f"^{_template_regex(question)}$", row.instruction)
               for question in resources.phrasings()["reverse"]["symptom"]["questions"])


def test_one_symptom_set_gets_one_answer_in_every_row(cmekg_rows: list) -> None:
    answers: dict[frozenset[str], set[tuple]] = {}
    read = 0
    for row in cmekg_rows:
        if row.kind not in ("vignette", "differential") or row.relation != "symptom" or reverse_lookup(row):
            continue
        shown = shown_symptoms(row)
        assert shown is not None, row.instruction
        read += 1
        answer = ("vignette", row.entities[0]) if row.kind == "vignette" else ("differential", row.entities[:5])
        answers.setdefault(shown, set()).add(answer)
    assert read > 400
    conflicting = {tuple(sorted(shown)): found for shown, found in answers.items() if len(found) > 1}
    assert not conflicting, list(conflicting.items())[:5]


def test_one_symptom_set_gets_one_answer_around_the_oesophagus() -> None:
    """The audit's case on the real subjects involved: 吞咽疼痛和吞咽困难 is one value of one disease in cMeKG, so
    吞咽疼痛、吞咽困难 and 呕血 got 原发性食管恶性黑色素瘤 in one row and 食管炎 in another."""
    entities = list(cmekg_neighbourhood("吞咽疼痛", "吞咽困难", "呕血"))
    index = GraphIndex(entities)
    answers: dict[frozenset[str], set[tuple]] = {}
    for entity in index.diseases:
        for seed in range(6):
            for row in vignette_rows(entity, index, seed, 8):
                answer = ("vignette", row.entities[0]) if row.kind == "vignette" else ("differential", row.entities[:5])
                answers.setdefault(shown_symptoms(row), set()).add(answer)
    assert len(answers) > 200
    conflicting = {tuple(sorted(shown)): found for shown, found in answers.items() if len(found) > 1}
    assert not conflicting, list(conflicting.items())[:5]


def test_a_single_diagnosis_fits_no_other_subject_of_the_raw_graph(cmekg_rows: list) -> None:
    """Against the source itself: no other subject of the graph the rows were built from lists (as a substring of
    its symptom values as written) every symptom a single-diagnosis vignette shows."""
    wanted = set(predicate_map().relations["symptom"].predicates)
    built_from = {entity.name for entity in cmekg_subset()}
    subjects = [(entity_name(raw.name), "\n".join(v for p, values in raw.predicates if p in wanted for v in values))
                for raw in cmekg_raw() if entity_name(raw.name) in built_from]
    subjects = [(name, text) for name, text in subjects if text]
    vignettes = [row for row in cmekg_rows if row.kind == "vignette"]
    assert len(vignettes) > 50
    violations = []
    for row in vignettes:
        shown = shown_symptoms(row)
        assert shown is not None, row.instruction
        others = [name for name, text in subjects if name != row.entities[0] and all(s in text for s in shown)]
        if others:
            violations.append((row.instruction, row.entities[0], others[:3]))
    assert not violations, (len(violations), len(vignettes), violations[:5])


def test_rows_showing_alarm_signs_say_seek_care_now(cmekg_rows: list) -> None:
    """Every row that shows symptoms (a vignette, a differential, a symptom list, a reverse look-up, a dialogue or a
    two-step question ending in symptoms) and shows an alarm sign, or is about an emergency disease, says 120."""
    data = resources.emergencies()
    missing = []
    for row in cmekg_rows:
        relations = re.split("[+→]", row.relation)
        if row.kind not in ("vignette", "differential") and "symptom" not in relations:
            continue
        question = row.instruction.rsplit("<user>:", 1)[-1]
        text = question + row.output
        for name in sorted(row.entities, key=len, reverse=True):  # a disease named 小儿便血 is no shown sign
            text = text.replace(name, "")
        alarms = [key for key in data["symptoms"] if key in text]
        alarms += ["+".join(picture) for picture in data["symptom_pictures"] if all(key in text for key in picture)]
        subjects = row.entities if row.kind in ("vignette", "differential", "reverse") else row.entities[-1:]
        urgent = [name for name in subjects if is_emergency_disease(name)]
        if (alarms or urgent) and not ("立即就医" in row.output and "120" in row.output):
            missing.append((row.kind, row.instruction[-60:], row.output[-80:], alarms, urgent))
    assert not missing, (len(missing), missing[:5])


@pytest.mark.parametrize(("name", "urgent"), [
    ("急性心肌梗死", True), ("小儿一氧化碳中毒", True), ("甲亢危象", True), ("失血性休克", True), ("急性脑疝", True),
    ("胃十二指肠溃疡大出血", True), ("大面积脑梗死", True), ("糖尿病酮症酸中毒", True),
    ("慢性铅中毒", False), ("陈旧性心肌梗死", False), ("肾小管性酸中毒", False), ("电休克", False),
    ("中毒性弱视", False), ("细菌性食物中毒检测", False), ("偏头痛", False),
])
def test_emergency_diseases_are_found_by_pattern_unless_chronic(name: str, urgent: bool) -> None:
    assert is_emergency_disease(name) is urgent


def test_alarm_signs_pictures_and_patients_say_120() -> None:
    entities = entities_from({
        "眼部肿瘤": {"常见症状": ["头痛", "眼压升高", "瞳孔散大"], "就诊科室": ["眼科"]},
        "乙眼病": {"常见症状": ["头痛", "眼压升高", "瞳孔散大", "流泪"], "就诊科室": ["眼科"]},
        "丙病": {"常见症状": ["偏侧瘫痪", "失语", "黑便"], "就诊科室": ["神经内科"]},
        "丁病": {"常见症状": ["乏力", "皮疹"], "就诊科室": ["皮肤科"], "多发群体": ["昏迷病人"]},
        "戊病": {"常见症状": ["乏力", "皮疹", "低热"], "就诊科室": ["皮肤科"]},
        "有机磷农药中毒": {"常见症状": ["流涎", "多汗"], "就诊科室": ["急诊科"]},
    })
    index = GraphIndex(entities)
    for name in ("眼部肿瘤", "丙病", "有机磷农药中毒"):
        row = with_safety(next(row for row in fact_rows(named(entities, name), random.Random(0))
                               if row.relation == "symptom"))
        assert "立即就医" in row.output and "120" in row.output, row.output
    glaucoma = [with_safety(row) for seed in range(30) for row in vignette_rows(named(entities, "眼部肿瘤"), index,
                                                                               seed, 8)
                if "瞳孔散大" in row.instruction and "眼压升高" in row.instruction]
    assert glaucoma and all("120" in row.output for row in glaucoma)
    comatose = [with_safety(row) for seed in range(30) for row in vignette_rows(named(entities, "丁病"), index, seed, 8)
                if "昏迷" in row.instruction]
    assert comatose and all("昏迷可能是急危重症" in row.output for row in comatose)
    calm = with_safety(next(row for row in fact_rows(named(entities, "戊病"), random.Random(0))
                            if row.relation == "symptom"))
    assert "120" not in calm.output


def test_cmekg_builds_by_default_only_the_kinds_its_review_passed(cmekg_subset_default: list) -> None:
    options, off = template_options("cmekg", "default", 42, 16, 3)
    assert {"vignette", "differential", "compare", "multi_hop", "reverse", "dialogue", "multi_fact"} == set(off)
    assert all(off.values()) and options.kinds == {"fact", "case"}
    assert template_options("data/knowledge_base.jsonl", "default", 42, 16, 3)[1] == {}
    assert template_options("cmekg", "all", 42, 16, 3)[1] == {}
    rows = cmekg_subset_default
    assert {row.kind for row in rows} == {"fact", "case"}
    counts = lint(rows, list(cmekg_subset()))
    zero = ("alarm_sign_without_120", "single_diagnosis_from_few_nonspecific_symptoms", "dose_or_interval",
            "tautology", "excipient", "invented_reassurance")
    assert {name: counts[name] for name in zero} == dict.fromkeys(zero, 0)
    assert counts["contentless_share"] <= 0.001 and counts["restated_share"] <= 0.10


@pytest.fixture(scope="module")
def cmekg_subset_default() -> list:
    options, _ = template_options("cmekg", "default", 42, 16, 3)
    return apply_gates(template_rows(list(cmekg_subset()), options), LeakIndex([], 0.8), 0.8, GateCounts())
