"""Knowledge-tuning data, built the way BenTsao built its own (the original code was never released).

    python build_dataset.py knowledge --kb data/knowledge_base.jsonl --output data/llama_data.json
    python build_dataset.py literature --docs data_literature/documents.jsonl --output data_literature/liver_cancer.json

`knowledge` turns a cMeKG-style knowledge base (JSON Lines, one entity a line: `{"中心词": ..., "类型": ...,
"<relation>": [...]}`) into instruction rows `{instruction, input: "", output}` (JSON Lines). `literature` turns
documents (`{"title", "text"}` a line) into the published literature shape: a JSON array whose `instruction` holds
the dialogue so far as ` <user>: ... <bot>: ... <user>: ...` and whose `output` is the next bot reply.

`--backend template` (the default) is offline and deterministic for a `--seed`: every answer is put together only
from the entity's facts or the document's sentences. `--backend openai` asks any OpenAI-compatible chat-completions
server (`--api_base`, `--model`, `--api_key_env`), keeps only grounded answers, and with `--resume True` picks up
where an interrupted run stopped. See docs/building_data.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from utils import llm
from utils.core.cli import run_cli
from utils.core.errors import UserError
from utils.core.io import check_string_fields, read_jsonl_tolerant, read_records

DEFAULT_SEED = 42
DEFAULT_PER_ENTITY = 16
DEFAULT_TURNS = 3
BACKENDS = ("template", "openai")

CENTER_KEY = "中心词"
TYPE_KEY = "类型"
DISEASE, DRUG, TEST = "疾病", "药物", "检查"
KIND_ALIASES = {"药品": DRUG, "检验": TEST, "指标": TEST, "检查指标": TEST, "检验指标": TEST}
DRUG_ONLY_KEYS = {"不良反应", "禁忌", "用法用量", "成分", "药物类别"}
DISEASE_KEYS = {"相关症状", "所属科室", "发病部位", "并发症", "药物治疗", "辅助治疗", "手术治疗", "危险因素", "病因"}

# Lists in vignettes and reverse lookups are cut short: answers stay short enough for a tiny model to learn quickly.
MAX_VIGNETTE_ITEMS = 3
MAX_REVERSE_NAMES = 6
MAX_MULTI_ROWS = 4
MAX_ANSWER_CHARS = 160


# ----------------------------------------------------------------------------------------------------------------
# Knowledge base


@dataclass(frozen=True)
class Entity:
    """One knowledge-base line: a name, a kind (疾病/药物/检查/...) and its relations in file order."""

    name: str
    kind: str
    relations: tuple[tuple[str, tuple[str, ...]], ...]
    where: str = ""

    def values(self, relation: str) -> tuple[str, ...]:
        for key, values in self.relations:
            if key == relation:
                return values
        return ()

    @property
    def facts(self) -> tuple[str, ...]:
        return tuple(value for _, values in self.relations for value in values)


def _json_type(value: Any) -> str:
    names = {str: "a string", bool: "true/false", int: "a number", float: "a number", dict: "an object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def infer_kind(keys: Iterable[str]) -> str:
    """The entity kind when the line has no `类型`: drug-only keys mean a drug, disease keys a disease."""
    keys = set(keys)
    if keys & DRUG_ONLY_KEYS:
        return DRUG
    if keys & DISEASE_KEYS:
        return DISEASE
    return "其他"


def parse_entity(path: str | Path, where: str, row: dict[str, Any]) -> Entity:
    """Validate one knowledge-base object; every key but `中心词`/`类型` is a relation holding a list of strings."""
    name = row.get(CENTER_KEY)
    if name is None:
        raise UserError(f"{path} {where}: missing `{CENTER_KEY}` (the entity's name)")
    if not isinstance(name, str) or not name.strip():
        raise UserError(f"{path} {where}: `{CENTER_KEY}` must be a non-empty string, got {_json_type(name)}")
    name = name.strip()
    kind = row.get(TYPE_KEY)
    if kind is not None and not isinstance(kind, str):
        raise UserError(f"{path} {where}: `{TYPE_KEY}` of `{name}` must be a string, got {_json_type(kind)}")
    relations = []
    for key, value in row.items():
        if key in (CENTER_KEY, TYPE_KEY):
            continue
        if not isinstance(value, list):
            raise UserError(
                f"{path} {where}: relation `{key}` of `{name}` must be a list of strings, got {_json_type(value)}"
            )
        items: list[str] = []
        for item in value:
            if not isinstance(item, str):
                raise UserError(
                    f"{path} {where}: relation `{key}` of `{name}` must be a list of strings, "
                    f"it holds {_json_type(item)}"
                )
            if item.strip() and item.strip() not in items:
                items.append(item.strip())
        if items and key.strip():
            relations.append((key.strip(), tuple(items)))
    kind = (kind or "").strip()
    kind = KIND_ALIASES.get(kind, kind) or infer_kind(key for key, _ in relations)
    return Entity(name=name, kind=kind, relations=tuple(relations), where=where)


def load_entities(path: str | Path) -> list[Entity]:
    """All entities of a knowledge base, in file order; a name defined twice is an error."""
    entities: list[Entity] = []
    first_seen: dict[str, str] = {}
    for where, row in read_records(path):
        entity = parse_entity(path, where, row)
        if entity.name in first_seen:
            raise UserError(
                f"{path} {where}: `{CENTER_KEY}` `{entity.name}` is already defined at {first_seen[entity.name]}"
            )
        first_seen[entity.name] = where
        entities.append(entity)
    return entities


# ----------------------------------------------------------------------------------------------------------------
# Phrasings. `{e}` is the entity, `{v}` the relation's values joined with 、, `{k}` the relation's name.


@dataclass(frozen=True)
class Phrasing:
    questions: tuple[str, ...]
    answers: tuple[str, ...]
    follow: str  # the same question without the entity, for the second half of a two-relation question


P = Phrasing
PHRASINGS: dict[tuple[str, str], Phrasing] = {
    ("*", "相关症状"): P(
        ("{e}有哪些常见症状？", "{e}的主要表现是什么？", "得了{e}会有哪些症状？", "{e}患者通常会出现哪些不适？"),
        ("{e}的常见症状包括{v}。", "{e}常表现为{v}。", "{e}患者可出现{v}等表现。"),
        "有哪些症状？",
    ),
    ("*", "所属科室"): P(
        ("{e}应该挂哪个科？", "得了{e}去哪个科室看？", "{e}属于哪个科室诊治？"),
        ("{e}一般到{v}就诊。", "{e}通常由{v}诊治。"),
        "应该去哪个科室就诊？",
    ),
    ("*", "发病部位"): P(
        ("{e}主要发生在什么部位？", "{e}会累及身体哪些部位？"),
        ("{e}主要累及{v}。", "{e}的发病部位主要是{v}。"),
        "主要发生在什么部位？",
    ),
    ("*", "病因"): P(
        ("{e}的病因是什么？", "{e}是怎么引起的？", "为什么会得{e}？"),
        ("{e}的常见病因包括{v}。", "{e}主要由{v}引起。"),
        "病因是什么？",
    ),
    ("*", "危险因素"): P(
        ("哪些因素会增加患{e}的风险？", "{e}的危险因素有哪些？", "哪些人更容易得{e}？"),
        ("{e}的危险因素包括{v}。", "{v}等因素会增加患{e}的风险。"),
        "有哪些危险因素？",
    ),
    ("*", "多发人群"): P(
        ("{e}多见于哪些人群？", "哪些人容易患{e}？"),
        ("{e}多见于{v}。", "{e}的多发人群是{v}。"),
        "多见于哪些人群？",
    ),
    ("*", "并发症"): P(
        ("{e}可能引起哪些并发症？", "{e}如果控制不好会有什么并发症？", "{e}最需要警惕的并发症有哪些？"),
        ("{e}可能出现的并发症包括{v}。", "{e}的常见并发症有{v}，应规范治疗并定期复查。"),
        "可能有哪些并发症？",
    ),
    ("*", "检查"): P(
        ("{e}需要做哪些检查？", "怎样确诊{e}？", "诊断{e}常用哪些检查？"),
        ("诊断{e}常用的检查有{v}。", "{e}通常需要做{v}等检查。"),
        "需要做哪些检查？",
    ),
    ("*", "组织学检查"): P(
        ("{e}需要做哪些组织学检查？", "{e}的病理诊断依靠什么？"),
        ("{e}的组织学检查包括{v}。", "{e}的病理诊断可通过{v}获得。"),
        "需要做哪些组织学检查？",
    ),
    ("*", "药物治疗"): P(
        ("{e}用什么药治疗？", "治疗{e}的常用药物有哪些？", "{e}可以用哪些药？"),
        ("{e}的常用药物有{v}，具体用药请遵医嘱。", "治疗{e}可选用{v}等药物，需在医生指导下使用。"),
        "常用哪些药物治疗？",
    ),
    ("*", "辅助治疗"): P(
        ("除了药物，{e}还有哪些治疗方法？", "{e}有哪些辅助治疗？"),
        ("{e}的辅助治疗包括{v}。", "{e}还可以采取{v}等措施。"),
        "还有哪些辅助治疗？",
    ),
    ("*", "手术治疗"): P(
        ("{e}有哪些手术治疗方式？", "{e}需要做手术吗？有哪些手术方式？"),
        ("{e}的手术治疗方式包括{v}，是否手术需由医生评估后决定。", "{e}可选择的手术有{v}。"),
        "有哪些手术治疗方式？",
    ),
    ("*", "相关疾病"): P(
        ("{e}和哪些疾病有关？", "与{e}相关的疾病有哪些？"),
        ("与{e}相关的疾病有{v}。", "{e}常与{v}相关。"),
        "与哪些疾病相关？",
    ),
    ("*", "用途"): P(
        ("{e}有什么作用？", "{e}主要用于治疗什么？", "{e}适用于哪些情况？"),
        ("{e}主要用于{v}。", "{e}可用于{v}，需在医生指导下使用。"),
        "主要用于什么？",
    ),
    ("*", "不良反应"): P(
        ("{e}有哪些副作用？", "使用{e}可能出现哪些不良反应？", "{e}的常见不良反应是什么？"),
        ("{e}可能引起{v}等不良反应。", "使用{e}可能出现{v}，如有不适应及时就医。"),
        "有哪些不良反应？",
    ),
    ("*", "禁忌"): P(
        ("哪些人不能用{e}？", "{e}有哪些禁忌？", "什么情况下不宜使用{e}？"),
        ("{e}的禁忌包括{v}。", "以下情况不宜使用{e}：{v}。"),
        "哪些人不宜使用？",
    ),
    ("*", "用法用量"): P(
        ("{e}怎么用？", "{e}的用法用量是什么？", "使用{e}有什么讲究？"),
        ("{e}的用法用量：{v}。",),
        "应该怎么用？",
    ),
    ("*", "成分"): P(
        ("{e}的主要成分是什么？", "{e}含有哪些成分？"),
        ("{e}的主要成分是{v}。",),
        "主要成分是什么？",
    ),
    ("*", "药物类别"): P(
        ("{e}属于哪一类药物？", "{e}是什么药？"),
        ("{e}属于{v}。", "{e}是一种{v}。"),
        "属于哪类药物？",
    ),
    ("*", "注意事项"): P(
        ("使用{e}需要注意什么？", "{e}有哪些注意事项？"),
        ("使用{e}时需要注意：{v}。",),
        "需要注意什么？",
    ),
    (TEST, "用途"): P(
        ("{e}主要用来查什么？", "为什么要做{e}？", "{e}有什么临床意义？"),
        ("{e}主要用于{v}。", "{e}的作用包括{v}。"),
        "主要用来查什么？",
    ),
    (TEST, "相关疾病"): P(
        ("{e}异常可能与哪些疾病有关？", "哪些疾病常需要做{e}？"),
        ("{e}常用于{v}等疾病的诊断或监测。", "与{e}相关的疾病包括{v}。"),
        "与哪些疾病相关？",
    ),
    (TEST, "注意事项"): P(
        ("做{e}前需要注意什么？", "{e}有哪些注意事项？"),
        ("做{e}需要注意：{v}。",),
        "需要注意什么？",
    ),
}


def generic_phrasing(relation: str) -> Phrasing:
    """Any relation not in the table still reads sensibly: `{e}的传播途径有哪些？` -> `{e}的传播途径包括…。`"""
    return Phrasing(
        questions=(f"{{e}}的{relation}有哪些？", f"请介绍一下{{e}}的{relation}。", f"关于{{e}}，{relation}包括什么？"),
        answers=(f"{{e}}的{relation}包括{{v}}。", f"{{e}}的{relation}主要有{{v}}。"),
        follow=f"{relation}有哪些？",
    )


def phrasing_for(kind: str, relation: str) -> Phrasing:
    return PHRASINGS.get((kind, relation)) or PHRASINGS.get(("*", relation)) or generic_phrasing(relation)


def fill(template: str, **slots: str) -> str:
    """`str.format` without its braces pitfalls: a value or relation name holding `{` stays as written."""
    for name, value in slots.items():
        template = template.replace("{" + name + "}", value)
    return template


def join(values: Sequence[str]) -> str:
    return "、".join(values)


def join_and(values: Sequence[str]) -> str:
    """`甲、乙和丙`: the way a patient lists symptoms."""
    return values[0] if len(values) == 1 else "、".join(values[:-1]) + "和" + values[-1]


# ----------------------------------------------------------------------------------------------------------------
# Template rows


@dataclass(frozen=True)
class Row:
    """One instruction row, with what it was built from (for reports and tests; not written out)."""

    instruction: str
    output: str
    kind: str
    sources: tuple[str, ...]

    def record(self) -> dict[str, str]:
        return {"instruction": self.instruction, "input": "", "output": self.output}


def single_rows(entity: Entity, rng: random.Random) -> tuple[list[Row], list[Row]]:
    """One question per relation (the coverage rows) and the other phrasings of the same questions (extras)."""
    coverage: list[Row] = []
    extras: list[Row] = []
    for relation, values in entity.relations:
        phrasing = phrasing_for(entity.kind, relation)
        questions = list(phrasing.questions)
        rng.shuffle(questions)
        for rank, question in enumerate(questions):
            answer = fill(rng.choice(phrasing.answers), e=entity.name, v=join(values))
            row = Row(fill(question, e=entity.name), answer, "single", (entity.name,))
            (coverage if rank == 0 else extras).append(row)
    return coverage, extras


def multi_relation_rows(entity: Entity, rng: random.Random) -> list[Row]:
    """Two relations asked at once: `偏头痛有哪些常见症状？需要做哪些检查？`."""
    pairs = [(a, b) for i, a in enumerate(entity.relations) for b in entity.relations[i + 1 :]]
    rows = []
    for (first, first_values), (second, second_values) in rng.sample(pairs, min(MAX_MULTI_ROWS, len(pairs))):
        one, two = phrasing_for(entity.kind, first), phrasing_for(entity.kind, second)
        question = fill(rng.choice(one.questions), e=entity.name) + two.follow
        answer = fill(rng.choice(one.answers), e=entity.name, v=join(first_values)) + fill(
            rng.choice(two.answers), e=entity.name, v=join(second_values)
        )
        if len(answer) <= MAX_ANSWER_CHARS:
            rows.append(Row(question, answer, "multi", (entity.name,)))
    return rows


GENERIC_PATIENTS = ("一位患者", "一名患者", "患者", "小张", "小王", "小李", "小陈")
CHILD_WORDS = ("儿童", "青少年", "婴幼儿", "新生儿", "幼儿", "婴儿")


def patients_for(entity: Entity) -> tuple[str, ...]:
    """Who a vignette is about: the entity's own 多发人群 when it has one (a fact, so never a contradiction)."""
    people = entity.values("多发人群")
    if people:
        return tuple(("一名" if person.endswith(CHILD_WORDS) else "一位") + person for person in people)
    departments = entity.values("所属科室")
    if "产科" in departments:
        return ("一位孕妇",)
    if "妇科" in departments:
        return ("一位女性患者", "一名女性患者")
    if "儿科" in departments or "新生儿科" in departments:
        return ("一名儿童",)
    return GENERIC_PATIENTS


