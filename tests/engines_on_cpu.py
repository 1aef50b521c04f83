"""finetune.py under FSDP or DeepSpeed ZeRO on CPU processes (gloo): what runs on GPUs, here on a machine without any.

    accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2 tests/engines_on_cpu.py <flags>
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 tests/engines_on_cpu.py --deepspeed configs/deepspeed/zero3.json ...

accelerate runs FSDP and DeepSpeed only on accelerator devices: started on CPU, an FSDP config falls back to plain
DDP and a DeepSpeed one to nothing, and finetune.py refuses `--deepspeed` without CUDA. PyTorch's FSDP2
(`fully_shard`, its gloo collectives, distributed checkpoints) and DeepSpeed's ZeRO (with `DS_ACCELERATOR=cpu`) run on
CPU, so this wrapper lifts those device rules and nothing else: accelerate's state is promoted to FSDP / DeepSpeed
when its plugin is set (as accelerate does on GPUs), `engines.FSDP_DEVICES` counts the CPU, finetune.py's DeepSpeed
check skips its CUDA requirement, and DeepSpeed's process group is set up as accelerate sets it up on GPUs.
Everything else is the real code: finetune.py's stages, transformers' RAM-efficient loading and `zero.Init`,
accelerate's `fsdp2_prepare_model` / `deepspeed.initialize`, the Trainer's checkpoints and resume, the gathered
adapter.

With ENGINE_REPORT=<folder>, each rank writes rank<N>.json there: its peak resident memory (ru_maxrss) before the
weights load, after they are loaded and after the first training step, and the parameter bytes it holds after
loading and after the first step (its shards), in bytes.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def parameter_bytes(model) -> int:
    """The bytes of parameter storage this process holds: its own shard of each sharded parameter (FSDP2's DTensor
    local shard, ZeRO-3's partition `ds_tensor`), nothing for a parameter on "meta"."""
    from torch.distributed.tensor import DTensor

    total = 0
    for p in model.parameters():
        local = p.to_local() if isinstance(p, DTensor) else getattr(p, "ds_tensor", p)
        if local.device.type != "meta":
            total += local.numel() * local.element_size()
    return total


def allow_engines_on_cpu() -> None:
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    import finetune
    from utils.training import engines

    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, deepspeed_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, deepspeed_plugin=deepspeed_plugin, **kwargs)
        if self.distributed_type != DistributedType.MULTI_CPU:
            return
        if deepspeed_plugin is not None:  # accelerate's own steps for DeepSpeed, which it takes only off CPU
            self.distributed_type = DistributedType.DEEPSPEED
            deepspeed_plugin.set_mixed_precision(self._mixed_precision)
            deepspeed_plugin.select(_from_accelerator_state=True)
            self.deepspeed_plugins = deepspeed_plugin
        elif fsdp_plugin is not None:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
        else:
            return
        PartialState._shared_state["distributed_type"] = self.distributed_type  # as accelerate does on GPUs

    AcceleratorState.__init__ = init
    engines.FSDP_DEVICES = (*engines.FSDP_DEVICES, "cpu")
    check = engines.engine_problems
    finetune.engine_problems = lambda args: check(args, require_cuda=False)
    if "--deepspeed" in sys.argv:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")  # accelerate's PartialState does this for DeepSpeed on GPUs


def record_memory(report: Path) -> None:
    """Wrap finetune's load_model stage and the Trainer's first step to note the peak RSS at each point."""
    import finetune
    from utils.training.trainer import LayoutTrainer

    marks: dict[str, int] = {}
    rank = os.environ.get("RANK", "0")

    def save() -> None:
        report.mkdir(parents=True, exist_ok=True)
        (report / f"rank{rank}.json").write_text(json.dumps(marks))

    load_model = finetune.load_model

    def measured_load_model(*args, **kwargs):
        import torch.distributed.fsdp  # what sharding imports later, so the baseline holds its code
        import torch.distributed.tensor  # noqa: F401

        marks["before_load"] = peak_rss()
        result = load_model(*args, **kwargs)
        marks["after_load"] = peak_rss()
        marks["parameter_bytes_loaded"] = parameter_bytes(result[0])
        save()
        return result

    training_step = LayoutTrainer.training_step

    def measured_step(self, *args, **kwargs):
        loss = training_step(self, *args, **kwargs)
        if "after_first_step" not in marks:
            marks["after_first_step"] = peak_rss()
            marks["fsdp"] = bool(getattr(self, "is_fsdp_enabled", False))
            marks["deepspeed"] = bool(getattr(self, "is_deepspeed_enabled", False))
            marks["parameter_bytes"] = parameter_bytes(self.model)
            save()
        return loss

    finetune.load_model = measured_load_model
    LayoutTrainer.training_step = measured_step


if __name__ == "__main__":
    allow_engines_on_cpu()
    if os.environ.get("ENGINE_REPORT"):
        record_memory(Path(os.environ["ENGINE_REPORT"]))
    import finetune
    from utils.core.cli import run_cli

    sys.argv[0] = "finetune.py"
    run_cli(finetune.main)
