"""Answering prompts with a loaded model: batched, left-padded, in input order."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm import tqdm


def generation_config(
    tokenizer,
    max_new_tokens: int = 256,
    num_beams: int = 4,
    do_sample: bool = False,
    temperature: float = 0.1,
    top_p: float = 0.75,
    top_k: int = 40,
    repetition_penalty: float = 1.0,
):
    """A `GenerationConfig` with the special tokens of this tokenizer; sampling knobs only when sampling."""
    from transformers import GenerationConfig

    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "num_beams": num_beams,
        "do_sample": do_sample,
        "repetition_penalty": repetition_penalty,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k)
    return GenerationConfig(**kwargs)


def model_device(model) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def generate_batch(model, tokenizer, prompts: Sequence[str], config) -> list[str]:
    """Answers for a batch of prompts: left padding so every prompt ends where generation starts."""
    tokenizer.padding_side = "left"
    encoded = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=True)
    encoded = {key: value.to(model_device(model)) for key, value in encoded.items()}
    output = model.generate(**encoded, generation_config=config)
    new_tokens = output[:, encoded["input_ids"].shape[1]:]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def generate_answers(
    model,
    tokenizer,
    prompts: Sequence[str],
    config,
    batch_size: int = 8,
    progress: bool = True,
    on_answer: Callable[[int, str], None] | None = None,
) -> list[str]:
    """Answers in input order. Prompts are batched by length (less padding) and restored to their order.

    `on_answer(index, answer)` is called as each answer is ready, in the order they finish.
    """
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    answers: list[str] = [""] * len(prompts)
    bar = tqdm(total=len(prompts), desc="answering", unit="row", disable=not progress)
    for start in range(0, len(order), max(1, batch_size)):
        indices = order[start : start + max(1, batch_size)]
        for index, answer in zip(indices, generate_batch(model, tokenizer, [prompts[i] for i in indices], config)):
            answers[index] = answer
            if on_answer is not None:
                on_answer(index, answer)
        bar.update(len(indices))
    bar.close()
    return answers
