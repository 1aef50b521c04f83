"""Curation across the whole graph: each entity's clean facts checked against the curated clinical lists
(`clinical.yaml`) and against the rest of the graph, and ranked by clinical importance.

- symptoms: a disease that is itself a symptom (黄疸, 发热) lists the symptoms of its causes, so it lists none; a large
  graph's symptom lists keep only the clinical-symptom vocabulary (no diseases, organisms, body parts, findings);
- an indication that is also an adverse effect or a contraindication of the same drug (二甲双胍 "for" 低血糖症) goes;
  an organism is an infection by it; a patent medicine never "treats" an emergency;
- a large graph's rare values (held by fewer entities than `min_holders`) go unless the vocabulary, an entity name or
  the relation's endings vouch for them: a value only one subject holds is mostly a fragment of its source sentence;
- near repeats in one list (乏力, 全身乏力) keep the shorter; precautions must be advice (忌…, 慎用, 应…);
- ranking: serious adverse effects, major complications, common indications first, so a list cut at `max_items`
  never leads with a minor item or loses the key one; a large graph's lists then by how many entities share a value
  (its symptom lists: specific signs first, then the common symptoms before the rare ones, alarm signs last: a
  list that leads with 休克 misleads about what is typical).

What is dropped is counted, by reason, for the report.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cache, cached_property
from itertools import zip_longest

from utils.builder import resources
from utils.builder.graph import CMEKG, Entity, GraphStats, build_entity, predicate_map, read_graph
from utils.builder.progress import progress_bar
from utils.builder.safety import alarm_symptoms, bigrams, emergencies, is_emergency_disease

MIN_LISTED = {"symptom": 3, "complication": 2, "test": 2}  # a large graph's shorter lists: what its extraction missed
_NOTE = re.compile(r"[（(][^（）()]*[)）]")  # a bracketed note: 心电图（ECG）检查
MOST_SERIOUS_SHOWN = 2  # a shown list keeps two serious adverse effects, after the common ones it leads with


@dataclass(frozen=True)
class Vocabulary:
    """The clinical-symptom vocabulary, each symptom with its group (specific, other, nonspecific)."""

    group: dict[str, str]

    def __contains__(self, symptom: object) -> bool:
        return symptom in self.group

    def nonspecific(self, symptom: str) -> bool:
        return self.group.get(symptom) == "nonspecific"

    def specific(self, symptom: str) -> bool:
        return self.group.get(symptom) == "specific"


@cache
def vocabulary() -> Vocabulary:
    groups = resources.clinical()["symptoms"]
    return Vocabulary({symptom: group for group in ("nonspecific", "other", "specific") for symptom in groups[group]})


def _rank(values: list[str], first: Sequence[str], holders: Counter[str] | None) -> list[str]:
    """`first` (in its order) ahead of the rest; then, in a large graph, values more entities share."""
    order = {value: index for index, value in enumerate(first)}

    def key(value: str) -> tuple[int, int]:
        at = order.get(value)
        if at is None:
            at = next((index for index, item in enumerate(first) if item in value), len(first))
        return at, -(holders[value] if holders is not None else 0)

    return sorted(values, key=key)


OCR_PRONE = ("ingredient", "effect", "adverse", "symptom", "function_indication")
COMMON = 20  # a value this many entities hold is a common one; a one-character variant of it held once is a typo
RARE = 2


@dataclass
class GraphFacts:
    """What the whole graph says, for the checks of one entity's facts."""

    large: bool
    names: frozenset[str]
    diseases: frozenset[str]
    holders: dict[str, Counter[str]]  # relation -> value -> how many entities hold it
    relations_off: frozenset[str] = frozenset()
    herbs: frozenset[str] = frozenset()

    @cached_property
    def _masks(self) -> dict[str, dict[str, set[str]]]:
        """relation -> a common value with one character masked (川?, ?芎) -> the common values it masks."""
        masks: dict[str, dict[str, set[str]]] = {}
        for relation in OCR_PRONE:
            table = masks.setdefault(relation, {})
            for value, count in self.holders.get(relation, Counter()).items():
                if count >= COMMON:
                    for index in range(len(value)):
                        table.setdefault(value[:index] + "?" + value[index + 1 :], set()).add(value)
        return masks

    def ocr_variant(self, relation: str, value: str) -> bool:
        """A rare value one character away from a common one of the same relation (消栓口服液: 川号、川尝 beside
        川芎): the source's OCR typo."""
        if self.holders.get(relation, Counter())[value] > RARE or len(value) < 2:
            return False
        table = self._masks.get(relation, {})
        return any(table.get(value[:index] + "?" + value[index + 1 :], set()) - {value}
                   for index in range(len(value)))


