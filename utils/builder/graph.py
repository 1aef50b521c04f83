"""Reading a knowledge graph and turning its noisy facts into clean ones.

Sources (`--kb`):
- `cmekg`: the graph that the `pycmekg` package ships (`pyCMeKG/model/cmekg.pkl`, {subject: {predicate: [str]}}),
  located with `importlib.util.find_spec` and never imported (its `__init__` unpickles with the unrestricted pickle);
- `FILE.pkl` / `FILE.pickle`: such a pickle, read by `NoGlobalsUnpickler`, which refuses every global, so nothing
  but plain containers, strings and numbers can come out of it and no code in it ever runs;
- anything else: cMeKG-style JSON Lines (or a JSON array), `{"中心词": name, "类型": kind, "<predicate>": [str]}`.

Then the predicate map (`predicates.yaml`) decides each entity's kind and which of its predicates feed which
relation; values are cleaned (`cleaning.yaml`) and whatever is left unmapped or dropped is counted for the report.
"""

from __future__ import annotations

import importlib.util
import io
import pickle
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from utils.builder import resources
from utils.builder.safety import dose_or_frequency
from utils.core.errors import UserError, raise_problems
from utils.core.io import file_problems, read_records

CENTER_KEY = "中心词"
TYPE_KEY = "类型"
CMEKG = "cmekg"
PICKLE_SUFFIXES = (".pkl", ".pickle")
KINDS = ("disease", "drug", "herb", "formula", "procedure", "test", "other")


