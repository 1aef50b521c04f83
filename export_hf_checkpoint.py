"""Merge a LoRA adapter into its base model and save a full Hugging Face checkpoint (safetensors).

    python export_hf_checkpoint.py --base_model models/tiny-llama --lora_weights lora-bentsao --output_dir hf_ckpt
    BASE_MODEL=/path/to/llama-7b-hf python export_hf_checkpoint.py --lora_weights lora-bentsao

Works for any causal LM peft can merge. The recipe: validate_args -> load -> merge_checked -> save_checked. Before
saving it checks that the merged model's logits equal base + adapter's on a probe input, within the rounding of the
model's precision, and that the adapter's effect survived the merge; the checkpoint is written into a staging folder
and renamed into place only once it reads back.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from utils.core.cli import run_cli
from utils.core.errors import UserError, raise_problems
from utils.core.io import check_output_dir, replace_folder, write_failure
from utils.model.checks import check_adapter, check_base_model
from utils.model.loading import gguf_path, load_adapter, load_checked

PROBE_TEXT = "下面是一个问题，运用医学知识来正确回答提问.\n### 问题:\n高血压有哪些常见症状？\n### 回答:\n"
DTYPES = {"auto": "auto", "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)?\s*$", re.IGNORECASE)
UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
# Merging rounds W + s·BA once per weight; in half precision every layer's output then moves by a few units of the
# format's rounding, which grows with the logits' magnitude. The limit is relative to that magnitude.
ROUNDING_UNITS = 32
# The weight-level check copies a sampled layer's W and ΔW in fp32: layers larger than this (a 150k-token embedding
# or LM head) are left to the logits check, so the check costs at most a few GB even for a 70B model.
MAX_CHECKED_ELEMENTS = 256 * 2**20


def shard_size_bytes(max_shard_size: Any) -> int:
    """`--max_shard_size` (5GB, 500MB, 2GiB or a byte count) in bytes, or one clear error."""
    match = SIZE.match(str(max_shard_size))
    if not match or float(match.group(1)) <= 0:
        raise UserError(f"--max_shard_size must be a size such as 5GB, 500MB or 2GiB, got {max_shard_size!r}")
    return int(float(match.group(1)) * UNITS[(match.group(2) or "B").upper()])


# What a checkpoint folder holds (save_pretrained, a tokenizer, a hub download's extras). `--overwrite` replaces the
# whole folder, so a folder holding anything else (your notes, code, another run) is never replaced.
CHECKPOINT_FILES = re.compile(
    r"^(config\.json|generation_config\.json|(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)"
    r"|(model\.safetensors|pytorch_model\.bin)\.index\.json|tokenizer(_config)?\.json|tokenizer\.model"
    r"|special_tokens_map\.json|added_tokens\.json|vocab\.(json|txt)|merges\.txt|chat_template\.(jinja|json)"
    r"|README\.md|LICENSE(\.\w+)?|NOTICE|\.gitattributes|bentsao_training\.json)$")


def holds_model(folder: Path) -> bool:
    return (folder / "config.json").is_file() or any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))


def output_problems(output_dir: str, base_model: str, lora_weights: str, overwrite: bool) -> list[str]:
    """--output_dir is a new or empty folder, or (with --overwrite) one that holds a checkpoint and nothing else;
    never the base model, the adapter, a folder inside them, or the folder this command runs in."""
    output = Path(output_dir).expanduser()
    try:
        check_output_dir(output, "--output_dir", protected={"the base model": base_model, "the adapter": lora_weights})
    except UserError as error:
        return [str(error)]
    if not output.is_dir():
        return []
    if Path.cwd().resolve().is_relative_to(output.resolve()):
        return [f"--output_dir {output_dir}: is the folder this command runs in (or holds it); choose another folder"]
    foreign = sorted(entry.name for entry in output.iterdir()
                     if not entry.is_file() or not CHECKPOINT_FILES.match(entry.name))
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        return [(f"--output_dir {output_dir}: holds {shown} (not part of a model checkpoint); the export replaces "
                 "the whole folder, so choose a new or empty folder")]
    if holds_model(output) and not overwrite:
        return [(f"--output_dir {output_dir} already holds a model; replace it with --overwrite True, or choose "
                 "another folder")]
    return []


def validate_args(base_model: str, lora_weights: str, output_dir: str, max_shard_size: Any, dtype: str,
                  overwrite: bool, trust_remote_code: bool) -> None:
    """Every problem with the options, before anything loads: no existing model is replaced without --overwrite,
    and no folder that holds anything else is replaced at all."""
    problems = []
    if not base_model:
        problems.append("--base_model (or the BASE_MODEL environment variable) is required")
    if not lora_weights:
        problems.append("--lora_weights is required: the adapter folder to merge")
    if dtype not in DTYPES:
        problems.append(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    problems += output_problems(output_dir, base_model, lora_weights, overwrite)
    for check in (lambda: shard_size_bytes(max_shard_size),
                  lambda: base_model and check_base_model(base_model, trust_remote_code)):
        try:
            check()
        except UserError as error:
            problems.append(str(error))
    raise_problems(problems)
    check_adapter(lora_weights, base_model, trust_remote_code)  # present, safe, finite, made for this base


@torch.inference_mode()
def probe_logits(model: Any, tokenizer: Any) -> torch.Tensor:
    encoded = tokenizer(PROBE_TEXT, return_tensors="pt")
    return model(**encoded).logits.float()


def merge_limit(dtype: torch.dtype, scale: float) -> float:
    """The largest logit difference rounding explains: 1e-4 in fp32; ROUNDING_UNITS of the format's unit roundoff
    times the logits' magnitude in half precision."""
    if dtype == torch.float32:
        return 1e-4
    return max(1e-3, ROUNDING_UNITS * torch.finfo(dtype).eps / 2 * scale)


