"""One clear line for bad input: a `UserError` is printed as `error: ...` with exit code 2 (see `utils.core.cli`);
`did_you_mean` for a mistyped name, and `storage_failure`: what a library's failed write means, in words.

Secrets (API keys) registered here are replaced by `***` in anything `redact` passes, so a server that echoes a
rejected key back never gets it printed.
"""

from __future__ import annotations

import difflib
import errno
import re

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


def did_you_mean(name: str, names: list[str], prefix: str = "--") -> str:
    """` (did you mean --num_epochs?)` for the closest of `names` to a mistyped `name`, or ``."""
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


_STORAGE = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
            errno.EFBIG: "the file is larger than the file system or the file-size limit (ulimit -f) allows",
            errno.EROFS: "the file system is read-only", errno.EIO: "an input/output error (a failing disk or a lost "
                                                                    "network mount)"}
# safetensors and tokenizers (Rust) and torch.save (C++) raise their own types; the OS error lives in the message
_OS_ERROR_IN_TEXT = re.compile(r"\(os error (\d+)\)|Os \{ code: (\d+)|PytorchStreamWriter failed writing")


def storage_failure(error: BaseException) -> str | None:
    """Why a write failed, in words, when `error` (or one it was raised from) is a storage failure: a full disk, a
    quota, the file-size limit, a read-only file system, an I/O error; None for anything else."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in _STORAGE:
            return _STORAGE[error.errno]
        match = _OS_ERROR_IN_TEXT.search(str(error)) if not isinstance(error, OSError) else None
        if match and not (match.group(1) or match.group(2)):
            return "the write failed (is the disk full?)"
        if match and int(match.group(1) or match.group(2)) in _STORAGE:
            return _STORAGE[int(match.group(1) or match.group(2))]
        error = error.__cause__ or error.__context__
    return None
