"""The fault-injection suite's toolkit (tests/test_faults_*.py): run a script as a user would, and judge the outcome.

Every case ends in one of two verdicts, and each failure names its class in brackets, so that a run of the suite
can be tallied (docs/troubleshooting.md):

- refused: exit code 2, exactly one `error: ...` line on stderr, no traceback, and (where the case says so) every
  file that existed before is byte for byte the same and nothing new was created;
- succeeded: exit code 0, no traceback, and what the success line names is on disk and well-formed.

    [traceback]      a Python traceback for a problem the user can fix
    [not refused]    bad input accepted, or another exit code than 2
    [message]        refused, but not in one line, or the line does not say what is wrong
    [data lost]      a refused or failed run changed or deleted a file that existed before
    [false success]  exit 0 or a success line, but the output is missing, empty or broken

Scripts run in-process through `utils.core.cli.run_cli` (the same code path as `python script.py`), except where
a case needs a process of its own (signals, locks held by another process, resource limits). Cases check the key
fact of the error line (the flag, the file), not its wording.
"""

from __future__ import annotations

import errno
import hashlib
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Outcome:
    code: int
    out: str
    err: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.startswith("error:")]


def cli(component: Callable | dict, *argv: Any, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> Outcome:
    """`python script.py argv...` in-process: the exit code, stdout and stderr."""
    argv = [str(item) for item in argv]
    monkeypatch.setattr(sys, "argv", ["script.py", *argv])
    capsys.readouterr()
    from utils.core.cli import run_cli

    try:
        run_cli(component, argv)
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException as error:  # noqa: BLE001 - a crash is what the suite reports, as a traceback
        import traceback

        captured = capsys.readouterr()
        return Outcome(-1, captured.out, captured.err + "Traceback (in-process):\n" + "".join(
            traceback.format_exception(error)))
    captured = capsys.readouterr()
    return Outcome(code, captured.out, captured.err)


def run(*argv: Any, env: dict[str, str] | None = None, timeout: float = 300, stdin: bytes | None = None,
        preexec: Callable[[], None] | None = None) -> Outcome:
    """A repo script as its own process, from the repo root (offline, unbuffered)."""
    environment = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **(env or {}))
    result = subprocess.run([sys.executable, *map(str, argv)], cwd=REPO, input=stdin, capture_output=True,
                            env=environment, timeout=timeout, preexec_fn=preexec, check=False)
    return Outcome(result.returncode, result.stdout.decode("utf-8", "replace"),
                   result.stderr.decode("utf-8", "replace"))


def assert_refused(outcome: Outcome, *expected: str) -> str:
    """Exit 2, one `error:` line holding every `expected` text, no traceback. Returns the line."""
    assert "Traceback" not in outcome.err, f"[traceback] {outcome.err[-2500:]}"
    assert outcome.code == 2, f"[not refused] exit {outcome.code}: {outcome.err[-1500:]} {outcome.out[-500:]}"
    lines = outcome.error_lines
    assert len(lines) == 1, f"[message] {len(lines)} error lines: {outcome.err[-1500:]}"
    assert outcome.err.rstrip().endswith(lines[0]), f"[message] the error is not the last line: {outcome.err[-800:]}"
    for text in expected:
        assert text in lines[0], f"[message] {text!r} not in: {lines[0]}"
    return lines[0]


def assert_succeeded(outcome: Outcome) -> None:
    assert "Traceback" not in outcome.err, f"[traceback] {outcome.err[-2500:]}"
    assert outcome.code == 0, f"[not refused] expected success, got exit {outcome.code}: {outcome.err[-1500:]}"
    assert not outcome.error_lines, f"[message] success with an error line: {outcome.error_lines}"


# --- what is on disk -------------------------------------------------------------------------------------------------


def snapshot(*roots: Path) -> dict[Path, str]:
    """Every file and folder under `roots`: content hash for files, 'dir' for folders."""
    state: dict[Path, str] = {}

    def record(path: Path) -> None:
        if path.is_symlink():
            state[path] = f"link:{os.readlink(path)}"
        elif path.is_dir():
            state[path] = "dir"
            for child in path.iterdir():
                record(child)
        elif path.is_file():
            state[path] = hashlib.sha256(path.read_bytes()).hexdigest()

    for root in roots:
        record(root)
    return state


def assert_unchanged(before: dict[Path, str], *roots: Path, allow_new: bool = False) -> None:
    """Every file of `before` is still there, byte for byte, and (unless `allow_new`) nothing was added."""
    after = snapshot(*roots)
    lost = sorted(str(path) for path in before if path not in after)
    changed = sorted(str(path) for path in before if path in after and after[path] != before[path])
    assert not lost and not changed, f"[data lost] deleted: {lost[:5]}, changed: {changed[:5]}"
    if not allow_new:
        added = sorted(str(path) for path in after if path not in before)
        assert not added, f"[not refused] the run wrote {added[:5]}"


def assert_refused_unchanged(outcome: Outcome, before: dict[Path, str], roots: tuple[Path, ...], *expected: str,
                             allow_new: bool = False) -> str:
    """`assert_refused` after `assert_unchanged`: a run that lost data is reported as that, the worst outcome."""
    assert_unchanged(before, *roots, allow_new=allow_new)
    return assert_refused(outcome, *expected)


# --- faults of the machine -------------------------------------------------------------------------------------------


def running_as_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


@contextmanager
def read_only(folder: Path) -> Iterator[Path]:
    """`folder` read-only: chmod 0555; as root (which writes anyway) the kernel's answers for a read-only file system
    are injected instead: EROFS at the OS calls that create or replace entries inside it (os.open, os.mkdir,
    os.rename, os.replace), and `os.access(..., W_OK)` False for it and what is inside."""
    folder.mkdir(parents=True, exist_ok=True)
    mode = folder.stat().st_mode
    os.chmod(folder, 0o555)
    inside = os.path.abspath(folder) + os.sep

    def guarded(original: Callable, position: int) -> Callable:
        def call(*args: Any, **kwargs: Any) -> Any:
            target = args[position] if len(args) > position else None
            if isinstance(target, (str, bytes, os.PathLike)) and os.path.abspath(os.fsdecode(target)).startswith(
                    inside):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(target))
            return original(*args, **kwargs)

        return call

    access = os.access

    def no_write_access(path: Any, mode: int, *args: Any, **kwargs: Any) -> bool:
        inside_folder = (os.path.abspath(os.fsdecode(path)) + os.sep).startswith(inside)
        return False if inside_folder and mode & os.W_OK else access(path, mode, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        if running_as_root():
            for name, position in (("open", 0), ("mkdir", 0), ("rename", 1), ("replace", 1)):
                patch.setattr(os, name, guarded(getattr(os, name), position))
            patch.setattr(os, "access", no_write_access)
        try:
            yield folder
        finally:
            os.chmod(folder, mode)


def file_size_limit(limit: int) -> Callable[[], None]:
    """For `run(..., preexec=...)`: the child may write no file past `limit` bytes (RLIMIT_FSIZE): its writes past it
    fail with EFBIG, as a full disk fails them with ENOSPC. SIGXFSZ is ignored so the write returns the error."""

    def limit_child() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return limit_child


def storage_full_at(monkeypatch: pytest.MonkeyPatch, function: str = "fsync",
                    code: int = errno.ENOSPC) -> None:
    """The disk fills up: every `os.<function>` fails with `code` (ENOSPC: where a file system with delayed
    allocation, or a network file system, reports a full disk)."""

    def full(*args: Any, **kwargs: Any) -> Any:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, function, full)
