"""Quality gates every build passes its rows through, in this order:

1. content: no dose or frequency, a fact that is not generic, not contentless or tautological;
2. leaks: a question equal or near-equal (character-bigram Jaccard >= `leak_threshold`) to an evaluation
   question is removed (a dialogue counts by its whole instruction and by its last user turn), and so is a row about
   the (entity, relation) an evaluation question asks about, however it is worded;
3. restated facts: a row that states no fact of its entity an earlier row has not (kinds that add content of their
   own, a vignette or a comparison, only never twice with the same entities and values);
4. exact duplicates: a question already kept, or an answer already kept;
5. near duplicates: question + answer near-equal (bigram Jaccard >= `near_threshold`) to a kept row, found with
   MinHash LSH (`datasketch`) and confirmed with the exact Jaccard, so the LSH's false positives remove nothing.

The first row wins each time, so the result depends only on the input order.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from utils.builder import resources
from utils.builder.graph import Entity, generic_values
from utils.builder.progress import Progress
from utils.builder.questions import LABEL_RELATIONS
from utils.builder.rows import Row
from utils.builder.safety import bigrams, contentless, dose_or_frequency, jaccard, without_names

NUM_PERM = 64
CHUNK = 4096
_LAST_TURN = re.compile(r"<user>: ([^<]*)$")
ADDS_CONTENT = frozenset(("vignette", "differential", "compare", "multi_hop", "reverse"))


@dataclass
class GateCounts:
    rejected: Counter[str] = field(default_factory=Counter)
    leaks_exact: int = 0
    leaks_near: int = 0
    leaks_pair: int = 0
    restated: int = 0
    duplicate_questions: int = 0
    duplicate_answers: int = 0
    near_duplicates: int = 0
    removed: dict[str, Counter[str]] = field(default_factory=dict)  # subject entity -> gate -> rows it removed

    def remove(self, row: Row, gate: str) -> None:
        if row.entities:
            self.removed.setdefault(row.entities[0], Counter())[gate] += 1


def content_problem(row: Row) -> str | None:
    """Why a template row may not be kept, or None."""
    if dose_or_frequency(without_names(row.output, row.entities)):
        return "dose or frequency in the answer"
    generic = generic_values()
    if row.relation not in LABEL_RELATIONS and not any(value not in generic for value in row.values):
        return "no fact"
    if contentless(row.output, row.entities):
        return "contentless"
    return None


def content_gate(rows: Iterable[Row], counts: GateCounts) -> list[Row]:
    kept = []
    for row in rows:
        problem = content_problem(row)
        if problem:
            counts.rejected[problem] += 1
            counts.remove(row, "content")
        else:
            kept.append(row)
    return kept


def question_texts(instruction: str) -> list[str]:
    """The texts of an instruction that are compared with evaluation questions: all of it, and the last user turn of
    a dialogue."""
    texts = [instruction.strip()]
    match = _LAST_TURN.search(instruction)
    if match and match.group(1).strip() != texts[0]:
        texts.append(match.group(1).strip())
    return texts


def relation_groups(relation: str) -> set[str]:
    """The evaluation relations (complication, cause, test, treatment ...) a row's relation answers."""
    groups = resources.clinical()["eval_relation_groups"]
    parts = set(re.split("[+→]", relation))
    return {group for group, relations in groups.items() if parts & set(relations)}


def row_pairs(row: Row) -> set[tuple[str, str]]:
    """The (entity, evaluation relation) pairs a row answers: a vignette or differential diagnoses its candidates;
    a comparison answers both entities; a dialogue its last turn; other rows their subject."""
    if row.kind in ("vignette", "differential"):
        return {(name, "diagnosis") for name in row.entities}
    relation = row.relation.split("+")[-1] if row.kind == "dialogue" else row.relation
    subjects = row.entities if row.kind == "compare" else row.entities[:1]
    return {(name, group) for name in subjects for group in relation_groups(relation)}


def named_in(text: str, keys: Sequence[str]) -> list[str]:
    """The keys (longest first) found in the text outside the ones found before: 荨麻疹 names no 麻疹."""
    taken = [False] * len(text)
    found = []
    for key in keys:
        for match in re.finditer(re.escape(key), text):
            if not any(taken[match.start() : match.end()]):
                taken[match.start() : match.end()] = [True] * len(key)
                found.append(key)
    return found


