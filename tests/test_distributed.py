"""finetune.py under torchrun and accelerate launch: 2 CPU ranks (gloo) against 1 rank over the same global batches.

Why the losses must agree, and how closely. The run is "full batch": 16 training rows, --batch_size 16, so every
optimizer step sees the whole training set, whatever order the samplers draw it in (1 rank: RandomSampler with
accumulation 8; 2 ranks: each rank its 8-row shard, accumulation 4). --lora_dropout 0 removes the only randomness
in the forward pass. transformers 5 normalises the loss by the label tokens of the whole global batch
(`num_items_in_batch`, gathered across ranks since `average_tokens_across_devices` is on) and multiplies by the
world size to undo DDP's gradient averaging, so 2 ranks compute the same token-mean loss and the same gradient as
1 rank; the logged loss is gathered over ranks the same way. What is left is float32 rounding: the gradient is
summed in another order (two half sums all-reduced instead of one running sum), and Adam carries that through the
next steps. Measured: the first step's loss and gradient norm agree bit for bit, steps 2-3 within ~2e-7 relative.
The tolerance, 1e-4 relative, is 500x that, and far below what a real fault changes: ranks that train alone (no
process group) or see the same rows log a loss over 8 rows instead of 16 (percent-level change), a wrong
accumulation or token normalisation scales the gradient norm by up to 2x.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from conftest import REPO, project_rows, run_script
from safetensors.torch import load_file

from utils.training.engines import cpu_engine_note, training_device_args

ROWS = 16
TOLERANCE = 1e-4  # relative; see the module docstring


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def printed_blocks(stdout: str) -> list[dict[str, str]]:
    blocks = []
    for chunk in stdout.split("Training BenTsao LoRA with:\n")[1:]:
        block = chunk.split("\n\n", 1)[0]
        blocks.append(dict(line.split(": ", 1) for line in block.splitlines()))
    return blocks


def training_args(base: Path, data: Path, output_dir: Path) -> list[str]:
    return [
        "finetune.py", "--base_model", str(base), "--data_path", str(data), "--output_dir", str(output_dir),
        "--batch_size", str(ROWS), "--micro_batch_size", "2", "--max_steps", "3", "--val_set_size", "0",
        "--lora_dropout", "0", "--learning_rate", "1e-2", "--warmup_steps", "0", "--cutoff_len", "128",
        "--logging_steps", "1", "--save_steps", "3", "--seed", "7",
    ]


def logged_steps(output_dir: Path) -> list[dict]:
    """The per-step log (loss, grad_norm) at full precision, from the checkpoint rank 0 wrote."""
    state = json.loads((output_dir / "checkpoint-3" / "trainer_state.json").read_text())
    return [entry for entry in state["log_history"] if "loss" in entry]


def assert_one_adapter(output_dir: Path, stdout: str) -> None:
    assert stdout.count("Training BenTsao LoRA with:") == 1, "the parameters must be printed once (rank 0)"
    assert stdout.count("adapter saved to") == 1 and stdout.count("summary:") == 1
    assert sorted(p.name for p in output_dir.iterdir() if p.is_dir()) == ["checkpoint-3"]
    assert sorted(p.name for p in output_dir.rglob("adapter_config.json")) == ["adapter_config.json"] * 2
    assert not list(output_dir.glob(".tmp-*")) and not list(output_dir.glob(".old-*"))


def assert_same_steps(single: list[dict], multi: list[dict]) -> None:
    assert [e["step"] for e in single] == [e["step"] for e in multi] == [1, 2, 3]
    for one, two in zip(single, multi, strict=True):
        for key in ("loss", "grad_norm"):
            assert two[key] == pytest.approx(one[key], rel=TOLERANCE), (key, one, two)
    assert single[-1]["loss"] < single[0]["loss"]  # the run does train


@pytest.fixture(scope="module")
def full_batch_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ddp") / "rows.jsonl"
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in project_rows()[:ROWS]),
                    encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def one_rank(tiny_llama, full_batch_file, tmp_path_factory) -> tuple[Path, str]:
    output_dir = tmp_path_factory.mktemp("ddp") / "one"
    result = run_script(*training_args(tiny_llama, full_batch_file, output_dir), env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return output_dir, result.stdout


def test_torchrun_two_cpu_ranks_match_one_rank(tiny_llama, full_batch_file, one_rank, tmp_path):
    output_dir = tmp_path / "two"
    result = run_script(
        "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), *training_args(tiny_llama, full_batch_file, output_dir),
        env={"OMP_NUM_THREADS": "1"},  # as torchrun sets it: 2 ranks x N threads on 2 cores crawl
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    (params,) = printed_blocks(result.stdout)
    assert params["world_size"] == "2" and params["gradient_accumulation_steps"] == "4"  # 16 / (2 x 2)
    (single_params,) = printed_blocks(one_rank[1])
    assert single_params["world_size"] == "1" and single_params["gradient_accumulation_steps"] == "8"
    assert_one_adapter(output_dir, result.stdout)
    assert "rank_0" not in result.stdout  # no per-rank copies of anything

    assert_same_steps(logged_steps(one_rank[0]), logged_steps(output_dir))
    single = load_file(str(one_rank[0] / "adapter_model.safetensors"))
    multi = load_file(str(output_dir / "adapter_model.safetensors"))
    assert single.keys() == multi.keys()
    for name in single:
        assert (multi[name] - single[name]).abs().max() <= 1e-5 + TOLERANCE * single[name].abs().max(), name


def test_accelerate_launch_with_the_shipped_ddp_config(tiny_llama, full_batch_file, one_rank, tmp_path):
    """`accelerate launch --config_file configs/accelerate/ddp.yaml` starts the same 2-rank run (here on CPU)."""
    output_dir = tmp_path / "accelerate"
    result = run_script(  # python -m accelerate.commands.launch: the `accelerate launch` of this interpreter
        "-m", "accelerate.commands.launch", "--config_file",
        str(REPO / "configs" / "accelerate" / "ddp.yaml"), "--num_processes", "2",
        "--main_process_port", str(free_port()), *training_args(tiny_llama, full_batch_file, output_dir),
        env={"OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (params,) = printed_blocks(result.stdout)
    assert params["world_size"] == "2" and params["gradient_accumulation_steps"] == "4"
    assert_one_adapter(output_dir, result.stdout)
    assert_same_steps(logged_steps(one_rank[0]), logged_steps(output_dir))


def test_batch_size_must_divide_over_the_processes(tiny_llama, full_batch_file, tmp_path):
    """12 rows per step over 8 processes x 2 rows cannot be kept: one clear line before anything loads."""
    args = training_args(tiny_llama, full_batch_file, tmp_path / "bad")
    args[args.index("--batch_size") + 1] = "12"
    result = run_script(*args, env={"WORLD_SIZE": "8", "RANK": "0"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "error: --batch_size 12 is not divisible by --micro_batch_size 2 x 8 process(es)"


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
