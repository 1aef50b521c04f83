"""Each quality gate on its own: content, evaluation-question leaks, exact and near duplicates; and the metrics."""

from __future__ import annotations

from utils.builder.gates import (
    GateCounts,
    LeakIndex,
    apply_gates,
    content_gate,
    exact_gate,
    leak_gate,
    near_duplicate_flags,
    near_gate,
)
from utils.builder.report import distinct_bigram_ratio, duplicate_rate
from utils.builder.rows import Row


def row(question: str, answer: str, values: tuple[str, ...] = ("发热",), entities: tuple[str, ...] = ("甲病",),
        relation: str = "symptom") -> Row:
    return Row(question, answer, "fact", entities, ("常见症状",), relation, values)


def test_content_gate_rejects_doses_contentless_and_tautologies() -> None:
    counts = GateCounts()
    rows = [
        row("甲病有哪些症状？", "甲病的常见症状包括发热、咳嗽。", ("发热", "咳嗽")),
        row("甲药怎么用？", "甲药口服，一次2片，一日3次。", ("口服",), ("甲药",)),
        row("甲药的用法用量？", "甲药的用法用量：遵医嘱。", ("遵医嘱",), ("甲药",)),
        row("阿莫西林的成分？", "阿莫西林的主要成分是阿莫西林。", ("阿莫西林",), ("阿莫西林",)),
        row("乙药的禁忌？", "乙药的禁忌：尚不明确。", ("尚不明确",), ("乙药",)),
    ]
    kept = content_gate(rows, counts)
    assert [r.output for r in kept] == ["甲病的常见症状包括发热、咳嗽。"]
    assert counts.rejected == {"dose or frequency in the answer": 1, "no fact": 2, "contentless": 1}


def test_leaks_exact_and_near_equal_questions_are_removed() -> None:
    index = LeakIndex(["高血压患者通常会出现哪些不适？", "糖尿病需要做哪些检查？"], threshold=0.8)
    counts = GateCounts()
    rows = [
        row("高血压患者通常会出现哪些不适？", "a"),  # equal
        row("高血压患者通常会出现哪些不适", "b"),  # near-equal (bigram Jaccard 0.93)
        row(" <user>: 你好 <bot>: 你好 <user>: 糖尿病需要做哪些检查？", "c"),  # the last turn of a dialogue
        row("高血压有哪些并发症？", "d"),  # unrelated
    ]
    kept = leak_gate(rows, index, counts)
    assert [r.output for r in kept] == ["d"]
    assert (counts.leaks_exact, counts.leaks_near) == (2, 1)


def test_exact_duplicates_of_questions_and_answers_go_first_one_wins() -> None:
    counts = GateCounts()
    rows = [row("q1", "a1"), row("q1", "a2"), row("q2", "a1"), row("q3", "a3")]
    assert [(r.instruction, r.output) for r in exact_gate(rows, counts)] == [("q1", "a1"), ("q3", "a3")]
    assert (counts.duplicate_questions, counts.duplicate_answers) == (1, 1)
    assert len(exact_gate(rows, GateCounts(), unique_answers=False)) == 3


def test_near_duplicates_are_found_by_minhash_and_confirmed_exactly() -> None:
    base = "急性胰腺炎有哪些常见症状？", "急性胰腺炎的常见症状包括腹痛、恶心、呕吐、发热、腹胀、黄疸。"
    rows = [
        row(*base),
        row("急性胰腺炎有哪些常见症状", base[1]),  # near-equal: kept out
        # another disease: kept
        row("慢性胰腺炎有哪些常见症状？", "慢性胰腺炎的常见症状包括腹痛、消瘦、脂肪泻、糖尿病。"),
    ]
    counts = GateCounts()
    kept = near_gate(rows, 0.8, counts)
    assert [r.instruction for r in kept] == [base[0], "慢性胰腺炎有哪些常见症状？"]
    assert counts.near_duplicates == 1


def test_all_gates_in_order() -> None:
    counts = GateCounts()
    rows = [row("甲病有哪些症状？", "甲病的常见症状包括发热、咳嗽。", ("发热", "咳嗽"))] * 3
    assert len(apply_gates(rows, LeakIndex([], 0.8), 0.8, counts)) == 1 and counts.duplicate_questions == 2


def test_metrics_are_defined_as_documented() -> None:
    # distinct bigrams / all bigrams: 甲乙丙 -> 甲乙, 乙丙; 甲乙 -> 甲乙: 2 distinct of 3
    assert distinct_bigram_ratio(["甲乙丙", "甲 乙"]) == round(2 / 3, 4)
    assert duplicate_rate(["a", "a", "b", "c"]) == 0.25


def test_the_near_duplicate_gate_shows_progress(capsys) -> None:
    texts = [f"第{n}种病有哪些症状？第{n}种病的症状包括发热。" for n in range(5000)]  # more than one chunk
    flags = near_duplicate_flags(texts, 0.8, progress=True)
    assert len(flags) == len(texts)
    err = capsys.readouterr().err
    assert "near duplicates" in err and "5000/5000" in err