# --- reading -------------------------------------------------------------------------------------------------------


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a global (a class, a function): refused before it is looked up, let alone called."""


class NoGlobalsUnpickler(pickle.Unpickler):
    """An unpickler that allows no globals at all: classes, functions and `__reduce__` payloads are refused before
    anything is called, so only dicts, lists, tuples, sets, strings, numbers, booleans and None can be built."""

    def find_class(self, module: str, name: str) -> Any:
        raise RefusedGlobal(f"it refers to {module}.{name}; only plain containers, strings and numbers are allowed")

    def persistent_load(self, pid: Any) -> Any:
        raise RefusedGlobal("it holds a persistent reference; only plain data is allowed")


def unpickle_plain(data: bytes, where: str) -> Any:
    """The plain data of a pickle, or one `UserError` naming `where` (nothing in the pickle is ever run)."""
    try:
        return NoGlobalsUnpickler(io.BytesIO(data)).load()
    except RefusedGlobal as error:
        raise UserError(f"{where}: refused to unpickle: {error}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError,
            MemoryError, RecursionError, UnicodeDecodeError, OverflowError) as error:
        raise UserError(f"{where}: not a readable pickle ({type(error).__name__}: {error})") from None


def installed_cmekg_path() -> Path:
    """The graph file of the installed `pycmekg` package, found without importing the package."""
    spec = importlib.util.find_spec("pyCMeKG")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / "model" / "cmekg.pkl"
        if path.is_file():
            return path
    raise UserError("--kb cmekg needs the cMeKG graph of the `pycmekg` package: `pip install pycmekg==0.2.5` "
                    "(see requirements.txt)")


@dataclass(frozen=True)
class RawEntity:
    """One subject of the graph as the source gives it: its name, the kind the source states (if any) and its
    predicates with their values, in source order."""

    name: str
    stated_kind: str | None
    predicates: tuple[tuple[str, tuple[str, ...]], ...]
    where: str


def _json_type(value: Any) -> str:
    names = {str: "a string", bool: "true/false", int: "a number", float: "a number", dict: "an object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _string_list(value: Any, where: str, what: str) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)):
        raise UserError(f"{where}: {what} must be a list of strings, got {_json_type(value)}")
    items: list[str] = []
    for item in value:
        if not isinstance(item, str):
            raise UserError(f"{where}: {what} must be a list of strings, it holds {_json_type(item)}")
        if item.strip() and item.strip() not in items:
            items.append(item.strip())
    return tuple(items)


def graph_from_mapping(graph: Any, where: str) -> list[RawEntity]:
    """Entities of a {subject: {predicate: [str, ...]}} mapping (the cMeKG pickle), checked field by field."""
    if not isinstance(graph, dict):
        raise UserError(f"{where}: expected a mapping {{subject: {{predicate: [values]}}}}, got {_json_type(graph)}")
    entities = []
    for subject, predicates in graph.items():
        if not isinstance(subject, str) or not subject.strip():
            raise UserError(f"{where}: subject {subject!r} must be a non-empty string")
        if not isinstance(predicates, dict):
            raise UserError(f"{where}: subject `{subject}` must map to {{predicate: [values]}}, got "
                            f"{_json_type(predicates)}")
        pairs = []
        for predicate, values in predicates.items():
            if not isinstance(predicate, str):
                raise UserError(f"{where}: subject `{subject}` has a predicate {predicate!r} that is not a string")
            items = _string_list(values, f"{where}: subject `{subject}`", f"predicate `{predicate}`")
            if items and predicate.strip():
                pairs.append((predicate.strip(), items))
        entities.append(RawEntity(subject.strip(), None, tuple(pairs), f"subject `{subject.strip()}`"))
    return entities


def graph_from_records(path: Path) -> list[RawEntity]:
    """Entities of a cMeKG-style JSON Lines file (or JSON array); a name defined twice is an error."""
    entities: list[RawEntity] = []
    first_seen: dict[str, str] = {}
    for where, row in read_records(path):
        name = row.get(CENTER_KEY)
        if name is None:
            raise UserError(f"{path} {where}: missing `{CENTER_KEY}` (the entity's name)")
        if not isinstance(name, str) or not name.strip():
            raise UserError(f"{path} {where}: `{CENTER_KEY}` must be a non-empty string, got {_json_type(name)}")
        name = name.strip()
        kind = row.get(TYPE_KEY)
        if kind is not None and not isinstance(kind, str):
            raise UserError(f"{path} {where}: `{TYPE_KEY}` of `{name}` must be a string, got {_json_type(kind)}")
        pairs = []
        for key, value in row.items():
            if key in (CENTER_KEY, TYPE_KEY):
                continue
            items = _string_list(value, f"{path} {where}", f"relation `{key}` of `{name}`")
            if items and key.strip():
                pairs.append((key.strip(), items))
        if name in first_seen:
            raise UserError(f"{path} {where}: `{CENTER_KEY}` `{name}` is already defined at {first_seen[name]}")
        first_seen[name] = where
        entities.append(RawEntity(name, (kind or "").strip() or None, tuple(pairs), f"{path} {where}"))
    return entities


def read_graph(kb: str) -> tuple[list[RawEntity], str]:
    """(entities, a description of the source) for `--kb`: `cmekg`, a pickle, or JSON Lines."""
    if kb == CMEKG:
        path = installed_cmekg_path()
        return graph_from_mapping(unpickle_plain(path.read_bytes(), str(path)), str(path)), f"cMeKG ({path})"
    path = Path(kb)
    raise_problems(file_problems(path, "--kb"))  # missing (with the nearest name), a folder, a FIFO
    if path.suffix.lower() in PICKLE_SUFFIXES:
        try:
            data = path.read_bytes()
        except OSError as error:
            raise UserError(f"{path}: cannot read it ({error.strerror or error})") from None
        return graph_from_mapping(unpickle_plain(data, str(path)), str(path)), str(path)
    return graph_from_records(path), str(path)


# --- the predicate map ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RelationSpec:
    name: str
    predicates: tuple[str, ...]
    kinds: tuple[str, ...]
    max_items: int = 6
    split: tuple[str, ...] = ()
    min_chars: int = 2
    max_chars: int = 16
    latin: bool = False
    no_name_parts: str = ""  # "both": no value inside the name or holding it; "part": no value inside the name
    people_only: bool = False
    keep_whole: bool = False


@dataclass(frozen=True)
class PredicateMap:
    relations: dict[str, RelationSpec]
    by_predicate: dict[tuple[str, str], str]  # (predicate, kind) -> relation
    ignored: dict[str, str]  # predicate -> why it is left out
    kind_rules: tuple[tuple[str, frozenset[str]], ...]
    type_names: dict[str, str]
    kind_by_name: tuple[tuple[str, tuple[str, ...]], ...]

    def kind_of(self, raw: RawEntity) -> str:
        """The stated kind (疾病, 检查项目 ...), else the first kind whose marker predicates the entity has, else the
        kind its name says (糖化血红蛋白检查 is a test), else other."""
        if raw.stated_kind:
            stated = self.type_names.get(raw.stated_kind)
            return stated or next((kind for name, kind in self.type_names.items() if name in raw.stated_kind), "other")
        predicates = {predicate for predicate, _ in raw.predicates}
        for kind, markers in self.kind_rules:
            if predicates & markers:
                return kind
        return next((kind for kind, endings in self.kind_by_name if raw.name.endswith(endings)), "other")


def _name_parts(setting: bool | str) -> str:
    return "both" if setting is True else (setting or "")


@cache
def predicate_map() -> PredicateMap:
    data = resources.predicate_map()
    relations: dict[str, RelationSpec] = {}
    by_predicate: dict[tuple[str, str], str] = {}
    for name, spec in data["relations"].items():
        relation = RelationSpec(
            name=name, predicates=tuple(spec["predicates"]), kinds=tuple(spec["kinds"]),
            max_items=int(spec.get("max_items", 6)), split=tuple(str(part) for part in spec.get("split", ())),
            min_chars=int(spec.get("min_chars", 2)),
            max_chars=int(spec.get("max_chars", 16)), latin=bool(spec.get("latin", False)),
            no_name_parts=_name_parts(spec.get("no_name_parts", False)),
            people_only=bool(spec.get("people_only", False)), keep_whole=bool(spec.get("keep_whole", False)),
        )
        relations[name] = relation
        for predicate in relation.predicates:
            for kind in relation.kinds:
                by_predicate.setdefault((predicate, kind), name)
    ignored = {predicate: reason for reason, predicates in data["ignore"].items() for predicate in predicates}
    rules = tuple((rule["kind"], frozenset(rule["markers"])) for rule in data["kind_rules"])
    by_name = tuple((kind, tuple(endings)) for kind, endings in data["kind_by_name"].items())
    return PredicateMap(relations, by_predicate, ignored, rules, dict(data["type_names"]), by_name)


# --- cleaning values -----------------------------------------------------------------------------------------------

_CJK = re.compile(r"[\u3400-\u9fff]")
_NOTE = re.compile(r"[（(][^（）()]*[\d%％名例][^（）()]*[）)]")  # 腹痛（3%）, 搏动（1名）
_CITATION = re.compile(r"[（(]?《[^》]*》[^）)]*[）)]?")
_SPACES_NEAR_CJK = re.compile(r"(?<=[\u3400-\u9fff])\s+|\s+(?=[\u3400-\u9fff])")
_ALWAYS_SPLIT = "；;、"
# A strength in a product's name (米非司酮片10mg, 安平10%): one product among several of that name. Only Arabic digits
# with a unit of strength: 三七片, 维生素B12片, 十滴水 are names, not doses.
_STRENGTH = re.compile(r"\d+(?:\.\d+)?\s*(?:mg|g|ml|μg|ug|IU|%|％|万单位|毫克|克|毫升)(?![A-Za-z])", re.IGNORECASE)
_CODE_LIKE = re.compile(r"^(?:[A-Z]\d{2}(?:\.\d+)?|[A-Z0-9]{1,3}\d[A-Z0-9./—-]*|[\W\d_]+)$")
_ACRONYM = re.compile(r"^[A-Za-z][A-Za-z0-9+\-/ ]{0,11}$")
ACRONYM_RELATIONS = {"test", "histology", "surgery", "treatment", "drug_treatment", "english_name"}
SYMPTOM_LIKE = {"symptom", "adverse", "complication"}
SAID_AS_SYMPTOMS = SYMPTOM_LIKE | {"indication", "function_indication"}  # one spelling per symptom (阳萎 -> 阳痿)


@dataclass(frozen=True)
class Cleaner:
    trailing: tuple[str, ...]
    leading: tuple[str, ...]
    fragment_starts: tuple[str, ...]
    fragment_ends: tuple[str, ...]
    generic: frozenset[str]
    boilerplate: tuple[str, ...]
    boilerplate_patterns: re.Pattern[str]
    split_protected: tuple[str, ...]
    organ_list: re.Pattern[str]  # the 、 of 肝、肾功能: not a separator
    variants: dict[int, str]  # str.translate table: 甙 -> 苷
    ocr_fixes: dict[str, str]  # l岁 -> 1岁
    list_number: re.Pattern[str]  # the 1. of 禁忌包括1.6岁以下儿童
    lost_exponent: re.Pattern[str]  # 2.5×10/L
    fragment_values: frozenset[str]
    person_endings: tuple[str, ...]
    person_exclude: tuple[str, ...]
    excipients: frozenset[str]
    excipient_parts: tuple[str, ...]
    synonyms: dict[str, str]
    routes: tuple[str, ...]
    stopwords: dict[str, frozenset[str]]
    trailing_category: re.Pattern[str]
    test_categories: dict[str, str]
    prescription_labels: dict[str, str]
    icd_markers: tuple[str, ...]
    icd_name_parts: tuple[str, ...]
    value_synonyms: dict[str, dict[str, str]]  # relation -> {as the graph says it: as it is meant}
    not_values: dict[str, frozenset[str]]  # relation -> values that are no fact of it


@cache
def cleaner() -> Cleaner:
    data, clinical = resources.cleaning(), resources.clinical()
    return Cleaner(
        trailing=tuple(sorted(data["trailing"], key=len, reverse=True)),
        leading=tuple(sorted(data["leading"], key=len, reverse=True)),
        fragment_starts=tuple(data["fragment_starts"]), fragment_ends=tuple(data["fragment_ends"]),
        generic=frozenset(data["generic_values"]), boilerplate=tuple(data["boilerplate_parts"]),
        boilerplate_patterns=re.compile("|".join(f"(?:{pattern})" for pattern in data["boilerplate_patterns"])),
        split_protected=tuple(sorted(data["split_protected"], key=len, reverse=True)),
        organ_list=re.compile("([{0}])、(?=[{0}](?:、[{0}])*(?:{1}))".format(
            data["organ_lists"]["organs"], "|".join(data["organ_lists"]["shared"]))),
        variants=str.maketrans(data["variant_characters"]), ocr_fixes=dict(data["ocr_fixes"]),
        list_number=re.compile("(?:^|(?<=[\\s：:；;，,。（(])|" + "|".join(
            f"(?<={re.escape(lead)})" for lead in data["list_number_leads"]) + ")" + data["list_number"]),
        lost_exponent=re.compile(data["lost_exponent"]),
        fragment_values=frozenset(data["fragment_values"]),
        person_endings=tuple(data["person_endings"]), person_exclude=tuple(data["person_exclude"]),
        excipients=frozenset(data["excipients"]), excipient_parts=tuple(data["excipient_parts"]),
        synonyms=dict(data["synonyms"]) | dict(clinical["symptom_synonyms"]),
        routes=tuple(sorted(data["routes"], key=len, reverse=True)),
        stopwords={relation: frozenset(words) for relation, words in data["relation_stopwords"].items()},
        trailing_category=re.compile("等(?:" + "|".join(map(re.escape, data["trailing_categories"])) + ")$"),
        test_categories=dict(data["test_categories"]), prescription_labels=dict(data["prescription_labels"]),
        icd_markers=tuple(data["icd_markers"]), icd_name_parts=tuple(data["icd_name_parts"]),
        value_synonyms={relation: dict(table) for relation, table in clinical["value_synonyms"].items()},
        not_values={relation: frozenset(values) for relation, values in clinical["not_values"].items()},
    )


def generic_values() -> frozenset[str]:
    return cleaner().generic


def _trim(piece: str, clean: Cleaner) -> str:
    piece = clean.trailing_category.sub("", piece.strip(" \t　，,。.；;：:、"))
    changed = True
    while changed and piece:
        changed = False
        for prefix in clean.leading:
            if piece.startswith(prefix) and len(piece) > len(prefix) + 1:
                piece, changed = piece[len(prefix) :].strip(" 　，,：:"), True
                break
        for suffix in clean.trailing:
            if piece.endswith(suffix) and len(piece) > len(suffix):
                piece, changed = piece[: -len(suffix)].strip(" 　，,。；;"), True
                break
        trimmed = clean.trailing_category.sub("", piece)
        piece, changed = trimmed, changed or trimmed != piece
    return piece


def _why_dropped(piece: str, spec: RelationSpec, clean: Cleaner) -> str | None:
    """The reason a cleaned piece cannot be a fact (None when it can)."""
    if not piece or len(piece) < spec.min_chars:
        return "too short"
    if len(piece) > spec.max_chars:
        return "too long"
    if piece in clean.generic or piece in clean.stopwords.get(spec.name, ()):
        return "generic"
    if piece in clean.not_values.get(spec.name, ()):
        return "no fact of its relation"
    if any(marker in piece for marker in clean.icd_markers):
        return "ICD label"
    if any(part in piece for part in clean.boilerplate) or clean.boilerplate_patterns.search(piece):
        return "boilerplate"
    if dose_or_frequency(piece):
        return "dose or frequency"
    if piece.count("（") != piece.count("）") or piece.count("(") != piece.count(")") or "：" in piece or ":" in piece:
        return "fragment"
    if not _CJK.search(piece):
        if spec.latin:
            return None if re.search(r"[A-Za-z]{3}", piece) else "code-like"
        if spec.name in ACRONYM_RELATIONS and _ACRONYM.match(piece) and not _CODE_LIKE.match(piece):
            return None
        return "code-like"
    if spec.latin:
        return "not latin"
    if piece.startswith(clean.fragment_starts) or piece.endswith(clean.fragment_ends):
        return "fragment"
    if spec.name == "ingredient" and (piece in clean.excipients or any(part in piece for part in clean.excipient_parts)
                                      or any(item in clean.excipients for item in re.split(r"[（）()]", piece))):
        return "excipient"
    if spec.name in SYMPTOM_LIKE and piece in clean.fragment_values:
        return "fragment"
    if spec.people_only and (not piece.endswith(clean.person_endings)
                             or any(word in piece for word in clean.person_exclude)):
        return "not a group of people"
    return None


def split_value(text: str, separators: Sequence[str], protected: Sequence[str]) -> list[str]:
    """`text` cut at every separator (longest first) that is not inside a protected word: `吞咽疼痛和吞咽困难` ->
    吞咽疼痛, 吞咽困难; but `可触及包块` stays whole (触及 is protected)."""
    if not separators:
        return [text]
    words = sorted(protected, key=len, reverse=True) + sorted(separators, key=len, reverse=True)
    pieces, start = [], 0
    for match in re.finditer("|".join(map(re.escape, words)), text):
        if match.group(0) in separators:
            pieces.append(text[start : match.start()])
            start = match.end()
    pieces.append(text[start:])
    return pieces


@cache
def _clean_pieces(relation: str, value: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(kept pieces, reasons for dropped pieces) of one raw value, independent of the entity (hence cached)."""
    spec, clean = predicate_map().relations[relation], cleaner()
    text = _CITATION.sub("", _NOTE.sub("", value.replace("\u3000", " ")))
    text = text if spec.latin else clean.organ_list.sub(r"\1", _SPACES_NEAR_CJK.sub("", text)).translate(clean.variants)
    for misread, meant in clean.ocr_fixes.items():
        text = text.replace(misread, meant)
    if clean.lost_exponent.search(text):
        return (), ("a number that lost its power of ten",)
    text = clean.list_number.sub("", text)
    if dose_or_frequency(text):  # a value with a dose in it is dropped whole: its other pieces are instructions too
        return (), ("dose or frequency",)
    pieces = [text] if spec.keep_whole else split_value(text, tuple(_ALWAYS_SPLIT) + spec.split, clean.split_protected)
    kept: list[str] = []
    dropped: list[str] = []
    for raw in pieces:
        piece = _trim(raw, clean)
        piece = clean.value_synonyms.get(relation, {}).get(piece, piece)
        if relation in SAID_AS_SYMPTOMS:
            piece = clean.synonyms.get(piece, piece)
        reason = _why_dropped(piece, spec, clean)
        if reason:
            dropped.append(reason)
        elif "、" in piece:  # a synonym may expand to two (恶心与呕吐 -> 恶心、呕吐)
            kept.extend(part for part in piece.split("、") if part)
        else:
            kept.append(piece)
    return tuple(kept), tuple(dropped)


