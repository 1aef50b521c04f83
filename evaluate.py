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
from pathlib import Path
from typing import Any

from utils import llm
from utils.core.cli import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, choices, option_checks, run_cli
from utils.core.errors import UserError
from utils.core.io import atomic_write, check_output_file, jsonl_text, read_records
from utils.evaluation.judge import criteria, default_judge_cache, judge_config, judge_scores
from utils.evaluation.metrics import METRIC_NAMES, corpus_scores
from utils.prompter import Prompter

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


def compare_paths(compare: Any, more_files: tuple[Any, ...]) -> list[str]:
    """`--compare A B C`, `A B C --compare` and `--compare A,B,C` all name the files A, B and C."""
    names: list[Any] = []
    if isinstance(compare, (list, tuple)):
        names.extend(compare)
    elif compare is not True:
        names.append(compare)
    names.extend(more_files)
    paths: list[str] = []
    for name in map(str, names):
        paths.extend([name] if Path(name).exists() or "," not in name else [p for p in name.split(",") if p])
    return paths


def run_benchmark(benchmark: str, base_model: str, lora_weights: str = "", subjects: str = "", n_shot: int = 0,
                  benchmark_format: str = "", scoring: str = "", batch_size: int = 8, max_questions: int = 0,
                  max_new_tokens: int = 32, precision: str = "auto", output: str = "",
                  predictions_out: str = "", gguf_file: str = "", prompt_template: str = "") -> None:
    """Score the base model and each adapter on a multiple-choice benchmark: one table, one report, one prediction
    per question and model. The base loads once; each adapter is put on it with peft and taken off after."""
    from utils.evaluation import benchmarks
    from utils.model.loading import gguf_path, load_adapter, load_for_inference

    for flag, path in (("--output", output), ("--predictions_out", predictions_out)):
        if path:
            check_output_file(path, flag, inputs=[benchmark, output if flag != "--output" else ""])
    adapters = [name for name in lora_weights.split(",") if name.strip()] if lora_weights else []
    if not base_model or len(set(adapters)) < len(adapters):
        raise UserError("--benchmark needs --base_model" if not base_model else "--lora_weights names an adapter twice")
    wanted = [name.strip() for name in subjects.split(",") if name.strip()] if subjects else []
    bench = benchmarks.read_benchmark(benchmark, benchmark_format, wanted, n_shot, max_questions)
    prompter = Prompter(prompt_template) if prompt_template else None  # an unknown one is refused before loading
    model, tokenizer, _ = load_for_inference(gguf_path(base_model, gguf_file), precision=precision)
    if prompter:
        prompter.tokenizer = tokenizer  # a chat template renders with the base model's own
    rows = []
    for label in ["base", *adapters]:
        scored = model if label == "base" else load_adapter(model, label)
        rows += benchmarks.predict(bench, scored, tokenizer, label, n_shot, scoring, batch_size, max_new_tokens,
                                   prompter.generate_prompt if prompter else None)
        model = model if label == "base" else scored.unload()
    report = {"benchmark": str(benchmark), "format": bench.format, "base_model": base_model, "n_shot": n_shot,
              "scoring": scoring or bench.config["scoring"], "models": benchmarks.accuracy_report(bench, rows)}
    if predictions_out:
        atomic_write(predictions_out, jsonl_text(rows))
    if output:
        write_text(output, json.dumps(report, ensure_ascii=False, indent=2))
    print(benchmarks.markdown_table(bench, report["models"]))


def write_text(path: str, text: str) -> None:
    """Written atomically and read back before the result is printed (a full disk fails here, not silently)."""
    written = atomic_write(path, text + "\n")
    if written.read_text(encoding="utf-8") != text + "\n":
        raise UserError(f"{path}: what was written does not read back")


@option_checks(max_retries=NON_NEGATIVE, retry_base_delay=NON_NEGATIVE, timeout=POSITIVE, n_shot=NON_NEGATIVE,
               batch_size=AT_LEAST_ONE, max_questions=NON_NEGATIVE, max_new_tokens=AT_LEAST_ONE,
               scoring=choices("", "logits", "generate"), benchmark_format=choices("", *BENCHMARK_FORMATS))
