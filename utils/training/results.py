"""What a finished training run reports and leaves: the summary figures, the trained adapter's sanity checks, and
what a storage failure during training means for the run."""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from utils.core.errors import UserError
from utils.training import checkpoints
from utils.training.batching import BatchingPlan


def storage_message(output_dir: str, reason: str, step: int) -> str:
    """What a storage failure during training means for the run: which checkpoint is whole, how to continue."""
    kept = checkpoints.latest_complete(output_dir)
    where = (f"the last complete checkpoint, {kept}, is kept: free space and continue with --resume_from_checkpoint "
             "True" if kept is not None else "no complete checkpoint was written yet: free space and run again with "
             "--overwrite True")
    return f"cannot save a checkpoint in {output_dir} at step {step}: {reason}; {where}"


def run_summary(trainer: Any, result: Any, report: dict[str, Any], batching: BatchingPlan, val_data: Any,
                started: float) -> dict[str, Any]:
    """The run's figures for bentsao_training.json and the summary line; the final validation loss evaluated now
    unless the schedule's last evaluation was at the last step."""
    trained = "train_runtime" in result.metrics  # else written from the run's last checkpoint: nothing ran now
    loop = result.metrics.get("train_runtime", 0.0)
    summary: dict[str, Any] = {
        "train_loss": round(result.training_loss, 4) if trained and math.isfinite(result.training_loss) else None,
        "steps": trainer.state.global_step,
        "train_runtime_s": round(time.time() - started, 1),
        "train_rows": report["rows"],
        "truncated_rows": report["truncated"],
        "batching": batching.mode,
        # padding share of the training tensors (this process); the speed of trainer.train's own runtime
        "pad_fraction": round(batching.stats.pad_fraction, 4) if trained else None,
        "tokens_per_s": round(batching.stats.real_tokens / max(loop, 1e-9), 1) if trained else None,
        "train_loop_s": round(loop, 1) if trained else None,
    }
    if val_data is not None:  # the last evaluation, when the schedule ran one at the last step; else one now
        last = next((entry for entry in reversed(trainer.state.log_history) if "eval_loss" in entry), None)
        if last is None or last.get("step") != trainer.state.global_step:
            last = trainer.evaluate()
        summary["eval_loss"] = round(last["eval_loss"], 4)
    return summary


def verify_adapter(folder: str, saved: dict[str, torch.Tensor]) -> None:
    """The adapter on disk holds exactly the weights that were saved (read back before any success line)."""
    from peft.utils import load_peft_weights

    on_disk = load_peft_weights(folder, device="cpu")
    if on_disk.keys() != saved.keys() or any(not torch.equal(on_disk[k], saved[k].cpu()) for k in saved):
        raise UserError(f"the adapter written to {folder} does not read back as it was saved")


def adapter_problems(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """An all-zero lora_B changes nothing (the classic alpaca-lora bug); NaN/inf weights answer nothing."""
    lora_b = [tensor for name, tensor in state_dict.items() if "lora_B" in name and tensor.numel() > 0]
    problems = []
    if lora_b and all(torch.count_nonzero(tensor).item() == 0 for tensor in lora_b):
        problems.append("training left every lora_B at zero, so the adapter would change nothing; check "
                        "--learning_rate, --max_steps and that the data has answers")
    if any(not torch.isfinite(tensor).all() for tensor in state_dict.values() if tensor.is_floating_point()):
        problems.append("the trained adapter holds NaN/inf weights; lower --learning_rate or use --precision bf16")
    return problems