def _special_values(relation: str, values: Iterable[str], clean: Cleaner, name: str) -> list[str]:
    """Relations whose values are labels rather than facts to list."""
    values = list(values)
    if relation == "contagious":
        labels = {"有": "有", "有传染性": "有", "具有传染性": "有", "无": "无", "无传染性": "无", "没有传染性": "无"}
        found = {labels[value.strip()] for value in values if value.strip() in labels}
        return list(found) if len(found) == 1 else []
    if relation == "prescription":
        found = {clean.prescription_labels[piece.strip()] for value in values for piece in re.split("[；;]", value)
                 if piece.strip() in clean.prescription_labels}
        return list(found) if len(found) == 1 and "dual" not in found else []
    if relation == "toxicity":
        found = set()
        for value in values:
            label = _CITATION.sub("", value).strip()
            if label.startswith("无毒"):
                found.add("无毒")
            elif label in ("有毒", "小毒", "有小毒", "大毒", "有大毒", "微毒", "有微毒"):
                found.add(label)
        return sorted(found) if len(found) == 1 else []
    if relation == "route":
        routes: list[str] = []
        for value in values:
            for route in clean.routes:
                if route in value and not any(route in other for other in routes):
                    routes.append(route)
        return routes
    if relation == "test_category":
        return [clean.test_categories[value.strip()] for value in values if value.strip() in clean.test_categories
                and value.strip() not in name and clean.test_categories[value.strip()] not in name]
        # 免疫学检测 "is an immunological test", 泌尿系统CT检查 "a CT" restate the name
    return []