def patient_ref(patient: str) -> str:
    """How the answer refers back to the patient of the question."""
    if patient.startswith("小"):
        return patient
    return "该患儿" if patient.endswith(("儿童", "婴幼儿", "新生儿", "幼儿", "婴儿")) else "该患者"


def department_sentence(entity: Entity) -> str:
    departments = entity.values("所属科室")[:2]
    return f"建议到{'或'.join(departments)}就诊。" if departments else ""


def exam_sentence(entity: Entity) -> str:
    checks = entity.values("检查")[:MAX_VIGNETTE_ITEMS]
    return f"可完善{join(checks)}等检查以明确诊断。" if checks else ""


def treatment_sentence(entity: Entity) -> str:
    """`治疗上可在医生指导下使用…等药物，配合…，必要时可考虑…。` from whichever treatment relations exist."""
    parts = []
    drugs = entity.values("药物治疗")[:MAX_VIGNETTE_ITEMS]
    if drugs:
        parts.append(f"可在医生指导下使用{join(drugs)}等药物")
    supportive = entity.values("辅助治疗")[:2]
    if supportive:
        parts.append(("配合" if parts else "可采取") + join(supportive))
    surgery = entity.values("手术治疗")[:2]
    if surgery:
        parts.append(f"必要时可考虑{join(surgery)}")
    return "治疗上" + "，".join(parts) + "。" if parts else ""


