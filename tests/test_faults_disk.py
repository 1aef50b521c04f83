"""Fault injection, the disk: output paths that are folders, files, inputs, read-only or unusable are refused before
any work; a disk that fills up (ENOSPC injected at the flush, or a real file-size limit in a child process) is one
line, leaves every earlier file as it was and prints no success; a closed standard output loses nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from faultkit import (
    REPO,
    assert_refused,
    assert_succeeded,
    assert_unchanged,
    cli,
    file_size_limit,
    read_only,
    run,
    snapshot,
    storage_full_at,
)

import build_dataset
import evaluate
import export_hf_checkpoint
import finetune
import infer

NO_MODEL = "./no/such/model"
PREDICTION = {"instruction": "高血压有哪些症状？", "output": "头痛、头晕。", "model_output": "头痛。"}


@pytest.fixture()
def files(tmp_path) -> dict[str, Path]:
    """A questions file, a predictions file, an earlier metrics file, a plain file and a read-only folder."""
    made = {"questions": tmp_path / "questions.jsonl", "predictions": tmp_path / "predictions.jsonl",
            "metrics": tmp_path / "metrics.json", "file": tmp_path / "notes.txt", "locked": tmp_path / "locked"}
    made["questions"].write_text('{"instruction": "高血压有哪些症状？"}\n', encoding="utf-8")
    made["predictions"].write_text(json.dumps(PREDICTION, ensure_ascii=False) + "\n", encoding="utf-8")
    made["metrics"].write_text('{"rouge-l": 1.0, "note": "an earlier run"}\n', encoding="utf-8")
    made["file"].write_text("keep me\n", encoding="utf-8")
    made["locked"].mkdir()
    (made["locked"] / "old.json").write_text("{}", encoding="utf-8")
    return made


def output_path(kind: str, files: dict[str, Path], tmp_path: Path, input_name: str) -> tuple[Path, str]:
    if kind == "a symlink to a file":  # an atomic write would replace the link and leave its target as it was
        (tmp_path / "link.json").symlink_to(files["file"])
    if kind == "a pipe":  # a plain file would take the FIFO's place
        os.mkfifo(tmp_path / "pipe.json")
    return {  # (the output, the key fact its one error line names besides the flag)
        "a symlink to a file": (tmp_path / "link.json", "link.json"),
        "a pipe": (tmp_path / "pipe.json", "pipe.json"),
        "a folder": (tmp_path, str(tmp_path)),
        "the input": (files[input_name], input_name),
        "under a file": (files["file"] / "out.json", "notes.txt"),
        "read-only": (files["locked"] / "out.json", "locked"),
        "a name too long": (tmp_path / ("答" * 100 + ".json"), "答"),
        "a symlink loop": (tmp_path / "loop" / "out.json", "loop"),
    }[kind]


OUTPUT_FILES = ["a folder", "the input", "under a file", "read-only", "a name too long", "a symlink loop",
                "a symlink to a file", "a pipe"]


def test_the_longest_name_a_file_system_takes_is_written(files, tmp_path, monkeypatch, capsys):
    """245 bytes: a valid name (the limit is 255), so the atomic write's temporary file must not exceed it."""
    output = tmp_path / ("答" * 80 + ".json")
    assert_succeeded(cli(evaluate.main, "--predictions", files["predictions"], "--output", output,
                         monkeypatch=monkeypatch, capsys=capsys))
    assert json.loads(output.read_text(encoding="utf-8"))["rows"] == 1


@pytest.mark.parametrize("script", ["infer", "evaluate"])
@pytest.mark.parametrize("kind", OUTPUT_FILES)
def test_an_output_file_is_checked_before_any_work(kind, script, files, tmp_path, monkeypatch, capsys):
    """infer.py's --output_file before the model loads, evaluate.py's --output before scoring."""
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    output, expected = output_path(kind, files, tmp_path, "questions" if script == "infer" else "predictions")
    argv = {"infer": (infer.main, "--base_model", NO_MODEL, "--use_lora", "False", "--instruct_dir",
                      files["questions"], "--output_file", output),
            "evaluate": (evaluate.main, "--predictions", files["predictions"], "--output", output)}[script]
    before = snapshot(tmp_path)
    with read_only(files["locked"]):
        outcome = cli(*argv, monkeypatch=monkeypatch, capsys=capsys)
    assert_unchanged(before, tmp_path)
    line = assert_refused(outcome, argv[-2], expected)
    assert NO_MODEL not in line or line.index(argv[-2]) < line.index(NO_MODEL)  # the flags, then the model's path
    assert "rouge" not in outcome.out  # nothing scored


