"""Loading a base model, its tokenizer and a LoRA adapter: the one sequence every script follows.

tokenizer -> does it fit config.json -> weights -> does it fit the embeddings -> adapter (checked first). Everything
that can be checked without the weights is checked before them (`utils.model.checks`).
"""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path
from typing import Any

import torch

from utils.core.errors import UserError
from utils.model.checks import (
    TRAINING_METADATA,
    check_adapter,
    check_tokenizer_fits,
    config_embedding_rows,
    linear_layers,
    preflight_model,
    quantization_config,
)
from utils.model.source import check_model_source, hub_error
from utils.runtime import resolve_device, resolve_precision, torch_dtype

# LoRA targets by architecture when --lora_target_modules is not given (the published recipes' choices).
DEFAULT_LORA_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "bloom": ["query_key_value"],  # Bloom and Huozi (a Bloom-architecture model)
    "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"],
    "chatglm": ["query_key_value"],
    "gpt2": ["c_attn"],
    "baichuan": ["W_pack"],
}
NOT_LORA_TARGETS = ("lm_head", "score")


def gguf_path(base_model: str, gguf_file: str = "") -> str:
    """FOLDER/NAME for `--base_model FOLDER --gguf_file NAME`: one path from there on (the adapter records it)."""
    return str(Path(base_model, gguf_file)) if gguf_file else base_model


def gguf_kwargs(base_model: str) -> dict[str, str]:
    """`from_pretrained`'s arguments for a base: a `.gguf` file loads from its folder with `gguf_file=`
    (transformers reads the config and tokenizer from it); anything else as it is."""
    path = Path(base_model).expanduser()
    if path.suffix != ".gguf":
        return {"pretrained_model_name_or_path": base_model}
    return {"pretrained_model_name_or_path": str(path.parent), "gguf_file": str(path.resolve())}


