"""Running finetune.py under the existing distributed engines: torchrun / accelerate (DDP), DeepSpeed, FSDP.

transformers' `Trainer` does the distributed work (sharding the data per rank, averaging gradients, DeepSpeed and
FSDP through accelerate); this module holds the few decisions around it:

- `check_one_process_per_gpu`: `python finetune.py` on a machine with several visible GPUs would make the Trainer
  wrap the model in `nn.DataParallel`, which splits a batch's tensors by rows and breaks the label-position layout
  (and packed rows); one clear line says to launch one process per GPU instead;
- `training_device_args`: on CPU, DDP needs `use_cpu` and the gloo backend (accelerate would otherwise treat each
  torchrun rank as a lone process, so every rank trained alone and wrote its own adapter);
- `engine_problems`: a `--deepspeed` file exists, parses, leaves the batch sizes to the CLI ("auto") and can run
  here; quantised loading is not combined with a sharding engine; all checked before any weights load;
- `weights_placement`: where `from_pretrained` puts the weights under the engine the launcher chose. It is called
  after the `TrainingArguments` exist (finetune.py builds them before loading), so under ZeRO-3 transformers' live
  DeepSpeed config makes `from_pretrained` partition the weights as they load (`zero.Init`), and under FSDP with
  RAM-efficient loading only rank 0 reads them (the others build the model on the "meta" device and receive their
  shards from rank 0 when accelerate shards the model). Plain DDP loads straight onto each rank's own GPU;
- `gathered_state_dict`: under ZeRO-3 or FSDP every rank holds only a shard of each weight, so the final adapter
  is gathered (a collective: every rank calls it) before rank 0 writes it;
- `cpu_engine_note`: an FSDP/DeepSpeed accelerate config started without GPUs runs as plain DDP, and says so.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

from utils.core.errors import UserError
from utils.core.io import read_json_object
from utils.runtime import local_rank, world_size

REPO_ROOT = Path(__file__).resolve().parents[2]
DEEPSPEED_CONFIGS = REPO_ROOT / "configs" / "deepspeed"
# Devices on which accelerate runs FSDP (started on CPU, an FSDP config runs as plain DDP; see cpu_engine_note).
FSDP_DEVICES = ("cuda", "xpu", "npu")


def check_one_process_per_gpu(device: str, visible_gpus: int, launched: bool) -> None:
    """Refuse one process driving several GPUs: the Trainer would wrap the model in `nn.DataParallel`, which scatters
    every tensor of a batch by rows: the packed row, its `logits_to_keep` and its flattened `shift_labels` would be
    cut apart inconsistently (a crash, or silently mismatched labels). `launched`: started by torchrun/accelerate."""
    if device != "cuda" or launched or visible_gpus < 2:
        return
    raise UserError(
        f"{visible_gpus} GPUs are visible but finetune.py was started as one process (the Trainer would fall back to "
        f"nn.DataParallel, which splits packed batches wrongly): train on all of them with `torchrun "
        f"--nproc_per_node {visible_gpus} finetune.py ...`, or on one with `CUDA_VISIBLE_DEVICES=0 python "
        "finetune.py ...`"
    )


def fsdp_requested() -> bool:
    """An accelerate FSDP config launched this process (`accelerate launch --config_file .../fsdp.yaml`)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def weights_placement(device: str, processes: int) -> Any:
    """The `device_map` for `from_pretrained` under the chosen engine: None (the one device; under ZeRO-3 the
    partitions zero.Init makes), "meta" (FSDP RAM-efficient loading on a rank other than 0), {"": "cpu"} (FSDP:
    accelerate moves each rank's shard to its GPU) or this rank's own GPU (DDP).

    Call it once the `TrainingArguments` exist: the DeepSpeed config and the process group are live then.
    """
    from transformers.integrations import is_deepspeed_zero3_enabled, is_fsdp_enabled

    if is_deepspeed_zero3_enabled():  # zero.Init partitions while loading; no device_map is allowed
        return None
    if fsdp_requested() and device in FSDP_DEVICES:
        if is_fsdp_enabled() and local_rank() != 0:  # as transformers decides: local rank 0 of each node reads
            return "meta"
        return {"": "cpu"}
    if processes > 1 and device == "cuda":
        return {"": f"cuda:{local_rank()}"}
    return None


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
    if not engines or (engines == ["FSDP"] and device in FSDP_DEVICES):
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
    return read_json_object(file, f"--deepspeed {path}")


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


