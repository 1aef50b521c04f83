"""Loading a base model, its tokenizer and a LoRA adapter: the one place every script does it."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from utils.core.errors import UserError

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
TRAINING_METADATA = "bentsao_training.json"

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
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
# --attn_implementation values; "" leaves the choice to transformers (sdpa where the model supports it)
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


def resolve_device() -> str:
    """cuda, then Apple mps, then cpu."""
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_precision(precision: str, device: str) -> str:
    """`auto`: bf16 where the GPU supports it, else fp16 on a GPU, fp32 on CPU."""
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    bf16_ok = (device == "cuda" and torch.cuda.is_bf16_supported()) or device == "cpu"
    if precision == "auto":
        if device == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp16" if device == "mps" else "fp32"
    if precision == "bf16" and not bf16_ok:
        raise UserError(f"--precision bf16 is not supported on this {device} device; use --precision fp16 or auto")
    if precision == "fp16" and device == "cpu":
        raise UserError("--precision fp16 needs a GPU; on CPU use --precision fp32 (or auto)")
    return precision


def torch_dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def check_model_source(base_model: str, flag: str = "--base_model") -> None:
    """A local folder with a config, or something that can be a hub id; otherwise fail before any download."""
    if not base_model:
        raise UserError(
            f"{flag} is required: a local folder or a Hugging Face hub id "
            "(for a quick try: `python -m utils.tiny_base --output_dir models/tiny-llama`)"
        )
    path = Path(base_model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{flag} {base_model}: the folder has no config.json, so it is not a Hugging Face model")
        return
    windows_path = os.sep == "\\" and "\\" in base_model
    looks_local = base_model.startswith((".", "/", "~")) or base_model.count("/") > 1 or windows_path
    if looks_local or not HUB_ID.match(base_model):
        raise UserError(f"{flag} {base_model}: no such folder, and it is not a Hugging Face hub id")


def _hub_error(base_model: str, error: Exception) -> UserError:
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if "trust_remote_code" in str(error):
        return UserError(
            f"{base_model} ships its own modelling code; rerun with --trust_remote_code True if you trust it"
        )
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    hint = " (HF_HUB_OFFLINE is set, so only the local cache is searched)" if offline else ""
    return UserError(f"could not load {base_model}{hint}: {message}")


def load_tokenizer(base_model: str, trust_remote_code: bool = False, padding_side: str = "right"):
    """The base model's tokenizer, with a pad token (unk or eos when the model has none, as LLaMA)."""
    from transformers import AutoTokenizer

    check_model_source(base_model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(base_model, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise _hub_error(base_model, error) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def quantization_config(load_8bit: bool, load_4bit: bool, compute_dtype: torch.dtype):
    """A `BitsAndBytesConfig` for 8-bit or 4-bit (QLoRA: nf4, double quantisation) loading, or None."""
    if load_8bit and load_4bit:
        raise UserError("--load_8bit and --load_4bit exclude each other: choose one")
    if not (load_8bit or load_4bit):
        return None
    if not torch.cuda.is_available():
        raise UserError(
            "8-bit/4-bit loading needs a CUDA GPU and bitsandbytes; drop --load_8bit/--load_4bit on this machine"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("8-bit/4-bit loading needs bitsandbytes: pip install -r requirements-gpu.txt") from None
    from transformers import BitsAndBytesConfig

    if load_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def check_attention(attn_implementation: str, device: str) -> None:
    """`--attn_implementation`: "" or a known kernel that this machine can run (FlashAttention needs CUDA and its
    package; transformers' own availability checks decide)."""
    if not attn_implementation:
        return
    if attn_implementation not in ATTENTION_IMPLEMENTATIONS:
        raise UserError(f"--attn_implementation {attn_implementation!r} is not one of: "
                        f"{', '.join(ATTENTION_IMPLEMENTATIONS)} (or leave it empty for transformers' default)")
    if attn_implementation.startswith("flash_attention"):
        from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

        if device != "cuda":
            raise UserError(f"--attn_implementation {attn_implementation} needs a CUDA GPU; this machine runs on "
                            f"{device} (leave it empty to use sdpa)")
        version_2 = attn_implementation == "flash_attention_2"
        if not (is_flash_attn_2_available() if version_2 else is_flash_attn_3_available()):
            package = "flash-attn" if version_2 else "flash-attn-3"
            raise UserError(f"--attn_implementation {attn_implementation} needs the {package} package on this GPU "
                            f"(pip install {package} --no-build-isolation), or leave it empty to use sdpa")


def load_base_model(
    base_model: str,
    precision: str = "auto",
    device: str | None = None,
    load_8bit: bool = False,
    load_4bit: bool = False,
    trust_remote_code: bool = False,
    device_map: Any = None,
    attn_implementation: str = "",
):
    """`AutoModelForCausalLM` in the resolved precision on `device` (or spread by `device_map`), with
    `attn_implementation` when one is given."""
    from transformers import AutoModelForCausalLM

    check_model_source(base_model)
    device = device or resolve_device()
    dtype = torch_dtype(resolve_precision(precision, device))
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    quant = quantization_config(load_8bit, load_4bit, dtype)
    if quant is not None:
        kwargs["quantization_config"] = quant
        device_map = device_map or {"": torch.cuda.current_device()}
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(base_model, **kwargs)
    except (OSError, ValueError) as error:
        raise _hub_error(base_model, error) from None
    if device_map is None:
        model.to(device)
    return model


def check_tokenizer_fits(tokenizer, model, base_model: str) -> None:
    """The Chinese-Alpaca case: a 49,954-token tokenizer on a 32,000-row embedding would index out of range."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise UserError(
            f"{base_model}: the tokenizer has {len(tokenizer)} tokens but the model's embeddings only {rows}; "
            "use the tokenizer that belongs to this model (e.g. a merged Chinese-LLaMA/Alpaca checkpoint)"
        )


def linear_module_names(model) -> list[str]:
    """Leaf names of the linear layers LoRA can target (lm_head excluded)."""
    names = set()
    for full_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear8bitLt", "Linear4bit", "Conv1D"):
            leaf = full_name.rsplit(".", 1)[-1]
            if leaf not in ("lm_head", "score"):
                names.add(leaf)
    return sorted(names)


def resolve_lora_targets(model, requested: str | list[str] | tuple[str, ...] | None) -> list[str] | str:
    """The architecture's default targets, `all-linear`, or the requested names checked against the model."""
    valid = linear_module_names(model)
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
    if unknown:
        raise UserError(
            f"--lora_target_modules: {', '.join(unknown)} not in this model; valid names: {', '.join(valid)} "
            "(or all-linear)"
        )
    return requested


def read_training_metadata(lora_weights: str) -> dict[str, Any]:
    path = Path(lora_weights) / TRAINING_METADATA
    if path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            return {}
    return {}


def load_adapter(model, lora_weights: str, is_trainable: bool = False):
    """Wrap `model` with the LoRA adapter in `lora_weights` (a folder, or a hub id)."""
    import pickle

    from peft import PeftModel

    from utils.validate import check_adapter

    # exists, has a config and safetensors or weights-only-loadable .bin weights, and fits this model's layers
    check_adapter(lora_weights, getattr(model, "name_or_path", None) or None, model=model)
    try:
        return PeftModel.from_pretrained(model, lora_weights, is_trainable=is_trainable)
    except pickle.UnpicklingError as error:  # peft loads .bin with weights_only=True; a hub .bin lands here
        raise UserError(
            f"refusing to load the adapter {lora_weights}: its weights are a pickle that is not plain tensors "
            f"({str(error).strip().splitlines()[0][:200]})"
        ) from None
    except (OSError, ValueError) as error:
        raise UserError(f"could not load the adapter {lora_weights}: {str(error).strip().splitlines()[0]}") from None
    except RuntimeError as error:  # size mismatch: an adapter made for another base
        first = str(error).strip().splitlines()
        detail = next((line.strip() for line in first if "size mismatch" in line), first[0] if first else "")
        raise UserError(f"the adapter {lora_weights} does not fit this base model ({detail})") from None


def load_for_inference(
    base_model: str,
    lora_weights: str | None = None,
    precision: str = "auto",
    load_8bit: bool = False,
    load_4bit: bool = False,
    trust_remote_code: bool = False,
    device_map: Any = None,
):
    """(model, tokenizer, device) ready for `generate`: base + optional adapter, eval mode, left padding.

    Everything that can be checked without the weights (paths, configs, flags, the adapter's fit) is checked first.
    """
    from utils.validate import check_tokenizer_fits_config, preflight_model

    device, precision = preflight_model(
        base_model, lora_weights, precision=precision, load_8bit=load_8bit, load_4bit=load_4bit,
        trust_remote_code=trust_remote_code,
    )
    tokenizer = load_tokenizer(base_model, trust_remote_code=trust_remote_code, padding_side="left")
    check_tokenizer_fits_config(tokenizer, base_model)
    model = load_base_model(
        base_model, precision=precision, device=device, load_8bit=load_8bit, load_4bit=load_4bit,
        trust_remote_code=trust_remote_code, device_map=device_map,
    )
    check_tokenizer_fits(tokenizer, model, base_model)
    if lora_weights:
        model = load_adapter(model, lora_weights)
    model.eval()
    return model, tokenizer, device
