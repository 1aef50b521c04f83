"""Where the code runs: the device, the precision it can compute in, the processes a launcher started.

- `resolve_device` / `resolve_precision`: CUDA, else Apple MPS, else CPU; `auto` precision is bf16 only on GPUs
  that compute in bf16 natively (Ampere and newer: `is_bf16_supported(including_emulation=False)`; a V100 or T4
  emulates it, slowly), else fp16 on a GPU, fp32 on CPU.
- `world_size` / `rank` / `is_main_process` / `log`: what torchrun, accelerate or Slurm set in the environment; the
  launcher's variables are all there is before accelerate is set up, and they are what accelerate reads too.
- `parse_device_map`: `--device_map` for inference (`auto` spreads one model over every GPU).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from utils.core.errors import UserError, raise_problems

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def resolve_device() -> str:
    """cuda, then Apple mps, then cpu."""
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def use_idle_cores() -> str:
    """Torch threads for CPU work: as many as the cores other processes leave idle now (measured over a quarter of a
    second), at least one; OMP_NUM_THREADS decides when set. On a CPU that other work keeps busy, threads that wait
    for each other at every parallel region made each step several times slower than one thread
    (docs/performance.md). Returns a line that says what was chosen."""
    import psutil

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    chosen = os.environ.get("OMP_NUM_THREADS", "")
    busy = psutil.cpu_percent(interval=0.25) / 100 * (os.cpu_count() or cores) if not chosen else 0.0
    threads = int(chosen) if chosen.isdigit() and int(chosen) > 0 else max(1, min(cores, round(cores - busy)))
    torch.set_num_threads(threads)
    why = "OMP_NUM_THREADS" if chosen else f"{cores} cores, {busy:.1f} busy with other work; OMP_NUM_THREADS=N decides"
    return f"cpu: {threads} torch thread(s) ({why})"


def native_bf16(device: str) -> bool:
    """bf16 without emulation: every CPU, and CUDA GPUs of compute capability 8.0 and newer."""
    if device == "cpu":
        return True
    return device == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)


def precision_problems(precision: str, device: str) -> list[str]:
    """`--precision bf16` where the device lacks it natively (emulated, several times slower), fp16 on CPU."""
    if precision == "bf16" and not native_bf16(device):
        return [(f"--precision bf16 is not supported natively on this {device} device (it would be emulated, several "
                "times slower); use --precision fp16 or auto")]
    if precision == "fp16" and device == "cpu":
        return ["--precision fp16 needs a GPU; on CPU use --precision fp32 (or auto)"]
    return []


def resolve_precision(precision: str, device: str) -> str:
    """`auto`: bf16 where the GPU computes in it natively, else fp16 on a GPU, fp32 on CPU."""
    raise_problems(precision_problems(precision, device))
    if precision == "auto":
        if device == "cuda":
            return "bf16" if native_bf16(device) else "fp16"
        return "fp16" if device == "mps" else "fp32"
    return precision


def torch_dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


# --- processes ---------------------------------------------------------------------------------------------------


def world_size() -> int:
    """The number of processes over all nodes (1 when not launched by a distributed launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def log(message: str) -> None:
    """Print on the main process only (every rank runs the same script)."""
    if is_main_process():
        print(message, flush=True)


# --- inference: one model over several devices ---------------------------------------------------------------------


def parse_device_map(device_map: Any) -> str | dict[str, Any] | None:
    """`--device_map` for `from_pretrained`: None (the whole model on the one device picked automatically),
    a strategy that spreads the layers over every GPU (`auto`, `balanced`, `balanced_low_0`, `sequential`;
    what does not fit goes to CPU RAM), or one device (`cpu`, `mps`, `cuda`, `cuda:1`, or a GPU index)."""
    if isinstance(device_map, int) and not isinstance(device_map, bool):  # before the test below: 0 == False
        device_map = f"cuda:{device_map}"
    if isinstance(device_map, str) and device_map.isdigit():
        device_map = f"cuda:{device_map}"
    if device_map in (None, "", False, "none", "None"):
        return None
    if not isinstance(device_map, str):
        choices = ", ".join(DEVICE_MAP_STRATEGIES)
        raise UserError(f"--device_map must be one of {choices} or a device, got {device_map!r}")
    if device_map in DEVICE_MAP_STRATEGIES:
        return device_map
    try:
        device = torch.device(device_map)
    except RuntimeError:
        raise UserError(
            f"--device_map must be one of {', '.join(DEVICE_MAP_STRATEGIES)} or a device (cpu, mps, cuda, cuda:1), "
            f"got {device_map!r}"
        ) from None
    if device.type == "cuda" and (
        not torch.cuda.is_available() or (device.index is not None and device.index >= torch.cuda.device_count())
    ):
        raise UserError(f"--device_map {device_map}: no such CUDA device on this machine")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError(f"--device_map {device_map}: Apple MPS is not available on this machine")
    return {"": str(device)}
