"""LoRA instruction-tuning of a causal LM on medical instruction data (BenTsao / HuaTuo).

    python finetune.py --base_model models/tiny-llama --data_path data/llama_data.json --output_dir lora-med

The data is JSON Lines or a JSON array of {instruction, input, output}; the prompt comes from
`templates/<prompt_template_name>.json`. The adapter (adapter_config.json + adapter_model.safetensors), the
tokenizer and bentsao_training.json (what it was trained with) land in --output_dir.

The recipe, top to bottom: validate_args -> resolve -> check_launch -> read_data -> load_tokenizer -> prepare_data ->
plan -> load_model -> build_trainer -> train -> finish. Every check that needs no weights runs before any weights
load, and the Trainer's arguments exist before the weights load, so DeepSpeed ZeRO-3 partitions them while they load
and FSDP reads them on rank 0 only (utils/training/engines.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from utils.core.cli import dataclass_flags, run_cli
from utils.core.errors import UserError, raise_problems
from utils.core.io import RunLock, check_output_dir, publish_files, write_failure
from utils.data import load_instruction_dataset, tokenize_dataset
from utils.model.checks import check_attention, preflight_model
from utils.model.loading import gguf_path, load_checked, load_checked_tokenizer, resolve_lora_targets
from utils.prompter import Prompter
from utils.runtime import is_main_process, log, world_size
from utils.training import checkpoints, results, setup
from utils.training.args import DEFAULTS, FinetuneArgs
from utils.training.batching import BatchingPlan, check_batching_args, micro_batches_per_step, plan_batching
from utils.training.engines import (
    check_deepspeed_config,
    check_one_process_per_gpu,
    cpu_engine_note,
    gathered_state_dict,
    materialize_trainable,
    weights_placement,
)


@dataclass
class Run:
    """What the flags resolve to on this machine."""

    device: str
    precision: str
    processes: int
    prompter: Prompter
    checkpoint: Path | None
    reporters: list[str]
    notes: list[str] = field(default_factory=list)


def validate_args(args: FinetuneArgs) -> None:
    """Collect every problem with the options into one error, before anything heavy runs."""
    if is_main_process():  # rank 0 alone takes the lock (main), so a slower rank must not find it taken
        run_lock(args).check_free()  # another run is writing into --output_dir: that is the one thing to say
    problems = []
    if not args.base_model:
        problems.append("--base_model is required (e.g. `python -m utils.tiny_base --output_dir models/tiny-llama`)")
    if not args.data_path:
        problems.append("--data_path is required")
    if not args.output_dir:
        problems.append("--output_dir is required: the folder for checkpoints and the adapter")
    problems += setup.batch_size_problems(args.batch_size, args.micro_batch_size, world_size())
    if args.load_8bit and args.load_4bit:
        problems.append("--load_8bit and --load_4bit exclude each other: choose one")
    def output_dir() -> None:  # what an earlier run left there is looked at only in a usable folder
        check_output_dir(args.output_dir, "--output_dir", protected={"the base model": args.base_model})
        setup.check_restart(args.output_dir, args.resume_from_checkpoint not in (None, False, ""), args.overwrite)

    for check in (
        lambda: check_batching_args(args.pack_len, args.cutoff_len, args.micro_batch_tokens),
        output_dir,
        lambda: args.deepspeed and check_deepspeed_config(args.deepspeed, args.batch_size, args.micro_batch_size),
    ):
        try:
            check()
        except UserError as error:
            problems.append(str(error))
    raise_problems(problems)


def run_lock(args: FinetuneArgs) -> RunLock:
    """One run at a time per --output_dir: two runs into one folder would interleave checkpoints and overwrite each
    other's adapter."""
    return RunLock(Path(args.output_dir) / ".bentsao.lock", f"--output_dir {args.output_dir}")


