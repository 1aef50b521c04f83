"""What can be checked about a model or an adapter before its weights load (so a mistake costs seconds, not the
minutes a 7B load takes).

The base model is inspected through its `config.json` (and, for adapter checks, an empty "meta" model built from
that config); an adapter through `adapter_config.json`, `bentsao_training.json` and its weights file (LoRA weights
are small: their shapes, rank and finiteness are read in full). Each check raises one `UserError`.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import Any

import torch

from utils.core.errors import UserError, raise_problems
from utils.core.io import read_json_object
from utils.model.source import check_model_source, check_source, is_hub_id, local_model_config
from utils.runtime import resolve_device, resolve_precision, torch_dtype

ADAPTER_CONFIG = "adapter_config.json"
SAFE_WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = "adapter_model.bin"
TRAINING_METADATA = "bentsao_training.json"  # what an adapter was trained with (written by finetune.py)
# --attn_implementation values; "" leaves the choice to transformers (sdpa where the model supports it)
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


# --- the device ----------------------------------------------------------------------------------------------------


def quantization_config(load_8bit: bool, load_4bit: bool, compute_dtype: torch.dtype) -> Any:
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


def check_device_options(
    precision: str, load_8bit: bool, load_4bit: bool, device: str | None = None
) -> tuple[str, str]:
    """(device, precision) for these flags, or an error: bf16/fp16 where the device lacks it, 8-bit with 4-bit,
    quantisation without CUDA or bitsandbytes."""
    device = device or resolve_device()
    resolved = resolve_precision(precision, device)
    quantization_config(bool(load_8bit), bool(load_4bit), torch_dtype(resolved))
    return device, resolved


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


# --- the base model ------------------------------------------------------------------------------------------------


def _known_model_type(model_type: str) -> bool:
    from transformers import AutoConfig

    try:
        AutoConfig.for_model(model_type)
    except ValueError:
        return False
    return True


def _tokenizer_code(path: Path) -> list[str]:
    """The code a tokenizer_config.json's `auto_map` names for a tokenizer class transformers does not have."""
    if not path.is_file():
        return []
    tokenizer_config = read_json_object(path)
    auto_map = tokenizer_config.get("auto_map")
    entry = auto_map.get("AutoTokenizer") if isinstance(auto_map, dict) else None
    if not entry:
        return []
    import transformers

    tokenizer_class = tokenizer_config.get("tokenizer_class")
    if isinstance(tokenizer_class, str) and hasattr(transformers, tokenizer_class):
        return []
    return [str(name) for name in (entry if isinstance(entry, list) else [entry]) if name]


# Sizes a model config declares; each, when present, must be a positive integer (else the model is built wrong, or
# fails deep inside a forward pass: `num_hidden_layers: -1` builds a model with no layers that crashes in generate).
SIZE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "intermediate_size", "max_position_embeddings", "head_dim", "n_embd", "n_layer", "n_head")


def config_problems(config: dict[str, Any]) -> list[str]:
    """Size fields of a config.json (and of a nested text_config) that are not positive integers."""
    problems = []
    for where, section in (("", config), ("text_config.", config.get("text_config"))):
        if not isinstance(section, dict):
            continue
        for name in SIZE_FIELDS:
            value = section.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                problems.append(f"`{where}{name}` must be a positive integer, got {value!r}")
    return problems


