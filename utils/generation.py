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


SEQUENCES_PER_BATCH = 32  # rows x beams decoded together by default: ~6.5 GB of KV cache for LLaMA-7B at 400 tokens


def default_batch_size(num_beams: Any, sequences: int = SEQUENCES_PER_BATCH) -> int:
    """Questions per batch when --batch_size is 0: `sequences // num_beams` (32 greedy, 8 with 4 beams), so the
    memory of a batch does not grow with the beam width."""
    beams = num_beams if isinstance(num_beams, int) and not isinstance(num_beams, bool) and num_beams > 0 else 1
    return max(1, sequences // beams)


def model_device(model) -> torch.device:
    """Where the inputs go: the device the input embeddings run on.

    With `device_map="auto"` accelerate spreads the layers over the GPUs (embeddings on the first) and its hooks
    move activations from layer to layer; a layer offloaded to CPU or disk keeps its weights on "meta" and runs on
    its hook's execution device, which is then the answer.
    """
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    hook = getattr(embeddings, "_hf_hook", None)
    for part in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):  # a SequentialHook or one
        execution = getattr(part, "execution_device", None)
        if execution is not None:
            return torch.device("cuda", execution) if isinstance(execution, int) else torch.device(execution)
    weight = getattr(embeddings, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.device.type != "meta":
        return weight.device
    placed = [p.device for p in model.parameters() if p.device.type != "meta"]
    return placed[0] if placed else torch.device("cpu")


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
        batch_answers = generate_batch(model, tokenizer, [prompts[i] for i in indices], config)
        for index, answer in zip(indices, batch_answers, strict=True):
            answers[index] = answer
            if on_answer is not None:
                on_answer(index, answer)
        bar.update(len(indices))
    bar.close()
    return answers