def exam_phrase(check: str) -> str:
    """`胃镜` -> `胃镜检查`, but `骨密度检查` stays as it is."""
    endings = ("检查", "试验", "测定", "评估", "造影", "监测", "检测", "测量", "活检")
    return check if check.endswith(endings) else check + "检查"


def vignette_rows(entity: Entity, rng: random.Random) -> list[Row]:
    """Case vignettes in the published style: `一位患者出现X、Y和Z，可能患什么病？如何治疗？`."""
    symptoms = entity.values("相关症状")
    rows = []
    if len(symptoms) >= 2:
        endings = [
            ("可能患什么病？如何治疗？", [treatment_sentence(entity)]),
            ("可能是什么疾病？应该去哪个科室就诊？", [department_sentence(entity)]),
            ("可能是什么病？需要做哪些检查？", [exam_sentence(entity)]),
            ("请问可能是什么疾病？应该怎么办？", [department_sentence(entity), exam_sentence(entity)]),
        ]
        openings = ("{p}出现{s}，", "{p}最近出现{s}等症状，", "{p}因{s}前来就诊，")
        for ending, sentences in endings:
            if not all(sentences):
                continue
            patient = rng.choice(patients_for(entity))
            chosen = sorted(rng.sample(range(len(symptoms)), rng.randint(2, min(4, len(symptoms)))))
            shown = [symptoms[i] for i in chosen]
            question = fill(rng.choice(openings), p=patient, s=join_and(shown)) + ending
            diagnosis = rng.choice(
                (f"{patient_ref(patient)}可能患有{entity.name}。", f"出现{join(shown)}，需要考虑{entity.name}的可能。")
            )
            rows.append(Row(question, diagnosis + "".join(sentences), "vignette", (entity.name,)))
    rows.extend(confirmed_case_rows(entity, rng))
    return [row for row in rows if len(row.output) <= MAX_ANSWER_CHARS]


def confirmed_case_rows(entity: Entity, rng: random.Random) -> list[Row]:
    """A patient already diagnosed: which complications to watch for, which treatment after the exams."""
    rows = []
    patient = rng.choice(patients_for(entity))
    complications = entity.values("并发症")
    if complications:
        question = f"{patient}被确诊为{entity.name}，最需要警惕哪些并发症？"
        rows.append(
            Row(
                question,
                f"{entity.name}可能出现的并发症包括{join(complications)}，应规范治疗并定期复查。",
                "vignette",
                (entity.name,),
            )
        )
    checks, treatment = entity.values("检查"), treatment_sentence(entity)
    if checks and treatment:
        question = f"{patient}经过{exam_phrase(rng.choice(checks))}确诊为{entity.name}，应该采取哪些治疗方案？"
        rows.append(Row(question, treatment + "具体方案需由医生根据病情制定。", "vignette", (entity.name,)))
    return rows


def drug_case_rows(entity: Entity, rng: random.Random) -> list[Row]:
    """Questions a patient asks about a prescribed drug; answers never advise stopping or changing it alone."""
    rows = []
    patient = rng.choice(GENERIC_PATIENTS)
    adverse, contraindications, notes = entity.values("不良反应"), entity.values("禁忌"), entity.values("注意事项")
    parts = []
    if adverse:
        parts.append(f"{entity.name}可能引起{join(adverse[:MAX_VIGNETTE_ITEMS])}等不良反应")
    if contraindications:
        parts.append(f"{join(contraindications[:2])}不宜使用")
    if notes:
        parts.append(join(notes[:2]))
    if parts:
        question = f"医生给{patient}开了{entity.name}，用药期间需要注意什么？"
        rows.append(Row(question, "；".join(parts) + "。请遵医嘱用药。", "vignette", (entity.name,)))
    for effect in rng.sample(adverse, min(2, len(adverse))):
        question = f"{patient}在使用{entity.name}后出现了{effect}，这和药物有关吗？"
        answer = f"{effect}是{entity.name}可能出现的不良反应之一，建议及时就医，由医生评估是否需要调整用药。"
        rows.append(Row(question, answer, "vignette", (entity.name,)))
    for condition in rng.sample(contraindications, min(2, len(contraindications))):
        question = f"{condition}能用{entity.name}吗？"
        answer = f"{condition}属于{entity.name}的禁忌，一般不宜使用，请咨询医生选择合适的药物。"
        rows.append(Row(question, answer, "vignette", (entity.name,)))
    return [row for row in rows if len(row.output) <= MAX_ANSWER_CHARS]


def test_case_rows(entity: Entity, rng: random.Random) -> list[Row]:
    """A patient sent for a test: what it is for, how to prepare, what an abnormal result may relate to."""
    rows = []
    patient = rng.choice(GENERIC_PATIENTS)
    uses, notes, diseases = entity.values("用途"), entity.values("注意事项"), entity.values("相关疾病")
    if uses:
        rows.append(
            Row(
                f"医生建议{patient}做{entity.name}，这项检查有什么用？",
                f"{entity.name}主要用于{join(uses)}。",
                "vignette",
                (entity.name,),
            )
        )
    if notes:
        rows.append(
            Row(
                f"{patient}要去做{entity.name}，需要注意什么？",
                f"做{entity.name}需要注意：{join(notes)}。",
                "vignette",
                (entity.name,),
            )
        )
    if diseases:
        shown = join(diseases[:4])
        answer = f"{entity.name}异常可能与{shown}等疾病有关，需要结合症状和其他检查由医生判断。"
        rows.append(Row(f"{patient}的{entity.name}结果异常，可能与哪些疾病有关？", answer, "vignette", (entity.name,)))
    return rows


