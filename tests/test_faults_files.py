"""Fault injection, input files: every kind of bad file a user (or an attacker) can hand a script is one line,
and every valid file is read as it is.

Data files, templates and prediction files go through the scripts' real entry points in-process; they are read
before any weights load, so these cases cost milliseconds.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path

import pytest
from faultkit import assert_refused, assert_succeeded, assert_unchanged, cli, snapshot

import evaluate
import finetune
import infer
from utils.core.io import read_records
from utils.data import read_instruction_rows
from utils.llm import read_jsonl_tolerant

ROW = {"instruction": "高血压有哪些症状？", "output": "头痛、头晕。"}
LINE = json.dumps(ROW, ensure_ascii=False) + "\n"


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# (name, content, the key facts of the error line besides the file's name: the line or row, the field)
DATA_FILES = [
    ("utf16-bom.jsonl", codecs.BOM_UTF16_LE + LINE.encode("utf-16-le"), ["UTF-8", "iconv"]),
    ("utf16-no-bom.jsonl", LINE.encode("utf-16-be"), ["UTF-8", "iconv"]),
    ("utf32.jsonl", LINE.encode("utf-32"), ["UTF-8"]),
    ("gbk.jsonl", LINE.encode("gbk"), ["line 1", "UTF-8", "iconv -f GBK"]),
    ("latin1.jsonl", '{"instruction": "café", "output": "x"}\n'.encode("latin-1"), ["line 1", "0xe9"]),
    ("nested-array.json", nested(100_000), ["invalid JSON"]),
    ("nested-line.jsonl", '{"instruction": ' + nested(100_000) + "}\n", ["line 1"]),
    ("surrogate.jsonl", '{"instruction": "a\\ud800", "output": "b"}\n', ["line 1", "`instruction`"]),
    ("long-number.jsonl", '{"instruction": "a", "output": "b", "n": ' + "9" * 5000 + "}\n", ["line 1"]),
    ("nan.jsonl", '{"instruction": NaN, "output": "b"}\n', ["line 1", "`instruction`"]),
    ("control-char.jsonl", '{"instruction": "a\x00b", "output": "b"}\n', ["line 1"]),
    ("null-row.jsonl", "null\n", ["line 1"]),
    ("array-of-arrays.json", "[[1, 2]]", ["row 1"]),
    ("extra-data.json", json.dumps([ROW]) + " trailing", ["invalid JSON"]),
    ("empty.json", "", ["empty"]),
    ("blank.jsonl", "\n  \n\n", ["empty"]),
    ("no-rows.json", "[]", ["no rows"]),
    ("torn.jsonl", LINE + LINE[:20], ["line 2"]),
    ("no-output.jsonl", '{"instruction": "a"}\n', ["line 1", "`output`"]),
    ("list-instruction.jsonl", '{"instruction": ["a"], "output": "b"}\n', ["line 1", "`instruction`"]),
    ("empty-outputs.jsonl", '{"instruction": "a", "output": "  "}\n' * 4, ["`output`"]),
]


@pytest.fixture()
def train(tiny_llama, tmp_path, monkeypatch, capsys):
    """finetune.py on a data file: the rows are read (and refused) before any weights load."""

    def run(data: Path | str, *extra: str):
        return cli(finetune.main, "--base_model", tiny_llama, "--data_path", data, "--output_dir",
                   tmp_path / "out", "--max_steps", "1", "--batch_size", "4", "--micro_batch_size", "4",
                   "--val_set_size", "0", *extra, monkeypatch=monkeypatch, capsys=capsys)

    return run


@pytest.mark.parametrize("name, content, expected", DATA_FILES, ids=[case[0] for case in DATA_FILES])
def test_bad_data_file(name, content, expected, train, tmp_path):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    before = snapshot(tmp_path)
    outcome = train(path)
    assert_unchanged(before, tmp_path)
    assert_refused(outcome, name, *expected)


@pytest.mark.parametrize("kind", ["folder", "missing", "device", "fifo", "symlink-loop"])
def test_a_data_path_that_is_no_file(kind, train, tmp_path):
    path = {"folder": tmp_path, "missing": tmp_path / "nope.json", "device": Path("/dev/zero")}.get(kind)
    if kind == "fifo":
        path = tmp_path / "pipe"
        __import__("os").mkfifo(path)  # reading a FIFO nobody writes to would wait forever
    if kind == "symlink-loop":
        path = tmp_path / "loop"
        path.symlink_to(path)
    assert_refused(train(path), str(path))


# --- templates -----------------------------------------------------------------------------------------------------

# (case, template, the key facts of the error line besides the template's file: the key at fault)
TEMPLATES = [
    ("format spec", {"prompt_no_input": "{instruction:d}", "response_split": "###"}, ["`prompt_no_input`"]),
    ("huge width", {"prompt_no_input": "{instruction:>99999999999}", "response_split": "###"}, ["`prompt_no_input`"]),
    ("attribute", {"prompt_no_input": "{instruction.__class__}", "response_split": "###"}, ["`prompt_no_input`"]),
    ("index", {"prompt_no_input": "{instruction[0]}", "response_split": "###"}, ["`prompt_no_input`"]),
    ("positional", {"prompt_no_input": "{} {instruction}", "response_split": "###"}, ["`prompt_no_input`"]),
    ("unbalanced", {"prompt_no_input": "{instruction", "response_split": "###"}, ["`prompt_no_input`"]),
    ("no instruction", {"prompt_no_input": "hello", "response_split": "###"}, ["`prompt_no_input`"]),
    ("not a string", {"prompt_no_input": 3, "response_split": "###"}, ["`prompt_no_input`"]),
    ("missing split", {"prompt_no_input": "{instruction}"}, ["`response_split`"]),
    ("a list", [1], []),
    ("not JSON", "{oops", []),
    ("nested", nested(100_000), []),
    ("GBK", '{"prompt_no_input": "问题：{instruction}", "response_split": "回答"}'.encode("gbk"), ["UTF-8"]),
]


@pytest.mark.parametrize("name, template, expected", TEMPLATES, ids=[case[0] for case in TEMPLATES])
def test_bad_template(name, template, expected, train, train_file, tmp_path):
    path = tmp_path / "template.json"
    if isinstance(template, bytes):
        path.write_bytes(template)
    else:
        path.write_text(template if isinstance(template, str) else json.dumps(template), encoding="utf-8")
    assert_refused(train(train_file, "--prompt_template_name", path), str(path), *expected)


# --- valid files are read as they are -----------------------------------------------------------------------------


def test_line_separators_inside_strings_are_valid_json_lines(tmp_path):
    """U+2028, U+2029 and U+0085 are valid inside JSON strings (build_dataset.py writes them as they come): the reader
    splits JSON Lines on \\n only, so the row stays whole and its text unchanged."""
    text = "第一段\u2028第二段\u2029第三段\u0085完"
    path = tmp_path / "separators.jsonl"
    path.write_text(json.dumps({"instruction": text, "output": text}, ensure_ascii=False) + "\n" + LINE,
                    encoding="utf-8")
    rows = read_instruction_rows(path)
    assert len(rows) == 2 and rows[0]["instruction"] == text and rows[0]["output"] == text


@pytest.mark.parametrize("variant", ["bom", "crlf", "one-object", "array", "blank-lines", "extra-fields"])
def test_valid_variants_are_read(variant, tmp_path, monkeypatch, capsys):
    """A UTF-8 BOM, Windows line ends, one object, a JSON array, blank lines, extra fields: all read, through the
    whole evaluate.py command."""
    row = {**ROW, "model_output": "头痛。"}
    line = json.dumps(row, ensure_ascii=False)
    content = {
        "bom": codecs.BOM_UTF8 + (line + "\n").encode(),
        "crlf": (line + "\r\n" + line + "\r\n").encode(),
        "one-object": line.encode(),
        "array": json.dumps([row, row], ensure_ascii=False).encode(),
        "blank-lines": ("\n" + line + "\n\n" + line + "\n\n").encode(),
        "extra-fields": (json.dumps({**row, "meta": {"source": "x"}, "id": 3}, ensure_ascii=False) + "\n").encode(),
    }[variant]
    path = tmp_path / "predictions.jsonl"
    path.write_bytes(content)
    outcome = cli(evaluate.main, "--predictions", path, monkeypatch=monkeypatch, capsys=capsys)
    assert_succeeded(outcome)
    assert json.loads(outcome.out)["rows"] == len(read_records(path)) >= 1


# --- append-only sidecars (progress, judge cache) -----------------------------------------------------------------


def test_a_sidecar_torn_anywhere_is_read_without_the_torn_line(tmp_path):
    good = [{"key": f"k{i}", "text": "肝癌\u2028筛查"} for i in range(3)]
    whole = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in good).encode("utf-8")
    for cut in range(len(whole) - 1, len(whole) - 40, -1):  # cut in every place of the last line, mid-UTF-8 too
        path = tmp_path / f"progress-{cut}.jsonl"
        path.write_bytes(whole[:cut])
        rows = read_jsonl_tolerant(path)
        assert rows == good[: len(rows)] and len(rows) >= 2
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_bytes(whole + b"\xff\xfe{not json\n" + b'{"n": ' + b"9" * 5000 + b"}\n" + b"[" * 100_000 + b"\n")
    assert read_jsonl_tolerant(garbage) == good


# --- the same readers behind infer.py and evaluate.py -------------------------------------------------------------


@pytest.mark.parametrize("content, expected", [
    ('{"instruction": 1}\n', "`instruction`"),
    ('{"input": "x"}\n', "`instruction`"),
    ("高血压\n".encode("gbk"), "UTF-8"),
    (nested(50_000), "questions.jsonl"),
], ids=["int", "missing", "gbk", "nested"])
def test_bad_questions_for_infer_before_the_model_loads(content, expected, tmp_path, monkeypatch, capsys):
    path = tmp_path / "questions.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    line = assert_refused(cli(infer.main, "--base_model", "./no/such/model", "--use_lora", "False", "--instruct_dir",
                              path, monkeypatch=monkeypatch, capsys=capsys), expected)
    assert "no/such/model" not in line  # the questions were read first, before anything of the model


@pytest.mark.parametrize("content, expected", [
    ('{"instruction": "q", "output": "a"}\n', "`model_output`"),
    ('{"instruction": "q", "output": 3, "model_output": "a"}\n', "`output`"),
    ('{"instruction": "q", "output": "a", "model_output": ' + "9" * 5000 + "}\n", "line 1"),
], ids=["no-answer", "int-golden", "long-number"])
def test_bad_predictions_for_evaluate(content, expected, tmp_path, monkeypatch, capsys):
    path = tmp_path / "predictions.jsonl"
    path.write_text(content, encoding="utf-8")
    metrics = tmp_path / "metrics.json"
    metrics.write_text("{}", encoding="utf-8")
    before = snapshot(tmp_path)
    outcome = cli(evaluate.main, "--predictions", path, "--output", metrics, monkeypatch=monkeypatch, capsys=capsys)
    assert_unchanged(before, tmp_path)
    assert_refused(outcome, expected)


# --- standard input of the literature chat -------------------------------------------------------------------------


@pytest.fixture()
def chat(tiny_llama, monkeypatch, capsys):
    """`infer_literature.py --single_or_multi multi` with `stdin` (bytes) piped in."""
    import io
    import sys

    import infer_literature

    def run(stdin: bytes, *extra: str):
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
        return cli(infer_literature.main, "--base_model", tiny_llama, "--use_lora", "False", "--single_or_multi",
                   "multi", "--max_new_tokens", "2", "--num_beams", "1", *extra, monkeypatch=monkeypatch,
                   capsys=capsys)

    return run


def test_a_literature_question_longer_than_the_context_gets_a_note(chat):
    """The tiny model's context is 1,024 tokens: a 3,000-character question cannot be answered; it is named in a
    note (not a transformers reminder), and the chat goes on with the next question."""
    outcome = chat(("肝" * 3000 + "\n甲胎蛋白升高一定是肝癌吗？\n").encode("utf-8"))
    assert_succeeded(outcome)
    notes = [line for line in outcome.err.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and "takes more than the" in notes[0] and "shorten it" in notes[0]
    assert "friendly reminder" not in outcome.err  # nothing past the context was sent to generate
    assert outcome.out.count("Response:") == 1 and "甲胎蛋白升高一定是肝癌吗？" in outcome.out


def test_gbk_on_standard_input_is_one_line(chat):
    outcome = chat("肝癌有哪些危险因素？\n".encode("gbk"))
    assert_refused(outcome, "standard input line 1", "UTF-8")
