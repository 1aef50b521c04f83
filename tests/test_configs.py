"""The shipped DeepSpeed and accelerate configs, and `finetune.py --deepspeed` failing clearly before heavy work."""

from __future__ import annotations

import importlib.util
import inspect
import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO
from in_process import run_main

from utils.training.engines import deepspeed_batch_problems, engine_problems

DEEPSPEED = REPO / "configs" / "deepspeed"
ACCELERATE = REPO / "configs" / "accelerate"
DEEPSPEED_NAMES = ("zero2.json", "zero2_offload.json", "zero3.json", "zero3_offload.json")
ACCELERATE_NAMES = ("ddp.yaml", "fsdp.yaml")
# the values transformers' HfTrainerDeepSpeedConfig fills from TrainingArguments ("auto" elsewhere stays "auto",
# and DeepSpeed rejects it); checked against the installed transformers below
FILLED_BY_TRANSFORMERS = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
    "optimizer.params.lr", "optimizer.params.betas", "optimizer.params.eps", "optimizer.params.weight_decay",
    "scheduler.params.warmup_min_lr", "scheduler.params.warmup_max_lr", "scheduler.params.total_num_steps",
    "scheduler.params.warmup_num_steps", "fp16.enabled", "bf16.enabled", "zero_optimization.reduce_bucket_size",
    "zero_optimization.stage3_prefetch_bucket_size", "zero_optimization.stage3_param_persistence_threshold",
}


