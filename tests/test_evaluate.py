"""evaluate.py: character-level BLEU-4 / ROUGE on hand-computed cases, the --compare table, and the LLM judge
against a loopback chat-completions server (tests/fake_openai.py): a 500 and a malformed reply before good ones."""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.fake_openai import FakeOpenAI, Reply
from utils.core.errors import UserError
from utils.evaluation.metrics import bleu, characters, corpus_scores, lcs_length, lcs_length_dp, rouge_l, rouge_n

# The worked example used below. Reference r = 多喝水多休息 (6 characters), candidate c = 多休息和多喝水 (7).
REFERENCE = "多喝水多休息"
CANDIDATE = "多休息和多喝水"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


# --- metrics -----------------------------------------------------------------------------------------------


def test_identical_scores_full_and_disjoint_scores_zero():
    text = "高血压患者应低盐饮食，规律服药，定期监测血压。"
    for metric in (bleu, rouge_l, lambda c, r: rouge_n(c, r, 1), lambda c, r: rouge_n(c, r, 2)):
        assert metric(text, text) == pytest.approx(1.0)
        assert metric("多喝水", "少吃盐") == 0.0


def test_whitespace_is_dropped_and_every_character_is_a_token():
    assert characters(" 多 喝\n水\tA1 ") == ["多", "喝", "水", "A", "1"]
    assert bleu("多 喝 水 多 休 息", REFERENCE) == pytest.approx(1.0)


def test_lcs_and_rouge_l_by_hand():
    # r = 多 喝 水 多 休 息, c = 多 休 息 和 多 喝 水. A common subsequence of 4 would need 4 characters in the
    # same order in both; after c's 多休息 only r's end remains, and after c's second 多 comes 喝水, which in r
    # precedes its second 多. So the LCS is 3 (多休息, or 多喝水): P = 3/7, R = 3/6, F1 = 2PR/(P+R) = 6/13.
    assert lcs_length(characters(CANDIDATE), characters(REFERENCE)) == 3
    assert rouge_l(CANDIDATE, REFERENCE) == pytest.approx(6 / 13)
    # A textbook case: LCS(ABCBDAB, BDCABA) = 4 (e.g. BCBA).
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4


def test_rouge_n_by_hand():
    # Unigrams: c has 多×2 休 息 和 喝 水 (7), r has 多×2 喝 水 休 息 (6); clipped overlap 6.
    # P = 6/7, R = 1, F1 = 12/13.
    assert rouge_n(CANDIDATE, REFERENCE, 1) == pytest.approx(12 / 13)
    # Bigrams: c = 多休 休息 息和 和多 多喝 喝水 (6), r = 多喝 喝水 水多 多休 休息 (5); overlap 4
    # (多休 休息 多喝 喝水). P = 4/6, R = 4/5, F1 = 8/11.
    assert rouge_n(CANDIDATE, REFERENCE, 2) == pytest.approx(8 / 11)


def test_bleu_by_hand():
    # c (7) is longer than r (6): no brevity penalty.
    # p1 = 6/7 (unsmoothed). p2 = (4+1)/(6+1) = 5/7 (add-one).
    # 3-grams: c = 多休息 休息和 息和多 和多喝 多喝水 (5), r = 多喝水 喝水多 水多休 多休息; matches 2 -> p3 = 3/6.
    # 4-grams: c has 4, none in r -> p4 = (0+1)/(4+1) = 1/5.
    # BLEU = (6/7 · 5/7 · 1/2 · 1/5) ** (1/4) = (3/49) ** (1/4).
    assert bleu(CANDIDATE, REFERENCE) == pytest.approx((3 / 49) ** 0.25)
    # Brevity: c = 多喝水 (3) against r (6). Every n-gram of c is in r: p1 = 3/3, p2 = 3/3, p3 = 2/2, and the
    # 4-gram order c lacks is (0+1)/(0+1). BP = exp(1 - 6/3) = e^-1.
    assert bleu("多喝水", REFERENCE) == pytest.approx(math.exp(-1))


