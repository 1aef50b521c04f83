"""The decisions finetune.py takes before it trains: batch sizes, the validation split, the schedule, loggers,
what may happen to an output folder that already holds a run, the LoRA wrapper, and what is recorded with an adapter.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any

from utils.compat import attention_implementation
from utils.core.errors import UserError
from utils.core.io import atomic_write_json, read_json_object
from utils.model.checks import TRAINING_METADATA
from utils.runtime import log
from utils.training.checkpoints import checkpoint_folders, latest_complete, read_trainer_state

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def batch_size_problems(batch_size: int, micro_batch_size: int, processes: int = 1) -> list[str]:
    """`micro_batch_size` larger than `batch_size`, or `batch_size` not a multiple of micro batch x processes."""
    if micro_batch_size > batch_size:
        return [f"--micro_batch_size {micro_batch_size} is larger than --batch_size {batch_size}"]
    if batch_size % (micro_batch_size * processes):
        per_step = f"--micro_batch_size {micro_batch_size} x {processes} process(es)"
        return [f"--batch_size {batch_size} is not divisible by {per_step}"]
    return []


def resolve_val_size(val_set_size: float | None, rows: int) -> int:
    """Rows held out for validation: a count, a fraction below 1, or 0; None means 500, or a tenth of a small file.

    Fails, naming `--val_set_size`, when the validation rows would leave no training rows.
    """
    if val_set_size is None:
        return min(500, rows // 10)
    size = max(1, int(rows * val_set_size)) if 0 < val_set_size < 1 else int(val_set_size)
    if size and size >= rows:
        raise UserError(f"--val_set_size {val_set_size:g} leaves no training rows: the data has {rows} rows")
    return size


def total_steps(train_rows: int, batch_size: int, num_epochs: float, max_steps: int) -> int:
    """Optimizer steps of the run: `--max_steps`, or the epochs over `--batch_size` rows a step."""
    return max_steps if max_steps > 0 else math.ceil(max(1, math.ceil(train_rows / batch_size)) * num_epochs)


def warmup(warmup_steps: int, steps: int) -> int:
    """The linear warm-up: `--warmup_steps`, at most a fifth of the run: the published run (10 epochs of 8,658 rows,
    640 steps) keeps the original recipe's 100; a short run is not spent warming up."""
    return min(warmup_steps, steps // 5)


def reporters(wandb_project: str, watch: str, log_model: str, report_to: str) -> list[str]:
    """The loggers: wandb only when a project is named (offline when no API key is configured, never a prompt),
    plus `--report_to` (e.g. tensorboard)."""
    names = logger_names(report_to)
    project = wandb_project or os.environ.get("WANDB_PROJECT", "")
    if not project:
        return names
    try:
        import wandb
    except ImportError:
        raise UserError("--wandb_project needs the wandb package: pip install wandb") from None
    os.environ["WANDB_PROJECT"] = project
    if watch:
        os.environ["WANDB_WATCH"] = watch
    if log_model:
        os.environ["WANDB_LOG_MODEL"] = log_model
    if os.environ.get("WANDB_MODE") not in ("offline", "disabled") and not wandb.login(prompt=False, verify=False):
        log("wandb: no API key is configured (WANDB_API_KEY or `wandb login`), logging offline to ./wandb")
        os.environ["WANDB_MODE"] = "offline"
    return ["wandb", *names]


def logger_names(report_to: str) -> list[str]:
    return [name.strip() for name in str(report_to).split(",") if name.strip() and name.strip() != "none"]


def option_problems(val_set_size: float | None, report_to: str) -> list[str]:
    """The form of `--val_set_size`; `--report_to` names loggers transformers knows and this machine has installed
    (else the Trainer fails after the model loaded)."""
    from transformers.integrations import INTEGRATION_TO_CALLBACK, get_available_reporting_integrations

    problems = []
    if val_set_size is not None and not 0 < val_set_size < 1 and not float(val_set_size).is_integer():
        problems.append(f"--val_set_size must be a row count, a fraction below 1, or 0; got {val_set_size!r}")
    names = logger_names(report_to)
    if unknown := [name for name in names if name not in INTEGRATION_TO_CALLBACK]:
        problems.append(f"--report_to {','.join(unknown)}: not a logger transformers knows; known: "
                        f"{', '.join(INTEGRATION_TO_CALLBACK)}")
    elif missing := [n for n in names if n != "wandb" and n not in get_available_reporting_integrations()]:
        problems.append(f"--report_to {','.join(missing)}: its package is not installed on this machine")
    return problems


# --- what an output folder may already hold --------------------------------------------------------------------------


def earlier_run(output_dir: str | Path) -> str | None:
    """A description of what an earlier run left in `output_dir` (an adapter, checkpoints), or None."""
    folder = Path(output_dir)
    parts = []
    if (folder / "adapter_config.json").is_file():
        parts.append("a finished adapter")
    found = checkpoint_folders(folder)
    if found:
        parts.append(f"{len(found)} checkpoint(s), the newest checkpoint-{found[-1][0]}")
    return " and ".join(parts) or None


def finished(output_dir: str | Path) -> bool:
    """A run wrote its adapter into `output_dir` (published last, so the adapter is whole)."""
    return (Path(output_dir) / "adapter_config.json").is_file()


def restart_problems(output_dir: str | Path, resuming: bool, overwrite: bool) -> list[str]:
    """A run never silently starts over an earlier one: it resumes a stopped one (a finished one is then left as it
    is, see finetune.py), or replaces it with `--overwrite True`; checkpoints that are all incomplete (a save a kill
    or a full disk interrupted) hold nothing to resume, so only `--overwrite True` fits them."""
    left = earlier_run(output_dir)
    if not left or overwrite or resuming:  # resuming: resolve_checkpoint says what is wrong with the checkpoint
        return []
    if finished(output_dir):
        return [(f"{output_dir} already holds {left} of a finished run; write the new run into a new --output_dir, "
                 "or replace the finished one with --overwrite True")]
    if latest_complete(output_dir) is None:
        return [(f"{output_dir} holds only incomplete checkpoints ({left}) of an interrupted run, nothing to resume; "
                "replace them with --overwrite True")]
    return [(f"{output_dir} already holds {left} of an earlier run; continue it with --resume_from_checkpoint True, "
             "or replace it with --overwrite True")]


EXTEND_HINT = ("to train longer, train into a new --output_dir (or start over in this one with --overwrite True) "
               "with more --num_epochs (or --max_steps)")


def finished_run_problems(output_dir: str | Path, num_epochs: float, max_steps: int) -> list[str]:
    """Resuming a finished run for another length would continue a learning-rate schedule that reached 0 at its end
    and replace its adapter."""
    path = Path(output_dir) / TRAINING_METADATA
    trained = read_json_object(path) if path.is_file() else {}
    same_epochs = max_steps > 0 or trained.get("num_epochs", num_epochs) == num_epochs
    if trained.get("max_steps", max_steps) == max_steps and same_epochs:
        return []
    return [(f"{output_dir} holds a finished run of another length (--num_epochs {trained.get('num_epochs')}, "
             f"--max_steps {trained.get('max_steps')}); {EXTEND_HINT}")]


def check_resume_length(checkpoint: Path, steps: int) -> None:
    """A resumed run keeps its length: another one would continue a learning-rate schedule laid out for the old length
    (it reached 0 at the old end, then jumps). A checkpoint at the run's last step resumes to no training at all: the
    adapter is written from it (a run stopped after its last checkpoint, before its adapter)."""
    state = read_trainer_state(checkpoint) or {}
    done, planned = state.get("global_step", 0), state.get("max_steps") or steps
    if planned != steps:
        raise UserError(f"--resume_from_checkpoint {checkpoint}: that run is {planned} steps long ({checkpoint.name}: "
                        f"step {done} of {planned}), this command asks for {steps}; resume with the run's own "
                        f"--num_epochs/--max_steps, or {EXTEND_HINT}")


def clear_earlier_run(output_dir: str | Path) -> None:
    """With `--overwrite True`: remove the earlier run's checkpoints and adapter before the new one writes any."""
    folder = Path(output_dir)
    for _, checkpoint in checkpoint_folders(folder):
        shutil.rmtree(checkpoint)
    for name in (*ADAPTER_FILES, TRAINING_METADATA):
        (folder / name).unlink(missing_ok=True)


# --- the adapter -----------------------------------------------------------------------------------------------------


def build_peft_model(model: Any, targets: list[str] | str, args: Any) -> Any:
    """`model` wrapped with LoRA adapters on `targets` (gradient checkpointing / k-bit preparation first)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if args.load_8bit or args.load_4bit:  # norms in fp32, the base frozen; its checkpointing would be reentrant
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if args.gradient_checkpointing:  # non-reentrant (the reentrant kind is deprecated in torch), quantized base too
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, target_modules=targets,
                        lora_dropout=args.lora_dropout, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    model.config.use_cache = False
    return model


def write_training_metadata(folder: str | Path, model: Any, tokenizer: Any, args: Any, targets: Any,
                            summary: dict[str, Any]) -> None:
    """`bentsao_training.json`: what the adapter was trained on and with (checked when it is loaded)."""
    base_config = model.get_base_model().config
    metadata = {
        "base_model": args.base_model,
        "model_type": base_config.model_type,
        "hidden_size": getattr(base_config.get_text_config(), "hidden_size", None),
        "vocab_size": model.get_base_model().get_input_embeddings().num_embeddings,
        "tokenizer_length": len(tokenizer),
        "prompt_template_name": args.prompt_template_name,
        "cutoff_len": args.cutoff_len,
        "num_epochs": args.num_epochs,
        "max_steps": args.max_steps,
        "train_on_inputs": args.train_on_inputs,
        "lora_target_modules": targets,
        "attn_implementation": attention_implementation(model.get_base_model()),
        "lora_r": args.lora_r,
        "lora_alpha": args.lora_alpha,
        "data_path": args.data_path,
        "summary": summary,
    }
    atomic_write_json(Path(folder) / TRAINING_METADATA, metadata)


def training_arguments(args: Any, device: str, precision: str, processes: int, reporters: list[str],
                       accumulation: int, steps: int, has_validation: bool) -> Any:
    """The Trainer's arguments for finetune.py's flags `args` on this machine: steps, schedule, precision, saving,
    logging and the engine (DDP, DeepSpeed, FSDP). `TrainingArguments(deepspeed=...)` registers the DeepSpeed config
    that makes `from_pretrained` partition a ZeRO-3 model while it loads: build this before the weights load."""
    from transformers import TrainingArguments

    from utils.training.callbacks import printing_to_a_log
    from utils.training.engines import training_device_args

    return TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=max(1, args.batch_size // (accumulation * processes)),
        per_device_eval_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=accumulation,
        num_train_epochs=args.num_epochs,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=warmup(args.warmup_steps, steps),
        bf16=precision == "bf16",  # on CPU too: the Trainer then autocasts, as on a GPU
        fp16=precision == "fp16",
        logging_steps=args.logging_steps,
        eval_strategy="steps" if has_validation else "no",
        eval_steps=args.eval_steps,
        eval_on_start=has_validation,  # the starting validation loss, so the curve shows the fall
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit or None,
        seed=args.seed,
        data_seed=args.seed,
        train_sampling_strategy="group_by_length" if args.group_by_length and not args.packing else "random",
        ddp_find_unused_parameters=False if processes > 1 else None,
        deepspeed=args.deepspeed or None,
        **training_device_args(device, processes),  # CPU: use_cpu, and gloo when several processes run
        dataloader_pin_memory=device == "cuda",
        report_to=reporters or "none",
        run_name=args.wandb_run_name or None,
        disable_tqdm=printing_to_a_log(),  # a log (a file, a pipe, `| tee`) gets ProgressLines instead
        remove_unused_columns=False,
    )