def test_infer_never_writes_its_answers_over_the_model_or_the_adapter(tiny_llama, tmp_path, files, monkeypatch,
                                                                      capsys):
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text('{"peft_type": "LORA"}', encoding="utf-8")
    before = snapshot(tmp_path, tiny_llama)
    for output, what in ((lora / "adapter_config.json", str(lora)), (tiny_llama / "answers.jsonl", str(tiny_llama))):
        outcome = cli(infer.main, "--base_model", tiny_llama, "--lora_weights", lora, "--instruct_dir",
                      files["questions"], "--output_file", output, monkeypatch=monkeypatch, capsys=capsys)
        assert_unchanged(before, tmp_path, tiny_llama)
        assert_refused(outcome, "--output_file", what)


@pytest.mark.parametrize("cache", ["the predictions", "the metrics", "a folder"])
def test_the_judge_sidecar_is_never_an_input(cache, files, tmp_path, monkeypatch, capsys):
    """The judge appends graded rows to --judge_cache: pointed at the predictions it would corrupt them."""
    path, expected = {"the predictions": (files["predictions"], "--judge_cache"),
                      "the metrics": (files["metrics"], "--judge_cache"),
                      "a folder": (tmp_path, "--judge_cache")}[cache]
    monkeypatch.setenv("FAULT_KEY", "sk-x")
    before = snapshot(tmp_path)
    outcome = cli(evaluate.main, "--predictions", files["predictions"], "--output", files["metrics"], "--judge",
                  "openai", "--model", "m", "--api_base", "http://127.0.0.1:9/v1", "--api_key_env", "FAULT_KEY",
                  "--judge_cache", path, monkeypatch=monkeypatch, capsys=capsys)
    assert_unchanged(before, tmp_path)
    assert_refused(outcome, expected)


@pytest.mark.parametrize("kind", ["a file", "the base", "inside the base", "under a file", "read-only",
                                  "a name too long", "a symlink loop"])
def test_finetune_output_dir_is_checked_before_any_work(kind, tiny_llama, train_file, files, tmp_path, monkeypatch,
                                                        capsys):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    output, expected = {  # (the output, the key fact its one error line names besides the flag)
        "a file": (files["file"], "notes.txt"),
        "the base": (tiny_llama, str(tiny_llama)),
        "inside the base": (tiny_llama / "lora", str(tiny_llama)),
        "under a file": (files["file"] / "lora", "notes.txt"),
        "read-only": (files["locked"] / "lora", "locked"),
        "a name too long": (tmp_path / ("甲" * 90), "甲"),
        "a symlink loop": (tmp_path / "loop" / "lora", "loop"),
    }[kind]
    before = snapshot(tmp_path, tiny_llama)
    with read_only(files["locked"]):
        outcome = cli(finetune.main, "--base_model", tiny_llama, "--data_path", train_file, "--output_dir", output,
                      monkeypatch=monkeypatch, capsys=capsys)
    assert_unchanged(before, tmp_path, tiny_llama)
    assert_refused(outcome, "--output_dir", expected)


def test_export_into_a_read_only_folder_is_refused_before_loading(tiny_llama, tmp_path, files, monkeypatch, capsys):
    with read_only(files["locked"]):
        line = assert_refused(cli(export_hf_checkpoint.main, "--base_model", NO_MODEL, "--lora_weights", "./no/lora",
                                  "--output_dir", files["locked"] / "merged", monkeypatch=monkeypatch, capsys=capsys),
                              "--output_dir", "locked")
    assert not (files["locked"] / "merged").exists() and line


