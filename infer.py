"""Answer medical instructions with a base model plus a LoRA adapter (BenTsao / HuaTuo).

    python infer.py --base_model models/tiny-llama --lora_weights lora-bentsao \
        --instruct_dir data/infer.json --prompt_template med_template

For each row it prints the original blocks ###infering### / ###instruction### / ###golden output### (when
the row has an `output`) / ###model output###. `--output_file` writes each input row with `model_output`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from utils.core.cli import run_cli
from utils.core.errors import UserError
from utils.core.io import check_string_fields, read_records
from utils.distributed import parse_device_map
from utils.generation import default_batch_size, generate_answers, generation_config
from utils.model import load_for_inference
from utils.prompter import Prompter
from utils.validate import generation_problems, raise_problems

BUILT_IN_QUESTIONS = [
    "我最近总是咳嗽、有痰，还有点发热，可能是什么原因？",
    "高血压患者在日常生活中需要注意什么？",
    "2型糖尿病有哪些常见的并发症？",
    "一位60岁男性出现持续性右上腹隐痛和消瘦，既往有乙肝病史，应做哪些检查？",
]


def read_questions(instruct_dir: str) -> list[dict]:
    """Rows of a JSON Lines file or JSON array; only `instruction` is required."""
    located = read_records(instruct_dir)
    check_string_fields(instruct_dir, located, required=("instruction",), optional=("input", "output"))
    return [row for _, row in located]


def print_row(row: dict, answer: str) -> None:
    print("###infering###")
    print("###instruction###")
    print(row["instruction"])
    if row.get("output") is not None:
        print("###golden output###")
        print(row["output"])
    print("###model output###")
    print(answer, flush=True)


def main(
    load_8bit: bool = False,  # load the base in 8-bit (CUDA + bitsandbytes)
    load_4bit: bool = False,  # load the base in 4-bit nf4 (CUDA + bitsandbytes)
    base_model: str = "",  # local folder or hub id of the base model (required)
    instruct_dir: str = "",  # JSON Lines or JSON array of {instruction[, input, output]}; empty: built-in questions
    use_lora: bool = True,  # apply the adapter in --lora_weights (False: the bare base model)
    lora_weights: str = "",  # adapter folder written by finetune.py (or a hub id)
    prompt_template: str = "med_template",  # a name in templates/ or a path to a template JSON
    max_new_tokens: int = 256,  # answer length limit, in tokens
    num_beams: int = 4,  # beam search width (1: greedy)
    do_sample: bool = False,  # sample instead of searching; then temperature/top_p/top_k apply
    temperature: float = 0.1,
    top_p: float = 0.75,
    top_k: int = 40,
    repetition_penalty: float = 1.0,  # >1 discourages repeating tokens
    seed: int = 42,  # seeds sampling
    batch_size: int = 0,  # questions answered together (0: 32 // num_beams); left-padded, sorted by length
    output_file: str = "",  # write JSON Lines: each input row plus `model_output`
    precision: str = "auto",  # auto | bf16 | fp16 | fp32 (fp32 on CPU)
    trust_remote_code: bool = False,  # allow a hub model's own Python code to run
    device_map: str = "",  # auto: spread a large model over all GPUs (then CPU RAM); or a device, e.g. cuda:1
) -> None:
    """Answer every row of --instruct_dir (or a few built-in questions) and print the original blocks."""
    from transformers import set_seed

    if use_lora and not lora_weights:
        raise UserError("--lora_weights is required with --use_lora True (or run the bare base with --use_lora False)")
    batch_size = default_batch_size(num_beams) if batch_size == 0 else batch_size
    raise_problems(generation_problems(max_new_tokens, num_beams, batch_size, do_sample, temperature, top_p, top_k,
                                       repetition_penalty))
    prompter = Prompter(prompt_template)
    rows = read_questions(instruct_dir) if instruct_dir else [{"instruction": q} for q in BUILT_IN_QUESTIONS]
    if output_file and Path(output_file).resolve() == Path(instruct_dir).resolve():
        raise UserError(f"--output_file {output_file} is the input file; choose another path")

    set_seed(seed)
    model, tokenizer, _ = load_for_inference(
        base_model, lora_weights if use_lora else None, precision=precision, load_8bit=load_8bit,
        load_4bit=load_4bit, trust_remote_code=trust_remote_code,
        device_map=parse_device_map(device_map),
    )
    config = generation_config(
        tokenizer, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=do_sample,
        temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty,
    )
    prompts = [prompter.generate_prompt(row["instruction"], row.get("input") or None) for row in rows]

    ready: dict[int, str] = {}
    printed = 0

    def print_in_order(index: int, answer: str) -> None:
        nonlocal printed
        ready[index] = answer
        while printed in ready:
            print_row(rows[printed], ready[printed])
            printed += 1

    answers = generate_answers(model, tokenizer, prompts, config, batch_size=batch_size, on_answer=print_in_order)
    if output_file:
        Path(output_file).parent.mkdir(parents=True, exist_ok=True)
        partial = Path(f"{output_file}.tmp")  # written whole, then renamed: never a half-written answers file
        partial.write_text("".join(json.dumps({**row, "model_output": answer}, ensure_ascii=False) + "\n"
                                   for row, answer in zip(rows, answers, strict=True)), encoding="utf-8")
        os.replace(partial, output_file)
        print(f"wrote {len(rows)} answers to {output_file}")


if __name__ == "__main__":
    run_cli(main)
