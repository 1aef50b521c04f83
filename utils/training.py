"""Safety nets around transformers' `Trainer`: nothing half-written, a clean stop on a signal, no silent NaNs.

- `SafeTrainer` writes each `checkpoint-N` into a staging folder (`.tmp-checkpoint/`) and renames it into place
  once complete, so a kill mid-save leaves the earlier checkpoints intact and `--resume_from_checkpoint True`
  never picks a torn one. (transformers 5.23's `Trainer._save_checkpoint` writes straight into `checkpoint-N`.)
- `save_files_atomically` does the same for the final adapter, which lives in `output_dir` itself beside the
  checkpoints: files are written to `.tmp-adapter/`, then moved in with `adapter_config.json` last, so a folder
  with an `adapter_config.json` always holds a complete adapter.
- `GracefulStop` turns SIGTERM/SIGINT into "save a checkpoint at the end of this optimizer step and stop".
- `DivergenceGuard` stops at the first optimizer step whose loss (or trainable weights) is NaN/inf, without
  saving that step, and tells it apart from fp16 loss-scale skips (inf gradients, finite loss, step skipped).
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from utils.batching import BatchingMixin

CHECKPOINT_STAGING = ".tmp-checkpoint"
ADAPTER_STAGING = ".tmp-adapter"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


# --- atomic folders and files -----------------------------------------------------------------------------------


def fsync_path(path: Path) -> None:
    """Flush a file (or a folder's entries) to disk, so a rename never publishes data still in the page cache."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0)
    try:
        descriptor = os.open(path, flags)
    except OSError:
        return  # folders cannot be opened on some platforms (Windows); the rename is still atomic
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            fsync_path(path)
    fsync_path(folder)


def replace_folder(staging: Path, target: Path) -> None:
    """Put the complete folder `staging` at `target` by renaming; an existing `target` is swapped out first."""
    fsync_tree(staging)
    if target.exists():
        old = target.with_name(f".old-{target.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(target, old)
        os.rename(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, target)
    fsync_path(target.parent)


def save_files_atomically(
    output_dir: str | Path, write: Callable[[Path], None], last: Sequence[str] = ("adapter_config.json",)
) -> list[Path]:
    """Call `write(folder)` on a staging folder inside `output_dir`, then move each file into `output_dir` with
    `os.replace` (atomic per file), the files named in `last` at the end.

    A kill while `write` runs leaves `output_dir` as it was; the move itself takes microseconds. Returns the
    files now in `output_dir`.
    """
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    staging = output / ADAPTER_STAGING
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    write(staging)
    files = sorted(path for path in staging.rglob("*") if path.is_file())
    for path in files:
        fsync_path(path)
    ordered = [p for p in files if p.name not in last] + [p for name in last for p in files if p.name == name]
    moved = []
    for path in ordered:
        target = output / path.relative_to(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
        moved.append(target)
    shutil.rmtree(staging, ignore_errors=True)
    fsync_path(output)
    return moved


# --- the trainer -------------------------------------------------------------------------------------------------


class SafeTrainer(BatchingMixin, Trainer):
    """A `Trainer` whose checkpoints appear only when complete, and which shows each loss to a `DivergenceGuard`."""

    _staging = False

    def _get_output_dir(self, trial: Any) -> str:
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, CHECKPOINT_STAGING) if self._staging else run_dir

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """transformers' own save, redirected into `<output_dir>/.tmp-checkpoint/`, then renamed into place."""
        run_dir = Path(super()._get_output_dir(trial))
        staging_root = run_dir / CHECKPOINT_STAGING
        if self.args.should_save:
            shutil.rmtree(staging_root, ignore_errors=True)  # what a kill mid-save left behind
        self.accelerator.wait_for_everyone()
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = False
        self.accelerator.wait_for_everyone()  # every process has written its RNG state / optimizer shard
        if self.args.should_save:
            name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            replace_folder(staging_root / name, run_dir / name)
            shutil.rmtree(staging_root, ignore_errors=True)
            best = self.state.best_model_checkpoint
            if best and Path(best).parent == staging_root:
                self.state.best_model_checkpoint = str(run_dir / Path(best).name)
                self.state.save_to_json(str(run_dir / name / "trainer_state.json"))
            rotate_checkpoints(
                output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True,
            )
        self.accelerator.wait_for_everyone()

    def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, DivergenceGuard):
                callback.observe_loss(loss)
        return loss


def any_process(flag: bool, device: Any = None) -> bool:
    """True when `flag` is true on any process (all processes must stop together, or DDP hangs)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    value = torch.tensor(1.0 if flag else 0.0, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


# --- SIGTERM / SIGINT ------------------------------------------------------------------------------------------


class GracefulStop(TrainerCallback):
    """On SIGTERM or SIGINT during training: finish the optimizer step, save a checkpoint, stop.

    A second signal gets the default behaviour back (SIGINT: KeyboardInterrupt; SIGTERM: the process ends).
    """

    def __init__(self, signals: Sequence[int] = STOP_SIGNALS) -> None:
        self.signals = tuple(signals)
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is None:
            self.received = signum
            message = (
                f"\nreceived {signal.Signals(signum).name}: saving a checkpoint at the end of this optimizer step, "
                "then stopping (send it again to stop at once)\n"
            )
            try:  # a raw write: print() inside a signal handler can hit a write already in progress
                os.write(sys.stderr.fileno(), message.encode())
            except (AttributeError, OSError, ValueError):  # stderr replaced by an object without a descriptor
                sys.stderr.write(message)
        self.restore()

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if any_process(self.received is not None, args.device):
            if self.received is None:
                self.received = signal.SIGTERM  # another process got it
            control.should_save = True
            control.should_training_stop = True
            control.should_evaluate = False

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.restore()

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""


# --- NaN / inf -------------------------------------------------------------------------------------------------


class DivergenceGuard(TrainerCallback):
    """Stops training at the first optimizer step whose loss is NaN/inf, or after which a trainable weight is.

    That step is not saved (a `should_save` set by the save schedule or a signal is withdrawn), so the last
    checkpoint on disk is the last good one. fp16 loss scaling is different: the gradient scaler skips a step
    whose scaled gradients overflowed while the loss itself stays finite, and lowers the scale; those steps are
    counted in `skipped_steps`, reported, and training goes on.
    """

    def __init__(self, check_weights: bool = True) -> None:
        self.check_weights = check_weights
        self.bad_loss: float | None = None  # the first non-finite loss seen in the current optimizer step
        self.diverged_step: int | None = None
        self.reason = ""
        self.skipped_steps: list[int] = []

    def observe_loss(self, loss: torch.Tensor) -> None:
        """Called by `SafeTrainer.training_step` for every micro-batch."""
        if self.bad_loss is None:
            value = float(loss.detach().float().mean())
            if not math.isfinite(value):
                self.bad_loss = value

    def on_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        if optimizer is not None and getattr(optimizer, "step_was_skipped", False) and self.bad_loss is None:
            step = state.global_step + 1  # global_step is incremented after this event
            self.skipped_steps.append(step)
            if len(self.skipped_steps) <= 3:
                print(
                    f"fp16 loss scaling skipped optimizer step {step} (the scaled gradients overflowed, the loss "
                    "is finite); the scale is lowered and training goes on - this is not divergence",
                    file=sys.stderr, flush=True,
                )

    def _weights_finite(self, model: Any) -> bool:
        if model is None or not self.check_weights:
            return True
        checks = [torch.isfinite(p.detach()).all() for p in model.parameters() if p.requires_grad]
        return bool(torch.stack(checks).all()) if checks else True

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        reason = ""
        if self.bad_loss is not None:
            reason = f"the loss became {self.bad_loss} at optimizer step {state.global_step}"
        elif not self._weights_finite(model):
            reason = f"a trainable weight became NaN/inf after optimizer step {state.global_step}"
        if any_process(bool(reason), args.device):
            self.diverged_step = state.global_step
            self.reason = reason or f"another process saw a NaN/inf loss at optimizer step {state.global_step}"
            control.should_training_stop = True
            control.should_save = False  # keep the last good checkpoint the latest one
            control.should_evaluate = False
        self.bad_loss = None

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if len(self.skipped_steps) > 3:
            print(f"fp16 loss scaling skipped {len(self.skipped_steps)} optimizer steps in all (not divergence)",
                  file=sys.stderr, flush=True)

    def message(self, output_dir: str | Path, fp16: bool = False) -> str:
        """One line for the user: what happened, what was kept, what to do."""
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(str(output_dir)) if Path(output_dir).is_dir() else None
        kept = (
            f"the last checkpoint saved before it, {last}, is kept (resume from it with --resume_from_checkpoint "
            f"{last} and a lower --learning_rate)"
            if last else "no checkpoint was saved before it; rerun with a lower --learning_rate"
        )
        hint = (
            " (not an fp16 loss-scale skip: those leave the loss finite; --precision bf16 or fp32 avoids fp16 overflow)"
            if fp16 else ""
        )
        return f"training diverged: {self.reason}{hint}; stopped without saving this step; {kept}"