@pytest.mark.parametrize("kind", ["a folder", "under a file"])
def test_build_dataset_output_is_checked_before_any_work(kind, files, tmp_path, monkeypatch, capsys):
    kb = tmp_path / "kb.jsonl"
    entity = {"中心词": "甲病", "类型": "疾病", "相关症状": ["发热", "咳嗽"]}
    kb.write_text(json.dumps(entity, ensure_ascii=False) + "\n", encoding="utf-8")
    output, expected = output_path(kind, files, tmp_path, "questions")
    before = snapshot(tmp_path)
    outcome = cli({"knowledge": build_dataset.knowledge}, "knowledge", "--kb", kb, "--output", output,
                  monkeypatch=monkeypatch, capsys=capsys)
    assert_unchanged(before, tmp_path)
    assert_refused(outcome, "--output", expected)


# --- the disk fills up -----------------------------------------------------------------------------------------------


def test_a_full_disk_while_evaluate_writes_keeps_the_earlier_metrics(files, tmp_path, monkeypatch, capsys):
    before = snapshot(tmp_path)
    storage_full_at(monkeypatch, "fsync")
    outcome = cli(evaluate.main, "--predictions", files["predictions"], "--output", files["metrics"],
                  monkeypatch=monkeypatch, capsys=capsys)
    assert_unchanged(before, tmp_path)  # the earlier file byte for byte, and no temporary file left behind
    assert "rouge" not in outcome.out, "[false success] metrics printed that were not saved"
    assert_refused(outcome, "metrics.json", "the disk is full")


def test_a_file_size_limit_in_a_real_process_keeps_the_earlier_metrics(files, tmp_path):
    """RLIMIT_FSIZE: the kernel fails the write with EFBIG, as a full disk fails it with ENOSPC."""
    before = snapshot(tmp_path)
    outcome = run("evaluate.py", "--predictions", files["predictions"], "--output", files["metrics"],
                  preexec=file_size_limit(40))
    assert_unchanged(before, tmp_path)
    assert_refused(outcome, "metrics.json", "file-size limit")


def test_a_full_disk_while_infer_writes_keeps_the_earlier_output(tiny_llama, files, tmp_path, monkeypatch, capsys):
    answers = tmp_path / "answers.jsonl"
    answers.write_text('{"instruction": "earlier", "model_output": "earlier"}\n', encoding="utf-8")
    before = snapshot(tmp_path)
    storage_full_at(monkeypatch, "fsync")
    outcome = cli(infer.main, "--base_model", tiny_llama, "--use_lora", "False", "--instruct_dir", files["questions"],
                  "--output_file", answers, "--max_new_tokens", "2", "--num_beams", "1", monkeypatch=monkeypatch,
                  capsys=capsys)
    assert_unchanged(before, tmp_path)
    assert "wrote" not in outcome.out, "[false success] `wrote N answers` for answers that were not saved"
    assert_refused(outcome, "answers.jsonl", "the disk is full")
    assert "###model output###" in outcome.out  # the answers were printed, so not lost


def test_a_full_disk_when_the_adapter_is_published_prints_no_success(tiny_llama, train_file, tmp_path, monkeypatch,
                                                                     capsys):
    out = tmp_path / "out"
    from utils.core import io

    original = io.publish_files

    def publish_on_a_full_disk(*args, **kwargs):
        storage_full_at(monkeypatch, "fsync")  # the disk fills up while the finished adapter is written
        return original(*args, **kwargs)

    monkeypatch.setattr(finetune, "publish_files", publish_on_a_full_disk)
    outcome = cli(finetune.main, "--base_model", tiny_llama, "--data_path", train_file, "--output_dir", out,
                  "--max_steps", "1", "--batch_size", "4", "--micro_batch_size", "4", "--val_set_size", "0",
                  "--cutoff_len", "64", "--save_steps", "100", monkeypatch=monkeypatch, capsys=capsys)
    assert "adapter saved" not in outcome.out, "[false success] `adapter saved` on a full disk"
    assert not (out / "adapter_config.json").exists() and not (out / ".tmp-adapter").exists(), "[false success]"
    assert_refused(outcome, "the disk is full")


