import json
import os
from pathlib import Path

import pytest
from conftest import REPO, reference_file

from utils.core.errors import UserError
from utils.prompter import Prompter, available_templates

PUBLISHED = ("med_template", "bloom_deploy", "literature_template", "alpaca")


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
    assert "unknown template `med_templat`" in str(error.value)
    for name in ("med_template", "alpaca", "ori_template"):
        assert name in str(error.value)


def test_missing_template_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        Prompter(str(Path(tmp_path) / "nope.json"))
