"""The shell entry points, run as a user runs them: real processes whose output is a pipe, as under nohup,
sbatch or tee."""

import json
import re

from conftest import REPO, run_script, train_adapter


def test_default_scripts_build_the_tiny_model_train_and_answer(train_file, tmp_path):
    """With no BASE_MODEL, finetune.sh builds the tiny default once and infer.sh answers with its adapter."""
    env = {"TINY_BASE": str(tmp_path / "tiny"), "DATA_PATH": str(train_file), "OUTPUT_DIR": str(tmp_path / "lora"),
           "TINY_BASE_FLAGS": "--pretrain_steps 0"}  # the build as the user gets it, less its minute of pre-training
    env.pop("BASE_MODEL", None)
    trained = run_script(
        "bash", "scripts/finetune.sh", "--max_steps", "3", "--eval_steps", "3", "--save_steps", "3",
        "--logging_steps", "1", env=env,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "building the tiny embedded default model" in trained.stderr
    assert (tmp_path / "tiny" / "config.json").is_file() and (tmp_path / "lora" / "adapter_model.safetensors").is_file()
    # a log that is a pipe: readable progress lines, one line per checkpoint, no dicts of strings, no bar
    log = trained.stdout
    assert re.search(r"^step 3/3, [\d.]+ s/step, ETA \d+ s, loss \d+\.\d{4}", log, flags=re.MULTILINE), log[-3000:]
    assert f"checkpoint saved: {tmp_path / 'lora' / 'checkpoint-3'}" in log
    assert "'epoch':" not in log
    assert log.count("step 3/3: validation loss") == 1  # the last step's evaluation is not repeated at the end
    assert "FutureWarning" not in trained.stderr  # peft's is_gradient_checkpointing (utils/__init__.py)

    questions = tmp_path / "q.json"
    questions.write_text(
        json.dumps([{"instruction": "高血压有哪些症状？", "output": "头痛、头晕。"}] * 3, ensure_ascii=False)
    )
    answered = run_script(
        "bash",
        "scripts/infer.sh",
        "--max_new_tokens",
        "8",
        env={**env, "LORA_WEIGHTS": str(tmp_path / "lora"), "INSTRUCT_DIR": str(questions)},
    )
    assert answered.returncode == 0, answered.stderr[-3000:]
    assert answered.stdout.count("###model output###") == 3
    assert "building the tiny" not in answered.stderr  # built once
    assert "Warning" not in answered.stderr, answered.stderr[-3000:]

    compared = run_script(
        "bash",
        "scripts/test.sh",
        "--max_new_tokens",
        "8",
        env={
            **env,
            "LORA_WEIGHTS": str(tmp_path / "lora"),
            "INSTRUCT_DIR": str(questions),
            "OUT_DIR": str(tmp_path / "cmp"),
        },
    )
    assert compared.returncode == 0, compared.stderr[-3000:]
    table = [line for line in compared.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| predictions | rows | bleu-4") and len(table) == 3  # header, base, med
    assert "base.jsonl | 3 |" in table[1] and "med.jsonl | 3 |" in table[2]


def test_literature_scripts(tiny_llama, tmp_path):
    """The two literature scripts on an adapter trained (in-process) on the literature data and template."""
    train_adapter(tiny_llama, REPO / "data_literature" / "liver_cancer.json", tmp_path / "lit", "--max_steps", "2",
                  "--micro_batch_size", "8", "--batch_size", "8", "--val_set_size", "0",
                  "--prompt_template_name", "literature_template")
    env = {"BASE_MODEL": str(tiny_llama), "LORA_WEIGHTS": str(tmp_path / "lit")}
    single = run_script("bash", "scripts/infer-literature-single.sh", "--max_new_tokens", "8", env=env)
    assert single.returncode == 0 and single.stdout.count("Response:") == 5, single.stderr[-3000:]
    multi = run_script(
        "bash",
        "scripts/infer-literature-multi.sh",
        "--max_new_tokens",
        "8",
        env=env,
        stdin="肝癌有哪些危险因素？\n怎么筛查？\n",
    )
    assert multi.returncode == 0 and multi.stdout.count("Response:") == 2, multi.stderr[-3000:]
    asked = [line for line in multi.stdout.splitlines() if line.startswith("Instruction:")]
    assert asked == ["Instruction: 肝癌有哪些危险因素？", "Instruction: 怎么筛查？"]  # a piped chat shows its questions


def test_missing_adapter_is_a_clear_message(tiny_llama, tmp_path):
    result = run_script(
        "bash", "scripts/infer.sh", env={"BASE_MODEL": str(tiny_llama), "LORA_WEIGHTS": str(tmp_path / "none")}
    )
    assert result.returncode == 2 and "no adapter in" in result.stderr and "scripts/finetune.sh" in result.stderr


def test_finetune_sh_starts_one_process_per_gpu_through_torchrun():
    """With several GPUs (NPROC, by default the count torch sees), finetune.sh launches torchrun instead of one
    process that finetune.py would refuse; both ranks start finetune.py with the script's flags."""
    started = run_script("bash", "scripts/finetune.sh", "--help", env={"NPROC": "2", "BASE_MODEL": "unused"},
                         timeout=300)
    assert started.returncode == 0, started.stderr[-3000:]
    assert "starting 2 processes, one per GPU:" in started.stderr
    assert "-m torch.distributed.run --standalone --nproc_per_node 2 finetune.py" in started.stderr
    assert started.stdout.count("--resume_from_checkpoint") == 2  # each rank printed finetune.py's --help