def check_config_loads(base_model: str, flag: str) -> None:
    """transformers builds a config object from config.json (its own type checks run here, not after the weights)."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(base_model, trust_remote_code=False)
    except Exception as error:  # a config that transformers refuses, whatever it raises: the user's file
        message = " ".join(str(error).split())[:300] or type(error).__name__
        raise UserError(f"{flag} {base_model}: config.json does not load ({message})") from error


def check_weight_files(base_model: str, flag: str) -> None:
    """Every safetensors file of a local model folder has a header that reads back and covers the file: a download
    or a copy cut short is found here, in milliseconds, instead of as a traceback after the tokenizer loaded."""
    from safetensors import safe_open

    folder = Path(base_model).expanduser()
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except Exception as error:  # SafetensorError, OSError: a truncated or corrupt file
            detail = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
            raise UserError(f"{flag} {base_model}: {path.name} is not a readable safetensors file ({detail}); is it "
                            "truncated? copy or download it again") from error


def check_base_model(base_model: str, trust_remote_code: bool = False, flag: str = "--base_model") -> None:
    """A local folder with a usable config and readable weight files (or a usable hub id); says when a model needs
    `--trust_remote_code`."""
    check_model_source(base_model, flag)
    config = local_model_config(base_model)
    if config is None:
        return
    problems = config_problems(config)
    if problems:
        raise UserError(f"{flag} {base_model}: config.json: {'; '.join(problems)}")
    model_type = config.get("model_type")
    known = isinstance(model_type, str) and _known_model_type(model_type)
    auto_map = config.get("auto_map") if isinstance(config.get("auto_map"), dict) else {}
    code = sorted({str(v[0] if isinstance(v, list) else v) for v in auto_map.values()}) if not known else []
    code += _tokenizer_code(Path(base_model).expanduser() / "tokenizer_config.json")
    if code and not trust_remote_code:
        raise UserError(
            f"{flag} {base_model} needs its own Python code ({', '.join(code)}), which runs only with "
            "--trust_remote_code True; add that flag if you trust where the model came from"
        )
    if isinstance(model_type, str) and not known and not auto_map:  # no model_type: transformers guesses from the name
        import transformers

        raise UserError(
            f"{flag} {base_model}: model_type {model_type!r} is not known to transformers {transformers.__version__}; "
            "upgrade transformers, or check that config.json belongs to a causal language model"
        )
    if known:
        check_config_loads(base_model, flag)
    check_weight_files(base_model, flag)


def embedding_rows(config: Any) -> int | None:
    """The vocabulary (embedding rows) a model config declares, also for configs nesting a text config."""
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    rows = getattr(config, "vocab_size", None) if not isinstance(config, dict) else config.get("vocab_size")
    if rows is None and isinstance(config, dict) and isinstance(config.get("text_config"), dict):
        rows = config["text_config"].get("vocab_size")
    return rows if isinstance(rows, int) else None


def check_tokenizer_fits(tokenizer: Any, rows: int | None, base_model: str) -> None:
    """The Chinese-Alpaca case: a 49,954-token tokenizer on 32,000 embedding rows would index out of range.

    `rows`: the embedding rows, from config.json before the weights load or from the loaded model after."""
    if rows is not None and len(tokenizer) > rows:
        raise UserError(
            f"{base_model}: the tokenizer has {len(tokenizer)} tokens but the model's embeddings only {rows}; "
            "use the tokenizer that belongs to this model (e.g. a merged Chinese-LLaMA/Alpaca checkpoint, whose "
            "embeddings were resized)"
        )


def config_embedding_rows(base_model: str) -> int | None:
    config = local_model_config(base_model)
    return embedding_rows(config) if config is not None else None


def meta_model(base_model: str, trust_remote_code: bool = False) -> Any:
    """The base model's module tree without weights (on the meta device), or None when it cannot be built offline."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(base_model, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, ImportError, RuntimeError, TypeError, AttributeError):
        return None  # loading it for real reports the problem properly


def linear_layers(model: Any) -> dict[str, tuple[int, int]]:
    """Module path -> (in_features, out_features) of every linear layer LoRA can wrap, in a meta, real or quantised
    model: `nn.Linear` and its subclasses (bitsandbytes' Linear8bitLt/Linear4bit are ones), and GPT-2's Conv1D."""
    from transformers.pytorch_utils import Conv1D

    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            layers[name] = (int(module.in_features), int(module.out_features))
        elif isinstance(module, Conv1D):  # weight stored transposed: (in, out)
            layers[name] = (int(module.weight.shape[0]), int(module.nf))
    return layers


# --- adapters --------------------------------------------------------------------------------------------------------


def adapter_weights_file(lora_weights: str) -> Path:
    """`adapter_model.safetensors`, else `adapter_model.bin` (the published BenTsao adapters), of a local adapter."""
    folder = Path(lora_weights).expanduser()
    for name in (SAFE_WEIGHTS, PICKLE_WEIGHTS):
        if (folder / name).is_file():
            return folder / name
    raise UserError(f"--lora_weights {lora_weights}: the folder has no {SAFE_WEIGHTS} (or {PICKLE_WEIGHTS})")


