"""Liver-cancer literature QA with a BenTsao literature adapter: single questions or a multi-turn chat.

    python infer_literature.py --base_model models/tiny-llama --lora_weights lora-literature --single_or_multi single
    python infer_literature.py --base_model ... --lora_weights ... --single_or_multi multi   # type; EOF or `exit` ends

The dialogue is kept as ` <user>: … <bot>: … <user>: …`, the shape of the training data, and the oldest turns
are dropped when the prompt would not leave room for the answer in the model's context.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

from utils.core.cli import NON_NEGATIVE, SEED, choices, option_checks, run_cli
from utils.core.errors import UserError, raise_problems
from utils.generation.args import DEFAULT_GENERATION, GenerationArgs, generation_flags
from utils.generation.dialogue import Chat, context_length
from utils.generation.engine import default_batch_size, generate_answers
from utils.model.loading import gguf_path, load_for_inference
from utils.prompter import Prompter

BUILT_IN_QUESTIONS = [
    "肝癌有哪些常见的危险因素？",
    "慢性乙肝患者应该怎样进行肝癌筛查？",
    "甲胎蛋白升高一定是肝癌吗？",
    "早期肝癌有哪些治疗方法？",
    "肝癌术后为什么需要定期复查？",
]


def answer_single(model: Any, tokenizer: Any, prompter: Prompter, generation: GenerationArgs, batch_size: int) -> None:
    """The built-in questions, each on its own, batched."""
    chat = Chat(prompter, tokenizer, context_length(model, tokenizer))
    prompts = [chat.prompt(question, [])[0] for question in BUILT_IN_QUESTIONS]
    answers = generate_answers(model, tokenizer, prompts, generation.config(tokenizer), batch_size=batch_size,
                               progress=sys.stderr.isatty())  # a bar in a log file is `\r` junk
    for question, answer in zip(BUILT_IN_QUESTIONS, answers, strict=True):
        print("Instruction:", question)
        print("Response:", answer)
        print(flush=True)


def questions_from_stdin(interactive: bool) -> Iterator[str]:
    """Questions, one a line, until EOF or `exit`; standard input is read as UTF-8 whatever the locale says."""
    number = 0
    while True:
        if interactive:
            print("请输入 (exit 结束): ", end="", flush=True)
        raw = sys.stdin.buffer.readline()
        number += 1
        if not raw:
            return
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise UserError(f"standard input line {number} is not UTF-8 (byte 0x{raw[error.start]:02x}, perhaps "
                            "GBK); convert it, e.g. `iconv -f GBK -t UTF-8 questions.txt | python "
                            "infer_literature.py ...`") from None
        question = line.strip()
        if question == "exit":
            return
        if question:
            yield question


def chat_multi(model: Any, tokenizer: Any, prompter: Prompter, generation: GenerationArgs, max_turns: int) -> None:
    """A chat from standard input; the history is kept in the training shape and trimmed to fit the context."""
    chat = Chat(prompter, tokenizer, context_length(model, tokenizer) - generation.max_new_tokens)
    if chat.budget <= 0:
        raise UserError(f"--max_new_tokens {generation.max_new_tokens} leaves no room for a prompt in this model's "
                        "context")
    interactive = sys.stdin.isatty()
    config = generation.config(tokenizer)
    history: list[tuple[str, str]] = []
    for turn, question in enumerate(questions_from_stdin(interactive)):
        if max_turns and turn >= max_turns:
            break
        prompt, history = chat.prompt(question, history)
        if prompt is None:
            print(f"note: this question alone takes more than the {chat.budget} tokens the context leaves for a "
                  "prompt; shorten it", file=sys.stderr, flush=True)
            continue
        if not interactive:  # piped: show what is being answered
            print("Instruction:", question)
        answer = " ".join(generate_answers(model, tokenizer, [prompt], config, batch_size=1, progress=False)[0]
                          .split())  # one line, as the training data keeps each reply
        print("Response:", answer, flush=True)
        history.append((question, answer))


@generation_flags(num_beams=4)
@option_checks(single_or_multi=choices("single", "multi"), batch_size=NON_NEGATIVE, max_turns=NON_NEGATIVE, seed=SEED)
def main(
    load_8bit: bool = False,  # load the base in 8-bit (CUDA + bitsandbytes)
    load_4bit: bool = False,  # load the base in 4-bit nf4 (CUDA + bitsandbytes)
    base_model: str = "",  # local folder or hub id of the base model (required)
    gguf_file: str = "",  # with a folder --base_model: the GGUF file in it to load (a .gguf --base_model needs none)
    single_or_multi: str = "single",  # single: built-in questions; multi: a chat read from standard input
    use_lora: bool = True,  # apply the adapter in --lora_weights (False: a merged checkpoint or the bare base)
    lora_weights: str = "",  # adapter folder written by finetune.py
    prompt_template: str = "literature_template",  # a name in templates/ or a path to a template JSON
    generation: GenerationArgs = DEFAULT_GENERATION,  # --max_new_tokens, --num_beams, --do_sample, ... (shared)
    seed: int = 42,  # seeds sampling
    batch_size: int = 0,  # single mode: questions answered together (0: 32 // num_beams)
    max_turns: int = 0,  # multi mode: stop after this many turns (0: until EOF or `exit`)
    precision: str = "auto",  # auto | bf16 | fp16 | fp32 (fp32 on CPU)
    trust_remote_code: bool = False,  # allow a hub model's own Python code to run
) -> None:
    """Answer the built-in liver-cancer questions (single) or chat turn by turn from standard input (multi)."""
    from transformers import set_seed

    base_model = gguf_path(base_model, gguf_file)
    if use_lora and not lora_weights:
        raise UserError("--lora_weights is required with --use_lora True (for a merged checkpoint or a bare base "
                        "model, pass --use_lora False)")
    raise_problems(generation.problems())
    prompter = Prompter(prompt_template)
    set_seed(seed)
    model, tokenizer, _ = load_for_inference(
        base_model, lora_weights if use_lora else None, precision=precision, load_8bit=load_8bit,
        load_4bit=load_4bit, trust_remote_code=trust_remote_code,
    )
    prompter.tokenizer = tokenizer  # a chat template renders with the base model's own
    if single_or_multi == "single":
        answer_single(model, tokenizer, prompter, generation, batch_size or default_batch_size(generation.num_beams))
    else:
        chat_multi(model, tokenizer, prompter, generation, max_turns)


if __name__ == "__main__":
    run_cli(main)