def resolve(args: FinetuneArgs) -> Run:
    """The device, precision, template, checkpoint and loggers: every model-side check that needs no weights."""
    prompter = Prompter(args.prompt_template_name)
    checkpoint = checkpoints.resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)
    device, precision = preflight_model(args.base_model, str(checkpoint) if checkpoint else None,
                                        precision=args.precision, load_8bit=args.load_8bit, load_4bit=args.load_4bit,
                                        trust_remote_code=args.trust_remote_code)
    notes = []
    if checkpoint is not None:
        note = checkpoints.check_resumable(checkpoint, world_size(), args.resume_weights_only)
        notes += [note] if note else []
    check_attention(args.attn_implementation, device)
    loggers = setup.reporters(args.wandb_project, args.wandb_watch, args.wandb_log_model, args.report_to)
    notes += [cpu_engine_note(device)] if cpu_engine_note(device) else []
    return Run(device, precision, world_size(), prompter, checkpoint, loggers, notes)


def read_data(args: FinetuneArgs) -> tuple[Any, int]:
    """The rows (every problem in the file reported before any weights load) and the validation size."""
    dataset = load_instruction_dataset(args.data_path)
    if not any(output.strip() for output in dataset["output"]):
        raise UserError(f"{args.data_path}: every row's `output` is empty, so there is nothing to learn")
    return dataset, setup.resolve_val_size(args.val_set_size, len(dataset))


def prepare_data(args: FinetuneArgs, run: Run, dataset: Any, val_size: int, tokenizer: Any,
                 ) -> tuple[Any, Any, dict[str, Any]]:
    """Split and tokenise the rows: (training set, validation set or None, report)."""
    if val_size:
        split = dataset.train_test_split(test_size=val_size, shuffle=True, seed=args.seed)
        train_rows, val_rows = split["train"], split["test"]
    else:
        train_rows, val_rows = dataset, None
    train_data, report = tokenize_dataset(train_rows, run.prompter, tokenizer, args.cutoff_len, args.train_on_inputs,
                                          "training")
    val_data = None
    if val_rows is not None:
        val_data, _ = tokenize_dataset(val_rows, run.prompter, tokenizer, args.cutoff_len, args.train_on_inputs,
                                       "validation")
        val_data = val_data if len(val_data) else None
    report["validation_rows"] = len(val_data) if val_data is not None else 0
    empty = f", {report['empty_outputs']} with an empty output" if report["empty_outputs"] else ""
    log(f"data: {report['rows']} training rows ({report['truncated']} cut at --cutoff_len {args.cutoff_len}, "
        f"{report['dropped_no_target']} dropped: prompt fills cutoff_len{empty}), "
        f"{report['validation_rows']} validation rows")
    return train_data, val_data, report


def check_launch(run: Run) -> None:
    """One process per GPU: `python finetune.py` with several GPUs visible is refused (nn.DataParallel would split
    the packed batches wrongly); torchrun / accelerate launch start one process per GPU."""
    visible = torch.cuda.device_count() if run.device == "cuda" else 0
    check_one_process_per_gpu(run.device, visible, launched="LOCAL_RANK" in os.environ)


def load_tokenizer(args: FinetuneArgs) -> Any:
    """The base model's tokenizer, checked against its config.json: the data is tokenised before the weights load."""
    return load_checked_tokenizer(args.base_model, trust_remote_code=args.trust_remote_code)


def plan(args: FinetuneArgs, run: Run, train_data: Any, val_data: Any) -> Any:
    """The Trainer's arguments: steps, schedule, precision, saving, logging, and the engine (DDP, DeepSpeed, FSDP).

    Built before the weights load: `TrainingArguments(deepspeed=...)` registers the DeepSpeed config that makes
    `from_pretrained` partition a ZeRO-3 model while it loads, and sets up the process group FSDP loading needs.
    Keep the returned object alive while the model loads (transformers holds the DeepSpeed config weakly).
    """
    lengths = [len(ids) for ids in train_data["input_ids"]]
    accumulation = micro_batches_per_step(lengths, args.batch_size, args.micro_batch_size, run.processes,
                                          packing=args.packing, micro_batch_tokens=args.micro_batch_tokens)
    steps = setup.total_steps(len(train_data), args.batch_size, args.num_epochs, args.max_steps)
    if run.checkpoint is not None:
        setup.check_not_complete(run.checkpoint, steps)
    return setup.training_arguments(args, run.device, run.precision, run.processes, run.reporters, accumulation,
                                    steps, has_validation=val_data is not None)