def case_rows(entity: Entity, rng: random.Random) -> list[Row]:
    if entity.kind == DRUG:
        return drug_case_rows(entity, rng)
    if entity.kind == TEST:
        return test_case_rows(entity, rng)
    return vignette_rows(entity, rng)


def interleave(groups: Sequence[list[Row]]) -> list[Row]:
    """Round-robin over the groups, so a small `--per_entity` still gets some of every kind."""
    out: list[Row] = []
    for index in range(max((len(group) for group in groups), default=0)):
        out.extend(group[index] for group in groups if index < len(group))
    return out


def entity_rows(entity: Entity, seed: int, per_entity: int) -> list[Row]:
    """Up to `per_entity` rows for one entity: every relation once, then cases, two-relation and rephrased rows.

    Each entity draws from its own generator (seeded by the seed and its name), so adding an entity to the
    knowledge base leaves every other entity's rows as they were.
    """
    rng = random.Random(f"{seed}:entity:{entity.name}")
    coverage, rephrased = single_rows(entity, rng)
    cases, multi = case_rows(entity, rng), multi_relation_rows(entity, rng)
    for group in (cases, multi, rephrased):
        rng.shuffle(group)
    return (coverage + interleave([cases, multi, rephrased]))[:per_entity]


@dataclass(frozen=True)
class Reverse:
    """Questions from a shared value back to the entities that hold it (`哪些疾病会出现发热？`)."""

    min_entities: int
    questions: tuple[str, ...]
    answers: tuple[str, ...]


REVERSE: dict[tuple[str, str], Reverse] = {
    (DISEASE, "相关症状"): Reverse(
        2,
        ("哪些疾病会出现{v}？", "{v}可能是哪些疾病的表现？", "出现{v}可能是什么病？"),
        ("{v}可见于{n}等疾病，需要结合其他表现和检查才能明确诊断。",),
    ),
    (DISEASE, "药物治疗"): Reverse(
        1,
        ("{v}可以用于治疗哪些疾病？", "哪些疾病会用到{v}？"),
        ("{v}可用于{n}的治疗，具体用药请遵医嘱。",),
    ),
    (DISEASE, "检查"): Reverse(
        2,
        ("哪些疾病需要做{v}？", "{v}可以帮助诊断哪些疾病？"),
        ("{n}等疾病常需要做{v}。",),
    ),
    (DISEASE, "所属科室"): Reverse(
        2,
        ("{v}主要看哪些病？", "哪些疾病属于{v}的诊治范围？"),
        ("{v}诊治的常见疾病包括{n}等。",),
    ),
    (DISEASE, "发病部位"): Reverse(
        2,
        ("哪些疾病会累及{v}？", "{v}常见的疾病有哪些？"),
        ("累及{v}的常见疾病有{n}等。",),
    ),
    (DISEASE, "危险因素"): Reverse(
        2,
        ("{v}会增加哪些疾病的风险？", "{v}是哪些疾病的危险因素？"),
        ("{v}是{n}等疾病的危险因素。",),
    ),
    (DISEASE, "并发症"): Reverse(
        2,
        ("哪些疾病可能并发{v}？", "{v}可能是哪些疾病的并发症？"),
        ("{n}等疾病可能并发{v}。",),
    ),
    (DRUG, "不良反应"): Reverse(
        2,
        ("哪些药物可能引起{v}？", "使用哪些药可能出现{v}？"),
        ("{n}等药物可能引起{v}，用药期间如有不适应及时咨询医生。",),
    ),
    (DRUG, "药物类别"): Reverse(
        2,
        ("常用的{v}有哪些？", "{v}包括哪些药物？"),
        ("常用的{v}有{n}等。",),
    ),
    (DRUG, "用途"): Reverse(
        2,
        ("哪些药物可以用于{v}？",),
        ("可用于{v}的药物有{n}等，需在医生指导下选用。",),
    ),
}


def value_index(entities: Sequence[Entity], kind: str, relation: str) -> dict[str, list[str]]:
    """value -> names of the entities of `kind` whose `relation` holds it, both in file order."""
    index: dict[str, list[str]] = {}
    for entity in entities:
        if entity.kind == kind:
            for value in entity.values(relation):
                index.setdefault(value, []).append(entity.name)
    return index


def reverse_rows(entities: Sequence[Entity], seed: int) -> list[Row]:
    """Reverse lookups across entities: a symptom, drug, test or department back to the entities that name it."""
    rows = []
    for (kind, relation), spec in REVERSE.items():
        for value, names in value_index(entities, kind, relation).items():
            if len(names) < spec.min_entities:
                continue
            rng = random.Random(f"{seed}:reverse:{relation}:{value}")
            shown = names[:MAX_REVERSE_NAMES]
            question = fill(rng.choice(spec.questions), v=value)
            answer = fill(rng.choice(spec.answers), v=value, n=join(shown))
            rows.append(Row(question, answer, "reverse", tuple(shown)))
    return rows


def shared_symptom_rows(entities: Sequence[Entity], seed: int) -> list[Row]:
    """Symptoms -> which diseases: two symptoms that several diseases have in common."""
    diseases = [entity for entity in entities if entity.kind == DISEASE]
    order = {s: i for i, s in enumerate(dict.fromkeys(s for d in diseases for s in d.values("相关症状")))}
    rows = []
    for entity in diseases:
        symptoms = entity.values("相关症状")
        if len(symptoms) < 2:
            continue
        rng = random.Random(f"{seed}:symptoms:{entity.name}")
        first, second = sorted(rng.sample(symptoms, 2), key=order.__getitem__)
        holders = [d.name for d in diseases if first in d.values("相关症状") and second in d.values("相关症状")]
        if len(holders) >= 2:
            shown = holders[:MAX_REVERSE_NAMES]
            question = f"同时出现{first}和{second}，可能是哪些疾病？"
            answer = f"同时出现{first}和{second}可见于{join(shown)}等疾病，需要到医院进一步检查才能明确诊断。"
            rows.append(Row(question, answer, "reverse", tuple(shown)))
    return rows


def pick_partner(entity: Entity, candidates: Sequence[Entity], rng: random.Random) -> Entity | None:
    """A comparison partner, from the same department when there is one (the comparisons people actually make)."""
    others = [other for other in candidates if other.name != entity.name]
    near = [other for other in others if set(other.values("所属科室")) & set(entity.values("所属科室"))]
    pool = near or others
    return rng.choice(pool) if pool else None


def compare_answer(a: Entity, b: Entity, relation: str) -> str:
    """`X和Y的病因是否一致？` answered from the two lists: identical, overlapping, or different."""
    ours, theirs = a.values(relation), b.values(relation)
    shared = [value for value in ours if value in theirs]
    only_a = [value for value in ours if value not in theirs][:MAX_VIGNETTE_ITEMS]
    only_b = [value for value in theirs if value not in ours][:MAX_VIGNETTE_ITEMS]
    same = "一致" if relation == "病因" else "相同"  # answer in the question's own word: 是否一致？/ 相同吗？
    if not only_a and not only_b:
        return f"基本{same}，两者的{relation}都包括{join(shared)}。"
    if shared:
        tail = "；".join(
            part
            for part in (
                f"{a.name}还与{join(only_a)}有关" if only_a else "",
                f"{b.name}还与{join(only_b)}有关" if only_b else "",
            )
            if part
        )
        return f"不完全{same}。两者都与{join(shared[:MAX_VIGNETTE_ITEMS])}有关；{tail}。"
    return f"不{same}。{a.name}的{relation}主要是{join(only_a)}，而{b.name}的{relation}主要是{join(only_b)}。"


