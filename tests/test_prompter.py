import hashlib
import json
import os
from pathlib import Path

import pytest
from conftest import REFERENCE, REPO, project_rows, reference_file

from utils.core.errors import UserError
from utils.generation.dialogue import render_dialogue
from utils.prompter import PUBLISHED_SHA256, Prompter, available_templates

PUBLISHED = ("med_template", "bloom_deploy", "literature_template", "alpaca")
PROMPT_KEYS = ("prompt_input", "prompt_no_input", "response_split")


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def our_template(name: str) -> dict:
    return json.loads((REPO / "templates" / f"{name}.json").read_text(encoding="utf-8"))


# --- compatibility with the published prompts: on any clone (hashes), and byte for byte where ../shared is ---------


def test_every_published_template_has_its_hashes():
    assert set(PUBLISHED_SHA256) == set(PUBLISHED)


@pytest.mark.parametrize("name", PUBLISHED)
def test_prompt_strings_hash_to_the_published_ones(name):
    """Runs on a plain clone: the strings the published adapters were trained on, by their SHA-256."""
    ours = our_template(name)
    assert {key for key in PROMPT_KEYS if key in ours} == set(PUBLISHED_SHA256[name])  # no key added or dropped
    for key, digest in PUBLISHED_SHA256[name].items():
        assert sha256(ours[key]) == digest, f"templates/{name}.json `{key}` is not the published string"


def test_a_changed_prompt_string_is_caught(tmp_path):
    """The hash check is not vacuous: one character more in med_template no longer matches."""
    edited = our_template("med_template")["prompt_no_input"].replace("### 回答:", "### 回答：")
    assert sha256(edited) != PUBLISHED_SHA256["med_template"]["prompt_no_input"]


@pytest.mark.skipif(not REFERENCE.is_dir(), reason="../shared/reference/bentsao is absent: the hashes above cover it")
@pytest.mark.parametrize("name", PUBLISHED)
def test_embedded_hashes_are_those_of_the_published_files(name):
    published = json.loads(reference_file(f"templates/{name}.json").read_text(encoding="utf-8"))
    assert {key: sha256(published[key]) for key in PROMPT_KEYS if key in published} == PUBLISHED_SHA256[name]


@pytest.mark.parametrize("name", PUBLISHED)
def test_renders_as_the_published_scripts_did(name):
    """Runs on a plain clone: with the hash-checked strings, Prompter renders each row as the published scripts'
    `template[...].format(...)` did (rows with and without input, and literature dialogues), byte for byte."""
    template = our_template(name)
    rows = [{**row, "input": row.get("input") or ""} for row in project_rows()]
    rows.append({"instruction": "解释这个化验结果", "input": "白细胞 12×10⁹/L，{不是占位符}", "output": "提示感染。"})
    rows.append({"instruction": render_dialogue([("肝癌有哪些危险因素？", "乙肝病毒感染。")], "怎么筛查？"),
                 "input": "", "output": "超声加甲胎蛋白。"})
    prompter = Prompter(name)
    for row in rows:
        if row["input"] and "{input}" not in template.get("prompt_input", ""):
            continue  # a template without {input}: the input goes on a new line (tested below), not in the original
        expected = published_render(template, row["instruction"], row["input"]) + row["output"]
        assert prompter.generate_prompt(row["instruction"], row["input"], row["output"]).encode() == expected.encode()


def published_render(template: dict, instruction: str, input: str | None = None) -> str:
    """How the published scripts rendered a prompt (format the chosen string with the row)."""
    if input:
        return template["prompt_input"].format(instruction=instruction, input=input)
    return template["prompt_no_input"].format(instruction=instruction)


@pytest.mark.parametrize("name", PUBLISHED)
def test_prompt_strings_are_the_published_ones(name):
    published = json.loads(reference_file(f"templates/{name}.json").read_text(encoding="utf-8"))
    ours = json.loads((REPO / "templates" / f"{name}.json").read_text(encoding="utf-8"))
    for key in ("prompt_input", "prompt_no_input", "response_split"):
        assert ours.get(key) == published.get(key), key


@pytest.mark.parametrize("name", PUBLISHED)
def test_renders_published_data_byte_for_byte(name):
    published = json.loads(reference_file(f"templates/{name}.json").read_text(encoding="utf-8"))
    rows = [
        json.loads(line) for line in reference_file("llama_data.json").read_text(encoding="utf-8").splitlines()[:50]
    ]
    rows += json.loads(reference_file("liver_cancer.json").read_text(encoding="utf-8"))[:50]
    prompter = Prompter(name)
    for row in rows:
        expected = published_render(published, row["instruction"], row["input"]) + row["output"]
        assert prompter.generate_prompt(row["instruction"], row["input"], row["output"]).encode() == expected.encode()


