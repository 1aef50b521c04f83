"""The one safety module of both backends (template and openai): what no answer may say and what every answer must.

- doses, strengths, frequencies and intervals (OCR forms such as `I6mg`, `l5毫克`, `1D0单位` included);
- emergencies: an answer (or its question) that shows an alarm sign, a serious adverse effect or an emergency disease
  ends with "seek care now / call 120" (`care_advice`), a serious adverse effect with "stop the drug" too;
- what a model answer may not say: absolute claims, risky instructions (a negation takes one back only when it
  governs it), advice that delays or stops care, reassurance the graph does not state;
- contentless answers, and the character bigrams every near-equality uses.

The patterns and lists live in `safety.yaml` and `emergencies.yaml`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache

from utils.builder import resources

_DIGITS = r"0-9０-９"
_CN_NUMBER = r"[一二两三四五六七八九十百千半]+"
_PUNCTUATION = re.compile(r"[\s，,。.；;：:、！!？?（）()《》“”\"'「」【】\[\]/-]+")
_CLAUSE = re.compile(r"[，,。；;！!？?\n]")
_ITEM = re.compile(r"[，,。；;！!？?、：:（）()\n]|和|及|与|或|以及|伴")


def _number() -> str:
    """A number: digits (with OCR look-alikes such as I, l, O, D among them: I6, l5, 1D0), or a Chinese numeral."""
    ocr = re.escape(resources.safety()["ocr_digits"])
    digits = rf"(?=[{ocr}.．]*[{_DIGITS}])[{_DIGITS}{ocr}][{_DIGITS}{ocr}.．]*"
    return rf"(?:{digits}|{_CN_NUMBER})"


@cache
def _dose_pattern() -> re.Pattern[str]:
    units = sorted(resources.safety()["dose_units"], key=len, reverse=True)
    latin = [re.escape(unit) + r"(?![A-Za-z])" for unit in units if re.fullmatch(r"[A-Za-z/]+", unit)]
    other = [re.escape(unit) for unit in units if not re.fullmatch(r"[A-Za-z/]+", unit)]
    number = _number()
    mass = "|".join(re.escape(unit) for unit in sorted(resources.safety()["mass_units"], key=len, reverse=True))
    return re.compile(rf"(?<![A-Za-z]){number}(?:\s*[-—–～~至到]\s*{number})?\s*(?:{'|'.join(latin + other)})"
                      rf"|(?<=[A-Za-z])\d+(?:\.\d+)?\s*(?:{mass})(?![A-Za-z])")


@cache
def _frequency_pattern() -> re.Pattern[str]:
    data = resources.safety()
    patterns = data["frequency_patterns"] + data["interval_patterns"]
    return re.compile("|".join(f"(?:{pattern})" for pattern in patterns), re.IGNORECASE)


def dose_or_frequency(text: str) -> str | None:
    """The first dose (`0.5g`, `9—15克`, `2片`, `I6mg`), frequency (`一日3次`, `每天`, `bid`) or interval (`餐前30分钟`,
    `6小时内重复服用`) in `text`, or None. Values and rows that hold one are dropped."""
    match = _dose_pattern().search(text) or _frequency_pattern().search(text)
    return match.group(0) if match else None


def without_names(text: str, names: Iterable[str]) -> str:
    """`text` with the entity names taken out: 三七片 and 维生素B12片 are names, not doses of 七 or 2 tablets."""
    for name in sorted({name for name in names if name}, key=len, reverse=True):
        text = text.replace(name, "")
    return text


def dosing(text: str) -> str | None:
    """Like `dose_or_frequency`, but a frequency in a clause about a check-up and not about taking a drug
    ("每六个月复查一次") is a follow-up interval, not a dose: what the report counts as rows with doses."""
    match = _dose_pattern().search(text)
    if match:
        return match.group(0)
    data = resources.safety()
    for match in _frequency_pattern().finditer(text):
        start = max((m.end() for m in _CLAUSE.finditer(text, 0, match.start())), default=0)
        end = next((m.start() for m in _CLAUSE.finditer(text, match.end())), len(text))
        clause = text[start:end]
        if any(word in clause for word in data["follow_up_words"]) and not any(
                word in clause for word in data["medication_words"]):
            continue
        return match.group(0)
    return None


def stated_numbers(text: str) -> list[str]:
    """Every number the text states (digits, or a Chinese numeral with a unit or 次), for grounding model answers."""
    found = [match.group(0) for match in re.finditer(r"\d+(?:[.．]\d+)?", text)]
    found += [match.group(0) for match in _dose_pattern().finditer(text)]
    found += [match.group(0) for match in _frequency_pattern().finditer(text)]
    return found


# --- what a model answer may not say ----------------------------------------------------------------------------


@cache
def _pattern(key: str) -> re.Pattern[str]:
    """Any phrase of a `safety.yaml` list, longest first."""
    phrases = sorted(resources.safety()[key], key=len, reverse=True)
    return re.compile("|".join(re.escape(phrase) for phrase in phrases))


def absolute_claim(text: str) -> str | None:
    """The first absolute claim (所有, 一定, 不会引起任何, ...) in a model's answer, or None."""
    match = _pattern("absolute_claims").search(text)
    return match.group(0) if match else None


