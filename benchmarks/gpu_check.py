"""One command that proves the GPU paths, for the day a GPU is lent: no downloads, sized (by estimate, not yet timed
on a GPU) to take at most 8 minutes on one H100/H200.

    python benchmarks/gpu_check.py                 # on a CUDA GPU: 7B-shaped LLaMA and Qwen2.5, random init, bf16
    python benchmarks/gpu_check.py --dry_run       # the whole plan on CPU at tiny shapes (what the test suite runs)

The plan (each check runs on its own; one that fails does not stop the others):

- `environment`: torch / CUDA / GPU, native bf16, flash-attn and bitsandbytes, library versions;
- `packed_training[<shape>, sdpa|flash_attention_2]`: on a random-init LLaMA-7B and Qwen2.5-7B shape (bf16, LoRA
  r=8 on every linear layer), one optimizer step's loss with finetune.py's batch layout (packed rows under sdpa; one
  flattened row with cu_seq_lens under FlashAttention-2) equals the rows run one by one, then a few optimizer steps
  train (finite, falling loss); peak memory;
- `gradient_checkpointing[<shape>]`: the same step with activation recomputation: the same loss, less peak memory;
- `benchmark[<shape>]`: benchmarks/gpu.py's throughput / memory / utilisation figures, original layout vs packed;
- `precision`: `--precision auto` picks bf16 only where the GPU computes it natively; without native bf16,
  `--precision bf16` is refused with one line; an fp16 finetune.py run trains (loss scaling);
- `qlora_4bit`, `lora_8bit`: finetune.py steps on a quantized base (bitsandbytes), peak memory;
- `resume`: finetune.py (gradient checkpointing) for 4 steps, and again resumed from checkpoint-2: the same adapter;
- `device_map_auto`: infer.py with `--device_map auto` answers as without it;
- `export_bf16`: export_hf_checkpoint.py merges the adapter into the bf16 base and saves it (the merge check passes).

The script-driven checks (precision, quantized, resume, device_map, export) run the project's scripts in this
process on a LLaMA-1B shape saved to a temporary folder (`--disk_shape llama-7b` for the full size: ~13 GB written and
read several times, several minutes more), with the tiny base's tokenizer (`python -m utils.tiny_base`, built once).

It writes one JSON report (`--output`, default benchmarks/results/gpu-check-<date>.json) and exits 1 when any check
failed. A check whose library or hardware is missing here is "unavailable" (exit 1 with `--strict`); under
`--dry_run` a check that needs CUDA, bitsandbytes or flash-attn is reported "needs a GPU", never passed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
import unittest.mock
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_flags import StrictParser  # noqa: E402

FULL_SHAPES = ("llama-7b", "qwen2.5-7b")
DRY_SHAPES = ("tiny", "tiny-qwen2")


def build_parser() -> StrictParser:
    parser = StrictParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry_run", action="store_true", help="the whole plan on CPU at tiny shapes, fp32")
    parser.add_argument("--shapes", default="", help=f"in-memory shapes (default {','.join(FULL_SHAPES)})")
    parser.add_argument("--disk_shape", default="", help="the shape the scripts train (default llama-1b; tiny dry)")
    parser.add_argument("--tokenizer_from", default="", help="a tiny base folder whose tokenizer to use "
                                                             "(default: build one with utils.tiny_base)")
    parser.add_argument("--benchmark_rows", type=int, default=0, help="synthetic rows for the benchmark")
    parser.add_argument("--benchmark_steps", type=int, default=0, help="timed steps per benchmark layout")
    parser.add_argument("--output", default="", help="the JSON report (default benchmarks/results/...)")
    parser.add_argument("--workdir", default="", help="where models and runs go (default: a temporary folder)")
    parser.add_argument("--strict", action="store_true", help="a check unavailable here fails the run too")
    return parser


if __name__ == "__main__":
    build_parser().parse_args()  # a mistyped flag is answered before the torch import below (13-16 s)

import gpu as bench  # noqa: E402  benchmarks/gpu.py
import torch  # noqa: E402

from utils.data import IGNORE_INDEX  # noqa: E402
from utils.training.batching import plan_batching  # noqa: E402

PASSED, FAILED, NEEDS_GPU, UNAVAILABLE = "passed", "failed", "needs a GPU", "unavailable"


class CheckFailed(AssertionError):
    """A check ran and found something wrong."""


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


# --- what this machine has ----------------------------------------------------------------------------------------


def has_cuda() -> bool:
    return torch.cuda.is_available()


def one_gpu(environ: dict[str, str]) -> str | None:
    """The GPU the checks run on, made the only visible one (before CUDA starts): the project's scripts run in this
    process, and finetune.py refuses one process driving several GPUs (use torchrun for those). None: no change."""
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and "," not in visible:
        return None  # already one GPU (or none)
    first = (visible or "0").split(",")[0].strip()
    environ["CUDA_VISIBLE_DEVICES"] = first
    return first


def has_flash_attention() -> bool:
    from transformers.utils import is_flash_attn_2_available

    return has_cuda() and is_flash_attn_2_available()


def has_bitsandbytes() -> bool:
    import importlib.util

    return has_cuda() and importlib.util.find_spec("bitsandbytes") is not None


REQUIREMENTS: dict[str, tuple[Callable[[], bool], str]] = {
    "cuda": (has_cuda, "no CUDA GPU on this machine"),
    "flash_attn": (has_flash_attention,
                   "flash-attn is not installed for this GPU (pip install flash-attn --no-build-isolation)"),
    "bitsandbytes": (has_bitsandbytes, "bitsandbytes is not installed (pip install -r requirements-gpu.txt)"),
}


def peak_memory_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if has_cuda() else None


def reset_memory() -> None:
    gc.collect()
    if has_cuda():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# --- the report ---------------------------------------------------------------------------------------------------


class Report:
    """Runs checks one by one, each isolated, and collects their results."""

    def __init__(self, dry_run: bool) -> None:
        self.dry_run = dry_run
        self.checks: list[dict[str, Any]] = []

    def run(self, name: str, check: Callable[[], dict[str, Any] | None], needs: tuple[str, ...] = ()) -> bool:
        missing = [need for need in needs if not REQUIREMENTS[need][0]()]
        entry: dict[str, Any] = {"name": name, "needs": list(needs)}
        started = time.perf_counter()
        if missing and self.dry_run:
            entry.update(status=NEEDS_GPU, reason="; ".join(REQUIREMENTS[m][1] for m in missing))
        elif missing:
            entry.update(status=UNAVAILABLE, reason="; ".join(REQUIREMENTS[m][1] for m in missing))
        else:
            reset_memory()
            try:
                entry.update(status=PASSED, details=check() or {})
            except Exception as error:  # noqa: BLE001  one failing check must not stop the others
                entry.update(status=FAILED, error=f"{type(error).__name__}: {error}"[:2000],
                             traceback=traceback.format_exc()[-4000:])
            finally:
                reset_memory()
        entry["seconds"] = round(time.perf_counter() - started, 1)
        self.checks.append(entry)
        print(f"[{entry['status']}] {name} ({entry['seconds']} s)"
              + (f": {entry.get('error') or entry.get('reason')}" if entry["status"] != PASSED else ""), flush=True)
        return entry["status"] == PASSED

    def failed(self, strict: bool) -> list[str]:
        bad = (FAILED, UNAVAILABLE) if strict else (FAILED,)
        return [c["name"] for c in self.checks if c["status"] in bad]


# --- in-memory checks on the 7B shapes ----------------------------------------------------------------------------


def synthetic_features(count: int, vocab: int, seed: int = 1) -> list[dict[str, list[int]]]:
    return bench.synthetic_rows(count, vocab, seed)


def step_loss_separate(model: Any, features: list[dict], device: str) -> tuple[float, int]:
    """The sum of every row's token losses, rows run alone, over the label-token count."""
    total, count = 0.0, 0
    for feature in features:
        ids = torch.tensor([feature["input_ids"]], device=device)
        labels = torch.tensor([feature["labels"]], device=device)
        total += model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(1, device=device)).loss.item()
        count += int((labels[:, 1:] != IGNORE_INDEX).sum())
    return total / count, count


