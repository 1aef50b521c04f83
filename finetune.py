"""LoRA instruction-tuning of a causal LM on medical instruction data (BenTsao / HuaTuo).

    python finetune.py --base_model models/tiny-llama --data_path data/llama_data.json --output_dir lora-med

The data is JSON Lines or a JSON array of {instruction, input, output}; the prompt comes from
`templates/<prompt_template_name>.json`. The adapter (adapter_config.json + adapter_model.safetensors), the
tokenizer and bentsao_training.json (what it was trained with) land in --output_dir.

The recipe, top to bottom: validate -> (under the run lock) resolve -> check_launch -> read_data -> load_tokenizer ->
prepare_data -> plan -> load_model -> build_trainer -> train -> finish. Every check that needs no weights runs before
any weights load, and the Trainer's arguments exist before the weights load, so DeepSpeed ZeRO-3 partitions them
while they load and FSDP reads them on rank 0 only (utils/training/engines.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from utils.core.cli import run_cli
from utils.core.errors import UserError, first_line, raise_problems, storage_failure
from utils.core.io import RunLock, file_problems, output_dir_problems, publish_files
from utils.data import load_instruction_dataset, tokenize_dataset
from utils.model.checks import ADAPTER_WEIGHTS, check_loaded_adapter, quantization_problems
from utils.model.loading import load_base_model, load_tokenizer, resolve_lora_targets
from utils.model.source import source_problems
from utils.prompter import Prompter, template_problems
from utils.runtime import (
    is_main_process,
    log,
    precision_problems,
    resolve_device,
    resolve_precision,
    use_idle_cores,
    world_size,
)
from utils.training import checkpoints, results, setup
from utils.training.args import FinetuneArgs
from utils.training.batching import BatchingPlan, batching_problems, micro_batches_per_step, plan_batching
from utils.training.callbacks import DivergenceGuard, GracefulStop, ProgressLines, ReadableCheckpoints
from utils.training.engines import (
    check_one_process_per_gpu,
    cpu_engine_note,
    engine_problems,
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
    resume_from: Path | None  # the checkpoint, or with --resume_weights_only a view of it without its broken state
    reporters: list[str]
    notes: list[str] = field(default_factory=list)


def validate(args: FinetuneArgs) -> list[str]:
    """Every problem with the options, before anything heavy runs. What an earlier run left in --output_dir is looked
    at in `main`, once the run lock is held (a run finishing into the folder meanwhile cannot slip past)."""
    problems = [f"--{name} is required" for name in ("base_model", "data_path", "output_dir")
                if not getattr(args, name)]
    problems += setup.batch_size_problems(args.batch_size, args.micro_batch_size, world_size())
    problems += batching_problems(args.pack_len, args.cutoff_len, args.micro_batch_tokens)
    problems += precision_problems(args.precision, resolve_device()) + quantization_problems(args.load_8bit,
                                                                                              args.load_4bit)
    problems += setup.option_problems(args.val_set_size, args.report_to)
    problems += file_problems(args.data_path, "--data_path") if args.data_path else []
    problems += engine_problems(args) + template_problems(args.prompt_template_name) + (
        source_problems(args.base_model, "--base_model", "config.json") if args.base_model else [])
    if args.attn_implementation.startswith("flash_attention"):  # else refused by transformers after tokenising
        import torch
        import transformers.utils

        kernel = getattr(transformers.utils, f"is_{args.attn_implementation.replace('attention', 'attn')}_available")
        if not (torch.cuda.is_available() and kernel()):
            problems.append(f"--attn_implementation {args.attn_implementation} needs a CUDA GPU and its flash-attn "
                            "package; leave it empty for sdpa")
    return problems + output_dir_problems(args.output_dir, "--output_dir", protected=[args.base_model])


def run_lock(args: FinetuneArgs) -> Any:
    """One run at a time per --output_dir: two runs into one folder would interleave checkpoints and overwrite each
    other's adapter. Only the main process takes it."""
    if not is_main_process():
        return contextlib.nullcontext()
    return RunLock(Path(args.output_dir) / ".bentsao.lock", f"--output_dir {args.output_dir}")


