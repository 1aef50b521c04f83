"""Cheap runs for the tests: a script's `main` in this process, as `python script.py argv...` would run it (the same
`run_cli` entry point) without paying for a fresh interpreter and a torch import each time; and `one_thread`, a
fixture that keeps tiny models on one torch thread (import it into a test module to apply it there)."""

from __future__ import annotations

import contextlib
import io
import sys
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from utils.core.cli import run_cli


@dataclass
class Result:
    """What `python <script>.py argv...` ended with."""

    returncode: int
    stdout: str
    stderr: str


def run_main(component: Any, *argv: Any) -> Result:
    """`python <script>.py argv...` in this process; `component` as for `run_cli` (a dict: subcommands)."""
    out, err = io.StringIO(), io.StringIO()
    saved = sys.argv
    sys.argv = [f"{getattr(component, '__module__', 'script')}.py", *map(str, argv)]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            run_cli(component, [str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = saved
    return Result(code, out.getvalue(), err.getvalue())


def finetune(base: Any, data: Any, output_dir: Any, *extra: str) -> Result:
    """A quick finetune.py run (conftest.train_adapter's flags) that must succeed."""
    import finetune as script

    result = run_main(script.main, "--base_model", base, "--data_path", data, "--output_dir", output_dir,
                      "--batch_size", "8", "--micro_batch_size", "4", "--max_steps", "4", "--learning_rate", "3e-3",
                      "--cutoff_len", "128", "--save_steps", "2", "--eval_steps", "2", "--logging_steps", "1", *extra)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on one torch thread: two gain nothing on them and, on a busy 2-core machine, OpenMP's spinning
    threads made the same forward passes up to ~25x slower (gpu_check's packed check: 27.5 s vs 1.0 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
