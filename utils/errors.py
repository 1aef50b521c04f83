"""One clear line for bad input: every script reports a `UserError` as `error: ...` and exits non-zero."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem with what the user gave us (a file, a flag, a model path), not a bug in the code."""


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


def debug_requested(argv: list[str] | None = None) -> bool:
    argv = sys.argv if argv is None else argv
    return "--debug" in argv or any(a.startswith("--debug=") and a != "--debug=False" for a in argv) or (
        os.environ.get("LOGLEVEL", "").upper() == "DEBUG"
    )


def run_cli(component: Callable[..., Any] | object) -> None:
    """`fire.Fire(component)`, turning a `UserError` into `error: ...` on stderr and exit code 2.

    `--debug` (or `LOGLEVEL=DEBUG`) re-raises it with the full traceback, for developers.
    """
    import fire

    debug = debug_requested()
    argv = [a for a in sys.argv[1:] if not (a == "--debug" or a.startswith("--debug="))]
    if debug:
        logging.basicConfig(level=logging.DEBUG)
    try:
        fire.Fire(component, command=argv, serialize=lambda result: None)  # scripts print what they mean to
    except UserError as error:
        if debug:
            raise
        print(f"error: {redact(str(error))}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
