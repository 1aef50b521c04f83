"""Liver-cancer literature QA with a BenTsao literature adapter: single questions or a multi-turn chat.

    python infer_literature.py --base_model models/tiny-llama --lora_weights lora-literature --single_or_multi single
    python infer_literature.py --base_model ... --lora_weights ... --single_or_multi multi   # type; EOF or `exit` ends

The dialogue is kept as ` <user>: … <bot>: … <user>: …`, the shape of the training data, and the oldest turns
are dropped when the prompt would not leave room for the answer in the model's context.
"""

from __future__ import annotations

import sys

from utils.core.cli import run_cli
from utils.core.errors import UserError
from utils.dialogue import fit_history, render_dialogue
from utils.generation import default_batch_size, generate_answers, generation_config
from utils.model import load_for_inference
from utils.prompter import Prompter
from utils.validate import generation_problems, raise_problems

BUILT_IN_QUESTIONS = [
    "肝癌有哪些常见的危险因素？",
    "慢性乙肝患者应该怎样进行肝癌筛查？",
    "甲胎蛋白升高一定是肝癌吗？",
    "早期肝癌有哪些治疗方法？",
    "肝癌术后为什么需要定期复查？",
]


def context_length(model, tokenizer, fallback: int = 2048) -> int:
    limits = [getattr(model.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    limits = [limit for limit in limits if isinstance(limit, int) and 0 < limit < 1_000_000]
    return min(limits) if limits else fallback


def main(
    load_8bit: bool = False,  # load the base in 8-bit (CUDA + bitsandbytes)
    load_4bit: bool = False,  # load the base in 4-bit nf4 (CUDA + bitsandbytes)
    base_model: str = "",  # local folder or hub id of the base model (required)
    single_or_multi: str = "single",  # single: built-in questions; multi: a chat read from standard input
    use_lora: bool = True,  # apply the adapter in --lora_weights
    lora_weights: str = "",  # adapter folder written by finetune.py
    prompt_template: str = "literature_template",  # a name in templates/ or a path to a template JSON
    max_new_tokens: int = 256,
    num_beams: int = 4,
    do_sample: bool = False,
    temperature: float = 0.1,
    top_p: float = 0.75,
    top_k: int = 40,
    repetition_penalty: float = 1.0,
    seed: int = 42,
    batch_size: int = 0,  # single mode: questions answered together (0: 32 // num_beams)
    max_turns: int = 0,  # multi mode: stop after this many turns (0: until EOF or `exit`)
    precision: str = "auto",
    trust_remote_code: bool = False,
) -> None:
    """Answer the built-in liver-cancer questions (single) or chat turn by turn from standard input (multi)."""
    from transformers import set_seed

    if single_or_multi not in ("single", "multi"):
        raise UserError(f"--single_or_multi must be single or multi, got {single_or_multi!r}")
    if use_lora and not lora_weights:
        raise UserError("--lora_weights is required with --use_lora True (or run the bare base with --use_lora False)")
    batch_size = default_batch_size(num_beams) if batch_size == 0 else batch_size
    problems = generation_problems(max_new_tokens, num_beams, batch_size, do_sample, temperature, top_p, top_k,
                                   repetition_penalty)
    if isinstance(max_turns, bool) or not isinstance(max_turns, int) or max_turns < 0:
        problems.append(f"--max_turns must be an integer >= 0, got {max_turns!r}")
    raise_problems(problems)
    prompter = Prompter(prompt_template)
    set_seed(seed)
    model, tokenizer, _ = load_for_inference(
        base_model, lora_weights if use_lora else None, precision=precision, load_8bit=load_8bit,
        load_4bit=load_4bit, trust_remote_code=trust_remote_code,
    )
    config = generation_config(
        tokenizer, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=do_sample,
        temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty,
    )

    if single_or_multi == "single":
        prompts = [prompter.generate_prompt(render_dialogue([], question)) for question in BUILT_IN_QUESTIONS]
        answers = generate_answers(model, tokenizer, prompts, config, batch_size=batch_size)
        for question, answer in zip(BUILT_IN_QUESTIONS, answers, strict=True):
            print("Instruction:", question)
            print("Response:", answer)
            print(flush=True)
        return

    budget = context_length(model, tokenizer) - max_new_tokens
    if budget <= 0:
        raise UserError(f"--max_new_tokens {max_new_tokens} leaves no room for a prompt in this model's context")

    def prompt_length(instruction: str) -> int:
        return len(tokenizer(prompter.generate_prompt(instruction))["input_ids"])

    history: list[tuple[str, str]] = []
    turns = 0
    interactive = sys.stdin.isatty()
    while not max_turns or turns < max_turns:
        if interactive:
            print("请输入 (exit 结束): ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "exit":
            break
        question = line.strip()
        if not question:
            continue
        history = fit_history(history, question, prompt_length, budget)
        prompt = prompter.generate_prompt(render_dialogue(history, question))
        answer = generate_answers(model, tokenizer, [prompt], config, batch_size=1, progress=False)[0]
        answer = " ".join(answer.split())  # one line, as the training data keeps each reply
        print("Response:", answer, flush=True)
        history.append((question, answer))
        turns += 1


if __name__ == "__main__":
    run_cli(main)
