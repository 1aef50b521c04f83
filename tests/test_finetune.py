"""finetune.py end to end on tiny models, in-process through `run_cli` (the code path of `python finetune.py`)."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import reference_file, run_line
from faultkit import cli
from safetensors.torch import load_file

import finetune

QUICK = ["--batch_size", "8", "--micro_batch_size", "4", "--max_steps", "4", "--learning_rate", "3e-3",
         "--cutoff_len", "128", "--save_steps", "2", "--eval_steps", "2", "--logging_steps", "1"]


@pytest.fixture
def finetune_cli(monkeypatch, capsys):
    """`python finetune.py args...` in-process: returncode, stdout, stderr."""

    def run(*args) -> SimpleNamespace:
        outcome = cli(finetune.main, *args, monkeypatch=monkeypatch, capsys=capsys)
        return SimpleNamespace(returncode=outcome.code, stdout=outcome.out, stderr=outcome.err)

    return run


@pytest.fixture
def train_adapter(finetune_cli):
    """A quick run (a few steps) that must succeed."""

    def run(base: Path, data: Path, output_dir: Path, *extra: str) -> SimpleNamespace:
        result = finetune_cli("--base_model", base, "--data_path", data, "--output_dir", output_dir, *QUICK, *extra)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result

    return run


def lora_tensors(adapter_dir) -> dict[str, torch.Tensor]:
    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def test_llama_adapter_is_saved_and_not_empty(tiny_llama, train_file, tmp_path, train_adapter):
    out = tmp_path / "adapter"
    result = train_adapter(tiny_llama, train_file, out)
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "bentsao_training.json"):
        assert (out / name).is_file(), name
    tensors = lora_tensors(out)
    lora_b = [t for name, t in tensors.items() if "lora_B" in name]
    assert lora_b and all(torch.count_nonzero(t) > 0 for t in lora_b)
    config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]  # LLaMA default
    metadata = json.loads((out / "bentsao_training.json").read_text())
    assert metadata["base_model"] == str(tiny_llama) and metadata["prompt_template_name"] == "med_template"
    assert metadata["cutoff_len"] == 128
    line = run_line(result.stdout)
    assert "1 process(es)" in line and "gradient_accumulation_steps: 2" in result.stdout
    assert "loggers none" in line and "(2 validation rows)" in line  # a tenth of a 26-row file
    assert f"adapter saved to {out.resolve()}" in result.stdout
    assert f"{metadata['summary']['truncated_rows']} cut at --cutoff_len 128" in result.stdout
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the loss picture, with validation
    assert not (tmp_path / "wandb").exists()


def test_bloom_trains_without_target_modules(tiny_models, train_file, tmp_path, train_adapter):
    out = tmp_path / "bloom"
    train_adapter(tiny_models["bloom"], train_file, out, "--prompt_template_name", "bloom_deploy", "--max_steps", "2",
                  "--val_set_size", "0")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] == ["query_key_value"]
    assert all(torch.count_nonzero(t) > 0 for n, t in lora_tensors(out).items() if "lora_B" in n)


def test_all_linear_and_bad_target_names(tiny_models, train_file, tmp_path, train_adapter, finetune_cli):
    out = tmp_path / "qwen"
    train_adapter(tiny_models["qwen2"], train_file, out, "--lora_target_modules", "all-linear", "--max_steps", "2",
                  "--val_set_size", "0")
    targets = set(json.loads((out / "adapter_config.json").read_text())["target_modules"])
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= targets

    bad = finetune_cli(
        "--base_model",
        str(tiny_models["llama"]),
        "--data_path",
        str(train_file),
        "--output_dir",
        str(tmp_path / "bad"),
        "--lora_target_modules",
        "[q_proj,query_key_value]",
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "query_key_value" in bad.stderr and "q_proj" in bad.stderr  # the wrong target and the valid ones


def test_resume_continues_optimizer_schedule_and_step(tiny_llama, train_file, tmp_path, train_adapter):
    whole = tmp_path / "whole"
    train_adapter(tiny_llama, train_file, whole, "--val_set_size", "0")
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(whole / "checkpoint-2", resumed / "checkpoint-2")
    result = train_adapter(tiny_llama, train_file, resumed, "--resume_from_checkpoint", "True", "--val_set_size", "0")
    assert f"resuming {resumed / 'checkpoint-2'}" in run_line(result.stdout)
    state = json.loads((resumed / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    expected, actual = lora_tensors(whole), lora_tensors(resumed)
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-5, rtol=0)
    # the learning rate of step 3 continues the decay rather than restarting the warm-up
    lrs = [e["learning_rate"] for e in state["log_history"] if "learning_rate" in e]
    whole_lrs = [
        e["learning_rate"]
        for e in json.loads((whole / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
        if "learning_rate" in e
    ]
    assert lrs == whole_lrs


def test_published_recipe_flags_on_a_small_file(tiny_llama, tmp_path, finetune_cli):
    """The original scripts/finetune.sh command line, unchanged but for the model and data paths."""
    rows = [
        json.loads(line) for line in reference_file("llama_data.json").read_text(encoding="utf-8").splitlines()[:40]
    ]
    data = tmp_path / "llama_data.json"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    result = finetune_cli(
        "--base_model",
        str(tiny_llama),
        "--data_path",
        str(data),
        "--output_dir",
        str(tmp_path / "lora-llama-med-e1"),
        "--prompt_template_name",
        "med_template",
        "--micro_batch_size",
        "128",
        "--batch_size",
        "128",
        "--wandb_run_name",
        "e1",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "lora-llama-med-e1" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("name, template", [
    ("llama_data.json", "med_template"),
    # every row of it is read and checked in test_data.py; tokenising the whole file here takes ~15 s
    pytest.param("liver_cancer.json", "literature_template", marks=pytest.mark.slow),
])
def test_published_files_train_as_they_are(tiny_llama, tmp_path, name, template, train_adapter):
    out = tmp_path / "published"
    result = train_adapter(
        tiny_llama,
        reference_file(name),
        out,
        "--prompt_template_name",
        template,
        "--max_steps",
        "2",
        "--val_set_size",
        "0",
    )
    assert (out / "adapter_model.safetensors").is_file()
    assert "training rows" in result.stdout


def test_validation_size_choices(tiny_llama, train_file, tmp_path, train_adapter, finetune_cli):
    result = train_adapter(tiny_llama, train_file, tmp_path / "frac", "--val_set_size", "0.25", "--max_steps", "1")
    assert "(6 validation rows)" in run_line(result.stdout)
    too_many = finetune_cli(
        "--base_model",
        str(tiny_llama),
        "--data_path",
        str(train_file),
        "--output_dir",
        str(tmp_path / "x"),
        "--val_set_size",
        "500",
    )
    assert too_many.returncode == 2 and "--val_set_size 500" in too_many.stderr and "26 rows" in too_many.stderr
