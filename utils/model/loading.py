"""Loading a base model, its tokenizer and a LoRA adapter: the one sequence every script follows.

paths and flags -> tokenizer -> does it fit config.json -> weights -> does it fit the embeddings -> adapter. A
library's failure on the way is one line naming what it was loading (`source.load_error`).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from utils.core.errors import UserError, first_line
from utils.model.checks import (
    check_loaded_adapter,
    check_tokenizer_fits,
    config_embedding_rows,
    linear_layers,
    quantization_config,
)
from utils.model.gguf import gguf_kwargs
from utils.model.source import load_error
from utils.runtime import resolve_device, resolve_precision, torch_dtype, use_idle_cores

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


def load_tokenizer(base_model: str, trust_remote_code: bool = False, padding_side: str = "right") -> Any:
    """The base model's tokenizer, with a pad token (unk or eos when the model has none, as LLaMA), checked against
    the embedding rows of its config.json before any weights load."""
    from transformers import AutoTokenizer

    rows = config_embedding_rows(base_model)  # config.json read first: the tokenizer's own failure on it is cryptic
    try:
        tokenizer = AutoTokenizer.from_pretrained(**gguf_kwargs(base_model), trust_remote_code=trust_remote_code)
    except Exception as error:  # tokenizers raises plain Exception/KeyError for a broken tokenizer.json
        raise load_error("the tokenizer of", base_model, error) from error
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    tokenizer.padding_side = padding_side
    check_tokenizer_fits(tokenizer, rows, base_model)
    return tokenizer


def load_base_model(base_model: str, precision: str = "auto", device: str | None = None, load_8bit: bool = False,
                    load_4bit: bool = False, trust_remote_code: bool = False, device_map: Any = None,
                    attn_implementation: str = "", dtype: Any = None, tokenizer: Any = None) -> Any:
    """`AutoModelForCausalLM` in the resolved precision on `device` (or spread by `device_map`), with
    `attn_implementation` when one is given; `dtype` ("auto": as stored) overrides the precision; checked to fit
    `tokenizer` when one is given."""
    from transformers import AutoModelForCausalLM, GgufConfig
    from transformers.integrations import is_deepspeed_zero3_enabled

    device = device or resolve_device()
    dtype = dtype if dtype is not None else torch_dtype(resolve_precision(precision, device))
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    quantization = quantization_config(load_8bit, load_4bit, dtype if isinstance(dtype, torch.dtype) else torch.float16)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        device_map = device_map or {"": torch.cuda.current_device()}
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        if "gguf_file" in gguf_kwargs(base_model):  # unpacked: GGUF-packed weights neither train nor save
            kwargs["quantization_config"] = GgufConfig(dequantize=True)
        model = AutoModelForCausalLM.from_pretrained(**gguf_kwargs(base_model), **kwargs)
        model.name_or_path = base_model  # what an adapter records as its base: a .gguf file, not its folder
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as error:  # SafetensorError, OSError, ValueError, RuntimeError: a damaged or mismatched model
        raise load_error("the weights of", base_model, error) from error
    if device_map is None and not is_deepspeed_zero3_enabled():  # ZeRO-3: zero.Init placed the partitions already
        model.to(device)
    if tokenizer is not None:  # num_embeddings: the full size, also when ZeRO-3 partitions the weight
        check_tokenizer_fits(tokenizer, getattr(model.get_input_embeddings(), "num_embeddings", None), base_model)
    return model


def lora_target_names(model: Any) -> list[str]:
    """Leaf names of the linear layers LoRA can target (the output head excluded)."""
    return sorted({name.rsplit(".", 1)[-1] for name in linear_layers(model)} - set(NOT_LORA_TARGETS))


def resolve_lora_targets(model: Any, requested: str | None) -> list[str] | str:
    """The architecture's default targets, `all-linear`, or the requested names (`a,b` or `[a, b]`) checked against
    the model."""
    valid = lora_target_names(model)
    if not requested:
        targets = DEFAULT_LORA_TARGETS.get(getattr(model.config, "model_type", ""))
        return targets if targets is not None and set(targets) <= set(valid) else "all-linear"
    if requested == "all-linear":
        return requested
    names = [name.strip().strip("'\"") for name in requested.strip("[]").split(",") if name.strip()]
    unknown = [name for name in names if name not in valid]
    if unknown or not names:
        raise UserError(f"--lora_target_modules: {', '.join(unknown) or 'nothing named'} not in this model; valid "
                        f"names: {', '.join(valid)} (or all-linear)")
    return names


def load_adapter(model: Any, lora_weights: str, is_trainable: bool = False) -> Any:
    """`model` wrapped with the LoRA adapter in `lora_weights` (a folder, or a hub id), refused when it does not fit."""
    from peft import PeftModel

    try:
        with warnings.catch_warnings():  # what it warns about (weights it cannot place) is refused just below
            warnings.filterwarnings("ignore", message="Found missing adapter keys")
            model = PeftModel.from_pretrained(model, lora_weights, is_trainable=is_trainable)
    except Exception as error:  # size mismatch (another base), a config or weights file peft cannot read
        raise load_error("--lora_weights", lora_weights, error) from error
    check_loaded_adapter(model, lora_weights)
    return model


def load_for_inference(base_model: str, lora_weights: str | None = None, precision: str = "auto",
                       load_8bit: bool = False, load_4bit: bool = False, trust_remote_code: bool = False,
                       device_map: Any = None) -> tuple[Any, Any, str]:
    """(model, tokenizer, device) ready for `generate`: base + optional adapter, eval mode, left padding (the paths
    and flags checked by the script's `validate` first)."""
    device = resolve_device()
    if device == "cpu":
        use_idle_cores()
    tokenizer = load_tokenizer(base_model, trust_remote_code=trust_remote_code, padding_side="left")
    model = load_base_model(base_model, precision=precision, device=device, load_8bit=load_8bit, load_4bit=load_4bit,
                            trust_remote_code=trust_remote_code, device_map=device_map, tokenizer=tokenizer)
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
    device = model.get_input_embeddings().weight.device
    device = torch.device("cpu") if device.type == "meta" else device  # offloaded: accelerate's hooks move inputs
    try:
        logits = model(**{name: tensor.to(device) for name, tensor in encoded.items()}).logits
    except Exception as error:  # a config transformers accepted but cannot compute with (num_hidden_layers: -1)
        raise UserError(f"{base_model} cannot compute a forward pass: {first_line(error)}") from error
    if not torch.isfinite(logits).all():
        adapter = f" with the adapter {lora_weights}" if lora_weights else ""
        raise UserError(f"{base_model}{adapter} computes NaN/inf logits, so every answer would be empty: its weights "
                        "are broken, or the model overflows in this precision (try --precision bf16 or fp32)")
