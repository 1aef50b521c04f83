"""Documents to dialogues in the published literature shape (` <user>: q1 <bot>: a1 <user>: q2` -> a2).

Template: each turn's question is read off the start of a sentence (`literature.yaml`), and its answer is composed
of that sentence and the document's other sentences about the same topic (or the ones right after it that raise no
question of their own), so answers are not one copied sentence and no question is an empty follow-up; a greeting
may open a dialogue, never interrupt one. LLM: the model writes the dialogue; answers must be grounded in the
document (character bigram overlap), state no number the document lacks and make no absolute claim, and a dialogue is
cut at its first failing turn or empty follow-up (the later turns build on it).
"""

from __future__ import annotations

import hashlib
import itertools
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from utils.builder import resources
from utils.builder.llm_backend import Item
from utils.builder.rows import Row, fill
from utils.builder.safety import absolute_claim, bigrams, stated_numbers
from utils.core.io import check_string_fields, read_records

_SENTENCE_END = re.compile(r"(?<=[。！？!?])")
_TURN = re.compile(r" <(user|bot)>: ")
MIN_SENTENCE_CHARS = 12
MIN_SHARED_BIGRAMS = 3  # a neighbouring sentence sharing this many character bigrams continues the same subject


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


def split_sentences(text: str) -> list[str]:
    """Sentences of a document; a very short one is joined to the next so that every sentence says something."""
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


@cache
def _rules() -> tuple[tuple[re.Pattern[str], tuple[str, ...]], ...]:
    return tuple((re.compile(r"^(?P<t>[^，,。；;：:（(]{2,24}?)" + rule["verb"]), tuple(rule["questions"]))
                 for rule in resources.literature()["question_rules"])


def sentence_topic(sentence: str) -> tuple[str, tuple[str, ...]] | None:
    """The sentence's subject and the questions its verb allows, or None when no rule fits."""
    data = resources.literature()
    starts, ends = tuple(data["bad_topic_starts"]), tuple(data["bad_topic_ends"])
    adverbs = tuple(data["topic_adverbs"])
    best: tuple[int, str, tuple[str, ...]] | None = None
    for pattern, questions in _rules():
        match = pattern.match(sentence)
        if match is None:
            continue
        topic = match.group("t").strip()
        while topic.endswith(adverbs) and len(topic) > 2:
            topic = next(topic[: -len(adverb)] for adverb in adverbs if topic.endswith(adverb))
        if len(topic) < 2 or topic.startswith(starts) or topic.endswith(ends):
            continue
        if best is None or match.end("t") < best[0]:
            best = (match.end("t"), topic, questions)
    return best[1:] if best else None


def document_turns(document: Document, seed: int) -> list[tuple[str, str]]:
    """(question, answer) turns of a document: one per sentence whose start gives a question. The answer is composed
    of that sentence, the sentences elsewhere in the document about the same topic, and the sentences right after
    it that have no question of their own (within the limits), in the document's order after the first."""
    data = resources.literature()
    most_sentences, most_chars = int(data["max_answer_sentences"]), int(data["max_answer_chars"])
    rng = random.Random(f"{seed}:document:{document.key}")
    sentences = split_sentences(document.text)
    topics = [sentence_topic(sentence) for sentence in sentences]
    shortest = min((len(sentence) for sentence in sentences), default=0)
    about: dict[str, list[int]] = {}  # topic -> the sentences that mention it, found once per topic (not per turn)
    turns = []
    for index, found in enumerate(topics):
        if found is None:
            continue
        topic, questions = found
        following = []
        for later in range(index + 1, len(sentences)):
            if topics[later] is not None:
                break
            following.append(later)
        if topic not in about:
            about[topic] = [other for other, sentence in enumerate(sentences) if topic in sentence]
        related = (other for other in about[topic] if other != index)
        neighbours = [other for other in (index + 1, index - 1) if 0 <= other < len(sentences)
                      and len(bigrams(sentences[other]) & bigrams(sentences[index])) >= MIN_SHARED_BIGRAMS]
        chosen, length = [index], len(sentences[index])
        for other in itertools.chain(following, related, neighbours):
            if len(chosen) >= most_sentences or length + shortest > most_chars:
                break  # nothing more can be added: a long document costs no more than its turns
            if other not in chosen and length + len(sentences[other]) <= most_chars:
                chosen.append(other)
                length += len(sentences[other])
        answer = sentences[index] + "".join(sentences[number] for number in sorted(chosen[1:]))
        turns.append((fill(rng.choice(questions), t=topic), answer))
    return turns