def load_tokenizer(base_model: str, trust_remote_code: bool = False, padding_side: str = "right") -> Any:
    """The base model's tokenizer, with a pad token (unk or eos when the model has none, as LLaMA)."""
    from transformers import AutoTokenizer

    check_model_source(base_model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(**gguf_kwargs(base_model), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, json.JSONDecodeError) as error:
        raise hub_error(base_model, error) from error
    except Exception as error:  # the tokenizers library raises plain Exception/KeyError for a broken tokenizer.json
        raise UserError(f"could not load the tokenizer of {base_model}: {first_line(error)} (is tokenizer.json "
                        "damaged or from another library version?)") from error
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_base_model(
    base_model: str,
    precision: str = "auto",
    device: str | None = None,
    load_8bit: bool = False,
    load_4bit: bool = False,
    trust_remote_code: bool = False,
    device_map: Any = None,
    attn_implementation: str = "",
    dtype: Any = None,
) -> Any:
    """`AutoModelForCausalLM` in the resolved precision on `device` (or spread by `device_map`), with
    `attn_implementation` when one is given; `dtype` ("auto": as stored) overrides the precision."""
    from transformers import AutoModelForCausalLM, GgufConfig

    check_model_source(base_model)
    device = device or resolve_device()
    dtype = dtype if dtype is not None else torch_dtype(resolve_precision(precision, device))
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    quant = quantization_config(load_8bit, load_4bit, dtype if isinstance(dtype, torch.dtype) else torch.float16)
    if quant is not None:
        kwargs["quantization_config"] = quant
        device_map = device_map or {"": torch.cuda.current_device()}
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        if "gguf_file" in gguf_kwargs(base_model):  # unpacked: GGUF-packed weights neither train nor save
            kwargs["quantization_config"] = GgufConfig(dequantize=True)
        model = AutoModelForCausalLM.from_pretrained(**gguf_kwargs(base_model), **kwargs)
        model.name_or_path = base_model  # what an adapter records as its base: a .gguf file, not its folder
    except pickle.UnpicklingError as error:  # a pytorch_model.bin that is more than tensors: refused unread
        raise UserError(f"refusing to load {base_model}: a weights file in it is a pickle that is not plain "
                        f"tensors ({str(error).strip().splitlines()[0][:200]}); use safetensors weights") from None
    except (OSError, ValueError, json.JSONDecodeError) as error:
        raise hub_error(base_model, error) from error
    except Exception as error:  # RuntimeError, SafetensorError, ...: a truncated, corrupt or mismatched weights file
        if isinstance(error, torch.cuda.OutOfMemoryError):
            raise
        raise UserError(f"could not load the weights of {base_model}: {first_line(error)} (is a file truncated, "
                        "or config.json from another model?)") from error
    from transformers.integrations import is_deepspeed_zero3_enabled

    if device_map is None and not is_deepspeed_zero3_enabled():  # ZeRO-3: zero.Init placed the partitions already
        model.to(device)
    return model


def lora_target_names(model: Any) -> list[str]:
    """Leaf names of the linear layers LoRA can target (the output head excluded)."""
    return sorted({name.rsplit(".", 1)[-1] for name in linear_layers(model)} - set(NOT_LORA_TARGETS))


def resolve_lora_targets(model: Any, requested: str | list[str] | tuple[str, ...] | None) -> list[str] | str:
    """The architecture's default targets, `all-linear`, or the requested names checked against the model."""
    valid = lora_target_names(model)
    if requested in (None, "", [], ()):
        model_type = getattr(model.config, "model_type", "")
        targets = DEFAULT_LORA_TARGETS.get(model_type)
        if targets is None or not set(targets) <= set(valid):
            return "all-linear"
        return targets
    if isinstance(requested, str):
        if requested == "all-linear":
            return "all-linear"
        requested = [name.strip() for name in requested.strip("[]").split(",") if name.strip()]
    requested = [str(name).strip().strip("'\"") for name in requested]
    unknown = [name for name in requested if name not in valid]
    if unknown or not requested:
        raise UserError(
            f"--lora_target_modules: {', '.join(unknown) or 'nothing named'} not in this model; valid names: "
            f"{', '.join(valid)} (or all-linear)"
        )
    return requested


def read_training_metadata(lora_weights: str) -> dict[str, Any]:
    path = Path(lora_weights) / TRAINING_METADATA
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            return {}
        return data if isinstance(data, dict) else {}
    return {}


def load_adapter(model: Any, lora_weights: str, is_trainable: bool = False) -> Any:
    """Wrap `model` with the LoRA adapter in `lora_weights` (a folder, or a hub id)."""
    from peft import PeftModel

    # exists, has a config and safetensors or weights-only-loadable .bin weights, and fits this model's layers
    tensors = check_adapter(lora_weights, getattr(model, "name_or_path", None) or None, model=model)
    lora_b = [tensor for name, tensor in (tensors or {}).items() if "lora_B" in name]
    if lora_b and not any(torch.count_nonzero(tensor).item() for tensor in lora_b):
        print(f"warning: every lora_B weight of {lora_weights} is zero, so the adapter changes nothing (an untrained "
              "adapter?); the answers are the base model's", file=sys.stderr, flush=True)
    try:
        return PeftModel.from_pretrained(model, lora_weights, is_trainable=is_trainable)
    except pickle.UnpicklingError as error:  # peft loads .bin with weights_only=True; a hub .bin lands here
        raise UserError(
            f"refusing to load the adapter {lora_weights}: its weights are a pickle that is not plain tensors "
            f"({str(error).strip().splitlines()[0][:200]})"
        ) from None
    except RuntimeError as error:  # size mismatch: an adapter made for another base
        first = str(error).strip().splitlines()
        detail = next((line.strip() for line in first if "size mismatch" in line), first[0] if first else "")
        raise UserError(f"the adapter {lora_weights} does not fit this base model ({detail})") from error
    except Exception as error:  # OSError, ValueError, TypeError, KeyError: peft on a config or file it cannot use
        raise UserError(f"could not load the adapter {lora_weights}: {first_line(error)}") from error


def load_checked_tokenizer(base_model: str, trust_remote_code: bool = False, padding_side: str = "right") -> Any:
    """The base model's tokenizer, checked against its config.json (before any weights load)."""
    tokenizer = load_tokenizer(base_model, trust_remote_code=trust_remote_code, padding_side=padding_side)
    check_tokenizer_fits(tokenizer, config_embedding_rows(base_model), base_model)
    return tokenizer


def load_checked(
    base_model: str,
    *,
    precision: str,
    device: str,
    load_8bit: bool = False,
    load_4bit: bool = False,
    trust_remote_code: bool = False,
    device_map: Any = None,
    attn_implementation: str = "",
    padding_side: str = "right",
    dtype: Any = None,
    tokenizer: Any = None,
) -> tuple[Any, Any]:
    """(model, tokenizer): the tokenizer (or `tokenizer`, from `load_checked_tokenizer`), its fit to config.json,
    the weights, its fit to the loaded embeddings."""
    if tokenizer is None:
        tokenizer = load_checked_tokenizer(base_model, trust_remote_code=trust_remote_code, padding_side=padding_side)
    model = load_base_model(
        base_model, precision=precision, device=device, load_8bit=load_8bit, load_4bit=load_4bit,
        trust_remote_code=trust_remote_code, device_map=device_map, attn_implementation=attn_implementation,
        dtype=dtype,
    )
    embeddings = model.get_input_embeddings()  # num_embeddings: the full size, also when ZeRO-3 partitions the weight
    check_tokenizer_fits(tokenizer, getattr(embeddings, "num_embeddings", None), base_model)
    return model, tokenizer


def load_for_inference(
    base_model: str,
    lora_weights: str | None = None,
    precision: str = "auto",
    load_8bit: bool = False,
    load_4bit: bool = False,
    trust_remote_code: bool = False,
    device_map: Any = None,
) -> tuple[Any, Any, str]:
    """(model, tokenizer, device) ready for `generate`: base + optional adapter, eval mode, left padding.

    Everything that can be checked without the weights (paths, configs, flags, the adapter's fit) is checked first.
    """
    device, precision = preflight_model(
        base_model, lora_weights, precision=precision, load_8bit=load_8bit, load_4bit=load_4bit,
        trust_remote_code=trust_remote_code,
    )
    model, tokenizer = load_checked(
        base_model, precision=precision, device=device, load_8bit=load_8bit, load_4bit=load_4bit,
        trust_remote_code=trust_remote_code, device_map=device_map, padding_side="left",
    )
    if lora_weights:
        model = load_adapter(model, lora_weights)
    model.eval()
    check_finite_logits(model, tokenizer, base_model, lora_weights)
    return model, tokenizer, device


@torch.inference_mode()
def check_finite_logits(model: Any, tokenizer: Any, base_model: str, lora_weights: str | None) -> None:
    """One short forward pass: a model that computes NaN/inf (broken weights, or a model that overflows in fp16)
    would otherwise answer with empty strings and exit 0."""
    encoded = tokenizer("你好", return_tensors="pt")
    embeddings = model.get_input_embeddings()
    device = embeddings.weight.device if embeddings is not None else torch.device("cpu")
    if device.type == "meta":  # offloaded by device_map: accelerate's hooks move the inputs themselves
        device = torch.device("cpu")
    logits = model(**{name: tensor.to(device) for name, tensor in encoded.items()}).logits
    if not torch.isfinite(logits).all():
        adapter = f" with the adapter {lora_weights}" if lora_weights else ""
        raise UserError(f"{base_model}{adapter} computes NaN/inf logits, so every answer would be empty: its weights "
                        "are broken, or the model overflows in this precision (try --precision bf16 or fp32)")


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__
