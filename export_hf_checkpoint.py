"""Merge a LoRA adapter into its base model and save a full Hugging Face checkpoint (safetensors).

    python export_hf_checkpoint.py --base_model models/tiny-llama --lora_weights lora-bentsao --output_dir hf_ckpt
    BASE_MODEL=/path/to/llama-7b-hf python export_hf_checkpoint.py --lora_weights lora-bentsao

Works for any causal LM peft can merge. The recipe: validate_args -> load -> merge_checked -> save_checked. Before
saving it checks that the merged model's logits equal base + adapter's on a probe input, within the rounding of the
model's precision, and that the adapter's effect survived the merge; the checkpoint is written into a staging folder
and renamed into place only once it reads back.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from utils.core.cli import flag, run_cli
from utils.core.errors import UserError, raise_problems
from utils.core.io import output_dir_problems, replace_folder
from utils.model.checks import adapter_source_problems
from utils.model.gguf import GGUF_FILE_HELP, fold_gguf_file
from utils.model.loading import load_adapter, load_base_model, load_tokenizer
from utils.model.source import source_problems

PROBE_TEXT = "下面是一个问题，运用医学知识来正确回答提问.\n### 问题:\n高血压有哪些常见症状？\n### 回答:\n"
DTYPES = {"auto": "auto", "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)?\s*$", re.IGNORECASE)
UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
# Merging rounds W + s·BA once per weight; every layer's output then moves by a few units of the format's rounding,
# which grows with the logits' magnitude and the depth (SmolLM2-135M's 30 fp32 layers: 1.1e-4 on logits of ~20).
ROUNDING_UNITS = 32
# The weight-level check copies a sampled layer's W and ΔW in fp32: layers larger than this (a 150k-token embedding
# or LM head) are left to the logits check, so the check costs at most a few GB even for a 70B model.
MAX_CHECKED_ELEMENTS = 256 * 2**20


def shard_size_bytes(max_shard_size: str) -> int:
    """`--max_shard_size` (5GB, 500MB, 2GiB or a byte count, checked by `validate`) in bytes."""
    match = SIZE.match(max_shard_size)
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


@dataclass(frozen=True)
class ExportArgs:
    """The flags of export_hf_checkpoint.py."""

    base_model: str = flag("", "base model folder, hub id or .gguf file (default: the BASE_MODEL environment variable)")
    gguf_file: str = flag("", GGUF_FILE_HELP)
    lora_weights: str = flag("", "adapter folder written by finetune.py")
    output_dir: str = flag("./hf_ckpt", "where the merged checkpoint goes")
    max_shard_size: str = flag("5GB", "largest safetensors file (5GB, 500MB, 2GiB, ...)")
    dtype: str = flag("auto", "auto: as stored in the base checkpoint", choices=tuple(DTYPES))
    overwrite: bool = flag(False, "replace a model already in --output_dir")
    trust_remote_code: bool = flag(False, "allow a hub model's own Python code to run")

    def __post_init__(self) -> None:
        object.__setattr__(self, "base_model", self.base_model or os.environ.get("BASE_MODEL", ""))
        fold_gguf_file(self)


def validate(args: ExportArgs) -> list[str]:
    """Every problem with the options, before anything loads: --output_dir is a new or empty folder, or (with
    --overwrite) one that holds a checkpoint and nothing else; never the base model, the adapter, a folder inside
    them, or the folder this command runs in."""
    problems = []
    if not SIZE.match(args.max_shard_size) or shard_size_bytes(args.max_shard_size) <= 0:
        problems.append(f"--max_shard_size must be a size such as 5GB, 500MB or 2GiB, got {args.max_shard_size!r}")
    problems += source_problems(args.base_model, "--base_model", "config.json")
    problems += adapter_source_problems(args.lora_weights)
    output = Path(args.output_dir).expanduser()
    where = output_dir_problems(output, "--output_dir", protected=[args.base_model, args.lora_weights])
    if where or not output.is_dir():
        return problems + where
    if Path.cwd().resolve().is_relative_to(output.resolve()):
        return [*problems, f"--output_dir {output}: is the folder this command runs in (or holds it)"]
    foreign = sorted(entry.name for entry in output.iterdir()
                     if not entry.is_file() or not CHECKPOINT_FILES.match(entry.name))
    if foreign:
        problems.append(f"--output_dir {output}: holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''} "
                        "(not part of a model checkpoint); the export replaces the whole folder, so choose a new or "
                        "empty folder")
    elif holds_model(output) and not args.overwrite:
        problems.append(f"--output_dir {output} already holds a model; replace it with --overwrite True, or choose "
                        "another folder")
    return problems


@torch.inference_mode()
def probe_logits(model: Any, tokenizer: Any) -> torch.Tensor:
    encoded = tokenizer(PROBE_TEXT, return_tensors="pt").to(model.device)
    return model(**encoded).logits.float()


def merge_limit(dtype: torch.dtype, scale: float, layers: int = 1) -> float:
    """The largest logit difference rounding explains: ROUNDING_UNITS of the format's unit roundoff times the logits'
    magnitude, growing with the square root of the depth (each layer adds its own rounding); at least 1e-4 in fp32
    (1e-3 in half precision)."""
    floor = 1e-4 if dtype == torch.float32 else 1e-3
    return max(floor, ROUNDING_UNITS * torch.finfo(dtype).eps / 2 * scale * math.sqrt(max(layers, 1)))


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


def merge_mismatch(merged: torch.Tensor, base: torch.Tensor, delta: torch.Tensor) -> tuple[int, int]:
    """(elements of `merged` farther than one unit in the last place from round(W + ΔW) in `merged`'s dtype,
    elements whose ΔW is larger than that unit). A merge adds ΔW once and rounds once, so a right merge is within one
    unit everywhere; a merge that lost or mis-scaled ΔW (0.75x, 1.5x) is off by more wherever ΔW exceeds a few units."""
    expected = (base.float() + delta.float()).to(merged.dtype).float()
    info = torch.finfo(merged.dtype)
    unit = torch.ldexp(torch.full_like(expected, info.eps / 2), torch.frexp(expected).exponent)  # |x| in [2^(e-1), 2^e)
    unit = unit.clamp_min(info.smallest_normal * info.eps)  # zero and subnormals: the subnormal spacing
    off = int(((merged.float() - expected).abs() > unit).sum())
    return off, int((delta.float().abs() > unit).sum())


def weights_problem(merged: Any, expected: list[tuple[str, torch.Tensor, torch.Tensor]]) -> tuple[str | None, int]:
    """Whether each sampled merged weight is round(W + ΔW) in the merged dtype, element by element (`merge_mismatch`):
    a check that does not depend on the logits' scale, so a lost or mis-scaled adapter is caught also in bf16.
    Returns (the problem or None, how many weights had a ΔW large enough to tell)."""
    compared = 0
    for name, base, delta in expected:
        weight = merged.get_submodule(name).weight.detach()
        off, telling = merge_mismatch(weight, base, delta)
        compared += bool(telling)
        if off:
            return (f"{name}: {off} of {weight.numel()} merged weights differ from W + ΔW by more than one unit of "
                    f"{str(weight.dtype).removeprefix('torch.')} rounding"), compared
    return None, compared


def merge_checked(model: Any, tokenizer: Any) -> Any:
    """peft's `merge_and_unload`, accepted only when the merged logits are finite, equal base + adapter within the
    rounding of the dtype, and keep the adapter's effect: in the logits (closer to base + adapter than the bare base
    is) and in a few merged weights (round(W + ΔW) in the merged dtype, element by element)."""
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
    layers = getattr(merged.config.get_text_config(), "num_hidden_layers", 1) or 1
    limit = merge_limit(merged.dtype, expected.abs().max().item(), layers)
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
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))  # short, and its own for each export
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
    except BaseException:  # a full disk (run_cli says so), a failed check: nothing was replaced
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def main(args: ExportArgs) -> None:
    """Merge --lora_weights into --base_model with peft's merge_and_unload and save to --output_dir."""
    raise_problems(validate(args))
    tokenizer = load_tokenizer(args.base_model, trust_remote_code=args.trust_remote_code)
    base = load_base_model(args.base_model, device="cpu", trust_remote_code=args.trust_remote_code,
                           device_map={"": "cpu"}, dtype=DTYPES[args.dtype], tokenizer=tokenizer)
    model = load_adapter(base, args.lora_weights)
    model.eval()
    merged = merge_checked(model, tokenizer)
    saved = save_checked(merged, tokenizer, args.output_dir, shard_size_bytes(args.max_shard_size))
    print(f"merged checkpoint saved to {saved.resolve()}")


if __name__ == "__main__":
    run_cli(main)
