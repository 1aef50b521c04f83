"""Instruction data: reading `{instruction, input, output}` rows and turning them into training examples."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils.core.errors import UserError
from utils.core.io import check_string_fields, read_records
from utils.prompter import Prompter

IGNORE_INDEX = -100  # label value the loss skips


def read_instruction_rows(path: str | Path, require_output: bool = True) -> list[dict[str, str]]:
    """Rows of a JSON Lines file or a JSON array, as `{instruction, input, output}` (extra keys dropped).

    `input` is optional (empty when absent); `output` is required for training and optional for inference.
    """
    located = read_records(path)
    required = ("instruction", "output") if require_output else ("instruction",)
    optional = ("input",) if require_output else ("input", "output")
    check_string_fields(path, located, required, optional)
    rows = []
    for _, row in located:
        normalised = {"instruction": row["instruction"], "input": row.get("input") or ""}
        if require_output or row.get("output") is not None:
            normalised["output"] = row.get("output") or ""
        rows.append(normalised)
    return rows


def load_instruction_dataset(path: str | Path):
    """A `datasets.Dataset` with the columns instruction, input, output."""
    from datasets import Dataset

    return Dataset.from_list(read_instruction_rows(path, require_output=True))


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    truncated: bool  # the row did not fit in cutoff_len
    trainable_tokens: int  # tokens that count in the loss


def tokenize_row(
    row: dict[str, Any],
    prompter: Prompter,
    tokenizer,
    cutoff_len: int,
    train_on_inputs: bool = False,
    add_eos_token: bool = True,
) -> Tokenized:
    """Prompt + answer + EOS, cut at `cutoff_len`; the prompt's tokens are masked out of the loss unless
    `train_on_inputs`. The whole text is tokenised at once (as at inference time) and the prompt's length is
    measured by tokenising the prompt alone, as the original recipe does.
    """
    if prompter.chat:
        return tokenize_chat(row, prompter, tokenizer, cutoff_len, train_on_inputs)
    prompt = prompter.generate_prompt(row["instruction"], row.get("input") or None)
    full_ids = tokenizer(prompt + row["output"], add_special_tokens=True)["input_ids"]
    eos = tokenizer.eos_token_id
    truncated = len(full_ids) > cutoff_len or (add_eos_token and len(full_ids) == cutoff_len and full_ids[-1] != eos)
    input_ids = full_ids[:cutoff_len]
    if add_eos_token and eos is not None and len(input_ids) < cutoff_len and (not input_ids or input_ids[-1] != eos):
        input_ids = input_ids + [eos]
    labels = list(input_ids)
    if not train_on_inputs:
        prompt_len = len(tokenizer(prompt, add_special_tokens=True)["input_ids"])
        labels[:prompt_len] = [IGNORE_INDEX] * min(prompt_len, len(labels))
    trainable = sum(1 for label in labels if label != IGNORE_INDEX)
    return Tokenized(input_ids=input_ids, labels=labels, truncated=truncated, trainable_tokens=trainable)


def tokenize_chat(row: dict[str, Any], prompter: Prompter, tokenizer, cutoff_len: int, train_on_inputs: bool,
                  ) -> Tokenized:
    """A row rendered by the tokenizer's chat template and tokenised whole (as at inference time); labels on the
    tokens of the assistant's turns, each turn's end marker included (the model learns to stop there; the template
    ends the text, no EOS is added). A turn's characters are where the chat rendered up to it (with the assistant's
    cue) ends and the chat rendered through it ends; the tokens are found by their character offsets, so the spans
    hold whatever the template and the tokenizer do at the boundaries."""
    turns = prompter.turns(row["instruction"], row.get("input") or None)
    turns.append({"role": "assistant", "content": row["output"]})
    text = prompter.render(turns, tokenizer)
    spans = []
    for end, turn in enumerate(turns, start=1):
        if turn["role"] == "assistant":
            before, through = prompter.render(turns[: end - 1], tokenizer), prompter.render(turns[:end], tokenizer)
            if not text.startswith(before) or not text.startswith(through.rstrip()):
                raise UserError("this tokenizer's chat template renders the beginning of a chat differently from the "
                                "whole chat, so the assistant's turns cannot be found: use a plain template")
            spans.append((len(before), len(through.rstrip())))
    encoded = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    labels = [token if train_on_inputs or any(start < stop and end > begin for begin, stop in spans) else IGNORE_INDEX
              for token, (start, end) in zip(ids, encoded["offset_mapping"], strict=True)]
    labels = labels[:cutoff_len]
    return Tokenized(ids[:cutoff_len], labels, len(ids) > cutoff_len, sum(label != IGNORE_INDEX for label in labels))


@contextlib.contextmanager
def map_bars_only_on_a_terminal() -> Iterator[None]:
    """datasets' `map`/`filter` progress bars only while stderr is a terminal: in a log file (nohup, sbatch) each
    redraw is a `\r`-joined chunk of junk. The earlier state is restored afterwards (in-process runs)."""
    import datasets

    if sys.stderr.isatty() or not datasets.is_progress_bar_enabled():
        yield
        return
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.enable_progress_bars()


def tokenize_dataset(dataset, prompter: Prompter, tokenizer, cutoff_len: int, train_on_inputs: bool, label: str):
    """Tokenise every row; report truncated rows and drop rows with nothing left to learn.

    Returns the tokenised dataset (columns input_ids, attention_mask, labels) and a small report dict.
    """

    def encode(row):
        item = tokenize_row(row, prompter, tokenizer, cutoff_len, train_on_inputs)
        return {
            "input_ids": item.input_ids,
            "attention_mask": [1] * len(item.input_ids),
            "labels": item.labels,
            "truncated": item.truncated,
            "trainable_tokens": item.trainable_tokens,
        }

    empty_outputs = sum(1 for output in dataset["output"] if not output.strip())
    if len(dataset) and empty_outputs == len(dataset):
        raise UserError(f"every {label} row's `output` is empty: there is nothing to learn (check the data file)")
    with map_bars_only_on_a_terminal():
        encoded = dataset.map(encode, remove_columns=dataset.column_names, desc=f"tokenizing {label}")
        kept = encoded.filter(lambda row: row["trainable_tokens"] > 0, desc=f"dropping empty {label} rows")
    truncated = sum(encoded["truncated"])
    dropped = len(encoded) - len(kept)
    if len(encoded) and not len(kept):
        raise UserError(
            f"every {label} row's prompt fills --cutoff_len {cutoff_len}, leaving nothing to learn; raise --cutoff_len"
        )
    report = {"rows": len(encoded), "truncated": truncated, "dropped_no_target": dropped,
              "empty_outputs": empty_outputs}
    return kept.remove_columns(["truncated", "trainable_tokens"]), report
