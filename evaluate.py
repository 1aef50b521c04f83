"""Score the answers that `infer.py --output_file` wrote: character-level BLEU-4 and ROUGE-1/2/L, or an LLM judge.

    python evaluate.py --predictions outputs/med.jsonl --output outputs/med.metrics.json
    python evaluate.py --compare outputs/base.jsonl outputs/med.jsonl       # a markdown table, one row per file
    OPENAI_API_KEY=... python evaluate.py --predictions outputs/med.jsonl \
        --judge openai --api_base https://api.openai.com/v1 --model gpt-4o-mini

`--compare` puts files of the same questions side by side: every file must hold the same rows (instruction,
input and golden `output`; any order). Files with different row counts or questions are refused with one error
line, not a warning: their means would differ because the questions differ, and the table would not show it.

Each row needs the golden answer (`output`) and the model's answer (`model_output`). Chinese is scored per
character (every non-whitespace character is one token), so no word segmenter is needed and none is used;
whitespace is dropped. Scores are averaged over rows and reported on a 0–100 scale under `bleu-4`,
`rouge-1`, `rouge-2`, `rouge-l` (F1), with `rows`. BLEU-4 uses add-one smoothing on 2- to 4-grams and the
usual brevity penalty; utils/evaluation/metrics.py documents the formulas.

`--benchmark PATH --base_model B [--lora_weights A,A2] [--n_shot K]` scores multiple-choice benchmarks (CMMLU,
C-Eval, CMB, CMExam, MedQA-MCMLE) as their authors do: docs/ui_and_eval.md, utils/evaluation/benchmarks.py.

`--judge openai` also asks an OpenAI-compatible chat-completions endpoint to grade each answer 0–3 on
完整性 (completeness), 深刻性 (depth) and 专业性 (professionalism), the CMCOQA rubric, and averages each (0–3).
The API key is read from the environment variable that `--api_key_env` names. Failed requests (429, 5xx,
timeouts) are retried by the openai SDK, unusable replies are asked again with exponential backoff (utils/llm.py);
every graded row is appended
to a sidecar file (`--judge_cache`, by default PREDICTIONS.judge.jsonl), so a second run asks only about rows
not graded yet, and an interrupted one loses nothing.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils import llm
from utils.core.cli import flag, run_cli
from utils.core.errors import UserError, raise_problems
from utils.core.io import atomic_write, jsonl_text, output_file_problems, read_records
from utils.evaluation.judge import criteria, default_judge_cache, judge_config, judge_scores
from utils.evaluation.metrics import METRIC_NAMES, corpus_scores
from utils.model.gguf import GGUF_FILE_HELP, fold_gguf_file
from utils.model.source import source_problems
from utils.prompter import Prompter, template_problems

BENCHMARK_FORMATS = ("cmmlu", "ceval", "cmb", "cmexam", "medqa")

# --- reading predictions -----------------------------------------------------------------------------------


def read_predictions(path: str | Path, golden_field: str = "output", answer_field: str = "model_output") -> list[dict]:
    """Rows of an `infer.py --output_file`; each must hold the golden answer and the model's answer as strings."""
    located = read_records(path)
    for where, row in located:
        for field, hint in ((golden_field, "the golden answer"), (answer_field, "the model's answer")):
            if field not in row or row[field] is None:
                extra = " (is this an `infer.py --output_file`?)" if field == answer_field else ""
                raise UserError(f"{path} {where}: missing field `{field}`, {hint}{extra}")
            if not isinstance(row[field], str):
                raise UserError(f"{path} {where}: field `{field}` must be a string, got {type(row[field]).__name__}")
    return [row for _, row in located]


def overlap_scores(
    rows: list[dict], golden_field: str = "output", answer_field: str = "model_output"
) -> dict[str, Any]:
    """BLEU-4 and ROUGE-1/2/L (0–100, mean over rows) and `rows`."""
    scores = corpus_scores((row[answer_field], row[golden_field]) for row in rows)
    return {name: round(scores[name], 4) for name in METRIC_NAMES} | {"rows": scores["rows"]}