def auto_keys(config: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in config.items():
        if isinstance(value, dict):
            keys |= auto_keys(value, f"{prefix}{key}.")
        elif value == "auto":
            keys.add(prefix + key)
    return keys


def load(name: str) -> dict:
    return json.loads((DEEPSPEED / name).read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", DEEPSPEED_NAMES)
def test_deepspeed_config_parses_and_leaves_batch_sizes_to_the_cli(name):
    config = load(name)
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        assert config[key] == "auto", key
    assert config["gradient_clipping"] == "auto"
    assert config["bf16"]["enabled"] == "auto" and config["fp16"]["enabled"] == "auto"  # --precision decides
    assert auto_keys(config) <= FILLED_BY_TRANSFORMERS
    if "optimizer" in config:
        assert all(value == "auto" for value in config["optimizer"]["params"].values())  # --learning_rate decides
    assert "scheduler" not in config  # the Trainer's linear schedule with --warmup_steps, as without DeepSpeed

    zero = config["zero_optimization"]
    assert zero["stage"] == (3 if name.startswith("zero3") else 2)
    if zero["stage"] == 3:  # finetune.py gathers the sharded LoRA weights to write the adapter
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    offload = "offload" in name
    assert (zero.get("offload_optimizer", {}).get("device") == "cpu") == offload
    assert (zero.get("offload_param", {}).get("device") == "cpu") == (offload and zero["stage"] == 3)
    if offload:  # ZeRO-Offload wants its own CPU Adam, not the Trainer's torch AdamW
        assert config["optimizer"]["type"] == "AdamW"


def test_the_auto_keys_are_the_ones_transformers_fills():
    from transformers.integrations import deepspeed as hf_deepspeed

    source = inspect.getsource(hf_deepspeed.HfTrainerDeepSpeedConfig)
    missing = [key for key in FILLED_BY_TRANSFORMERS if f'"{key}"' not in source]
    assert not missing, f"transformers no longer fills {missing}"


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed (GPU extra)")
@pytest.mark.parametrize("name", DEEPSPEED_NAMES)
def test_transformers_fills_every_auto(name, tmp_path):
    from types import SimpleNamespace

    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=8,
                             report_to="none")
    config = HfTrainerDeepSpeedConfig(str(DEEPSPEED / name))
    config.trainer_config_process(args)
    config.trainer_config_finalize(args, SimpleNamespace(config=SimpleNamespace(hidden_size=64)), 10)
    assert not auto_keys(config.config)
    assert config.config["train_batch_size"] == 4 * 8 * args.world_size


@pytest.mark.parametrize("name", ACCELERATE_NAMES)
def test_accelerate_config_loads_with_accelerates_own_schema(name):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import launch_command_parser
    from accelerate.utils import DistributedType

    path = ACCELERATE / name
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(raw, dict) and raw["compute_environment"] == "LOCAL_MACHINE"
    config = load_config_from_file(str(path))  # unknown top-level keys raise here
    assert isinstance(config, ClusterConfig)
    assert config.mixed_precision == "no"  # finetune.py --precision decides
    assert config.num_machines == 1 and config.machine_rank == 0 and not config.use_cpu
    expected = {"ddp.yaml": DistributedType.MULTI_GPU, "fsdp.yaml": DistributedType.FSDP}[name]
    assert config.distributed_type == expected
    # fsdp_config keys become `accelerate launch` options; one it does not know would be silently ignored
    options = {action.dest for action in launch_command_parser()._actions}
    assert set(config.fsdp_config) <= options, set(config.fsdp_config) - options


def test_fsdp_config_builds_accelerates_fsdp2_plugin(monkeypatch):
    """What `accelerate launch --config_file configs/accelerate/fsdp.yaml` hands the processes builds an FSDP2 plugin
    (wrap per decoder layer, full state dict for saving)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(
        ["--config_file", str(ACCELERATE / "fsdp.yaml"), "--num_processes", "8", "finetune.py"]
    )
    args, _, _ = _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["ACCELERATE_MIXED_PRECISION"] == "no"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert "FULL_STATE_DICT" in str(plugin.state_dict_type)
    assert plugin.auto_wrap_policy is not None and plugin.transformer_cls_names_to_wrap is None  # _no_split_modules


def test_deepspeed_batch_problems():
    config = {"train_batch_size": 64, "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 8}
    assert deepspeed_batch_problems(config, batch_size=128, micro_batch_size=4, processes=4) == [
        "train_batch_size is 64 but --batch_size makes it 128"
    ]
    assert deepspeed_batch_problems(config, batch_size=64, micro_batch_size=4, processes=2) == []
    assert deepspeed_batch_problems(load("zero3.json"), 128, 4, 8) == []


def test_a_deepspeed_config_that_cannot_be_read_is_named(tmp_path):
    from utils.training.args import FinetuneArgs

    broken, listed = tmp_path / "broken.json", tmp_path / "list.json"
    broken.write_text('{"zero_optimization": {"stage": 2},}')
    listed.write_text("[]")
    for path in ("nope.json", broken, listed):
        (problem,) = engine_problems(FinetuneArgs(deepspeed=str(path), batch_size=8, micro_batch_size=2))
        assert f"--deepspeed {path}" in problem


def finetune_with(deepspeed: str, tiny_llama: Path, train_file: Path, tmp_path: Path):
    import finetune

    return run_main(finetune.main, "--base_model", tiny_llama, "--data_path", train_file, "--output_dir",
                    tmp_path / "out", "--batch_size", "8", "--micro_batch_size", "2", "--deepspeed", deepspeed)


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "Training BenTsao LoRA with" not in result.stdout  # before heavy work
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --deepspeed "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_finetune_deepspeed_missing_file_is_one_line(tiny_llama, train_file, tmp_path):
    result = finetune_with("missing.json", tiny_llama, train_file, tmp_path)
    assert_one_line_error(result, "missing.json: no such file", "configs/deepspeed/zero3_offload.json")


def test_finetune_deepspeed_batch_size_conflict_is_one_line(tiny_llama, train_file, tmp_path):
    config = dict(load("zero2.json"), train_micro_batch_size_per_gpu=4)
    path = tmp_path / "fixed.json"
    path.write_text(json.dumps(config))
    result = finetune_with(str(path), tiny_llama, train_file, tmp_path)
    assert_one_line_error(result, "train_micro_batch_size_per_gpu is 4 but --micro_batch_size makes it 2", '"auto"')


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None and torch.cuda.is_available(),
                    reason="this machine can run DeepSpeed")
def test_finetune_deepspeed_without_deepspeed_or_cuda_is_one_line(tiny_llama, train_file, tmp_path):
    result = finetune_with(str(DEEPSPEED / "zero2.json"), tiny_llama, train_file, tmp_path)
    needs = "requirements-gpu.txt" if importlib.util.find_spec("deepspeed") is None else "needs CUDA GPUs"
    assert_one_line_error(result, needs)