def comparison_rows(entities: Sequence[Entity], seed: int) -> list[Row]:
    """Pairs of diseases: same causes? same risk factors? which symptoms in common?"""
    diseases = [entity for entity in entities if entity.kind == DISEASE]
    questions = {"病因": "{a}和{b}的病因是否一致？", "危险因素": "{a}和{b}的危险因素相同吗？"}
    rows: list[Row] = []
    seen: set[tuple[str, str, str]] = set()
    for entity in diseases:
        rng = random.Random(f"{seed}:compare:{entity.name}")
        for relation, question in questions.items():
            if not entity.values(relation):
                continue
            partner = pick_partner(entity, [d for d in diseases if d.values(relation)], rng)
            if partner is None or (relation, *sorted((entity.name, partner.name))) in seen:
                continue
            seen.add((relation, *sorted((entity.name, partner.name))))
            answer = compare_answer(entity, partner, relation)
            if len(answer) <= MAX_ANSWER_CHARS:
                rows.append(
                    Row(fill(question, a=entity.name, b=partner.name), answer, "compare", (entity.name, partner.name))
                )
        rows.extend(common_symptom_rows(entity, diseases, rng))
    return rows


def common_symptom_rows(entity: Entity, diseases: Sequence[Entity], rng: random.Random) -> list[Row]:
    symptoms = entity.values("相关症状")
    departments = set(entity.values("所属科室"))

    def close(other: Entity) -> bool:
        # A pair worth comparing: the same department and a symptom in common, or several symptoms in common.
        shared = len(set(other.values("相关症状")) & set(symptoms))
        return shared >= 2 or (shared >= 1 and bool(departments & set(other.values("所属科室"))))

    sharing = [d for d in diseases if d.name != entity.name and close(d)]
    if not sharing:
        return []
    partner = rng.choice(sharing)
    theirs = partner.values("相关症状")
    shared = [s for s in symptoms if s in theirs]
    parts = [f"{entity.name}和{partner.name}都可能出现{join(shared)}。"]
    only_a = [s for s in symptoms if s not in theirs][:MAX_VIGNETTE_ITEMS]
    only_b = [s for s in theirs if s not in symptoms][:MAX_VIGNETTE_ITEMS]
    if only_a:
        parts.append(f"此外，{entity.name}还可表现为{join(only_a)}")
    if only_b:
        parts.append(("；" if only_a else "此外，") + f"{partner.name}还可表现为{join(only_b)}")
    answer = "".join(parts) + ("。" if only_a or only_b else "")
    question = f"{entity.name}和{partner.name}有哪些共同症状？"
    return [Row(question, answer, "compare", (entity.name, partner.name))] if len(answer) <= MAX_ANSWER_CHARS else []


def dedupe(rows: Iterable[Row], seen: set[str] | None = None) -> tuple[list[Row], int]:
    """Keep the first row of each instruction: one question, one answer."""
    seen = set() if seen is None else seen
    kept = []
    dropped = 0
    for row in rows:
        if row.instruction in seen:
            dropped += 1
            continue
        seen.add(row.instruction)
        kept.append(row)
    return kept, dropped


def template_knowledge_rows(entities: Sequence[Entity], seed: int, per_entity: int) -> tuple[list[Row], int]:
    """All template rows of a knowledge base, de-duplicated, and how many duplicates were dropped."""
    rows: list[Row] = []
    for entity in entities:
        if entity.facts:
            rows.extend(entity_rows(entity, seed, per_entity))
    rows.extend(reverse_rows(entities, seed))
    rows.extend(shared_symptom_rows(entities, seed))
    rows.extend(comparison_rows(entities, seed))
    return dedupe(rows)


# ----------------------------------------------------------------------------------------------------------------
# Writing and checking outputs


