"""Fault injection, options: every flag of every script is checked before any work.

Each case gives one bad flag to a command line that is otherwise wrong too (its --base_model does not exist): the one
error line must be about the flag, which proves the flags were read before anything else, and the run must leave
the disk as it was.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from faultkit import assert_refused, assert_unchanged, cli, snapshot

import build_dataset
import evaluate
import export_hf_checkpoint
import finetune
import generate
import infer
import infer_literature

NO_MODEL = "./no/such/model"
SCRIPTS = {
    "finetune": (finetune.main, ["--base_model", NO_MODEL, "--data_path", "DATA", "--output_dir", "OUT"]),
    "infer": (infer.main, ["--base_model", NO_MODEL, "--lora_weights", "OUT"]),
    "infer_literature": (infer_literature.main, ["--base_model", NO_MODEL, "--lora_weights", "OUT"]),
    "generate": (generate.main, ["--base_model", NO_MODEL, "--lora_weights", "OUT"]),
    "export": (export_hf_checkpoint.main, ["--base_model", NO_MODEL, "--lora_weights", "OUT", "--output_dir", "OUT"]),
    "evaluate": (evaluate.main, ["--predictions", "DATA"]),
    "knowledge": ({"knowledge": build_dataset.knowledge, "literature": build_dataset.literature},
                  ["knowledge", "--kb", "DATA", "--output", "OUT/rows.jsonl"]),
    "literature": ({"knowledge": build_dataset.knowledge, "literature": build_dataset.literature},
                   ["literature", "--docs", "DATA", "--output", "OUT/rows.json"]),
}

CASES = [
    # unknown flags and stray words
    ("finetune", ["--num_epoch", "3"], ["unknown flag --num_epoch (did you mean --num_epochs?)"]),
    ("finetune", ["extra"], ["unexpected argument 'extra'"]),
    ("finetune", ["-x"], ["unknown flag --x"]),
    ("evaluate", ["--", "--interactive"], ["unexpected '--interactive' after `--`"]),  # fire's console after the run
    ("infer", ["--lora_weight", "x"], ["did you mean --lora_weights?"]),
    ("export", ["--output", "x"], ["did you mean --output_dir?"]),
    ("evaluate", ["--prediction", "x"], ["did you mean --predictions?"]),
    ("generate", ["--port", "80"], ["unknown flag --port"]),
    ("knowledge", ["--conc", "2"], ["unknown flag --conc"]),
    # types, from the signature
    ("finetune", ["--lora_dropout", "abc"], ["--lora_dropout must be a number, got 'abc'"]),
    ("finetune", ["--lora_alpha", "x"], ["--lora_alpha must be a number"]),
    ("finetune", ["--seed", "x"], ["--seed must be an integer, got 'x'"]),
    ("finetune", ["--batch_size", "2.5"], ["--batch_size must be an integer"]),
    ("finetune", ["--learning_rate", "1e400"], ["--learning_rate must be a finite number"]),
    ("finetune", ["--learning_rate", "nan"], ["--learning_rate must be a number"]),
    ("finetune", ["--packing", "maybe"], ["--packing must be True or False"]),
    ("finetune", ["--gradient_checkpointing", "2"], ["--gradient_checkpointing must be True or False"]),
    ("finetune", ["--max_steps"], ["--max_steps needs a value"]),
    ("infer", ["--temperature", "warm"], ["--temperature must be a number, got 'warm'"]),
    ("infer", ["--top_k", "1.5"], ["--top_k must be an integer"]),
    ("infer", ["--repetition_penalty", "inf"], ["--repetition_penalty must be a number"]),
    ("infer", ["--do_sample", "perhaps"], ["--do_sample must be True or False"]),
    ("generate", ["--temperature", "warm"], ["--temperature must be a number, got 'warm'"]),
    ("generate", ["--server_port", "abc"], ["--server_port must be an integer"]),
    ("evaluate", ["--timeout", "abc"], ["--timeout must be a number, got 'abc'"]),
    ("knowledge", ["--timeout", "abc"], ["--timeout must be a number"]),
    ("knowledge", ["--seed", "x"], ["--seed must be an integer"]),
    # ranges, declared with option_checks / __option_checks__
    ("finetune", ["--lora_dropout", "1"], ["--lora_dropout must be in [0, 1), got 1"]),
    ("finetune", ["--lora_alpha", "0"], ["--lora_alpha must be > 0"]),
    ("finetune", ["--lora_r", "0"], ["--lora_r must be >= 1"]),
    ("finetune", ["--max_steps", "-2"], ["--max_steps must be >= -1"]),
    ("finetune", ["--warmup_steps", "-1"], ["--warmup_steps must be >= 0"]),
    ("finetune", ["--seed", "-1"], ["--seed must be in [0, 4.29497e+09]"]),
    ("finetune", ["--num_epochs", "0"], ["--num_epochs must be > 0"]),
    ("finetune", ["--cutoff_len", "0"], ["--cutoff_len must be >= 1"]),
    ("finetune", ["--val_set_size", "-1"], ["--val_set_size must be >= 0"]),
    ("finetune", ["--save_steps", "0"], ["--save_steps must be >= 1"]),
    ("infer", ["--max_new_tokens", "0"], ["--max_new_tokens must be >= 1"]),
    ("infer", ["--num_beams", "0"], ["--num_beams must be >= 1"]),
    ("infer", ["--batch_size", "-1"], ["--batch_size must be >= 0"]),
    ("infer", ["--min_new_tokens", "9", "--max_new_tokens", "4"], ["--min_new_tokens 9 exceeds --max_new_tokens 4"]),
    ("infer", ["--do_sample", "--temperature", "0"], ["--temperature must be above 0 when sampling"]),
    ("infer", ["--device_map", "bogus"], ["--device_map must be one of auto"]),
    ("infer_literature", ["--single_or_multi", "both"], ["--single_or_multi must be one of single, multi"]),
    ("infer_literature", ["--max_turns", "-1"], ["--max_turns must be >= 0"]),
    ("infer_literature", ["--do_sample", "--top_p", "0"], ["--top_p must be in (0, 1] when sampling"]),
    ("generate", ["--server_port", "70000"], ["--server_port must be in [1, 65535], got 70000"]),
    ("generate", ["--auth", "nopassword"], ["--auth must look like user:password"]),
    ("export", ["--max_shard_size", "lots"], ["--max_shard_size must be a size such as 5GB"]),
    ("export", ["--max_shard_size", "0"], ["--max_shard_size must be a size"]),
    ("export", ["--dtype", "fp8"], ["--dtype must be one of auto, fp32, fp16, bf16"]),
    ("evaluate", ["--timeout", "0"], ["--timeout must be > 0"]),
    ("evaluate", ["--max_retries", "-1"], ["--max_retries must be >= 0"]),
    ("evaluate", ["--judge", "claude"], ["--judge must be openai"]),
    ("knowledge", ["--per_entity", "0"], ["--per_entity must be"]),
    ("knowledge", ["--backend", "gpt"], ["--backend must be one of template, openai"]),
    pytest.param("knowledge", ["--max_retries", "-1", "--backend", "openai", "--model", "m"],
                 ["--max_retries must be"]),
    ("literature", ["--min_overlap", "2"], ["--min_overlap must be"]),
]


def case_id(case) -> str:
    values = case.values if hasattr(case, "values") else case
    return f"{values[0]}:{' '.join(values[1])[:40]}"


@pytest.mark.parametrize("script, flags, expected", CASES, ids=[case_id(c) for c in CASES])
def test_a_bad_flag_is_one_line_before_any_work(script, flags, expected, tmp_path, monkeypatch, capsys):
    component, argv = SCRIPTS[script]
    data = tmp_path / "data.jsonl"
    data.write_text('{"instruction": "q", "output": "a", "model_output": "a"}\n', encoding="utf-8")
    argv = [str(data) if a == "DATA" else a.replace("OUT", str(tmp_path / "out")) for a in argv]
    before = snapshot(tmp_path)
    outcome = cli(component, *argv, *flags, monkeypatch=monkeypatch, capsys=capsys)
    assert_unchanged(before, tmp_path)
    line = assert_refused(outcome, *expected)
    # the flag was read first: the missing model is not mentioned, or (a script that lists every problem) after it
    assert NO_MODEL not in line or line.index(expected[0]) < line.index(NO_MODEL), f"[message] {line}"


def test_every_problem_in_one_line(tmp_path, monkeypatch, capsys):
    """Three bad flags: one line naming all three, so a user fixes them in one go."""
    line = assert_refused(cli(finetune.main, "--base_model", NO_MODEL, "--lora_r", "0", "--seed", "x",
                              "--lora_dropout", "2", monkeypatch=monkeypatch, capsys=capsys))
    for flag in ("--lora_r", "--seed", "--lora_dropout"):
        assert flag in line


def test_a_port_in_use_is_one_line_before_the_model_loads(tmp_path, monkeypatch, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = assert_refused(cli(generate.main, "--base_model", NO_MODEL, "--use_lora", "False", "--server_port",
                                  port, monkeypatch=monkeypatch, capsys=capsys), f"127.0.0.1:{port}", "--server_port")
    assert NO_MODEL not in line


def test_help_is_not_an_error(monkeypatch, capsys):
    outcome = cli(finetune.main, "--help", monkeypatch=monkeypatch, capsys=capsys)
    assert outcome.code == 0 and "--lora_dropout (float)" in outcome.out and "[0, 1)" not in outcome.err


def test_valid_extremes_are_accepted_by_the_option_checks(monkeypatch, capsys, tmp_path):
    """No false alarms: boundary values pass the flag checks (the run then stops at the missing model)."""
    line = assert_refused(cli(finetune.main, "--base_model", NO_MODEL, "--data_path", tmp_path / "d.jsonl",
                              "--lora_dropout", "0", "--max_steps", "-1", "--seed", "0", "--learning_rate", "1e-9",
                              "--val_set_size", "0", monkeypatch=monkeypatch, capsys=capsys))
    assert "must" not in line and Path(NO_MODEL).as_posix() in line