def engine_problems(args: Any, require_cuda: bool = True) -> list[str]:
    """What finetune.py's engine flags cannot do here, checked before the model loads: the `--deepspeed` file (exists,
    a JSON object, batch sizes "auto" or equal to the CLI's), the machine (the deepspeed package and CUDA GPUs:
    accelerate runs DeepSpeed only on accelerators; `require_cuda=False` is for tests/engines_on_cpu.py), and
    quantised loading under an engine that shards the weights (bitsandbytes layers cannot be partitioned)."""
    problems = []
    if (args.load_8bit or args.load_4bit) and (args.deepspeed or fsdp_requested()):
        engine = "--deepspeed" if args.deepspeed else "an FSDP launch"
        problems.append(f"--load_8bit/--load_4bit cannot be combined with {engine}: quantised weights cannot be "
                        "sharded; train QLoRA with torchrun (DDP), or drop the quantisation")
    if not args.deepspeed:
        return problems
    try:
        config = read_deepspeed_config(args.deepspeed)
    except UserError as error:
        return [*problems, str(error)]
    mismatched = deepspeed_batch_problems(config, args.batch_size, args.micro_batch_size, world_size())
    if mismatched:
        problems.append(f"--deepspeed {args.deepspeed}: {'; '.join(mismatched)}; set these to \"auto\" so "
                        "finetune.py's flags decide")
    if importlib.util.find_spec("deepspeed") is None:
        problems.append(f"--deepspeed {args.deepspeed} needs the deepspeed package: pip install -r "
                        "requirements-gpu.txt")
    elif require_cuda and not torch.cuda.is_available():
        problems.append(f"--deepspeed {args.deepspeed} needs CUDA GPUs; on this machine train without --deepspeed")
    return problems


def materialize_trainable(model: Any) -> None:
    """On a rank that built the model on the "meta" device (FSDP RAM-efficient loading), give the trainable (LoRA)
    weights real, empty CPU storage; rank 0's values reach them when accelerate shards the model.

    accelerate's FSDP2 preparation swaps the optimizer's parameters for the sharded ones by matching data pointers;
    on "meta" every pointer is 0, so an optimizer over meta LoRA weights would end up holding frozen base weights
    and this rank's LoRA shards would never be updated.
    """
    for module in model.modules():
        if any(p.requires_grad and p.is_meta for p in module.parameters(recurse=False)):
            module.to_empty(device="cpu", recurse=False)


def zero_stage(trainer: Any) -> int | None:
    """The DeepSpeed ZeRO stage the trainer runs with, or None without DeepSpeed."""
    if not getattr(trainer, "is_deepspeed_enabled", False):
        return None
    return trainer.accelerator.deepspeed_plugin.zero_stage


def gathered_state_dict(trainer: Any) -> dict[str, torch.Tensor] | None:
    """The trainable (LoRA) weights gathered in full when they are sharded over the ranks (ZeRO-3, FSDP), else None.

    A collective: every rank must call it. Only the trainable parameters are gathered, never the frozen 7B base:
    under ZeRO-3 with DeepSpeed's public `zero.GatheredParameters`, under FSDP with PyTorch's
    `get_model_state_dict(ignore_frozen_params=True)`.
    """
    if zero_stage(trainer) == 3:
        import deepspeed

        model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            return {name: p.detach().to("cpu", copy=True) for name, p in named}
    if getattr(trainer, "is_fsdp_enabled", False):  # only the trainable weights, gathered to rank 0's CPU
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        return get_model_state_dict(trainer.model, options=options)
    return None
