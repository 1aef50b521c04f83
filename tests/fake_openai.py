"""A fake OpenAI-compatible chat-completions server for tests: loopback only, scripted replies, recorded requests.

    def responder(body: dict) -> Reply:
        return Reply(content='[{"question": "q", "answer": "a"}]')

    with FakeOpenAI(responder) as server:
        ...  # point the client at server.url ("http://127.0.0.1:<port>/v1")
        assert len(server.requests) == 1

`scripted({"偏头痛": [Reply(status=500), Reply(content="...")]}, default)` answers each request by the first
keyword found in its last user message, popping that keyword's next scripted reply, then falling back to `default`.

An error reply carries `retry-after-ms` (10 ms unless told otherwise), so the openai SDK's own retries, which honour
it, keep the tests fast; a completion reports `usage` (prompt/completion tokens) as a real server does.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self


@dataclass(frozen=True)
class Reply:
    """What the server sends back: a completion with `content` (status 200), or an error status."""

    content: str = ""
    status: int = 200
    delay: float = 0.0  # seconds to wait first, to provoke client timeouts
    raw_body: bytes | None = None  # sent as is instead of a completion (e.g. a body that is not JSON)
    content_type: str = "text/plain"  # of a raw body
    retry_after_ms: int | None = 10  # sent with an error status; None sends no Retry-After at all
    prompt_tokens: int = 1
    completion_tokens: int = 1


Responder = Callable[[dict[str, Any]], Reply]


def last_user_message(body: dict[str, Any]) -> str:
    users = [m.get("content", "") for m in body.get("messages", []) if isinstance(m, dict) and m.get("role") == "user"]
    return users[-1] if users else ""


def scripted(scripts: dict[str, list[Reply]], default: Responder) -> Responder:
    """A responder that replays per-keyword scripts (thread-safe), then defers to `default`."""
    lock = threading.Lock()
    queues = {keyword: list(replies) for keyword, replies in scripts.items()}

    def respond(body: dict[str, Any]) -> Reply:
        message = last_user_message(body)
        with lock:
            for keyword, queue in queues.items():
                if keyword in message and queue:
                    return queue.pop(0)
        return default(body)

    return respond


def completion_body(model: str, content: str, prompt_tokens: int = 1, completion_tokens: int = 1) -> dict[str, Any]:
    """The JSON of a chat completion, with just the fields the `openai` client reads."""
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


class FakeOpenAI:
    """`POST /v1/chat/completions` on 127.0.0.1 (a free port), in a background thread."""

    def __init__(self, responder: Responder) -> None:
        self.responder = responder
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []  # per request, names lower-cased
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "start the server first"
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def start(self) -> Self:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # the name http.server calls
                length = int(self.headers.get("Content-Length", "0"))
                raw = self.rfile.read(length)
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
                    return
                body = json.loads(raw or b"{}")
                with fake._lock:
                    fake.requests.append(body)
                    fake.headers.append({key.lower(): value for key, value in self.headers.items()})
                reply = fake.responder(body)
                if reply.delay:
                    time.sleep(reply.delay)
                extra = {"retry-after-ms": str(reply.retry_after_ms)} if (
                    reply.status != 200 and reply.retry_after_ms is not None) else {}
                if reply.raw_body is not None:
                    self._send_bytes(reply.status, reply.raw_body, reply.content_type, extra)
                elif reply.status != 200:
                    self._send(reply.status, {"error": {"message": "scripted failure", "type": "server_error"}}, extra)
                else:
                    self._send(200, completion_body(body.get("model", "fake"), reply.content, reply.prompt_tokens,
                                                    reply.completion_tokens))

            def _send(self, status: int, payload: dict[str, Any], extra: dict[str, str] | None = None) -> None:
                data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
                self._send_bytes(status, data, "application/json", extra)

            def _send_bytes(self, status: int, data: bytes, content_type: str,
                            extra: dict[str, str] | None = None) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", content_type)
                    for name, value in (extra or {}).items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test); nothing to report

            def log_message(self, format: str, *args: Any) -> None:  # http.server's signature
                pass  # keep test output clean

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def requests_mentioning(self, keyword: str) -> int:
        """How many recorded requests have `keyword` in their last user message."""
        with self._lock:
            return sum(1 for body in self.requests if keyword in last_user_message(body))