def render(pairs: Sequence[tuple[str, str]], rng: random.Random) -> str:
    """` <user>: q1 <bot>: a1 <user>: q2`: a greeting may open it, later questions get a connective at most."""
    data = resources.literature()
    parts = []
    for number, (question, answer) in enumerate(pairs):
        lead = rng.choice(data["openers"] if number == 0 else data["connectives"])
        if lead.startswith("请") and question.startswith("请"):
            lead = ""
        parts.append(f" <user>: {lead}{question}")
        if number < len(pairs) - 1:
            parts.append(f" <bot>: {answer}")
    return "".join(parts)


def dialogue_rows(pairs: Sequence[tuple[str, str]], turns: int, source: str, seed: int) -> list[Row]:
    """For each turn: a single-turn row and, when there is history, one row with up to `turns` user turns."""
    rows = []
    for index in range(len(pairs)):
        rng = random.Random(f"{seed}:turn:{source}:{index}")
        rows.append(Row(render(pairs[index : index + 1], rng), pairs[index][1], "literature_single", (source,),
                        (), "", (pairs[index][1],)))
        span = min(turns, index + 1)
        if span >= 2:
            window = pairs[index - span + 1 : index + 1]
            rows.append(Row(render(window, rng), pairs[index][1], "literature_dialogue", (source,), (), "",
                            (pairs[index][1],)))
    return rows


def template_rows(documents: Sequence[Document], turns: int, seed: int) -> list[Row]:
    rows: list[Row] = []
    for document in documents:
        if document.text:
            rows.extend(dialogue_rows(document_turns(document, seed), turns, document.title, seed))
    return rows


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


# --- the LLM backend ---------------------------------------------------------------------------------------------


def empty_question(question: str, first: bool) -> str | None:
    """Why a model's question cannot be a turn (an empty follow-up, a greeting mid-dialogue), or None."""
    data = resources.literature()
    bare = re.sub(r"[\s，,。.！!？?~～]+", "", question)
    for greeting in sorted(data["greetings"], key=len, reverse=True):
        if bare.startswith(greeting):
            if not first:
                return "greeting mid-dialogue"
            bare = bare[len(greeting) :]
            break
    if bare in set(data["empty_questions"]) or len(bare) < 4:
        return "empty follow-up"
    return None


def turn_problem(question: str, answer: str, document: Document, first: bool, min_overlap: float) -> str | None:
    problem = empty_question(question, first)
    if problem:
        return problem
    grams = bigrams(answer)
    if not grams or len(grams & bigrams(document.text)) / len(grams) < min_overlap:
        return "ungrounded"
    if absolute_claim(answer):
        return "absolute claim"
    if any(number not in document.text for number in stated_numbers(answer)):
        return "number not in the document"
    return None


def literature_item(document: Document, count: int, turns: int, min_overlap: float, seed: int) -> Item:
    data = resources.literature()
    prompt = fill(data["prompt"], title=document.title, text=document.text, count=str(count))
    messages = [{"role": "system", "content": data["system"]}, {"role": "user", "content": prompt}]

    def accept(pairs: list[tuple[str, str]]) -> tuple[list[Row], Counter[str]]:
        """The dialogue up to its first failing turn: later turns build on it, so they go too."""
        filtered: Counter[str] = Counter()
        kept: list[tuple[str, str]] = []
        for question, answer in pairs:
            problem = turn_problem(question, answer, document, not kept, min_overlap)
            if problem:
                filtered[problem] += 1
                filtered["after a failing turn"] += len(pairs) - len(kept) - 1
                break
            kept.append((question, answer))
        return dialogue_rows(kept, turns, document.title, seed), filtered

    return Item(document.key, messages, accept)
