"""Fault injection, options: every flag of every script is checked before any work.

Each case gives one bad flag to a command line that is otherwise wrong too (its --base_model does not exist): the one
error line must be about the flag, which proves the flags were read before anything else, and the run must leave
the disk as it was.
"""

from __future__ import annotations

import socket

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

# (script, bad flags, the key facts the one error line must name)
CASES = [
    # unknown flags and stray words
    ("finetune", ["--num_epoch", "3"], ["--num_epoch", "--num_epochs"]),  # and what was meant
    ("finetune", ["extra"], ["'extra'"]),
    ("finetune", ["-x"], ["--x"]),
    ("evaluate", ["--", "--interactive"], ["--interactive"]),  # fire's console after the run
    ("infer", ["--lora_weight", "x"], ["--lora_weights"]),
    ("export", ["--output", "x"], ["--output_dir"]),
    ("evaluate", ["--prediction", "x"], ["--predictions"]),
    ("generate", ["--port", "80"], ["--port"]),
    ("knowledge", ["--conc", "2"], ["--conc"]),
    # types, from the dataclass
    ("finetune", ["--lora_dropout", "abc"], ["--lora_dropout", "abc"]),
    ("finetune", ["--lora_alpha", "x"], ["--lora_alpha"]),
    ("finetune", ["--seed", "x"], ["--seed"]),
    ("finetune", ["--batch_size", "2.5"], ["--batch_size"]),
    ("finetune", ["--learning_rate", "1e400"], ["--learning_rate"]),
    ("finetune", ["--learning_rate", "nan"], ["--learning_rate"]),
    ("finetune", ["--packing", "maybe"], ["--packing"]),
    ("finetune", ["--gradient_checkpointing", "2"], ["--gradient_checkpointing"]),
    ("finetune", ["--max_steps"], ["--max_steps"]),  # a flag without its value
    ("infer", ["--temperature", "warm"], ["--temperature", "warm"]),
    ("infer", ["--top_k", "1.5"], ["--top_k"]),
    ("infer", ["--repetition_penalty", "inf"], ["--repetition_penalty"]),
    ("infer", ["--do_sample", "perhaps"], ["--do_sample"]),
    ("generate", ["--temperature", "warm"], ["--temperature"]),
    ("generate", ["--server_port", "abc"], ["--server_port"]),
    ("evaluate", ["--timeout", "abc"], ["--timeout"]),
    ("knowledge", ["--timeout", "abc"], ["--timeout"]),
    ("knowledge", ["--seed", "x"], ["--seed"]),
    # ranges, declared with each flag
    ("finetune", ["--lora_dropout", "1"], ["--lora_dropout"]),
    ("finetune", ["--lora_alpha", "0"], ["--lora_alpha"]),
    ("finetune", ["--lora_r", "0"], ["--lora_r"]),
    ("finetune", ["--max_steps", "-2"], ["--max_steps"]),
    ("finetune", ["--warmup_steps", "-1"], ["--warmup_steps"]),
    ("finetune", ["--seed", "-1"], ["--seed"]),
    ("finetune", ["--num_epochs", "0"], ["--num_epochs"]),
    ("finetune", ["--cutoff_len", "0"], ["--cutoff_len"]),
    ("finetune", ["--val_set_size", "-1"], ["--val_set_size"]),
    ("finetune", ["--save_steps", "0"], ["--save_steps"]),
    ("finetune", ["--precision", "fp8"], ["--precision"]),
    ("finetune", ["--attn_implementation", "flash"], ["--attn_implementation"]),
    ("infer", ["--max_new_tokens", "0"], ["--max_new_tokens"]),
    ("infer", ["--num_beams", "0"], ["--num_beams"]),
    ("infer", ["--batch_size", "-1"], ["--batch_size"]),
    ("infer", ["--min_new_tokens", "9", "--max_new_tokens", "4"], ["--min_new_tokens", "--max_new_tokens"]),
    ("infer", ["--do_sample", "--temperature", "0"], ["--temperature"]),
    ("infer", ["--device_map", "bogus"], ["--device_map"]),
    ("infer_literature", ["--single_or_multi", "both"], ["--single_or_multi"]),
    ("infer_literature", ["--max_turns", "-1"], ["--max_turns"]),
    ("infer_literature", ["--do_sample", "--top_p", "0"], ["--top_p"]),
    ("generate", ["--server_port", "70000"], ["--server_port"]),
    ("generate", ["--auth", "nopassword"], ["--auth"]),
    ("export", ["--max_shard_size", "lots"], ["--max_shard_size"]),
    ("export", ["--max_shard_size", "0"], ["--max_shard_size"]),
    ("export", ["--dtype", "fp8"], ["--dtype"]),
    ("evaluate", ["--timeout", "0"], ["--timeout"]),
    ("evaluate", ["--max_retries", "-1"], ["--max_retries"]),
    ("evaluate", ["--judge", "claude"], ["--judge"]),
    ("knowledge", ["--per_entity", "0"], ["--per_entity"]),
    ("knowledge", ["--backend", "gpt"], ["--backend"]),
    ("knowledge", ["--max_retries", "-1", "--backend", "openai", "--model", "m"], ["--max_retries"]),
    ("literature", ["--min_overlap", "2"], ["--min_overlap"]),
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


def test_help_lists_every_flag_with_its_help_and_range(monkeypatch, capsys):
    import dataclasses

    from utils.training.args import FinetuneArgs

    outcome = cli(finetune.main, "--help", monkeypatch=monkeypatch, capsys=capsys)
    assert outcome.code == 0 and not outcome.err
    for field in dataclasses.fields(FinetuneArgs):
        assert f"--{field.name}" in outcome.out and field.metadata["help"][:30] in outcome.out.replace("\n", " ")
    assert ">= 0 and < 1" in outcome.out  # --lora_dropout's range


def test_every_problem_in_one_line(tmp_path, monkeypatch, capsys):
    """Three bad flags: one line naming all three, so a user fixes them in one go."""
    line = assert_refused(cli(finetune.main, "--base_model", NO_MODEL, "--lora_r", "0", "--seed", "x",
                              "--lora_dropout", "2", monkeypatch=monkeypatch, capsys=capsys))
    for flag in ("--lora_r", "--seed", "--lora_dropout"):
        assert flag in line


def test_a_port_in_use_is_reported_with_the_other_problems_before_the_model_loads(tmp_path, monkeypatch, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = assert_refused(cli(generate.main, "--base_model", NO_MODEL, "--use_lora", "False", "--server_port",
                                  port, monkeypatch=monkeypatch, capsys=capsys), f"127.0.0.1:{port}", "--server_port")
    assert NO_MODEL in line  # one error names every problem


def test_every_problem_of_a_finetune_command_is_in_its_one_error(monkeypatch, capsys, tmp_path):
    line = assert_refused(cli(finetune.main, "--base_model", NO_MODEL, "--data_path", tmp_path / "nope.json",
                              "--output_dir", tmp_path / "out", "--report_to", "bogus", "--val_set_size", "2.5",
                              monkeypatch=monkeypatch, capsys=capsys))
    for fact in (NO_MODEL, "nope.json", "--report_to bogus", "--val_set_size"):
        assert fact in line
    assert not (tmp_path / "out").exists()


def test_valid_extremes_are_accepted_by_the_option_checks(monkeypatch, capsys, tmp_path):
    """No false alarms: boundary values pass the flag checks (the run then stops at the missing model)."""
    line = assert_refused(cli(finetune.main, "--base_model", NO_MODEL, "--data_path", tmp_path / "d.jsonl",
                              "--output_dir", tmp_path / "out", "--lora_dropout", "0", "--max_steps", "-1",
                              "--seed", "0", "--learning_rate", "1e-9",
                              "--val_set_size", "0", monkeypatch=monkeypatch, capsys=capsys))
    assert "must" not in line and NO_MODEL in line
