"""Liver-cancer literature QA with a BenTsao literature adapter: single questions or a multi-turn chat.

    python infer_literature.py --base_model models/tiny-llama --lora_weights lora-literature --single_or_multi single
    python infer_literature.py --base_model ... --lora_weights ... --single_or_multi multi   # type; EOF or `exit` ends

The dialogue is kept as ` <user>: … <bot>: … <user>: …`, the shape of the training data, and the oldest turns
are dropped when the prompt would not leave room for the answer in the model's context.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from utils.core.cli import flag, run_cli
from utils.core.errors import UserError, raise_problems
from utils.generation.args import GenerationArgs, ModelArgs
from utils.generation.dialogue import Chat, context_length
from utils.generation.engine import default_batch_size, generate_answers
from utils.prompter import Prompter, template_problems

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


@dataclass(frozen=True)
class LiteratureArgs(ModelArgs, GenerationArgs):
    """The flags of infer_literature.py (the original BenTsao names)."""

    single_or_multi: str = flag("single", "single: built-in questions; multi: a chat read from standard input",
                                choices=("single", "multi"))
    prompt_template: str = flag("literature_template", "a name in templates/ or a path to a template JSON")
    batch_size: int = flag(0, "single mode: questions answered together (0: 32 // num_beams)", low=0)
    max_turns: int = flag(0, "multi mode: stop after this many turns (0: until EOF or `exit`)", low=0)


def validate(args: LiteratureArgs) -> list[str]:
    """Every problem with the options, before anything loads."""
    return args.generation_problems() + args.model_problems() + template_problems(args.prompt_template)


def main(args: LiteratureArgs) -> None:
    """Answer the built-in liver-cancer questions (single) or chat turn by turn from standard input (multi)."""
    raise_problems(validate(args))
    model, tokenizer, _, prompter = args.load(args.prompt_template)
    if args.single_or_multi == "single":
        answer_single(model, tokenizer, prompter, args, args.batch_size or default_batch_size(args.num_beams))
    else:
        chat_multi(model, tokenizer, prompter, args, args.max_turns)


if __name__ == "__main__":
    run_cli(main)
