"""Pieces for asking an OpenAI-compatible chat-completions server, shared by the data builder and the judge.

- `ChatConfig` + `make_client` + `chat_reply` / `chat_completion`: one request. Transient failures (429, 408, 409,
  5xx, timeouts, dropped connections) are retried by the `openai` SDK itself, `max_retries` times with jittered
  exponential backoff, honouring the server's Retry-After; what is left is mapped here: a problem that would fail
  every request alike (a refused key, an unknown model, a server that cannot be reached) is a `UserError` that stops
  the run, anything else a `ChatError` that skips the item. The API key is read from the environment variable that
  `--api_key_env` names; it is never printed or logged.
- `backoff_delay`: the wait before asking again after an *unusable* reply (which the SDK cannot know about).
- `extract_json_array` / `qa_pairs`: the model is asked for a JSON array of `{"question", "answer"}` objects, and
  models like to wrap it in a ```json fence or add a sentence around it.
- `append_jsonl` / `read_jsonl_tolerant` / `drop_torn_tail`: the work log of a long run of requests (the builder's,
  the judge's), appended and flushed item by item, read back whole after a crash tore its last line: a resumed run
  asks only what is not in it.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils.core.errors import UserError, redact, register_secret
from utils.core.io import atomic_write, jsonl_text

DEFAULT_API_KEY_ENV = "OPENAI_API_KEY"


@dataclass(frozen=True)
class ChatConfig:
    """How to reach the server and how patiently to retry."""

    model: str
    api_base: str | None = None
    api_key_env: str = DEFAULT_API_KEY_ENV
    temperature: float = 0.7
    timeout: float = 120.0
    max_retries: int = 5
    retry_base_delay: float = 1.0  # before asking again after an unusable reply; doubles each time
    max_retry_delay: float = 60.0


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0


class ChatError(Exception):
    """One request failed for good (retries used up, a refusal retrying cannot fix, an unreadable reply): the item
    is skipped."""


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
    """An `openai.OpenAI` client that retries transient failures itself (`max_retries`, `timeout` per attempt)."""
    import openai  # imported here so that the offline template backend never needs it

    return openai.OpenAI(
        api_key=read_api_key(config.api_key_env),
        base_url=config.api_base,
        timeout=config.timeout,
        max_retries=config.max_retries,
    )


def backoff_delay(attempt: int, config: ChatConfig) -> float:
    """Exponential backoff with a little jitter before asking again after an unusable reply."""
    delay = min(config.max_retry_delay, config.retry_base_delay * (2**attempt))
    return delay * (1.0 + 0.25 * random.random())


def describe_error(error: Exception) -> str:
    """A short, key-free description: the status code when there is one, else the exception's class."""
    status = getattr(error, "status_code", None)
    text = str(getattr(error, "message", None) or error)
    message = text.splitlines()[0][:200] if text.strip() else ""
    prefix = f"HTTP {status}" if status else type(error).__name__
    return redact(f"{prefix}: {message}" if message else prefix)


def _mapped_error(error: Exception, config: ChatConfig) -> Exception:
    """The SDK's final error as a `UserError` (stop the run) or a `ChatError` (skip the item)."""
    import openai

    where = config.api_base or "the OpenAI API"
    if isinstance(error, (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError)):
        return UserError(f"{where} refused the request ({describe_error(error)})")
    if isinstance(error, openai.APIConnectionError) and not isinstance(error, openai.APITimeoutError):
        return UserError(f"cannot reach {where} after {config.max_retries + 1} attempts ({describe_error(error)}); "
                         "check --api_base")
    if isinstance(error, openai.APITimeoutError):
        return ChatError(f"no reply within --timeout {config.timeout:g}s after {config.max_retries + 1} attempts")
    return ChatError(describe_error(error))


def chat_reply(client: Any, config: ChatConfig, messages: list[dict[str, str]]) -> tuple[str, Usage]:
    """The reply text of one chat completion and the tokens it used.

    Raises `ChatError` when the item should be skipped, and `UserError` for a problem that would fail every request
    alike. A reply that is not a chat completion (HTTP 200 with a body that is not one) is a `ChatError`.
    """
    import openai

    try:
        response = client.chat.completions.create(model=config.model, messages=messages,
                                                  temperature=config.temperature)
    except openai.OpenAIError as error:
        raise _mapped_error(error, config) from None
    except (ValueError, TypeError, KeyError) as error:  # a 200 whose body is not the JSON of a completion
        raise ChatError(f"the server's reply is not a chat completion ({type(error).__name__})") from None
    choices = getattr(response, "choices", None)
    if not isinstance(choices, list) or not choices:
        raise ChatError("the server's reply is not a chat completion (no choices)")
    message = getattr(choices[0], "message", None)
    content = getattr(message, "content", None)
    usage = getattr(response, "usage", None)
    tokens = Usage(int(getattr(usage, "prompt_tokens", 0) or 0), int(getattr(usage, "completion_tokens", 0) or 0))
    return (content if isinstance(content, str) else ""), tokens


def chat_completion(client: Any, config: ChatConfig, messages: list[dict[str, str]]) -> str:
    """The reply text of one chat completion (see `chat_reply`)."""
    return chat_reply(client, config, messages)[0]


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
        except (ValueError, RecursionError):  # JSONDecodeError, and numbers too long to convert
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


# --- the work log of a run of requests ---------------------------------------------------------------------


def read_jsonl_tolerant(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of an append-only JSON Lines file (none when it is absent); a line torn by a crash (cut JSON,
    or cut inside a UTF-8 character) is skipped: its writer redoes the item that line stood for."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_bytes().split(b"\n"):
        try:
            row = json.loads(line.decode("utf-8"))
        except (ValueError, RecursionError):
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def append_jsonl(path: str | Path, records: Sequence[dict[str, Any]]) -> None:
    """Append records to a JSON Lines file and flush: once this returns, they survive a crash."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(jsonl_text(records))
        handle.flush()
        os.fsync(handle.fileno())


def drop_torn_tail(path: str | Path) -> None:
    """Cut a last line that a crash left without its newline, so appended rows start on a line of their own."""
    path = Path(path)
    data = path.read_bytes() if path.is_file() else b""
    if data and not data.endswith(b"\n"):
        atomic_write(path, data[: data.rfind(b"\n") + 1])
