"""The flags of finetune.py, once: each field holds its type, default, help (what `--help` shows) and range."""

from __future__ import annotations

from dataclasses import dataclass

from utils.core.cli import flag
from utils.model.gguf import GGUF_FILE_HELP, fold_gguf_file
from utils.runtime import PRECISIONS

ATTENTION_IMPLEMENTATIONS = ("", "eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


@dataclass(frozen=True)
class FinetuneArgs:
    """The flags of finetune.py (the original BenTsao / alpaca-lora names); `--help` shows each comment."""

    # model/data params
    base_model: str = flag("", "local folder, hub id (org/name) or .gguf file of the base model (required)")
    gguf_file: str = flag("", GGUF_FILE_HELP)
    data_path: str = flag("data/llama_data.json", "JSON Lines or JSON array of {instruction, input, output}")
    output_dir: str = flag("./lora-bentsao", "where checkpoints and the final adapter go")
    # training hyperparams
    batch_size: int = flag(128, "rows per optimizer step (the effective batch, over all processes)", low=1)
    micro_batch_size: int = flag(4, "rows per forward pass on one device; batch_size / this = accumulation", low=1)
    num_epochs: float = flag(3, "passes over the training rows", above=0)
    learning_rate: float = flag(3e-4, "peak learning rate (linear warm-up, then linear decay)", above=0)
    cutoff_len: int = flag(256, "tokens per row; longer rows are cut (and counted)", low=1)
    val_set_size: float | None = flag(None, "validation rows: a count, a fraction (<1) or 0; default 500 (or a "
                                      "tenth of a small file)", low=0)
    max_steps: int = flag(-1, "stop after this many optimizer steps (-1: run num_epochs)", low=-1)
    warmup_steps: int = flag(100, "linear warm-up steps (capped at a fifth of the run)", low=0)
    seed: int = flag(42, "seeds the split, the sampling order, LoRA init and dropout", low=0, high=2**32 - 1)
    save_steps: int = flag(200, "checkpoint every N optimizer steps", low=1)
    eval_steps: int = flag(200, "validation every N optimizer steps", low=1)
    logging_steps: int = flag(10, "log the training loss (and a progress line) every N optimizer steps", low=1)
    save_total_limit: int = flag(3, "keep at most this many checkpoint-N folders", low=0)
    precision: str = flag("auto", "(auto: native bf16 on the GPU, else fp16; fp32 on CPU)", choices=PRECISIONS)
    gradient_checkpointing: bool = flag(False, "recompute activations: less memory, ~30% slower")
    attn_implementation: str = flag("", "empty: transformers' default (sdpa); flash_attention_2/3 run packed rows as "
                                        "varlen (CUDA + flash-attn)", choices=ATTENTION_IMPLEMENTATIONS)
    load_8bit: bool = flag(False, "load the frozen base in 8-bit (CUDA + bitsandbytes)")
    load_4bit: bool = flag(False, "QLoRA: load the frozen base in 4-bit nf4 (CUDA + bitsandbytes)")
    deepspeed: str = flag("", "DeepSpeed JSON config, e.g. configs/deepspeed/zero2.json (launch with torchrun)")
    # lora hyperparams
    lora_r: int = flag(8, "LoRA rank", low=1)
    lora_alpha: float = flag(16, "LoRA scaling numerator (scale = alpha / r)", above=0)
    lora_dropout: float = flag(0.05, "dropout on the LoRA input", low=0, below=1)
    lora_target_modules: str = flag("", "e.g. q_proj,v_proj or all-linear; default by architecture")
    # llm hyperparams
    train_on_inputs: bool = flag(False, "also learn the prompt tokens (default: only the answer counts in the loss)")
    group_by_length: bool = flag(False, "with --packing False: batch rows of similar length (less padding)")
    packing: bool = flag(True, "same rows per step, packed (Bloom: length buckets); False: the original padded batches")
    pack_len: int = flag(0, "tokens per packed row (0: --cutoff_len)", low=0)
    micro_batch_tokens: int = flag(0, "with packing: more micro-batches per step above this many tokens (0: never)",
                                   low=0)
    # wandb params
    wandb_project: str = flag("", "report to this wandb project (or set WANDB_PROJECT); off by default")
    wandb_run_name: str = flag("", "run name shown in wandb")
    wandb_watch: str = flag("", "false | gradients | all")
    wandb_log_model: str = flag("", "false | true: upload checkpoints to wandb")
    report_to: str = flag("", "extra loggers, e.g. tensorboard")
    # runs
    resume_from_checkpoint: str | bool | None = flag(None, "a checkpoint-N folder, or True for the newest in "
                                                           "output_dir")
    resume_weights_only: bool = flag(False, "resume a checkpoint that lacks its optimizer/scheduler/RNG state anyway")
    prompt_template_name: str = flag("med_template", "a name in templates/ or a path to a template JSON")
    trust_remote_code: bool = flag(False, "allow a hub model's own Python code to run")
    overwrite: bool = flag(False, "replace an earlier run's adapter and checkpoints in output_dir")

    def __post_init__(self) -> None:
        fold_gguf_file(self)