def write_atomically(path: Path, text: str) -> None:
    """Write through a temporary file, so a crash never leaves a half-written output behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def jsonl_text(records: Iterable[dict[str, Any]]) -> str:
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def json_array_text(records: Sequence[dict[str, Any]]) -> str:
    """A JSON array with one row a line: valid JSON, and a diff shows which rows changed."""
    if not records:
        return "[]\n"
    return "[\n" + ",\n".join(json.dumps(record, ensure_ascii=False) for record in records) + "\n]\n"


def append_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(jsonl_text(records))
        handle.flush()
        os.fsync(handle.fileno())


def check_instruction_rows(path: Path) -> list[dict[str, Any]]:
    """Read back what was written: every row has a non-empty instruction and output, `input` empty, no repeats."""
    located = read_records(path)
    check_string_fields(path, located, required=("instruction", "input", "output"))
    seen: set[str] = set()
    for where, row in located:
        if not row["instruction"].strip() or not row["output"].strip() or row["input"] != "":
            raise UserError(f"{path} {where}: row is malformed (empty instruction or output, or non-empty input)")
        if row["instruction"] in seen:
            raise UserError(f"{path} {where}: row repeats an earlier instruction")
        seen.add(row["instruction"])
    return [row for _, row in located]


_TURN = re.compile(r" <(user|bot)>: ")


def dialogue_turns(instruction: str) -> list[tuple[str, str]] | None:
    """`[(role, text), ...]` of a literature instruction, or None when it is not in the published shape."""
    if not instruction.startswith(" <user>: "):
        return None
    pieces = _TURN.split(instruction)[1:]
    turns = list(zip(pieces[0::2], pieces[1::2], strict=False))
    roles = [role for role, _ in turns]
    expected = ["user" if index % 2 == 0 else "bot" for index in range(len(turns))]
    if roles != expected or roles[-1] != "user" or not all(text.strip() for _, text in turns):
        return None
    return turns


def check_literature_rows(path: Path) -> list[dict[str, Any]]:
    """Read back a literature file: a JSON array whose instructions alternate user/bot and end on a user turn."""
    if not path.read_text(encoding="utf-8").lstrip().startswith("["):
        raise UserError(f"{path}: not a JSON array (the literature format)")
    if path.read_text(encoding="utf-8").strip() == "[]":
        return []
    rows = check_instruction_rows(path)
    for index, row in enumerate(rows, start=1):
        if dialogue_turns(row["instruction"]) is None:
            raise UserError(
                f"{path} row {index}: instruction is not in the shape ` <user>: ... <bot>: ... <user>: ...`"
            )
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Counting and reporting


@dataclass
class Counts:
    """What a run did, printed at the end."""

    read: int = 0
    empty: int = 0
    done_before: int = 0
    requested: int = 0
    rows: int = 0
    duplicates: int = 0
    skipped: int = 0
    filtered: int = 0
    added: int = 0
    kinds: Counter[str] = field(default_factory=Counter)

    def report(self, noun: str, output: Path, backend: str) -> str:
        lines = [f"{noun}: {self.read} read, {self.empty} without content (skipped)"]
        if backend == "openai":
            lines.append(
                f"{noun}: {self.done_before} already done (resume), {self.requested} requested, "
                f"{self.skipped} skipped (failed or unparseable reply; rerun with --resume True to retry)"
            )
        kinds = ", ".join(f"{kind} {count}" for kind, count in sorted(self.kinds.items()))
        if backend == "openai":
            lines.append(f"rows: {self.rows} in {output} ({self.added} added by this run)")
        else:
            lines.append(f"rows: {self.rows} written to {output}" + (f" ({kinds})" if kinds else ""))
        lines.append(f"filtered: {self.filtered} ungrounded or malformed; duplicates dropped: {self.duplicates}")
        return "\n".join(lines)


def warn(message: str) -> None:
    """A warning that does not break the progress bar."""
    tqdm.write(f"warning: {message}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------------
# The openai backend, shared by both commands


def run_concurrently(
    items: Sequence[Any],
    work: Callable[[Any], Any],
    finish: Callable[[Any, Any], None],
    fail: Callable[[Any, Exception], None],
    concurrency: int,
    description: str,
) -> None:
    """`work(item)` in a thread pool; `finish`/`fail` run in this thread as results arrive, so writes never race."""
    pool = ThreadPoolExecutor(max_workers=concurrency)
    futures: dict[Future[Any], Any] = {pool.submit(work, item): item for item in items}
    try:
        for future in tqdm(as_completed(futures), total=len(futures), desc=description, file=sys.stderr, disable=None):
            item = futures[future]
            try:
                result = future.result()
            except llm.ChatError as error:
                fail(item, error)
                continue
            finish(item, result)
    finally:
        # On a fatal error or Ctrl-C, requests not yet sent are dropped instead of being waited for.
        pool.shutdown(wait=True, cancel_futures=True)


def chat_config(
    model: str | None,
    api_base: str | None,
    api_key_env: str,
    timeout: float,
    max_retries: int,
    retry_base_delay: float,
    temperature: float,
) -> llm.ChatConfig:
    if not model:
        raise UserError("--backend openai needs --model (the model name the server serves)")
    return llm.ChatConfig(
        model=str(model),
        api_base=api_base,
        api_key_env=str(api_key_env),
        temperature=temperature,
        timeout=timeout,
        max_retries=max_retries,
        retry_base_delay=retry_base_delay,
    )


KNOWLEDGE_SYSTEM = "你是一名严谨的医学知识助手。你只根据给定的知识回答，不编造知识中没有的内容。"
KNOWLEDGE_PROMPT = (
    "以下是医学知识图谱中“{name}”的知识（JSON）：\n{facts}\n\n"
    "请基于且仅基于这些知识，生成{count}个多样的中文问答对。问题可以询问单一关系（如“{name}有哪些常见症状？”）、"
    "同时询问多个关系，或是一段病例描述（如“一位患者出现X、Y，可能患什么病？如何治疗？”）。"
    "答案要简洁准确，并且必须提到知识中的具体内容；涉及用药时提醒遵医嘱，不要给出具体剂量。\n"
    '只输出一个JSON数组，每个元素形如 {{"question": "...", "answer": "..."}}，不要输出其他文字。'
)


def knowledge_messages(entity: Entity, count: int) -> list[dict[str, str]]:
    facts = {CENTER_KEY: entity.name, TYPE_KEY: entity.kind, **{k: list(v) for k, v in entity.relations}}
    prompt = KNOWLEDGE_PROMPT.format(name=entity.name, facts=json.dumps(facts, ensure_ascii=False), count=count)
    return [{"role": "system", "content": KNOWLEDGE_SYSTEM}, {"role": "user", "content": prompt}]


def grounded_in_facts(answer: str, facts: Iterable[str]) -> bool:
    """An answer is grounded when it states at least one of the entity's facts word for word."""
    return any(fact in answer for fact in facts)


def existing_instructions(path: Path) -> set[str]:
    """Instructions already in a JSON Lines output; a line torn by a crash is ignored (its entity is redone)."""
    return {row["instruction"] for row in read_jsonl_tolerant(path) if isinstance(row.get("instruction"), str)}


def drop_torn_tail(path: Path) -> None:
    """Cut a last line that a crash left without its newline, so appended rows start on a line of their own."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def openai_knowledge(
    entities: Sequence[Entity],
    output: Path,
    per_entity: int,
    config: llm.ChatConfig,
    concurrency: int,
    resume: bool,
    counts: Counts,
) -> None:
    """Ask the server about each entity; append each finished entity's grounded rows as soon as they arrive."""
    client = llm.make_client(config)  # first: a missing key fails before any file is touched
    progress = llm.Progress(output)
    done = progress.start(resume)
    if not resume or not output.exists():
        write_atomically(output, "")
    drop_torn_tail(output)
    seen = existing_instructions(output)
    pending = [entity for entity in entities if entity.facts and entity.name not in done]
    counts.done_before = sum(1 for entity in entities if entity.facts and entity.name in done)
    counts.requested = len(pending)

    def work(entity: Entity) -> tuple[list[tuple[str, str]], int] | None:
        reply = llm.chat_completion(client, config, knowledge_messages(entity, per_entity))
        items = llm.extract_json_array(reply)
        if items is None:
            return None
        pairs, malformed = llm.qa_pairs(items)
        grounded = [(q, a) for q, a in pairs if grounded_in_facts(a, entity.facts)]
        return grounded, malformed + len(pairs) - len(grounded)

    def finish(entity: Entity, result: tuple[list[tuple[str, str]], int] | None) -> None:
        if result is None:
            counts.skipped += 1
            warn(f"{entity.name}: the reply is not a JSON array of question/answer objects; skipped")
            return
        pairs, filtered = result
        counts.filtered += filtered
        if not pairs:
            counts.skipped += 1
            warn(f"{entity.name}: no grounded question/answer pair in the reply; skipped")
            return
        rows, duplicates = dedupe((Row(q, a, "openai", (entity.name,)) for q, a in pairs), seen)
        counts.duplicates += duplicates
        counts.added += len(rows)
        append_jsonl(output, [row.record() for row in rows])
        progress.mark(entity.name, rows=len(rows))

    def fail(entity: Entity, error: Exception) -> None:
        counts.skipped += 1
        warn(f"{entity.name}: {error}; skipped")

    run_concurrently(pending, work, finish, fail, concurrency, "entities")


# ----------------------------------------------------------------------------------------------------------------
# Literature


@dataclass(frozen=True)
class Document:
    title: str
    text: str
    where: str = ""

    @property
    def key(self) -> str:
        """Title plus a hash of the text: a resumed run redoes a document whose text was edited."""
        return f"{self.title}#{hashlib.sha1(self.text.encode('utf-8')).hexdigest()[:12]}"


def load_documents(path: str | Path) -> list[Document]:
    located = read_records(path)
    check_string_fields(path, located, required=("title", "text"))
    return [Document(row["title"].strip(), row["text"].strip(), where) for where, row in located]


_SENTENCE_END = re.compile(r"(?<=[。！？!?])")
MIN_SENTENCE_CHARS = 12


def split_sentences(text: str) -> list[str]:
    """Sentences of a document; a very short one is joined to the next so that every answer says something."""
    pieces = [p.strip() for line in text.splitlines() for p in _SENTENCE_END.split(line) if p.strip()]
    sentences: list[str] = []
    carry = ""
    for piece in pieces:
        piece = carry + piece
        if len(piece) < MIN_SENTENCE_CHARS:
            carry = piece
            continue
        sentences.append(piece)
        carry = ""
    if carry:
        if sentences:
            sentences[-1] += carry
        else:
            sentences.append(carry)
    return sentences