def resolve(args: FinetuneArgs) -> Run:
    """The device, precision, template, checkpoint and loggers: what the flags name, read and checked."""
    device = resolve_device()
    prompter = Prompter(args.prompt_template_name)
    loggers = setup.reporters(args.wandb_project, args.wandb_watch, args.wandb_log_model, args.report_to)
    checkpoint = checkpoints.resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)
    resume_from, note = (checkpoints.check_resumable(checkpoint, world_size(), args.resume_weights_only)
                         if checkpoint is not None else (None, None))  # last: a view of it may be made in /tmp
    threads = use_idle_cores() if device == "cpu" else None
    return Run(device, resolve_precision(args.precision, device), world_size(), prompter, checkpoint, resume_from,
               loggers, [note for note in (threads, cpu_engine_note(device), note) if note])


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
    import torch  # here, not at the top: utils (OMP_WAIT_POLICY) is imported before torch loads OpenMP

    visible = torch.cuda.device_count() if run.device == "cuda" else 0
    check_one_process_per_gpu(run.device, visible, launched="LOCAL_RANK" in os.environ)


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
        setup.check_resume_length(run.checkpoint, steps)
    return setup.training_arguments(args, run.device, run.precision, run.processes, run.reporters, accumulation,
                                    steps, has_validation=val_data is not None)


