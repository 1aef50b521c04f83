"""Fault injection, concurrency and signals: a second run into the same output is refused while the first holds it
(and only while it does: a killed holder leaves no stale lock); Ctrl-C and SIGTERM end a run with one line or
quietly, never with a traceback, and never with a half-written file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fake_openai import FakeOpenAI, Reply
from faultkit import REPO, assert_refused, assert_succeeded, assert_unchanged, cli, snapshot

import finetune
from utils.core.errors import UserError
from utils.core.io import RunLock

HOLD = ("import sys, time; sys.path.insert(0, '.'); from utils.core.io import RunLock; "
        "lock = RunLock(sys.argv[1], 'the output').__enter__(); print('held', flush=True); time.sleep(120)")


def hold_lock(path: Path) -> subprocess.Popen:
    """Another process that takes the lock at `path` (the way a run does) and keeps it."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def environment(**extra: str) -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", NO_PROXY="127.0.0.1,localhost",
                no_proxy="127.0.0.1,localhost", **extra)


def test_a_second_finetune_into_a_held_output_dir_is_refused_naming_the_holder(tiny_llama, train_file, tmp_path,
                                                                               monkeypatch, capsys):
    out = tmp_path / "out"
    (out / "checkpoint-3").mkdir(parents=True)  # what the first run has written so far
    (out / "checkpoint-3" / "adapter_model.safetensors").write_bytes(b"the first run's weights")
    holder = hold_lock(out / ".bentsao.lock")
    try:
        before = snapshot(out)
        for resume in ([], ["--resume_from_checkpoint", "True"], ["--overwrite", "True"]):
            outcome = cli(finetune.main, "--base_model", tiny_llama, "--data_path", train_file, "--output_dir", out,
                          *resume, monkeypatch=monkeypatch, capsys=capsys)
            assert_unchanged(before, out)
            line = assert_refused(outcome, f"pid {holder.pid}", ".bentsao.lock")
            assert "checkpoint" not in line, f"[message] {line}"  # the holder is the news
    finally:
        holder.kill()
        holder.wait()


def test_a_run_that_finished_into_the_output_dir_just_before_this_one_locked_it_is_not_overwritten(
        tiny_llama, train_file, tmp_path, monkeypatch, capsys):
    """The race of two runs started moments apart: the first finishes (its adapter published, its lock released)
    just before the second takes the lock. The second checks the folder only once it holds the lock, so it refuses
    instead of training over the finished adapter."""
    out = tmp_path / "out"
    take_lock = RunLock.__enter__

    def the_first_run_finishes_then_lock(lock):
        out.mkdir(exist_ok=True)
        (out / "adapter_config.json").write_text('{"peft_type": "LORA"}', encoding="utf-8")
        (out / "adapter_model.safetensors").write_bytes(b"the first run's adapter")
        return take_lock(lock)

    monkeypatch.setattr(RunLock, "__enter__", the_first_run_finishes_then_lock)
    outcome = cli(finetune.main, "--base_model", tiny_llama, "--data_path", train_file, "--output_dir", out,
                  monkeypatch=monkeypatch, capsys=capsys)
    assert_refused(outcome, str(out), "--overwrite True")
    assert (out / "adapter_model.safetensors").read_bytes() == b"the first run's adapter"


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    path = tmp_path / "out" / ".bentsao.lock"
    holder = hold_lock(path)
    with pytest.raises(UserError, match=f"pid {holder.pid}"), RunLock(path, "the output"):
        pass
    holder.send_signal(signal.SIGKILL)  # no chance to clean up: the lock file stays, the kernel drops the lock
    holder.wait()
    assert path.exists()
    with RunLock(path, "the output"):
        assert path.read_text().startswith(f"pid {os.getpid()} on ")
    assert not path.exists()


def test_a_run_that_wrote_nothing_leaves_no_empty_output_folder(tmp_path):
    """The lock creates the output folder; a run refused after taking it (say, every row too long for the template)
    removes the folders it made and left empty, and keeps any the run wrote into."""
    with RunLock(tmp_path / "new" / "out" / ".lock", "the output"):
        assert (tmp_path / "new" / "out").is_dir()
    assert not (tmp_path / "new").exists()
    with RunLock(tmp_path / "kept" / ".lock", "the output"):
        (tmp_path / "kept" / "adapter_config.json").write_text("{}", encoding="utf-8")
    assert (tmp_path / "kept" / "adapter_config.json").is_file()