def without_allowed_phrases(text: str) -> str:
    """The text without the standard safety phrases (拨打120, 请在医生指导下使用, 用药期间 ...), which any answer
    may hold."""
    return _pattern("allowed_phrases").sub("，", text)


@cache
def _meaning(*keys: str) -> re.Pattern[str]:
    """The phrases (longest first) and then the regular expressions of `safety.yaml` lists, as one pattern."""
    data = resources.safety()
    phrases = [phrase for key in keys if key in _PHRASE_LISTS for phrase in data[key]]
    patterns = [re.escape(phrase) for phrase in sorted(phrases, key=len, reverse=True)]
    patterns += [f"(?:{pattern})" for key in keys if key not in _PHRASE_LISTS for pattern in data[key]]
    return re.compile("|".join(patterns))


_PHRASE_LISTS = frozenset({"risky_instructions", "care_delaying"})
_COORDINATED = re.compile(r"\s*(?:或者|或|和|及|与|、|/)\s*")


def _governed(text: str, start: int, doctor: bool = False) -> bool:
    """Whether a negation governs the phrase starting at `start`: it ends right before it, with only bridge words
    (自行, 随意, 同时, 服药期间 ...) between, in the same clause. `不要紧张，自行停药即可` is not governed. With
    `doctor`, a doctor's guidance earlier in the clause governs it too (遵医嘱调整剂量, 在医生指导下减量)."""
    data = resources.safety()
    before = _CLAUSE.split(text[:start])[-1]
    if doctor and any(word in before for word in data["doctor_governance"]):
        return True
    bridges = sorted(data["negation_bridges"], key=len, reverse=True)
    changed = True
    while changed:
        changed = False
        for bridge in bridges:
            if before.endswith(bridge):
                before, changed = before[: -len(bridge)], True
    return before.endswith(tuple(data["risky_negations"]))


def _ungoverned(pattern: re.Pattern[str], text: str, doctor: bool = False) -> str | None:
    """The first match no negation (or doctor) governs; one joined by 或/和/、 to a governed one is governed too
    (不可自行减量或加倍). A match inside a standard safety phrase (应立即停药并就医) is none of the model's."""
    allowed = [match.span() for match in _pattern("allowed_phrases").finditer(text)]
    governed_end = -1
    for match in pattern.finditer(text):
        if any(a <= match.start() and match.end() <= b for a, b in allowed):
            continue
        joined = governed_end >= 0 and _COORDINATED.fullmatch(text[governed_end : match.start()])
        if joined or _governed(text, match.start(), doctor):
            governed_end = match.end()
            continue
        return match.group(0)
    return None


