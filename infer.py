"""Answer medical instructions with a base model plus a LoRA adapter (BenTsao / HuaTuo).

    python infer.py --base_model models/tiny-llama --lora_weights lora-bentsao \
        --instruct_dir data/infer.json --prompt_template med_template

For each row it prints the original blocks ###infering### / ###instruction### / ###golden output### (when
the row has an `output`) / ###model output###. `--output_file` writes each input row with `model_output`.
A merged checkpoint (export_hf_checkpoint.py) or a bare base runs with `--use_lora False`.
"""

from __future__ import annotations

import sys
from typing import Any

from utils.core.cli import NON_NEGATIVE, SEED, option_checks, run_cli, silence_stdout
from utils.core.errors import UserError, raise_problems
from utils.core.io import atomic_write, check_output_file, check_string_fields, jsonl_text, read_records
from utils.generation.args import DEFAULT_GENERATION, GenerationArgs, generation_flags
from utils.generation.dialogue import context_length
from utils.generation.engine import default_batch_size, generate_answers
from utils.model.loading import gguf_path, load_for_inference
from utils.prompter import Prompter
from utils.runtime import parse_device_map

BUILT_IN_QUESTIONS = [
    "我最近总是咳嗽、有痰，还有点发热，可能是什么原因？",
    "高血压患者在日常生活中需要注意什么？",
    "2型糖尿病有哪些常见的并发症？",
    "一位60岁男性出现持续性右上腹隐痛和消瘦，既往有乙肝病史，应做哪些检查？",
]


def validate_args(use_lora: bool, lora_weights: str, instruct_dir: str, output_file: str, base_model: str = "",
                  ) -> None:
    """Every problem with the options at once, before anything loads."""
    problems = []
    if use_lora and not lora_weights:
        problems.append("--lora_weights is required with --use_lora True (for a merged checkpoint or a bare base "
                        "model, pass --use_lora False)")
    if output_file:
        try:
            check_output_file(output_file, "--output_file", inputs=[instruct_dir] if instruct_dir else [],
                              protected={"the base model": base_model, "the adapter": lora_weights if use_lora else ""})
        except UserError as error:
            problems.append(str(error))
    raise_problems(problems)


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
    written = atomic_write(output_file, text)
    if written.read_text(encoding="utf-8") != text:  # the success line names only what is on disk
        raise UserError(f"{output_file}: what was written does not read back")
    print(f"wrote {len(rows)} answers to {output_file}", flush=True)


@generation_flags(num_beams=4)
@option_checks(batch_size=NON_NEGATIVE, seed=SEED)
def main(
    load_8bit: bool = False,  # load the base in 8-bit (CUDA + bitsandbytes)
    load_4bit: bool = False,  # load the base in 4-bit nf4 (CUDA + bitsandbytes)
    base_model: str = "",  # local folder or hub id of the base model (required)
    gguf_file: str = "",  # with a folder --base_model: the GGUF file in it to load (a .gguf --base_model needs none)
    instruct_dir: str = "",  # JSON Lines or JSON array of {instruction[, input, output]}; empty: built-in questions
    use_lora: bool = True,  # apply the adapter in --lora_weights (False: a merged checkpoint or the bare base)
    lora_weights: str = "",  # adapter folder written by finetune.py (or a hub id)
    prompt_template: str = "med_template",  # a name in templates/ or a path to a template JSON
    generation: GenerationArgs = DEFAULT_GENERATION,  # --max_new_tokens, --num_beams, --do_sample, ... (shared)
    seed: int = 42,  # seeds sampling
    batch_size: int = 0,  # questions answered together (0: 32 // num_beams); left-padded, sorted by length
    output_file: str = "",  # write JSON Lines: each input row plus `model_output`
    precision: str = "auto",  # auto | bf16 | fp16 | fp32 (fp32 on CPU)
    trust_remote_code: bool = False,  # allow a hub model's own Python code to run
    device_map: str = "",  # auto: spread a large model over all GPUs (then CPU RAM); or a device, e.g. cuda:1
) -> None:
    """Answer every row of --instruct_dir (or a few built-in questions) and print the original blocks."""
    from transformers import set_seed

    base_model = gguf_path(base_model, gguf_file)
    validate_args(use_lora, lora_weights, instruct_dir, output_file, base_model)
    raise_problems(generation.problems())
    prompter = Prompter(prompt_template)
    rows = read_questions(instruct_dir)
    device_map = parse_device_map(device_map)

    set_seed(seed)
    model, tokenizer, _ = load_for_inference(
        base_model, lora_weights if use_lora else None, precision=precision, load_8bit=load_8bit,
        load_4bit=load_4bit, trust_remote_code=trust_remote_code, device_map=device_map,
    )
    prompter.tokenizer = tokenizer  # a chat template renders with the base model's own
    prompts = [prompter.generate_prompt(row["instruction"], row.get("input") or None) for row in rows]
    note_long_prompts(model, tokenizer, prompts, generation.max_new_tokens)
    answers = answer_in_order(model, tokenizer, prompts, rows, generation,
                              batch_size or default_batch_size(generation.num_beams), keep_going=bool(output_file))
    if output_file:
        write_answers(output_file, rows, answers)


if __name__ == "__main__":
    run_cli(main)