SPECIAL_RELATIONS = {"contagious", "prescription", "toxicity", "route", "test_category"}


def clean_values(relation: str, values: Iterable[str], entity_name: str, dropped: Counter[str] | None = None,
                 ) -> list[str]:
    """The facts a relation may state for one entity: split, trimmed, de-duplicated, every unusable piece dropped
    (the reasons are counted into `dropped`)."""
    clean = cleaner()
    if relation in SPECIAL_RELATIONS:
        return _special_values(relation, values, clean, entity_name)
    spec = predicate_map().relations[relation]
    values = list(values)
    kept: list[str] = []
    named_in_name = 0
    for value in values:
        pieces, reasons = _clean_pieces(relation, value)
        if dropped is not None:
            dropped.update(reasons)
        for piece in pieces:
            if piece == entity_name or (spec.no_name_parts and piece in entity_name) or (
                    spec.no_name_parts == "both" and entity_name in piece):
                if dropped is not None:
                    dropped["tautology"] += 1
                named_in_name += 1
                continue
            if relation == "nature" and ("经" in piece or "归" in piece):
                continue
            if piece not in kept:
                kept.append(piece)
    # an excipient the name states is the active ingredient there (开塞露（含甘油）: 甘油, not its preservative)
    named_in_name += relation == "ingredient" and any(value.strip() in clean.excipients and value.strip() in entity_name
                                                      for value in values)
    if relation == "ingredient" and named_in_name and not entity_name.startswith("复方"):
        # the active ingredient is the product's name (注射用盐酸头孢吡肟, 肝素钠软膏): what is left is its base and
        # excipients (L-精氨酸, 白凡士林), no answer to "what does it contain"; a compound (复方…) keeps the others
        if dropped is not None:
            dropped["only excipients left beside the named ingredient"] += len(kept)
        return []
    return kept