def test_alpaca_with_input_matches_published():
    published = json.loads(reference_file("templates/alpaca.json").read_text(encoding="utf-8"))
    got = Prompter("alpaca").generate_prompt("Summarise.", "Aspirin inhibits COX enzymes.")
    assert got == published_render(published, "Summarise.", "Aspirin inhibits COX enzymes.")


@pytest.mark.parametrize("name", ["med_template", "bloom_deploy", "literature_template"])
def test_input_reaches_prompt_when_template_drops_it(name):
    prompt = Prompter(name).generate_prompt("这个检查结果说明什么？", "空腹血糖 7.8 mmol/L")
    assert "这个检查结果说明什么？" in prompt and "空腹血糖 7.8 mmol/L" in prompt


def test_ori_template_is_the_bare_instruction():
    prompter = Prompter("ori_template")
    assert prompter.generate_prompt("感冒了怎么办？") == "感冒了怎么办？"
    assert prompter.generate_prompt("解释", "血常规") == "解释\n血常规"
    assert prompter.get_response("感冒了怎么办？多喝水") == "感冒了怎么办？多喝水"


def test_every_shipped_template_loads():
    assert {"med_template", "bloom_deploy", "literature_template", "alpaca", "ori_template"} <= set(
        available_templates()
    )
    for name in available_templates():
        if Prompter(name).chat:  # rendered by a tokenizer's own template: tests/test_chat_template.py
            continue
        prompt = Prompter(name).generate_prompt("问题", None, "回答")
        assert "问题" in prompt and prompt.endswith("回答")


def test_lookup_does_not_depend_on_current_directory(tmp_path):
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert Prompter("med_template").response_split == "### 回答:"
    finally:
        os.chdir(cwd)


def test_template_path(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"prompt_no_input": "Q: {instruction}\nA: ", "response_split": "A:"}), encoding="utf-8")
    prompter = Prompter(str(path))
    assert prompter.generate_prompt("hi") == "Q: hi\nA: "
    assert prompter.generate_prompt("hi", "more") == "Q: hi\nmore\nA: "


def test_get_response():
    prompter = Prompter("med_template")
    text = prompter.generate_prompt("高血压的症状？", label="头痛、头晕。")
    assert prompter.get_response(text) == "头痛、头晕。"
    assert prompter.get_response("no marker here") == "no marker here"  # never an IndexError


@pytest.mark.parametrize(
    "content, message",
    [
        ({"prompt_input": "{instruction}", "response_split": "x"}, "missing key `prompt_no_input`"),
        ({"prompt_no_input": "{instruction}"}, "missing key `response_split`"),
        ({"prompt_no_input": "{instruction} {question}", "response_split": "x"}, "unknown placeholder {question}"),
        ({"prompt_no_input": "no placeholder", "response_split": "x"}, "no {instruction} placeholder"),
        ({"prompt_no_input": "{instruction", "response_split": "x"}, "not a valid format string"),
    ],
)
def test_bad_template_is_one_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(content), encoding="utf-8")
    with pytest.raises(UserError) as error:
        Prompter(str(path))
    assert message in str(error.value)
    assert "med_template" in str(error.value)  # lists the available templates


def test_unknown_name_lists_available():
    with pytest.raises(UserError) as error:
        Prompter("med_templat")
    assert "med_templat" in str(error.value)
    for name in ("med_template", "alpaca", "ori_template"):
        assert name in str(error.value)


def test_missing_template_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        Prompter(str(Path(tmp_path) / "nope.json"))


def test_multi_turn_is_declared_by_the_template_not_guessed_from_its_name(tmp_path):
    assert our_template("literature_template").get("multi_turn") is True
    assert Prompter("literature_template").multi_turn and not Prompter("med_template").multi_turn
    copy = {key: value for key, value in our_template("literature_template").items() if key != "multi_turn"}
    (tmp_path / "literature_template_mine.json").write_text(json.dumps(copy, ensure_ascii=False), encoding="utf-8")
    assert not Prompter(str(tmp_path / "literature_template_mine.json")).multi_turn
    (tmp_path / "chat.json").write_text(json.dumps({**copy, "multi_turn": True}, ensure_ascii=False), encoding="utf-8")
    assert Prompter(str(tmp_path / "chat.json")).multi_turn
