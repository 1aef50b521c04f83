"""One clear line for bad input: a `UserError` is printed as `error: ...` with exit code 2 (see `utils.core.cli`).

Secrets (API keys) registered here are replaced by `***` in anything `redact` passes, so a server that echoes a
rejected key back never gets it printed.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem with what the user gave us (a file, a flag, a model path, the disk), not a bug in the code."""


def raise_problems(problems: list[str] | tuple[str, ...]) -> None:
    """All problems as one line, so a user fixes every flag in one go."""
    problems = [problem for problem in problems if problem]
    if problems:
        raise UserError("; ".join(problems))


_SECRETS: set[str] = set()


def register_secret(value: str) -> None:
    """Remember a secret (an API key) so that `redact` hides it in anything printed or written."""
    if value and len(value) >= 4:
        _SECRETS.add(value)


def redact(text: str) -> str:
    """`text` with every registered secret replaced by `***` (servers like to echo a rejected key back)."""
    for secret in sorted(_SECRETS, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def first_line(error: BaseException) -> str:
    """The first line of an error's message (libraries write pages; a first line that ends in ':' is joined with the
    one it announces), or the error's class name."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return (f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0])[:300]
