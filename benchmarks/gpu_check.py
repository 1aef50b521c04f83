"""One prepared command that proves the GPU rows on one GPU, through the project's own scripts (finetune.py and the
Trainer, export_hf_checkpoint.py's merge check, infer.py), no downloads, at most 8 minutes on one H100 by arithmetic
(docs/multi_gpu.md: the command with the wheels it needs, the arithmetic, what each check proves).

    python benchmarks/gpu_check.py                       # on a CUDA GPU: report, log in $OUT (else benchmarks/results)
    python benchmarks/gpu_check.py --only resume,export  # some checks again (what they need is built again)
    python benchmarks/gpu_check.py --dry_run             # the same plan on CPU at tiny shapes (the test suite runs it)

Checks, each within its time limit (LIMITS), one failing never stopping the others:
- environment: GPU, native bf16, measured bf16 matmul rate; every package the scripts need at the pinned version
  (torch excepted: it cannot travel); on a GPU a missing one fails;
- packing_sdpa, packing_flex: finetune.py on a LLaMA-1B shape (random init, bf16), 6 steps of 16 rows: packed per-step
  losses equal `--packing False`'s within a tolerance derived from two unpacked runs that differ only in micro-batch
  size (rounding, not mathematics), with and without gradient checkpointing; the attention function that ran and
  the mask it got are recorded and asserted; a packed run with a cache (packed sequences then see each other) must
  fall outside the tolerance, else the check has no power;
- precision: `--precision auto` is bf16 here; the first-step loss in bf16 equals fp32's within bf16 rounding;
- resume: a run stopped at checkpoint-5 (inside epoch 2) and resumed equals the uninterrupted run (step-6 loss,
  adapter) within the same tolerance;
- export: export_hf_checkpoint's merge check on the GPU accepts the trained adapter's bf16 merge and refuses it
  mis-scaled by 0.75x and 1.5x;
- device_map: infer.py `--device_map auto` with the GPU limited to 1 GiB (max_memory) spreads the model over GPU
  and CPU and answers as without it;
- throughput: finetune.py at its defaults (batch 128, micro-batch 4, packed, no checkpointing) on a LLaMA-7B shape,
  22 steps, the last 20 timed: tokens/s, model FLOPs utilisation against the spec and the measured matmul peak
  (attention and recomputation counted), peak memory asserted against docs/multi_gpu.md's figure;
- qlora: `--load_4bit True --gradient_checkpointing True`: 4-bit layers, compute dtype, non-zero LoRA gradients,
  non-reentrant checkpointing; 7B peak memory in 4-bit against bf16;
- rows a single GPU cannot prove are reported "not covered", never passed.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import io
import json
import math
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import traceback
import unittest.mock
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from utils.core.cli import flag, run_cli  # noqa: E402
from utils.core.errors import UserError, raise_problems  # noqa: E402

# Per-check limits (s) on an H100: 2.5 times docs/multi_gpu.md's estimate (its arithmetic), at least 60 s. A first GPU
# run's measured seconds replace them (the report has them).
LIMITS = {"environment": 60, "packing_sdpa": 100, "packing_flex": 180, "precision": 60, "resume": 60, "export": 60,
          "device_map": 60, "throughput": 150, "qlora": 120}
CHECKS = tuple(LIMITS)
NOT_COVERED = {
    "ddp_nccl": "several GPUs (torchrun over NCCL); tests/test_distributed.py runs it on 2 CPU processes (gloo)",
    "fsdp": "several GPUs; FSDP runs on 2 CPU processes in the slow tests",
    "deepspeed_zero": "several GPUs and deepspeed (not in the image, its ops build against CUDA); ZeRO-3 runs on CPU "
                      "in the slow tests",
    "device_map_two_gpus": "two GPUs; here the split is GPU and CPU (the device_map check)",
    "flash_attention_2": "flash-attn has no wheel for this image's torch 2.11/CUDA 13 and cannot be built within the "
                         "lease; its varlen layout runs on CPU kernels in tests/test_batching.py",
}
SHAPES = {
    "llama-7b": {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                 "intermediate_size": 11008, "vocab_size": 32000},
    "llama-1b": {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 16,
                 "intermediate_size": 5632, "vocab_size": 32000},
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 172, "vocab_size": 1000},
}
SPEC_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0}  # dense, NVIDIA data sheets
PEAK_GIB_7B_DEFAULTS = 17.0  # docs/multi_gpu.md's arithmetic: finetune.py's defaults, LLaMA-7B shape, bf16, one GPU
PINNED = ("transformers", "peft", "accelerate", "datasets", "fire", "safetensors")  # versions from requirements.txt
BF16_UNIT = 2.0**-8  # bf16's unit roundoff
PASSED, FAILED, NEEDS_GPU, NOT_COVERED_STATUS = "passed", "failed", "needs a GPU", "not covered"


@dataclass(frozen=True)
class CheckArgs:
    """The flags of benchmarks/gpu_check.py."""

    dry_run: bool = flag(False, "the plan on CPU at tiny shapes, fp32")
    only: str = flag("", f"comma-separated checks to run: {','.join(CHECKS)}")
    output: str = flag("", "folder for the report and the scripts' log (default: $OUT when set, else "
                           "benchmarks/results)")
    workdir: str = flag("", "where models and runs go (default: a temporary folder)")
    tokenizer_from: str = flag("", "a tiny base folder whose tokenizer to use (default: build one with "
                                   "utils.tiny_base)")


import torch  # noqa: E402


class CheckFailed(AssertionError):
    """A check ran and found something wrong."""


class NeedsGPU(Exception):
    """Raised by a check in a dry run after its CPU part: the rest needs CUDA (or bitsandbytes, flex's backward)."""


class TimedOut(BaseException):
    """A check ran past its limit (a BaseException, so that no `except Exception` in the scripts swallows it)."""


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def has_cuda() -> bool:
    return torch.cuda.is_available()


def one_gpu(environ: dict[str, str]) -> str | None:
    """The GPU the checks run on, made the only visible one (before CUDA starts): the project's scripts run in this
    process, and finetune.py refuses one process driving several GPUs. None: no change."""
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and "," not in visible:
        return None
    first = (visible or "0").split(",")[0].strip()
    environ["CUDA_VISIBLE_DEVICES"] = first
    return first


def peak_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if has_cuda() else None


def free_memory() -> None:
    gc.collect()
    if has_cuda():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


@contextlib.contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """SIGALRM raises TimedOut in the check after `seconds` (None: no limit)."""
    if not seconds:
        yield
        return

    def alarm(signum: int, frame: Any) -> None:
        raise TimedOut(f"ran past its limit of {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Report:
    """The checks' results, written to `path` after every check (a killed run still leaves what it found)."""

    def __init__(self, path: Path, dry_run: bool, limits: bool, work: dict[str, int]) -> None:
        self.path, self.dry_run, self.limits = path, dry_run, limits
        self.work = work  # what the scripts did so far: finetune.py runs, optimizer steps, model loads
        self.checks: list[dict[str, Any]] = []
        self.started = time.perf_counter()

    def run(self, name: str, check: Callable[[], dict[str, Any]]) -> None:
        entry: dict[str, Any] = {"name": name, "limit_s": LIMITS[name] if self.limits else None}
        started, before = time.perf_counter(), dict(self.work)
        free_memory()
        try:
            with time_limit(entry["limit_s"]):
                entry.update(status=PASSED, details=check())
        except NeedsGPU as error:
            entry.update(status=NEEDS_GPU, reason=str(error))
        except (Exception, TimedOut) as error:  # noqa: BLE001  one failing check must not stop the others
            entry.update(status=FAILED, error=f"{type(error).__name__}: {error}"[:3000],
                         traceback=traceback.format_exc()[-4000:])
        entry["seconds"] = round(time.perf_counter() - started, 1)
        entry["work"] = {key: self.work[key] - before[key] for key in self.work}
        free_memory()
        self.checks.append(entry)
        print(f"[{entry['status']}] {name} ({entry['seconds']} s)"
              + (f": {entry.get('error') or entry.get('reason')}" if entry["status"] != PASSED else ""), flush=True)
        self.write()

    def write(self) -> dict[str, Any]:
        from utils.core.io import atomic_write_json

        summary = {"when": datetime.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv),
                   "dry_run": self.dry_run, "seconds": round(time.perf_counter() - self.started, 1),
                   "failed": [c["name"] for c in self.checks if c["status"] == FAILED],
                   "counts": {s: sum(c["status"] == s for c in self.checks)
                              for s in (PASSED, FAILED, NEEDS_GPU, NOT_COVERED_STATUS)},
                   "work": self.work, "checks": self.checks}
        atomic_write_json(self.path, json.loads(json.dumps(summary, default=str)))
        return summary


# --- the project's scripts, in this process -------------------------------------------------------------------------


class Tee(io.StringIO):
    """What a script prints, kept, and copied to the log as it comes (a run killed at its limit leaves it there)."""

    def __init__(self, log: io.TextIOBase) -> None:
        super().__init__()
        self.log = log

    def write(self, text: str) -> int:
        self.log.write(text)
        return super().write(text)


def run_script(main: Callable[..., Any], argv: list[Any], log: io.TextIOBase) -> tuple[int, str]:
    """`python script.py argv` in this process: (exit code, what it printed), the output copied to `log`."""
    from utils.core.cli import run_cli

    log.write(f"\n$ {main.__module__}.py {' '.join(map(str, argv))}\n")
    output, code = Tee(log), 0
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        try:
            run_cli(main, [str(a) for a in argv])
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    log.write(f"exit code {code}\n")
    return code, output.getvalue()


@contextlib.contextmanager
def recorded_attention() -> Iterator[dict[str, int]]:
    """Counts the calls of each attention function transformers dispatches to, by the kind of mask it got
    ("sdpa/Tensor", "flex_attention/BlockMask", "sdpa/None": plain causal, no packed sequences seen)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    calls: dict[str, int] = {}
    originals = {name: ALL_ATTENTION_FUNCTIONS[name] for name in ("sdpa", "flex_attention")}

    def counted(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, *args: Any, **kwargs: Any):
            kind = f"{name}/{type(attention_mask).__name__ if attention_mask is not None else 'None'}"
            calls[kind] = calls.get(kind, 0) + 1
            return function(module, query, key, value, attention_mask, *args, **kwargs)
        return attention

    for name, function in originals.items():
        ALL_ATTENTION_FUNCTIONS[name] = counted(name, function)
    try:
        yield calls
    finally:
        for name, function in originals.items():
            ALL_ATTENTION_FUNCTIONS[name] = function


@contextlib.contextmanager
def recorded_checkpointing() -> Iterator[list[Any]]:
    """The `use_reentrant` argument of every activation recomputation transformers runs (set up when the model is
    prepared, so enter this before the model loads)."""
    import transformers.modeling_utils
    from torch.utils.checkpoint import checkpoint

    modes: list[Any] = []

    def recorded(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        modes.append(kwargs.get("use_reentrant"))
        return checkpoint(function, *args, **kwargs)

    with unittest.mock.patch.object(transformers.modeling_utils, "checkpoint", recorded):
        yield modes


class Run(NamedTuple):
    """What one finetune.py run did: its per-step losses, where it wrote, what ran inside."""

    output_dir: Path
    losses: list[float]
    seconds: float
    peak_gib: float | None
    attention: dict[str, int]
    step_times: list[tuple[float, int]]  # (time, real tokens collated so far) at each step's end
    facts: dict[str, Any]


from transformers import TrainerCallback  # noqa: E402


class StepClock(TrainerCallback):
    """(time, real tokens collated so far) at the end of every optimizer step."""

    def __init__(self, trainer: Any, times: list[tuple[float, int]]) -> None:
        self.trainer, self.times = trainer, times

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if has_cuda():
            torch.cuda.synchronize()
        self.times.append((time.perf_counter(), self.trainer.batching.stats.real_tokens))


class Workspace:
    """The bases (random init, bf16, the tiny base's tokenizer), the data, and the finetune.py runs, each made once."""

    def __init__(self, root: Path, dry_run: bool, tokenizer_from: str, log: io.TextIOBase) -> None:
        self.root, self.dry_run, self.tokenizer_from, self.log = root, dry_run, tokenizer_from, log
        self.device = "cpu" if dry_run else "cuda"
        self.precision = "fp32" if dry_run else "bf16"
        self.made: dict[str, Any] = {}
        self.work = {"finetune_runs": 0, "optimizer_steps": 0, "model_loads": 0}

    def once(self, key: str, make: Callable[[], Any]) -> Any:
        """`make()`'s value, made once; one that failed fails again at once (a failed run is not redone)."""
        if key not in self.made:
            try:
                self.made[key] = make()
            except (Exception, TimedOut) as error:
                self.made[key] = error
                raise
        if isinstance(self.made[key], BaseException):
            raise CheckFailed(f"{key} failed earlier: {self.made[key]}")
        return self.made[key]

    def tokenizer(self) -> Path:
        def make() -> Path:
            if self.tokenizer_from:
                return Path(self.tokenizer_from)
            from utils.tiny_base import build

            return Path(build(arch="llama", output_dir=str(self.root / "tiny-llama"), pretrain_steps=0))
        return self.once("tokenizer", make)

    def base(self, shape: str) -> Path:
        """A random-init base of `shape` (tiny in a dry run) saved in bf16, as Llama-3/Qwen2.5 ship."""
        def make() -> Path:
            from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self.tokenizer())
            settings = dict(SHAPES["tiny" if self.dry_run else shape])
            settings["vocab_size"] = max(settings["vocab_size"], len(tokenizer))
            config = AutoConfig.for_model("llama", **settings, max_position_embeddings=2048, tie_word_embeddings=False,
                                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                          pad_token_id=tokenizer.pad_token_id)
            torch.manual_seed(0)
            with torch.device(self.device):
                model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
            folder = self.root / f"base-{shape}"
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            return folder
        return self.once(f"base-{shape}", make)

    def data(self, kind: str) -> Path:
        """`rows`: 64 of data/llama_data.json's rows (66 tokens each on average under the tiny tokenizer); `long`: all
        of them joined in pairs, 1,657 rows of 95 tokens (the published data's rows: 122), for the throughput."""
        def make() -> Path:
            rows = [json.loads(line) for line in (REPO / "data" / "llama_data.json").read_text(encoding="utf-8")
                    .splitlines() if line.strip()]
            rows = [{k: row[k] for k in ("instruction", "input", "output")} for row in rows]
            if kind == "long":
                rows = [{"instruction": a["instruction"] + b["instruction"], "input": "",
                         "output": a["output"] + b["output"]} for a, b in zip(rows[::2], rows[1::2], strict=False)]
            path = self.root / f"{kind}.jsonl"
            rows = rows[:64] if kind == "rows" else rows
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
            return path
        return self.once(f"data-{kind}", make)

    def finetune(self, name: str, flags: dict[str, Any], shape: str = "llama-1b", data: str = "rows",
                 inspect: Callable[[Any], Any] | None = None) -> Run:
        """finetune.py with `flags` on the base of `shape`, once per name; `inspect(trainer)` runs before training
        and what it returns, called again after training, goes into the run's facts."""
        def make() -> Run:
            import finetune

            argv = {"base_model": self.base(shape), "data_path": self.data(data), "output_dir": self.root / name,
                    "val_set_size": 0, **flags}
            losses: list[float] = []
            times: list[tuple[float, int]] = []
            facts: dict[str, Any] = {}
            real_train = finetune.train

            def train(trainer: Any, run: Any, args: Any) -> Any:
                after = inspect(trainer) if inspect else None
                trainer.add_callback(StepClock(trainer, times))
                result = real_train(trainer, run, args)
                losses.extend(entry["loss"] for entry in trainer.state.log_history if "loss" in entry)
                self.work["optimizer_steps"] += len(times)
                facts.update(after() if after else {})
                return result

            free_memory()
            started = time.perf_counter()
            with recorded_attention() as attention, unittest.mock.patch.object(finetune, "train", train):
                code, output = run_script(finetune.main, [x for k, v in argv.items() for x in (f"--{k}", v)],
                                          self.log)
            self.work["finetune_runs"] += 1
            self.work["model_loads"] += 1
            expect(code == 0, f"finetune.py ({name}) exited {code}: {output[-1500:]}")
            return Run(self.root / name, losses, round(time.perf_counter() - started, 1), peak_gib(), attention,
                       times, facts)
        return self.once(f"run-{name}", make)


# --- the checks -------------------------------------------------------------------------------------------------------

STEPS = {"batch_size": 16, "micro_batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1, "lora_dropout": 0,
         "warmup_steps": 0, "max_steps": 6, "save_steps": 5}  # 64 rows: 4 steps an epoch, checkpoint-5 in epoch 2


def largest_difference(a: list[float], b: list[float]) -> float:
    expect(len(a) == len(b) and a, f"runs of different lengths: {len(a)} and {len(b)} logged losses")
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def reference(space: Workspace) -> dict[str, Any]:
    """The unpacked run (`--packing False`), and its tolerance: the largest per-step difference between two unpacked
    runs that differ only in micro-batch size (the same rows and loss per step; other shapes, other rounding), times
    4, and at least 1e-5 of the loss (fp32)."""
    def make() -> dict[str, Any]:
        common = {**STEPS, "precision": space.precision, "packing": False}
        first = space.finetune("unpacked", common)
        second = space.finetune("unpacked-mb2", {**common, "micro_batch_size": 2})
        noise = largest_difference(first.losses, second.losses)
        return {"run": first, "second": second, "noise": noise, "tolerance": max(4 * noise, 1e-5 * max(first.losses))}
    return space.once("reference", make)


def adapter_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    first, second = (load_file(str(folder / "adapter_model.safetensors")) for folder in (a, b))
    expect(first.keys() == second.keys(), "the two adapters hold different tensors")
    return max((first[k].float() - second[k].float()).abs().max().item() for k in first)


def packed(space: Workspace, attention: str, recompute: bool) -> Run:
    """finetune.py's default layout (packed) with `attention`, with or without gradient checkpointing."""
    flags = {**STEPS, "precision": space.precision, "attn_implementation": attention,
             "gradient_checkpointing": recompute}
    return space.finetune(f"packed-{attention}{'-gc' if recompute else ''}", flags)


def check_packing(space: Workspace, attention: str) -> dict[str, Any]:
    if attention == "flex_attention" and space.dry_run:  # torch: "FlexAttention does not support backward on CPU"
        raise NeedsGPU("flex_attention trains only on a GPU (torch has no FlexAttention backward on CPU)")
    ref = reference(space)
    details: dict[str, Any] = {"noise": ref["noise"], "tolerance": ref["tolerance"],
                               "unpacked_losses": ref["run"].losses}
    calls = {}
    for gc_on in (False, True):
        run = packed(space, attention, gc_on)
        difference = largest_difference(run.losses, ref["run"].losses)
        label = "with checkpointing" if gc_on else "without checkpointing"
        details[label] = {"losses": run.losses, "difference": difference, "attention_calls": run.attention,
                          "seconds": run.seconds, "peak_gib": run.peak_gib}
        expect(difference <= ref["tolerance"], f"packed ({attention}, {label}) per-step losses differ from "
                                               f"--packing False by {difference:.3e} > {ref['tolerance']:.3e}")
        masked = {"sdpa": "sdpa/Tensor", "flex_attention": "flex_attention/BlockMask"}[attention]
        expect(run.attention.get(masked, 0) > 0 and set(run.attention) == {masked},
               f"packed {attention} ran {run.attention}: expected {masked} only (packed sequences detected)")
        calls[gc_on] = run.attention[masked]
    expect(calls[True] == 2 * calls[False], f"attention ran {calls[True]} times with checkpointing, "
                                            f"{calls[False]} without: the recomputation did not run")
    if attention == "sdpa":  # the power of the tolerance: packed rows whose sequences see each other
        from utils.training import batching

        collate = batching.PackingCollator.__call__
        with unittest.mock.patch.object(batching.PackingCollator, "__call__",
                                        lambda self, rows: {**collate(self, rows), "use_cache": True}):
            leak = space.finetune("packed-with-cache", {**STEPS, "precision": space.precision})
        difference = largest_difference(leak.losses, ref["run"].losses)
        details["sequences_see_each_other"] = {"difference": difference, "attention_calls": leak.attention}
        expect(difference > ref["tolerance"], f"packed sequences that see each other differ by only {difference:.3e}"
                                              f" (tolerance {ref['tolerance']:.3e}): the check cannot tell")
    return details


def check_precision(space: Workspace) -> dict[str, Any]:
    from utils.runtime import resolve_precision

    ref = reference(space)["run"]
    full = space.finetune("fp32-first-step", {**STEPS, "precision": "fp32", "packing": False, "max_steps": 1})
    difference = abs(full.losses[0] - ref.losses[0])
    details = {"fp32": full.losses[0], space.precision: ref.losses[0],
               "relative_difference": difference / full.losses[0]}
    expect(difference <= BF16_UNIT * abs(full.losses[0]), f"first-step loss {ref.losses[0]} ({space.precision}) vs "
                                                          f"{full.losses[0]} (fp32): more than bf16's rounding apart")
    if space.dry_run:
        raise NeedsGPU(f"bf16 against fp32 on a GPU (the CPU part, {space.precision} vs fp32, agreed: {details})")
    expect(resolve_precision("auto", "cuda") == "bf16", "--precision auto does not pick bf16 on this GPU")
    return details


def check_resume(space: Workspace) -> dict[str, Any]:
    ref = reference(space)
    whole = packed(space, "sdpa", True)
    flags = {**STEPS, "precision": space.precision, "attn_implementation": "sdpa", "gradient_checkpointing": True}
    resumed_dir = space.root / "resumed"
    shutil.copytree(whole.output_dir / "checkpoint-5", resumed_dir / "checkpoint-5")
    resumed = space.finetune("resumed", {**flags, "resume_from_checkpoint": True})
    tolerance = 4 * adapter_difference(ref["run"].output_dir, ref["second"].output_dir)
    adapters = adapter_difference(whole.output_dir, resumed.output_dir)
    details = {"whole": whole.losses, "resumed": resumed.losses, "adapter_difference": adapters,
               "adapter_tolerance": tolerance, "loss_tolerance": ref["tolerance"]}
    expect(len(resumed.step_times) == 1 and len(resumed.losses) == 6, f"the resumed run trained "
           f"{len(resumed.step_times)} steps and logged {len(resumed.losses)}: expected step 6 after checkpoint-5")
    expect(abs(resumed.losses[-1] - whole.losses[-1]) <= ref["tolerance"],
           f"step 6 resumed: loss {resumed.losses[-1]} vs {whole.losses[-1]} uninterrupted")
    expect(adapters <= max(tolerance, 1e-7), f"the resumed adapter differs by {adapters:.3e} > {tolerance:.3e}")
    return details


def check_export(space: Workspace) -> dict[str, Any]:
    """The merge check of export_hf_checkpoint.py on this device: the right merge passes, mis-scaled ones do not."""
    import export_hf_checkpoint
    from utils.core.errors import UserError
    from utils.model.loading import load_adapter, load_base_model, load_tokenizer

    adapter = packed(space, "sdpa", True).output_dir
    base = space.base("llama-1b")
    outcomes: dict[str, Any] = {}
    for scale in (1.0, 0.75, 1.5):
        tokenizer = load_tokenizer(str(base))
        model = load_base_model(str(base), precision=space.precision, device=space.device,
                                device_map={"": space.device}, tokenizer=tokenizer)
        model = load_adapter(model, str(adapter)).eval()
        space.work["model_loads"] += 1
        merge = model.merge_and_unload

        def mis_scaled(*args: Any, _merge: Any = merge, _scale: float = scale, _model: Any = model, **kwargs: Any):
            for layer in _model.modules():  # peft's LoRA layers: ΔW = scaling x B A
                if isinstance(getattr(layer, "scaling", None), dict):
                    layer.scaling = {name: value * _scale for name, value in layer.scaling.items()}
            return _merge(*args, **kwargs)

        model.merge_and_unload = mis_scaled
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed):
                merged = export_hf_checkpoint.merge_checked(model, tokenizer)
            outcomes[str(scale)] = {"accepted": printed.getvalue().strip(), "dtype": str(merged.dtype),
                                    "device": str(merged.device)}
        except UserError as error:
            outcomes[str(scale)] = {"refused": str(error)}
        del model
        free_memory()
    expect("accepted" in outcomes["1.0"], f"the right merge was refused: {outcomes['1.0']}")
    expect(all("refused" in outcomes[s] for s in ("0.75", "1.5")), f"a mis-scaled merge was accepted: {outcomes}")
    return outcomes


