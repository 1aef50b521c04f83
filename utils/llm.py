"""Pieces for asking an OpenAI-compatible chat-completions server, shared by the data builder and the judge.

- `ChatConfig` + `make_client` + `chat_completion`: one request with retry and exponential backoff on 429, 5xx,
  timeouts and dropped connections. The API key is read from the environment variable that `--api_key_env` names;
  it is never printed or logged.
- `extract_json_array` / `qa_pairs`: the model is asked for a JSON array of `{"question", "answer"}` objects,
  and models like to wrap it in a ```json fence or add a sentence around it.
- `Progress`: a small sidecar file next to an output, one line per finished item, so `--resume True` is exact.
"""

from __future__ import annotations

import json
import os
import random
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils.core.errors import UserError, redact, register_secret
from utils.core.io import read_jsonl_tolerant

DEFAULT_API_KEY_ENV = "OPENAI_API_KEY"
PROGRESS_SUFFIX = ".progress.jsonl"


@dataclass(frozen=True)
class ChatConfig:
    """How to reach the server and how patiently to retry."""

    model: str
    api_base: str | None = None
    api_key_env: str = DEFAULT_API_KEY_ENV
    temperature: float = 0.7
    timeout: float = 120.0
    max_retries: int = 5
    retry_base_delay: float = 1.0
    max_retry_delay: float = 60.0


class ChatError(Exception):
    """One request failed for good (retries used up, or a refusal that retrying cannot fix); the item is skipped."""


def read_api_key(env_name: str) -> str:
    """The key from the environment variable `env_name`; a clear error (without any value) when it is unset."""
    key = os.environ.get(env_name, "")
    if not key.strip():
        raise UserError(
            f"the environment variable {env_name} (named by --api_key_env) is not set; export it with your API key "
            f"(a local server that checks no key accepts any value, e.g. `export {env_name}=EMPTY`)"
        )
    register_secret(key.strip())  # never shown: error messages pass through `redact`
    return key.strip()


def make_client(config: ChatConfig) -> Any:
    """An `openai.OpenAI` client whose own retries are off: `chat_completion` retries, with logging and limits."""
    import openai  # imported here so that the offline template backend never needs it

    return openai.OpenAI(
        api_key=read_api_key(config.api_key_env),
        base_url=config.api_base,
        timeout=config.timeout,
        max_retries=0,
    )


def backoff_delay(attempt: int, config: ChatConfig, retry_after: float | None = None) -> float:
    """Exponential backoff with a little jitter, so concurrent workers do not retry in lockstep."""
    delay = min(config.max_retry_delay, config.retry_base_delay * (2**attempt))
    delay *= 1.0 + 0.25 * random.random()
    if retry_after is not None:
        delay = max(delay, min(retry_after, config.max_retry_delay))
    return delay


def _retry_after_seconds(error: Exception) -> float | None:
    response = getattr(error, "response", None)
    headers = getattr(response, "headers", None) or {}
    try:
        return float(headers.get("retry-after"))
    except (TypeError, ValueError):
        return None


def classify_error(error: Exception) -> str:
    """`retry` (429, 408, 409, 5xx, timeout, connection), `fatal` (key, permission, unknown model) or `skip`."""
    import openai

    if isinstance(error, (openai.APITimeoutError, openai.APIConnectionError, openai.RateLimitError)):
        return "retry"
    if isinstance(error, (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError)):
        return "fatal"
    status = getattr(error, "status_code", None)
    if isinstance(status, int) and (status >= 500 or status in (408, 409)):
        return "retry"
    return "skip"


def describe_error(error: Exception) -> str:
    """A short, key-free description: the status code when there is one, else the exception's class."""
    status = getattr(error, "status_code", None)
    text = str(getattr(error, "message", None) or error)
    message = text.splitlines()[0][:200] if text.strip() else ""
    prefix = f"HTTP {status}" if status else type(error).__name__
    return redact(f"{prefix}: {message}" if message else prefix)