def to_device(batch: dict[str, Any], device: str) -> dict[str, Any]:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def packed_micro_batches(model: Any, features: list[dict]) -> tuple[Any, list[list[int]], list[dict[str, Any]]]:
    """finetune.py's layout for one optimizer step of these rows (4 micro-batches): (plan, rows, batches)."""
    lengths = [len(f["input_ids"]) for f in features]
    plan = plan_batching(model, lengths, pad_token_id=0, batch_size=len(features), micro_batch_size=4,
                         cutoff_len=max(lengths), pack_len=1024)
    groups = list(plan.sampler(lengths))
    return plan, groups, [plan.collator([features[i] for i in rows]) for rows in groups]


def sequence_spans(plan: Any, rows: list[int], lengths: list[int], batch: dict[str, Any]) -> list[tuple[int, int, int]]:
    """(feature index, batch row, start) of every sequence in a collated micro-batch."""
    from utils.training.batching import first_fit_decreasing

    if plan.varlen:  # one row, the sequences in order, cut at cu_seq_lens
        return [(index, 0, start) for index, start in zip(rows, batch["cu_seq_lens_q"].tolist(), strict=False)]
    spans = []
    for row, members in enumerate(first_fit_decreasing([lengths[i] for i in rows], plan.pack_len)):
        start = 0
        for member in members:
            spans.append((rows[member], row, start))
            start += lengths[rows[member]]
    return spans


