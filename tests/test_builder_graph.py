"""Reading graphs: the no-globals unpickler (a pickle that would run code never runs), the installed cMeKG, the
predicate map as data, value cleaning, and the curation against the clinical lists and the whole graph."""

from __future__ import annotations

import os
import pickle
from collections import Counter
from pathlib import Path

import pytest
from builder_support import cmekg_entities, cmekg_raw, entities_from

from utils.builder import resources
from utils.builder.curation import GraphFacts, curated_values
from utils.builder.graph import (
    Entity,
    clean_values,
    entity_name,
    graph_from_records,
    installed_cmekg_path,
    predicate_map,
    read_graph,
    unpickle_plain,
)
from utils.builder.rows import phrasing
from utils.core.errors import UserError


class RunsCode:
    """Unpickling this would call os.system (it creates a marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    graph = {"甲病": {"常见症状": ["发热"]}, "evil": RunsCode(marker)}
    for protocol in (0, 2, pickle.HIGHEST_PROTOCOL):
        path = tmp_path / f"evil{protocol}.pkl"
        path.write_bytes(pickle.dumps(graph, protocol=protocol))
        with pytest.raises(UserError, match="refused to unpickle: it refers to (posix|os|nt).system"):
            read_graph(str(path))
        # The plain pickle module would run it: the payload is real.
    assert not marker.exists()
    pickle.loads((tmp_path / "evil2.pkl").read_bytes())
    assert marker.exists()


def test_other_globals_and_broken_pickles_are_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="refused to unpickle: it refers to collections.OrderedDict"):
        from collections import OrderedDict

        unpickle_plain(pickle.dumps(OrderedDict(a=1)), "x.pkl")
    with pytest.raises(UserError, match="x.pkl: not a readable pickle"):
        unpickle_plain(b"\x80\x04garbage", "x.pkl")
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(pickle.dumps({"甲病": {"常见症状": "发热"}}))
    with pytest.raises(UserError, match="subject `甲病`: predicate `常见症状` must be a list of strings, got a string"):
        read_graph(str(bad))
    bad.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(UserError, match="expected a mapping"):
        read_graph(str(bad))


def test_a_plain_pickle_reads_like_the_installed_graph(tmp_path: Path) -> None:
    path = tmp_path / "kb.pkl"
    path.write_bytes(pickle.dumps({"甲病": {"常见症状": ["发热", "咳嗽"], "就诊科室": ["呼吸内科"]}}))
    (raw,), source = read_graph(str(path))
    assert raw.name == "甲病" and dict(raw.predicates) == {"常见症状": ("发热", "咳嗽"), "就诊科室": ("呼吸内科",)}
    assert source == str(path)


def test_the_installed_cmekg_graph_is_read_whole() -> None:
    assert installed_cmekg_path().name == "cmekg.pkl"
    raws = cmekg_raw()
    assert len(raws) == 27403
    # 967,409 facts as stored; 3 are blank or repeat a value of the same subject and predicate
    assert sum(len(values) for raw in raws for _, values in raw.predicates) == 967406
    assert len({predicate for raw in raws for predicate, _ in raw.predicates}) == 469


def test_the_predicate_map_is_consistent_data() -> None:
    pmap = predicate_map()
    data = resources.predicate_map()
    kinds = {"disease", "drug", "herb", "formula", "procedure", "test"}
    for name, spec in pmap.relations.items():
        assert set(spec.kinds) <= kinds, name
        assert spec.max_items < 16, name  # no answer lists 16+ items
        for kind in spec.kinds:  # every mapped relation can be asked
            assert phrasing(kind, name) or name in ("contagious", "prescription", "toxicity"), (name, kind)
    mapped = {predicate for relation in data["relations"].values() for predicate in relation["predicates"]}
    assert not mapped & set(pmap.ignored), "a predicate is both mapped and ignored"
    assert pmap.by_predicate[("常见症状", "disease")] == "symptom"
    assert pmap.by_predicate[("适应症", "drug")] == "indication"
    assert pmap.by_predicate[("用途", "test")] == "purpose" and pmap.by_predicate[("用途", "drug")] == "indication"
    assert pmap.by_predicate[("辅助治疗", "disease")] == "treatment"  # cMeKG's 辅助治疗 holds primary treatments


def test_kinds_come_from_the_type_or_the_predicates() -> None:
    graph = {
        "甲病": {"常见症状": ["发热", "咳嗽"], "ICD10": ["J18.9"]},
        "乙药片": {"成份": ["乙药"], "适应症": ["甲病"], "贮藏": ["密封"]},
        "丙草": {"界": ["植物界"], "功效": ["清热解毒"]},
        "丁检查": {"所属分类": ["血"], "相关疾病": ["甲病"]},
        "戊汤": {"组成": ["麻黄", "桂枝"], "功用": ["发汗解表"], "出处": ["《伤寒论》"]},
        "糖化血红蛋白检查": {"用途": ["反映近两到三个月的平均血糖水平"]},  # no marker: its name says test
    }
    kinds = {entity.name: entity.kind for entity in entities_from(graph)}
    assert kinds == {"甲病": "disease", "乙药片": "drug", "丙草": "herb", "丁检查": "test", "戊汤": "formula",
                     "糖化血红蛋白检查": "test"}


def test_a_stated_kind_is_read_loosely(tmp_path: Path) -> None:
    path = tmp_path / "kb.jsonl"
    path.write_text('{"中心词": "甲", "类型": "检查项目", "用途": ["x"]}\n'
                    '{"中心词": "乙", "类型": "手术", "并发症": ["y"]}\n'
                    '{"中心词": "丙", "类型": "方剂", "组成": ["z"]}\n', encoding="utf-8")
    pmap = predicate_map()
    assert [pmap.kind_of(raw) for raw in graph_from_records(path)] == ["test", "procedure", "formula"]


@pytest.mark.parametrize(("relation", "values", "expected"), [
    ("symptom", ["心悸等", "发热，咳嗽", "恶心与呕吐"], ["心悸", "发热", "咳嗽", "恶心", "呕吐"]),
    ("complication", ["心力衰竭等并发症", "可并发急性肾衰竭"], ["心力衰竭", "急性肾衰竭"]),
    ("department", ["内科；皮肤科", "GP"], ["内科", "皮肤科"]),
    ("adverse", ["腹痛（3%）", "恶心（25%）", "未见明显的不良反应"], ["腹痛", "恶心"]),
    # excipients go (also inside an annotation or a list), and so does an ingredient the product's name holds
    # (复方阿莫西林胶囊 "contains 阿莫西林" tells nothing); a compound's other ingredients stay
    ("ingredient", ["水", "阿莫西林", "淀粉", "克拉维酸钾", "羧甲基纤维素钠", "聚乙二醇", "吐温80", "无辅料",
                    "防腐剂（苯甲酸钠）", "山梨酸钾和纯化水", "盐酸或氢氧化钠", "聚乙二醇400", "硬脂酸红霉素"],
     ["克拉维酸钾", "硬脂酸红霉素"]),
    ("ingredient", ["阿莫西林胶囊"], []),  # the whole name is no ingredient
    # ICD labels and analytes without a direction are no facts; a mislinked value is said as meant
    ("adverse", ["部位未特指的消化性溃疡", "肌酐", "胆红素", "麻疹", "恶心"], ["皮疹", "恶心"]),
    ("complication", ["咽炎", "喉炎"], ["喉炎"]),  # 慢性肥厚性咽炎 "并发咽炎" is a tautology
    ("population", ["好发于女性"], ["女性"]),
    ("contraindication", ["尚不明确", "对本品过敏者禁用", "孕妇禁用"], ["孕妇禁用"]),
    ("indication", ["口服，一次3～9克，一日2次", "用于失眠少寝"], ["失眠少寝"]),
    ("cause", ["A16.2", "遗传因素"], ["遗传因素"]),
    # one symptom per value, split on the conjunctions; 触及 is no conjunction; body parts and vague words go
    ("symptom", ["吞咽疼痛和吞咽困难", "呕血与黑便", "发热伴畏寒", "咳痰及咯血", "可触及包块", "多伴有低钾血症"],
     ["吞咽疼痛", "吞咽困难", "呕血", "黑便", "发热", "畏寒", "咳痰", "咯血", "可触及包块", "低钾血症"]),
    ("symptom", ["脊柱和四肢畸形", "黏膜", "变小", "充血", "坏死", "感染", "出血"], ["四肢畸形"]),
    # a study's wording is no adverse effect
    ("adverse", ["为期52周的研究", "双盲", "为期12周研究中", "用药4周后", "头晕"], ["头晕"]),
])
def test_values_are_cleaned(relation: str, values: list[str], expected: list[str]) -> None:
    dropped: Counter[str] = Counter()
    name = {"complication": "慢性肥厚性咽炎", "ingredient": "复方阿莫西林胶囊"}.get(relation, "阿莫西林胶囊")
    assert clean_values(relation, values, name, dropped) == expected


def test_a_single_active_product_lists_no_ingredients_left_beside_its_name() -> None:
    """肝素钠软膏's active is its name: the rest is its base (白凡士林, 十八醇), no answer to what it contains."""
    assert clean_values("ingredient", ["肝素钠", "白凡士林", "十八醇"], "肝素钠软膏") == []
    assert clean_values("ingredient", ["泛昔洛韦"], "诺克") == ["泛昔洛韦"]  # a brand name holds no ingredient