def risky_instruction(text: str) -> str | None:
    """The first risky instruction (服药后可以喝酒, 自行停药, 放心使用, 可以同服) or stop or dose change by meaning
    (即可停服, 剂量减少一半, 下次吃双倍) that no negation or doctor governs (服药期间避免饮酒, 不要自行停药,
    遵医嘱调整剂量 are fine; 不要紧张，自行停药即可 is not), or None. A bare item of a list (危险因素包括…、饮酒)
    is a fact, not an instruction."""
    def listed(match: re.Match[str]) -> str:
        left, right = text[match.start() - 1 : match.start()] or "，", text[match.end() : match.end() + 1] or "，"
        return "、" * len(match.group(0)) if "、" in left + right and _ITEM.fullmatch(left) and _ITEM.fullmatch(
            right) else match.group(0)

    text = _meaning("risky_instructions").sub(listed, text)
    return _ungoverned(_meaning("risky_instructions", "stop_or_dose_change"), text, doctor=True)


def care_delaying(text: str, emergency: bool = False) -> str | None:
    """Advice that delays or stops care (第二天再去, 等明早再去医院, 不着急去医院, 休息一下就好, 不用再吃) unless a
    negation governs it; for an `emergency`, any waiting wording too (先在家躺着, 观察一下, 会自行缓解)."""
    keys = ("care_delaying", "care_deferral") + (("emergency_deferral",) if emergency else ())
    return _ungoverned(_meaning(*keys), text)


def reassurance(text: str) -> str | None:
    """Reassurance no graph states (不会被传染, 不用担心, 可以放心 ...), or None."""
    match = _pattern("reassurance").search(text)
    return match.group(0) if match else None


def contraindication_concepts(text: str) -> frozenset[int]:
    """The contraindication concepts (pregnancy, breastfeeding, children, liver, kidney, old age) `text` names, by
    their key characters (孕 for 妊娠期, 孕妇, 怀孕了)."""
    groups = resources.safety()["contraindication_concepts"]
    return frozenset(index for index, keys in enumerate(groups) if any(key in text for key in keys))


def contradicted_contraindication(text: str, contraindications: Iterable[str]) -> str | None:
    """The listed contraindication an answer says is fine (华法林…妊娠期也适合使用, 怀孕了也不会有问题 for 妊娠期),
    or None: a clause naming it (its core, or a word of its concept) with permissive or reassuring wording and no
    negation outside that wording (孕妇不宜使用, 妊娠期不适用 are fine)."""
    data = resources.safety()
    affixes = sorted(data["contraindication_affixes"], key=len, reverse=True)
    negations = (*data["risky_negations"], "禁", "慎", "忌", "不")
    permissive = _pattern("permissive_words")
    for value in contraindications:
        core = value
        for affix in affixes:
            core = core.replace(affix, "")
        concepts = contraindication_concepts(value)
        for clause in _CLAUSE.split(text):
            named = (len(core) >= 2 and core in clause) or bool(concepts & contraindication_concepts(clause))
            rest = permissive.sub("", clause)
            if named and rest != clause and not any(word in rest for word in negations):
                return value
    return None


def drug_spans(text: str) -> list[str]:
    """The drugs an answer names, found by how drug names end (华法林, 美托洛尔, 头孢呋辛, …胶囊): each the run of
    characters around the ending, cut at the words that come before a drug (用, 服, 和 ...)."""
    words = re.compile(f"[^{re.escape(resources.safety()['drug_name_delimiters'])}]+")
    spans: list[str] = []
    for match in _pattern("drug_name_endings").finditer(text):
        start = max((m.end() for m in _ITEM.finditer(text, 0, match.start())), default=0)
        end = next((m.start() for m in _ITEM.finditer(text, match.end())), len(text))
        span = next((word.group(0) for word in words.finditer(text, start, end)
                     if word.start() <= match.start() and match.end() <= word.end()), match.group(0))
        if span not in spans:
            spans.append(span)
    return spans


# --- emergencies ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Emergencies:
    diseases: frozenset[str]
    disease_patterns: tuple[str, ...]
    not_emergency_parts: tuple[str, ...]
    symptoms: tuple[str, ...]
    serious_adverse: tuple[str, ...]
    pictures: tuple[tuple[str, ...], ...]


@cache
def emergencies() -> Emergencies:
    data = resources.emergencies()
    return Emergencies(frozenset(data["diseases"]), tuple(data["disease_patterns"]), tuple(data["not_emergency_parts"]),
                       tuple(data["symptoms"]), tuple(data["serious_adverse"]),
                       tuple(tuple(picture) for picture in data["symptom_pictures"]))


