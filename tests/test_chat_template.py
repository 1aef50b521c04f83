"""`--prompt_template chat`: rows rendered by the tokenizer's own chat template, labels on the assistant's turns only,
and inference rendering the prompt exactly as training did.

The templates are SmolLM2-135M-Instruct's (byte for byte as its GGUF ships it) and Qwen2.5-Instruct's without its
tool-calling branches (and a copy marking the answers with {% generation %}), in tests/fixtures/chat_templates/; the
tokenizers are the tests' tiny ones, given the templates' special tokens as the real families have them."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import FIXTURES, train_adapter
from in_process import run_main
from transformers import AutoTokenizer

from utils.core.errors import UserError
from utils.data import IGNORE_INDEX, tokenize_row
from utils.prompter import Prompter

TEMPLATES = FIXTURES / "chat_templates"
DIALOGUE = {"instruction": " <user>: 肝癌是什么？ <bot>: 起源于肝脏细胞的恶性肿瘤。 <user>: 有哪些危险因素？",
            "input": "", "output": "乙肝、丙肝病毒感染和长期饮酒。"}


def chat_tokenizer(folder, template: str, special_tokens: bool = True):
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = (TEMPLATES / f"{template}.jinja").read_text(encoding="utf-8").rstrip("\n")
    if special_tokens:  # as SmolLM2 and Qwen2 have them: the turn markers are single tokens, the end one is EOS
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tokenizer.eos_token = "<|im_end|>"
    return tokenizer


def labelled_runs(tokenizer, item) -> list[str]:
    """The labelled stretches of a tokenised row, each decoded."""
    runs, current = [], []
    for token, label in zip(item.input_ids, item.labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs, current = [*runs, current], []
    runs += [current] if current else []
    return [tokenizer.decode(run) for run in runs]


@pytest.mark.parametrize(("arch", "template"), [("llama", "smollm2"), ("qwen2", "qwen2")])
def test_chat_rows_carry_labels_only_on_the_assistants_turns(tiny_models, arch, template):
    tokenizer = chat_tokenizer(tiny_models[arch], template)
    prompter = Prompter("chat")
    item = tokenize_row(DIALOGUE, prompter, tokenizer, cutoff_len=512)
    text = tokenizer.decode(item.input_ids)
    assert prompter.template["system"] in text and "肝癌是什么？" in text  # the system prompt from templates/chat.json
    assert labelled_runs(tokenizer, item) == ["起源于肝脏细胞的恶性肿瘤。<|im_end|>",
                                              "乙肝、丙肝病毒感染和长期饮酒。<|im_end|>"]
    # one user turn, no history: only the answer is learnt; train_on_inputs learns everything
    single = tokenize_row({"instruction": "肝癌是什么？", "output": "恶性肿瘤。"}, prompter, tokenizer, 512)
    assert labelled_runs(tokenizer, single) == ["恶性肿瘤。<|im_end|>"]
    everything = tokenize_row(DIALOGUE, prompter, tokenizer, cutoff_len=512, train_on_inputs=True)
    assert everything.labels == everything.input_ids
    cut = tokenize_row(DIALOGUE, prompter, tokenizer, cutoff_len=10)
    assert cut.truncated and len(cut.input_ids) == 10


def test_the_spans_agree_with_transformers_assistant_mask(tiny_models):
    """Where a template marks the assistant's text ({% generation %}), transformers computes the mask itself: ours,
    found by rendering, agrees with it token for token."""
    tokenizer = chat_tokenizer(tiny_models["qwen2"], "qwen2_generation")  # qwen2.jinja, the answers marked
    prompter = Prompter("chat")
    item = tokenize_row(DIALOGUE, prompter, tokenizer, cutoff_len=512)
    turns = prompter.turns(DIALOGUE["instruction"]) + [{"role": "assistant", "content": DIALOGUE["output"]}]
    reference = tokenizer.apply_chat_template(turns, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert reference["input_ids"] == item.input_ids
    assert reference["assistant_masks"] == [int(label != IGNORE_INDEX) for label in item.labels]
    assert sum(reference["assistant_masks"]) > 10


def test_a_tokenizer_without_a_chat_template_is_a_clear_error(tiny_llama):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    with pytest.raises(UserError, match="chat template"):
        tokenize_row(DIALOGUE, Prompter("chat"), tokenizer, cutoff_len=512)


def test_infer_on_a_chat_tuned_adapter_renders_the_training_prompt(tiny_llama, tmp_path, monkeypatch):
    import infer

    base = tmp_path / "chat-base"
    shutil.copytree(tiny_llama, base)
    chat_tokenizer(tiny_llama, "smollm2", special_tokens=False).save_pretrained(base)  # same vocabulary, a template
    rows = [DIALOGUE, {"instruction": "高血压有哪些症状？", "input": "", "output": "头痛、头晕。"}]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows * 4), encoding="utf-8")
    adapter = tmp_path / "lora"
    train_adapter(base, data, adapter, "--prompt_template_name", "chat", "--val_set_size", "0", "--cutoff_len", "512")
    assert json.loads((adapter / "bentsao_training.json").read_text(encoding="utf-8"))["prompt_template_name"] == "chat"

    seen: list[str] = []
    answer = infer.generate_answers
    monkeypatch.setattr(infer, "generate_answers", lambda model, tokenizer, prompts, *a, **k: (
        seen.extend(prompts), answer(model, tokenizer, prompts, *a, **k))[1])
    questions = tmp_path / "questions.jsonl"
    questions.write_text(data.read_text(encoding="utf-8").splitlines()[0] + "\n" + json.dumps(rows[1]) + "\n",
                         encoding="utf-8")
    result = run_main(infer.main, "--base_model", base, "--lora_weights", adapter, "--instruct_dir", questions,
                      "--prompt_template", "chat", "--max_new_tokens", "4", "--num_beams", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    tokenizer = AutoTokenizer.from_pretrained(base)
    assert len(seen) == 2
    for row, prompt in zip(rows, seen, strict=True):
        trained = tokenize_row(row, Prompter("chat"), tokenizer, cutoff_len=512)
        prompt_ids = tokenizer(prompt)["input_ids"]
        # the answer's first token follows exactly the tokens infer gave the model, and is the first one learnt there
        assert trained.input_ids[: len(prompt_ids)] == prompt_ids
        assert trained.labels[len(prompt_ids)] != IGNORE_INDEX and trained.labels[len(prompt_ids) - 1] == IGNORE_INDEX
        assert Prompter("chat").template["system"] in prompt


def test_evaluate_benchmark_renders_the_questions_with_the_chat_template(tiny_llama, tmp_path, monkeypatch):
    from test_benchmark_eval import cmmlu_folder

    import evaluate
    from utils.evaluation import benchmarks

    base = tmp_path / "chat-base"
    shutil.copytree(tiny_llama, base)
    chat_tokenizer(tiny_llama, "smollm2", special_tokens=False).save_pretrained(base)
    seen: list[str] = []
    score = benchmarks.choice_predictions
    monkeypatch.setattr(benchmarks, "choice_predictions", lambda model, tokenizer, prompts, *a, **k: (
        seen.extend(prompts), score(model, tokenizer, prompts, *a, **k))[1])
    result = run_main(evaluate.main, "--benchmark", cmmlu_folder(tmp_path / "cmmlu"), "--base_model", base,
                      "--prompt_template", "chat")
    assert result.returncode == 0, result.stderr[-2000:]
    system = Prompter("chat").template["system"]
    assert seen and all(p.startswith(f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n以下是关于")
                        and p.endswith("答案是：<|im_end|>\n<|im_start|>assistant\n") for p in seen)