def main(
    *more_files: str,  # the further files of --compare A.jsonl B.jsonl ...
    predictions: str = "",  # JSON Lines (or a JSON array) from `infer.py --output_file`: `output` and `model_output`
    output: str = "",  # also write the metrics JSON (or, with --compare, the table) here
    compare: Any = None,  # --compare A.jsonl B.jsonl ...: a markdown table, one row per file (same questions in each)
    judge: str = "",  # openai: also have an LLM grade each answer 0–3 on completeness, depth, professionalism
    api_base: str | None = None,  # judge's OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1 (default: OpenAI)
    model: str = "",  # the judge model's name at --api_base (required with --judge)
    api_key_env: str = llm.DEFAULT_API_KEY_ENV,  # environment variable holding the API key (never printed)
    judge_cache: str = "",  # sidecar of graded rows (default PREDICTIONS.judge.jsonl): a rerun asks only the rest
    max_retries: int = 5,  # judge: retries of a failed request or an unusable reply
    retry_base_delay: float = 1.0,  # judge: seconds before the first retry, doubled after each
    timeout: float = 120.0,  # judge: seconds to wait for one reply
    golden_field: str = "output",  # the field holding the golden answer
    answer_field: str = "model_output",  # the field holding the model's answer
    benchmark: str = "",  # score models on a benchmark: CMMLU or C-Eval folder, CMB .json, CMExam .csv, MedQA .jsonl
    base_model: str = "",  # --benchmark: the base model (folder or hub id)
    gguf_file: str = "",  # with a folder --base_model: the GGUF file in it to load (a .gguf --base_model needs none)
    prompt_template: str = "",  # --benchmark: render each question with this template as training did (e.g. chat)
    lora_weights: str = "",  # --benchmark: adapters to score beside the base, comma-separated
    subjects: str = "",  # --benchmark: only these subjects, comma-separated (default: all)
    n_shot: int = 0,  # --benchmark: solved examples from the dev split before each question
    benchmark_format: str = "",  # --benchmark: cmmlu, ceval, cmb, cmexam or medqa (default: told by the layout)
    scoring: str = "",  # --benchmark: logits (the letters' next-token logits) or generate (default: the authors')
    batch_size: int = 8,  # --benchmark: questions per forward pass
    max_questions: int = 0,  # --benchmark: only the first N questions of each subject (0: all)
    max_new_tokens: int = 32,  # --benchmark --scoring generate: the longest answer
    precision: str = "auto",  # --benchmark: auto, fp32, bf16 or fp16
    predictions_out: str = "",  # --benchmark: write one prediction per question and model here (JSON Lines)
) -> None:
    """Print (and with --output write) the metrics JSON of --predictions, or the --compare table; with --benchmark,
    the accuracy table of the base model and each adapter."""
    if benchmark:
        if predictions or (compare is not None and compare is not False) or more_files:
            raise UserError("--benchmark scores models; give it without --predictions or --compare")
        return run_benchmark(benchmark, base_model, lora_weights, subjects, n_shot, benchmark_format, scoring,
                             batch_size, max_questions, max_new_tokens, precision, output, predictions_out,
                             gguf_file=gguf_file, prompt_template=prompt_template)
    comparing = compare is not None and compare is not False
    inputs = [predictions, *(compare_paths(compare, more_files) if comparing else [])]
    if output:  # before any scoring or judging: a folder, an unwritable place or an input file is refused now
        check_output_file(output, "--output", inputs=[name for name in [*inputs, judge_cache] if name])
    if judge and judge_cache:  # the sidecar is appended to: never an input or the metrics file
        check_output_file(judge_cache, "--judge_cache", inputs=[name for name in [*inputs, output] if name])
    config = judge_config(judge, model, api_base, api_key_env, timeout, max_retries, retry_base_delay)

    if comparing:
        if predictions:
            raise UserError("give either --predictions FILE or --compare FILE FILE ..., not both")
        if judge_cache:
            raise UserError("--judge_cache names one sidecar; with --compare each file gets its own FILE.judge.jsonl")
        paths = compare_paths(compare, more_files)
        if not paths:
            raise UserError("--compare needs at least one predictions file")
        table = compare_files(paths, config, golden_field, answer_field)
        if output:
            write_text(output, table)
        print(table)
        return
    if more_files:
        unexpected = " ".join(map(str, more_files))
        raise UserError(f"unexpected arguments: {unexpected} (use --predictions FILE or --compare FILE ...)")
    if not predictions:
        raise UserError("--predictions is required: the JSON Lines file written by `infer.py --output_file`")
    metrics = evaluate_file(predictions, config, judge_cache or None, golden_field, answer_field)
    text = json.dumps(metrics, ensure_ascii=False, indent=2)
    if output:
        write_text(output, text)
    print(text)


if __name__ == "__main__":
    run_cli(main)