# A question is read off the start of a sentence: "X包括…" -> "X包括哪些？", "X是指…" -> "什么是X？". Of the rules that
# match, the one with the shortest topic wins: the first verb of the sentence is the one that ends its subject.
QUESTION_RULES: tuple[tuple[re.Pattern[str], tuple[str, ...]], ...] = tuple(
    (re.compile(r"^(?P<t>[^，,。；;：:（(]{2,24}?)" + verb), questions)
    for verb, questions in (
        ("(?:主要)?包括", ("{t}包括哪些？", "{t}有哪些？")),
        ("(?:适用于|适合)", ("{t}适合哪些患者？", "什么情况下适合{t}？")),
        ("是指", ("什么是{t}？", "{t}是指什么？")),
        ("与.{1,20}?(?:有关|相关)", ("{t}与什么有关？",)),
        ("(?:可能引起|可能导致|会引起|会导致)", ("{t}可能引起什么问题？",)),
        ("(?:可能出现|会出现)", ("{t}可能出现哪些情况？",)),
        ("是(?!否)", ("{t}是什么？", "能介绍一下{t}吗？")),
        ("需要", ("{t}需要注意什么？",)),
        ("(?:应该|应当)", ("{t}应该怎么做？",)),
        ("(?:可以|能够)", ("{t}能起到什么作用？", "{t}有什么用？")),
        ("(?:会|可能)", ("{t}会带来什么影响？",)),
    )
)
# A topic must be a noun phrase: not a pronoun or a connective, and not cut in the middle of a word like 但是.
BAD_TOPIC_STARTS = (*"这那它其该此他她我你但而在", "如果", "因为", "所以", "因此", "此外", "另外", "同时", "目前")
BAD_TOPIC_STARTS += ("通常", "一般", "对于", "由于", "虽然", "只要", "除了")
BAD_TOPIC_ENDS = ("特别", "但", "就", "于", "总", "正", "只", "不", "并", "即", "则", "要")
# Adverbs between a subject and its verb ("随访通常包括…") belong to neither: they are dropped from the topic.
TOPIC_ADVERBS = ("通常", "一般", "往往", "常常", "主要", "也", "都", "还", "仍", "常", "可")
FOLLOW_UPS = ("还有什么需要了解的？", "能再详细说说吗？", "还有哪些需要注意的地方？")
OPENERS = ("", "", "你好，", "请问", "我想了解一下，")


def sentence_topic(sentence: str) -> tuple[str, tuple[str, ...]] | None:
    """The sentence's subject and the questions its verb allows, or None when no rule fits."""
    best: tuple[int, str, tuple[str, ...]] | None = None
    for pattern, questions in QUESTION_RULES:
        match = pattern.match(sentence)
        if match is None:
            continue
        topic = match.group("t").strip()
        while topic.endswith(TOPIC_ADVERBS) and len(topic) > 2:
            topic = next(topic[: -len(adverb)] for adverb in TOPIC_ADVERBS if topic.endswith(adverb))
        if len(topic) < 2 or topic.startswith(BAD_TOPIC_STARTS) or topic.endswith(BAD_TOPIC_ENDS):
            continue
        if best is None or match.end("t") < best[0]:
            best = (match.end("t"), topic, questions)
    return best[1:] if best else None


def sentence_question(sentence: str, title: str, rng: random.Random) -> str:
    """A question that this sentence answers, or a follow-up about the document when no rule fits."""
    found = sentence_topic(sentence)
    if found is None:
        return f"关于{title}，{rng.choice(FOLLOW_UPS)}"
    topic, questions = found
    return fill(rng.choice(questions), t=topic)


def literature_instruction(turns: Sequence[tuple[str, str]]) -> str:
    """` <user>: q1 <bot>: a1 <user>: q2`: the published shape, leading space included."""
    history = "".join(f" <user>: {question} <bot>: {answer}" for question, answer in turns[:-1])
    return f"{history} <user>: {turns[-1][0]}"


def dialogue_rows(pairs: Sequence[tuple[str, str]], turns: int, source: str) -> list[Row]:
    """For each turn: a single-turn row and, when there is history, one row with up to `turns` user turns."""
    rows = []
    for index in range(len(pairs)):
        rows.append(Row(literature_instruction(pairs[index : index + 1]), pairs[index][1], "single", (source,)))
        span = min(turns, index + 1)
        if span >= 2:
            window = pairs[index - span + 1 : index + 1]
            rows.append(Row(literature_instruction(window), pairs[index][1], "multi", (source,)))
    return rows


def template_document_pairs(document: Document, seed: int) -> list[tuple[str, str]]:
    """(question, answer) turns of a document: each answer is one of its sentences, word for word."""
    rng = random.Random(f"{seed}:document:{document.key}")
    pairs = []
    for index, sentence in enumerate(split_sentences(document.text)):
        question = sentence_question(sentence, document.title, rng)
        if index == 0 or rng.random() < 0.3:
            opener = rng.choice(OPENERS)
            question = opener + question if not (opener == "请问" and question.startswith("请")) else question
        pairs.append((question, sentence))
    return pairs


LITERATURE_SYSTEM = "你是一名耐心的医生，用通俗易懂的语言回答患者的问题，只依据给定的文献内容回答。"
LITERATURE_PROMPT = (
    "以下是一篇关于“{title}”的文献：\n{text}\n\n"
    "请根据这篇文献，写一段患者与医生之间的多轮对话，共{count}轮：每一轮患者提出一个问题，医生依据文献内容作答，"
    "后面的问题可以承接前面的回答。不要编造文献中没有的数据或结论。\n"
    '只输出一个JSON数组，按对话顺序排列，每个元素形如 {{"question": "患者的问题", "answer": "医生的回答"}}，'
    "不要输出其他文字。"
)


def literature_messages(document: Document, count: int) -> list[dict[str, str]]:
    prompt = LITERATURE_PROMPT.format(title=document.title, text=document.text, count=count)
    return [{"role": "system", "content": LITERATURE_SYSTEM}, {"role": "user", "content": prompt}]


def _bigrams(text: str) -> set[str]:
    text = re.sub(r"\s+", "", text)
    return {text[i : i + 2] for i in range(len(text) - 1)}


def grounded_in_text(answer: str, text: str, min_overlap: float) -> bool:
    """A model's answer is grounded in a document when most of its character bigrams occur in the document."""
    grams = _bigrams(answer)
    return bool(grams) and len(grams & _bigrams(text)) / len(grams) >= min_overlap


def grounded_prefix(pairs: Sequence[tuple[str, str]], text: str, min_overlap: float) -> list[tuple[str, str]]:
    """The dialogue up to its first ungrounded answer: later turns build on that answer, so they go too."""
    kept = []
    for question, answer in pairs:
        if not grounded_in_text(answer, text, min_overlap):
            break
        kept.append((question, answer))
    return kept


