"""Fault injection, a misbehaving OpenAI-compatible server: replies that are not JSON, not a completion, empty,
slow, endlessly failing, or hostile (nesting, numbers too long to convert). `build_dataset.py` and the evaluate.py
judge are tested as black boxes: each either goes on (skipping the item, saying so) or stops with one line; never a
traceback, never rows lost, never a success for output that is not there.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fake_openai import FakeOpenAI, Reply
from faultkit import Outcome, assert_refused, assert_unchanged, cli, snapshot

import build_dataset
import evaluate

KEY_ENV = "FAULT_LLM_KEY"
ENTITIES = [{"中心词": "甲病", "类型": "疾病", "相关症状": ["发热", "咳嗽"], "所属科室": ["呼吸内科"]},
            {"中心词": "乙病", "类型": "疾病", "相关症状": ["头痛", "呕吐"], "所属科室": ["神经内科"]}]
GOOD = {"甲病": [("甲病有哪些症状？", "甲病的常见症状包括发热、咳嗽。")],
        "乙病": [("乙病有哪些症状？", "乙病的常见症状包括头痛、呕吐。")]}


def completion(content: str) -> bytes:
    return json.dumps({"id": "x", "object": "chat.completion", "created": 1, "model": "m",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                    "finish_reason": "stop"}]}).encode()


BAD_REPLIES = {
    "200 with an HTML body": Reply(raw_body=b"<html>502 Bad Gateway</html>"),
    "200 with a JSON list": Reply(raw_body=b"[1, 2]"),
    "a completion without choices": Reply(raw_body=b'{"id": "x", "object": "chat.completion", "choices": []}'),
    "null content": Reply(raw_body=completion("x").replace(b'"x"', b"null")),
    "invalid UTF-8": Reply(raw_body=completion("ok").replace(b'"ok"', b'"\xff\xfe"')),
    "500 forever": Reply(status=500),
    "400": Reply(status=400),
    "too slow": Reply(content="[]", delay=3),
    "deeply nested JSON": Reply(content="[" * 100_000),
    "prose": Reply(content="抱歉，我无法回答这个问题。"),
}
HOSTILE_NUMBER = '[{"question": "q", "answer": ' + "9" * 5000 + "}]"


@pytest.fixture()
def key(monkeypatch) -> str:
    monkeypatch.setenv(KEY_ENV, "sk-fault-test-123456")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    return KEY_ENV


def knowledge_base(tmp_path: Path) -> Path:
    kb = tmp_path / "kb.jsonl"
    kb.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in ENTITIES), encoding="utf-8")
    return kb


def grounded(body: dict) -> Reply:
    message = next(m["content"] for m in reversed(body["messages"]) if m["role"] == "user")
    name = next(name for name in GOOD if f"“{name}”" in message)
    return Reply(content=json.dumps([{"question": q, "answer": a} for q, a in GOOD[name]], ensure_ascii=False))


def build(server: FakeOpenAI, kb: Path, output: Path, monkeypatch, capsys, *extra) -> Outcome:
    return cli({"knowledge": build_dataset.knowledge}, "knowledge", "--kb", kb, "--output", output, "--backend",
               "openai", "--model", "m", "--api_base", server.url, "--api_key_env", KEY_ENV, "--max_retries", "1",
               "--retry_base_delay", "0", "--timeout", "1", *extra, monkeypatch=monkeypatch, capsys=capsys)


def assert_went_on_or_stopped_cleanly(outcome: Outcome, output: Path) -> None:
    """Exit 0 with every written row valid, or one `error:` line; a traceback or a success without a file fails."""
    assert "Traceback" not in outcome.err, f"[traceback] {outcome.err[-2500:]}"
    if outcome.code == 2:
        assert_refused(outcome)
        return
    assert outcome.code == 0, f"[not refused] exit {outcome.code}: {outcome.err[-1500:]}"
    assert output.is_file(), f"[false success] exit 0 but {output} is not there"
    for line in output.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        assert row["instruction"].strip() and row["output"].strip(), f"[false success] an empty row: {row}"
    assert "warning" in outcome.err or "skipped" in outcome.err + outcome.out, "[message] items lost without a word"


@pytest.mark.parametrize("name", BAD_REPLIES)
def test_build_dataset_against_a_misbehaving_server(name, key, tmp_path, monkeypatch, capsys):
    kb, output = knowledge_base(tmp_path), tmp_path / "rows.jsonl"
    with FakeOpenAI(lambda body: BAD_REPLIES[name]) as server:
        assert_went_on_or_stopped_cleanly(build(server, kb, output, monkeypatch, capsys), output)


def test_build_dataset_against_a_number_too_long_to_convert(key, tmp_path, monkeypatch, capsys):
    kb, output = knowledge_base(tmp_path), tmp_path / "rows.jsonl"
    with FakeOpenAI(lambda body: Reply(content=HOSTILE_NUMBER)) as server:
        assert_went_on_or_stopped_cleanly(build(server, kb, output, monkeypatch, capsys), output)


def test_an_unreachable_server_is_one_line(key, tmp_path, monkeypatch, capsys):
    outcome = cli({"knowledge": build_dataset.knowledge}, "knowledge", "--kb", knowledge_base(tmp_path), "--output",
                  tmp_path / "rows.jsonl", "--backend", "openai", "--model", "m", "--api_base",
                  "http://127.0.0.1:9/v1", "--api_key_env", KEY_ENV, "--max_retries", "0", "--timeout", "1",
                  monkeypatch=monkeypatch, capsys=capsys)
    assert_refused(outcome, "127.0.0.1:9")


def test_a_failing_rerun_without_resume_keeps_the_rows_it_had(key, tmp_path, monkeypatch, capsys):
    kb, output = knowledge_base(tmp_path), tmp_path / "rows.jsonl"
    with FakeOpenAI(grounded) as server:
        assert build(server, kb, output, monkeypatch, capsys).code == 0
    rows = output.read_text(encoding="utf-8")
    assert rows.strip()
    with FakeOpenAI(lambda body: Reply(status=500)) as server:
        outcome = build(server, kb, output, monkeypatch, capsys)
    assert "Traceback" not in outcome.err
    assert output.read_text(encoding="utf-8") == rows, "[data lost] the rows of the earlier run are gone"


# --- the judge of evaluate.py ----------------------------------------------------------------------------------------

ROWS = [{"instruction": f"问题{i}", "output": "参考答案", "model_output": "回答"} for i in range(3)]


@pytest.mark.parametrize("name", [*BAD_REPLIES, "a number too long to convert"])
def test_the_judge_against_a_misbehaving_server(name, key, tmp_path, monkeypatch, capsys):
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in ROWS), encoding="utf-8")
    metrics = tmp_path / "metrics.json"
    metrics.write_text('{"note": "an earlier run"}\n', encoding="utf-8")
    reply = BAD_REPLIES.get(name) or Reply(content='{"completeness": ' + "9" * 5000 + "}")
    before = snapshot(predictions, metrics)
    with FakeOpenAI(lambda body: reply) as server:
        outcome = cli(evaluate.main, "--predictions", predictions, "--output", metrics, "--judge", "openai",
                      "--model", "judge", "--api_base", server.url, "--api_key_env", KEY_ENV, "--max_retries", "1",
                      "--retry_base_delay", "0", "--timeout", "1", "--judge_cache", tmp_path / "cache.jsonl",
                      monkeypatch=monkeypatch, capsys=capsys)
    assert_unchanged(before, predictions, metrics)  # no metrics claimed for rows nobody graded
    assert_refused(outcome, "the judge failed on row 1", "run again to continue")
