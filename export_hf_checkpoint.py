"""Merge a LoRA adapter into its base model and save a full Hugging Face checkpoint (safetensors).

    python export_hf_checkpoint.py --base_model models/tiny-llama --lora_weights lora-bentsao --output_dir hf_ckpt
    BASE_MODEL=/path/to/llama-7b-hf python export_hf_checkpoint.py --lora_weights lora-bentsao

Works for any causal LM peft can merge. Before saving, it checks that the merged model's logits equal the
base + adapter's on a probe input.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from utils.core.cli import run_cli
from utils.core.errors import UserError
from utils.model import check_tokenizer_fits, load_adapter, load_tokenizer
from utils.validate import check_adapter, check_base_model, check_tokenizer_fits_config

PROBE_TEXT = "下面是一个问题，运用医学知识来正确回答提问.\n### 问题:\n高血压有哪些常见症状？\n### 回答:\n"


@torch.inference_mode()
def probe_logits(model, tokenizer) -> torch.Tensor:
    encoded = tokenizer(PROBE_TEXT, return_tensors="pt")
    return model(**encoded).logits.float()


def tolerance(dtype: torch.dtype) -> float:
    """Merging rounds W + BA once; in half precision that moves logits by about the format's resolution."""
    return 1e-4 if dtype == torch.float32 else 5e-2


def main(
    base_model: str = "",  # base model folder or hub id (default: the BASE_MODEL environment variable)
    lora_weights: str = "",  # adapter folder written by finetune.py
    output_dir: str = "./hf_ckpt",  # where the merged checkpoint goes
    max_shard_size: str = "5GB",  # largest safetensors file
    dtype: str = "auto",  # auto (as stored in the base checkpoint) | fp32 | fp16 | bf16
    trust_remote_code: bool = False,  # allow a hub model's own Python code to run
) -> None:
    """Merge --lora_weights into --base_model with peft's merge_and_unload and save to --output_dir."""
    from transformers import AutoModelForCausalLM

    base_model = base_model or os.environ.get("BASE_MODEL", "")
    if not base_model:
        raise UserError("--base_model (or the BASE_MODEL environment variable) is required")
    if not lora_weights:
        raise UserError("--lora_weights is required: the adapter folder to merge")
    dtypes = {"auto": "auto", "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if dtype not in dtypes:
        raise UserError(f"--dtype must be one of {', '.join(dtypes)}, got {dtype!r}")
    check_base_model(base_model, trust_remote_code)
    if Path(output_dir).resolve() in (Path(base_model).resolve(), Path(lora_weights).resolve()):
        raise UserError(
            f"--output_dir {output_dir} would overwrite the base model or the adapter; choose another folder"
        )
    check_adapter(lora_weights, base_model, trust_remote_code)  # present, safe to load, made for this base

    tokenizer = load_tokenizer(base_model, trust_remote_code=trust_remote_code)
    check_tokenizer_fits_config(tokenizer, base_model)
    try:
        base = AutoModelForCausalLM.from_pretrained(
            base_model, dtype=dtypes[dtype], device_map={"": "cpu"}, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as error:
        raise UserError(f"could not load {base_model}: {str(error).strip().splitlines()[0]}") from None
    check_tokenizer_fits(tokenizer, base, base_model)
    model = load_adapter(base, lora_weights)
    model.eval()
    expected = probe_logits(model, tokenizer)

    merged = model.merge_and_unload()
    actual = probe_logits(merged, tokenizer)
    difference = (expected - actual).abs().max().item()
    limit = tolerance(merged.dtype)
    if difference > limit:
        raise UserError(f"the merged model's logits differ from base + adapter by {difference:.2e} (> {limit:.0e})")
    print(f"merge check: max |logit difference| = {difference:.2e} on the probe (limit {limit:.0e})")

    merged.save_pretrained(output_dir, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(output_dir)
    print(f"merged checkpoint saved to {Path(output_dir).resolve()}")


if __name__ == "__main__":
    run_cli(main)
