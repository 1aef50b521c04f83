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
usual brevity penalty; utils/metrics.py documents the formulas.

`--judge openai` also asks an OpenAI-compatible chat-completions endpoint to grade each answer 0–3 on
完整性 (completeness), 深刻性 (depth) and 专业性 (professionalism), the CMCOQA rubric, and averages each (0–3).
The API key is read from the environment variable that `--api_key_env` names. Failed requests (429, 5xx,
timeouts) are retried by the openai SDK, unusable replies are asked again with exponential backoff (utils/llm.py);
every graded row is appended
to a sidecar file (`--judge_cache`, by default PREDICTIONS.judge.jsonl), so a second run asks only about rows
not graded yet, and an interrupted one loses nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from utils import llm
from utils.core.cli import NON_NEGATIVE, POSITIVE, option_checks, run_cli
from utils.core.errors import UserError
from utils.core.io import atomic_write, check_output_file, read_records
from utils.evaluation.metrics import METRIC_NAMES, corpus_scores

JUDGE_CRITERIA = {"completeness": "完整性", "depth": "深刻性", "professionalism": "专业性"}
JUDGE_SYSTEM = "你是一名严谨的临床医生，负责评审医疗问答助手的回答。只输出 JSON，不要输出其他内容。"
JUDGE_RUBRIC = (
    "1. 完整性 (completeness)：是否回应了问题的全部要点。"
    "0 = 没有回答或答非所问；1 = 只涉及少数要点；2 = 涵盖大部分要点；3 = 要点齐全。\n"
    "2. 深刻性 (depth)：是否说明了原因、机制或判断依据，而不只是罗列结论。"
    "0 = 没有任何解释；1 = 解释很浅；2 = 有一定深度；3 = 解释透彻、层次清楚。\n"
    "3. 专业性 (professionalism)：医学内容是否准确、用语是否规范、建议是否安全（例如在需要时提示就医）。"
    "0 = 有错误或不安全的内容；1 = 较多不准确之处；2 = 基本准确；3 = 准确、规范、安全。"
)
JUDGE_PROMPT = """请评审下面这个医疗问题的回答，按三个维度各打 0 到 3 的整数分：

{rubric}

参考答案只用来帮助你判断要点，回答不必与它字面一致。

【问题】
{question}

【参考答案】
{reference}

【待评审的回答】
{answer}

只输出一个 JSON 对象，例如：{{"completeness": 2, "depth": 1, "professionalism": 3}}"""


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


# --- the LLM judge -----------------------------------------------------------------------------------------


class MalformedReply(Exception):
    """A reply that holds no usable scores (not JSON, a score missing or out of range): asked again."""


