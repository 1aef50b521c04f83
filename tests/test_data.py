import json

import pytest
from conftest import reference_file

from utils.core.errors import UserError
from utils.data import IGNORE_INDEX, load_instruction_dataset, read_instruction_rows, tokenize_dataset, tokenize_row
from utils.model.loading import load_tokenizer
from utils.prompter import Prompter

ROWS = [
    {"instruction": "高血压有哪些症状？", "input": "", "output": "可有头痛、头晕，很多人没有症状。", "id": 7},
    {"instruction": "解释这个指标", "output": "糖化血红蛋白反映近2至3个月的平均血糖。"},
]


def test_reads_json_lines_and_json_array(tmp_path):
    lines = tmp_path / "rows.jsonl"
    lines.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in ROWS) + "\n\n", encoding="utf-8")
    array = tmp_path / "rows.json"
    array.write_text(json.dumps(ROWS, ensure_ascii=False), encoding="utf-8")
    expected = [
        {"instruction": ROWS[0]["instruction"], "input": "", "output": ROWS[0]["output"]},
        {"instruction": ROWS[1]["instruction"], "input": "", "output": ROWS[1]["output"]},
    ]
    assert read_instruction_rows(lines) == expected  # input optional, extra keys dropped
    assert read_instruction_rows(array) == expected
    dataset = load_instruction_dataset(array)
    assert dataset.column_names == ["instruction", "input", "output"] and len(dataset) == 2


def test_published_files_load_as_they_are():
    assert len(read_instruction_rows(reference_file("llama_data.json"))) == 8658
    assert len(read_instruction_rows(reference_file("liver_cancer.json"))) == 1000  # some rows carry an extra `id`


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"instruction": "a", "output": "b"}\n{"instruction": "a" "output": "b"}\n', "line 2: invalid JSON"),
        ('[{"instruction": "a", "output": "b"}, {"instruction": "c"}]', "row 2: missing field `output`"),
        ('{"instruction": 3, "output": "b"}\n', "line 1: field `instruction` must be a string, got int"),
        ("", "the file is empty"),
        ("[1, 2]", "row 1: expected a JSON object"),
    ],
)
def test_bad_rows_name_the_place(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError) as error:
        read_instruction_rows(path)
    assert message in str(error.value) and str(path) in str(error.value)


def test_not_utf8_and_missing_file(tmp_path):
    path = tmp_path / "gbk.json"
    path.write_bytes('{"instruction": "高血压", "output": "头痛"}'.encode("gbk"))
    with pytest.raises(UserError, match="not UTF-8.*re-encode"):
        read_instruction_rows(path)
    with pytest.raises(UserError, match="no such file"):
        read_instruction_rows(tmp_path / "absent.json")


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return load_tokenizer(str(tiny_llama))


def test_prompt_is_masked_and_eos_appended(tokenizer):
    prompter = Prompter("med_template")
    row = {"instruction": "高血压有哪些症状？", "input": "", "output": "可有头痛、头晕。"}
    item = tokenize_row(row, prompter, tokenizer, cutoff_len=256)
    prompt_ids = tokenizer(prompter.generate_prompt(row["instruction"]))["input_ids"]
    full_ids = tokenizer(prompter.generate_prompt(row["instruction"], label=row["output"]))["input_ids"]
    assert item.input_ids == full_ids + [tokenizer.eos_token_id]
    assert item.labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert item.labels[len(prompt_ids):] == item.input_ids[len(prompt_ids):]
    assert tokenizer.decode(item.labels[len(prompt_ids):-1]) == row["output"]
    assert not item.truncated

    with_inputs = tokenize_row(row, prompter, tokenizer, cutoff_len=256, train_on_inputs=True)
    assert with_inputs.labels == with_inputs.input_ids


def test_truncation_is_counted_and_empty_rows_dropped(tokenizer):
    from datasets import Dataset

    prompter = Prompter("med_template")
    long_answer = {"instruction": "问", "input": "", "output": "很长的回答。" * 100}
    long_prompt = {"instruction": "很长的问题" * 100, "input": "", "output": "答"}
    short = {"instruction": "问", "input": "", "output": "答"}
    dataset = Dataset.from_list([long_answer, long_prompt, short])
    encoded, report = tokenize_dataset(dataset, prompter, tokenizer, cutoff_len=64, train_on_inputs=False, label="t")
    assert report == {"rows": 3, "truncated": 2, "dropped_no_target": 1, "empty_outputs": 0}
    assert len(encoded) == 2 and all(len(ids) <= 64 for ids in encoded["input_ids"])
    cut = tokenize_row(long_answer, prompter, tokenizer, cutoff_len=64)
    assert cut.truncated and len(cut.input_ids) == 64

    with pytest.raises(UserError, match="--cutoff_len 64"):
        tokenize_dataset(Dataset.from_list([long_prompt]), prompter, tokenizer, 64, False, "training")
    with pytest.raises(UserError, match="`output`"):
        tokenize_dataset(Dataset.from_list([{**short, "output": ""}, {**short, "output": " "}]), prompter, tokenizer,
                         64, False, "training")