def test_a_full_disk_while_exporting_replaces_nothing(tiny_llama, tmp_path, monkeypatch, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    lora = tmp_path / "lora"
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                   LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)).save_pretrained(lora)
    before = snapshot(tmp_path)
    storage_full_at(monkeypatch, "fsync")
    outcome = cli(export_hf_checkpoint.main, "--base_model", tiny_llama, "--lora_weights", lora, "--output_dir",
                  tmp_path / "merged", monkeypatch=monkeypatch, capsys=capsys)
    assert_unchanged(before, tmp_path)
    assert "saved" not in outcome.out, "[false success] `saved` on a full disk"
    assert_refused(outcome, "the disk is full")


@pytest.mark.slow
def test_a_file_size_limit_while_training_is_one_line_and_names_what_is_kept(tiny_llama, train_file, tmp_path):
    """A real finetune.py process whose checkpoint writes fail in the kernel (RLIMIT_FSIZE -> EFBIG, raised as their
    own exception types by tokenizers and safetensors): one line, no traceback, no adapter claimed."""
    out = tmp_path / "out"
    outcome = run("finetune.py", "--base_model", tiny_llama, "--data_path", train_file, "--output_dir", out,
                  "--max_steps", "3", "--batch_size", "4", "--micro_batch_size", "4", "--val_set_size", "0",
                  "--cutoff_len", "64", "--save_steps", "1", preexec=file_size_limit(100_000))
    assert "adapter saved" not in outcome.out and not (out / "adapter_config.json").exists(), "[false success]"
    assert_refused(outcome, "cannot save a checkpoint", "at step 1", "file-size limit",
                   "no complete checkpoint was written yet")


# --- a closed standard output --------------------------------------------------------------------------------------


def test_a_closed_pipe_is_no_traceback_and_the_output_file_is_written(files, tmp_path):
    """`python evaluate.py ... | head -0`: the reader is gone before anything is printed."""
    metrics = tmp_path / "new-metrics.json"
    process = subprocess.Popen([sys.executable, "evaluate.py", "--predictions", str(files["predictions"]),
                                "--output", str(metrics)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=dict(os.environ, HF_HUB_OFFLINE="1"))
    process.stdout.close()
    stderr = process.stderr.read().decode()
    code = process.wait(timeout=120)
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, f"[traceback] {stderr[-1500:]}"
    assert metrics.is_file(), "[data lost] the metrics were not written"
    assert code in (0, 141) and json.loads(metrics.read_text(encoding="utf-8"))["rows"] == 1


def test_infer_keeps_answering_into_its_output_file_when_stdout_closes(tiny_llama, files, tmp_path, monkeypatch,
                                                                       capsys):
    class ClosedPipe:
        """Standard output whose reader left: writes are buffered; flushing them fails with EPIPE (as Python's own
        buffered stdout does; an empty buffer flushes without a write, so without an error)."""

        pending = 0

        def write(self, text: str) -> int:
            self.pending += len(text)
            return len(text)

        def flush(self) -> None:
            if self.pending:
                raise BrokenPipeError(32, "Broken pipe")

        def fileno(self) -> int:
            raise OSError("not a real file")

        def isatty(self) -> bool:
            return False

    questions = tmp_path / "three.jsonl"
    questions.write_text("".join(json.dumps({"instruction": f"问题{i}"}, ensure_ascii=False) + "\n"
                                 for i in range(3)), encoding="utf-8")
    answers = tmp_path / "answers.jsonl"
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    outcome = cli(infer.main, "--base_model", tiny_llama, "--use_lora", "False", "--instruct_dir", questions,
                  "--output_file", answers, "--max_new_tokens", "2", "--num_beams", "1", "--batch_size", "1",
                  monkeypatch=monkeypatch, capsys=capsys)
    assert "Traceback" not in outcome.err, f"[traceback] {outcome.err[-1500:]}"
    assert answers.is_file(), "[data lost] the answers were generated, but never written"
    assert outcome.code in (0, 141)
    rows = [json.loads(line) for line in answers.read_text(encoding="utf-8").splitlines()]
    assert [row["instruction"] for row in rows] == ["问题0", "问题1", "问题2"]
    assert all(isinstance(row["model_output"], str) for row in rows)