def logit_differences(model: Any, plan: Any, groups: list[list[int]], micro: list[dict], features: list[dict],
                      device: str) -> tuple[float, float, float]:
    """(largest |logit| difference between each sequence in its packed micro-batch and run alone, the same when the
    micro-batch's sequences are simply concatenated so that they see each other, the largest |logit|)."""
    lengths = [len(f["input_ids"]) for f in features]
    alone = [model(input_ids=torch.tensor([f["input_ids"]], device=device)).logits[0].float() for f in features]
    packed, leaked = 0.0, 0.0
    for rows, batch in zip(groups, micro, strict=True):
        plain = {k: v for k, v in batch.items() if k not in ("labels", "shift_labels", "logits_to_keep")}
        logits = model(**to_device(plain, device)).logits.float()
        for index, row, start in sequence_spans(plan, rows, lengths, batch):
            window = logits[row, start:start + lengths[index]]
            packed = max(packed, (window - alone[index]).abs().max().item())
        joined = torch.tensor([[t for i in rows for t in features[i]["input_ids"]]], device=device)
        mixed, offset = model(input_ids=joined).logits[0].float(), lengths[rows[0]]
        for index in rows[1:]:  # every sequence after the first sees the ones before it
            leaked = max(leaked, (mixed[offset:offset + lengths[index]] - alone[index]).abs().max().item())
            offset += lengths[index]
    return packed, leaked, max(a.abs().max().item() for a in alone)


def packed_training(model: Any, shape: str, attention: str, device: str, dtype: torch.dtype) -> dict[str, Any]:
    from utils.compat import attention_implementation

    expect(attention_implementation(model) == attention, f"the model runs {attention_implementation(model)}")
    features = synthetic_features(16, bench.SHAPES[shape]["vocab_size"])
    plan, groups, micro = packed_micro_batches(model, features)
    expect(plan.mode == "pack", f"batching mode {plan.mode}, expected pack")
    expect(plan.varlen == attention.startswith("flash"), f"varlen {plan.varlen} under {attention}")
    model.eval()
    with torch.no_grad():
        separate, count = step_loss_separate(model, features, device)
        packed = sum(model(**to_device(b, device), num_items_in_batch=torch.tensor(count, device=device)).loss.item()
                     for b in micro)
        logit_difference, leak_difference, scale = logit_differences(model, plan, groups, micro, features, device)
    full = dtype == torch.float32
    tolerance = 1e-5 if full else 2e-2  # bf16: kernels of other shapes round differently
    difference = abs(packed - separate) / abs(separate)
    expect(difference <= tolerance, f"packed step loss {packed:.6f} vs rows one by one {separate:.6f} "
                                    f"(relative {difference:.2e} > {tolerance:.0e})")
    expect(logit_difference <= (1e-4 if full else 5e-2) * scale,
           f"packed logits differ from separate ones by {logit_difference:.3e} (largest logit {scale:.3e})")
    expect(logit_difference <= 0.25 * leak_difference,
           f"packed logits differ by {logit_difference:.3e}, sequences that see each other by {leak_difference:.3e}")
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(4):
        loss = 0.0
        for batch in micro:
            step = model(**to_device(batch, device), num_items_in_batch=torch.tensor(count, device=device)).loss
            step.backward()
            loss += step.item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss)
    expect(all(math.isfinite(x) for x in losses), f"non-finite losses {losses}")
    expect(losses[-1] < losses[0], f"the loss does not fall over 4 steps on one batch: {losses}")
    del optimizer
    return {"separate_loss": round(separate, 6), "packed_loss": round(packed, 6), "relative_difference": difference,
            "logit_difference": logit_difference, "leak_difference": leak_difference, "largest_logit": scale,
            "micro_batches": len(micro), "layout": plan.describe(), "train_losses": [round(x, 5) for x in losses],
            "peak_gib": peak_memory_gib()}


