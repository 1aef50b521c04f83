"""Callbacks around transformers' `Trainer`: a clean stop on a signal, no silent NaNs, progress lines in logs.

- `GracefulStop` turns SIGTERM/SIGINT into "save a checkpoint at the end of this optimizer step and stop".
- `DivergenceGuard` stops at the first optimizer step whose loss (or trainable weights) is NaN/inf, without
  saving that step, and tells it apart from fp16 loss-scale skips (inf gradients, finite loss, step skipped).
- `ProgressLines`: when the output goes to a file or a pipe (nohup, sbatch, `| tee log` from a terminal), the
  progress bar is off; this prints `step 90/256, 12.3 s/step, ETA 34 min` lines and one line per checkpoint saved
  (main process only). `printing_to_a_log()` decides, for both.
- `ReadableCheckpoints`: each `checkpoint-N` as the umask allows (safetensors writes its files 0600), so that a
  colleague can read, resume or answer with it, as with the final adapter.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


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
        """Called by `LayoutTrainer.training_step` for every micro-batch."""
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
        from utils.training.checkpoints import latest_complete

        last = latest_complete(output_dir)
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


# --- progress in logs --------------------------------------------------------------------------------------------


def format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def printing_to_a_log() -> bool:
    """True unless both stdout and stderr are a terminal. Under `python finetune.py ... | tee log` stderr is still the
    terminal, but what is printed on stdout lands in the log: the Trainer's bar would write its `{'loss': '4.113', ...,
    'epoch': ...}` dicts there (tqdm.write goes to stdout), so the bar is off and `ProgressLines` prints instead."""
    return not (sys.stdout.isatty() and sys.stderr.isatty())


class ProgressLines(TrainerCallback):
    """`step 90/256, 12.3 s/step, ETA 34 min, loss 1.2345` at every logging step, the validation loss, and a line per
    checkpoint saved; for logs that are files or pipes, where the progress bar is off (it replaces transformers'
    `PrinterCallback`, whose dicts of strings say `'epoch': '0.7031'`). Main process only."""

    def __init__(self, enabled: bool | None = None, stream: Any = None) -> None:
        self.enabled = printing_to_a_log() if enabled is None else enabled
        self.stream = stream
        self._started: float | None = None
        self._first_step = 0
        self._last = (0.0, 0)  # (time, step) of the last progress line
        self._fastest = float("inf")  # seconds per step of the fastest interval between two lines

    def _print(self, text: str) -> None:
        print(text, file=self.stream or sys.stdout, flush=True)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._started = time.monotonic()
        self._first_step = state.global_step  # a resumed run counts from where it starts
        self._last = (self._started, state.global_step)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not (self.enabled and state.is_world_process_zero and self._started is not None and logs):
            return
        step, total = state.global_step, state.max_steps
        if "eval_loss" in logs:
            self._print(f"step {step}/{total}: validation loss {logs['eval_loss']:.4f}")
        if "loss" not in logs:
            return
        now = time.monotonic()
        per_step = (now - self._started) / max(step - self._first_step, 1)
        rate = f", lr {logs['learning_rate']:.2e}" if isinstance(logs.get("learning_rate"), float) else ""
        norm = f", grad_norm {logs['grad_norm']:.4g}" if isinstance(logs.get("grad_norm"), float) else ""
        interval = (now - self._last[0]) / max(step - self._last[1], 1)
        self._last, self._fastest = (now, step), min(self._fastest, interval)
        slow = (" (3x slower than this run's best: is other work sharing the CPU? fewer threads help then, e.g. "
                "OMP_NUM_THREADS=1)") if args.device.type == "cpu" and interval > 3 * self._fastest else ""
        self._print(f"step {step}/{total}, {per_step:.1f} s/step, ETA {format_duration(per_step * (total - step))}, "
                    f"loss {logs['loss']:.4f}{rate}{norm}{slow}")

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            self._print(f"checkpoint saved: {folder}")


class ReadableCheckpoints(TrainerCallback):
    """Give each saved `checkpoint-N` the modes the umask allows: the Trainer's safetensors files arrive 0600."""

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        from utils.core.io import make_readable

        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            make_readable(folder)