def test_empty_texts():
    assert bleu("", "") == rouge_l("", "") == 1.0
    assert bleu("", REFERENCE) == rouge_l(REFERENCE, "") == rouge_n("  ", REFERENCE, 1) == 0.0


def test_bit_parallel_lcs_equals_the_dynamic_programme_on_random_texts():
    rng = random.Random(12)
    alphabets = ["ab", "abcd", "多喝水休息", "".join(chr(0x4E00 + i) for i in range(300)), "甲乙 \n,，。"]
    for _ in range(600):
        alphabet = rng.choice(alphabets)
        a = [rng.choice(alphabet) for _ in range(rng.randint(0, 120))]
        b = [rng.choice(alphabet) for _ in range(rng.randint(0, 120))]
        assert lcs_length(a, b) == lcs_length_dp(a, b) == lcs_length(b, a), (a, b)
    for width in (63, 64, 65, 127, 128, 129):  # around machine-word boundaries of the bit rows
        a = [rng.choice("abc") for _ in range(width)]
        b = [rng.choice("abc") for _ in range(width + rng.randint(-2, 2))]
        assert lcs_length(a, b) == lcs_length_dp(a, b)


def test_a_20k_character_answer_scores_in_well_under_a_second():
    """The pure-Python DP took 96 s on two 20,000-character texts; the bit-parallel LCS takes about 0.1 s."""
    rng = random.Random(3)
    alphabet = [chr(0x4E00 + i) for i in range(2000)]
    answer = "".join(rng.choice(alphabet) for _ in range(20_000))
    reference = "".join(rng.choice(alphabet) for _ in range(20_000))
    started = time.perf_counter()
    scores = corpus_scores([(answer, reference)])
    elapsed = time.perf_counter() - started
    assert elapsed < 3.0, f"{elapsed:.1f}s"
    common = lcs_length(list(answer[:2000]), list(reference[:2000]))
    assert common == lcs_length_dp(list(answer[:2000]), list(reference[:2000]))
    assert 0 < scores["rouge-l"] < 100


# --- the command line --------------------------------------------------------------------------------------


@pytest.fixture
def run_evaluate(monkeypatch, capsys):
    """`python evaluate.py args...` in-process (run_cli, the same code path): (exit code, stdout, stderr)."""
    from faultkit import cli

    import evaluate

    def run(*args: str) -> SimpleNamespace:
        outcome = cli(evaluate.main, *args, monkeypatch=monkeypatch, capsys=capsys)
        return SimpleNamespace(returncode=outcome.code, stdout=outcome.out, stderr=outcome.err)

    return run


def test_cli_averages_rows_on_a_0_to_100_scale(tmp_path, run_evaluate):
    predictions = write_jsonl(tmp_path / "pred.jsonl", [
        {"instruction": "q1", "output": REFERENCE, "model_output": REFERENCE},
        {"instruction": "q2", "output": REFERENCE, "model_output": CANDIDATE},
    ])
    metrics_file = tmp_path / "out" / "metrics.json"
    result = run_evaluate("--predictions", str(predictions), "--output", str(metrics_file))
    assert result.returncode == 0, result.stderr
    metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
    assert json.loads(result.stdout) == metrics
    assert set(metrics) == {"bleu-4", "rouge-1", "rouge-2", "rouge-l", "rows"}
    assert metrics["rows"] == 2
    assert metrics["rouge-l"] == pytest.approx(100 * (1 + 6 / 13) / 2, abs=1e-4)
    assert metrics["rouge-1"] == pytest.approx(100 * (1 + 12 / 13) / 2, abs=1e-4)
    assert metrics["rouge-2"] == pytest.approx(100 * (1 + 8 / 11) / 2, abs=1e-4)
    assert metrics["bleu-4"] == pytest.approx(100 * (1 + (3 / 49) ** 0.25) / 2, abs=1e-4)