def test_an_icd_labelled_name_is_asked_about_without_its_label() -> None:
    assert entity_name("部位未特指的消化性溃疡") == "消化性溃疡"
    assert entity_name("初发性或维持性睡眠障碍［失眠症］") == "初发性或维持性睡眠障碍"


def entity(name: str, kind: str = "disease", **facts: tuple[str, ...]) -> Entity:
    return Entity(name, kind, dict(facts), {relation: ("x",) for relation in facts})


def test_curation_checks_facts_against_the_clinical_lists_and_the_graph() -> None:
    large = GraphFacts(True, frozenset({"肺炎", "甲病"}), frozenset({"肺炎"}),
                       {"symptom": Counter({"发热": 900, "咳嗽": 600, "休克": 500, "肺炎": 300, "可有骨": 1}),
                        "adverse": Counter({"恶心": 900, "皮疹": 800, "过敏性休克": 10, "头痛": 700, "奇怪反应": 1}),
                        "indication": Counter({"流行性感冒": 500, "肺炎": 1200})})
    dropped: Counter[str] = Counter()
    # a large graph's symptom list: the vocabulary only (no disease, no fragment), alarm signs after typical ones
    assert curated_values(entity("甲病"), "symptom", ("休克", "肺炎", "可有骨", "咳嗽", "发热"), large,
                          dropped) == ("发热", "咳嗽", "休克")
    # a disease that is itself a symptom lists the symptoms of its causes: none of them
    assert curated_values(entity("黄疸"), "symptom", ("乏力", "休克", "便秘"), large, dropped) == ()
    # common adverse effects first, a serious one kept within the shown list ("常见不良反应" never leads with 休克);
    # a value one drug alone holds goes
    assert curated_values(entity("甲药", "drug"), "adverse", ("恶心", "皮疹", "奇怪反应", "过敏性休克", "头痛"),
                          large, dropped) == ("恶心", "皮疹", "头痛", "过敏性休克")
    # cMeKG links Haemophilus influenzae to influenza: an antibacterial "for 流感" is for the bacterium
    antibiotic = entity("因培康", "drug", generic_name=("注射用亚胺培南西司他丁钠",))
    assert set(curated_values(antibiotic, "indication", ("流行性感冒", "肺炎"), large, dropped)) == {"流感嗜血杆菌感染",
                                                                                                   "肺炎"}
    assert "the disease is itself a symptom" in dropped and "held by too few entities of the graph" in dropped


