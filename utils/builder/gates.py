"""Quality gates every build passes its rows through, in this order:

1. content: no dose or frequency, a fact that is not generic, not contentless or tautological;
2. leaks: a question equal or near-equal (character-bigram Jaccard >= `leak_threshold`) to an evaluation
   question is removed (a dialogue counts by its whole instruction and by its last user turn);
3. exact duplicates: a question already kept, or an answer already kept;
4. near duplicates: question + answer near-equal (bigram Jaccard >= `near_threshold`) to a kept row, found with
   MinHash LSH (`datasketch`) and confirmed with the exact Jaccard, so the LSH's false positives remove nothing.

The first row wins each time, so the result depends only on the input order.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from utils.builder.graph import generic_values
from utils.builder.questions import LABEL_RELATIONS
from utils.builder.rows import Row
from utils.builder.safety import bigrams, contentless, dose_or_frequency, jaccard

NUM_PERM = 64
CHUNK = 4096
_LAST_TURN = re.compile(r"<user>: ([^<]*)$")


@dataclass
class GateCounts:
    rejected: Counter[str] = field(default_factory=Counter)
    leaks_exact: int = 0
    leaks_near: int = 0
    duplicate_questions: int = 0
    duplicate_answers: int = 0
    near_duplicates: int = 0


def content_problem(row: Row) -> str | None:
    """Why a template row may not be kept, or None."""
    if dose_or_frequency(row.output):
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


class LeakIndex:
    """Evaluation questions, found exactly (an inverted index of bigrams, then the true Jaccard)."""

    def __init__(self, questions: Iterable[str], threshold: float) -> None:
        self.threshold = threshold
        self.exact = {question.strip() for question in questions if question.strip()}
        self.grams = [bigrams(question) for question in sorted(self.exact)]
        self.postings: dict[str, list[int]] = {}
        for number, grams in enumerate(self.grams):
            for gram in grams:
                self.postings.setdefault(gram, []).append(number)

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
        if found == "exact":
            counts.leaks_exact += 1
        elif found == "near":
            counts.leaks_near += 1
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
        elif unique_answers and row.output in answers:
            counts.duplicate_answers += 1
        else:
            questions.add(row.instruction)
            answers.add(row.output)
            kept.append(row)
    return kept


def near_duplicate_flags(texts: Sequence[str], threshold: float, progress: bool = False) -> list[bool]:
    """For each text, whether it is near-equal (bigram Jaccard >= threshold) to an earlier text that was kept."""
    from datasketch import MinHash, MinHashLSH
    from tqdm import tqdm

    lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
    flags: list[bool] = []
    bar = tqdm(total=len(texts), desc="near duplicates", unit="row", disable=not progress, mininterval=1.0)
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
    return [row for row, duplicate in zip(rows, flags, strict=True) if not duplicate]


def apply_gates(rows: Sequence[Row], leaks: LeakIndex, near_threshold: float, counts: GateCounts,
                check_content: bool = True, unique_answers: bool = True, progress: bool = False) -> list[Row]:
    """All gates in order (see the module's docstring). `unique_answers=False` keeps rows that repeat an answer
    (a literature turn is asked alone and with its dialogue history: the same answer in two contexts)."""
    kept = content_gate(rows, counts) if check_content else list(rows)
    kept = leak_gate(kept, leaks, counts)
    kept = exact_gate(kept, counts, unique_answers)
    return near_gate(kept, near_threshold, counts, progress)