# --- the command line --------------------------------------------------------------------------------------


def evaluate_file(
    path: str | Path,
    judge: llm.ChatConfig | None = None,
    judge_cache: str | Path | None = None,
    golden_field: str = "output",
    answer_field: str = "model_output",
    rows: list[dict] | None = None,
) -> dict[str, Any]:
    """Metrics of one predictions file (its `rows`, when already read), plus the judge's scores when a judge is
    configured."""
    rows = rows if rows is not None else read_predictions(path, golden_field, answer_field)
    metrics = overlap_scores(rows, golden_field, answer_field)
    if judge is not None:
        cache = Path(judge_cache) if judge_cache else default_judge_cache(path)
        metrics |= judge_scores(rows, cache, judge, golden_field, answer_field)
    return metrics


def markdown_table(results: dict[str, dict[str, Any]]) -> str:
    """One row per predictions file: rows, BLEU-4, ROUGE-1/2/L (and the judge's scores when every file has them)."""
    columns = ["rows", *METRIC_NAMES]
    if results and all("judge-mean" in metrics for metrics in results.values()):
        columns += [f"judge-{name}" for name in criteria()] + ["judge-mean"]
    lines = ["| predictions | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for name, metrics in results.items():
        cells = [str(metrics[column]) if column == "rows" else f"{metrics[column]:.2f}" for column in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def question_key(row: dict, golden_field: str = "output") -> tuple[str, str, str]:
    """What makes two rows the same test item: the question, its input and the golden answer."""
    return str(row.get("instruction", "")), str(row.get("input") or ""), str(row[golden_field])


def check_comparable(rows_by_path: dict[str, list[dict]], golden_field: str = "output") -> None:
    """A comparison table is only meaningful over the same test items: every file must hold the same questions
    (and golden answers), in any order. Different files are an error, not a warning: the means in such a table
    would differ because the questions differ, and nothing in the table would show it."""
    first, *others = rows_by_path
    reference = Counter(question_key(row, golden_field) for row in rows_by_path[first])
    for path in others:
        rows = rows_by_path[path]
        if len(rows) != len(rows_by_path[first]):
            raise UserError(f"--compare: {path} has {len(rows)} rows but {first} has {len(rows_by_path[first])}; a "
                            "table compares models only on the same questions: answer the same --instruct_dir with "
                            "each model, or score the files one by one with --predictions")
        seen: Counter[tuple[str, str, str]] = Counter()
        for index, row in enumerate(rows, start=1):
            key = question_key(row, golden_field)
            seen[key] += 1
            if seen[key] > reference[key]:
                question = row.get("instruction", "")
                shown = question if len(question) <= 40 else question[:40] + "…"
                raise UserError(f"--compare: {path} row {index} ({shown!r}) matches no question of {first} (its "
                                f"question, input or golden `{golden_field}` differs, or it repeats one); a table "
                                "compares models only on the same questions: answer the same --instruct_dir with "
                                "each model, or score the files one by one with --predictions")


def compare_files(
    paths: list[str], judge: llm.ChatConfig | None = None, golden_field: str = "output",
    answer_field: str = "model_output",
) -> str:
    """The markdown table comparing predictions files (e.g. base model, alpaca adapter, medical adapter) on the
    same questions (checked first); each file's judge sidecar is FILE.judge.jsonl."""
    rows_by_path = {path: read_predictions(path, golden_field, answer_field) for path in paths}
    check_comparable(rows_by_path, golden_field)
    return markdown_table({path: evaluate_file(path, judge, None, golden_field, answer_field, rows)
                           for path, rows in rows_by_path.items()})


def compare_paths(compare: str, more_files: tuple[str, ...]) -> list[str]:
    """`--compare A B C`, `A B C --compare` and `--compare A,B,C` all name the files A, B and C."""
    names = [compare] if compare not in ("", "True") else []
    paths: list[str] = []
    for name in [*names, *more_files]:
        paths.extend([name] if Path(name).exists() or "," not in name else [p for p in name.split(",") if p])
    return paths


@dataclass(frozen=True)
class EvaluateArgs:
    """The flags of evaluate.py."""

    predictions: str = flag("", "JSON Lines (or a JSON array) from `infer.py --output_file`: `output` and "
                                "`model_output`")
    output: str = flag("", "also write the metrics JSON (or, with --compare, the table) here")
    compare: str = flag("", "--compare A.jsonl B.jsonl ...: a markdown table, one row per file (same questions)")
    more_files: tuple[str, ...] = flag((), "the further files of --compare A.jsonl B.jsonl ...", positional=True)
    judge: str = flag("", "openai: also have an LLM grade each answer 0-3 on completeness, depth, professionalism",
                      choices=("", "openai"))
    api_base: str = flag("", "judge's OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1 (default: OpenAI)")
    model: str = flag("", "the judge model's name at --api_base (required with --judge)")
    api_key_env: str = flag(llm.DEFAULT_API_KEY_ENV, "environment variable holding the API key (never printed)")
    judge_cache: str = flag("", "sidecar of graded rows (default PREDICTIONS.judge.jsonl): a rerun asks only the rest")
    max_retries: int = flag(5, "judge: retries of a failed request or an unusable reply", low=0)
    retry_base_delay: float = flag(1.0, "judge: seconds before the first retry, doubled after each", low=0)
    timeout: float = flag(120.0, "judge: seconds to wait for one reply", above=0)
    golden_field: str = flag("output", "the field holding the golden answer")
    answer_field: str = flag("model_output", "the field holding the model's answer")
    benchmark: str = flag("", "score models on a benchmark: CMMLU or C-Eval folder, CMB .json, CMExam .csv, MedQA "
                              ".jsonl")
    base_model: str = flag("", "--benchmark: the base model (folder, hub id or .gguf file)")
    gguf_file: str = flag("", GGUF_FILE_HELP)
    prompt_template: str = flag("", "--benchmark: render each question with this template as training did (e.g. "
                                    "chat; default: the benchmark's own prompt as it is)")
    lora_weights: str = flag("", "--benchmark: adapters to score beside the base, comma-separated")
    subjects: str = flag("", "--benchmark: only these subjects, comma-separated (default: all)")
    n_shot: int = flag(0, "--benchmark: solved examples from the dev split before each question", low=0)
    benchmark_format: str = flag("", "--benchmark: cmmlu, ceval, cmb, cmexam or medqa (default: told by the layout)",
                                 choices=("", *BENCHMARK_FORMATS))
    scoring: str = flag("", "--benchmark: logits (the letters' next-token logits) or generate (default: the authors')",
                        choices=("", "logits", "generate"))
    batch_size: int = flag(8, "--benchmark: questions per forward pass", low=1)
    max_questions: int = flag(0, "--benchmark: only the first N questions of each subject (0: all)", low=0)
    max_new_tokens: int = flag(32, "--benchmark --scoring generate: the longest answer", low=1)
    precision: str = flag("auto", "--benchmark: auto, fp32, bf16 or fp16", choices=("auto", "bf16", "fp16", "fp32"))
    predictions_out: str = flag("", "--benchmark: write one prediction per question and model here (JSON Lines)")

    def __post_init__(self) -> None:
        fold_gguf_file(self)


def validate(args: EvaluateArgs) -> list[str]:
    """Every problem with the options, before any scoring or judging: outputs never an input of the run."""
    if args.benchmark:
        return benchmark_problems(args)
    comparing = bool(args.compare)
    inputs = [args.predictions, *(compare_paths(args.compare, args.more_files) if comparing else [])]
    problems = output_file_problems(args.output, "--output", inputs=[*inputs, args.judge_cache]) if args.output else []
    if args.judge and args.judge_cache:  # the sidecar is appended to: never an input or the metrics file
        problems += output_file_problems(args.judge_cache, "--judge_cache", inputs=[*inputs, args.output])
    if comparing and args.predictions:
        problems.append("give either --predictions FILE or --compare FILE FILE ..., not both")
    if comparing and args.judge_cache:
        problems.append("--judge_cache names one sidecar; with --compare each file gets its own FILE.judge.jsonl")
    if comparing and not inputs[1:]:
        problems.append("--compare needs at least one predictions file")
    if not comparing and args.more_files:
        problems.append(f"unexpected arguments: {' '.join(args.more_files)} (use --predictions FILE or --compare "
                        "FILE ...)")
    if not comparing and not args.predictions:
        problems.append("--predictions is required: the JSON Lines file written by `infer.py --output_file`")
    return problems


def benchmark_problems(args: EvaluateArgs) -> list[str]:
    from utils.model.checks import adapter_source_problems  # torch: only for benchmarks

    adapters = [name.strip() for name in args.lora_weights.split(",") if name.strip()]
    problems = source_problems(args.base_model, "--base_model", "config.json") + template_problems(
        args.prompt_template) if args.base_model else ["--benchmark needs --base_model"]
    if len(set(adapters)) < len(adapters):
        problems.append("--lora_weights names an adapter twice")
    problems += [problem for adapter in adapters for problem in adapter_source_problems(adapter)]
    if args.predictions or args.compare or args.more_files:
        problems.append("--benchmark scores models; give it without --predictions or --compare")
    for flag_name, path, inputs in (("--output", args.output, [args.benchmark]),
                                    ("--predictions_out", args.predictions_out, [args.benchmark, args.output])):
        if path:  # before the models load: a folder, an unwritable place or an input is refused now
            problems += output_file_problems(path, flag_name, inputs=inputs)
    return problems


def run_benchmark(args: EvaluateArgs) -> None:
    """Score the base model and each adapter on a multiple-choice benchmark: one table, one report, one prediction
    per question and model. The base loads once; each adapter is put on it with peft and taken off after."""
    from utils.evaluation import benchmarks
    from utils.model.loading import load_adapter, load_for_inference

    adapters = [name.strip() for name in args.lora_weights.split(",") if name.strip()]
    wanted = [name.strip() for name in args.subjects.split(",") if name.strip()]
    bench = benchmarks.read_benchmark(args.benchmark, args.benchmark_format, wanted, args.n_shot, args.max_questions)
    model, tokenizer, _ = load_for_inference(args.base_model, precision=args.precision)
    prompter = Prompter(args.prompt_template, tokenizer=tokenizer) if args.prompt_template else None
    rows = []
    for label in ["base", *adapters]:
        scored = model if label == "base" else load_adapter(model, label)
        rows += benchmarks.predict(bench, scored, tokenizer, label, args.n_shot, args.scoring, args.batch_size,
                                   args.max_new_tokens, prompter.generate_prompt if prompter else None)
        model = model if label == "base" else scored.unload()
    report = {"benchmark": str(args.benchmark), "format": bench.format, "base_model": args.base_model,
              "n_shot": args.n_shot, "scoring": args.scoring or bench.config["scoring"],
              "models": benchmarks.accuracy_report(bench, rows)}
    if args.predictions_out:
        atomic_write(args.predictions_out, jsonl_text(rows))
    if args.output:
        atomic_write(args.output, json.dumps(report, ensure_ascii=False, indent=2) + "\n")
    print(benchmarks.markdown_table(bench, report["models"]))


def main(args: EvaluateArgs) -> None:
    """Print (and with --output write) the metrics JSON of --predictions, or the --compare table."""
    raise_problems(validate(args))
    if args.benchmark:
        return run_benchmark(args)
    config = judge_config(args.judge, args.model, args.api_base or None, args.api_key_env, args.timeout,
                          args.max_retries, args.retry_base_delay)
    if args.compare:
        text = compare_files(compare_paths(args.compare, args.more_files), config, args.golden_field,
                             args.answer_field)
    else:
        metrics = evaluate_file(args.predictions, config, args.judge_cache or None, args.golden_field,
                                args.answer_field)
        text = json.dumps(metrics, ensure_ascii=False, indent=2)
    if args.output:
        atomic_write(args.output, text + "\n")
    print(text)


if __name__ == "__main__":
    run_cli(main)