def openai_literature(
    documents: Sequence[Document],
    output: Path,
    turns: int,
    pairs_per_document: int,
    min_overlap: float,
    config: llm.ChatConfig,
    concurrency: int,
    resume: bool,
    counts: Counts,
) -> None:
    """Ask the server for a dialogue per document; rewrite the JSON array after each finished document."""
    client = llm.make_client(config)  # first: a missing key fails before any file is touched
    progress = llm.Progress(output)
    done = progress.start(resume)
    rows: list[dict[str, Any]] = check_literature_rows(output) if resume and output.exists() else []
    seen = {row["instruction"] for row in rows}
    pending = [document for document in documents if document.text and document.key not in done]
    counts.done_before = sum(1 for document in documents if document.text and document.key in done)
    counts.requested = len(pending)

    def work(document: Document) -> tuple[list[tuple[str, str]], int] | None:
        reply = llm.chat_completion(client, config, literature_messages(document, pairs_per_document))
        items = llm.extract_json_array(reply)
        if items is None:
            return None
        pairs, malformed = llm.qa_pairs(items)
        kept = grounded_prefix(pairs, document.text, min_overlap)
        return kept, malformed + len(pairs) - len(kept)

    def finish(document: Document, result: tuple[list[tuple[str, str]], int] | None) -> None:
        if result is None:
            counts.skipped += 1
            warn(f"{document.title}: the reply is not a JSON array of question/answer objects; skipped")
            return
        pairs, filtered = result
        counts.filtered += filtered
        if not pairs:
            counts.skipped += 1
            warn(f"{document.title}: no grounded turn in the reply; skipped")
            return
        new_rows, duplicates = dedupe(dialogue_rows(pairs, turns, document.title), seen)
        counts.duplicates += duplicates
        counts.added += len(new_rows)
        rows.extend(row.record() for row in new_rows)
        write_atomically(output, json_array_text(rows))
        progress.mark(document.key, rows=len(new_rows))

    def fail(document: Document, error: Exception) -> None:
        counts.skipped += 1
        warn(f"{document.title}: {error}; skipped")

    if not output.exists() or not resume:
        write_atomically(output, json_array_text(rows))
    run_concurrently(pending, work, finish, fail, concurrency, "documents")


# ----------------------------------------------------------------------------------------------------------------
# Commands


def _check_options(backend: str, seed: Any, counts: dict[str, Any]) -> None:
    if backend not in BACKENDS:
        raise UserError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"--seed must be an integer, got {seed!r}")
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"--{name} must be a positive integer, got {value!r}")


def _paths(source: Any, source_flag: str, output: Any) -> tuple[Path, Path]:
    if not source:
        raise UserError(f"{source_flag} is required (the input file)")
    if not output:
        raise UserError("--output is required (the file to write)")
    source_path, output_path = Path(str(source)), Path(str(output))
    if source_path.resolve() == output_path.resolve():
        raise UserError(f"--output must differ from {source_flag} ({source_path})")
    return source_path, output_path


def knowledge(
    kb: str | None = None,
    output: str | None = None,
    seed: int = DEFAULT_SEED,
    per_entity: int = DEFAULT_PER_ENTITY,
    backend: str = "template",
    api_base: str | None = None,
    model: str | None = None,
    api_key_env: str = llm.DEFAULT_API_KEY_ENV,
    concurrency: int = 4,
    resume: bool = False,
    max_retries: int = 5,
    retry_base_delay: float = 1.0,
    timeout: float = 120.0,
    temperature: float = 0.7,
) -> None:
    """Knowledge base (JSON Lines, one cMeKG-style entity a line) -> instruction rows (JSON Lines).

    Args:
        kb: the knowledge base, e.g. data/knowledge_base.jsonl.
        output: where to write the rows, e.g. data/llama_data.json (JSON Lines, despite the name).
        seed: the template backend's seed; the same seed and knowledge base give the same file, byte for byte.
        per_entity: at most this many rows per entity (template), or pairs asked for per entity (openai).
        backend: `template` (offline, deterministic) or `openai` (an OpenAI-compatible chat-completions server).
        api_base: the server's base URL, e.g. http://127.0.0.1:8000/v1 (openai backend).
        model: the model name the server serves (openai backend).
        api_key_env: the environment variable holding the API key (never printed).
        concurrency: requests in flight at once (openai backend).
        resume: skip entities a previous run finished (openai backend; its progress sits next to the output).
        max_retries: retries of a request that failed with 429, 5xx, a timeout or a dropped connection.
        retry_base_delay: seconds before the first retry; doubles each time.
        timeout: seconds to wait for one reply.
        temperature: sampling temperature sent to the server.
    """
    _check_options(backend, seed, {"per_entity": per_entity, "concurrency": concurrency})
    kb_path, output_path = _paths(kb, "--kb", output)
    entities = load_entities(kb_path)
    counts = Counts(read=len(entities), empty=sum(1 for entity in entities if not entity.facts))
    if backend == "template":
        rows, counts.duplicates = template_knowledge_rows(entities, seed, per_entity)
        counts.kinds.update(row.kind for row in rows)
        write_atomically(output_path, jsonl_text(row.record() for row in rows))
    else:
        config = chat_config(model, api_base, api_key_env, timeout, max_retries, retry_base_delay, temperature)
        openai_knowledge(entities, output_path, per_entity, config, concurrency, bool(resume), counts)
    counts.rows = len(check_instruction_rows(output_path)) if output_path.read_text(encoding="utf-8").strip() else 0
    print(counts.report("entities", output_path, backend))


def literature(
    docs: str | None = None,
    output: str | None = None,
    turns: int = DEFAULT_TURNS,
    seed: int = DEFAULT_SEED,
    backend: str = "template",
    pairs_per_document: int = 6,
    min_overlap: float = 0.5,
    api_base: str | None = None,
    model: str | None = None,
    api_key_env: str = llm.DEFAULT_API_KEY_ENV,
    concurrency: int = 4,
    resume: bool = False,
    max_retries: int = 5,
    retry_base_delay: float = 1.0,
    timeout: float = 120.0,
    temperature: float = 0.7,
) -> None:
    """Documents (JSON Lines of {"title", "text"}) -> literature dialogues (a JSON array in the published shape).

    Args:
        docs: the documents, e.g. data_literature/documents.jsonl.
        output: where to write the JSON array, e.g. data_literature/liver_cancer.json.
        turns: the most user turns in one row's dialogue (1 gives single-turn rows only).
        seed: the template backend's seed.
        backend: `template` (offline: answers are the document's own sentences) or `openai`.
        pairs_per_document: dialogue turns asked for per document (openai backend).
        min_overlap: share of an answer's character bigrams that must occur in the document (openai backend).
        api_base: the server's base URL (openai backend).
        model: the model name the server serves (openai backend).
        api_key_env: the environment variable holding the API key (never printed).
        concurrency: requests in flight at once (openai backend).
        resume: skip documents a previous run finished (openai backend).
        max_retries: retries of a request that failed with 429, 5xx, a timeout or a dropped connection.
        retry_base_delay: seconds before the first retry; doubles each time.
        timeout: seconds to wait for one reply.
        temperature: sampling temperature sent to the server.
    """
    _check_options(
        backend, seed, {"turns": turns, "concurrency": concurrency, "pairs_per_document": pairs_per_document}
    )
    docs_path, output_path = _paths(docs, "--docs", output)
    if not isinstance(min_overlap, (int, float)) or not 0 <= min_overlap <= 1:
        raise UserError(f"--min_overlap must be a number between 0 and 1, got {min_overlap!r}")
    documents = load_documents(docs_path)
    counts = Counts(read=len(documents), empty=sum(1 for document in documents if not document.text))
    if backend == "template":
        rows: list[Row] = []
        for document in documents:
            if document.text:
                rows.extend(dialogue_rows(template_document_pairs(document, seed), turns, document.title))
        rows, counts.duplicates = dedupe(rows)
        counts.kinds.update(row.kind for row in rows)
        write_atomically(output_path, json_array_text([row.record() for row in rows]))
    else:
        config = chat_config(model, api_base, api_key_env, timeout, max_retries, retry_base_delay, temperature)
        openai_literature(
            documents,
            output_path,
            turns,
            pairs_per_document,
            float(min_overlap),
            config,
            concurrency,
            bool(resume),
            counts,
        )
    counts.rows = len(check_literature_rows(output_path))
    print(counts.report("documents", output_path, backend))


if __name__ == "__main__":
    run_cli({"knowledge": knowledge, "literature": literature})
