"""Answer medical instructions with a base model plus a LoRA adapter (BenTsao / HuaTuo).

    python infer.py --base_model models/tiny-llama --lora_weights lora-bentsao \
        --instruct_dir data/infer.json --prompt_template med_template

For each row it prints the original blocks ###infering### / ###instruction### / ###golden output### (when
the row has an `output`) / ###model output###. `--output_file` writes each input row with `model_output`.
A merged checkpoint (export_hf_checkpoint.py) or a bare base runs with `--use_lora False`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from utils.core.cli import flag, run_cli, silence_stdout
from utils.core.errors import raise_problems
from utils.core.io import (
    atomic_write,
    check_string_fields,
    jsonl_text,
    output_file_problems,
    read_records,
)
from utils.generation.args import GenerationArgs, ModelArgs
from utils.generation.dialogue import context_length
from utils.generation.engine import default_batch_size, generate_answers
from utils.prompter import template_problems
from utils.runtime import parse_device_map

BUILT_IN_QUESTIONS = [
    "我最近总是咳嗽、有痰，还有点发热，可能是什么原因？",
    "高血压患者在日常生活中需要注意什么？",
    "2型糖尿病有哪些常见的并发症？",
    "一位60岁男性出现持续性右上腹隐痛和消瘦，既往有乙肝病史，应做哪些检查？",
]


@dataclass(frozen=True)
class InferArgs(ModelArgs, GenerationArgs):
    """The flags of infer.py (the original BenTsao names)."""

    instruct_dir: str = flag("", "JSON Lines or JSON array of {instruction[, input, output]}; empty: built-in "
                                 "questions")
    prompt_template: str = flag("med_template", "a name in templates/ or a path to a template JSON")
    batch_size: int = flag(0, "questions answered together (0: 32 // num_beams); left-padded, sorted by length",
                           low=0)
    output_file: str = flag("", "write JSON Lines: each input row plus `model_output`")
    device_map: str = flag("", "auto: spread a large model over all GPUs (then CPU RAM); or a device, e.g. cuda:1")


def validate(args: InferArgs) -> list[str]:
    """Every problem with the options, before anything loads."""
    problems = args.generation_problems()
    if args.output_file:
        problems += output_file_problems(args.output_file, "--output_file", inputs=[args.instruct_dir],
                                         protected=[args.base_model, args.adapter])
    return problems + args.model_problems() + template_problems(args.prompt_template)


def read_questions(instruct_dir: str) -> list[dict[str, Any]]:
    """Rows of a JSON Lines file or JSON array (only `instruction` is required), or the built-in questions."""
    if not instruct_dir:
        return [{"instruction": question} for question in BUILT_IN_QUESTIONS]
    located = read_records(instruct_dir)
    check_string_fields(instruct_dir, located, required=("instruction",), optional=("input", "output"))
    return [row for _, row in located]


def print_row(row: dict[str, Any], answer: str) -> None:
    print("###infering###")
    print("###instruction###")
    print(row["instruction"])
    if row.get("output") is not None:
        print("###golden output###")
        print(row["output"])
    print("###model output###")
    print(answer, flush=True)


def note_long_prompts(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int) -> None:
    """A note for each row whose prompt leaves no room for the answer in the model's context (it is answered
    anyway; past its context a model answers poorly, or not at all)."""
    context = context_length(model, tokenizer)
    for number, prompt in enumerate(prompts, start=1):
        tokens = len(tokenizer(prompt)["input_ids"])
        if tokens + max_new_tokens > context:
            print(f"note: row {number}: the prompt has {tokens} tokens and the answer up to {max_new_tokens} more, "
                  f"beyond the model's context of {context} tokens; the answer may be poor: shorten the question",
                  file=sys.stderr, flush=True)


def answer_in_order(model: Any, tokenizer: Any, prompts: list[str], rows: list[dict[str, Any]],
                    generation: GenerationArgs, batch_size: int, keep_going: bool = False) -> list[str]:
    """Answers for every prompt, each row printed as soon as it and the rows before it are answered.

    `keep_going`: when standard output is closed (`| head`), stop printing but answer every row (they go to
    --output_file)."""
    ready: dict[int, str] = {}
    printed = 0
    stdout_open = True

    def print_in_order(index: int, answer: str) -> None:
        nonlocal printed, stdout_open
        ready[index] = answer
        while printed in ready:
            if stdout_open:
                try:
                    print_row(rows[printed], ready[printed])
                except BrokenPipeError:
                    if not keep_going:
                        raise
                    stdout_open = False
                    silence_stdout()
            printed += 1

    return generate_answers(model, tokenizer, prompts, generation.config(tokenizer), batch_size=batch_size,
                            on_answer=print_in_order, progress=sys.stderr.isatty())  # a bar in a log: `\r` junk


def write_answers(output_file: str, rows: list[dict[str, Any]], answers: list[str]) -> None:
    text = jsonl_text({**row, "model_output": answer} for row, answer in zip(rows, answers, strict=True))
    atomic_write(output_file, text)  # read back before the success line
    print(f"wrote {len(rows)} answers to {output_file}", flush=True)


def main(args: InferArgs) -> None:
    """Answer every row of --instruct_dir (or a few built-in questions) and print the original blocks."""
    rows = read_questions(args.instruct_dir)  # the data first: its problems name the file and the line
    device_map = parse_device_map(args.device_map)
    raise_problems(validate(args))
    model, tokenizer, _, prompter = args.load(args.prompt_template, device_map)
    prompts = [prompter.generate_prompt(row["instruction"], row.get("input") or None) for row in rows]
    note_long_prompts(model, tokenizer, prompts, args.max_new_tokens)
    answers = answer_in_order(model, tokenizer, prompts, rows, args,
                              args.batch_size or default_batch_size(args.num_beams), keep_going=bool(args.output_file))
    if args.output_file:
        write_answers(args.output_file, rows, answers)


if __name__ == "__main__":
    run_cli(main)
