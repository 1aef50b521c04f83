"""Answering prompts with a loaded model: batched, left-padded, in input order; or one answer, streamed."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from tqdm import tqdm

SEQUENCES_PER_BATCH = 32  # rows x beams decoded together by default: ~6.5 GB of KV cache for LLaMA-7B at 400 tokens


def default_batch_size(num_beams: Any, sequences: int = SEQUENCES_PER_BATCH) -> int:
    """Questions per batch when --batch_size is 0: `sequences // num_beams` (32 greedy, 8 with 4 beams), so the
    memory of a batch does not grow with the beam width."""
    beams = num_beams if isinstance(num_beams, int) and not isinstance(num_beams, bool) and num_beams > 0 else 1
    return max(1, sequences // beams)


def model_device(model: Any) -> torch.device:
    """Where the inputs go: the device the input embeddings run on.

    With `device_map="auto"` accelerate spreads the layers over the GPUs and records where each went in the
    model's `hf_device_map`; a layer mapped to "cpu" or "disk" there is offloaded and runs on the first GPU.
    """
    embeddings = model.get_input_embeddings()
    device_map = getattr(model, "hf_device_map", None)
    if isinstance(device_map, dict) and device_map:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        name = next((path for path, module in base.named_modules() if module is embeddings), None)
        keys = [key for key in device_map if name is not None and (key in ("", name) or name.startswith(key + "."))]
        if keys:
            placed = device_map[max(keys, key=len)]
            if placed in ("cpu", "disk"):  # offloaded: executed on the main (first) GPU, if there is one
                gpus = [value for value in device_map.values() if isinstance(value, int)]
                return torch.device("cuda", min(gpus)) if gpus else torch.device("cpu")
            return torch.device("cuda", placed) if isinstance(placed, int) else torch.device(placed)
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
    """Answers in input order. Prompts are batched by their length in tokens (less padding), longest first (a
    batch that does not fit in memory fails at once), and the answers restored to the input order.

    `on_answer(index, answer)` is called as each answer is ready, in the order they finish.
    """
    lengths = [len(ids) for ids in tokenizer(list(prompts), add_special_tokens=True)["input_ids"]] if prompts else []
    order = sorted(range(len(prompts)), key=lambda i: lengths[i], reverse=True)
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


def stream_answer(model: Any, tokenizer: Any, prompt: str, config: Any, stop: threading.Event) -> Iterator[str]:
    """The answer so far, growing as tokens arrive; generation ends early once `stop` is set.

    transformers streams greedy search and sampling; beam search (`num_beams` > 1) yields the answer when complete.
    A failure in the generating thread is raised here, in the caller's thread.
    """
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    class StopOnEvent(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> bool:
            return stop.is_set()

    encoded = tokenizer(prompt, return_tensors="pt")
    encoded = {key: value.to(model_device(model)) for key, value in encoded.items()}
    streaming = config.num_beams == 1
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
    failure: list[BaseException] = []
    result: list[str] = []

    def run() -> None:
        try:
            with torch.inference_mode():
                output = model.generate(**encoded, generation_config=config,
                                        stopping_criteria=StoppingCriteriaList([StopOnEvent()]),
                                        streamer=streamer if streaming else None)
            new_tokens = output[0, encoded["input_ids"].shape[1]:]
            result.append(tokenizer.decode(new_tokens, skip_special_tokens=True))
        except Exception as error:  # noqa: BLE001 - handed to the caller's thread below
            failure.append(error)
        finally:
            if streaming:
                streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    text = ""
    if streaming:
        for piece in streamer:
            text += piece
            yield text
    thread.join()
    if failure:
        raise RuntimeError(f"generation failed: {failure[0]}")
    if not streaming or not text:
        yield result[0] if result else text
