"""LoRA instruction-tuning of a causal LM on medical instruction data (BenTsao / HuaTuo).

    python finetune.py --base_model models/tiny-llama --data_path data/llama_data.json --output_dir lora-med

The data is JSON Lines or a JSON array of {instruction, input, output}; the prompt comes from
`templates/<prompt_template_name>.json`. The adapter (adapter_config.json + adapter_model.safetensors), the
tokenizer and bentsao_training.json (what it was trained with) land in --output_dir.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import sys
import time
from pathlib import Path
from typing import Any

import torch

from utils.batching import check_batching_args, plan_batching
from utils.core.cli import run_cli
from utils.core.errors import UserError
from utils.data import load_instruction_dataset, tokenize_dataset
from utils.distributed import check_deepspeed_config, cpu_engine_note, gathered_state_dict, training_device_args
from utils.model import (
    TRAINING_METADATA,
    check_attention,
    check_tokenizer_fits,
    load_base_model,
    load_tokenizer,
    resolve_lora_targets,
)
from utils.prompter import Prompter
from utils.validate import batch_size_problems, check_tokenizer_fits_config, preflight_model
from utils.validate import resolve_val_size as _resolve_val_size


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def log(message: str) -> None:
    if is_main_process():
        print(message, flush=True)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def validate_args(args: dict[str, Any]) -> None:
    """Collect every problem with the options into one error, before anything heavy runs."""
    problems = []
    if not args["base_model"]:
        problems.append("--base_model is required (e.g. `python -m utils.tiny_base --output_dir models/tiny-llama`)")
    if not args["data_path"]:
        problems.append("--data_path is required")
    for name in ("batch_size", "micro_batch_size", "cutoff_len", "lora_r"):
        if not isinstance(args[name], int) or args[name] < 1:
            problems.append(f"--{name} must be a positive integer, got {args[name]!r}")
    if not problems:
        problems += batch_size_problems(args["batch_size"], args["micro_batch_size"], world_size())
    if not (isinstance(args["learning_rate"], (int, float)) and args["learning_rate"] > 0):
        problems.append(f"--learning_rate must be a positive number, got {args['learning_rate']!r}")
    if not (isinstance(args["num_epochs"], (int, float)) and args["num_epochs"] > 0):
        problems.append(f"--num_epochs must be positive, got {args['num_epochs']!r}")
    if not (0 <= args["lora_dropout"] < 1):
        problems.append(f"--lora_dropout must be in [0, 1), got {args['lora_dropout']!r}")
    size = args["val_set_size"]
    if size is not None and (isinstance(size, bool) or not isinstance(size, (int, float)) or size < 0):
        problems.append(f"--val_set_size must be a row count, a fraction below 1, or 0; got {size!r}")
    if args["load_8bit"] and args["load_4bit"]:
        problems.append("--load_8bit and --load_4bit exclude each other: choose one")
    for name in ("save_steps", "eval_steps", "logging_steps"):
        if not isinstance(args[name], int) or args[name] < 1:
            problems.append(f"--{name} must be a positive integer, got {args[name]!r}")
    if problems:
        raise UserError("; ".join(problems))


def resolve_val_size(val_set_size: float | None, rows: int) -> int:
    """Rows held out for validation. None: 500, or a tenth of a file too small for that (see utils.validate)."""
    return _resolve_val_size(val_set_size, rows)


def setup_wandb(project: str, run_name: str, watch: str, log_model: str) -> list[str]:
    """Report to wandb only when a project is named; never block on a login prompt."""
    project = project or os.environ.get("WANDB_PROJECT", "")
    if not project:
        return []
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise UserError("--wandb_project needs the wandb package: pip install wandb") from None
    os.environ["WANDB_PROJECT"] = project
    if watch:
        os.environ["WANDB_WATCH"] = watch
    if log_model:
        os.environ["WANDB_LOG_MODEL"] = log_model
    netrc = Path.home() / ".netrc"
    in_netrc = netrc.is_file() and "wandb" in netrc.read_text(errors="ignore")
    logged_in = bool(os.environ.get("WANDB_API_KEY")) or in_netrc
    if not logged_in and os.environ.get("WANDB_MODE") not in ("offline", "disabled"):
        log("wandb: no API key found (WANDB_API_KEY or `wandb login`), logging offline to ./wandb")
        os.environ["WANDB_MODE"] = "offline"
    return ["wandb"]


def find_checkpoint(resume_from_checkpoint: str | bool | None, output_dir: str) -> str | None:
    """`True`: the latest checkpoint-N in output_dir; a folder: that checkpoint."""
    from transformers.trainer_utils import get_last_checkpoint

    if resume_from_checkpoint in (None, False, "", "False"):
        return None
    if resume_from_checkpoint is True or resume_from_checkpoint == "True":
        last = get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None
        if last is None:
            raise UserError(f"--resume_from_checkpoint True: no checkpoint-N folder in {output_dir}")
        return last
    path = Path(str(resume_from_checkpoint))
    if not (path / "trainer_state.json").is_file():
        raise UserError(
            f"--resume_from_checkpoint {path}: not a checkpoint folder (no trainer_state.json); "
            f"pass a checkpoint-N folder or True for the latest in --output_dir"
        )
    return str(path)


def build_peft_model(model, args: dict[str, Any]):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    targets = resolve_lora_targets(model, args["lora_target_modules"])
    if args["load_8bit"] or args["load_4bit"]:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args["gradient_checkpointing"])
    elif args["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    config = LoraConfig(
        r=args["lora_r"],
        lora_alpha=args["lora_alpha"],
        target_modules=targets,
        lora_dropout=args["lora_dropout"],
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    model.config.use_cache = False
    return model, targets


def split_dataset(dataset, val_size: int, seed: int):
    if val_size <= 0:
        return dataset, None
    split = dataset.train_test_split(test_size=val_size, shuffle=True, seed=seed)
    return split["train"], split["test"]


def lora_b_is_zero(model, state_dict: dict | None = None) -> bool:
    # state_dict: the gathered weights under ZeRO-3/FSDP; an empty ZeRO-3 placeholder (numel 0) says nothing
    named = state_dict.items() if state_dict is not None else model.named_parameters()
    tensors = [p for name, p in named if "lora_B" in name and p.numel() > 0]
    return bool(tensors) and all(torch.count_nonzero(p).item() == 0 for p in tensors)


def write_training_metadata(output_dir: str, model, tokenizer, args: dict[str, Any], targets, summary: dict) -> None:
    base_config = model.get_base_model().config
    embeddings = model.get_base_model().get_input_embeddings().weight
    metadata = {
        "base_model": args["base_model"],
        "model_type": getattr(base_config, "model_type", None),
        "hidden_size": getattr(base_config, "hidden_size", None),
        "vocab_size": getattr(embeddings, "ds_shape", embeddings.shape)[0],  # ds_shape: the full shape under ZeRO-3
        "tokenizer_length": len(tokenizer),
        "prompt_template_name": args["prompt_template_name"],
        "cutoff_len": args["cutoff_len"],
        "train_on_inputs": args["train_on_inputs"],
        "lora_target_modules": targets,
        "lora_r": args["lora_r"],
        "lora_alpha": args["lora_alpha"],
        "data_path": args["data_path"],
        "summary": summary,
    }
    Path(output_dir, TRAINING_METADATA).write_text(json.dumps(metadata, ensure_ascii=False, indent=2), encoding="utf-8")


def main(
    # model/data params
    base_model: str = "",  # local folder or Hugging Face hub id of the base model (required)
    data_path: str = "data/llama_data.json",  # JSON Lines or JSON array of {instruction, input, output}
    output_dir: str = "./lora-bentsao",  # where checkpoints and the final adapter go
    # training hyperparams
    batch_size: int = 128,  # rows per optimizer step (the effective batch, over all processes)
    micro_batch_size: int = 4,  # rows per forward pass on one device; batch_size / this = accumulation
    num_epochs: float = 3,  # passes over the training rows
    learning_rate: float = 3e-4,  # peak learning rate (linear warm-up, then linear decay)
    cutoff_len: int = 256,  # tokens per row; longer rows are cut (and counted)
    val_set_size: float | None = None,  # validation rows: a count, a fraction (<1) or 0; default 500 (or a tenth)
    max_steps: int = -1,  # stop after this many optimizer steps (-1: run num_epochs)
    warmup_steps: int = 100,  # linear warm-up steps (capped at a tenth of the run)
    seed: int = 42,  # seeds the split, the sampling order, LoRA init and dropout
    save_steps: int = 200,  # checkpoint every N optimizer steps
    eval_steps: int = 200,  # validation every N optimizer steps
    logging_steps: int = 10,  # log the training loss every N optimizer steps
    save_total_limit: int = 3,  # keep at most this many checkpoint-N folders
    precision: str = "auto",  # auto | bf16 | fp16 | fp32 (auto: bf16 where the GPU has it, else fp16; fp32 on CPU)
    gradient_checkpointing: bool = False,  # recompute activations: less memory, ~30% slower
    attn_implementation: str = "",  # sdpa | eager | flash_attention_2 (packed rows run as varlen) | ...; "": default
    load_8bit: bool = False,  # load the frozen base in 8-bit (CUDA + bitsandbytes)
    load_4bit: bool = False,  # QLoRA: load the frozen base in 4-bit nf4 (CUDA + bitsandbytes)
    deepspeed: str = "",  # DeepSpeed JSON config, e.g. configs/deepspeed/zero2.json (launch with torchrun/accelerate)
    # lora hyperparams
    lora_r: int = 8,  # LoRA rank
    lora_alpha: int = 16,  # LoRA scaling numerator (scale = alpha / r)
    lora_dropout: float = 0.05,  # dropout on the LoRA input
    lora_target_modules: str | list[str] | None = None,  # e.g. q_proj,v_proj or all-linear; default by architecture
    # llm hyperparams
    train_on_inputs: bool = False,  # also learn the prompt tokens (default: only the answer counts in the loss)
    group_by_length: bool = False,  # with --packing False: batch rows of similar length (less padding)
    packing: bool = True,  # same rows per step, packed (Bloom: length buckets); False: the original padded batches
    pack_len: int = 0,  # tokens per packed row (0: --cutoff_len)
    micro_batch_tokens: int = 0,  # with packing: split a step into more micro-batches above this many tokens (0: never)
    # wandb params
    wandb_project: str = "",  # report to this wandb project (or set WANDB_PROJECT); off by default
    wandb_run_name: str = "",  # run name shown in wandb
    wandb_watch: str = "",  # false | gradients | all
    wandb_log_model: str = "",  # false | true: upload checkpoints to wandb
    report_to: str = "",  # extra loggers, e.g. tensorboard
    resume_from_checkpoint: str | bool | None = None,  # a checkpoint-N folder, or True for the latest in output_dir
    prompt_template_name: str = "med_template",  # a name in templates/ or a path to a template JSON
    trust_remote_code: bool = False,  # allow a hub model's own Python code to run
    overwrite: bool = False,  # allow replacing a finished adapter in output_dir
) -> str:
    """Train a LoRA adapter; returns the folder it was written to."""
    args = dict(locals())
    from transformers import DataCollatorForSeq2Seq, TrainingArguments, set_seed

    from utils.plotting import LossPlotCallback, run_title
    from utils.training import DivergenceGuard, GracefulStop, SafeTrainer, save_files_atomically

    validate_args(args)
    check_batching_args(pack_len, cutoff_len, micro_batch_tokens)
    if deepspeed:  # the file, its batch sizes ("auto") and the machine, before anything heavy
        check_deepspeed_config(deepspeed, batch_size, micro_batch_size, world_size())
    prompter = Prompter(prompt_template_name)
    checkpoint = find_checkpoint(resume_from_checkpoint, output_dir)
    if checkpoint is None and not overwrite and Path(output_dir, "adapter_config.json").is_file():
        raise UserError(
            f"{output_dir} already holds a finished adapter; continue it with --resume_from_checkpoint True, "
            "or replace it with --overwrite True"
        )
    # the model side (paths, config, trust_remote_code, precision/quantisation, a resumed checkpoint's fit)
    device, resolved_precision = preflight_model(
        base_model, checkpoint, precision=precision, load_8bit=load_8bit, load_4bit=load_4bit,
        trust_remote_code=trust_remote_code,
    )
    check_attention(attn_implementation, device)
    dataset = load_instruction_dataset(data_path)
    val_size = resolve_val_size(val_set_size, len(dataset))
    gradient_accumulation_steps = batch_size // (micro_batch_size * world_size())
    reporters = setup_wandb(wandb_project, wandb_run_name, wandb_watch, wandb_log_model)
    reporters += [name.strip() for name in str(report_to).split(",") if name.strip() and name.strip() != "none"]

    printed = dict(args, val_set_size=val_size, precision=resolved_precision, device=device,
                   world_size=world_size(), gradient_accumulation_steps=gradient_accumulation_steps,
                   resume_from_checkpoint=checkpoint, report_to=",".join(reporters) or "none")
    log("Training BenTsao LoRA with:\n" + "\n".join(f"{name}: {value}" for name, value in printed.items()) + "\n")
    if cpu_engine_note(device):
        log(cpu_engine_note(device))

    set_seed(seed)
    tokenizer = load_tokenizer(base_model, trust_remote_code=trust_remote_code)
    check_tokenizer_fits_config(tokenizer, base_model)
    model = load_base_model(
        base_model, precision=resolved_precision, device=device, load_8bit=load_8bit, load_4bit=load_4bit,
        trust_remote_code=trust_remote_code, attn_implementation=attn_implementation,
        device_map={"": int(os.environ.get("LOCAL_RANK", "0"))} if world_size() > 1 and device == "cuda" else None,
    )
    check_tokenizer_fits(tokenizer, model, base_model)
    model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
    model, targets = build_peft_model(model, args)
    if is_main_process():
        log(f"LoRA targets: {targets}")
        model.print_trainable_parameters()

    train_rows, val_rows = split_dataset(dataset, val_size, seed)
    train_data, train_report = tokenize_dataset(
        train_rows, prompter, tokenizer, cutoff_len, train_on_inputs, "training"
    )
    val_data, val_report = (None, None)
    if val_rows is not None:
        val_data, val_report = tokenize_dataset(
            val_rows, prompter, tokenizer, cutoff_len, train_on_inputs, "validation"
        )
        if not len(val_data):
            val_data = None
    log(
        f"data: {train_report['rows']} training rows ({train_report['truncated']} cut at --cutoff_len {cutoff_len}, "
        f"{train_report['dropped_no_target']} dropped: prompt fills cutoff_len), "
        f"{len(val_data) if val_data is not None else 0} validation rows"
    )

    plan = plan_batching(
        model, [len(ids) for ids in train_data["input_ids"]], tokenizer.pad_token_id, batch_size, micro_batch_size,
        cutoff_len, world_size(), packing=packing, pack_len=pack_len, micro_batch_tokens=micro_batch_tokens, seed=seed,
        padded_collator=DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, return_tensors="pt", padding=True),
    )
    log(plan.describe())
    steps_per_epoch = max(1, math.ceil(len(train_data) / batch_size))
    total_steps = max_steps if max_steps > 0 else math.ceil(steps_per_epoch * num_epochs)
    training_args = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=max(1, batch_size // (plan.micro_batches_per_step * world_size())),
        per_device_eval_batch_size=micro_batch_size,
        gradient_accumulation_steps=plan.micro_batches_per_step,
        num_train_epochs=num_epochs,
        max_steps=max_steps,
        learning_rate=learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=min(warmup_steps, total_steps // 10),
        bf16=resolved_precision == "bf16" and device != "cpu",
        fp16=resolved_precision == "fp16",
        logging_steps=logging_steps,
        eval_strategy="steps" if val_data is not None else "no",
        eval_steps=eval_steps,
        eval_on_start=val_data is not None,  # the starting validation loss, so the curve shows the fall
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=save_total_limit,
        seed=seed,
        data_seed=seed,
        train_sampling_strategy="group_by_length" if group_by_length and not packing else "random",
        ddp_find_unused_parameters=False if world_size() > 1 else None,
        deepspeed=deepspeed or None,
        **training_device_args(device, world_size()),  # CPU: use_cpu, and gloo when several processes run
        dataloader_pin_memory=device == "cuda",
        report_to=reporters or "none",
        run_name=wandb_run_name or None,
        disable_tqdm=not sys.stderr.isatty(),
        remove_unused_columns=False,
    )
    stop, guard = GracefulStop(), DivergenceGuard()
    trainer = SafeTrainer(
        model=model,
        args=training_args,
        train_dataset=train_data,
        eval_dataset=val_data,
        data_collator=DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, return_tensors="pt", padding=True),
        processing_class=tokenizer,
        batching=plan,  # training batches (utils/batching.py); evaluation keeps data_collator
        # the guard last: it withdraws a save that a signal or the schedule asked for
        callbacks=[stop, LossPlotCallback(output_dir, run_title(args)), guard],
    )
    started = time.time()
    try:
        result = trainer.train(resume_from_checkpoint=checkpoint)
    except pickle.UnpicklingError as error:  # transformers loads checkpoint .pt/.pth files with weights_only=True
        raise UserError(
            f"refusing to resume from {checkpoint}: a file in it is a pickle that is not plain weights "
            f"({str(error).strip().splitlines()[0][:200]}); resume only from checkpoints you wrote"
        ) from None
    finally:
        stop.restore()  # the signal handlers, also when training raised
    if guard.diverged_step is not None:
        raise UserError(guard.message(output_dir, fp16=resolved_precision == "fp16"))
    if stop.received is not None and trainer.state.global_step < trainer.state.max_steps:
        saved = Path(output_dir, f"checkpoint-{trainer.state.global_step}")
        log(f"stopped by {stop.signal_name} at step {trainer.state.global_step} of {trainer.state.max_steps}: "
            f"checkpoint saved to {saved.resolve()}; continue with --resume_from_checkpoint True")
        sys.exit(128 + stop.received)
    summary: dict[str, Any] = {
        "train_loss": round(result.training_loss, 4),
        "steps": trainer.state.global_step,
        "train_runtime_s": round(time.time() - started, 1),
        "train_rows": train_report["rows"],
        "truncated_rows": train_report["truncated"],
        "batching": plan.mode,
        "pad_fraction": round(plan.stats.pad_fraction, 4),  # padding share of the training tensors (this process)
        "tokens_per_s": round(plan.stats.real_tokens / max(result.metrics["train_runtime"], 1e-9), 1),
        "train_loop_s": round(result.metrics["train_runtime"], 1),  # trainer.train's own runtime
    }
    if val_data is not None:
        summary["eval_loss"] = round(trainer.evaluate()["eval_loss"], 4)

    state_dict = gathered_state_dict(trainer)  # ZeRO-3/FSDP: the sharded weights gathered (every rank joins in)
    if lora_b_is_zero(model, state_dict):
        raise UserError(
            "training left every lora_B at zero, so the adapter would change nothing; "
            "check --learning_rate, --max_steps and that the data has answers"
        )
    if is_main_process():
        def write_adapter(folder: Path) -> None:
            model.save_pretrained(folder, state_dict=state_dict)
            tokenizer.save_pretrained(folder)
            write_training_metadata(str(folder), model, tokenizer, args, targets, summary)

        save_files_atomically(output_dir, write_adapter)  # adapter_config.json lands last
    log(f"summary: {json.dumps(summary, ensure_ascii=False)}")
    log(f"adapter saved to {Path(output_dir).resolve()}")
    return output_dir


if __name__ == "__main__":
    run_cli(main)