def load_model(args: FinetuneArgs, run: Run, tokenizer: Any) -> tuple[Any, Any]:
    """(the LoRA-wrapped model, the LoRA targets), the weights placed for the engine (`weights_placement`)."""
    device_map = weights_placement(run.device, run.processes)
    model = load_base_model(args.base_model, precision=run.precision, device=run.device, load_8bit=args.load_8bit,
                            load_4bit=args.load_4bit, trust_remote_code=args.trust_remote_code,
                            attn_implementation=args.attn_implementation, device_map=device_map, tokenizer=tokenizer)
    model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
    targets = resolve_lora_targets(model, args.lora_target_modules)
    if run.checkpoint is not None:
        checkpoints.check_same_lora(run.checkpoint, args.lora_r, args.lora_alpha, targets)
    model = setup.build_peft_model(model, targets, args)
    if run.checkpoint is not None and any((run.checkpoint / name).is_file() for name in ADAPTER_WEIGHTS):
        # the Trainer resumes through peft, which keeps fresh weights where a checkpoint's names do not fit
        check_loaded_adapter(model, str(run.checkpoint), label=f"the checkpoint {run.checkpoint}")
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

    from utils.training.plotting import LossPlotCallback, run_title
    from utils.training.trainer import LayoutTrainer

    batching = plan_batching(
        model, [len(ids) for ids in train_data["input_ids"]], tokenizer.pad_token_id, args.batch_size,
        args.micro_batch_size, args.cutoff_len, run.processes, packing=args.packing, pack_len=args.pack_len,
        micro_batch_tokens=args.micro_batch_tokens, seed=args.seed,
        padded_collator=DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, return_tensors="pt", padding=True),
    )
    assert batching.micro_batches_per_step == training_args.gradient_accumulation_steps  # both from the same rule
    log(batching.describe() + f"; gradient_accumulation_steps: {training_args.gradient_accumulation_steps}")
    trainer = LayoutTrainer(
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
    stop, guard = callback(trainer, GracefulStop), callback(trainer, DivergenceGuard)
    if args.overwrite and run.checkpoint is None and is_main_process():
        setup.clear_earlier_run(args.output_dir)
    if run.checkpoint is not None and checkpoints.at_last_step(run.checkpoint):
        return finish_from_checkpoint(trainer, run.checkpoint)
    try:
        result = trainer.train(resume_from_checkpoint=str(run.resume_from) if run.resume_from else None)
    except pickle.UnpicklingError as error:  # transformers loads checkpoint .pt/.pth files with weights_only=True
        raise UserError(f"refusing to resume from {run.checkpoint}: a file in it is a pickle that is not plain data, "
                        "and unpickling it could run arbitrary code; resume only from checkpoints you wrote "
                        f"(torch: {first_line(error)})") from None
    except Exception as error:  # a full disk while saving a checkpoint (raised by torch, safetensors, ...)
        reason = storage_failure(error)
        if reason is None:
            raise
        raise UserError(results.storage_message(args.output_dir, reason, trainer.state.global_step)) from error
    finally:
        stop.restore()  # the signal handlers, also when training raised
    if guard.diverged_step is not None:
        raise UserError(guard.message(args.output_dir, fp16=run.precision == "fp16"))
    step, last = trainer.state.global_step, trainer.state.max_steps
    if stop.received is not None and step < last:
        log(f"stopped by {stop.signal_name} at step {step} of {last}: checkpoint saved to "
            f"{Path(args.output_dir, f'checkpoint-{step}').resolve()}; continue with --resume_from_checkpoint True")
        sys.exit(128 + stop.received)
    return result  # a signal after the last step (in its evaluation): the adapter is written, then main exits


def finish_from_checkpoint(trainer: Any, checkpoint: Path) -> Any:
    """A run stopped after its last checkpoint, before its adapter was written: the checkpoint's weights are the
    run's final ones, so they become the adapter without training a step (the Trainer would train one more)."""
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights
    from transformers import TrainerState
    from transformers.trainer_utils import TrainOutput

    if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        raise UserError(f"{checkpoint} is the run's last step; write its adapter in one process: python finetune.py "
                        "(same flags, without the launcher and --deepspeed) --resume_from_checkpoint True")
    set_peft_model_state_dict(trainer.model, load_peft_weights(str(checkpoint), device="cpu"))
    trainer.state = TrainerState.load_from_json(str(checkpoint / checkpoints.TRAINER_STATE))
    log(f"{checkpoint} holds the run's last step: writing the adapter from it")
    return TrainOutput(trainer.state.global_step, float("nan"), {})  # no loss or speed measured now: none reported


def finish(args: FinetuneArgs, trainer: Any, tokenizer: Any, targets: Any, summary: dict[str, Any]) -> None:
    """Check the trained weights, publish the adapter atomically (adapter_config.json last), read it back."""
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
    results.verify_adapter(args.output_dir, lora)
    log(f"summary: {json.dumps(summary, ensure_ascii=False)}")
    log(f"adapter saved to {Path(args.output_dir).resolve()}")


def resuming(args: FinetuneArgs) -> bool:
    return args.resume_from_checkpoint not in (None, False, "")


def main(args: FinetuneArgs) -> str:
    """Train a LoRA adapter on --data_path into --output_dir (returns that folder)."""
    from transformers import set_seed

    raise_problems(validate(args))
    with run_lock(args):
        raise_problems(setup.restart_problems(args.output_dir, resuming(args), args.overwrite))
        if resuming(args) and setup.finished(args.output_dir) and not args.overwrite:
            raise_problems(setup.finished_run_problems(args.output_dir, args.num_epochs, args.max_steps))
            log(f"{Path(args.output_dir).resolve()} already holds the finished run's adapter: nothing to resume")
            return args.output_dir
        run = resolve(args)
        try:
            check_launch(run)
            dataset, val_size = read_data(args)
            log(describe_run(args, run, val_size))
            for note in run.notes:
                log(note)
            tokenizer = load_tokenizer(args.base_model, trust_remote_code=args.trust_remote_code)
            train_data, val_data, report = prepare_data(args, run, dataset, val_size, tokenizer)
            training_args = plan(args, run, train_data, val_data)  # the engine is live before the weights load
            set_seed(args.seed)
            model, targets = load_model(args, run, tokenizer)
            trainer, batching = build_trainer(args, run, model, tokenizer, train_data, val_data, training_args)
            started = time.time()
            result = train(trainer, run, args)
            summary = results.run_summary(trainer, result, report, batching, val_data, started)
            finish(args, trainer, tokenizer, targets, summary)
        finally:
            if run.resume_from not in (None, run.checkpoint):  # the --resume_weights_only view
                shutil.rmtree(run.resume_from.parent, ignore_errors=True)
    stop = callback(trainer, GracefulStop)
    if stop.received is not None:  # it came after the last step: the run is whole, the exit code still says it
        log(f"stopped by {stop.signal_name} after the last step; the adapter was written first")
        sys.exit(128 + stop.received)
    return args.output_dir


def describe_run(args: FinetuneArgs, run: Run, val_size: int) -> str:
    """One line: what trains on what, where, and how (every flag's value is in `bentsao_training.json`)."""
    resumed = f", resuming {run.checkpoint}" if run.checkpoint else ""
    return (f"training {args.base_model} on {args.data_path} ({val_size} validation rows) into {args.output_dir}: "
            f"{run.device} {run.precision}, {run.processes} process(es), batch {args.batch_size} (micro "
            f"{args.micro_batch_size}), lr {args.learning_rate:g}, LoRA r={args.lora_r}, loggers "
            f"{','.join(run.reporters) or 'none'}{resumed}")


if __name__ == "__main__":
    run_cli(main)
