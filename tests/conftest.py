"""Shared fixtures: tiny base models built by the project itself, small data files, a CLI runner.

The tiny bases of the tests are built from text fixed in tests/fixtures/ (not data/, which the data builder
regenerates) with `--pretrain_steps 0`: their weights are the same bits on every processor, thread count and
ATen/MKL code path (utils/tiny_base.py says why pre-trained ones are not), so golden values hold on any machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from in_process import Result, run_main

REPO = Path(__file__).resolve().parent.parent
REFERENCE = REPO.parent / "shared" / "reference" / "bentsao"
FIXTURES = REPO / "tests" / "fixtures"
QA_ROWS = FIXTURES / "qa.jsonl"  # 26 QA rows (a snapshot of data/infer.json): the small training set
CORPUS = FIXTURES / "corpus.jsonl"  # 500 rows of the project's own QA data: what the tests' tokenizers learn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny models: one thread each, however busy the machine
sys.path.insert(0, str(REPO))


def reference_file(name: str) -> Path:
    """A published BenTsao file, or skip: ../shared is not part of a plain clone."""
    path = REFERENCE / name
    if not path.exists():
        pytest.skip(f"{path} is absent (the published BenTsao data lives in ../shared, not in the repo)")
    return path


class TinyModels(dict):
    """Tiny llama / bloom / qwen2 bases, each built with `utils.tiny_base` the first time a test asks for it:
    tokenizer from tests/fixtures, processor-independent initialisation, no pre-training (a few seconds each)."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    def __missing__(self, arch: str) -> Path:
        from utils.tiny_base import build

        folder = build(arch=arch, output_dir=str(self.root / arch), pretrain_steps=0,
                       corpus_files=f"{QA_ROWS},{CORPUS}")
        self[arch] = Path(folder)
        return self[arch]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> TinyModels:
    return TinyModels(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> Path:
    return tiny_models["llama"]


def project_rows() -> list[dict]:
    """The project's own QA rows (tests/fixtures/qa.jsonl), a small realistic training set."""
    return [json.loads(line) for line in QA_ROWS.read_text(encoding="utf-8").splitlines() if line]


@pytest.fixture(scope="session")
def train_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in project_rows()), encoding="utf-8")
    return path


def run_script(
    *args: str, stdin: str | None = None, env: dict | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """Run a repo script as a user would, from the repo root."""
    full_env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", PYTHON=sys.executable, **(env or {}))
    command = list(args) if args[0] == "bash" else [sys.executable, *args]
    return subprocess.run(
        command, check=False, cwd=REPO, input=stdin, capture_output=True, text=True, env=full_env, timeout=timeout
    )


TRAIN_QUICK = ("--batch_size", "8", "--micro_batch_size", "4", "--max_steps", "4", "--learning_rate", "3e-3",
               "--cutoff_len", "128", "--save_steps", "2", "--eval_steps", "2", "--logging_steps", "1")


def train_adapter(base: Path, data: Path, output_dir: Path, *extra: str) -> Result:
    """A quick finetune.py run (a few steps) that must succeed; in-process (tests/in_process.py)."""
    import finetune

    result = run_main(finetune.main, "--base_model", base, "--data_path", data, "--output_dir", output_dir,
                      *TRAIN_QUICK, *extra)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def run_line(stdout: str) -> str:
    """finetune.py's one line saying what trains on what (printed once, by the main process)."""
    lines = [line for line in stdout.splitlines() if line.startswith("training ")]
    assert len(lines) == 1, lines
    return lines[0]