def gradient_checkpointing(model: Any, shape: str, device: str) -> dict[str, Any]:
    """One training step without, then with activation recomputation: the same loss, less peak memory (no dropout:
    LoRA dropout is 0 and the configs' attention dropout too, so both passes compute the same)."""
    features = synthetic_features(16, bench.SHAPES[shape]["vocab_size"], seed=2)
    _, _, micro = packed_micro_batches(model, features)
    count = sum(int((b["shift_labels"] if "shift_labels" in b else b["labels"][:, 1:]).ne(IGNORE_INDEX).sum())
                for b in micro)
    model.train()  # checkpointing recomputes only in training mode

    def one_step() -> tuple[float, float | None]:
        reset_memory()
        total = 0.0
        for batch in micro:
            loss = model(**to_device(batch, device), num_items_in_batch=torch.tensor(count, device=device)).loss
            loss.backward()
            total += loss.item()
        model.zero_grad(set_to_none=True)
        return total, peak_memory_gib()

    plain_loss, plain_peak = one_step()
    bench.enable_gradient_checkpointing(model)
    recomputed_loss, recomputed_peak = one_step()
    expect(abs(recomputed_loss - plain_loss) <= 1e-3 * abs(plain_loss),
           f"loss {recomputed_loss} with checkpointing vs {plain_loss} without")
    if plain_peak is not None:
        expect(recomputed_peak < plain_peak, f"peak {recomputed_peak} GiB with checkpointing vs {plain_peak} GiB")
    return {"loss": plain_loss, "peak_gib_without": plain_peak, "peak_gib_with": recomputed_peak}


def benchmark(built: tuple[Any, int], shape: str, args: argparse.Namespace, device: str, dtype: torch.dtype,
              peak_flops: float, attention: str) -> dict[str, Any]:
    options = argparse.Namespace(rows=args.benchmark_rows, steps=args.benchmark_steps, warmup=1 if args.dry_run else 2,
                                 micro_batch_tokens=4096 if not args.dry_run else 512, gradient_checkpointing=True,
                                 attn_implementation=attention)
    lines = [bench.benchmark(shape, layout, options, device, dtype, peak_flops, built=built)
             for layout in ("cutoff256", "packed2048")]
    for line in lines:
        expect(line["tokens_per_s"] > 0 and math.isfinite(line["utilization"]), f"benchmark line {line}")
    return {"lines": lines, "speedup": round(lines[1]["tokens_per_s"] / lines[0]["tokens_per_s"], 2)}


def shape_checks(report: Report, shape: str, args: argparse.Namespace, device: str, dtype: torch.dtype,
                 peak_flops: float) -> None:
    built: list[Any] = []

    def build() -> dict[str, Any]:
        model, n_params = bench.build_model(shape, device, dtype, gradient_checkpointing=False,
                                            attn_implementation="sdpa", lora_dropout=0.0)
        built[:] = [model, n_params]
        return {"parameters": n_params, "peak_gib": peak_memory_gib()}

    if not report.run(f"build[{shape}]", build):
        return
    model, n_params = built
    report.run(f"packed_training[{shape}, sdpa]", lambda: packed_training(model, shape, "sdpa", device, dtype))

    def flash() -> dict[str, Any]:
        model.get_base_model().set_attn_implementation("flash_attention_2")
        try:
            return packed_training(model, shape, "flash_attention_2", device, dtype)
        finally:
            model.get_base_model().set_attn_implementation("sdpa")

    report.run(f"packed_training[{shape}, flash_attention_2]", flash, needs=("cuda", "flash_attn"))
    report.run(f"gradient_checkpointing[{shape}]", lambda: gradient_checkpointing(model, shape, device))
    attention = "flash_attention_2" if has_flash_attention() else "sdpa"

    def run_benchmark() -> dict[str, Any]:
        model.get_base_model().set_attn_implementation(attention)
        return benchmark((model, n_params), shape, args, device, dtype, peak_flops, attention)

    report.run(f"benchmark[{shape}, {attention}]", run_benchmark)
    built.clear()  # the closures above go with this call: the model is freed before the next shape