def test_the_review_rules_for_drug_effects_herbs_and_names() -> None:
    """Classes of rows the clinical review found misleading or garbled (docs/data_review.md), each ruled out."""
    large = GraphFacts(True, frozenset({"甲病", "山楂", "防风", "竹叶"}), frozenset({"甲病"}),
                       {"adverse": Counter({"恶心": 900, "呕吐": 800, "头晕": 700, "呼吸抑制": 50, "黑便": 300,
                                            "肾功能不全": 200, "便秘": 600}),
                        "ingredient": Counter({"山楂": 300, "防风": 200, "竹叶": 2, "对乙酰氨基酚": 90}),
                        "indication": Counter({"肺结核": 300, "痢疾": 300}),
                        "population": Counter({"孕妇": 300, "老年人": 300})},
                       herbs=frozenset({"山楂", "防风", "竹叶"}))
    dropped: Counter[str] = Counter()

    def curated(name: str, kind: str, relation: str, values: tuple[str, ...], **facts: tuple[str, ...]) -> tuple:
        return curated_values(entity(name, kind, **facts), relation, values, large, dropped)

    # an opioid's effects without respiratory depression mislead; with it, it leads
    assert curated("盐酸吗啡片", "drug", "adverse", ("恶心", "呕吐", "头晕")) == ()
    assert curated("盐酸吗啡片", "drug", "adverse", ("恶心", "呼吸抑制", "便秘"))[0] == "呼吸抑制"
    # iron's black stools are harmless; an aluminium antacid's 肾功能不全 is a caution; a wash's systemic list is copied
    assert "黑便" not in curated("硫酸亚铁片", "drug", "adverse", ("黑便", "恶心", "便秘"))
    assert curated("甲铝片", "drug", "adverse", ("肾功能不全", "便秘")) == ("便秘",)
    assert curated("甲滴眼液", "drug", "adverse", ("恶心", "呕吐", "头晕")) == ()
    # a herb is never presented as treating tuberculosis; a group the name states is no fact
    assert curated("甲草", "herb", "indication", ("肺结核", "痢疾")) == ("痢疾",)
    assert curated("妊娠合并甲病", "disease", "population", ("孕妇", "老年人")) == ("老年人",)
    # ingredients: a herbal composition only (a mixed list would hide 对乙酰氨基酚); two herbs run together go
    assert curated("甲感冒片", "drug", "ingredient", ("山楂", "防风", "对乙酰氨基酚")) == ()
    assert curated("甲颗粒", "drug", "ingredient", ("山楂", "竹叶防风", "防风")) == ("山楂", "防风")
    # a herb's taste and nature, one character each, are the fact: tastes first, then the nature
    assert curated("麻黄", "herb", "nature", tuple(clean_values("nature", ["温", "微苦", "辛"], "麻黄"))) == (
        "味微苦", "味辛", "性温")