def test_the_lock_names_no_secret(tmp_path, monkeypatch):
    from utils.core.errors import register_secret

    register_secret("sk-lock-secret-123456")
    monkeypatch.setattr(sys, "argv", ["finetune.py", "--wandb_run_name", "sk-lock-secret-123456"])
    with RunLock(tmp_path / "lock", "the output"):
        assert "sk-lock-secret" not in (tmp_path / "lock").read_text(), "[secret] an API key in the lock file"


@pytest.mark.slow
def test_two_real_finetune_runs_into_one_output_dir(tiny_llama, train_file, tmp_path, monkeypatch, capsys):
    """Two `finetune.py` processes into one --output_dir: the second is refused while the first trains; the first
    goes on untouched (stopped here with SIGTERM, it saves a whole checkpoint and says so)."""
    out = tmp_path / "out"
    first = subprocess.Popen(
        [sys.executable, "finetune.py", "--base_model", str(tiny_llama), "--data_path", str(train_file),
         "--output_dir", str(out), "--max_steps", "100000", "--batch_size", "4", "--micro_batch_size", "4",
         "--val_set_size", "0", "--cutoff_len", "64", "--save_steps", "100000", "--logging_steps", "1"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment())
    lines: list[str] = []  # the run's stdout and stderr as they come (read by threads: no pipe fills up)
    errors: list[str] = []
    readers = [threading.Thread(target=lambda: lines.extend(first.stdout), daemon=True),
               threading.Thread(target=lambda: errors.extend(first.stderr), daemon=True)]
    for reader in readers:
        reader.start()
    try:
        deadline = time.monotonic() + 300
        while not (out / ".bentsao.lock").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        second = cli(finetune.main, "--base_model", tiny_llama, "--data_path", train_file, "--output_dir", out,
                     "--max_steps", "2", monkeypatch=monkeypatch, capsys=capsys)
        # training has started (a step line): a SIGTERM while the model still loads just ends the process
        while not any(line.startswith("step ") for line in lines) and first.poll() is None:
            assert time.monotonic() < deadline, "the first run never reached its first step"
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended before the second started"
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=300)
        for reader in readers:
            reader.join(timeout=60)
        stdout, stderr = "".join(lines), "".join(errors)
    finally:
        first.kill()
    assert_refused(second, "is in use by another run", f"pid {first.pid}")
    assert first.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    saved = [line for line in stdout.splitlines() if line.startswith("stopped by SIGTERM at step")]
    checkpoint = Path(saved[0].split("checkpoint saved to ", 1)[1].split(";", 1)[0])
    assert (checkpoint / "trainer_state.json").is_file() and not (out / ".bentsao.lock").exists()


# --- signals ---------------------------------------------------------------------------------------------------------

SIGINT_AS_IN_A_TERMINAL = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                           "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
JUDGE_ROWS = [{"instruction": f"问题{i}", "output": "参考答案", "model_output": "回答"} for i in range(40)]
SCORES = '{"completeness": 2, "depth": 1, "professionalism": 3}'


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_judging_keeps_what_was_graded_and_the_earlier_output(signum, tmp_path):
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in JUDGE_ROWS),
                           encoding="utf-8")
    metrics = tmp_path / "metrics.json"
    metrics.write_text('{"note": "an earlier run"}\n', encoding="utf-8")
    cache = tmp_path / "judge.jsonl"
    with FakeOpenAI(lambda body: Reply(content=SCORES, delay=0.05)) as server:
        # A shell that starts pytest in the background ignores SIGINT, and children inherit that: the child gets
        # Python's own Ctrl-C handler back first, as it would have in a terminal.
        process = subprocess.Popen(
            [sys.executable, "-c", SIGINT_AS_IN_A_TERMINAL, "evaluate.py", "--predictions", str(predictions),
             "--output", str(metrics), "--judge", "openai", "--model", "judge", "--api_base", server.url,
             "--api_key_env", "FAULT_KEY", "--judge_cache", str(cache), "--retry_base_delay", "0"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment(FAULT_KEY="sk-x"))
        deadline = time.monotonic() + 60
        while len(server.requests) < 5 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=60)
    assert "Traceback" not in stderr
    assert process.returncode in ((130,) if signum == signal.SIGINT else (-signal.SIGTERM, 128 + signal.SIGTERM))
    if signum == signal.SIGINT:
        assert stderr.rstrip().endswith("interrupted")
    assert metrics.read_text(encoding="utf-8") == '{"note": "an earlier run"}\n'  # never half-written
    graded = [json.loads(line) for line in cache.read_text(encoding="utf-8").splitlines()]
    assert 1 <= len(graded) < len(JUDGE_ROWS) and all(entry["scores"] for entry in graded)