# --- the project's scripts on a model saved to disk ---------------------------------------------------------------


def cli(main: Callable[..., Any], *argv: str) -> tuple[int, str, str]:
    """`python script.py argv...` in this process: (exit code, stdout, stderr)."""
    from utils.core.cli import run_in_process

    outcome = run_in_process(main, *argv)
    return outcome.returncode, outcome.stdout, outcome.stderr


def succeeded(result: tuple[int, str, str], what: str) -> str:
    code, out, err = result
    expect(code == 0, f"{what} exited {code}: {(err or out)[-1500:]}")
    return out


class Workspace:
    """A base model of `shape` saved to disk (bf16 on a GPU) with the tiny base's tokenizer, and training data."""

    def __init__(self, root: Path, shape: str, dtype: torch.dtype, device: str, tokenizer_from: str) -> None:
        self.root, self.shape, self.dtype, self.device = root, shape, dtype, device
        self.tokenizer_from = tokenizer_from
        self.base = root / f"base-{shape}"
        self.data = root / "rows.jsonl"
        self.adapter: Path | None = None

    def build(self) -> dict[str, Any]:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer_dir = Path(self.tokenizer_from) if self.tokenizer_from else self.root / "tiny-llama"
        if not self.tokenizer_from:
            from utils.tiny_base import build

            build(arch="llama", output_dir=str(tokenizer_dir), pretrain_steps=0)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        config = bench.base_config(self.shape)
        config.update({"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                       "pad_token_id": tokenizer.pad_token_id,
                       "vocab_size": max(config.vocab_size, len(tokenizer))})
        torch.manual_seed(0)
        with torch.device(self.device):  # saved in bf16, as Qwen2.5 / Llama-3 ship (export_bf16 merges into it)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(self.base)
        tokenizer.save_pretrained(self.base)
        rows = [json.loads(line) for line in (REPO / "data" / "infer.json").read_text(encoding="utf-8").splitlines()
                if line.strip()]
        self.data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in (rows * 3)[:64]),
                             encoding="utf-8")
        return {"base": str(self.base), "parameters": sum(p.numel() for p in model.parameters()),
                "tokenizer": str(tokenizer_dir)}

    def finetune(self, output_dir: Path, *extra: str) -> tuple[int, str, str]:
        import finetune

        return cli(finetune.main, "--base_model", str(self.base), "--data_path", str(self.data), "--output_dir",
                   str(output_dir), "--batch_size", "16", "--micro_batch_size", "4", "--cutoff_len", "256",
                   "--val_set_size", "0", "--learning_rate", "1e-3", "--logging_steps", "1", "--lora_dropout", "0",
                   "--warmup_steps", "0", *extra)


def adapter_difference(a: Path, b: Path) -> tuple[float, float]:
    from safetensors.torch import load_file

    first, second = (load_file(str(folder / "adapter_model.safetensors")) for folder in (a, b))
    expect(first.keys() == second.keys(), "the two adapters hold different tensors")
    return (max((first[k].float() - second[k].float()).abs().max().item() for k in first),
            max(first[k].float().abs().max().item() for k in first))