class LeakIndex:
    """Evaluation questions, found exactly (an inverted index of bigrams, then the true Jaccard), and the (entity,
    relation) pairs they ask about once the graph is known (`bind`)."""

    def __init__(self, questions: Iterable[str], threshold: float, answers: Iterable[str] = ()) -> None:
        self.threshold = threshold
        self.questions = [question.strip() for question in questions]
        self.answers = list(answers)
        self.pairs: set[tuple[str, str]] = set()
        self.exact = {question for question in self.questions if question}
        self.grams = [bigrams(question) for question in sorted(self.exact)]
        self.postings: dict[str, list[int]] = {}
        for number, grams in enumerate(self.grams):
            for gram in grams:
                self.postings.setdefault(gram, []).append(number)

    def bind(self, entities: Sequence[Entity]) -> set[tuple[str, str]]:
        """The (entity, relation) pairs the evaluation questions ask about, in this graph's names."""
        data = resources.clinical()
        prefixes = tuple(data["subtype_prefixes"])
        names: dict[str, set[str]] = {}
        for entity in entities:
            for key in (entity.name, *entity.values("alias")):
                names.setdefault(key, set()).add(entity.name)
                core = key.removeprefix(next((prefix for prefix in prefixes if key.startswith(prefix)), ""))
                if len(core) >= 2:
                    names.setdefault(core, set()).add(entity.name)
        keys = sorted((key for key in names if len(key) >= 2), key=len, reverse=True)
        diseases = {entity.name for entity in entities if entity.kind == "disease"}
        self.pairs = set()
        for number, question in enumerate(self.questions):
            asked = {relation for relation, words in data["eval_relations"].items()
                     if any(word in question for word in words)}
            named = {name for key in named_in(question, keys) for name in names[key]}
            if "diagnosis" in asked and number < len(self.answers):
                first = re.split("[。；;]", self.answers[number])[0]
                named |= {name for key in named_in(first, keys) for name in names[key] if name in diseases}
            self.pairs |= {(name, relation) for name in named for relation in asked}
        return self.pairs

    def match(self, text: str) -> str | None:
        """`exact`, `near` or None."""
        if text in self.exact:
            return "exact"
        grams = bigrams(text)
        shared: Counter[int] = Counter()
        for gram in grams:
            shared.update(self.postings.get(gram, ()))
        for number, count in shared.items():
            union = len(grams) + len(self.grams[number]) - count
            if union and count / union >= self.threshold:
                return "near"
        return None


def leak_gate(rows: Iterable[Row], index: LeakIndex, counts: GateCounts) -> list[Row]:
    kept = []
    for row in rows:
        found = next((hit for text in question_texts(row.instruction) if (hit := index.match(text))), None)
        if found is None and index.pairs and row_pairs(row) & index.pairs:
            found = "pair"
        if found is None:
            kept.append(row)
            continue
        setattr(counts, f"leaks_{found}", getattr(counts, f"leaks_{found}") + 1)
        counts.remove(row, "evaluation leak")
    return kept


def fact_units(row: Row) -> set[tuple[str, str]]:
    """The facts a row states about its subject: (entity, value)."""
    return {(row.entities[0], value) for value in row.values} if row.entities else set()


def restated_gate(rows: Iterable[Row], counts: GateCounts) -> list[Row]:
    """At most one row per (entity, relation, value set): a row whose every fact an earlier row of the same entity
    already stated goes; a kind that adds content of its own goes only when the same one came before."""
    stated: set[tuple[str, str]] = set()
    seen: set[tuple[str, str, frozenset[str], frozenset[str]]] = set()
    kept = []
    for row in rows:
        if row.kind in ADDS_CONTENT:
            key = (row.kind, row.relation, frozenset(row.entities), frozenset(row.values))
            repeat = key in seen
            seen.add(key)
        else:
            units = fact_units(row)
            repeat = bool(units) and units <= stated
            stated |= units
        if repeat:
            counts.restated += 1
            counts.remove(row, "restated")
        else:
            kept.append(row)
    return kept


def exact_gate(rows: Iterable[Row], counts: GateCounts, unique_answers: bool = True) -> list[Row]:
    questions: set[str] = set()
    answers: set[str] = set()
    kept = []
    for row in rows:
        if row.instruction in questions:
            counts.duplicate_questions += 1
            counts.remove(row, "duplicate question")
        elif unique_answers and row.output in answers:
            counts.duplicate_answers += 1
            counts.remove(row, "duplicate answer")
        else:
            questions.add(row.instruction)
            answers.add(row.output)
            kept.append(row)
    return kept


def near_duplicate_flags(texts: Sequence[str], threshold: float, progress: bool = False) -> list[bool]:
    """For each text, whether it is near-equal (bigram Jaccard >= threshold) to an earlier text that was kept."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
    flags: list[bool] = []
    bar = Progress("near duplicates", "rows", len(texts), progress)
    for start in range(0, len(texts), CHUNK):
        chunk = texts[start : start + CHUNK]
        shingles = [[gram.encode("utf-8") for gram in sorted(bigrams(text))] or [b""] for text in chunk]
        for offset, minhash in enumerate(MinHash.bulk(shingles, num_perm=NUM_PERM)):
            number = start + offset
            grams = bigrams(texts[number])
            duplicate = any(jaccard(grams, bigrams(texts[other])) >= threshold for other in lsh.query(minhash))
            flags.append(duplicate)
            if not duplicate:
                lsh.insert(number, minhash)
        bar.update(len(chunk))
    bar.close()
    return flags


def near_gate(rows: Sequence[Row], threshold: float, counts: GateCounts, progress: bool = False) -> list[Row]:
    flags = near_duplicate_flags([f"{row.instruction}\n{row.output}" for row in rows], threshold, progress)
    counts.near_duplicates += sum(flags)
    for row, duplicate in zip(rows, flags, strict=True):
        if duplicate:
            counts.remove(row, "near duplicate")
    return [row for row, duplicate in zip(rows, flags, strict=True) if not duplicate]


def apply_gates(rows: Sequence[Row], leaks: LeakIndex, near_threshold: float, counts: GateCounts,
                check_content: bool = True, unique_answers: bool = True, progress: bool = False) -> list[Row]:
    """All gates in order (see the module's docstring). `unique_answers=False` keeps rows that repeat an answer
    (a literature turn is asked alone and with its dialogue history: the same answer in two contexts)."""
    kept = content_gate(rows, counts) if check_content else list(rows)
    kept = leak_gate(kept, leaks, counts)
    kept = restated_gate(kept, counts) if check_content else kept
    kept = exact_gate(kept, counts, unique_answers)
    return near_gate(kept, near_threshold, counts, progress)
