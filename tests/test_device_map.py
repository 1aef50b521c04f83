"""`--device_map` for infer.py / generate.py, and inputs going where accelerate's hooks run the embeddings."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_script

from utils.core.errors import UserError
from utils.runtime import parse_device_map


def test_parse_device_map():
    assert parse_device_map("") is None and parse_device_map(None) is None
    for strategy in ("auto", "balanced", "balanced_low_0", "sequential"):
        assert parse_device_map(strategy) == strategy
    assert parse_device_map("cpu") == {"": "cpu"}
    with pytest.raises(UserError, match="--device_map must be one of auto, balanced"):
        parse_device_map("everywhere")
    with pytest.raises(UserError, match="--device_map must be one of"):
        parse_device_map(1.5)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--device_map cuda:1: no such CUDA device"):
            parse_device_map("cuda:1")
        with pytest.raises(UserError, match="--device_map cuda:0: no such CUDA device"):
            parse_device_map(0)  # fire passes a bare GPU index as an int


def test_inputs_follow_the_hooks_of_an_offloaded_model(tiny_llama):
    """With offloading (what device_map="auto" does when the GPUs are full) the weights sit on "meta" and run on the
    hook's execution device: the inputs must go there, not to the first parameter's device."""
    from accelerate import cpu_offload
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from utils.generation.args import GenerationArgs
    from utils.generation.engine import generate_batch, model_device

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.unk_token
    config = GenerationArgs(max_new_tokens=6, num_beams=1).config(tokenizer)
    prompts = ["高血压患者需要注意什么？", "糖尿病"]
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    offloaded = cpu_offload(AutoModelForCausalLM.from_pretrained(tiny_llama).eval(), execution_device="cpu")
    assert next(offloaded.parameters()).device.type == "meta"
    assert model_device(offloaded) == torch.device("cpu") == model_device(plain)
    assert generate_batch(offloaded, tokenizer, prompts, config) == generate_batch(plain, tokenizer, prompts, config)


def test_infer_device_map_auto_gives_the_same_answers(tiny_llama, tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"instruction": q}, ensure_ascii=False) + "\n"
                                 for q in ("肝癌有哪些早期症状？", "发热时应该多喝水吗？")), encoding="utf-8")
    answers = []
    for extra in ([], ["--device_map", "auto"]):
        output = tmp_path / f"answers{len(extra)}.jsonl"
        result = run_script("infer.py", "--base_model", str(tiny_llama), "--use_lora", "False", "--instruct_dir",
                            str(questions), "--max_new_tokens", "8", "--num_beams", "1", "--output_file", str(output),
                            *extra)
        assert result.returncode == 0, result.stderr[-2000:]
        answers.append([json.loads(line)["model_output"] for line in output.read_text(encoding="utf-8").splitlines()])
    assert answers[0] == answers[1] and len(answers[0]) == 2


@pytest.mark.parametrize("script", ["infer.py", "generate.py"])
def test_bad_device_map_is_one_line(tiny_llama, script):
    result = run_script(script, "--base_model", str(tiny_llama), "--use_lora", "False", "--device_map", "everywhere")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    expected = ("error: --device_map must be one of auto, balanced, balanced_low_0, sequential or a device "
                "(cpu, mps, cuda, cuda:1), got 'everywhere'")
    assert result.stderr.strip().splitlines() == [expected]