def script_checks(report: Report, space: Workspace, precision: str) -> None:
    import export_hf_checkpoint
    import infer

    if not report.run(f"save_base[{space.shape}]", space.build):
        return

    def check_precision() -> dict[str, Any]:
        from utils.core.errors import UserError
        from utils.runtime import native_bf16, resolve_precision

        native = native_bf16("cuda")
        auto = resolve_precision("auto", "cuda")
        expect(auto == ("bf16" if native else "fp16"), f"--precision auto picked {auto} (native bf16: {native})")
        details: dict[str, Any] = {"native_bf16": native, "auto": auto,
                                   "capability": list(torch.cuda.get_device_capability())}
        if native:  # bf16 must be accepted here, and the refusal is shown on an emulated device without it
            try:
                resolve_precision("bf16", "cuda")
            except UserError as error:
                raise CheckFailed(f"bf16 refused on a GPU with native bf16: {error}") from None
        without_native = contextlib.nullcontext() if not native else unittest.mock.patch.object(
            torch.cuda, "is_bf16_supported", lambda including_emulation=True: bool(including_emulation))
        with without_native:  # on a native-bf16 GPU only the device's answer is emulated; finetune.py runs for real
            code, _, err = space.finetune(space.root / "bf16-refused", "--precision", "bf16", "--max_steps", "1")
        expect(code == 2 and len(err.strip().splitlines()) == 1 and "not supported natively" in err,
               f"--precision bf16 without native bf16: exit {code}, {err[-500:]}")
        details["bf16_refused"] = err.strip() + (" (device without native bf16 emulated)" if native else "")
        out = succeeded(space.finetune(space.root / "fp16", "--precision", "fp16", "--max_steps", "2"), "fp16 run")
        details["fp16_summary"] = json.loads(out.split("summary: ", 1)[1].splitlines()[0])
        return details

    report.run("precision", check_precision, needs=("cuda",))

    def quantized(flag: str) -> Callable[[], dict[str, Any]]:
        def run() -> dict[str, Any]:
            out = succeeded(space.finetune(space.root / flag.strip("-"), flag, "True", "--gradient_checkpointing",
                                           "True", "--max_steps", "2", "--precision", precision), f"{flag} run")
            summary = json.loads(out.split("summary: ", 1)[1].splitlines()[0])
            expect(math.isfinite(summary["train_loss"]), f"train loss {summary['train_loss']}")
            return {"summary": summary, "peak_gib": peak_memory_gib()}
        return run

    report.run("qlora_4bit", quantized("--load_4bit"), needs=("cuda", "bitsandbytes"))
    report.run("lora_8bit", quantized("--load_8bit"), needs=("cuda", "bitsandbytes"))

    def resume() -> dict[str, Any]:
        whole, resumed = space.root / "whole", space.root / "resumed"
        flags = ("--max_steps", "4", "--save_steps", "2", "--gradient_checkpointing", "True", "--precision", precision)
        succeeded(space.finetune(whole, *flags), "the uninterrupted run")
        import shutil

        resumed.mkdir(parents=True, exist_ok=True)
        shutil.copytree(whole / "checkpoint-2", resumed / "checkpoint-2")
        succeeded(space.finetune(resumed, *flags, "--resume_from_checkpoint", "True"), "the resumed run")
        difference, scale = adapter_difference(whole, resumed)
        tolerance = 1e-6 if space.device == "cpu" else 1e-2  # GPU attention backward kernels are not bitwise
        expect(difference <= 1e-7 + tolerance * scale, f"resumed adapter differs by {difference:.2e} "
                                                       f"(largest weight {scale:.2e})")
        space.adapter = whole
        return {"max_difference": difference, "largest_weight": scale, "peak_gib": peak_memory_gib()}

    report.run("resume", resume)

    def device_map_auto() -> dict[str, Any]:
        expect(space.adapter is not None, "no adapter: the resume check failed")
        answers = []
        for extra in ((), ("--device_map", "auto")):
            output = space.root / f"answers{len(extra)}.jsonl"
            succeeded(cli(infer.main, "--base_model", str(space.base), "--lora_weights", str(space.adapter),
                          "--instruct_dir", str(REPO / "data" / "infer.json"), "--max_new_tokens", "16",
                          "--num_beams", "1", "--output_file", str(output), *extra), f"infer.py {' '.join(extra)}")
            answers.append([json.loads(line)["model_output"] for line in output.read_text(encoding="utf-8")
                            .splitlines()])
        same = sum(a == b for a, b in zip(*answers, strict=True))
        expect(same == len(answers[0]), f"{len(answers[0]) - same} of {len(answers[0])} answers differ under "
                                        "--device_map auto")
        return {"answers": len(answers[0]), "identical": same, "gpus": torch.cuda.device_count()}

    report.run("device_map_auto", device_map_auto)

    def export() -> dict[str, Any]:
        expect(space.adapter is not None, "no adapter: the resume check failed")
        out = succeeded(cli(export_hf_checkpoint.main, "--base_model", str(space.base), "--lora_weights",
                            str(space.adapter), "--output_dir", str(space.root / "merged")), "export")
        line = next(line for line in out.splitlines() if line.startswith("merge check"))
        return {"merge_check": line, "base_dtype": "bfloat16"}

    report.run("export_bf16", export)


