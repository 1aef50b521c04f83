"""The flags of finetune.py, once: `FinetuneArgs` holds each flag's type, default, comment (shown by `--help`) and
range; `@dataclass_flags("args", FinetuneArgs)` lays them out as the script's command line."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from utils.core.cli import AT_LEAST_ONE, DROPOUT, NON_NEGATIVE, POSITIVE, SEED, Check


@dataclass(frozen=True)
class FinetuneArgs:
    """The flags of finetune.py (the original BenTsao / alpaca-lora names); `--help` shows each comment."""

    # model/data params
    base_model: str = ""  # local folder or Hugging Face hub id (org/name) of the base model (required)
    gguf_file: str = ""  # with a folder --base_model: the GGUF file in it to load (a .gguf --base_model needs none)
    data_path: str = "data/llama_data.json"  # JSON Lines or JSON array of {instruction, input, output}
    output_dir: str = "./lora-bentsao"  # where checkpoints and the final adapter go
    # training hyperparams
    batch_size: int = 128  # rows per optimizer step (the effective batch, over all processes)
    micro_batch_size: int = 4  # rows per forward pass on one device; batch_size / this = accumulation
    num_epochs: float = 3  # passes over the training rows
    learning_rate: float = 3e-4  # peak learning rate (linear warm-up, then linear decay)
    cutoff_len: int = 256  # tokens per row; longer rows are cut (and counted)
    val_set_size: float | None = None  # validation rows: a count, a fraction (<1) or 0; default 500 (or a tenth)
    max_steps: int = -1  # stop after this many optimizer steps (-1: run num_epochs)
    warmup_steps: int = 100  # linear warm-up steps (capped at a fifth of the run)
    seed: int = 42  # seeds the split, the sampling order, LoRA init and dropout
    save_steps: int = 200  # checkpoint every N optimizer steps
    eval_steps: int = 200  # validation every N optimizer steps
    logging_steps: int = 10  # log the training loss (and a progress line) every N optimizer steps
    save_total_limit: int = 3  # keep at most this many checkpoint-N folders
    precision: str = "auto"  # auto | bf16 | fp16 | fp32 (auto: native bf16 on the GPU, else fp16; fp32 on CPU)
    gradient_checkpointing: bool = False  # recompute activations: less memory, ~30% slower
    attn_implementation: str = ""  # sdpa | eager | flash_attention_2 (packed rows run as varlen) | ...; "": default
    load_8bit: bool = False  # load the frozen base in 8-bit (CUDA + bitsandbytes)
    load_4bit: bool = False  # QLoRA: load the frozen base in 4-bit nf4 (CUDA + bitsandbytes)
    deepspeed: str = ""  # DeepSpeed JSON config, e.g. configs/deepspeed/zero2.json (launch with torchrun/accelerate)
    # lora hyperparams
    lora_r: int = 8  # LoRA rank
    lora_alpha: float = 16  # LoRA scaling numerator (scale = alpha / r)
    lora_dropout: float = 0.05  # dropout on the LoRA input, in [0, 1)
    lora_target_modules: str | list[str] | None = None  # e.g. q_proj,v_proj or all-linear; default by architecture
    # llm hyperparams
    train_on_inputs: bool = False  # also learn the prompt tokens (default: only the answer counts in the loss)
    group_by_length: bool = False  # with --packing False: batch rows of similar length (less padding)
    packing: bool = True  # same rows per step, packed (Bloom: length buckets); False: the original padded batches
    pack_len: int = 0  # tokens per packed row (0: --cutoff_len)
    micro_batch_tokens: int = 0  # with packing: split a step into more micro-batches above this many tokens (0: never)
    # wandb params
    wandb_project: str = ""  # report to this wandb project (or set WANDB_PROJECT); off by default
    wandb_run_name: str = ""  # run name shown in wandb
    wandb_watch: str = ""  # false | gradients | all
    wandb_log_model: str = ""  # false | true: upload checkpoints to wandb
    report_to: str = ""  # extra loggers, e.g. tensorboard
    # runs
    resume_from_checkpoint: str | bool | None = None  # a checkpoint-N folder, or True for the newest in output_dir
    resume_weights_only: bool = False  # resume a checkpoint that lacks its optimizer/scheduler/RNG state anyway
    prompt_template_name: str = "med_template"  # a name in templates/ or a path to a template JSON
    trust_remote_code: bool = False  # allow a hub model's own Python code to run
    overwrite: bool = False  # replace an earlier run's adapter and checkpoints in output_dir

    __option_checks__: ClassVar[dict[str, Check]] = {
        "batch_size": AT_LEAST_ONE, "micro_batch_size": AT_LEAST_ONE, "num_epochs": POSITIVE,
        "learning_rate": POSITIVE, "cutoff_len": AT_LEAST_ONE, "val_set_size": NON_NEGATIVE,
        "max_steps": Check(low=-1), "warmup_steps": NON_NEGATIVE, "seed": SEED, "save_steps": AT_LEAST_ONE,
        "eval_steps": AT_LEAST_ONE, "logging_steps": AT_LEAST_ONE, "save_total_limit": NON_NEGATIVE,
        "lora_r": AT_LEAST_ONE, "lora_alpha": POSITIVE, "lora_dropout": DROPOUT, "pack_len": NON_NEGATIVE,
        "micro_batch_tokens": NON_NEGATIVE,
    }


DEFAULTS = FinetuneArgs()
