"""CPU benchmark: the original recipe against our defaults, side by side, each run in its own process.

    python benchmarks/cpu.py                 # 2,048 rows, 128 questions, one run each
    python benchmarks/cpu.py --repeat 3      # three runs each, the median reported

Training: the tiny LLaMA base (built once with `utils.tiny_base`) is fine-tuned on 2,048 rows
(`../shared/reference/bentsao/llama_data.json` when present, else `data/llama_data.json`) with the original
command line (`--micro_batch_size 128 --batch_size 128 --cutoff_len 256 --prompt_template_name med_template`,
one epoch, no validation), once with `--packing False` (random padded batches: the original recipe) and once with
our default: the same rows, the same number of optimizer steps and rows per step. Time: `trainer.train`'s own
runtime as finetune.py reports it (`train_loop_s`; model loading and tokenising excluded, the same in both).

Inference: 128 other questions of the same file answered greedily by base + the adapter trained above, one at a
time (`--batch_size 1`) and batched (infer.py's default for greedy decoding), through the function infer.py uses
(`utils.generation.generate_answers`); only generation is timed (after a one-question warm-up), and the answers
must be identical. The tiny model ends most answers after a token or two, where a real model writes 100-250
tokens, so every answer is made exactly `--max_new_tokens 64` tokens long (`min_new_tokens`; `--stop_at_eos`
turns that off): the benchmark measures decoding, not how soon a barely trained model stops.

Each benchmark prints one JSON line: name, baseline_s, ours_s, speedup (medians over --repeat; the speedup is
the median of the per-run ratios), pad_fraction of both, and the single runs. Baseline and ours alternate within
each repeat (ABBA order), so load from other processes on a shared machine hits both alike.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from utils.core.cli import flag, run_cli  # noqa: E402 - no torch: a mistyped flag is answered at once

REFERENCE_DATA = REPO.parent / "shared" / "reference" / "bentsao" / "llama_data.json"
PROJECT_DATA = REPO / "data" / "llama_data.json"
# the published scripts/finetune.sh flags, less the paths (one epoch and no validation set, to time training only)
ORIGINAL_FLAGS = [
    "--prompt_template_name", "med_template", "--micro_batch_size", "128", "--batch_size", "128",
    "--cutoff_len", "256", "--learning_rate", "3e-4", "--num_epochs", "1", "--val_set_size", "0",
    "--wandb_run_name", "e1",
]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def read_rows(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def python_env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")


def run(command: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=REPO, env=python_env(), capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def ensure_base(base_model: str | None, workdir: Path) -> Path:
    if base_model:
        return Path(base_model)
    folder = workdir / "tiny-llama"
    if not (folder / "config.json").is_file():
        log(f"building the tiny LLaMA base in {folder}")
        run([sys.executable, "-m", "utils.tiny_base", "--arch", "llama", "--output_dir", str(folder)])
    return folder


def train_once(base: Path, data: Path, output_dir: Path, packing: bool, extra: list[str]) -> dict[str, Any]:
    """One finetune.py process; its summary line (train_loop_s, pad_fraction, tokens_per_s, ...)."""
    command = [sys.executable, "finetune.py", "--base_model", str(base), "--data_path", str(data),
               "--output_dir", str(output_dir), "--overwrite", "True", *ORIGINAL_FLAGS,
               "--packing", str(packing), *extra]
    started = time.perf_counter()
    result = run(command)
    process_s = time.perf_counter() - started
    line = next(line for line in result.stdout.splitlines() if line.startswith("summary: "))
    summary = json.loads(line[len("summary: "):])
    summary["process_s"] = round(process_s, 1)
    return summary


def answer_once(base: Path, adapter: Path, questions: Path, batch_size: int, max_new_tokens: int,
                answers: Path, fixed_length: bool = True) -> float:
    """One process answering `questions`; returns the generation time (model loading excluded)."""
    job = {"base_model": str(base), "lora_weights": str(adapter), "questions": str(questions),
           "batch_size": batch_size, "max_new_tokens": max_new_tokens, "answers": str(answers),
           "fixed_length": fixed_length}
    result = run([sys.executable, str(Path(__file__).resolve()), "answer", "--job", json.dumps(job)])
    return float(json.loads(result.stdout.strip().splitlines()[-1])["generate_s"])


@dataclass(frozen=True)
class AnswerArgs:
    """(internal) `benchmarks/cpu.py answer --job JSON`: one inference process."""

    job: str = flag("{}", "the job, as JSON: base_model, lora_weights, questions, answers, batch_size, max_new_tokens, "
                          "fixed_length (answers exactly max_new_tokens long)")


def answer_worker(args: AnswerArgs) -> None:
    """Load, answer greedily, time generation, write the answers."""
    from types import SimpleNamespace

    from utils.generation.args import GenerationArgs
    from utils.generation.engine import generate_answers
    from utils.model.loading import load_for_inference
    from utils.prompter import Prompter

    args = SimpleNamespace(**json.loads(args.job))
    model, tokenizer, _ = load_for_inference(args.base_model, args.lora_weights or None)
    config = GenerationArgs(max_new_tokens=args.max_new_tokens, num_beams=1).config(tokenizer)
    if args.fixed_length:  # the tiny model ends most answers at once; a real one writes 100-250 tokens
        config.min_new_tokens = args.max_new_tokens
    prompter = Prompter("med_template")
    rows = read_rows(Path(args.questions))
    prompts = [prompter.generate_prompt(row["instruction"], row.get("input") or None) for row in rows]
    generate_answers(model, tokenizer, prompts[:1], config, batch_size=1, progress=False)  # warm-up, not timed
    started = time.perf_counter()
    answers = generate_answers(model, tokenizer, prompts, config, batch_size=args.batch_size, progress=False)
    elapsed = time.perf_counter() - started
    Path(args.answers).write_text(json.dumps(answers, ensure_ascii=False), encoding="utf-8")
    encoded = [len(tokenizer(prompt)["input_ids"]) for prompt in prompts]
    print(json.dumps({"generate_s": round(elapsed, 3), "prompt_tokens": sum(encoded)}))


def prompt_pad_fraction(base: Path, questions: Path, batch_size: int) -> float:
    """Padding share of the left-padded prompt batches (rows sorted by length, as generate_answers does)."""
    sys.path.insert(0, str(REPO))
    from transformers import AutoTokenizer

    from utils.prompter import Prompter

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    prompter = Prompter("med_template")
    rows = read_rows(questions)
    texts = [prompter.generate_prompt(row["instruction"], row.get("input") or None) for row in rows]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
    lengths = [len(tokenizer(texts[i])["input_ids"]) for i in order]
    real = padded = 0
    for start in range(0, len(lengths), batch_size):
        chunk = lengths[start:start + batch_size]
        real += sum(chunk)
        padded += max(chunk) * len(chunk)
    return 1 - real / padded if padded else 0.0


def median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def machine() -> dict[str, Any]:
    import torch

    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "date": datetime.date.today().isoformat()}


def benchmark_training(args: BenchArgs, base: Path, data: Path, workdir: Path) -> tuple[dict, Path]:
    runs = []
    adapter = workdir / "ours-0"
    for repeat in range(args.repeat):
        order = [False, True] if repeat % 2 == 0 else [True, False]  # ABBA: drifting load hits both alike
        result: dict[bool, dict[str, Any]] = {}
        for packing in order:
            name = "ours" if packing else "baseline"
            log(f"training repeat {repeat + 1}/{args.repeat}: {name}")
            extra = shlex.split(args.ours_flags) if packing else []
            result[packing] = train_once(base, data, workdir / f"{name}-{repeat}", packing, extra)
        baseline, ours = result[False], result[True]
        runs.append({
            "baseline_s": baseline["train_loop_s"], "ours_s": ours["train_loop_s"],
            "speedup": round(baseline["train_loop_s"] / ours["train_loop_s"], 3),
            "baseline_process_s": baseline["process_s"], "ours_process_s": ours["process_s"],
            "baseline_loss": baseline["train_loss"], "ours_loss": ours["train_loss"],
        })
        log(json.dumps(runs[-1]))
    line = {
        "name": "train",
        "baseline_s": median([r["baseline_s"] for r in runs]),
        "ours_s": median([r["ours_s"] for r in runs]),
        "speedup": median([r["speedup"] for r in runs]),
        "pad_fraction": {"baseline": baseline["pad_fraction"], "ours": ours["pad_fraction"]},
        "tokens_per_s": {"baseline": baseline["tokens_per_s"], "ours": ours["tokens_per_s"]},
        "batching": {"baseline": baseline["batching"], "ours": ours["batching"]},
        "rows": baseline["train_rows"], "steps": {"baseline": baseline["steps"], "ours": ours["steps"]},
        "train_loss": {"baseline": baseline["train_loss"], "ours": ours["train_loss"]},
        "timed": "trainer.train runtime (train_loop_s)", "repeat": args.repeat, "runs": runs,
        "ours_flags": shlex.split(args.ours_flags), "machine": machine(),
    }
    return line, adapter


def benchmark_inference(args: BenchArgs, base: Path, adapter: Path, questions: Path,
                        workdir: Path) -> dict:
    runs = []
    identical = []
    for repeat in range(args.repeat):
        order = [1, args.batch_size] if repeat % 2 == 0 else [args.batch_size, 1]
        times: dict[int, float] = {}
        for batch_size in order:
            log(f"inference repeat {repeat + 1}/{args.repeat}: batch_size {batch_size}")
            times[batch_size] = answer_once(base, adapter, questions, batch_size, args.max_new_tokens,
                                            workdir / f"answers-{batch_size}-{repeat}.json", not args.stop_at_eos)
        one = json.loads((workdir / f"answers-1-{repeat}.json").read_text(encoding="utf-8"))
        batched = json.loads((workdir / f"answers-{args.batch_size}-{repeat}.json").read_text(encoding="utf-8"))
        identical.append(sum(a == b for a, b in zip(one, batched, strict=True)))
        runs.append({"baseline_s": times[1], "ours_s": times[args.batch_size],
                     "speedup": round(times[1] / times[args.batch_size], 3), "identical": identical[-1]})
        log(json.dumps(runs[-1]))
    questions_count = len(read_rows(questions))
    return {
        "name": "infer",
        "baseline_s": median([r["baseline_s"] for r in runs]),
        "ours_s": median([r["ours_s"] for r in runs]),
        "speedup": median([r["speedup"] for r in runs]),
        "pad_fraction": {"baseline": 0.0, "ours": round(prompt_pad_fraction(base, questions, args.batch_size), 4)},
        "answers_identical": f"{min(identical)}/{questions_count}",
        "questions": questions_count, "batch_size": {"baseline": 1, "ours": args.batch_size},
        "max_new_tokens": args.max_new_tokens,
        "decoding": "greedy" + ("" if args.stop_at_eos else f", exactly {args.max_new_tokens} new tokens per answer"),
        "timed": "generation only (utils.generation.generate_answers)", "repeat": args.repeat, "runs": runs,
    }


@dataclass(frozen=True)
class BenchArgs:
    """The flags of benchmarks/cpu.py."""

    rows: int = flag(2048, "training rows", low=1)
    questions: int = flag(128, "inference questions", low=1)
    max_new_tokens: int = flag(64, "tokens generated per answer (every answer that long unless --stop_at_eos)", low=1)
    batch_size: int = flag(0, "batched inference size (0: infer.py's default for greedy decoding)", low=0)
    repeat: int = flag(1, "runs of each benchmark (baseline and ours alternate, ABBA); the medians are reported", low=1)
    stop_at_eos: bool = flag(False, "let answers end at EOS (the tiny model ends most at once)")
    data: str = flag("", "instruction data (default: the published file, else the project's)")
    base_model: str = flag("", "an existing tiny base (default: build one in --workdir)")
    workdir: str = flag("", "where bases, adapters and answers go (default: a temp folder)")
    ours_flags: str = flag("", 'extra finetune.py flags for ours, e.g. "--pack_len 512"')
    skip: str = flag("", "leave out one benchmark: train (then an adapter is trained once for infer) or infer",
                     choices=("", "train", "infer"))


def main(args: BenchArgs) -> list[dict]:
    """The original recipe against our defaults, training and inference, each run in its own process."""
    from utils.generation.engine import default_batch_size

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bentsao-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    args = replace(args, batch_size=args.batch_size or default_batch_size(1))
    data_path = Path(args.data) if args.data else (REFERENCE_DATA if REFERENCE_DATA.is_file() else PROJECT_DATA)
    rows = read_rows(data_path)
    if len(rows) < args.rows + args.questions:
        raise SystemExit(f"{data_path} has {len(rows)} rows; need {args.rows} + {args.questions}")
    train_file = write_jsonl(workdir / "train.jsonl", rows[:args.rows])
    question_file = write_jsonl(workdir / "questions.jsonl",
                                [{"instruction": r["instruction"], "input": r.get("input", "")}
                                 for r in rows[args.rows:args.rows + args.questions]])
    log(f"data: {data_path} ({args.rows} training rows, {args.questions} questions); workdir {workdir}")
    base = ensure_base(args.base_model, workdir)
    lines = []
    adapter = workdir / "ours-0"
    if args.skip != "train":
        line, adapter = benchmark_training(args, base, train_file, workdir)
        line["data"] = str(data_path)
        print(json.dumps(line, ensure_ascii=False), flush=True)
        lines.append(line)
    if args.skip != "infer":
        if not (adapter / "adapter_config.json").is_file():
            train_once(base, train_file, adapter, True, [])
        line = benchmark_inference(args, base, adapter, question_file, workdir)
        print(json.dumps(line, ensure_ascii=False), flush=True)
        lines.append(line)
    return lines


if __name__ == "__main__":
    run_cli({"answer": answer_worker} if sys.argv[1:2] == ["answer"] else main)
