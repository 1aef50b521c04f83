"""The gaps the 2026-12-07 review of the cMeKG build found (issue 18): emergencies without 120, hypoglycaemia
without first aid, numbered lists read as values, vaccines 'stopped', hallmark signs cut from symptom lists."""

from __future__ import annotations

from collections import Counter

import pytest

from tests.builder_support import cmekg_entities
from utils.builder.graph import clean_values
from utils.builder.rows import capped
from utils.builder.safety import care_advice, with_care_advice

EMERGENCIES = ["横纹肌溶解综合征", "高钾血症", "急性化脓性腹膜炎", "高血压脑病", "淹溺", "流行性乙型脑炎", "烧伤",
               "电击伤", "病毒性脑炎", "细菌性脑膜炎"]


@pytest.mark.parametrize("disease", EMERGENCIES)
def test_rows_naming_an_emergency_say_120(disease: str) -> None:
    for question, answer in [(f"{disease}属于哪个科室诊治？", f"{disease}一般到内科就诊。"),
                             (f"{disease}有哪些症状？", f"{disease}的常见症状包括乏力、发热。"),
                             ("这些症状可能是什么病？", f"可能是{disease}、感冒等，需要进一步鉴别。")]:
        assert "120" in with_care_advice(question, answer, names=(disease,)), (question, answer)


@pytest.mark.parametrize("name", ["结核性腹膜炎", "脑炎后遗症", "湿润烧伤膏", "小儿轻度烧伤", "乙型脑炎减毒活疫苗",
                                  "吸附百日咳白喉破伤风联合疫苗"])
def test_chronic_mild_and_preventive_names_are_no_emergency(name: str) -> None:
    assert care_advice(f"{name}属于哪个科室诊治？", f"{name}一般到内科就诊。", names=(name,)) == ""


def test_hypoglycaemia_gets_first_aid_but_lowering_blood_sugar_does_not() -> None:
    drug = ("格列吡嗪缓释片",)
    answer = with_care_advice("用了格列吡嗪缓释片之后出现低血糖症，是药物引起的吗？",
                              "低血糖症是格列吡嗪缓释片可能出现的不良反应之一，建议及时就医。", True, drug)
    assert "含糖" in answer and "120" in answer and "神志" in answer
    assert care_advice("二甲双胍有什么作用？", "二甲双胍可降低血糖。", names=("二甲双胍",)) == ""
    assert care_advice("格列本脲有哪些禁忌？", "低血糖患者禁用。", names=("格列本脲",)) == ""
    newborn = care_advice("妊娠期糖尿病有哪些并发症？", "需要警惕巨大儿、新生儿低血糖等并发症。", names=("妊娠期糖尿病",
                                                                                                    ))
    assert "含糖" not in newborn  # a newborn's hypoglycaemia is treated in hospital, never with a sugary drink
    insulin = with_care_advice("胰岛素有哪些不良反应？", "可能引起低血糖、昏迷。", True, ("胰岛素注射液",))
    assert "含糖" in insulin and "不要自行停药" in insulin  # the adverse advice is kept beside the first aid


def test_list_numbers_are_not_read_as_values() -> None:
    assert clean_values("contraindication", ["1.6岁以下儿童"], "某药") == ["6岁以下儿童"]
    assert clean_values("contraindication", ["下列情况禁用1.8岁以下儿童"], "某药") != []
    assert all("1.8" not in value for value in clean_values("contraindication", ["下列情况禁用1.8岁以下儿童"], "某药"))
    assert clean_values("contraindication", ["1.6个月以内婴儿"], "某药") == ["6个月以内婴儿"]
    assert "香附" in clean_values("ingredient", ["1.香附"], "坤灵丸")
    dropped: Counter[str] = Counter()
    assert clean_values("contraindication", ["白细胞计数低于2.5×10/L"], "某药", dropped) == []
    assert dropped


def test_vaccines_are_never_stopped_and_serious_reactions_call_120() -> None:
    vaccine = ("麻疹腮腺炎风疹联合减毒活疫苗",)
    serious = with_care_advice("用了这个疫苗之后出现支气管痉挛，是药物引起的吗？",
                               "支气管痉挛是麻疹腮腺炎风疹联合减毒活疫苗可能出现的严重不良反应，应立即停药并就医，必要时拨打120急救电话。",
                               True, vaccine)
    common = with_care_advice("疫苗有哪些不良反应？", "可能出现皮疹、休克。", True, vaccine)
    mild = with_care_advice("接种后发热怎么办？", "发热是该疫苗可能出现的不良反应之一，建议及时就医，"
                            "由医生评估是否需要调整用药，不要自行停药或换药。", True, vaccine)
    for answer in (serious, common, mild):
        assert "停药" not in answer and "用药" not in answer
    assert "120" in serious and "120" in common and "接种单位" in mild


@pytest.fixture(scope="module")
def curated() -> dict[str, object]:
    return {entity.name: entity for entity in cmekg_entities()}


@pytest.mark.parametrize(("disease", "hallmark"), [("重症肌无力", "上睑下垂"), ("急性阑尾炎", "右下腹痛"),
                                                   ("肠梗阻", "停止排气"), ("肠梗阻", "腹部痉挛疼痛"),
                                                   ("横纹肌溶解综合征", "肌肉疼痛"), ("帕金森病", "静止性震颤")])
def test_hallmark_signs_survive_the_cut_and_lead(curated: dict, disease: str, hallmark: str) -> None:
    shown = capped(curated[disease], "symptom")
    assert hallmark in shown[:4], shown


def test_a_sign_of_another_disease_does_not_lead(curated: dict) -> None:
    shown = capped(curated["重症肌无力"], "symptom")
    assert shown[0] != "苦笑面容" and "苦笑面容" not in shown[:6]
    assert capped(curated["破伤风"], "symptom")[0] in ("牙关紧闭", "角弓反张")
