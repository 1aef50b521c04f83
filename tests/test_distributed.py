"""finetune.py under torchrun and accelerate launch: 2 CPU ranks (gloo) against 1 rank, resume inside the second
epoch, FSDP on CPU processes, and one process with several GPUs refused.

Why the losses of 1 and 2 ranks must agree, and how closely. The packed sampler gives step k the same rows whatever
the number of processes (the Trainer's seeded permutation, `--batch_size` rows a step, shared out over the ranks).
--lora_dropout 0 removes the only randomness in the forward pass. transformers 5 normalises the loss by the label
tokens of the whole global batch (`num_items_in_batch`, gathered across ranks since `average_tokens_across_devices`
is on) and multiplies by the world size to undo DDP's gradient averaging, so 2 ranks compute the same token-mean
loss and the same gradient as 1 rank; the logged loss is gathered over ranks the same way. What is left is float32
rounding: the gradient is summed in another order (two half sums all-reduced instead of one running sum), and Adam
carries that through the next steps (measured: within ~2e-7 relative). The tolerance, 1e-4 relative, is 500x that,
and far below what a real fault changes: ranks that train alone (no process group) or see the same rows log a loss
over half the rows (percent-level change), a wrong accumulation or token normalisation scales the gradient norm.

The run has 32 rows and 16 a step: 2 steps an epoch, so steps 3 and 4 are the second epoch, and a run resumed from
checkpoint-3 must replay the second epoch's order from its second step (accelerate's `skip_first_batches` around its
`BatchSamplerShard`; the Trainer cannot reach the sampler there to set its epoch, `SamplerEpoch` does).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, project_rows, run_line, run_script
from in_process import one_thread, run_main  # noqa: F401  one_thread: an autouse fixture
from safetensors.torch import load_file

import finetune
from utils.core.cli import run_cli
from utils.training.engines import cpu_engine_note, training_device_args

ROWS = 32
STEP_ROWS = 16
TOLERANCE = 1e-4  # relative; see the module docstring


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def training_flags(base: Path, data: Path, output_dir: Path) -> list[str]:
    return [
        "--base_model", str(base), "--data_path", str(data), "--output_dir", str(output_dir),
        "--batch_size", str(STEP_ROWS), "--micro_batch_size", "2", "--max_steps", "4", "--val_set_size", "0",
        "--lora_dropout", "0", "--learning_rate", "1e-2", "--warmup_steps", "0", "--cutoff_len", "128",
        "--logging_steps", "1", "--save_steps", "3", "--seed", "7",
    ]


def logged_steps(output_dir: Path, step: int = 4) -> list[dict]:
    """The per-step log (loss, grad_norm) at full precision, from the checkpoint rank 0 wrote."""
    state = json.loads((output_dir / f"checkpoint-{step}" / "trainer_state.json").read_text())
    return [entry for entry in state["log_history"] if "loss" in entry]


def assert_one_adapter(output_dir: Path, stdout: str) -> None:
    run_line(stdout)  # printed once (rank 0)
    assert stdout.count("adapter saved to") == 1 and stdout.count("summary:") == 1
    assert sorted(p.name for p in output_dir.iterdir() if p.is_dir()) == ["checkpoint-3", "checkpoint-4"]
    assert sorted(p.name for p in output_dir.rglob("adapter_config.json")) == ["adapter_config.json"] * 3
    assert not list(output_dir.glob(".tmp-*")) and not list(output_dir.glob(".old-*"))


def assert_same_steps(single: list[dict], multi: list[dict]) -> None:
    assert [e["step"] for e in single] == [e["step"] for e in multi] == [1, 2, 3, 4]
    for one, two in zip(single, multi, strict=True):
        for key in ("loss", "grad_norm"):
            assert two[key] == pytest.approx(one[key], rel=TOLERANCE), (key, one, two)
    assert single[-1]["loss"] < single[0]["loss"]  # the run does train


def assert_same_adapter(actual: Path, expected: Path, tolerance: float) -> None:
    a, b = (load_file(str(folder / "adapter_model.safetensors")) for folder in (actual, expected))
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] - b[name]).abs().max() <= 1e-7 + tolerance * b[name].abs().max(), name


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ddp") / "rows.jsonl"
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in project_rows()[:ROWS]),
                    encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def one_rank(tiny_llama, rows_file, tmp_path_factory) -> tuple[Path, str]:
    """The 1-process reference, in-process (`python finetune.py` through the same CLI entry point)."""
    output_dir = tmp_path_factory.mktemp("ddp") / "one"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["finetune.py", *training_flags(tiny_llama, rows_file, output_dir)])
        run_cli(finetune.main)
    return output_dir, ""


def torchrun(*args: str):
    return run_script("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                      "--master_port", str(free_port()), *args,
                      env={"OMP_NUM_THREADS": "1"})  # as torchrun sets it: 2 ranks x N threads on 2 cores crawl


@pytest.fixture(scope="module")
def two_ranks(tiny_llama, rows_file, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("ddp") / "two"
    result = torchrun("finetune.py", *training_flags(tiny_llama, rows_file, output_dir))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return output_dir, result


def test_torchrun_two_cpu_ranks_match_one_rank(one_rank, two_ranks):
    output_dir, result = two_ranks
    assert "2 process(es)" in run_line(result.stdout)  # printed once, by rank 0
    assert "gradient_accumulation_steps: 4" in result.stdout  # 16 / (2 x 2)
    assert_one_adapter(output_dir, result.stdout)
    assert "rank_0" not in result.stdout  # no per-rank copies of anything
    assert_same_steps(logged_steps(one_rank[0]), logged_steps(output_dir))
    single = load_file(str(one_rank[0] / "adapter_model.safetensors"))
    multi = load_file(str(output_dir / "adapter_model.safetensors"))
    assert single.keys() == multi.keys()
    for name in single:  # Adam turns rounding-level gradient differences into update-sized ones on tiny gradients:
        # compare the weights as a whole (a real fault moves them by far more than 0.1%)
        assert (multi[name] - single[name]).norm() <= 1e-3 * single[name].norm(), name


def test_two_rank_resume_inside_the_second_epoch_equals_the_whole_run(tiny_llama, rows_file, two_ranks, tmp_path):
    """checkpoint-3 is the first step of the second epoch done; the resumed run must train step 4 on the rows the
    uninterrupted run trained it on (before the fix: the first epoch's order, another loss and adapter)."""
    whole, _ = two_ranks
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(whole / "checkpoint-3", resumed / "checkpoint-3")
    result = torchrun("finetune.py", *training_flags(tiny_llama, rows_file, resumed),
                      "--resume_from_checkpoint", "True")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    expected, actual = logged_steps(whole)[-1], logged_steps(resumed)[-1]
    assert actual["step"] == expected["step"] == 4 and actual["epoch"] == pytest.approx(2.0)
    assert actual["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    assert actual["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-5)
    assert_same_adapter(resumed, whole, 1e-6)


@pytest.mark.slow  # the launcher path of the torchrun test above, with the shipped config
def test_accelerate_launch_with_the_shipped_ddp_config(tiny_llama, rows_file, one_rank, tmp_path):
    """`accelerate launch --config_file configs/accelerate/ddp.yaml` starts the same 2-rank run (here on CPU)."""
    output_dir = tmp_path / "accelerate"
    result = run_script(  # python -m accelerate.commands.launch: the `accelerate launch` of this interpreter
        "-m", "accelerate.commands.launch", "--config_file",
        str(REPO / "configs" / "accelerate" / "ddp.yaml"), "--num_processes", "2",
        "--main_process_port", str(free_port()), "finetune.py", *training_flags(tiny_llama, rows_file, output_dir),
        env={"OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 process(es)" in run_line(result.stdout) and "gradient_accumulation_steps: 4" in result.stdout
    assert_one_adapter(output_dir, result.stdout)
    assert_same_steps(logged_steps(one_rank[0]), logged_steps(output_dir))


def test_batch_size_must_divide_over_the_processes(tiny_llama, rows_file, tmp_path, monkeypatch):
    """12 rows per step over 8 processes x 2 rows cannot be kept: one clear line before anything loads."""
    args = training_flags(tiny_llama, rows_file, tmp_path / "bad")
    args[args.index("--batch_size") + 1] = "12"
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "0")
    result = run_main(finetune.main, *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "error: --batch_size 12 is not divisible by --micro_batch_size 2 x 8 process(es)"


def test_one_process_on_several_gpus_is_refused_before_any_weights_load(tiny_llama, rows_file, tmp_path,
                                                                        monkeypatch, capsys):
    """`python finetune.py` on a machine with 2 visible GPUs: the Trainer would wrap the model in nn.DataParallel,
    which scatters every batch tensor by rows (the packed rows, their `logits_to_keep` and the flattened
    `shift_labels` apart: kept logits [202, 176] against labels [189, 189] in the issue's emulation). It is refused
    with one line naming torchrun and CUDA_VISIBLE_DEVICES, before the weights load. The machine is emulated (CUDA
    present, 2 devices, native bf16): the check itself and finetune.py's stages run for real."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    loaded = []
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: loaded.append(a))
    monkeypatch.setattr(sys, "argv", ["finetune.py", *training_flags(tiny_llama, rows_file, tmp_path / "dp")])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        run_cli(finetune.main)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and not loaded and "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert line.startswith("error: 2 GPUs are visible but finetune.py was started as one process")
    assert "torchrun --nproc_per_node 2 finetune.py" in line and "CUDA_VISIBLE_DEVICES=0 python finetune.py" in line
    monkeypatch.setenv("LOCAL_RANK", "0")  # started by torchrun: one GPU per process, no refusal
    from utils.training.engines import check_one_process_per_gpu

    check_one_process_per_gpu("cuda", 2, launched=True)


def test_cpu_processes_use_gloo_and_gpus_keep_accelerates_choice():
    assert training_device_args("cpu", 2) == {"use_cpu": True, "ddp_backend": "gloo"}
    assert training_device_args("cpu", 1) == {"use_cpu": True, "ddp_backend": None}
    assert training_device_args("cuda", 8) == {} and training_device_args("mps", 1) == {}


def test_fsdp_or_deepspeed_config_on_cpu_is_noted(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert cpu_engine_note("cpu") is None
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    expected = "note: FSDP needs GPUs; on this CPU machine the processes train as plain DDP (gloo)"
    assert cpu_engine_note("cpu") == expected
    assert cpu_engine_note("cuda") is None


# --- FSDP and ZeRO-3 on CPU processes: sharded loading, training, saving, resume ------------------------------


def build_50m_llama(tokenizer_from: Path, output_dir: Path) -> int:
    """A ~49M-parameter LLaMA (random init, saved in bf16) with the tiny base's tokenizer; returns its fp32 bytes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tokenizer_from)
    config.update({"hidden_size": 768, "num_hidden_layers": 6, "num_attention_heads": 12, "num_key_value_heads": 12,
                   "intermediate_size": 2048, "head_dim": 64})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(output_dir)
    for path in tokenizer_from.iterdir():
        if path.name.startswith("tokenizer") or path.name == "special_tokens_map.json":
            shutil.copy(path, output_dir / path.name)
    return sum(p.numel() for p in model.parameters()) * 4


def engine_run(engine: str, base: Path, data: Path, output_dir: Path, *extra: str, report: Path | None = None):
    """finetune.py on 2 CPU processes under `engine` through tests/engines_on_cpu.py: FSDP as `accelerate launch
    --config_file configs/accelerate/fsdp.yaml` starts it, ZeRO-3 as `torchrun ... --deepspeed zero3.json`."""
    env = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", **({"ENGINE_REPORT": str(report)} if report else {}),
           # a fixed mmap threshold: freed tensors go back to the OS, so peak RSS is what was held at once, not
           # what glibc kept after raising its threshold (rank 1 under ZeRO-3: +126 MiB with it, +291 MiB without)
           "MALLOC_MMAP_THRESHOLD_": "65536"}
    flags = ["--base_model", str(base), "--data_path", str(data), "--output_dir", str(output_dir), "--batch_size",
             "8", "--micro_batch_size", "2", "--max_steps", "4", "--save_steps", "2", "--val_set_size", "0",
             "--cutoff_len", "64", "--logging_steps", "1", "--lora_dropout", "0", *extra]
    if engine == "fsdp":
        launch = ["-m", "accelerate.commands.launch", "--config_file",
                  str(REPO / "configs" / "accelerate" / "fsdp.yaml"), "--num_processes", "2", "--main_process_port",
                  str(free_port())]
    else:
        launch = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                  "--master_port", str(free_port())]
        flags += ["--deepspeed", str(REPO / "configs" / "deepspeed" / "zero3.json")]
    result = run_script(*launch, "tests/engines_on_cpu.py", *flags, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["fsdp", "zero3"])
def test_sharded_engine_loads_on_rank_0_only_trains_saves_and_resumes(engine, tiny_llama, train_file, tmp_path):
    """configs/accelerate/fsdp.yaml and configs/deepspeed/zero3.json on 2 CPU processes (tests/engines_on_cpu.py
    lifts accelerate's GPU-only rule for them, nothing else), a ~49M-parameter model: the weights are sharded while
    they load (rank 0 alone reads the model: its peak RSS grows by a full fp32 copy while loading; rank 1's by a
    fraction of it under FSDP, by its half under ZeRO-3, which partitions the parameters as they load), each rank
    holds half of the parameters while training, the run writes checkpoints and one adapter, and a run resumed from
    checkpoint-2 ends with the same losses and adapter."""
    if engine == "zero3":
        pytest.importorskip("deepspeed", reason="DeepSpeed is an optional GPU extra (requirements-gpu.txt)")
    base = tmp_path / "llama-50m"
    model_bytes = build_50m_llama(tiny_llama, base)
    report, whole = tmp_path / "memory", tmp_path / "whole"
    result = engine_run(engine, base, train_file, whole, report=report)
    assert result.stdout.count("adapter saved to") == 1
    ranks = [json.loads((report / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["fsdp" if engine == "fsdp" else "deepspeed"] for r in ranks)
    grown = [r["after_load"] - r["before_load"] for r in ranks]
    assert grown[0] > 0.8 * model_bytes, (grown, model_bytes)  # rank 0 read the whole model
    # rank 1 did not: FSDP builds it on "meta"; ZeRO-3 keeps its half (a whole copy would be > model_bytes)
    assert grown[1] < (0.2 if engine == "fsdp" else 0.75) * model_bytes, (grown, model_bytes)
    for r in ranks:  # sharded: each rank holds half of the parameters (LoRA weights included)
        assert r["parameter_bytes"] == pytest.approx(model_bytes / 2, rel=0.05), (r, model_bytes)
        if engine == "zero3":  # partitioned by zero.Init while loading, before the engine started
            assert r["parameter_bytes_loaded"] == pytest.approx(model_bytes / 2, rel=0.05), (r, model_bytes)
    print(f"\n{engine}, 2 CPU ranks, {model_bytes / 2**20:.0f} MiB fp32 model: peak RSS growth while loading "
          f"{grown[0] / 2**20:.0f} MiB (rank 0) / {grown[1] / 2**20:.0f} MiB (rank 1); parameters held when training "
          f"{ranks[0]['parameter_bytes'] / 2**20:.0f} / {ranks[1]['parameter_bytes'] / 2**20:.0f} MiB")

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(whole / "checkpoint-2", resumed / "checkpoint-2")
    engine_run(engine, base, train_file, resumed, "--resume_from_checkpoint", "True")
    expected, actual = logged_steps(whole)[2:], [e for e in logged_steps(resumed) if e["step"] > 2]
    assert [e["step"] for e in actual] == [3, 4]
    for one, two in zip(expected, actual, strict=True):
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)
    assert_same_adapter(resumed, whole, 1e-6)
    lora = load_file(str(whole / "adapter_model.safetensors"))
    assert any(t.abs().max() > 0 for name, t in lora.items() if "lora_B" in name)  # it trained


def test_a_rank_other_than_0_does_not_find_rank_0s_run_lock_taken(tiny_llama, rows_file, tmp_path, monkeypatch):
    """Rank 0 takes --output_dir's run lock; another rank of the same launch takes none (it must not refuse the run
    as in use), while a second launch (its rank 0) is refused."""
    from utils.core.errors import UserError
    from utils.training.args import FinetuneArgs

    args = FinetuneArgs(base_model=str(tiny_llama), data_path=str(rows_file), output_dir=str(tmp_path / "run"))
    with finetune.run_lock(args):  # what rank 0 holds while the run lasts
        monkeypatch.setenv("RANK", "1")
        with finetune.run_lock(args):
            pass
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(UserError, match=f"pid {os.getpid()}"), finetune.run_lock(args):
            pass