def sampled_lora_layers(model: Any, most: int = 4) -> list[tuple[str, Any]]:
    """Up to `most` LoRA-wrapped layers, spread over the depth (the first, the last and between)."""
    from peft.tuners.lora import LoraLayer

    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)
              and module.get_base_layer().weight.numel() <= MAX_CHECKED_ELEMENTS]
    if len(layers) <= most:
        return layers
    return [layers[round(i * (len(layers) - 1) / (most - 1))] for i in range(most)]


def expected_merges(model: Any) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """For a few LoRA layers, before merging: (name in the merged model, base weight, the adapter's delta W), in
    fp32, where the weights are real tensors (not offloaded to the meta device)."""
    expected = []
    for name, layer in sampled_lora_layers(model):
        weight = layer.get_base_layer().weight
        if weight.device.type == "meta" or weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            continue  # offloaded or quantized: the logits check covers them
        delta = sum(layer.get_delta_weight(adapter) for adapter in layer.active_adapters)
        expected.append((name.removeprefix("base_model.model."), weight.detach().float().clone(),
                         torch.as_tensor(delta).detach().float()))
    return expected


def weights_problem(merged: Any, expected: list[tuple[str, torch.Tensor, torch.Tensor]]) -> tuple[str | None, int]:
    """Whether each sampled merged weight is W + ΔW (closer to it than to the bare W), wherever ΔW stands out of the
    dtype's rounding of W + ΔW: a check that does not depend on the logits' scale, so a small adapter lost in the
    merge is caught also in bf16. Returns (the problem or None, how many weights could be compared)."""
    compared = 0
    for name, base, delta in expected:
        weight = merged.get_submodule(name).weight.detach().float()
        rounding = torch.finfo(merged.get_submodule(name).weight.dtype).eps / 2 * (base + delta).norm().item()
        if delta.norm().item() <= 4 * rounding:
            continue  # the adapter's change here is within one rounding of the weights: nothing to tell apart
        compared += 1
        kept, dropped = (weight - base - delta).norm().item(), (weight - base).norm().item()
        if not kept < dropped:
            return (f"{name}: the merged weight is not base + adapter (|W_merged - W - ΔW| = {kept:.2e}, "
                    f"|ΔW| = {delta.norm().item():.2e})"), compared
    return None, compared