def parse_judge_reply(text: str) -> dict[str, int]:
    """The three 0–3 scores from a reply holding a JSON object (a ```json fence or words around it are fine).
    Chinese keys (完整性, 深刻性, 专业性) are accepted too."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        raise MalformedReply(f"no JSON object in the judge's reply: {text[:200]!r}")
    try:
        data = json.loads(text[start : end + 1])
    except (ValueError, RecursionError) as error:  # JSONDecodeError, a 5000-digit number, nesting too deep
        raise MalformedReply(f"the judge's reply is not valid JSON ({str(error)[:100]}): {text[:200]!r}") from None
    if not isinstance(data, dict):
        raise MalformedReply(f"the judge's reply is not a JSON object: {text[:200]!r}")
    scores = {}
    for english, chinese in JUDGE_CRITERIA.items():
        value = data.get(english, data.get(chinese))
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value.strip())
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 3:
            raise MalformedReply(f"the judge's reply has no 0–3 integer for `{english}`: {text[:200]!r}")
        scores[english] = value
    return scores


def judge_messages(row: dict, golden_field: str = "output", answer_field: str = "model_output") -> list[dict[str, str]]:
    question = row.get("instruction", "")
    if row.get("input"):
        question = f"{question}\n{row['input']}"
    prompt = JUDGE_PROMPT.format(rubric=JUDGE_RUBRIC, question=question, reference=row[golden_field],
                                 answer=row[answer_field])
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": prompt}]


def grade(client: Any, config: llm.ChatConfig, messages: list[dict[str, str]],
          sleep: Callable[[float], None] = time.sleep) -> dict[str, int]:
    """One row's scores. The openai SDK retries HTTP failures (429, 5xx, timeouts); a malformed reply is asked
    again here, with backoff, up to `config.max_retries` times."""
    for attempt in range(config.max_retries + 1):
        reply = llm.chat_completion(client, config, messages)
        try:
            return parse_judge_reply(reply)
        except MalformedReply as error:
            if attempt == config.max_retries:
                raise llm.ChatError(f"{error} (gave up after {attempt + 1} replies)") from None
            print(f"judge: reply {attempt + 1} unusable, asking again: {error}", file=sys.stderr, flush=True)
            sleep(llm.backoff_delay(attempt, config))
    raise AssertionError("unreachable")


def row_key(row: dict, model: str, golden_field: str = "output", answer_field: str = "model_output") -> str:
    """Identifies a graded row in the sidecar: same judge model, question, reference and answer."""
    parts = [model, row.get("instruction", ""), row.get("input") or "", row[golden_field], row[answer_field]]
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode("utf-8")).hexdigest()


def load_judge_cache(path: Path) -> dict[str, dict[str, int]]:
    """Scores already graded, by row key; a line torn by a crash is ignored (that row is asked again)."""
    cache: dict[str, dict[str, int]] = {}
    if not path.is_file():
        return cache
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
            cache[entry["key"]] = {name: int(entry["scores"][name]) for name in JUDGE_CRITERIA}
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
    return cache


def judge_scores(
    rows: list[dict],
    cache_path: Path,
    config: llm.ChatConfig,
    golden_field: str = "output",
    answer_field: str = "model_output",
    client: Any = None,
) -> dict[str, Any]:
    """Grade every row (rows already in the sidecar are not asked again) and average each criterion (0–3)."""
    cache = load_judge_cache(cache_path)
    keys = [row_key(row, config.model, golden_field, answer_field) for row in rows]
    todo = [index for index, key in enumerate(keys) if key not in cache]
    if todo:
        print(f"judge: {len(rows) - len(todo)} of {len(rows)} rows already graded in {cache_path}; "
              f"asking {config.model} about {len(todo)}", file=sys.stderr, flush=True)
        client = client if client is not None else llm.make_client(config)
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        with open(cache_path, "a", encoding="utf-8") as sidecar:
            for index in tqdm(todo, desc="judging", unit="row"):
                try:
                    scores = grade(client, config, judge_messages(rows[index], golden_field, answer_field))
                except llm.ChatError as error:
                    raise UserError(
                        f"the judge failed on row {index + 1} ({error}); {len(rows) - len(todo) + todo.index(index)}"
                        f" of {len(rows)} rows are graded in {cache_path}; run again to continue"
                    ) from None
                cache[keys[index]] = scores
                sidecar.write(json.dumps({"key": keys[index], "row": index + 1, "scores": scores}) + "\n")
                sidecar.flush()
                os.fsync(sidecar.fileno())
    result: dict[str, Any] = {}
    for name in JUDGE_CRITERIA:
        result[f"judge-{name}"] = round(sum(cache[key][name] for key in keys) / len(keys), 4)
    result["judge-mean"] = round(sum(result[f"judge-{name}"] for name in JUDGE_CRITERIA) / len(JUDGE_CRITERIA), 4)
    result["judge_model"] = config.model
    return result


# --- the command line --------------------------------------------------------------------------------------


def default_judge_cache(predictions: str | Path) -> Path:
    return Path(f"{predictions}.judge.jsonl")


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
        columns += [f"judge-{name}" for name in JUDGE_CRITERIA] + ["judge-mean"]
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


def write_text(path: str, text: str) -> None:
    """Written atomically and read back before the result is printed (a full disk fails here, not silently)."""
    written = atomic_write(path, text + "\n")
    if written.read_text(encoding="utf-8") != text + "\n":
        raise UserError(f"{path}: what was written does not read back")


@option_checks(max_retries=NON_NEGATIVE, retry_base_delay=NON_NEGATIVE, timeout=POSITIVE)
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
) -> None:
    """Print (and with --output write) the metrics JSON of --predictions, or the --compare table."""
    config: llm.ChatConfig | None = None
    comparing = compare is not None and compare is not False
    inputs = [predictions, *(compare_paths(compare, more_files) if comparing else [])]
    if output:  # before any scoring or judging: a folder, an unwritable place or an input file is refused now
        check_output_file(output, "--output", inputs=[name for name in [*inputs, judge_cache] if name])
    if judge and judge_cache:  # the sidecar is appended to: never an input or the metrics file
        check_output_file(judge_cache, "--judge_cache", inputs=[name for name in [*inputs, output] if name])
    if judge:
        if judge != "openai":
            raise UserError(f"--judge must be openai (any OpenAI-compatible server), got {judge!r}")
        if not model:
            raise UserError("--judge openai needs --model, the judge model's name at --api_base")
        llm.read_api_key(str(api_key_env))  # fail now, before any scoring, when the key is missing
        config = llm.ChatConfig(model=str(model), api_base=str(api_base) if api_base else None,
                                api_key_env=str(api_key_env), temperature=0.0, timeout=float(timeout),
                                max_retries=max_retries, retry_base_delay=float(retry_base_delay))

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
