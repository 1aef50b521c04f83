"""The LLM judge of evaluate.py (`--judge openai`): each answer graded 0-3 on completeness, depth and
professionalism (the CMCOQA rubric, worded in judge.yaml beside this module) by an OpenAI-compatible server.

The openai SDK retries failed requests (429, 5xx, timeouts); an unusable reply is asked again here with backoff.
Every graded row is appended (fsynced) to a sidecar, so a rerun asks only about rows not graded yet.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from utils import llm
from utils.core.errors import UserError
from utils.llm import append_jsonl, drop_torn_tail, read_jsonl_tolerant

PROMPT_FILE = Path(__file__).resolve().parent / "judge.yaml"


@cache
def prompts() -> dict[str, Any]:
    """judge.yaml: `criteria` (English key -> Chinese name), `system`, `rubric` and `prompt`."""
    with open(PROMPT_FILE, encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def criteria() -> dict[str, str]:
    return prompts()["criteria"]


def default_judge_cache(predictions: str | Path) -> Path:
    return Path(f"{predictions}.judge.jsonl")


def judge_config(judge: str, model: str, api_base: str | None, api_key_env: str, timeout: float, max_retries: int,
                 retry_base_delay: float) -> llm.ChatConfig | None:
    """How to reach the judge (None: no judge), checked before any scoring: the backend, the model, the key."""
    if not judge:
        return None
    if not model:
        raise UserError("--judge openai needs --model, the judge model's name at --api_base")
    llm.read_api_key(str(api_key_env))  # fail now, before any scoring, when the key is missing
    return llm.ChatConfig(model=str(model), api_base=str(api_base) if api_base else None, api_key_env=str(api_key_env),
                          temperature=0.0, timeout=float(timeout), max_retries=max_retries,
                          retry_base_delay=float(retry_base_delay))



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
    for english, chinese in criteria().items():
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
    """The chat messages asking the judge to grade one row (judge.yaml's prompt)."""
    question = row.get("instruction", "")
    if row.get("input"):
        question = f"{question}\n{row['input']}"
    text = prompts()
    prompt = text["prompt"].format(rubric=text["rubric"], question=question, reference=row[golden_field],
                                   answer=row[answer_field])
    return [{"role": "system", "content": text["system"]}, {"role": "user", "content": prompt}]


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
    for entry in read_jsonl_tolerant(path):
        try:
            cache[entry["key"]] = {name: int(entry["scores"][name]) for name in criteria()}
        except (KeyError, TypeError, ValueError):
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
        drop_torn_tail(cache_path)  # a line a crash cut short: the next one starts on a line of its own
        for index in tqdm(todo, desc="judging", unit="row"):
            try:
                scores = grade(client, config, judge_messages(rows[index], golden_field, answer_field))
            except llm.ChatError as error:
                raise UserError(
                    f"the judge failed on row {index + 1} ({error}); {len(rows) - len(todo) + todo.index(index)}"
                    f" of {len(rows)} rows are graded in {cache_path}; run again to continue"
                ) from None
            cache[keys[index]] = scores
            append_jsonl(cache_path, [{"key": keys[index], "row": index + 1, "scores": scores}])  # fsynced
    result: dict[str, Any] = {}
    for name in criteria():
        result[f"judge-{name}"] = round(sum(cache[key][name] for key in keys) / len(keys), 4)
    result["judge-mean"] = round(sum(result[f"judge-{name}"] for name in criteria()) / len(criteria()), 4)
    result["judge_model"] = config.model
    return result