# --- entities ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entity:
    """One entity with clean facts: {relation: values} and the source predicates each relation drew on."""

    name: str
    kind: str
    facts: dict[str, tuple[str, ...]]
    sources: dict[str, tuple[str, ...]]
    where: str = ""
    symptom_text: str = ""  # the source's symptom values as written (one a line), for symptom look-ups by substring

    def values(self, relation: str) -> tuple[str, ...]:
        return self.facts.get(relation, ())

    def all_values(self) -> Iterator[str]:
        for values in self.facts.values():
            yield from values


@dataclass
class GraphStats:
    """What reading and cleaning did, for the report."""

    source: str = ""
    subjects: int = 0
    facts: int = 0
    entities_by_kind: Counter[str] = field(default_factory=Counter)
    skipped_entities: Counter[str] = field(default_factory=Counter)
    mapped_facts: Counter[str] = field(default_factory=Counter)  # by relation
    unmapped_facts: Counter[str] = field(default_factory=Counter)  # by predicate
    ignored_facts: Counter[str] = field(default_factory=Counter)  # by predicate (listed under `ignore`)
    not_for_kind: Counter[str] = field(default_factory=Counter)  # predicate@kind: mapped, but not for that kind
    dropped_values: Counter[str] = field(default_factory=Counter)  # by reason
    relations_off: dict[str, str] = field(default_factory=dict)  # relation -> why this graph's values are not used