# --- main ---------------------------------------------------------------------------------------------------------


def environment(dry_run: bool) -> dict[str, Any]:
    import accelerate
    import peft
    import transformers

    details: dict[str, Any] = {
        "dry_run": dry_run, "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "peft": peft.__version__, "accelerate": accelerate.__version__,
        "cuda": torch.version.cuda, "gpus": torch.cuda.device_count() if has_cuda() else 0,
        "flash_attn": has_flash_attention(), "bitsandbytes": has_bitsandbytes(),
    }
    if has_cuda():
        details.update(device=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
                       memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
                       native_bf16=torch.cuda.is_bf16_supported(including_emulation=False))
    else:
        details.update(device=f"cpu ({torch.get_num_threads()} threads)")
    return details


def default_output(dry_run: bool) -> Path:
    date = datetime.date.today().isoformat()
    return REPO / "benchmarks" / "results" / f"gpu-check{'-dry-run' if dry_run else ''}-{date}.json"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    chosen = None if args.dry_run else one_gpu(os.environ)  # before anything asks CUDA how many GPUs there are
    if chosen is not None:
        print(f"gpu_check runs on one GPU: CUDA_VISIBLE_DEVICES={chosen}", file=sys.stderr)
    if not args.dry_run and not has_cuda():
        print("error: no CUDA GPU here; `python benchmarks/gpu_check.py --dry_run` runs the plan on CPU",
              file=sys.stderr)
        return 2
    device, dtype = ("cpu", torch.float32) if args.dry_run else ("cuda", torch.bfloat16)
    threads = torch.get_num_threads()
    if args.dry_run:  # code paths, not speed: one thread never fights a busy machine's other work (OpenMP spinning)
        torch.set_num_threads(1)
    try:
        return run_plan(args, device, dtype)
    finally:
        torch.set_num_threads(threads)


def run_plan(args: argparse.Namespace, device: str, dtype: torch.dtype) -> int:
    """Every check in order; the JSON report; 1 when a check failed."""
    shapes = args.shapes.split(",") if args.shapes else list(DRY_SHAPES if args.dry_run else FULL_SHAPES)
    args.benchmark_rows = args.benchmark_rows or (64 if args.dry_run else 512)
    args.benchmark_steps = args.benchmark_steps or (1 if args.dry_run else 5)
    report = Report(args.dry_run)
    started = time.perf_counter()
    report.run("environment", lambda: environment(args.dry_run))
    peak_flops = bench.matmul_flops(device, dtype, 256 if args.dry_run else 8192, 3 if args.dry_run else 50)
    for shape in shapes:
        shape_checks(report, shape, args, device, dtype, peak_flops)
    with tempfile.TemporaryDirectory(dir=args.workdir or None) as workdir:
        space = Workspace(Path(workdir), args.disk_shape or ("tiny" if args.dry_run else "llama-1b"), dtype, device,
                          args.tokenizer_from)
        script_checks(report, space, "fp32" if args.dry_run else "bf16")
    failed = report.failed(args.strict)
    summary = {"when": datetime.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv),
               "seconds": round(time.perf_counter() - started, 1), "failed": failed,
               "counts": {s: sum(c["status"] == s for c in report.checks)
                          for s in (PASSED, FAILED, NEEDS_GPU, UNAVAILABLE)},
               "checks": report.checks}
    output = Path(args.output) if args.output else default_output(args.dry_run)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(summary, indent=1, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    print(f"{len(report.checks)} checks in {summary['seconds']} s: {summary['counts']}; report: {output}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