ORAL_FORMS = ("片", "胶囊", "颗粒", "丸", "口服液", "口服溶液", "糖浆", "散", "冲剂", "合剂", "滴丸", "胶丸")


def never_indicated(drug: Entity, value: str, data: dict) -> bool:
    """An indication a drug of its kind never has: an emergency for an oral drug, a patent medicine or a herb (their
    lists mix in contraindications: 格列美脲片 "for" 糖尿病酮症酸中毒), a disease a herb is never presented as treating
    (`herb_not_for`: 木槿根 "for" 肺结核), or one of the curated `never_indicated` of its kind."""
    oral = drug.name.endswith(ORAL_FORMS) or is_patent_medicine(drug) or drug.kind == "herb"
    if oral and (is_emergency_disease(value) or alarm_symptoms([value])):
        return True
    if drug.kind == "herb" and any(word in value for word in data["herb_not_for"]):
        return True
    return any(part in drug.name and value in values for part, values in data["never_indicated"].items())


def drug_names(drug: Entity) -> tuple[str, ...]:
    return drug.name, *drug.values("generic_name")  # a brand's kind is in its generic name (普米克令舒: 布地奈德)


def is_key_adverse(drug: Entity, effect: str, data: dict) -> bool:
    return any(part in name for name in drug_names(drug) for part in data["key_adverse"].get(effect, ()))


def missing_key_adverse(drug: Entity, effects: Sequence[str], data: dict) -> bool:
    """Whether a drug of a kind with a key adverse effect (a sulfonylurea: hypoglycaemia) lists effects without it:
    such a list misleads about what to watch for."""
    kinds = {part for parts in data["key_adverse"].values() for part in parts for name in drug_names(drug)
             if part in name}
    return bool(kinds) and not any(value in effects for value, parts in data["key_adverse"].items()
                                   if kinds & set(parts))


def route_fits(name: str, route: str, data: dict) -> bool:
    """A route the product's dosage form allows (盐酸阿米替林注射液 is not taken by mouth, a tablet not injected)."""
    forms = data["route_forms"]
    injected = any(word in route for word in forms["injection_routes"])
    if any(word in name for word in forms["injection_names"]):
        return injected
    return not (injected and name.endswith(ORAL_FORMS))


def is_herb(value: str, herbs: frozenset[str], data: dict) -> bool:
    """Whether an ingredient is a herb of the graph, as prepared (炒白术, 地榆炭, 狗脊（制）, 乌药干浸膏)."""
    bare = _NOTE.sub("", value)
    prepared = data["prepared_herb"]
    forms = {bare, bare.lstrip(prepared["before"]), *(bare.removesuffix(end) for end in prepared["after"])}
    return bool(forms & herbs)


def is_patent_medicine(entity: Entity) -> bool:
    return bool(entity.values("function_indication")) or "中成药" in entity.values("drug_class")


def _symptoms_ranked(symptoms: list[str], words: Vocabulary, severe: set[str], holders: Counter[str]) -> list[str]:
    """Specific signs first; then the organ signs (便血, 呼吸困难) and the non-specific symptoms (发热, 腹痛) in turn,
    each by how many diseases hold it, so a cut list keeps both a disease's picture and its common complaints; the
    severe states any grave illness ends in last."""
    by_holders = sorted(symptoms, key=lambda value: -holders[value])
    groups = [[value for value in by_holders if value not in severe and test(value)]
              for test in (words.specific, lambda value: not words.specific(value) and not words.nonspecific(value),
                           words.nonspecific)]
    return groups[0] + [value for pair in zip_longest(groups[1], groups[2]) for value in pair if value] + [
        value for value in by_holders if value in severe]


def _hallmarks_first(disease: str, ranked: list[str], hallmarks: Sequence[str], pathognomonic: dict[str, str],
                     severe: set[str]) -> list[str]:
    """The disease's hallmark signs first; a sign pathognomonic of another disease (重症肌无力's 苦笑面容: tetanus)
    after its other signs, before the severe states."""
    own = [value for value in hallmarks if value in ranked]
    foreign = [value for value in ranked if value not in own and value not in severe
               and pathognomonic.get(value, disease) not in disease]
    rest = [value for value in ranked if value not in own and value not in foreign]
    cut = next((index for index, value in enumerate(rest) if value in severe), len(rest))
    return own + rest[:cut] + foreign + rest[cut:]


