import io
import json
import sys

import pytest
from conftest import run_script, train_adapter
from in_process import run_main

from utils.generation.args import GenerationArgs
from utils.generation.dialogue import render_dialogue
from utils.generation.engine import generate_answers
from utils.model.loading import load_for_inference


@pytest.fixture(scope="module")
def llama_adapter(tiny_llama, train_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapter") / "lora"
    train_adapter(tiny_llama, train_file, out)
    return out


def test_infer_prints_blocks_and_writes_output_file(tiny_llama, llama_adapter, tmp_path):
    questions = tmp_path / "questions.json"
    rows = [
        {"instruction": "高血压有哪些症状？", "input": "", "output": "头痛、头晕。", "id": 1},
        {"instruction": "感冒了怎么办？"},  # no golden answer
        {"instruction": "解释这个化验结果", "input": "白细胞升高"},
    ]
    questions.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    out_file = tmp_path / "answers.jsonl"
    result = run_script(
        "infer.py", "--base_model", str(tiny_llama), "--lora_weights", str(llama_adapter), "--use_lora", "True",
        "--instruct_dir", str(questions), "--prompt_template", "med_template", "--max_new_tokens", "16",
        "--output_file", str(out_file),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert out.count("###infering###") == 3 and out.count("###model output###") == 3
    assert out.count("###golden output###") == 1
    assert out.index("高血压有哪些症状？") < out.index("感冒了怎么办？") < out.index("解释这个化验结果")
    written = [json.loads(line) for line in out_file.read_text(encoding="utf-8").splitlines()]
    assert [{k: v for k, v in w.items() if k != "model_output"} for w in written] == rows
    assert all(isinstance(w["model_output"], str) for w in written)


def test_infer_without_instruct_dir_answers_built_in_questions(tiny_llama):
    result = run_script("infer.py", "--base_model", str(tiny_llama), "--use_lora", "False", "--max_new_tokens", "8",
                        "--num_beams", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("###model output###") == 4


@pytest.mark.parametrize("arch", ["llama", "bloom", "qwen2"])
def test_batched_greedy_equals_one_at_a_time(tiny_models, arch):
    """Left padding + attention mask: a row's answer does not depend on its batch neighbours."""
    model, tokenizer, _ = load_for_inference(str(tiny_models[arch]))
    config = GenerationArgs(max_new_tokens=12, num_beams=1).config(tokenizer)
    prompts = ["高血压", "糖尿病患者的饮食需要注意什么？", "肝癌的危险因素有哪些？请详细说明。", "咳嗽"]
    batched = generate_answers(model, tokenizer, prompts, config, batch_size=4, progress=False)
    single = [generate_answers(model, tokenizer, [p], config, batch_size=1, progress=False)[0] for p in prompts]
    assert batched == single
    assert any(batched)  # the tiny base says something


def test_special_tokens_come_from_the_tokenizer(tiny_models):
    _, tokenizer, _ = load_for_inference(str(tiny_models["qwen2"]))
    config = GenerationArgs().config(tokenizer)
    assert tokenizer.bos_token_id is None and config.eos_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert config.pad_token_id == tokenizer.pad_token_id == config.eos_token_id != 2  # not LLaMA's ids


def test_literature_single(tiny_llama, llama_adapter):
    import infer_literature

    single = run_main(infer_literature.main, "--base_model", tiny_llama, "--lora_weights", llama_adapter,
                            "--single_or_multi", "single", "--max_new_tokens", "8")
    assert single.returncode == 0, single.stderr[-2000:]
    lines = single.stdout.splitlines()
    asked = [line.removeprefix("Instruction: ") for line in lines if line.startswith("Instruction:")]
    assert asked == infer_literature.BUILT_IN_QUESTIONS
    assert single.stdout.count("Response:") == len(asked)


class PipedStdin(io.TextIOWrapper):
    """Standard input from a pipe (not a terminal), as `echo ... | python infer_literature.py` gives it."""

    def __init__(self, text: str) -> None:
        super().__init__(io.BytesIO(text.encode("utf-8")), encoding="utf-8")

    def isatty(self) -> bool:
        return False


def test_literature_multi_turn_puts_the_history_into_the_prompt(tiny_llama, llama_adapter, monkeypatch):
    """Piped questions are printed with their answers, and each prompt holds the earlier turns, exactly the
    question and the printed answer, in the training data's shape; `exit` ends the chat."""
    import infer_literature
    from utils.prompter import Prompter

    prompts: list[str] = []
    real_generate = infer_literature.generate_answers

    def generate_and_record(model, tokenizer, batch, *args, **kwargs):
        prompts.extend(batch)
        return real_generate(model, tokenizer, batch, *args, **kwargs)

    monkeypatch.setattr(infer_literature, "generate_answers", generate_and_record)
    questions = ["肝癌有哪些危险因素？", "怎么筛查？", "多久查一次？"]
    monkeypatch.setattr(sys, "stdin", PipedStdin("\n".join(questions) + "\nexit\n不会被读到\n"))
    result = run_main(infer_literature.main, "--base_model", tiny_llama, "--lora_weights", llama_adapter,
                            "--single_or_multi", "multi", "--max_new_tokens", "8", "--num_beams", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith(("Instruction:", "Response:"))]
    assert [line.removeprefix("Instruction: ") for line in lines[0::2]] == questions  # the questions are printed
    answers = [line.removeprefix("Response:").strip() for line in lines[1::2]]
    assert len(answers) == 3 and len(prompts) == 3
    prompter = Prompter("literature_template")
    for turn, prompt in enumerate(prompts):
        history = list(zip(questions[:turn], answers[:turn], strict=True))
        assert prompt == prompter.generate_prompt(render_dialogue(history, questions[turn]))
    first, second = answers[:2]
    dialogue = (f" <user>: 肝癌有哪些危险因素？ <bot>: {first}"
                f" <user>: 怎么筛查？ <bot>: {second} <user>: 多久查一次？")
    assert dialogue in prompts[2]


def test_dialogue_shape_and_trimming():
    from utils.generation.dialogue import fit_history, render_dialogue

    history = [("问1", "答1"), ("问2", "答2")]
    assert render_dialogue(history, "问3") == " <user>: 问1 <bot>: 答1 <user>: 问2 <bot>: 答2 <user>: 问3"
    assert render_dialogue([], "问") == " <user>: 问"
    kept = fit_history(history, "问3", prompt_length=len, budget=len(render_dialogue(history[1:], "问3")))
    assert kept == history[1:]
    assert fit_history(history, "问3", prompt_length=len, budget=1) == []