def load_pickled_weights(path: Path) -> dict[str, torch.Tensor]:
    """A `.bin` state dict loaded with `weights_only=True`: tensors and plain containers only, never code.

    A pickle that would import or call anything else is refused by torch's restricted unpickler, before anything
    in it runs.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, EOFError, ValueError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserError(
            f"{path}: refusing to load it: it is not a plain weights file, and unpickling it could run code "
            f"(torch.load weights_only=True rejected it: {first[:200]}); use weights you trust, "
            "ideally saved as safetensors"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: expected a dict of tensors (a state dict)")
    return state


def adapter_tensors(weights: Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors (LoRA weights are megabytes), from safetensors or a weights-only `.bin`."""
    if weights.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(weights))
        except (SafetensorError, OSError, RuntimeError) as error:
            raise UserError(f"{weights}: not a readable safetensors file ({str(error).splitlines()[0]})") from None
    return load_pickled_weights(weights)


def _module_of(key: str) -> tuple[str, str] | None:
    """`base_model.model.model.layers.0.q_proj.lora_A.weight` -> (`model.layers.0.q_proj`, `lora_A`)."""
    for part in ("lora_A", "lora_B"):
        for suffix in (f".{part}.weight", f".{part}.default.weight"):
            if key.endswith(suffix):
                path = key[: -len(suffix)]
                for prefix in ("base_model.model.", "base_model."):
                    if path.startswith(prefix):
                        path = path[len(prefix):]
                        break
                return path, part
    return None