def curated_values(entity: Entity, relation: str, values: tuple[str, ...], graph: GraphFacts,
                   dropped: Counter[str]) -> tuple[str, ...]:
    """The values of one relation of an entity that survive the checks, ranked."""
    data = resources.clinical()
    words = vocabulary()
    kept: list[str] = []

    def drop(reason: str, count: int = 1) -> None:
        dropped[reason] += count

    if relation == "symptom" and (entity.name in words or data["symptom_synonyms"].get(entity.name) in words):
        drop("the disease is itself a symptom", len(values))
        return ()
    off = next((key for key in (relation, f"{relation}@{entity.kind}") if key in graph.relations_off), None)
    if off:
        drop(f"relation off for this graph ({off})", len(values))
        return ()
    holders = graph.holders.get(relation, Counter())
    least = int(data["min_holders"].get(relation, 0)) if graph.large else 0
    endings = tuple(data["endings"].get(relation, ()))
    required = graph.large and relation in data["endings_required"]
    not_endings = tuple(data["not_endings"].get(relation, ()))
    markers = tuple(data["precaution_markers"])
    cautions = (*entity.values("contraindication"), *entity.values("precaution"))
    organisms = tuple(data["organism_endings"])
    antibacterial = relation == "indication" and any(
        part in text for text in (entity.name, *entity.values("generic_name"), *entity.values("ingredient"))
        for part in data["antibacterial_parts"])
    leading = tuple(data["leading_words"].get(relation, ()))
    holding = tuple(data["not_holding"].get(relation, ()))
    typos = tuple(data["typos"])
    wrong = set(data["reviewed_wrong"].get(entity.name, {}).get(relation, ()))
    organ_first = tuple(data["organ_first"]) if relation in ("effect", "function_indication") else ()
    hallmarks = tuple(data["hallmark_symptoms"].get(entity.name, ())) if relation == "symptom" else ()
    for value in values:
        held = holders[value]  # as the graph says it (a value said as meant below is held as the graph said it)
        prefix = next((word for word in leading if value.startswith(word) and len(value) > len(word) + 1), "")
        value = value[len(prefix):]
        if antibacterial:
            value = data["antibacterial_mislinks"].get(value, value)
        if relation == "indication" and value.endswith(organisms):
            value += "感染"
        if value in wrong:
            drop("found wrong by a review")
        elif any(typo in value for typo in typos):
            drop("a typo of the source")
        elif (holding and any(word in value for word in holding)) or (organ_first and value.startswith(organ_first)
                                                                       and len(value) == 3) or (
                relation in ("precaution", "contraindication") and re.search(r"[和及与、][\u4e00-\u9fff]$", value)):
            drop("fragment")  # ... or a sentence cut after its last word (宜定期监测血常规和肝)
        elif relation == "symptom" and graph.large and value not in words and value not in hallmarks:
            drop("not in the clinical-symptom vocabulary")
        elif relation == "precaution" and graph.large and not any(marker in value for marker in markers):
            drop("fragment")
        elif (required and not value.endswith(endings)) or (not_endings and value.endswith(not_endings)):
            drop("does not end like a value of its relation")
        elif relation == "interaction" and (value in words or value in graph.diseases or (
                graph.holders.get("adverse", Counter())[value] >= COMMON and value not in graph.names)):
            drop("no drug")
        elif relation == "test" and value in graph.diseases:
            drop("a disease is no test")
        elif relation == "brand_name" and value in (*entity.values("generic_name"), _NOTE.sub("", entity.name)):
            drop("a brand name that is the generic name")
        elif relation == "alias" and graph.large and value in graph.names:
            drop("an alias that is another entity of the graph")
        elif relation == "alias" and graph.large and entity.kind == "disease" and not bigrams(value) & bigrams(
                entity.name):  # 人类免疫缺陷病毒病 "也叫" 口腔毛状黏膜白斑病: a manifestation, not a name
            drop("a disease alias sharing no word with the name")
        elif relation in ("indication", "function_indication") and re.match(data["not_indications"], value):
            drop("a tongue or pulse sign is no indication")
        elif relation == "population" and any(part in entity.name
                                              for part in data["population_in_name"].get(value, ())):
            drop("a group the name states already")
        elif relation == "adverse" and any(value in caution for caution in cautions) and not is_key_adverse(
                entity, value, data):
            drop("a condition its cautions name (维U颠茄铝胶囊 'causes' 肾功能不全)")
        elif relation == "adverse" and any(part in entity.name for part in data["harmless_effects"].get(value, ())):
            drop("a harmless expected effect the alarm rules would take for an emergency (硫酸亚铁片: 黑便)")
        elif relation == "adverse" and is_patent_medicine(entity) and any(
                word in value for word in data["patent_medicine_not_adverse"]):
            drop("an infection as an adverse effect of a patent medicine (its indication)")
        elif relation in ("indication", "function_indication") and never_indicated(entity, value, data):
            drop("an indication the drug's kind never has")
        elif (least and held < least and value not in words and value not in graph.names
              and value not in hallmarks and not (endings and value.endswith(endings))):
            drop("held by too few entities of the graph")
        elif value not in kept:
            kept.append(value)
    if relation in ("symptom", "adverse", "complication", "indication", "function_indication", "test"):
        repeats = [value for value in kept if (value not in words or relation != "symptom") and value not in hallmarks
                   and any(
            other != value and other in value and (len(value) - len(other) <= 2 or other == _NOTE.sub("", value))
            for other in kept)]  # 心电图检查 beside 心电图（ECG）检查
        drop("near repeat in one list", len(repeats))
        kept = [value for value in kept if value not in repeats]
    if relation == "ingredient" and graph.large:
        bare = {_NOTE.sub("", value): value for value in reversed(kept)}  # 三棱（醋炙）and 三棱（醋灸）: the first
        known = {value for value, count in holders.items() if count > 1} | graph.herbs  # 山药, 竹叶
        joined = [value for value in kept if value not in known and any(
            value[:cut] in known and value[cut:] in known for cut in range(2, len(value) - 1))]
        drop("two herbs run together (竹叶防风)", len(joined))
        kept = [value for value in kept if bare[_NOTE.sub("", value)] == value and value not in joined]
        chemical = re.compile("|".join(data["chemical_marks"]))
        herbs = sum(is_herb(value, graph.herbs, data) for value in kept)
        if herbs < 2 or herbs * 2 < len(kept) or any(chemical.search(value) for value in kept):
            drop("not a herbal composition (a label mixes in excipients; a chemical active would be hidden: 感冒灵片's "
                 "对乙酰氨基酚)", len(kept))
            return ()
    if relation == "ingredient":  # 麻黄 beside 盐酸伪麻黄碱 is a piece of it, not another ingredient
        pieces = [value for value in kept if any(value != other and value in other for other in kept)]
        drop("a piece of another ingredient", len(pieces))
        kept = [value for value in kept if value not in pieces]
    counts = holders if graph.large else None
    if relation == "adverse" and ((any(name.endswith(tuple(data["local_forms"])) for name in (
            entity.name, *entity.values("generic_name"))) and sum(
            value in data["systemic_effects"] for value in kept) >= 2) or (not any(
            word in name for name in (entity.name, *entity.values("generic_name"))
            for word in data["route_forms"]["injection_names"]) and any("注射部位" in value for value in kept))):
        drop("a local form with the systemic drug's adverse effects (氟康唑滴眼液: 恶心、呕吐)", len(kept))
        return ()
    if relation == "adverse" and missing_key_adverse(entity, kept, data):
        drop("a list without the key adverse effect of its kind (格列本脲片 without 低血糖)", len(kept))
        return ()
    if relation == "adverse":
        kept = _rank(kept, (), counts)
        key = [value for value in kept if is_key_adverse(entity, value, data)]
        serious = [value for value in kept if value not in key
                   and any(word in value for word in emergencies().serious_adverse)][:MOST_SERIOUS_SHOWN]
        common = [value for value in kept if value not in key and value not in serious]
        room = max(predicate_map().relations["adverse"].max_items - len(key) - len(serious), 0)
        kept = key + common[:room] + serious + common[room:]  # "常见不良反应" never leads with 休克
    elif relation == "complication":
        kept = _rank(kept, data["major_complications"], counts)
    elif relation in ("indication", "function_indication") and graph.large:
        kept = _rank(kept, data["common_diseases"], counts)
    elif relation == "symptom" and graph.large and len(kept) <= 3 and all(map(words.nonspecific, kept)):
        drop("only a few non-specific symptoms left (强迫性障碍: 发热、体重下降、关节痛)", len(kept))
        return ()
    elif relation == "symptom" and graph.large:
        kept = _symptoms_ranked(kept, words, set(data["severe_states"]), holders)
        kept = _hallmarks_first(entity.name, kept, hallmarks, data["pathognomonic"], set(data["severe_states"]))
    if relation == "contagious" and graph.large and kept == ["无"]:
        drop("a 'not contagious' the graph states for infections too (小儿扁桃体炎)")
        return ()
    if relation in OCR_PRONE and graph.large:
        typos = [value for value in kept if value not in words and value not in hallmarks
                 and graph.ocr_variant(relation, value)]
        drop("an OCR variant of a common value", len(typos))
        kept = [value for value in kept if value not in typos]
    if relation == "prescription" and (len(kept) > 1 or (graph.large and kept != ["prescription"])):
        drop("an OTC label the graph also gives prescription drugs" if graph.large else "conflicting label", len(kept))
        return ()
    if relation == "route":
        wrong = [value for value in kept if not route_fits(entity.name, value, data)]
        drop("a route its dosage form rules out", len(wrong))
        kept = [value for value in kept if value not in wrong]
    if relation == "nature":  # 味辛、味微苦、性温: the tastes, then the nature
        kept.sort(key=lambda value: value.startswith("性"))
    if relation == "drug_class" and "中成药" in kept and len(kept) > 1:
        kept.remove("中成药")  # a chemical drug's second label (盐酸二甲双胍片: 中成药, 双胍类)
        drop("conflicting label")
    if graph.large and len(kept) < MIN_LISTED.get(relation, 0):
        drop("too few left to list", len(kept))
        return ()
    return tuple(kept)