def test_cli_compare_prints_one_table_row_per_file(tmp_path, run_evaluate):
    good = write_jsonl(tmp_path / "med.jsonl", [{"instruction": "q", "output": REFERENCE, "model_output": REFERENCE}])
    bad = write_jsonl(tmp_path / "base.jsonl", [{"instruction": "q", "output": REFERENCE, "model_output": "少吃盐"}])
    result = run_evaluate("--compare", str(bad), str(good))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "| predictions | rows | bleu-4 | rouge-1 | rouge-2 | rouge-l |"
    assert lines[2] == f"| {bad} | 1 | 0.00 | 0.00 | 0.00 | 0.00 |"
    assert lines[3] == f"| {good} | 1 | 100.00 | 100.00 | 100.00 | 100.00 |"
    assert len(lines) == 4


def test_compare_takes_the_same_questions_in_any_order(tmp_path, run_evaluate):
    rows = [{"instruction": f"q{i}", "output": REFERENCE, "model_output": REFERENCE} for i in range(3)]
    first = write_jsonl(tmp_path / "a.jsonl", rows)
    second = write_jsonl(tmp_path / "b.jsonl", [{**row, "model_output": "少吃盐"} for row in reversed(rows)])
    result = run_evaluate("--compare", str(first), str(second))
    assert result.returncode == 0, result.stderr
    assert f"| {second} | 3 | 0.00 |" in result.stdout


@pytest.mark.parametrize("change, expected", [
    (lambda rows: rows[:2], "b.jsonl has 2 rows but {a} has 3"),
    (lambda rows: [*rows[:2], {**rows[2], "instruction": "另一个问题"}], "b.jsonl row 3 ('另一个问题') matches no"),
    (lambda rows: [{**rows[0], "output": "另一个参考答案"}, *rows[1:]], "row 1 ('q0') matches no question of"),
    (lambda rows: [rows[0], rows[0], rows[1]], "row 2 ('q0') matches no question"),
], ids=["fewer rows", "another question", "another golden answer", "a question twice"])
def test_compare_refuses_files_of_different_questions(change, expected, tmp_path, run_evaluate):
    """A table over different questions compares nothing: one error line (not a warning, which a table hides)."""
    rows = [{"instruction": f"q{i}", "output": REFERENCE, "model_output": REFERENCE} for i in range(3)]
    first = write_jsonl(tmp_path / "a.jsonl", rows)
    second = write_jsonl(tmp_path / "b.jsonl", change(rows))
    table = tmp_path / "table.md"
    result = run_evaluate("--compare", str(first), str(second), "--output", str(table))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: --compare: ") and expected.format(a=first) in line, line
    assert "--predictions" in line and result.stdout == "" and not table.exists()


def test_cli_rejects_rows_without_answers(tmp_path, run_evaluate):
    no_answer = write_jsonl(tmp_path / "questions.jsonl", [{"instruction": "q", "output": REFERENCE}])
    result = run_evaluate("--predictions", str(no_answer))
    assert result.returncode == 2
    assert "line 1" in result.stderr and "`model_output`" in result.stderr
    assert "Traceback" not in result.stderr


# --- the LLM judge -----------------------------------------------------------------------------------------


class Script:
    """Replies in order, whatever is asked; a 500 once the script is used up. Reassign `replies` between runs."""

    def __init__(self) -> None:
        self.replies: list[Reply] = []

    def __call__(self, body: dict) -> Reply:
        return self.replies.pop(0) if self.replies else Reply(status=500)


@pytest.fixture
def chat_server() -> Iterator[tuple[FakeOpenAI, Script]]:
    script = Script()
    with FakeOpenAI(script) as server:
        yield server, script


def judge_args(server: FakeOpenAI, predictions: Path, output: Path, max_retries: int = 3) -> dict:
    return {"predictions": str(predictions), "output": str(output), "judge": "openai", "api_base": server.url,
            "model": "judge-model", "api_key_env": "BENTSAO_TEST_JUDGE_KEY", "max_retries": max_retries,
            "retry_base_delay": 0.0, "timeout": 10.0}


JUDGE_ROWS = [
    {"instruction": "高血压患者需要注意什么？", "output": "低盐饮食，规律服药。", "model_output": "少吃盐，按时吃药。"},
    {"instruction": "感冒发热怎么办？", "output": "多休息多喝水，高热不退要就医。", "model_output": "多喝水。"},
]


