"""finetune.py under FSDP on CPU processes (gloo): what `accelerate launch --config_file configs/accelerate/fsdp.yaml`
runs on GPUs, here on a machine without any.

    accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2 tests/fsdp_on_cpu.py <finetune flags>

accelerate runs FSDP only on accelerator devices: started on CPU, an FSDP config falls back to plain DDP. PyTorch's
FSDP2 itself (`fully_shard`, its gloo collectives, distributed checkpoints) runs on CPU, so this wrapper lifts that one
rule and nothing else: accelerate's state is promoted to FSDP when its FSDP plugin is set, and `engines.FSDP_DEVICES`
counts the CPU as an FSDP device. Everything else is the real code: finetune.py's stages, transformers' RAM-efficient
loading, accelerate's `fsdp2_prepare_model` (sharding, broadcast of rank 0's weights), the Trainer's FSDP checkpoints
and resume, the gathered adapter.

With FSDP_RSS_REPORT=<folder>, each rank writes rank<N>.json there: its peak resident memory (ru_maxrss) before the
weights load, after they are loaded and after the first training step, and the parameter bytes it holds then (its
shards), in bytes.
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
    """The bytes of parameter storage this process holds (its own shard of each sharded parameter)."""
    from torch.distributed.tensor import DTensor

    local = (p.to_local() if isinstance(p, DTensor) else p for p in model.parameters())
    return sum(t.numel() * t.element_size() for t in local if t.device.type != "meta")


def allow_fsdp_on_cpu() -> None:
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    from utils.training import engines

    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = self.distributed_type  # as accelerate does on GPUs

    AcceleratorState.__init__ = init
    engines.FSDP_DEVICES = (*engines.FSDP_DEVICES, "cpu")


def record_memory(report: Path) -> None:
    """Wrap finetune's load_model stage and the Trainer's first step to note the peak RSS at each point."""
    import finetune
    from utils.training.trainer import SafeTrainer

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
        save()
        return result

    training_step = SafeTrainer.training_step

    def measured_step(self, *args, **kwargs):
        loss = training_step(self, *args, **kwargs)
        if "after_first_step" not in marks:
            marks["after_first_step"] = peak_rss()
            marks["fsdp"] = bool(getattr(self, "is_fsdp_enabled", False))
            marks["parameter_bytes"] = parameter_bytes(self.model)
            save()
        return loss

    finetune.load_model = measured_load_model
    SafeTrainer.training_step = measured_step


if __name__ == "__main__":
    allow_fsdp_on_cpu()
    if os.environ.get("FSDP_RSS_REPORT"):
        record_memory(Path(os.environ["FSDP_RSS_REPORT"]))
    import finetune
    from utils.core.cli import run_cli

    sys.argv[0] = "finetune.py"
    run_cli(finetune.main)