def merge_checked(model: Any, tokenizer: Any) -> Any:
    """peft's `merge_and_unload`, accepted only when the merged logits are finite, equal base + adapter within the
    rounding of the dtype, and keep the adapter's effect: in the logits (closer to base + adapter than the bare base
    is) and in a few merged weights (W + ΔW, in fp32)."""
    expected = probe_logits(model, tokenizer)
    with model.disable_adapter():
        bare = probe_logits(model, tokenizer)
    weights = expected_merges(model)
    merged = model.merge_and_unload()
    actual = probe_logits(merged, tokenizer)
    if not torch.isfinite(actual).all() or not torch.isfinite(expected).all():
        raise UserError("the merged model computes NaN/inf logits; the base or the adapter is broken (nothing saved)")
    difference = (expected - actual).abs().max().item()
    effect = (expected - bare).abs().max().item()
    limit = merge_limit(merged.dtype, expected.abs().max().item())
    if not difference <= limit:
        raise UserError(f"the merged model's logits differ from base + adapter by {difference:.2e} (> {limit:.1e}, "
                        f"what {str(merged.dtype).removeprefix('torch.')} rounding explains); nothing saved")
    lost, compared = weights_problem(merged, weights)
    if lost or (effect > limit and not difference <= effect / 2):
        raise UserError(f"the merge lost the adapter's effect ({lost or f'merged vs base + adapter {difference:.2e}'}"
                        f", adapter effect on the logits {effect:.2e}); nothing saved")
    dtype = str(merged.dtype).removeprefix("torch.")
    print(f"merge check: max |logit difference| = {difference:.2e} on the probe (limit {limit:.1e}; the adapter "
          f"moves the logits by {effect:.2e}); {compared} of {len(weights)} sampled merged weights compared, each "
          f"W + ΔW" + (f" (the others' ΔW is within {dtype} rounding)" if compared < len(weights) else ""))
    if weights and not compared:
        print(f"warning: the adapter changes the sampled weights by less than {dtype} rounding, so the merged "
              f"checkpoint may not carry it; --dtype fp32 keeps it exactly", file=sys.stderr)
    return merged


def save_checked(merged: Any, tokenizer: Any, output_dir: str, max_shard_size: int) -> Path:
    """Write the checkpoint into a staging folder beside `output_dir`, read it back, then rename it into place."""
    from safetensors import safe_open

    target = Path(output_dir).expanduser().resolve()
    staging = target.with_name(f".tmp-{target.name}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        merged.save_pretrained(staging, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(staging)
        shards = sorted(staging.glob("*.safetensors"))
        if not (staging / "config.json").is_file() or not shards:
            raise UserError(f"the checkpoint written to {staging} is incomplete (no config.json or weights)")
        names = set()
        for shard in shards:
            with safe_open(str(shard), framework="pt") as handle:
                names.update(handle.keys())
        expected = set(merged.state_dict())
        missing = {name for name in expected - names if not name.endswith("lm_head.weight")}  # tied heads
        if missing:
            raise UserError(f"the saved checkpoint lacks {len(missing)} tensors (e.g. {min(missing)})")
        replace_folder(staging, target)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        reason = write_failure(error) or error.strerror or str(error)
        raise UserError(f"cannot write {output_dir}: {reason} (nothing was replaced)") from error
    except Exception as error:
        shutil.rmtree(staging, ignore_errors=True)
        reason = write_failure(error)  # safetensors and tokenizers raise their own types for a full disk
        if reason is None:
            raise
        raise UserError(f"cannot write {output_dir}: {reason} (nothing was replaced)") from error
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def main(
    base_model: str = "",  # base model folder or hub id (default: the BASE_MODEL environment variable)
    gguf_file: str = "",  # with a folder --base_model: the GGUF file in it to load (a .gguf --base_model needs none)
    lora_weights: str = "",  # adapter folder written by finetune.py
    output_dir: str = "./hf_ckpt",  # where the merged checkpoint goes
    max_shard_size: str = "5GB",  # largest safetensors file (5GB, 500MB, 2GiB, ...)
    dtype: str = "auto",  # auto (as stored in the base checkpoint) | fp32 | fp16 | bf16
    overwrite: bool = False,  # replace a model already in --output_dir
    trust_remote_code: bool = False,  # allow a hub model's own Python code to run
) -> None:
    """Merge --lora_weights into --base_model with peft's merge_and_unload and save to --output_dir."""
    base_model = gguf_path(base_model or os.environ.get("BASE_MODEL", ""), gguf_file)
    validate_args(base_model, lora_weights, output_dir, max_shard_size, dtype, overwrite, trust_remote_code)
    base, tokenizer = load_checked(base_model, precision="fp32", device="cpu", trust_remote_code=trust_remote_code,
                                   device_map={"": "cpu"}, dtype=DTYPES[dtype])
    model = load_adapter(base, lora_weights)
    model.eval()
    merged = merge_checked(model, tokenizer)
    saved = save_checked(merged, tokenizer, output_dir, shard_size_bytes(max_shard_size))
    print(f"merged checkpoint saved to {saved.resolve()}")


if __name__ == "__main__":
    run_cli(main)
