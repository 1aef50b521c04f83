"""What is checked about a model or an adapter beyond what `from_pretrained` checks itself; each check names the
failure it prevents.

- quantisation: bitsandbytes needs CUDA and its package (else a traceback deep inside loading);
- the tokenizer fits the embeddings (a Chinese-LLaMA tokenizer on a LLaMA base indexes past the table mid-run);
- a loaded adapter: peft accepts NaN weights silently, and weights it cannot place (renamed keys, untargeted
  modules, another PEFT type) with only a warning, keeping fresh weights in their place; `bentsao_training.json`
  says which base an adapter was trained on.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from utils.core.errors import UserError, raise_problems
from utils.core.io import read_json_object
from utils.model.source import is_hub_id, source_problems

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
TRAINING_METADATA = "bentsao_training.json"  # what an adapter was trained with (written by finetune.py)


def quantization_problems(load_8bit: bool, load_4bit: bool) -> list[str]:
    if load_8bit and load_4bit:
        return ["--load_8bit and --load_4bit exclude each other: choose one"]
    if not (load_8bit or load_4bit):
        return []
    if not torch.cuda.is_available():
        return ["8-bit/4-bit loading needs a CUDA GPU and bitsandbytes; drop --load_8bit/--load_4bit on this machine"]
    try:
        import bitsandbytes  # noqa: F401 - the project's one import of it: only for these flags
    except ImportError:
        return ["8-bit/4-bit loading needs bitsandbytes: pip install -r requirements-gpu.txt"]
    return []


def quantization_config(load_8bit: bool, load_4bit: bool, compute_dtype: torch.dtype) -> Any:
    """A `BitsAndBytesConfig` for 8-bit or 4-bit (QLoRA: nf4, double quantisation) loading, or None."""
    raise_problems(quantization_problems(load_8bit, load_4bit))
    if not (load_8bit or load_4bit):
        return None
    from transformers import BitsAndBytesConfig

    if load_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def config_embedding_rows(base_model: str) -> int | None:
    """The embedding rows a local base model's config.json declares (None for a hub id: known once it loads)."""
    path = Path(base_model).expanduser() / "config.json"
    config = read_json_object(path) if path.is_file() else {}
    rows = config.get("vocab_size", (config.get("text_config") or {}).get("vocab_size"))
    return rows if isinstance(rows, int) else None


def check_tokenizer_fits(tokenizer: Any, rows: int | None, base_model: str) -> None:
    if rows is not None and len(tokenizer) > rows:
        raise UserError(f"{base_model}: the tokenizer has {len(tokenizer)} tokens but the model's embeddings only "
                        f"{rows}; use the tokenizer that belongs to this model (e.g. a merged Chinese-LLaMA/Alpaca "
                        "checkpoint, whose embeddings were resized)")


def linear_layers(model: Any) -> dict[str, tuple[int, int]]:
    """Module path -> (in_features, out_features) of every layer LoRA can wrap: `nn.Linear` and its subclasses
    (bitsandbytes' Linear8bitLt/Linear4bit are ones), and GPT-2's Conv1D."""
    from transformers.pytorch_utils import Conv1D

    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            layers[name] = (int(module.in_features), int(module.out_features))
        elif isinstance(module, Conv1D):  # weight stored transposed: (in, out)
            layers[name] = (int(module.weight.shape[0]), int(module.nf))
    return layers


def adapter_source_problems(lora_weights: str) -> list[str]:
    """An adapter folder holds adapter_config.json and its weights (peft would take a folder without them for a hub
    id and answer with a validation error about repository names)."""
    problems = source_problems(lora_weights, "--lora_weights", ADAPTER_CONFIG)
    folder = Path(lora_weights).expanduser()
    if not problems and folder.is_dir() and not any((folder / name).is_file() for name in ADAPTER_WEIGHTS):
        problems.append(f"--lora_weights {lora_weights}: the folder has no {' or '.join(ADAPTER_WEIGHTS)}")
    return problems


def check_loaded_adapter(model: Any, lora_weights: str, label: str = "") -> None:
    """Refuse what peft loads without an error (`label` names the adapter): NaN/inf weights, weights it could not
    place (fresh ones are used instead), an adapter trained on another base; warn if every lora_B is zero."""
    from peft import get_peft_model_state_dict
    from peft.utils import load_peft_weights

    saved = load_peft_weights(lora_weights, device="cpu")
    placed = get_peft_model_state_dict(model, save_embedding_layers=False)  # "auto" would ask the hub about the base
    problems = []
    broken = sorted(name for name, t in saved.items() if t.is_floating_point() and not torch.isfinite(t).all())
    if broken:
        problems.append(f"{len(broken)} of its tensors hold NaN or inf (e.g. {broken[0]}): the run that wrote it "
                        "diverged")
    for unmatched, what in ((sorted(set(saved) - set(placed)), "this base or the adapter's config has no place for"),
                            (sorted(set(placed) - set(saved)), "its weights file lacks")):
        if unmatched:
            problems.append(f"{what} {len(unmatched)} of its tensors (e.g. {unmatched[0]}): peft would train or "
                            "answer with fresh weights there")
    metadata = Path(lora_weights).expanduser() / TRAINING_METADATA
    if not is_hub_id(lora_weights) and metadata.is_file():
        trained = read_json_object(metadata)
        config = model.get_base_model().config
        here = {"model_type": config.model_type, "hidden_size": getattr(config.get_text_config(), "hidden_size", None),
                "vocab_size": model.get_base_model().get_input_embeddings().num_embeddings}
        problems += [f"it was trained on a base with {name} {trained[name]}, this base has {value}"
                     for name, value in here.items() if trained.get(name) not in (None, value)]
    if problems:
        raise UserError(f"{label or '--lora_weights ' + lora_weights} does not fit this base model: "
                        f"{'; '.join(problems)}")
    lora_b = [t for name, t in saved.items() if "lora_B" in name]
    if lora_b and not any(torch.count_nonzero(t).item() for t in lora_b):
        print(f"warning: every lora_B weight of {lora_weights} is zero, so the adapter changes nothing (an untrained "
              "adapter?); the answers are the base model's", file=sys.stderr, flush=True)
