"""Detectors every gate shares: doses and frequencies, contentless answers, absolute claims, stated numbers.

The patterns live in `safety.yaml`; a value that trips one is dropped, a row that trips one is rejected.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import cache

from utils.builder import resources

_NUMBER = r"(?:\d+(?:[.．]\d+)?|[０-９]+(?:[.．][０-９]+)?|[一二两三四五六七八九十百千半]+)"
_RANGE = rf"{_NUMBER}(?:\s*[-—–～~至到]\s*{_NUMBER})?"
_PUNCTUATION = re.compile(r"[\s，,。.；;：:、！!？?（）()《》“”\"'「」【】\[\]/-]+")


@cache
def _dose_pattern() -> re.Pattern[str]:
    units = sorted(resources.safety()["dose_units"], key=len, reverse=True)
    latin = [re.escape(unit) + r"(?![A-Za-z])" for unit in units if re.fullmatch(r"[A-Za-z/]+", unit)]
    other = [re.escape(unit) for unit in units if not re.fullmatch(r"[A-Za-z/]+", unit)]
    return re.compile(rf"(?<![A-Za-z]){_RANGE}\s*(?:{'|'.join(latin + other)})")


@cache
def _frequency_pattern() -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{pattern})" for pattern in resources.safety()["frequency_patterns"]),
                      re.IGNORECASE)


def dose_or_frequency(text: str) -> str | None:
    """The first dose (`0.5g`, `9—15克`, `2片`) or frequency (`一日3次`, `每天`, `bid`) in `text`, or None."""
    match = _dose_pattern().search(text) or _frequency_pattern().search(text)
    return match.group(0) if match else None


def stated_numbers(text: str) -> list[str]:
    """Every number the text states (digits, or a Chinese numeral with a unit or 次), for grounding model answers."""
    found = [match.group(0) for match in re.finditer(r"\d+(?:[.．]\d+)?", text)]
    found += [match.group(0) for match in _dose_pattern().finditer(text)]
    found += [match.group(0) for match in _frequency_pattern().finditer(text)]
    return found


@cache
def _absolute_pattern() -> re.Pattern[str]:
    claims = sorted(resources.safety()["absolute_claims"], key=len, reverse=True)
    return re.compile("|".join(re.escape(claim) for claim in claims))


def absolute_claim(text: str) -> str | None:
    """The first absolute claim (所有, 一定, 不会引起任何, ...) in a model's answer, or None."""
    match = _absolute_pattern().search(text)
    return match.group(0) if match else None


NEGATION_REACH = 6  # characters before a risky instruction searched for a negation (in the same clause)


@cache
def _risky_pattern() -> re.Pattern[str]:
    phrases = sorted(resources.safety()["risky_instructions"], key=len, reverse=True)
    return re.compile("|".join(re.escape(phrase) for phrase in phrases))


def risky_instruction(text: str) -> str | None:
    """The first risky instruction (服药后可以喝酒, 自行停药, 放心使用, 可以同服, 加量) in a model's answer that no
    negation just before it in the same clause takes back (服药期间避免饮酒 and 不要自行停药 are fine), or None."""
    negations = tuple(resources.safety()["risky_negations"])
    for match in _risky_pattern().finditer(text):
        before = re.split(r"[，,。；;！!？?]", text[max(0, match.start() - NEGATION_REACH) : match.start()])[-1]
        if not any(word in before for word in negations):
            return match.group(0)
    return None


@cache
def _filler_pattern() -> re.Pattern[str]:
    words = sorted(resources.safety()["filler_words"], key=len, reverse=True)
    return re.compile("|".join(re.escape(word) for word in words))


def contentless(answer: str, names: Iterable[str] = ()) -> bool:
    """True when the answer says nothing once the entity names and template words are taken out:
    `X的用法用量：遵医嘱。`, a tautology like `阿莫西林的主要成分是阿莫西林。`, or an answer that is only `尚不明确`."""
    text = answer
    for name in sorted({name for name in names if name}, key=len, reverse=True):
        text = text.replace(name, "")
    bare = _PUNCTUATION.sub("", text)
    if bare in set(resources.safety()["contentless_answers"]):
        return True
    return len(_filler_pattern().sub("", bare)) < 2


def bigrams(text: str) -> set[str]:
    """Character bigrams of `text` with whitespace removed (the unit of every near-equality in the builder)."""
    text = re.sub(r"\s+", "", text)
    return {text[index : index + 2] for index in range(len(text) - 1)}


def jaccard(a: set[str], b: set[str]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)