@pytest.mark.parametrize(("relation", "entity_name", "values", "expected"), [
    ("contraindication", "甲片", ["严重肝、肾功能不全者禁用"], ["严重肝肾功能不全者禁用"]),  # not 严重肝 + 肾...
    ("population", "甲病", ["l岁以内婴儿"], ["1岁以内婴儿"]),  # an OCR l for 1
    ("ingredient", "复方甲片", ["人参茎叶皂甙", "人参茎叶皂苷"], ["人参茎叶皂苷"]),  # one ingredient, two spellings
    ("ingredient", "开塞露（含甘油）", ["甘油", "苯扎溴铵"], []),  # its glycerol is an 'excipient': the rest misleads
    ("test_category", "泌尿系统CT检查", ["计算机体层摄影CT检查"], []),  # "a CT is a CT"
    ("body_site", "卵巢透明细胞肿瘤", ["卵巢"], []),  # restates the name
    ("alias", "安徽刺黄柏", ["刺黄柏"], []),  # a wider name inside its own
])
def test_values_that_restate_the_name_or_read_wrong_are_mended_or_dropped(relation: str, entity_name: str,
                                                                           values: list[str],
                                                                           expected: list[str]) -> None:
    assert clean_values(relation, values, entity_name) == expected


def test_only_a_strength_in_a_name_skips_the_entity() -> None:
    """三七片, 维生素B12片, 十滴水 are names, not doses; 米非司酮片10mg is one strength of a product."""
    kept = entities_from({name: {"适应症": ["甲病"]} for name in ("三七片", "维生素B12片", "十滴水", "米非司酮片10mg")})
    assert {entity.name for entity in kept} == {"三七片", "维生素B12片", "十滴水"}