def load_model(args: FinetuneArgs, run: Run, tokenizer: Any) -> tuple[Any, Any]:
    """(the LoRA-wrapped model, the LoRA targets), the weights placed for the engine (`weights_placement`)."""
    device_map = weights_placement(run.device, run.processes)
    model, tokenizer = load_checked(
        args.base_model, precision=run.precision, device=run.device, load_8bit=args.load_8bit,
        load_4bit=args.load_4bit, trust_remote_code=args.trust_remote_code,
        attn_implementation=args.attn_implementation, device_map=device_map, tokenizer=tokenizer,
    )
    model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
    targets = resolve_lora_targets(model, args.lora_target_modules)
    if run.checkpoint is not None:
        checkpoints.check_same_lora(run.checkpoint, args.lora_r, args.lora_alpha, targets)
    model = setup.build_peft_model(model, targets, args)
    if device_map == "meta":  # FSDP RAM-efficient loading on this rank: rank 0's weights arrive when sharding
        materialize_trainable(model)
    log(f"LoRA targets: {targets}")
    if is_main_process():
        model.print_trainable_parameters()
    return model, targets


def build_trainer(args: FinetuneArgs, run: Run, model: Any, tokenizer: Any, train_data: Any, val_data: Any,
                  training_args: Any) -> tuple[Any, BatchingPlan]:
    """(the Trainer, the batch layout for this model: packed, varlen under FlashAttention, or length buckets)."""
    from transformers import DataCollatorForSeq2Seq, PrinterCallback

    from utils.training.callbacks import DivergenceGuard, GracefulStop, ProgressLines, ReadableCheckpoints
    from utils.training.plotting import LossPlotCallback, run_title
    from utils.training.trainer import SafeTrainer

    batching = plan_batching(
        model, [len(ids) for ids in train_data["input_ids"]], tokenizer.pad_token_id, args.batch_size,
        args.micro_batch_size, args.cutoff_len, run.processes, packing=args.packing, pack_len=args.pack_len,
        micro_batch_tokens=args.micro_batch_tokens, seed=args.seed,
        padded_collator=DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, return_tensors="pt", padding=True),
    )
    assert batching.micro_batches_per_step == training_args.gradient_accumulation_steps  # both from the same rule
    log(batching.describe() + f"; gradient_accumulation_steps: {training_args.gradient_accumulation_steps}")
    trainer = SafeTrainer(
        model=model,
        args=training_args,
        train_dataset=train_data,
        eval_dataset=val_data,
        data_collator=DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, return_tensors="pt", padding=True),
        processing_class=tokenizer,
        batching=batching,  # training batches (utils/training/batching.py); evaluation keeps data_collator
        # the guard last: it withdraws a save that a signal or the schedule asked for
        callbacks=[GracefulStop(), ReadableCheckpoints(), ProgressLines(),
                   LossPlotCallback(args.output_dir, run_title(args)), DivergenceGuard()],
    )
    trainer.remove_callback(PrinterCallback)  # ProgressLines prints readable lines instead
    return trainer, batching


def callback(trainer: Any, kind: type) -> Any:
    return next(c for c in trainer.callback_handler.callbacks if isinstance(c, kind))


def train(trainer: Any, run: Run, args: FinetuneArgs) -> Any:
    """`trainer.train`, resumed when asked; a signal saves and stops, a divergence stops without saving."""
    from utils.training.callbacks import DivergenceGuard, GracefulStop

    stop, guard = callback(trainer, GracefulStop), callback(trainer, DivergenceGuard)
    if args.overwrite and run.checkpoint is None and is_main_process():
        setup.clear_earlier_run(args.output_dir)
    try:
        result = trainer.train(resume_from_checkpoint=str(run.checkpoint) if run.checkpoint else None)
    except pickle.UnpicklingError as error:  # transformers loads checkpoint .pt/.pth files with weights_only=True
        raise UserError(
            f"refusing to resume from {run.checkpoint}: a file in it is a pickle that is not plain weights "
            f"({str(error).strip().splitlines()[0][:200]}); resume only from checkpoints you wrote"
        ) from None
    except Exception as error:
        reason = write_failure(error)  # a full disk while saving a checkpoint (raised by torch, safetensors, ...)
        if reason is None:
            raise
        raise UserError(results.storage_message(args.output_dir, reason, trainer.state.global_step)) from error
    finally:
        stop.restore()  # the signal handlers, also when training raised
    if guard.diverged_step is not None:
        raise UserError(guard.message(args.output_dir, fp16=run.precision == "fp16"))
    if stop.received is not None and trainer.state.global_step < trainer.state.max_steps:
        saved = Path(args.output_dir, f"checkpoint-{trainer.state.global_step}")
        log(f"stopped by {stop.signal_name} at step {trainer.state.global_step} of {trainer.state.max_steps}: "
            f"checkpoint saved to {saved.resolve()}; continue with --resume_from_checkpoint True")
        sys.exit(128 + stop.received)
    return result