def check_device_map(space: Workspace) -> dict[str, Any]:
    """infer.py --device_map auto with this GPU limited to 1 GiB: part of the model on the GPU, the rest on CPU."""
    from transformers import AutoModelForCausalLM

    import infer

    adapter = packed(space, "sdpa", True).output_dir
    base = space.base("llama-1b")
    load = AutoModelForCausalLM.from_pretrained
    placed: list[dict[str, Any]] = []

    def limited(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("device_map") == "auto" and has_cuda():
            kwargs["max_memory"] = {0: "1GiB", "cpu": "100GiB"}
        model = load(*args, **kwargs)
        placed.append(dict(getattr(model, "hf_device_map", {}) or {}))
        return model

    answers = []
    for extra in ([], ["--device_map", "auto"]):
        output = space.root / f"answers{len(extra)}.jsonl"
        with unittest.mock.patch.object(AutoModelForCausalLM, "from_pretrained", limited):
            code, printed = run_script(infer.main, ["--base_model", base, "--lora_weights", adapter, "--instruct_dir",
                                                    REPO / "data" / "infer.json", "--max_new_tokens", 16,
                                                    "--num_beams", 1, "--output_file", output, *extra], space.log)
        space.work["model_loads"] += 1
        expect(code == 0, f"infer.py {' '.join(extra)} exited {code}: {printed[-1500:]}")
        answers.append([json.loads(line)["model_output"] for line in output.read_text(encoding="utf-8").splitlines()])
    devices = sorted({str(device) for device in placed[-1].values()})
    same = sum(a == b for a, b in zip(*answers, strict=True))
    details = {"devices": devices, "identical_answers": f"{same}/{len(answers[0])}",
               "modules_by_device": {d: sum(str(v) == d for v in placed[-1].values()) for d in devices}}
    expect(same == len(answers[0]), f"{len(answers[0]) - same} answers differ under --device_map auto")
    if space.dry_run:
        raise NeedsGPU(f"the split over GPU and CPU (on CPU both runs answered alike: {details})")
    expect(len(devices) > 1 and "cpu" in devices, f"--device_map auto under max_memory placed the model on {devices}")
    return details


def flops_per_token(shape: dict[str, Any], context: float, label_share: float, recompute: bool) -> float:
    """Model FLOPs of one trained token, LoRA on a frozen base: the decoder's matmuls forward, backward to their
    inputs (no weight gradients) and again when recomputed; attention's QK^T and PV over `context` keys on average,
    forward, twice that backward, again when recomputed; the LM head on label positions only."""
    d, layers, heads = shape["hidden_size"], shape["num_hidden_layers"], shape["num_attention_heads"]
    kv = d // heads * shape["num_key_value_heads"]
    linear = layers * (2 * d * d + 2 * d * kv + 3 * d * shape["intermediate_size"])
    attention = layers * 4 * d * context
    return (4 + 2 * recompute) * linear + (3 + recompute) * attention + 4 * d * shape["vocab_size"] * label_share


def data_facts(trainer: Any) -> Callable[[], dict[str, Any]]:
    """What the run trained on: the rows' token counts and the share of tokens that are labels (the LM head's)."""
    rows = trainer.train_dataset
    lengths = [len(ids) for ids in rows["input_ids"]]
    labels = sum(sum(label != -100 for label in row) for row in rows["labels"])
    context = sum(n * (n + 1) / 2 for n in lengths) / sum(lengths)  # keys a token attends to, on average
    return lambda: {"rows": len(lengths), "mean_row_tokens": sum(lengths) / len(lengths), "context": context,
                    "label_share": labels / sum(lengths)}


def check_throughput(space: Workspace) -> dict[str, Any]:
    steps, timed = (3, 2) if space.dry_run else (22, 20)  # otherwise finetune.py's defaults: batch 128, micro 4
    run = space.finetune("throughput", {"max_steps": steps, "logging_steps": 1}, shape="llama-7b", data="long",
                         inspect=data_facts)
    expect(len(run.step_times) == steps, f"{len(run.step_times)} steps timed, {steps} expected")
    (start, tokens_start), (end, tokens_end) = run.step_times[-timed - 1], run.step_times[-1]
    tokens_per_s = (tokens_end - tokens_start) / (end - start)
    flops = flops_per_token(SHAPES["tiny" if space.dry_run else "llama-7b"], run.facts["context"],
                            run.facts["label_share"], recompute=False)
    peaks = {key: (space.made.get("environment") or {}).get(f"{key}_tflops") for key in ("matmul", "spec")}
    achieved = flops * tokens_per_s / 1e12
    details = {**run.facts, "steps": steps, "timed_steps": timed, "tokens_per_s": round(tokens_per_s, 1),
               "s_per_step": round((end - start) / timed, 3), "tflop_per_token": flops / 1e12,
               "achieved_tflops": round(achieved, 2), "peak_gib": run.peak_gib, "losses": run.losses,
               **{f"mfu_vs_{key}": round(achieved / peak, 4) if peak else None for key, peak in peaks.items()}}
    expect(all(math.isfinite(loss) for loss in run.losses), f"losses {run.losses}")
    if space.dry_run:
        raise NeedsGPU(f"7B throughput and memory (the CPU part, {steps} steps at a tiny shape: {details})")
    space.made["bf16-7b-peak"] = run.peak_gib  # the qlora check compares its 4-bit peak with it
    expect(run.peak_gib is not None and run.peak_gib <= PEAK_GIB_7B_DEFAULTS,
           f"peak memory {run.peak_gib} GiB > the {PEAK_GIB_7B_DEFAULTS} GiB docs/multi_gpu.md states")
    return details


def quantized_facts(trainer: Any) -> Callable[[], dict[str, Any]]:
    """The 4-bit layers and their compute dtype now; the largest LoRA gradient seen in training, afterwards."""
    import bitsandbytes as bnb

    model = trainer.model
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    largest: dict[str, float] = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and "lora_" in name:
            def keep(grad: torch.Tensor, _name: str = name) -> None:
                largest[_name] = max(largest.get(_name, 0.0), grad.abs().max().item())
            parameter.register_hook(keep)
    facts = {"linear4bit_layers": len(four_bit), "compute_dtypes": sorted({str(m.compute_dtype) for m in four_bit}),
             "quant_type": sorted({str(getattr(m.weight, "quant_type", "")) for m in four_bit})}
    return lambda: {**facts, "lora_tensors_with_gradients": sum(v > 0 for v in largest.values()),
                    "lora_tensors": len(largest)}


def check_qlora(space: Workspace) -> dict[str, Any]:
    if not has_cuda():  # the CPU part: the flag is refused with one line before anything loads
        import finetune

        argv = ["--base_model", space.base("llama-1b"), "--data_path", space.data("rows"), "--output_dir",
                space.root / "qlora-cpu", "--load_4bit", True]
        code, printed = run_script(finetune.main, argv, space.log)
        expect(code == 2 and printed.strip().startswith("error:"), f"--load_4bit on CPU: exit {code}, {printed}")
        raise NeedsGPU(f"bitsandbytes' 4-bit layers need CUDA (on CPU: {printed.strip()}; tests/test_gpu.py checks "
                       "the non-reentrant setup)")
    with recorded_checkpointing() as modes:
        run = space.finetune("qlora", {**STEPS, "max_steps": 2, "load_4bit": True, "gradient_checkpointing": True},
                             inspect=quantized_facts)
    facts = run.facts
    layers = SHAPES["llama-1b"]["num_hidden_layers"]
    expect(facts["linear4bit_layers"] == 7 * layers, f"{facts['linear4bit_layers']} 4-bit layers, not {7 * layers}")
    expect(facts["compute_dtypes"] == ["torch.bfloat16"], f"4-bit compute dtype {facts['compute_dtypes']}")
    expect(facts["lora_tensors"] > 0 and facts["lora_tensors_with_gradients"] == facts["lora_tensors"],
           f"LoRA tensors with a gradient: {facts['lora_tensors_with_gradients']} of {facts['lora_tensors']}")
    expect(modes and set(modes) == {False}, f"checkpointing ran with use_reentrant {sorted(set(map(str, modes)))}")
    seven = space.finetune("qlora-7b", {"max_steps": 2, "load_4bit": True, "gradient_checkpointing": True},
                           shape="llama-7b", data="long")
    bf16_weights = 6.74e9 * 2 / 2**30
    details = {**facts, "recomputations": len(modes), "use_reentrant": sorted(set(map(str, modes))),
               "losses": run.losses, "peak_gib_1b": run.peak_gib, "peak_gib_7b_4bit": seven.peak_gib,
               "peak_gib_7b_bf16": space.made.get("bf16-7b-peak"), "bf16_weights_gib_7b": round(bf16_weights, 2)}
    expect(seven.peak_gib < 0.6 * bf16_weights, f"7B in 4-bit peaked at {seven.peak_gib} GiB, the bf16 weights "
                                                f"alone are {bf16_weights:.1f} GiB")
    return details


def environment(dry_run: bool) -> dict[str, Any]:
    """Versions, the GPU, the measured bf16 matmul rate; on a GPU every package the scripts need at its pin."""
    import importlib
    import importlib.metadata

    pins = dict(line.split("==") for line in (REPO / "requirements.txt").read_text(encoding="utf-8").splitlines()
                if "==" in line and not line.startswith("#"))
    details: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                               "torch_pinned": pins["torch"], "cuda": torch.version.cuda}
    problems = []
    for name in (*PINNED, "bitsandbytes", "pyarrow", "pandas", "sentencepiece"):
        try:
            importlib.import_module(name)
            details[name] = importlib.metadata.version(name)
        except ImportError as error:
            details[name] = None
            if name != "bitsandbytes" or not dry_run:
                problems.append(f"{name} does not import ({error}): bash scripts/device_wheels.sh, then carry .whl")
        if name in PINNED and details[name] not in (None, pins[name]):
            problems.append(f"{name} {details[name]}, the project pins {pins[name]}")
    if not dry_run:
        name = torch.cuda.get_device_name()
        details.update(device=name, capability=list(torch.cuda.get_device_capability()),
                       memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
                       native_bf16=torch.cuda.is_bf16_supported(including_emulation=False),
                       spec_tflops=next((v for k, v in SPEC_BF16_TFLOPS.items() if k in name), None))
        a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        for repeat in (3, 20):  # warm-up, then timed
            torch.cuda.synchronize()
            started = time.perf_counter()
            for _ in range(repeat):
                a @ b
            torch.cuda.synchronize()
        details["matmul_tflops"] = round(2 * 8192**3 * 20 / (time.perf_counter() - started) / 1e12, 1)
        if not details["native_bf16"]:
            problems.append("this GPU has no native bf16: the plan is for an H100/H200")
    else:
        details["device"] = f"cpu ({torch.get_num_threads()} threads)"
    expect(not problems, "; ".join(problems))
    return details