def is_emergency_disease(name: str) -> bool:
    """A listed emergency (急性心肌梗死, 肠套叠), or a name with an emergency pattern (一氧化碳中毒, 甲亢危象, 脾破裂)
    that is not a chronic or late form (慢性铅中毒, 陈旧性心肌梗死), an acid-base disorder or a test."""
    known = emergencies()
    if name in known.diseases:
        return True  # a vaccine named after one (吸附白喉破伤风联合疫苗, 出血热灭活疫苗) is none
    return (any(pattern in name for pattern in known.disease_patterns) and not any(
        part in name for part in (*known.not_emergency_parts, *resources.emergencies()["prevention_words"])))


def alarm_symptoms(symptoms: Sequence[str]) -> list[str]:
    """The shown symptoms that are alarm signs (胸痛, 呼吸困难, 意识丧失, ...) or together make an alarm picture
    (眼压升高 with 瞳孔散大: acute glaucoma)."""
    known = emergencies()
    found = [symptom for symptom in symptoms if any(key in symptom for key in known.symptoms)]
    for picture in known.pictures:
        parts = [next((symptom for symptom in symptoms if key in symptom), None) for key in picture]
        if all(parts):
            found.extend(part for part in parts if part and part not in found)
    return found


def items(text: str) -> list[str]:
    """The listed items of a text: pieces between punctuation and the conjunctions 和/及/与/或/伴."""
    return [item for item in _ITEM.split(text) if item]


@dataclass(frozen=True)
class Alarms:
    """What a row shows that calls for urgent care, each as the item of the text it was found in."""

    adverse: tuple[str, ...] = ()
    symptoms: tuple[str, ...] = ()
    diseases: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.adverse or self.symptoms or self.diseases)


@cache
def _any_alarm() -> re.Pattern[str]:
    """Every word an alarm can hold (a sign, a serious adverse effect, an emergency disease or its pattern): a text
    without one shows none (the fast path of every row)."""
    known = emergencies()
    words = {*known.symptoms, *known.serious_adverse, *known.diseases, *known.disease_patterns}
    words |= {key for picture in known.pictures for key in picture}
    return re.compile("|".join(map(re.escape, sorted(words, key=len, reverse=True))))


def _sentences(text: str) -> list[str]:
    return [sentence for sentence in re.split(r"[；;。！!？?\n]", text) if sentence]


def alarms(text: str, adverse_context: bool = False, names: Sequence[str] = ()) -> Alarms:
    """The alarm signs, alarm pictures, emergency diseases and (in a sentence about a drug's effects, when the row is
    about them) serious adverse effects that `text` shows. A sentence naming contraindications or precautions
    (禁用, 慎用, 不宜 ...: who must not take a drug) shows no sign to act on, so it is not read. An emergency disease
    is one listed by name (肠套叠), or one of `names` (the row's entities) whose name has an emergency pattern."""
    if not _any_alarm().search(text):
        return Alarms()
    known = emergencies()
    data = resources.emergencies()
    shown_sentences = [s for s in _sentences(text) if not any(word in s for word in data["condition_words"])]
    pieces = [piece for sentence in shown_sentences for piece in items(sentence)]
    effects = [piece for sentence in shown_sentences if adverse_context
               and any(word in sentence for word in data["effect_words"]) for piece in items(sentence)]
    signs = known.symptoms + tuple(key for picture in known.pictures for key in picture)
    symptoms = [max((key for key in signs if key in piece), key=len) for piece in alarm_symptoms(pieces)]
    serious = [max((key for key in known.serious_adverse if key in piece), key=len) for piece in effects
               if any(key in piece for key in known.serious_adverse)]
    diseases = [name for name in names if is_emergency_disease(name) and any(name in s for s in shown_sentences)]
    for piece in pieces:
        named = [name for name in known.diseases if name in piece]
        if named and not any(part in piece for part in (*known.not_emergency_parts, *data["prevention_words"])):
            diseases.append(max(named, key=len))
    return Alarms(tuple(dict.fromkeys(serious)), tuple(dict.fromkeys(symptoms)), tuple(dict.fromkeys(diseases)))


