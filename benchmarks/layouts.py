"""Micro-benchmark behind the batching design: forward + backward of the same optimizer steps in several layouts.

    python benchmarks/layouts.py --base_model DIR [--steps 3] [--repeat 3] [--threads 1]

The tiny LLaMA with LoRA (q_proj, v_proj, r=8, no dropout) runs `--steps` steps of 128 rows of the published data
(cutoff 256), each step laid out as:
- `padded128`: the original recipe, one micro-batch of 128 random rows padded to the longest;
- `bucketK`: the rows sorted by length, K micro-batches each padded to its own longest;
- `packL`: packed into bins of L tokens (position_ids restart, no attention mask), one micro-batch;
- `packLxK`: the same bins shared out over K micro-batches;
each with the full logits (`+full`) or logits on label positions only (`+labels`). Every layout must give the same
loss (checked to 1e-4 here; the tests check 1e-5). Time: process CPU time (`--clock cpu`, steadier than wall time on
a shared machine) or wall time, median of `--repeat` runs, all layouts interleaved in one process.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "reference" / "bentsao" / "llama_data.json"

from utils.core.cli import flag, run_cli  # noqa: E402 - no torch: a mistyped flag is answered at once
from utils.core.errors import UserError  # noqa: E402


@dataclass(frozen=True)
class LayoutArgs:
    """The flags of benchmarks/layouts.py."""

    base_model: str = flag("", "the tiny base folder (python -m utils.tiny_base)")
    data: str = flag(str(DATA if DATA.is_file() else REPO / "data" / "llama_data.json"),
                     "instruction data; the first 2,048 rows are read (default: the published file)")
    steps: int = flag(3, "optimizer steps of 128 rows each", low=1)
    repeat: int = flag(3, "runs of every layout; the median is reported", low=1)
    threads: int = flag(1, "torch threads", low=1)
    clock: str = flag("cpu", "cpu: process CPU time (steadier on a shared machine); wall: elapsed time",
                      choices=("cpu", "wall"))


def layouts(steps: list[list[dict]], pad: int) -> dict[str, list[list[dict]]]:
    from utils.training.batching import PackingCollator, PaddingCollator, first_fit_decreasing

    def sort(rows: list[dict]) -> list[dict]:
        return sorted(rows, key=lambda r: len(r["input_ids"]))

    def split(rows: list[dict], k: int) -> list[list[dict]]:
        return [rows[j * len(rows) // k:(j + 1) * len(rows) // k] for j in range(k)]

    def packed_split(rows: list[dict], pack_len: int, k: int) -> list[list[dict]]:
        bins = first_fit_decreasing([len(r["input_ids"]) for r in rows], pack_len)
        return [[rows[i] for b in bins[j::k] for i in b] for j in range(k)]

    padded = PaddingCollator(pad)
    result: dict[str, list[list[dict]]] = {"padded128": [[padded(s)] for s in steps]}
    for k in (4, 8):
        result[f"bucket{k}"] = [[padded(c) for c in split(sort(s), k)] for s in steps]
    for pack_len in (256, 512, 1024):
        result[f"pack{pack_len}"] = [[PackingCollator(pad, pack_len)(s)] for s in steps]
    for k in (2, 4):
        result[f"pack256x{k}"] = [[PackingCollator(pad, 256)(c) for c in packed_split(s, 256, k)] for s in steps]
    return result


def with_label_positions(batch: dict) -> dict:
    import torch

    labels = batch["labels"]
    shift = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    keep = shift != -100
    return {**batch, "shift_labels": shift[keep], "logits_to_keep": keep}


def run(model, steps: list[list[dict]], clock) -> tuple[float, float]:
    started, total = clock(), 0.0
    for micro in steps:
        count = sum((b["shift_labels"] if "shift_labels" in b else b["labels"][:, 1:]).ne(-100).sum() for b in micro)
        for batch in micro:
            loss = model(**batch, num_items_in_batch=count).loss
            loss.backward()
            total += loss.item()
    return clock() - started, total


def main(args: LayoutArgs) -> None:
    """Forward + backward of the same optimizer steps in several batch layouts (the design's micro-benchmark)."""
    import torch

    if not args.base_model:
        raise UserError("--base_model is required: the tiny base folder (python -m utils.tiny_base)")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from utils.data import read_instruction_rows, tokenize_row
    from utils.model.loading import load_tokenizer
    from utils.prompter import Prompter

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokenizer = load_tokenizer(args.base_model)
    prompter = Prompter("med_template")
    rows = read_instruction_rows(args.data)[:2048]
    items = [tokenize_row(row, prompter, tokenizer, 256) for row in rows]
    features = [{"input_ids": it.input_ids, "labels": it.labels} for it in items]
    random.Random(0).shuffle(features)
    steps = [features[s * 128:(s + 1) * 128] for s in range(args.steps)]
    model = AutoModelForCausalLM.from_pretrained(args.base_model)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                             task_type="CAUSAL_LM"))
    model.train()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    variants = {}
    for name, batches in layouts(steps, tokenizer.pad_token_id).items():
        variants[f"{name}+full"] = batches
        variants[f"{name}+labels"] = [[with_label_positions(b) for b in micro] for micro in batches]
    real = sum(len(f["input_ids"]) for s in steps for f in s)
    times: dict[str, list[float]] = {name: [] for name in variants}
    losses: dict[str, float] = {}
    for _ in range(args.repeat):
        for name, batches in variants.items():
            elapsed, losses[name] = run(model, batches, clock)
            times[name].append(elapsed)
    reference = losses["padded128+full"]
    base_time = statistics.median(times["padded128+full"])
    for name, batches in variants.items():
        total = sum(int(b["input_ids"].numel()) for micro in batches for b in micro)
        assert abs(losses[name] - reference) < 1e-4, (name, losses[name], reference)
        median = statistics.median(times[name])
        print(json.dumps({"layout": name, "seconds": round(median, 2), "speedup": round(base_time / median, 2),
                          "pad_fraction": round(1 - real / total, 3), "micro_batches": len(batches[0]),
                          "loss": round(losses[name], 5), "clock": args.clock, "threads": args.threads,
                          "runs": [round(t, 2) for t in times[name]]}), flush=True)


if __name__ == "__main__":
    run_cli(main)