def adapter_config_problems(config: dict[str, Any]) -> list[str]:
    """Fields of adapter_config.json that peft would fail on with a traceback (or misread) when it loads them."""
    problems = []
    if config.get("peft_type") is None:
        problems.append("adapter_config.json has no `peft_type` (a LoRA adapter says \"LORA\")")
    elif config["peft_type"] != "LORA":
        problems.append(f"a {config['peft_type']} adapter, not LoRA")
    rank = config.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        problems.append(f"adapter_config.json's `r` must be a positive integer, got {rank!r}")
    alpha = config.get("lora_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        problems.append(f"adapter_config.json's `lora_alpha` must be a number, got {alpha!r}")
    targets = config.get("target_modules")
    if not (targets is None or isinstance(targets, str)
            or (isinstance(targets, list) and all(isinstance(name, str) for name in targets))):
        problems.append(f"adapter_config.json's `target_modules` must be a list of module names, got {targets!r}")
    return problems


def adapter_weight_problems(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> list[str]:
    """Problems of the adapter itself: no LoRA tensors, NaN/inf values, tensors that its config does not target
    (peft would load them with a warning and silently ignore the trained weights), a rank other than `r`."""
    lora = {key: value for key, value in tensors.items() if _module_of(key) is not None}
    if not lora:
        return ["its weights file holds no LoRA tensors (lora_A/lora_B)"]
    problems = []
    bad = sorted(key for key, value in lora.items() if value.is_floating_point() and not torch.isfinite(value).all())
    if bad:
        problems.append(f"{len(bad)} of its tensors hold NaN or inf (e.g. {bad[0]}): the run that wrote it diverged")
    targets = config.get("target_modules")
    if isinstance(targets, list):
        wanted = {str(target) for target in targets}
        stray = sorted({module for module, _ in map(_module_of, lora) if module.rsplit(".", 1)[-1] not in wanted
                        and module not in wanted})
        if stray:
            problems.append(f"its weights are for {stray[0]}, which its adapter_config.json's target_modules "
                            f"({', '.join(sorted(wanted))}) do not name: peft would ignore the trained weights")
    rank = config.get("r")
    if isinstance(rank, int):
        for key, value in lora.items():
            part = _module_of(key)[1]
            found = value.shape[0] if part == "lora_A" else value.shape[-1]
            if value.dim() == 2 and found != rank and not config.get("rank_pattern"):
                problems.append(f"its {key} has rank {found}, but adapter_config.json says r={rank}")
                break
    return problems


def adapter_problems(lora_weights: str, model: Any, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Why the local adapter in `lora_weights` was made for another base than `model` (a meta or real model).

    Compared: the target modules in `adapter_config.json` with the base's module names; the hidden size, vocabulary
    and architecture in `bentsao_training.json` with the base's config; each LoRA matrix's shape with the layer it
    attaches to.
    """
    folder = Path(lora_weights).expanduser()
    config = read_json_object(folder / ADAPTER_CONFIG)
    base_config = model.config
    problems: list[str] = []

    module_names = {name for name, _ in model.named_modules() if name}
    leaf_names = {name.rsplit(".", 1)[-1] for name in module_names}
    targets = config.get("target_modules")
    if isinstance(targets, list):
        missing = sorted(str(t) for t in targets if str(t) not in leaf_names | module_names)
        if missing:
            problems.append(
                f"it targets module(s) {', '.join(missing)}, which this base does not have "
                f"(its model_type is {getattr(base_config, 'model_type', '?')})"
            )

    metadata_path = folder / TRAINING_METADATA
    if metadata_path.is_file():
        metadata = read_json_object(metadata_path)
        text_config = base_config.get_text_config() if hasattr(base_config, "get_text_config") else base_config
        base_values = {
            "model_type": getattr(base_config, "model_type", None),
            "hidden_size": getattr(text_config, "hidden_size", None),
            "vocab_size": model.get_input_embeddings().weight.shape[0]
            if model.get_input_embeddings() is not None else embedding_rows(base_config),
        }
        for field, value in base_values.items():
            trained = metadata.get(field)
            if trained is not None and value is not None and trained != value:
                problems.append(f"it was trained on a base with {field} {trained}, this base has {value}")

    if not problems:
        layers = linear_layers(model)
        for key, tensor in tensors.items():
            found = _module_of(key)
            if found is None or tensor.dim() != 2:
                continue
            module, part = found
            if module not in layers:
                problems.append(f"it has weights for {module}, a layer this base does not have")
                break
            in_features, out_features = layers[module]
            size, expected = (tensor.shape[1], in_features) if part == "lora_A" else (tensor.shape[0], out_features)
            if size != expected and not config.get("fan_in_fan_out"):
                side = "inputs" if part == "lora_A" else "outputs"
                problems.append(f"its {key} expects {size} {side}, but {module} of this base has {expected}")
                break
    return problems


def check_adapter(
    lora_weights: str, base_model: str | None = None, trust_remote_code: bool = False, model: Any = None
) -> dict[str, torch.Tensor] | None:
    """An adapter folder that exists, holds an adapter config and safe, finite weights, and fits the base model.

    `model` (a loaded base) is used when given; otherwise the base's module tree is built from its config on the
    meta device, so a mismatch is reported before any weights load. A hub id is left to peft to fetch. Returns the
    adapter's tensors (None for a hub id).
    """
    check_source(lora_weights, "--lora_weights", ADAPTER_CONFIG)
    if is_hub_id(lora_weights):
        return None
    folder = Path(lora_weights).expanduser()
    config = read_json_object(folder / ADAPTER_CONFIG)
    problems = adapter_config_problems(config)
    if problems:
        raise UserError(f"--lora_weights {lora_weights}: {'; '.join(problems)}")
    tensors = adapter_tensors(adapter_weights_file(lora_weights))
    problems = adapter_weight_problems(config, tensors)
    if problems:
        raise UserError(f"--lora_weights {lora_weights}: {'; '.join(problems)}")
    if model is None and base_model:
        model = meta_model(base_model, trust_remote_code)
    if model is None:
        return tensors
    problems = adapter_problems(lora_weights, model, tensors)
    if problems:
        trained_on = config.get("base_model_name_or_path") or "an unknown base"
        raise UserError(
            f"the adapter {lora_weights} was made for another base model than {base_model or 'this one'}: "
            f"{'; '.join(problems)} (it was trained on {trained_on}); pass the --base_model it was trained on"
        )
    return tensors


def preflight_model(
    base_model: str,
    lora_weights: str | None = None,
    *,
    precision: str = "auto",
    load_8bit: bool = False,
    load_4bit: bool = False,
    trust_remote_code: bool = False,
) -> tuple[str, str]:
    """Every model-side check before anything heavy loads; returns (device, precision).

    The base model's source and config (and whether it needs `--trust_remote_code`), the precision and
    quantisation flags on this device, and the adapter (present, safe to load, finite, made for this base).
    """
    problems: list[str] = []
    for check in (lambda: check_base_model(base_model, trust_remote_code),
                  lambda: check_device_options(precision, load_8bit, load_4bit)):
        try:
            check()
        except UserError as error:
            problems.append(str(error))
    raise_problems(problems)
    device, resolved = check_device_options(precision, load_8bit, load_4bit)
    if lora_weights:
        check_adapter(lora_weights, base_model, trust_remote_code)
    return device, resolved
