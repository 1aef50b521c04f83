"""build_dataset.py as a user runs it: the committed data reproduces byte for byte and meets its targets, the
literature dialogues are composed and well formed, every bad input or option is one `error:` line (exit 2, no
traceback, nothing written), a second run into the same output is refused, the split and the datasets export."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from builder_support import read_jsonl
from in_process import run_main

import build_dataset as bd
from utils.builder.literature import dialogue_turns, split_sentences
from utils.builder.report import duplicate_rate
from utils.builder.safety import bigrams, contentless, dose_or_frequency, dosing, jaccard
from utils.core.cli import run_cli
from utils.core.io import RunLock

ROOT = Path(__file__).resolve().parents[1]
KB = "data/knowledge_base.jsonl"
DOCS = "data_literature/documents.jsonl"
COMMANDS = {"knowledge": bd.knowledge, "literature": bd.literature}


def build(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "build_dataset.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, check=False, env={**os.environ, "PYTHONIOENCODING": "utf-8"})


def cli(*argv: str, **_: object) -> tuple[int, str, str]:
    """`python build_dataset.py argv...` in-process: (exit code, stdout, stderr)."""
    result = run_main(COMMANDS, *argv)
    return result.returncode, result.stdout, result.stderr


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("rebuilt")
    result = build("knowledge", "--kb", KB, "--output", str(folder / "llama_data.json"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "(read back and checked)" in result.stdout
    return folder


def test_committed_data_regenerates_byte_for_byte(rebuilt: Path) -> None:
    for name in ("llama_data.json", "llama_data.json.report.json"):
        assert (rebuilt / name).read_bytes() == (ROOT / "data" / name).read_bytes(), (
            f"data/{name} is stale: run `python build_dataset.py knowledge --kb {KB} --output data/llama_data.json`")


def test_committed_data_meets_its_targets() -> None:
    rows = read_jsonl(ROOT / "data" / "llama_data.json")
    assert 1500 <= len(rows) <= 6000  # small enough for the tiny default model; each fact once
    assert duplicate_rate([row["output"] for row in rows]) <= 0.05
    assert duplicate_rate([row["instruction"] for row in rows]) == 0
    assert not [row for row in rows if contentless(row["output"], row["meta"]["entities"])]
    assert not [row for row in rows if dose_or_frequency(row["output"])]
    evaluation = [json.loads(line)["instruction"] for line in (ROOT / "data" / "infer.json").read_text().splitlines()]
    for row in rows:
        assert set(row) == {"instruction", "input", "output", "meta"}
        assert row["meta"]["kind"] and row["meta"]["entities"]
        grams = bigrams(row["instruction"])
        assert all(jaccard(grams, bigrams(question)) < 0.8 for question in evaluation), row["instruction"]
    report = json.loads((ROOT / "data" / "llama_data.json.report.json").read_text(encoding="utf-8"))
    assert report["metrics"]["rows"] == len(rows) and report["exclude_questions"].endswith("data/infer.json")
    lint = report["lint"]
    assert {name: lint[name] for name in ("alarm_sign_without_120", "dose_or_interval", "invented_reassurance",
                                          "single_diagnosis_from_few_nonspecific_symptoms", "tautology", "excipient",
                                          "evaluation_pairs", "contentless")} == dict.fromkeys(
        ("alarm_sign_without_120", "dose_or_interval", "invented_reassurance",
         "single_diagnosis_from_few_nonspecific_symptoms", "tautology", "excipient", "evaluation_pairs",
         "contentless"), 0)
    assert lint["restated_share"] <= 0.10 and report["entities"]["without_rows"]["total"] == 0


def test_evaluation_questions_stay_out_of_the_committed_data_by_entity_and_relation() -> None:
    """Reworded evaluation questions are leaks too: no committed row answers the (entity, relation) an evaluation
    question asks (肝硬化's or 2型糖尿病's complications), read off the eval file independently of the report."""
    rows = read_jsonl(ROOT / "data" / "llama_data.json")
    about = {(row["meta"]["entities"][0], row["meta"].get("relation", "").split("+")[-1]) for row in rows}
    asked = (("肝硬化", "complication"), ("2型糖尿病", "complication"), ("慢性乙型肝炎", "complication"),
             ("高血压", "cause"), ("缺铁性贫血", "cause"))
    for entity, relation in asked:
        assert (entity, relation) not in about, (entity, relation)
    assert ("高血压", "symptom") in about  # what no evaluation question asks stays


def test_progress_bars_only_on_a_terminal(tmp_path: Path) -> None:
    """A log (stderr not a terminal) gets one plain line per long phase, never tqdm's carriage-return redraws."""
    result = build("knowledge", "--kb", KB, "--output", str(tmp_path / "rows.json"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "\r" not in result.stderr and "building rows: 249/249 entities" in result.stderr
    assert "near duplicates:" in result.stderr


def test_the_own_knowledge_base_uses_its_relations_as_meant() -> None:
    entities = [json.loads(line) for line in (ROOT / KB).read_text(encoding="utf-8").splitlines()]
    assert not [entity["中心词"] for entity in entities if "辅助治疗" in entity]
    primary = {"经动脉化疗栓塞", "时间窗内静脉溶栓或血管内取栓", "血液透析", "腹膜透析"}
    assert all(not primary & set(entity.get("一般治疗", [])) for entity in entities)
    liver = next(entity for entity in entities if entity["中心词"] == "原发性肝癌")
    assert "经动脉化疗栓塞" in liver["治疗"]


def test_literature_regenerates_and_is_composed_without_empty_turns(tmp_path: Path) -> None:
    out = tmp_path / "liver_cancer.json"
    result = build("literature", "--docs", DOCS, "--output", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert out.read_bytes() == (ROOT / "data_literature" / "liver_cancer.json").read_bytes()
    rows = json.loads(out.read_text(encoding="utf-8"))
    texts = [json.loads(line)["text"] for line in (ROOT / DOCS).read_text(encoding="utf-8").splitlines()]
    sentences = {sentence for text in texts for sentence in split_sentences(text)}
    composed = 0
    for row in rows:
        turns = dialogue_turns(row["instruction"])
        assert turns is not None and row["input"] == "", row
        users = [text for role, text in turns if role == "user"]
        for text in users[1:]:
            assert not text.startswith(("你好", "您好", "医生您好")), row["instruction"]  # no greeting mid-dialogue
        assert all("还有什么需要了解" not in text and len(text) >= 5 for text in users)  # no empty follow-up
        pieces = split_sentences(row["output"])
        assert all(piece in sentences for piece in pieces), row["output"]  # composed of the document's sentences
        composed += len(pieces) >= 2
    assert composed >= 0.7 * len(rows)
    assert sum(len(dialogue_turns(row["instruction"])) > 1 for row in rows) >= 20
    # the report and the data agree: a screening interval ("每六个月左右复查一次") is no dose, a dose would be one
    report = json.loads((ROOT / "data_literature" / "liver_cancer.json.report.json").read_text(encoding="utf-8"))
    assert report["metrics"]["rows_with_dose_or_interval"] == 0
    assert any("复查一次" in row["output"] for row in rows) and not [row for row in rows if dosing(row["output"])]


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (['{"中心词": "甲病", "相关症状": ["发热"]}', '{"中心词": "乙病", "相关症状": ["发热"'],
         "line 2: invalid JSON"),
        (['{"中心词": "甲病", "相关症状": ["发热"]}', '{"相关症状": ["咳嗽"]}'], "line 2: missing `中心词`"),
        (['{"中心词": "甲病", "相关症状": "发热"}'],
         "relation `相关症状` of `甲病` must be a list of strings, got a string"),
        (['{"中心词": "甲病", "相关症状": ["发热", 3]}'], "must be a list of strings, it holds a number"),
        (['{"中心词": "甲病"}', '{"中心词": "甲病"}'], "`甲病` is already defined at line 1"),
    ],
    ids=["malformed-line", "missing-center", "non-list-value", "non-string-item", "duplicate"],
)
def test_a_bad_knowledge_base_is_one_clear_line(tmp_path: Path, lines: list[str], expected: str,
                                                monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    kb = tmp_path / "kb.jsonl"
    kb.write_text("\n".join(lines) + "\n", encoding="utf-8")
    code, _, err = cli("knowledge", "--kb", str(kb), "--output", str(tmp_path / "out.json"),
                       monkeypatch=monkeypatch, capsys=capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "out.json").exists()


@pytest.mark.parametrize(("argv", "expected"), [
    (["--max_retries", "-1"], "--max_retries"),
    (["--timeout", "0"], "--timeout"),
    (["--timeout", "-5"], "--timeout"),
    (["--timeout", "abc"], "--timeout"),
    (["--concurrency", "0"], "--concurrency"),
    (["--backend", "gpt"], "--backend"),
    (["--val_fraction", "1.5"], "--val_fraction"),
    (["--near_duplicate", "nan"], "--near_duplicate"),
    (["--per_entiti", "3"], "--per_entity"),
    (["--prompt_kinds", "facts,jokes"], "jokes"),
    (["--backend", "openai"], "--model"),
    (["--kb", "missing.jsonl"], "missing.jsonl"),
    (["--exclude_questions", "nope.json"], "nope.json"),
], ids=lambda value: value if isinstance(value, str) else "-".join(value)[:30])
def test_every_bad_option_is_one_clear_line(argv: list[str], expected: str, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    base = {"--kb": KB, "--output": str(tmp_path / "out.json")}
    for flag, value in zip(argv[::2], argv[1::2], strict=True):
        base[flag] = value
    args = [item for pair in base.items() for item in pair]
    code, _, err = cli("knowledge", *args, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    assert "Traceback" not in err and not (tmp_path / "out.json").exists()


class RunsCode:
    """Unpickling this would call os.system (it creates a marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_an_evil_pickle_as_kb_is_one_error_line_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"甲病": {"常见症状": ["发热"]}, "x": RunsCode(marker)}))
    result = build("knowledge", "--kb", str(evil), "--output", str(tmp_path / "out.json"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert f"{evil}: refused to unpickle: it refers to" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists() and not (tmp_path / "out.json").exists()


def test_a_folder_as_output_and_a_second_run_into_one_output_are_refused(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch,
                                                                         capsys) -> None:
    code, _, err = cli("knowledge", "--kb", KB, "--output", str(tmp_path), monkeypatch=monkeypatch, capsys=capsys)
    assert code == 2 and "is a folder, expected a file name" in err
    out = tmp_path / "rows.json"
    with RunLock(f"{out}.lock", f"--output {out}"):
        code, _, err = cli("knowledge", "--kb", KB, "--output", str(out), monkeypatch=monkeypatch, capsys=capsys)
    assert code == 2 and err.count("\n") == 1 and "is in use by another run (pid" in err and not out.exists()


def test_a_pickled_graph_a_validation_split_and_a_datasets_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys) -> None:
    graph = {
        "甲病": {"常见症状": ["咳嗽", "咳痰", "盗汗"], "就诊科室": ["呼吸内科"], "检查": ["胸部CT"], "ICD10": ["A15"],
               "奇怪的谓词": ["某值"]},
        "乙病": {"常见症状": ["咳嗽", "咳痰", "咯血"], "就诊科室": ["呼吸内科"], "常见病因": ["吸烟"]},
        "甲药": {"适应症": ["甲病"], "不良反应": ["恶心", "肝损害"], "禁忌": ["孕妇禁用"], "规格": ["0.5g"]},
    }
    kb = tmp_path / "graph.pkl"
    kb.write_bytes(pickle.dumps(graph))
    out = tmp_path / "rows.json"
    code, printed, err = cli("knowledge", "--kb", str(kb), "--output", str(out), "--val_fraction", "0.25",
                             "--hf_dataset", str(tmp_path / "hf"), "--exclude_questions", "none",
                             monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err
    train, validation = read_jsonl(out), read_jsonl(tmp_path / "rows.val.json")
    assert train and validation and not {r["instruction"] for r in train} & {r["instruction"] for r in validation}
    report = json.loads((tmp_path / "rows.json.report.json").read_text(encoding="utf-8"))
    assert report["predicates"]["unmapped"]["top"] == {"奇怪的谓词": 1}  # counted, not turned into rows
    assert report["predicates"]["ignored"]["top"] == {"ICD10": 1, "规格": 1}
    assert report["split"] == {"train": len(train), "validation": len(validation)}
    assert "某值" not in out.read_text(encoding="utf-8") and "0.5g" not in out.read_text(encoding="utf-8")
    from datasets import load_from_disk

    exported = load_from_disk(str(tmp_path / "hf"))
    assert exported["train"].num_rows == len(train) and exported["validation"].num_rows == len(validation)
    assert json.loads(exported["train"][0]["meta"])["kind"]
    assert printed.strip().splitlines()[-2].startswith(f"wrote {len(train)} rows to {out}")


GRAPH_LINE = json.dumps({"中心词": "甲病", "类型": "疾病", "相关症状": ["发热", "咳嗽", "咯血"],
                         "就诊科室": ["呼吸内科"]}, ensure_ascii=False) + "\n"


@pytest.mark.parametrize("case", ["hf folder with other files", "hf folder holds the output", "hf folder is .",
                                  "kb is the validation split", "kb is the report"])
def test_the_files_a_build_writes_never_replace_an_input_or_other_files(case: str, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        capsys) -> None:
    """Every file the build writes beside --output (report, validation split) and the --hf_dataset folder (replaced
    as a whole) are checked against the inputs and against other files before any work."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "thesis.tex").write_text("my thesis", encoding="utf-8")
    kb, out, hf, extra = tmp_path / "kb.jsonl", tmp_path / "rows.jsonl", None, []
    if case == "hf folder with other files":
        hf = tmp_path / "papers"
        hf.mkdir()
        (hf / "draft.tex").write_text("keep me", encoding="utf-8")
    elif case == "hf folder holds the output":
        hf = tmp_path
    elif case == "hf folder is .":
        hf = Path(".")
    elif case == "kb is the validation split":
        kb, extra = tmp_path / "rows.val.jsonl", ["--val_fraction", "0.3"]
    else:
        kb = tmp_path / "rows.jsonl.report.json"
    kb.write_text(GRAPH_LINE, encoding="utf-8")
    before = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    argv = ["knowledge", "--kb", str(kb), "--output", str(out), "--exclude_questions", "none", *extra]
    code, _, err = cli(*argv, *(["--hf_dataset", str(hf)] if hf is not None else []), monkeypatch=monkeypatch,
                       capsys=capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()} == before


def test_a_build_whose_every_row_is_filtered_out_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys) -> None:
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"title": "空", "text": ""}, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    out = tmp_path / "dialogues.json"
    code, printed, err = cli("literature", "--docs", str(docs), "--output", str(out), monkeypatch=monkeypatch,
                             capsys=capsys)
    assert code == 2 and "no rows survived" in err and "wrote" not in printed and not out.exists()


def test_a_long_document_of_one_repeated_sentence_builds_in_seconds() -> None:
    """Each turn's answer is chosen from sentences indexed once per topic and stops when full: 20,000 copies of a
    sentence took minutes when every turn scanned the whole document."""
    import time

    from utils.builder.literature import Document, document_turns

    sentence = "原发性肝癌是指起源于肝脏本身细胞的恶性肿瘤。"
    started = time.monotonic()
    turns = document_turns(Document(title="repeat", text=sentence * 20_000), seed=42)
    assert len(turns) == 20_000 and time.monotonic() - started < 20


def test_help_lists_each_flag_with_its_comment(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", ["build_dataset.py", "knowledge", "--help"])
    run_cli(COMMANDS)
    text = capsys.readouterr().out
    for field in dataclasses.fields(bd.KnowledgeArgs):  # the shared openai flags included
        assert f"--{field.name}" in text and field.metadata["help"][:25] in text.replace("\n", " ")