def stopped_gradually(text: str) -> bool:
    """Whether `text` (an answer, a drug's precautions) says the drug must not be stopped abruptly."""
    return any(phrase in text for phrase in resources.emergencies()["keep_phrases"])


def keeps_taking(drug: str) -> bool:
    """A drug not to be stopped on one's own even after a serious reaction (insulin, antiepileptics, steroids)."""
    return any(part in drug for part in resources.emergencies()["keep_taking"])


def _two(names: Sequence[str]) -> str:
    names = list(names)[:2]
    return names[0] if len(names) == 1 else "、".join(names[:-1]) + "和" + names[-1]


def first_aid(text: str) -> str:
    """The first-aid sentences (吃糖 at once for 低血糖, 120 when unconscious) for what `text` shows outside the
    sentences naming who must not take a drug, less those the text holds already."""
    data = resources.emergencies()
    shown = "。".join(s for s in _sentences(text) if not any(word in s for word in data["condition_words"]))
    return "".join(sentence for pattern, sentence in data["first_aid"].items()
                   if re.search(pattern, shown) and sentence not in text)


def is_vaccine(names: Sequence[str]) -> bool:
    return any(word in name for name in names[:1] for word in resources.emergencies()["vaccine_words"])


def for_vaccine(answer: str) -> str:
    """A vaccine's answer said as one about a vaccination: no 停药 (a vaccine is given, not taken), the vaccinating
    clinic told of a reaction."""
    for said, meant in resources.emergencies()["vaccine_rewording"]:
        answer = answer.replace(said, meant)
    return answer


def care_advice(question: str, answer: str, adverse_context: bool = False, names: Sequence[str] = (),
                keep: bool = False) -> str:
    """The sentences an answer must end with, or "" when it needs none: first aid it calls for (低血糖), then, unless
    it names 120 already, a serious adverse effect -> stop the drug and seek care now; an emergency disease or an
    alarm sign -> seek care now."""
    aid = first_aid(f"{question}\n{answer}")
    return _urgent_advice(question, answer, adverse_context, names, keep) + aid


def _urgent_advice(question: str, answer: str, adverse_context: bool, names: Sequence[str], keep: bool) -> str:
    if "120" in answer:
        return ""
    shown = alarms(f"{question}\n{answer}", adverse_context, names)
    data = resources.emergencies()
    if shown.adverse:  # a drug not to be stopped abruptly (不应突然停止用药) is never 'stopped now' either
        keep = keep or any(keeps_taking(name) for name in names) or stopped_gradually(answer)
        return data["adverse_keep_sentence" if keep else "adverse_sentence"].replace("{what}", _two(shown.adverse))
    if shown.diseases:
        what = shown.diseases[0]
        return data["disease_sentences"].get(what, data["disease_sentence"]).replace("{what}", what)
    if shown.symptoms:
        return data["sentence"].replace("{what}", _two(shown.symptoms))
    return ""


def with_care_advice(question: str, answer: str, adverse_context: bool = False, names: Sequence[str] = (),
                     keep: bool = False) -> str:
    answer += care_advice(question, answer, adverse_context, names, keep)
    return for_vaccine(answer) if is_vaccine(names) else answer


# --- contentless answers and text similarity ----------------------------------------------------------------------


def contentless(answer: str, names: Iterable[str] = ()) -> bool:
    """True when the answer says nothing once the entity names and template words are taken out:
    `X的用法用量：遵医嘱。`, a tautology like `阿莫西林的主要成分是阿莫西林。`, or an answer that is only `尚不明确`."""
    text = answer
    for name in sorted({name for name in names if name}, key=len, reverse=True):
        text = text.replace(name, "")
    bare = _PUNCTUATION.sub("", text)
    if bare in set(resources.safety()["contentless_answers"]):
        return True
    return len(_pattern("filler_words").sub("", bare)) < 2


def bigrams(text: str) -> set[str]:
    """Character bigrams of `text` with whitespace removed (the unit of every near-equality in the builder)."""
    text = re.sub(r"\s+", "", text)
    return {text[index : index + 2] for index in range(len(text) - 1)}


def jaccard(a: set[str], b: set[str]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)