def test_judge_retries_500_and_malformed_replies_then_resumes_without_asking(tmp_path, chat_server, monkeypatch):
    import evaluate

    monkeypatch.setenv("BENTSAO_TEST_JUDGE_KEY", "sk-test")
    server, script = chat_server
    predictions = write_jsonl(tmp_path / "pred.jsonl", JUDGE_ROWS)
    script.replies = [
        Reply(status=500),  # retried by utils.llm
        Reply("这个回答还可以。"),  # no JSON: asked again
        Reply('{"completeness": 3, "depth": 2, "professionalism": 3}'),
        Reply('评分如下：\n```json\n{"完整性": 1, "深刻性": 0, "专业性": 2}\n```'),
    ]
    evaluate.main(evaluate.EvaluateArgs(**judge_args(server, predictions, tmp_path / "m.json")))
    metrics = json.loads((tmp_path / "m.json").read_text(encoding="utf-8"))
    assert len(server.requests) == 4
    assert metrics["judge-completeness"] == pytest.approx(2.0)
    assert metrics["judge-depth"] == pytest.approx(1.0)
    assert metrics["judge-professionalism"] == pytest.approx(2.5)
    assert metrics["judge-mean"] == pytest.approx((2.0 + 1.0 + 2.5) / 3, abs=1e-4)
    assert metrics["rows"] == 2 and "rouge-l" in metrics
    first = server.requests[0]
    assert server.headers[0]["authorization"] == "Bearer sk-test"
    assert first["model"] == "judge-model" and first["temperature"] == 0
    prompt = first["messages"][-1]["content"]
    assert "完整性" in prompt and "深刻性" in prompt and "专业性" in prompt
    assert JUDGE_ROWS[0]["model_output"] in prompt and JUDGE_ROWS[0]["output"] in prompt

    sidecar = Path(f"{predictions}.judge.jsonl")
    assert len(sidecar.read_text(encoding="utf-8").splitlines()) == 2
    evaluate.main(evaluate.EvaluateArgs(**judge_args(server, predictions, tmp_path / "again.json")))
    assert len(server.requests) == 4  # nothing asked again
    assert json.loads((tmp_path / "again.json").read_text(encoding="utf-8")) == metrics


def test_judge_failure_keeps_graded_rows_and_a_rerun_asks_only_the_rest(tmp_path, chat_server, monkeypatch):
    import evaluate

    monkeypatch.setenv("BENTSAO_TEST_JUDGE_KEY", "sk-test")
    server, script = chat_server
    predictions = write_jsonl(tmp_path / "pred.jsonl", JUDGE_ROWS)
    script.replies = [Reply('{"completeness": 2, "depth": 2, "professionalism": 2}'), Reply(status=503),
                      Reply(status=503)]
    with pytest.raises(UserError, match=r"row 2 .*1 of 2 rows are graded"):
        evaluate.main(evaluate.EvaluateArgs(**judge_args(server, predictions, tmp_path / "m.json", max_retries=1)))
    assert len(server.requests) == 3

    script.replies = [Reply('{"completeness": 0, "depth": 0, "professionalism": 1}')]
    evaluate.main(evaluate.EvaluateArgs(**judge_args(server, predictions, tmp_path / "m.json")))
    assert len(server.requests) == 4
    metrics = json.loads((tmp_path / "m.json").read_text(encoding="utf-8"))
    assert metrics["judge-completeness"] == pytest.approx(1.0)
    assert metrics["judge-professionalism"] == pytest.approx(1.5)


def test_judge_needs_the_key_variable(tmp_path, chat_server, monkeypatch):
    import evaluate

    monkeypatch.delenv("BENTSAO_TEST_JUDGE_KEY", raising=False)
    server, _ = chat_server
    predictions = write_jsonl(tmp_path / "pred.jsonl", JUDGE_ROWS)
    with pytest.raises(UserError, match="BENTSAO_TEST_JUDGE_KEY"):
        evaluate.main(evaluate.EvaluateArgs(**judge_args(server, predictions, tmp_path / "m.json")))
    assert server.requests == []