def curate(entities: Sequence[Entity], stats: GraphStats, graph_key: str = "") -> list[Entity]:
    """The entities with their facts curated; entities with nothing left, a controlled substance, or a name another
    entity already has are left out (counted by reason). The statistics of kinds and mapped facts are recounted.
    `graph_key` (cmekg) selects the relations `clinical.yaml` turns off for that graph."""
    data = resources.clinical()
    holders: dict[str, Counter[str]] = {}
    for entity in entities:
        for relation, values in entity.facts.items():
            holders.setdefault(relation, Counter()).update(values)
    graph = GraphFacts(len(entities) >= int(data["large_graph"]), frozenset(e.name for e in entities),
                       frozenset(e.name for e in entities if e.kind == "disease"), holders,
                       frozenset(data["relations_off"].get(graph_key, {})),
                       frozenset(e.name for e in entities if e.kind == "herb"))
    controlled = set(data["controlled"])
    stats.relations_off = dict(data["relations_off"].get(graph_key, {}))
    stats.entities_by_kind.clear()
    stats.mapped_facts.clear()
    seen: set[str] = set()
    kept = []
    for entity in entities:
        if entity.name in seen:
            stats.skipped_entities["another entity has the same name"] += 1
            continue
        seen.add(entity.name)
        if entity.name in controlled:
            stats.skipped_entities["a controlled substance"] += 1
            continue
        if any(typo in entity.name for typo in data["typos"]):
            stats.skipped_entities["a typo in the name"] += 1
            continue
        if entity.kind == "drug" and entity.name.endswith(tuple(data["disease_name_endings"])):
            stats.skipped_entities["a drug named like a disease"] += 1  # 晕动病 "的通用名是苯巴比妥东莨菪碱片"
            continue
        facts = {}
        for relation, values in entity.facts.items():
            curated = curated_values(entity, relation, values, graph, stats.dropped_values)
            if curated:
                facts[relation] = curated
        treated = set(entity.values("indication")) | set(entity.values("function_indication"))
        if treated & set(facts.get("adverse", ())):  # 复方联苯双酯片 "causes" 肝炎, which it is given for
            stats.dropped_values["an adverse effect the drug is given for"] += len(treated & set(facts["adverse"]))
            facts["adverse"] = tuple(value for value in facts["adverse"] if value not in treated)
        harmful = set(facts.get("adverse", ())) | set(facts.get("contraindication", ()))
        if harmful & set(facts.get("indication", ())):
            stats.dropped_values["an indication that is also an adverse effect or a contraindication"] += len(
                harmful & set(facts["indication"]))
            facts["indication"] = tuple(value for value in facts["indication"] if value not in harmful)
        facts = {relation: values for relation, values in facts.items() if values}
        if not facts:
            stats.skipped_entities["no fact left after curation"] += 1
            continue
        for relation, values in facts.items():
            stats.mapped_facts[relation] += len(values)
        stats.entities_by_kind[entity.kind] += 1
        kept.append(replace(entity, facts=facts, sources={r: entity.sources[r] for r in facts}))
    return kept


def load_entities(kb: str, progress: bool = False) -> tuple[list[Entity], GraphStats]:
    """The clean entities of `--kb`, in source order, curated (`curate`), and what reading them did."""
    raws, source = read_graph(kb)
    stats = GraphStats(source=source)
    pmap = predicate_map()
    entities = []
    for raw in progress_bar(raws, "reading the graph", "entities", progress):
        entity = build_entity(raw, pmap, stats)
        if entity is not None:
            entities.append(entity)
    return curate(entities, stats, CMEKG if kb == CMEKG else ""), stats