def chat_completion(
    client: Any,
    config: ChatConfig,
    messages: list[dict[str, str]],
    sleep: Callable[[float], None] = time.sleep,
) -> str:
    """The reply text of one chat completion, retrying transient failures up to `config.max_retries` times.

    Raises `ChatError` when the item should be skipped, and `UserError` for a problem that would fail every
    request alike (a refused key, an unknown model, a server that cannot be reached at all).
    """
    import openai

    for attempt in range(config.max_retries + 1):
        try:
            response = client.chat.completions.create(
                model=config.model, messages=messages, temperature=config.temperature
            )
            return _reply_text(response)
        except openai.OpenAIError as error:
            kind = classify_error(error)
            if kind == "fatal":
                raise UserError(
                    f"{config.api_base or 'the OpenAI API'} refused the request ({describe_error(error)})"
                ) from None
            if kind == "skip":
                raise ChatError(describe_error(error)) from None
            if attempt == config.max_retries:
                if isinstance(error, openai.APIConnectionError) and not isinstance(error, openai.APITimeoutError):
                    raise UserError(
                        f"cannot reach {config.api_base or 'the OpenAI API'} after {attempt + 1} attempts "
                        f"({describe_error(error)}); check --api_base"
                    ) from None
                raise ChatError(f"{describe_error(error)} (gave up after {attempt + 1} attempts)") from None
            sleep(backoff_delay(attempt, config, _retry_after_seconds(error)))
    raise AssertionError("unreachable")


def _reply_text(response: Any) -> str:
    choices = getattr(response, "choices", None)
    if not choices:
        raise ChatError("the server's reply has no choices")
    content = getattr(choices[0].message, "content", None)
    return content if isinstance(content, str) else ""


_FENCE = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\n?(.*?)```", re.DOTALL)


def extract_json_array(text: str) -> list[Any] | None:
    """The JSON array in a model's reply: bare, inside a ```json fence, or with words around it; None if none."""
    if not isinstance(text, str):
        return None
    candidates = [match.group(1) for match in _FENCE.finditer(text)] + [text]
    for candidate in candidates:
        candidate = candidate.strip()
        start, end = candidate.find("["), candidate.rfind("]")
        if start == -1 or end <= start:
            continue
        try:
            value = json.loads(candidate[start : end + 1])
        except json.JSONDecodeError:
            continue
        if isinstance(value, list):
            return value
    return None


def qa_pairs(items: Iterable[Any]) -> tuple[list[tuple[str, str]], int]:
    """`(question, answer)` pairs from parsed items, and how many items were not such an object."""
    pairs: list[tuple[str, str]] = []
    malformed = 0
    for item in items:
        question = item.get("question") if isinstance(item, dict) else None
        answer = item.get("answer") if isinstance(item, dict) else None
        if isinstance(question, str) and isinstance(answer, str) and question.strip() and answer.strip():
            pairs.append((question.strip(), answer.strip()))
        else:
            malformed += 1
    return pairs, malformed


class Progress:
    """The keys of finished items, in a sidecar `<output>.progress.jsonl`.

    A key is recorded only after that item's rows are on disk, so an interrupted run loses nothing; a line torn
    by a crash is ignored, and that item is simply done again (callers drop rows they already have).
    """

    def __init__(self, output: str | Path) -> None:
        output = Path(output)
        self.path = output.with_name(output.name + PROGRESS_SUFFIX)

    def start(self, resume: bool) -> set[str]:
        """The keys already done when resuming; without resume, forget any earlier progress."""
        if not resume:
            self.path.unlink(missing_ok=True)
            return set()
        return self.done()

    def done(self) -> set[str]:
        return {row["key"] for row in read_jsonl_tolerant(self.path) if isinstance(row.get("key"), str)}

    def mark(self, key: str, **info: Any) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"key": key, **info}, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
