"""Running finetune.py under the existing distributed engines: torchrun / accelerate (DDP), DeepSpeed, FSDP.

transformers' `Trainer` does the distributed work (sharding the data per rank, averaging gradients, DeepSpeed and
FSDP through accelerate); this module holds the few decisions around it:

- `training_device_args`: on CPU, DDP needs `use_cpu` and the gloo backend (accelerate would otherwise treat each
  torchrun rank as a lone process, so every rank trained alone and wrote its own adapter);
- `check_deepspeed_config`: a `--deepspeed` file exists, parses, leaves the batch sizes to the CLI ("auto") and can
  run here, all checked before any weights load;
- `gathered_state_dict`: under ZeRO-3 or FSDP every rank holds only a shard of each weight, so the final adapter
  is gathered (a collective: every rank calls it) before rank 0 writes it;
- `cpu_engine_note`: an FSDP/DeepSpeed accelerate config started without GPUs runs as plain DDP, and says so.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import torch

from utils.core.errors import UserError
from utils.runtime import world_size

REPO_ROOT = Path(__file__).resolve().parents[2]
DEEPSPEED_CONFIGS = REPO_ROOT / "configs" / "deepspeed"


def training_device_args(device: str, processes: int | None = None) -> dict[str, Any]:
    """`TrainingArguments` keywords for the device: on CPU `use_cpu`, and the gloo backend when several processes
    run (NCCL, accelerate's default for GPUs, has no CPU support; MPI is rarely built into torch wheels)."""
    processes = world_size() if processes is None else processes
    if device != "cpu":
        return {}
    return {"use_cpu": True, "ddp_backend": "gloo" if processes > 1 else None}


def cpu_engine_note(device: str) -> str | None:
    """A line for an FSDP / DeepSpeed accelerate config launched on CPU: accelerate then runs plain DDP (gloo)."""
    if device != "cpu":
        return None
    engines = [name for name, flag in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"))
               if os.environ.get(flag, "false").lower() == "true"]
    if not engines:
        return None
    verb = "need" if len(engines) > 1 else "needs"
    return f"note: {' and '.join(engines)} {verb} GPUs; on this CPU machine the processes train as plain DDP (gloo)"

def _shipped_configs() -> str:
    names = sorted(path.name for path in DEEPSPEED_CONFIGS.glob("*.json"))
    return ", ".join(f"configs/deepspeed/{name}" for name in names) or "none shipped"


def read_deepspeed_config(path: str) -> dict[str, Any]:
    """The DeepSpeed JSON config at `path` as a dict, or one clear error (missing, unreadable, not an object)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"--deepspeed {path}: no such file (the shipped configs: {_shipped_configs()})")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as error:  # bad syntax or UTF-8, too deep, a too-long number
        raise UserError(f"--deepspeed {path}: not valid JSON ({str(error)[:200]})") from None
    if not isinstance(config, dict):
        raise UserError(f"--deepspeed {path}: a DeepSpeed config is a JSON object, got {type(config).__name__}")
    return config


def deepspeed_batch_problems(
    config: dict[str, Any], batch_size: int, micro_batch_size: int, processes: int
) -> list[str]:
    """Batch-size values in the config that disagree with the CLI (DeepSpeed would reject them with a traceback)."""
    accumulation = batch_size // (micro_batch_size * processes)
    expected = {
        "train_batch_size": (micro_batch_size * accumulation * processes, "--batch_size"),
        "train_micro_batch_size_per_gpu": (micro_batch_size, "--micro_batch_size"),
        "gradient_accumulation_steps": (accumulation, "--batch_size / (--micro_batch_size x processes)"),
    }
    problems = []
    for key, (value, source) in expected.items():
        given = config.get(key, "auto")
        if given != "auto" and given != value:
            problems.append(f"{key} is {given!r} but {source} makes it {value}")
    return problems


def check_deepspeed_config(path: str, batch_size: int, micro_batch_size: int, processes: int | None = None) -> dict:
    """Everything about `--deepspeed` that can be checked before the model loads; returns the parsed config.

    The file (exists, JSON object), its batch sizes ("auto", or equal to what the CLI gives), then the machine
    (the deepspeed package, CUDA GPUs).
    """
    processes = world_size() if processes is None else processes
    config = read_deepspeed_config(path)
    problems = deepspeed_batch_problems(config, batch_size, micro_batch_size, processes)
    if problems:
        raise UserError(
            f"--deepspeed {path}: {'; '.join(problems)}; set these to \"auto\" so finetune.py's flags decide"
        )
    if importlib.util.find_spec("deepspeed") is None:
        raise UserError(f"--deepspeed {path} needs the deepspeed package: pip install -r requirements-gpu.txt")
    if not torch.cuda.is_available():
        raise UserError(f"--deepspeed {path} needs CUDA GPUs; on this machine train without --deepspeed")
    return config


def zero_stage(trainer: Any) -> int | None:
    """The DeepSpeed ZeRO stage the trainer runs with, or None without DeepSpeed."""
    if not getattr(trainer, "is_deepspeed_enabled", False):
        return None
    return trainer.accelerator.deepspeed_plugin.zero_stage


def gathered_state_dict(trainer: Any) -> dict[str, torch.Tensor] | None:
    """The trainable (LoRA) weights gathered in full when they are sharded over the ranks (ZeRO-3, FSDP), else None.

    A collective: every rank must call it. Under ZeRO-3 only the trainable parameters are gathered (DeepSpeed's
    public `zero.GatheredParameters`), never the frozen 7B base.
    """
    if zero_stage(trainer) == 3:
        import deepspeed

        model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            return {name: p.detach().to("cpu", copy=True) for name, p in named}
    if getattr(trainer, "is_fsdp_enabled", False):
        return trainer.accelerator.get_state_dict(trainer.model)
    return None
