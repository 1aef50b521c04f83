"""The statistics report of a build: printed, and written as one JSON line beside the output.

Metrics (docs/building_data.md defines them with the published data's values):
- duplicate question (answer) rate: 1 - distinct questions (answers) / rows;
- distinct question bigrams: distinct character bigrams of the questions / all character bigrams of the questions
  (whitespace removed, bigrams within one question), on a seeded random sample of `SAMPLE_ROWS` rows (all rows
  when there are fewer) and on all rows;
- rows with doses or intervals / contentless answers: answers that the detectors of `safety.py` flag;
- the clinical lint counters (lint.py) and the entities that yield no row, by reason.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

from utils.builder import resources
from utils.builder.safety import contentless, dosing, without_names

SAMPLE_ROWS = 4528  # the size of the project's own data/llama_data.json when the target was set
TOP_PREDICATES = 40


def question_bigrams(questions: Sequence[str]) -> tuple[int, int]:
    """(distinct bigrams, all bigrams) over the questions."""
    distinct: set[str] = set()
    total = 0
    for question in questions:
        text = re.sub(r"\s+", "", question)
        grams = [text[index : index + 2] for index in range(len(text) - 1)]
        total += len(grams)
        distinct.update(grams)
    return len(distinct), total


def distinct_bigram_ratio(questions: Sequence[str]) -> float:
    distinct, total = question_bigrams(questions)
    return round(distinct / total, 4) if total else 0.0


def sample(items: Sequence[Any], size: int, seed: int) -> list[Any]:
    if len(items) <= size:
        return list(items)
    return [items[index] for index in sorted(random.Random(seed).sample(range(len(items)), size))]


def duplicate_rate(texts: Sequence[str]) -> float:
    return round(1 - len(set(texts)) / len(texts), 4) if texts else 0.0


def lengths(texts: Sequence[str]) -> dict[str, float]:
    if not texts:
        return {}
    ordered = sorted(len(text) for text in texts)
    return {"mean": round(sum(ordered) / len(ordered), 1), "p50": ordered[len(ordered) // 2],
            "p90": ordered[int(len(ordered) * 0.9)], "max": ordered[-1]}


def row_metrics(records: Sequence[dict[str, Any]], seed: int) -> dict[str, Any]:
    """The measurable qualities of written rows (whatever made them)."""
    questions = [record["instruction"] for record in records]
    answers = [record["output"] for record in records]
    names = [record.get("meta", {}).get("entities", []) for record in records]
    return {
        "rows": len(records),
        "duplicate_question_rate": duplicate_rate(questions),
        "duplicate_answer_rate": duplicate_rate(answers),
        "distinct_question_bigrams_sample": distinct_bigram_ratio(sample(questions, SAMPLE_ROWS, seed)),
        "sample_rows": min(SAMPLE_ROWS, len(questions)),
        "distinct_question_bigrams_all": distinct_bigram_ratio(questions),
        "rows_with_dose_or_interval": sum(1 for answer, entity in zip(answers, names, strict=True)
                                          if dosing(without_names(answer, entity))),
        "contentless_rows": sum(1 for answer, entity in zip(answers, names, strict=True)
                                if contentless(answer, entity)),
        "question_length": lengths(questions),
        "answer_length": lengths(answers),
        "rows_by_kind": dict(Counter(record.get("meta", {}).get("kind", "?") for record in records).most_common()),
    }


def top(counter: Counter[str], limit: int = TOP_PREDICATES) -> dict[str, Any]:
    return {"total": sum(counter.values()), "kinds": len(counter), "top": dict(counter.most_common(limit))}


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The printed form of a report: a few lines a person reads."""
    metrics = report["metrics"]
    removed = report.get("removed", {})
    lines = []
    if "entities" in report:
        entities = report["entities"]
        kinds = ", ".join(f"{kind} {count}" for kind, count in entities["by_kind"].items())
        lines.append(f"entities: {entities['read']} read, {entities['usable']} with usable facts ({kinds})")
    if "predicates" in report:
        predicates = report["predicates"]
        lines.append(f"facts: {predicates['mapped_facts']} mapped; unmapped predicates "
                     f"{predicates['unmapped']['kinds']} ({predicates['unmapped']['total']} facts), ignored by the map "
                     f"{predicates['ignored']['kinds']} ({predicates['ignored']['total']} facts)")
    if removed:
        content = ", ".join(f"{why} {count}" for why, count in removed.get("content", {}).items()) or "none"
        lines.append(f"removed: content ({content}); leaks {removed.get('leaks_exact', 0)} exact + "
                     f"{removed.get('leaks_near', 0)} near + {removed.get('leaks_entity_relation', 0)} by (entity, "
                     f"relation); restated {removed.get('restated', 0)}; duplicate questions "
                     f"{removed.get('duplicate_questions', 0)}"
                     f", answers {removed.get('duplicate_answers', 0)}; near duplicates "
                     f"{removed.get('near_duplicates', 0)}")
    kinds = ", ".join(f"{kind} {count}" for kind, count in metrics["rows_by_kind"].items())
    lines.append(f"rows: {metrics['rows']} ({kinds})")
    lines.append(f"quality: duplicate questions {metrics['duplicate_question_rate']:.2%}, duplicate answers "
                 f"{metrics['duplicate_answer_rate']:.2%}, distinct question bigrams "
                 f"{metrics['distinct_question_bigrams_sample']:.3f} on {metrics['sample_rows']} rows "
                 f"({metrics['distinct_question_bigrams_all']:.3f} on all), doses or intervals "
                 f"{metrics['rows_with_dose_or_interval']}, contentless {metrics['contentless_rows']}")
    if "lint" in report:
        lint = report["lint"]
        lines.append("clinical lint: " + ", ".join(f"{name.replace('_', ' ')} {value}" for name, value in lint.items()
                                                    if not name.endswith("_share")))
    if report.get("relations_off"):
        lines.append("relations left out: " + "; ".join(f"{name} ({why})"
                                                        for name, why in report["relations_off"].items()))
    if report.get("kinds", {}).get("off"):
        lines.append("question kinds left out: " + "; ".join(f"{kind} ({why})"
                                                          for kind, why in report["kinds"]["off"].items()))
    without = report.get("entities", {}).get("without_rows", {})
    if without.get("total"):
        lines.append(f"entities without rows: {without['total']} (" + ", ".join(
            f"{why} {count}" for why, count in without["by_reason"].items()) + ")")
    if "llm" in report:
        usage = report["llm"]
        price = usage.get("estimated_cost_usd")
        cost = f", estimated cost ${price:.4f}" if price is not None else ""
        lines.append(f"tokens: {usage['prompt_tokens']} prompt + {usage['completion_tokens']} completion in "
                     f"{usage['requests']} requests{cost}")
    return lines


