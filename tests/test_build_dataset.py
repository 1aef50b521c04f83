"""build_dataset.py: the template backend's grounding and determinism, the committed data, bad input, and the
openai backend against a loopback fake server (retries, unparseable and ungrounded replies, exact resume)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import build_dataset as bd  # the repository root is on sys.path (tests/conftest.py)
from tests.fake_openai import FakeOpenAI, Reply, scripted
from utils import llm
from utils.core.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
KB = ROOT / "data" / "knowledge_base.jsonl"
LLAMA_DATA = ROOT / "data" / "llama_data.json"
DOCS = ROOT / "data_literature" / "documents.jsonl"
LITERATURE = ROOT / "data_literature" / "liver_cancer.json"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


SMALL_KB = [
    {"中心词": "甲病", "类型": "疾病", "相关症状": ["发热", "咳嗽"], "所属科室": ["呼吸内科"], "药物治疗": ["药甲"]},
    {"中心词": "乙病", "类型": "疾病", "相关症状": ["发热", "皮疹"], "所属科室": ["皮肤科"], "药物治疗": ["药甲"]},
    {"中心词": "丙病", "类型": "疾病", "相关症状": ["发热", "咳嗽", "腹痛"], "所属科室": ["呼吸内科"]},
    {"中心词": "药甲", "类型": "药物", "用途": ["退热"], "不良反应": ["恶心", "皮疹"]},
]


# ----------------------------------------------------------------------------------------------------------------
# Template backend


@pytest.fixture(scope="module")
def kb_entities() -> list[bd.Entity]:
    return bd.load_entities(KB)


@pytest.fixture(scope="module")
def kb_rows(kb_entities: list[bd.Entity]) -> list[bd.Row]:
    rows, _ = bd.template_knowledge_rows(kb_entities, bd.DEFAULT_SEED, bd.DEFAULT_PER_ENTITY)
    return rows


def test_knowledge_base_is_large_and_varied(kb_entities: list[bd.Entity]) -> None:
    kinds = {entity.kind for entity in kb_entities}
    assert len(kb_entities) >= 150
    assert {"疾病", "药物", "检查"} <= kinds
    keys = {key for entity in kb_entities for key, _ in entity.relations}
    assert keys - {key for _, key in bd.PHRASINGS}, "some entity should exercise the generic pattern"


def test_every_template_row_is_grounded_in_its_entities(kb_entities: list[bd.Entity], kb_rows: list[bd.Row]) -> None:
    facts = {entity.name: entity.facts for entity in kb_entities}
    assert len(kb_rows) >= 3000
    for row in kb_rows:
        assert row.sources and all(source in facts for source in row.sources), row
        assert any(fact in row.output for source in row.sources for fact in facts[source]), row


def test_template_rows_cover_every_kind_and_are_unique(kb_rows: list[bd.Row]) -> None:
    assert {"single", "multi", "vignette", "reverse", "compare"} <= {row.kind for row in kb_rows}
    instructions = [row.instruction for row in kb_rows]
    assert len(instructions) == len(set(instructions))
    assert any(
        row.instruction.startswith(("一位", "一名")) and "可能患什么病？如何治疗？" in row.instruction
        for row in kb_rows
    )
    lengths = sorted(len(row.output) for row in kb_rows)
    assert lengths[int(len(lengths) * 0.9)] <= 150  # short answers: quick to train on a tiny model


def test_template_is_deterministic_for_a_seed(kb_entities: list[bd.Entity]) -> None:
    first, _ = bd.template_knowledge_rows(kb_entities, 7, 8)
    again, _ = bd.template_knowledge_rows(kb_entities, 7, 8)
    other, _ = bd.template_knowledge_rows(kb_entities, 8, 8)
    assert [row.record() for row in first] == [row.record() for row in again]
    assert [row.record() for row in first] != [row.record() for row in other]


def test_adding_an_entity_leaves_other_entities_rows_alone(kb_entities: list[bd.Entity]) -> None:
    base = bd.entity_rows(kb_entities[0], 42, 16)
    extended = kb_entities + [bd.Entity("新病", "疾病", (("相关症状", ("发热",)),))]
    assert bd.entity_rows(extended[0], 42, 16) == base


def test_reverse_lookups_name_exactly_the_entities_holding_the_value() -> None:
    entities = [bd.parse_entity("kb", f"line {i}", row) for i, row in enumerate(SMALL_KB, 1)]
    rows = bd.reverse_rows(entities, 42)
    fever = [row for row in rows if row.instruction.count("发热") and row.kind == "reverse"]
    assert len(fever) == 1 and set(fever[0].sources) == {"甲病", "乙病", "丙病"}
    assert all(name in fever[0].output for name in ("甲病", "乙病", "丙病"))
    drug = [row for row in rows if "药甲" in row.instruction]
    assert len(drug) == 1 and set(drug[0].sources) == {"甲病", "乙病"} and "丙病" not in drug[0].output
    department = [row for row in rows if "呼吸内科" in row.instruction]
    assert len(department) == 1 and set(department[0].sources) == {"甲病", "丙病"}
    # A symptom or side effect of a single entity is no reverse lookup.
    assert not any(word in row.instruction for row in rows for word in ("皮疹", "腹痛", "恶心"))
    shared = bd.shared_symptom_rows(entities, 42)
    both = [row for row in shared if "发热" in row.instruction and "咳嗽" in row.instruction]
    assert both and set(both[0].sources) == {"甲病", "丙病"}


def test_reverse_rows_of_the_knowledge_base_are_correct(kb_entities: list[bd.Entity], kb_rows: list[bd.Row]) -> None:
    by_name = {entity.name: entity for entity in kb_entities}
    for row in (row for row in kb_rows if row.kind == "reverse"):
        # Each named entity holds a value that both the question and the answer state.
        for source in row.sources:
            assert source in row.output
            assert any(v in row.instruction and v in row.output for v in by_name[source].facts), row


def test_unknown_relation_keys_use_the_generic_pattern(tmp_path: Path) -> None:
    kb = write_jsonl(
        tmp_path / "kb.jsonl", [{"中心词": "某病", "传播途径": ["飞沫传播", "接触传播"], "奇怪的键": ["某值"]}]
    )
    rows, _ = bd.template_knowledge_rows(bd.load_entities(kb), 42, 20)
    assert any("传播途径" in row.instruction and "飞沫传播、接触传播" in row.output for row in rows)
    assert any("奇怪的键" in row.instruction and "某值" in row.output for row in rows)


def test_entities_without_facts_produce_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    kb = write_jsonl(
        tmp_path / "kb.jsonl", SMALL_KB + [{"中心词": "空病"}, {"中心词": "空药", "类型": "药物", "用途": []}]
    )
    out = tmp_path / "out.json"
    bd.knowledge(kb=str(kb), output=str(out))
    assert "6 read, 2 without content (skipped)" in capsys.readouterr().out
    text = out.read_text(encoding="utf-8")
    assert "空病" not in text and "空药" not in text and read_jsonl(out)


def test_committed_llama_data_regenerates_byte_for_byte(tmp_path: Path) -> None:
    out = tmp_path / "llama_data.json"
    bd.knowledge(kb=str(KB), output=str(out))
    assert out.read_bytes() == LLAMA_DATA.read_bytes(), (
        "data/llama_data.json is stale: run `python build_dataset.py knowledge --kb data/knowledge_base.jsonl "
        "--output data/llama_data.json`"
    )
    rows = read_jsonl(LLAMA_DATA)
    assert len(rows) >= 3000 and all(set(row) == {"instruction", "input", "output"} for row in rows)


def test_committed_literature_regenerates_and_has_the_published_shape(tmp_path: Path) -> None:
    out = tmp_path / "liver_cancer.json"
    bd.literature(docs=str(DOCS), output=str(out))
    assert out.read_bytes() == LITERATURE.read_bytes()
    rows = json.loads(LITERATURE.read_text(encoding="utf-8"))
    assert isinstance(rows, list) and len(rows) >= 40
    texts = [json.loads(line)["text"] for line in DOCS.read_text(encoding="utf-8").splitlines()]
    multi = 0
    for row in rows:
        assert row["input"] == "" and row["instruction"].startswith(" <user>: ")
        turns = bd.dialogue_turns(row["instruction"])
        assert turns is not None, row
        assert [role for role, _ in turns] == ["user", "bot"] * (len(turns) // 2) + ["user"]
        multi += len(turns) > 1
        # Grounded: every bot reply, in the history and as the output, is a sentence of one document.
        for reply in [text for role, text in turns if role == "bot"] + [row["output"]]:
            assert any(reply in text for text in texts), reply
    assert multi >= 10 and max(len(bd.dialogue_turns(row["instruction"])) for row in rows) == 5  # 3 user turns


def test_literature_turns_one_gives_single_turn_rows(tmp_path: Path) -> None:
    out = tmp_path / "lit.json"
    bd.literature(docs=str(DOCS), output=str(out), turns=1)
    rows = json.loads(out.read_text(encoding="utf-8"))
    assert rows and all(row["instruction"].count("<user>") == 1 and "<bot>" not in row["instruction"] for row in rows)


# ----------------------------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit code 2, no traceback


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "build_dataset.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (
            ['{"中心词": "甲病", "相关症状": ["发热"]}', '{"中心词": "乙病", "相关症状": ["发热"'],
            "line 2: invalid JSON",
        ),
        (['{"中心词": "甲病", "相关症状": ["发热"]}', '{"相关症状": ["咳嗽"]}'], "line 2: missing `中心词`"),
        (
            ['{"中心词": "甲病", "相关症状": "发热"}'],
            "relation `相关症状` of `甲病` must be a list of strings, got a string",
        ),
        (['{"中心词": "甲病", "相关症状": ["发热", 3]}'], "must be a list of strings, it holds a number"),
        (['{"中心词": "甲病"}', '{"中心词": "甲病"}'], "`甲病` is already defined at line 1"),
    ],
    ids=["malformed-line", "missing-center", "non-list-value", "non-string-item", "duplicate"],
)
def test_bad_knowledge_base_is_one_clear_line(tmp_path: Path, lines: list[str], expected: str) -> None:
    kb = tmp_path / "kb.jsonl"
    kb.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = run_cli("knowledge", "--kb", str(kb), "--output", str(tmp_path / "out.json"))
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and expected in result.stderr
    assert not (tmp_path / "out.json").exists()


def test_bad_documents_and_flags_are_one_clear_line(tmp_path: Path) -> None:
    docs = write_jsonl(tmp_path / "docs.jsonl", [{"title": "t", "text": "肝癌的治疗方法包括手术切除。"}, {"text": "x"}])
    result = run_cli("literature", "--docs", str(docs), "--output", str(tmp_path / "out.json"))
    assert result.returncode == 2 and "line 2: missing field `title`" in result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
    result = run_cli("knowledge", "--kb", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "o.json"))
    assert result.returncode == 2 and "no such file" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("knowledge", "--kb", str(KB), "--output", str(tmp_path / "o.json"), "--backend", "gpt")
    assert result.returncode == 2 and "--backend must be one of" in result.stderr


# ----------------------------------------------------------------------------------------------------------------
# OpenAI-compatible backend against a loopback fake server


def qa_json(*pairs: tuple[str, str], fenced: bool = False) -> str:
    text = json.dumps([{"question": q, "answer": a} for q, a in pairs], ensure_ascii=False)
    return f"好的，以下是问答对：\n```json\n{text}\n```" if fenced else text


GOOD = {
    "甲病": qa_json(
        ("甲病有哪些症状？", "甲病的常见症状包括发热、咳嗽。"),
        ("甲病看什么科？", "甲病一般到呼吸内科就诊。"),
        fenced=True,
    ),
    "乙病": qa_json(("乙病有哪些症状？", "乙病常表现为发热、皮疹。")),
    "丙病": qa_json(("丙病怎么治？", "多喝热水就会好。"), ("丙病有哪些症状？", "丙病可出现腹痛。")),
}


def good_reply(body: dict) -> Reply:
    message = body["messages"][-1]["content"]
    return next(Reply(content=content) for name, content in GOOD.items() if f"“{name}”" in message)


@pytest.fixture()
def api_env(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("FAKE_LLM_KEY", "sk-test-secret-123")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    return "FAKE_LLM_KEY"


def run_openai_knowledge(server: FakeOpenAI, kb: Path, out: Path, key_env: str, resume: bool) -> None:
    bd.knowledge(
        kb=str(kb),
        output=str(out),
        backend="openai",
        api_base=server.url,
        model="fake-model",
        api_key_env=key_env,
        concurrency=2,
        resume=resume,
        retry_base_delay=0.001,
        per_entity=4,
    )


def test_openai_knowledge_retries_filters_and_resumes_exactly(
    tmp_path: Path, api_env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    kb = write_jsonl(tmp_path / "kb.jsonl", SMALL_KB[:3])
    out = tmp_path / "rows.json"
    responder = scripted(
        {"“甲病”": [Reply(status=500), Reply(status=429)], "“乙病”": [Reply(content="我不知道。")]}, good_reply
    )
    with FakeOpenAI(responder) as server:
        run_openai_knowledge(server, kb, out, api_env, resume=False)
        first = capsys.readouterr()
        # 甲病: a 500 and a 429, retried, then good; 乙病: a non-JSON reply, skipped; 丙病: one ungrounded pair.
        assert (
            server.requests_mentioning("“甲病”"),
            server.requests_mentioning("“乙病”"),
            server.requests_mentioning("“丙病”"),
        ) == (3, 1, 1)
        rows = read_jsonl(out)
        assert {row["output"] for row in rows} == {
            "甲病的常见症状包括发热、咳嗽。",
            "甲病一般到呼吸内科就诊。",
            "丙病可出现腹痛。",
        }
        assert "多喝热水" not in out.read_text(encoding="utf-8")
        assert "1 skipped" in first.out and "filtered: 1 ungrounded" in first.out
        assert "乙病" in first.err and "not a JSON array" in first.err
        assert server.headers[0]["authorization"] == "Bearer sk-test-secret-123"
        assert "sk-test-secret-123" not in first.out + first.err

        # The second run asks only about the entity that was skipped, and repeats no row.
        before = len(server.requests)
        run_openai_knowledge(server, kb, out, api_env, resume=True)
        asked = [body["messages"][-1]["content"] for body in server.requests[before:]]
        assert len(asked) == 1 and "“乙病”" in asked[0]
        rows = read_jsonl(out)
        assert len(rows) == 4 and len({row["instruction"] for row in rows}) == 4
        assert "2 already done (resume), 1 requested, 0 skipped" in capsys.readouterr().out

        # A finished run asks nothing again.
        before = len(server.requests)
        run_openai_knowledge(server, kb, out, api_env, resume=True)
        assert len(server.requests) == before and len(read_jsonl(out)) == 4


def test_openai_resume_after_a_crash_between_rows_and_progress_duplicates_nothing(tmp_path: Path, api_env: str) -> None:
    kb = write_jsonl(tmp_path / "kb.jsonl", SMALL_KB[:3])
    out = tmp_path / "rows.json"
    with FakeOpenAI(good_reply) as server:
        run_openai_knowledge(server, kb, out, api_env, resume=False)
        rows = read_jsonl(out)
        progress = llm.Progress(out).path
        # Rows of 甲病 are on disk but its progress line is lost, and the file ends in a torn line.
        kept = [line for line in progress.read_text(encoding="utf-8").splitlines() if "甲病" not in line]
        progress.write_text("\n".join(kept) + "\n", encoding="utf-8")
        with out.open("a", encoding="utf-8") as handle:
            handle.write('{"instruction": "torn')
        before = len(server.requests)
        run_openai_knowledge(server, kb, out, api_env, resume=True)
        assert server.requests_mentioning("“甲病”") == 2 and len(server.requests) == before + 1
        assert read_jsonl(out) == rows


def test_openai_needs_a_model_and_a_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kb = write_jsonl(tmp_path / "kb.jsonl", SMALL_KB)
    with pytest.raises(UserError, match="needs --model"):
        bd.knowledge(kb=str(kb), output=str(tmp_path / "o.json"), backend="openai")
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(UserError, match="NO_SUCH_KEY_VAR .* is not set"):
        bd.knowledge(
            kb=str(kb),
            output=str(tmp_path / "o.json"),
            backend="openai",
            model="m",
            api_key_env="NO_SUCH_KEY_VAR",
            api_base="http://127.0.0.1:9/v1",
        )


def test_openai_refused_key_is_one_clear_error(tmp_path: Path, api_env: str) -> None:
    kb = write_jsonl(tmp_path / "kb.jsonl", SMALL_KB[:1])
    with FakeOpenAI(lambda body: Reply(status=401)) as server:
        with pytest.raises(UserError, match="refused the request .*401"):
            run_openai_knowledge(server, kb, tmp_path / "o.json", api_env, resume=False)
        assert len(server.requests) == 1  # a refused key is not retried


def test_openai_literature_keeps_the_grounded_prefix_and_resumes(tmp_path: Path, api_env: str) -> None:
    docs = write_jsonl(
        tmp_path / "docs.jsonl",
        [
            {
                "title": "肝癌筛查",
                "text": "肝癌的高危人群应该定期做肝脏超声和甲胎蛋白检查。甲胎蛋白是一种血液中的蛋白质。",
            },
            {"title": "肝癌治疗", "text": "肝癌的治疗方法包括手术切除、局部消融和经动脉化疗栓塞。"},
        ],
    )
    dialogue = qa_json(
        ("高危人群要做什么检查？", "高危人群应该定期做肝脏超声和甲胎蛋白检查。"),
        ("甲胎蛋白是什么？", "甲胎蛋白是一种血液中的蛋白质。"),
        ("那我能喝酒吗？", "少量喝一点红酒对身体有好处。"),
        ("还有呢？", "甲胎蛋白是一种蛋白质。"),
        fenced=True,
    )
    responder = scripted(
        {"肝癌筛查": [Reply(content=dialogue)], "肝癌治疗": [Reply(status=503), Reply(status=503), Reply(status=503)]},
        lambda body: Reply(content=qa_json(("怎么治？", "治疗方法包括手术切除、局部消融。"))),
    )
    out = tmp_path / "lit.json"
    kwargs = {
        "docs": str(docs),
        "output": str(out),
        "backend": "openai",
        "model": "fake",
        "api_key_env": api_env,
        "retry_base_delay": 0.001,
        "max_retries": 2,
    }
    with FakeOpenAI(responder) as server:
        bd.literature(**{**kwargs, "api_base": server.url})
        rows = json.loads(out.read_text(encoding="utf-8"))
        # Two grounded turns (the third is ungrounded, and the fourth builds on it): 2 single + 1 two-turn row.
        assert len(rows) == 3 and all(bd.dialogue_turns(row["instruction"]) for row in rows)
        assert "红酒" not in out.read_text(encoding="utf-8")
        assert (
            " <user>: 高危人群要做什么检查？ <bot>: 高危人群应该定期做肝脏超声和甲胎蛋白检查。 <user>: 甲胎蛋白是什么？"
            in {row["instruction"] for row in rows}
        )
        assert server.requests_mentioning("肝癌治疗") == 3  # the 503s used up the retries: skipped for now
        bd.literature(**{**kwargs, "api_base": server.url, "resume": True})
        rows = json.loads(out.read_text(encoding="utf-8"))
        assert len(rows) == 4 and server.requests_mentioning("肝癌筛查") == 1
        assert len({row["instruction"] for row in rows}) == 4
        before = len(server.requests)
        bd.literature(**{**kwargs, "api_base": server.url, "resume": True})
        assert len(server.requests) == before


# ----------------------------------------------------------------------------------------------------------------
# utils/llm.py


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ('[{"question": "q", "answer": "a"}]', [{"question": "q", "answer": "a"}]),
        ('```json\n[{"question": "q", "answer": "a"}]\n```', [{"question": "q", "answer": "a"}]),
        ("以下是结果：\n```\n[1, 2]\n```\n希望有帮助。", [1, 2]),
        ('好的：[{"question": "q", "answer": "a"}] 以上。', [{"question": "q", "answer": "a"}]),
        ("我不知道。", None),
        ('{"question": "q"}', None),
        ("[broken", None),
    ],
)
def test_extract_json_array(reply: str, expected: list | None) -> None:
    assert llm.extract_json_array(reply) == expected


def test_qa_pairs_drops_malformed_items() -> None:
    pairs, malformed = llm.qa_pairs(
        [{"question": "q", "answer": "a"}, {"question": "q"}, "x", {"question": " ", "answer": "a"}]
    )
    assert pairs == [("q", "a")] and malformed == 3


def test_backoff_grows_and_is_capped() -> None:
    config = llm.ChatConfig(model="m", retry_base_delay=1.0, max_retry_delay=5.0)
    delays = [llm.backoff_delay(attempt, config) for attempt in range(6)]
    assert 1.0 <= delays[0] <= 1.25 and 2.0 <= delays[1] <= 2.5 and all(d <= 6.25 for d in delays)