def test_a_value_a_drug_is_said_both_to_treat_and_to_cause_is_stated_neither_way() -> None:
    """二甲双胍 "for" 低血糖症, 复方联苯双酯片 "causing" 肝炎: one side is a mislink, and nothing tells which."""
    (metformin,) = entities_from({"盐酸二甲双胍片": {"适应症": ["2型糖尿病", "低血糖症"],
                                                 "不良反应": ["低血糖症", "腹泻"]}})
    assert metformin.values("indication") == ("2型糖尿病",) and metformin.values("adverse") == ("腹泻",)


def test_the_relations_cmekg_gets_wrong_are_left_out_and_every_kind_keeps_facts() -> None:
    entities = cmekg_entities()
    off = set(resources.clinical()["relations_off"]["cmekg"])
    assert not [e.name for e in entities if off & set(e.facts)]
    by_kind = Counter(e.kind for e in entities)
    assert {"disease", "drug", "herb", "test", "formula"} <= set(by_kind)
    assert all(by_kind[kind] > 300 for kind in ("disease", "drug", "herb", "formula")), by_kind
    assert by_kind["test"] >= 20, by_kind  # most cMeKG tests hold only a category, which the review turned off


@pytest.mark.parametrize(("relation", "entity", "values", "expected"), [
    ("parent", "瘢痕性脱发", ["瘢痕性脱发[瘢痕性毛发缺失]", "毛发疾病"], ["毛发疾病"]),
    ("cause", "胆汁性肝硬化", ["原发性胆汁性肝硬化", "胆道梗阻"], ["胆道梗阻"]),
    ("treatment", "脐疝", ["婴儿脐疝", "成人脐疝", "腹带加压"], ["腹带加压"]),
    ("surgery", "腹股沟疝", ["腹股沟疝修补术", "疝囊高位结扎术"], ["疝囊高位结扎术"]),
    ("test", "贫血", ["血常规", "贫血"], ["血常规"]),
    # who gets it: groups of people only, never a department, a place or a risk factor
    ("population", "肾性贫血", ["肾内科", "儿童", "农村"], ["儿童"]),
    ("population", "癌症", ["喝酒者", "抽烟", "男性多于女性", "老年人"], ["喝酒者", "老年人"]),
])
def test_tautologies_and_mismatched_kinds_are_dropped(relation: str, entity: str, values: list[str],
                                                      expected: list[str]) -> None:
    assert clean_values(relation, values, entity) == expected


def test_label_relations_keep_one_clear_label() -> None:
    assert clean_values("contagious", ["无"], "x") == ["无"]
    assert clean_values("contagious", ["无", "有"], "x") == []
    assert clean_values("prescription", ["处方药", "OTC甲类"], "x") == []  # conflicting labels are not asked about
    assert clean_values("prescription", ["OTC乙类"], "x") == ["otc_b"]
    assert clean_values("route", ["口服，一次2片，一日3次"], "x") == ["口服"]  # only the route, never the dose
    assert clean_values("toxicity", ["无毒（《别录》）"], "x") == ["无毒"]