# --- main ---------------------------------------------------------------------------------------------------------


def default_output() -> Path:
    return Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "benchmarks" / "results"


def main(args: CheckArgs) -> None:
    """Prove every GPU row on one GPU (or, with --dry_run, run the plan on CPU at tiny shapes); exit 1 on a failure."""
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    raise_problems([f"--only {name}: not a check; the checks: {','.join(CHECKS)}" for name in only
                    if name not in CHECKS])
    chosen = None if args.dry_run else one_gpu(os.environ)  # before anything asks CUDA how many GPUs there are
    if chosen is not None:
        print(f"gpu_check runs on one GPU: CUDA_VISIBLE_DEVICES={chosen}", file=sys.stderr)
    if not args.dry_run and not has_cuda():
        raise UserError("no CUDA GPU here; `python benchmarks/gpu_check.py --dry_run` runs the plan on CPU")
    output = Path(args.output) if args.output else default_output()
    output.mkdir(parents=True, exist_ok=True)
    name = "gpu-check-dry-run" if args.dry_run else "gpu-check"
    threads = torch.get_num_threads()
    if args.dry_run:  # code paths, not speed: one thread never fights a busy machine's other work
        torch.set_num_threads(1)
    try:
        with open(output / f"{name}-scripts.log", "w", encoding="utf-8", buffering=1) as log, \
                tempfile.TemporaryDirectory(dir=args.workdir or None) as workdir:
            failed = run_plan(args, only or list(CHECKS), Workspace(Path(workdir), args.dry_run, args.tokenizer_from,
                                                                    log), output / f"{name}.json")
    finally:
        torch.set_num_threads(threads)
    if failed:
        sys.exit(1)


def run_plan(args: Any, only: list[str], space: Workspace, path: Path) -> int:
    report = Report(path, args.dry_run, limits=not args.dry_run, work=space.work)
    checks: dict[str, Callable[[], dict[str, Any]]] = {
        "environment": lambda: space.once("environment", lambda: environment(args.dry_run)),
        "packing_sdpa": lambda: check_packing(space, "sdpa"),
        "packing_flex": lambda: check_packing(space, "flex_attention"),
        "precision": lambda: check_precision(space), "resume": lambda: check_resume(space),
        "export": lambda: check_export(space), "device_map": lambda: check_device_map(space),
        "throughput": lambda: check_throughput(space), "qlora": lambda: check_qlora(space),
    }
    for name in CHECKS:
        if name == "environment" or name in only:
            report.run(name, checks[name])
    report.checks += [{"name": name, "status": NOT_COVERED_STATUS, "reason": f"not covered on one GPU: {reason}"}
                      for name, reason in NOT_COVERED.items()]
    summary = report.write()
    print(f"{len(report.checks)} rows in {summary['seconds']} s: {summary['counts']}; report: {path}")
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    run_cli(main)