def finish(args: FinetuneArgs, trainer: Any, tokenizer: Any, targets: Any, summary: dict[str, Any]) -> None:
    """Check the trained weights, publish the adapter atomically (adapter_config.json last), verify it on disk."""
    from peft import get_peft_model_state_dict

    model = trainer.model
    gathered = gathered_state_dict(trainer)  # ZeRO-3/FSDP: the sharded weights gathered (every rank joins in)
    if not is_main_process():
        return
    lora = get_peft_model_state_dict(model, state_dict=gathered)
    raise_problems(results.adapter_problems(lora))

    def write_adapter(folder: Path) -> None:
        model.save_pretrained(folder, state_dict=gathered)
        tokenizer.save_pretrained(folder)
        setup.write_training_metadata(folder, model, tokenizer, args, targets, summary)

    publish_files(args.output_dir, write_adapter, last=("adapter_config.json",), staging_name=".tmp-adapter")
    from utils.model.checks import check_adapter

    check_adapter(args.output_dir)  # reads the files back: config, finite weights, rank
    log(f"summary: {json.dumps(summary, ensure_ascii=False)}")
    log(f"adapter saved to {Path(args.output_dir).resolve()}")


def print_parameters(args: FinetuneArgs, run: Run, val_size: int) -> None:
    """The resolved parameters, once (main process), as `name: value` lines."""
    resolved = {**vars(args), "val_set_size": val_size, "precision": run.precision, "device": run.device,
                "world_size": run.processes,
                "gradient_accumulation_steps": args.batch_size // (args.micro_batch_size * run.processes),
                "resume_from_checkpoint": run.checkpoint, "report_to": ",".join(run.reporters) or "none"}
    log("Training BenTsao LoRA with:\n" + "\n".join(f"{name}: {value}" for name, value in resolved.items()) + "\n")


@dataclass_flags("args", FinetuneArgs)
def main(args: FinetuneArgs = DEFAULTS) -> str:
    """Train a LoRA adapter; returns the folder it was written to."""
    from transformers import set_seed

    # `--output_dir=~/x` reaches us unexpanded: every stage (the checks, the lock, the Trainer) uses the same folder
    args = replace(args, **{name: str(Path(value).expanduser()) for name, value in
                            (("output_dir", args.output_dir), ("data_path", args.data_path)) if value})
    args = replace(args, base_model=gguf_path(args.base_model, args.gguf_file), gguf_file="")
    validate_args(args)
    run = resolve(args)
    check_launch(run)
    dataset, val_size = read_data(args)
    with run_lock(args) if is_main_process() else contextlib.nullcontext():
        if is_main_process():  # another run may have finished into --output_dir since validate_args looked
            setup.check_restart(args.output_dir, run.checkpoint is not None, args.overwrite)
        print_parameters(args, run, val_size)
        for note in run.notes:
            log(note)
        tokenizer = load_tokenizer(args)
        train_data, val_data, report = prepare_data(args, run, dataset, val_size, tokenizer)
        training_args = plan(args, run, train_data, val_data)  # the engine is live before the weights load
        set_seed(args.seed)
        model, targets = load_model(args, run, tokenizer)
        trainer, batching = build_trainer(args, run, model, tokenizer, train_data, val_data, training_args)
        started = time.time()
        result = train(trainer, run, args)
        summary = results.run_summary(trainer, result, report, batching, val_data, started)
        finish(args, trainer, tokenizer, targets, summary)
    return args.output_dir


if __name__ == "__main__":
    run_cli(main)