def test_two_build_dataset_resume_runs_into_one_output(tmp_path):
    """Two `build_dataset.py knowledge --backend openai --resume True` into one output at once: the second is refused
    (one line), and the rows of the first are each there once."""
    kb = tmp_path / "kb.jsonl"
    entities = [{"中心词": f"病{i}", "类型": "疾病", "相关症状": ["发热", "咳嗽"]} for i in range(6)]
    kb.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entities), encoding="utf-8")
    output = tmp_path / "rows.jsonl"

    def reply(body: dict) -> Reply:
        message = next(m["content"] for m in reversed(body["messages"]) if m["role"] == "user")
        name = next(e["中心词"] for e in entities if f"“{e['中心词']}”" in message)
        pairs = [{"question": f"{name}有哪些症状？", "answer": f"{name}的常见症状包括发热、咳嗽。"}]
        return Reply(content=json.dumps(pairs, ensure_ascii=False), delay=0.3)

    with FakeOpenAI(reply) as server:
        argv = [sys.executable, "build_dataset.py", "knowledge", "--kb", str(kb), "--output", str(output),
                "--backend", "openai", "--model", "m", "--api_base", server.url, "--api_key_env", "FAULT_KEY",
                "--resume", "True", "--concurrency", "1", "--retry_base_delay", "0"]
        first = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env=environment(FAULT_KEY="sk-x"))
        deadline = time.monotonic() + 60
        while not server.requests and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        second = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, env=environment(FAULT_KEY="sk-x"),
                                timeout=120, check=False)
        _, first_err = first.communicate(timeout=120)
    rows = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len({row["instruction"] for row in rows}) == len(rows), "[data lost] rows written twice: every later " \
        "--resume would refuse the file"
    assert first.returncode == 0 and rows, f"[data lost] the first run failed: {first_err[-1500:]}"
    assert second.returncode == 2 and "Traceback" not in second.stderr, f"[not refused] {second.stderr[-1500:]}"
    assert "in use by another run" in second.stderr, f"[message] {second.stderr[-500:]}"


def test_a_resumed_finetune_after_a_refused_second_run_still_works(tiny_llama, train_file, tmp_path, monkeypatch,
                                                                     capsys):
    """The refusal leaves nothing behind that would block the rightful next run (no lock file, no folder)."""
    out = tmp_path / "out"
    holder = hold_lock(out / ".bentsao.lock")
    try:
        assert_refused(cli(finetune.main, "--base_model", tiny_llama, "--data_path", train_file, "--output_dir", out,
                           monkeypatch=monkeypatch, capsys=capsys), f"pid {holder.pid}")
    finally:
        holder.kill()
        holder.wait()
    outcome = cli(finetune.main, "--base_model", tiny_llama, "--data_path", train_file, "--output_dir", out,
                  "--max_steps", "1", "--batch_size", "4", "--micro_batch_size", "4", "--val_set_size", "0",
                  "--cutoff_len", "64", "--save_steps", "100", monkeypatch=monkeypatch, capsys=capsys)
    assert_succeeded(outcome)
    assert (out / "adapter_config.json").is_file() and not (out / ".bentsao.lock").exists()