def entity_name(name: str) -> str:
    """The name an entity is asked about: without an ICD label's parts (部位未特指的消化性溃疡 -> 消化性溃疡,
    初发性或维持性睡眠障碍［失眠症］ -> 初发性或维持性睡眠障碍)."""
    clean = cleaner()
    bare = re.sub(r"[［\[【][^］\]】]*[］\]】]", "", name)
    for part in clean.icd_name_parts:
        bare = bare.replace(part, "")
    return bare.strip() or name


def build_entity(raw: RawEntity, pmap: PredicateMap, stats: GraphStats) -> Entity | None:
    """The clean entity of a raw one, or None (no usable name, no usable fact)."""
    stats.subjects += 1
    stats.facts += sum(len(values) for _, values in raw.predicates)
    if _STRENGTH.search(raw.name) or len(raw.name) > 40:
        stats.skipped_entities["name holds a strength or is too long"] += 1
        return None
    raw = RawEntity(entity_name(raw.name), raw.stated_kind, raw.predicates, raw.where)
    kind = pmap.kind_of(raw)
    gathered: dict[str, list[str]] = {}
    sources: dict[str, list[str]] = {}
    for predicate, values in raw.predicates:
        relation = pmap.by_predicate.get((predicate, kind))
        if relation is None:
            if predicate in pmap.ignored:
                stats.ignored_facts[predicate] += len(values)
            elif any(p == predicate for p, _ in pmap.by_predicate):
                stats.not_for_kind[f"{predicate}@{kind}"] += len(values)
            else:
                stats.unmapped_facts[predicate] += len(values)
            continue
        cleaned = clean_values(relation, values, raw.name, stats.dropped_values)
        if cleaned:
            bucket = gathered.setdefault(relation, [])
            bucket.extend(value for value in cleaned if value not in bucket)
            sources.setdefault(relation, []).append(predicate)
    facts = {relation: tuple(values) for relation, values in gathered.items() if values}
    if relation_conflicts(facts):
        facts.pop("contagious", None)
    if not facts:
        stats.skipped_entities["no usable fact"] += 1
        return None
    for relation, values in facts.items():
        stats.mapped_facts[relation] += len(values)
    stats.entities_by_kind[kind] += 1
    return Entity(raw.name, kind, facts, {relation: tuple(sources[relation]) for relation in facts}, raw.where,
                  raw_symptom_text(raw, pmap))


def raw_symptom_text(raw: RawEntity, pmap: PredicateMap) -> str:
    """Every value of the symptom predicates as the source wrote it (spaces next to Chinese removed): a shown
    symptom found anywhere in it (`吞咽困难` in `吞咽疼痛和吞咽困难`) means the subject lists that symptom, whatever
    cleaning kept or dropped."""
    wanted = set(pmap.relations["symptom"].predicates)
    text = "\n".join(value for predicate, values in raw.predicates if predicate in wanted for value in values)
    return _SPACES_NEAR_CJK.sub("", text)


def relation_conflicts(facts: dict[str, tuple[str, ...]]) -> bool:
    """A disease said not to be contagious that has a transmission route: its contagiousness is not asked about."""
    return facts.get("contagious") == ("无",) and bool(facts.get("transmission"))