def entities_without_rows(entities: Sequence[Any], rows: Sequence[Any], stats: Any, gate_counts: Any,
                          ) -> dict[str, Any]:
    """Every entity of the graph that no written row is about, by reason: skipped when the graph was read, no
    question kind applies to its facts, or a gate removed all its rows (the gate that removed most of them)."""
    named = {name for row in rows for name in row.entities}
    reasons: Counter[str] = Counter({f"skipped: {why}": count for why, count in stats.skipped_entities.items()})
    examples: dict[str, list[str]] = {}
    for entity in entities:
        if entity.name in named:
            continue
        removed = gate_counts.removed.get(entity.name)
        why = f"all rows removed ({removed.most_common(1)[0][0]})" if removed else "no question kind applies"
        reasons[why] += 1
        if len(examples.setdefault(why, [])) < 3:
            examples[why].append(entity.name)
    return {"total": sum(reasons.values()), "by_reason": dict(reasons.most_common()), "examples": examples}


def graph_report(stats: Any, gate_counts: Any, seed: int, backend: str, exclude: str) -> dict[str, Any]:
    """The knowledge build's report: the graph read, the predicates mapped and not, what the gates removed."""
    return {
        "command": "knowledge", "source": stats.source, "backend": backend, "seed": seed,
        "builder_data": resources.data_version(), "exclude_questions": exclude,
        "entities": {"read": stats.subjects, "usable": sum(stats.entities_by_kind.values()),
                     "by_kind": dict(stats.entities_by_kind.most_common()),
                     "skipped": dict(stats.skipped_entities)},
        "predicates": {"facts": stats.facts, "mapped_facts": sum(stats.mapped_facts.values()),
                       "by_relation": dict(stats.mapped_facts.most_common()), "unmapped": top(stats.unmapped_facts),
                       "ignored": top(stats.ignored_facts), "not_for_kind": top(stats.not_for_kind)},
        "values_dropped": dict(stats.dropped_values.most_common()),
        "relations_off": stats.relations_off,
        "removed": {"content": dict(gate_counts.rejected.most_common()), "leaks_exact": gate_counts.leaks_exact,
                    "leaks_near": gate_counts.leaks_near, "leaks_entity_relation": gate_counts.leaks_pair,
                    "restated": gate_counts.restated, "duplicate_questions": gate_counts.duplicate_questions,
                    "duplicate_answers": gate_counts.duplicate_answers,
                    "near_duplicates": gate_counts.near_duplicates},
    }
