"""Checks that run before any heavy work (loading weights, training), shared by every script.

Each check raises `UserError` (printed by `run_cli` as one `error: ...` line, exit code 2) or returns a list of
problems for the caller to join into one line. Nothing here loads model weights: the base model is inspected
through its `config.json` (and, for adapter checks, an empty "meta" model built from that config), an adapter
through `adapter_config.json`, `bentsao_training.json` and the tensor shapes in its weights file.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from utils.core.errors import UserError
from utils.model import (
    TRAINING_METADATA,
    check_model_source,
    quantization_config,
    resolve_device,
    resolve_precision,
    torch_dtype,
)

ADAPTER_CONFIG = "adapter_config.json"
SAFE_WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = "adapter_model.bin"


# --- options ---------------------------------------------------------------------------------------------------


def positive_int_problems(values: dict[str, Any]) -> list[str]:
    """`--name must be a positive integer` for each value that is not one (bools are not integers here)."""
    return [
        f"--{name} must be a positive integer, got {value!r}"
        for name, value in values.items()
        if isinstance(value, bool) or not isinstance(value, int) or value < 1
    ]


def batch_size_problems(batch_size: int, micro_batch_size: int, processes: int = 1) -> list[str]:
    """`micro_batch_size` larger than `batch_size`, or `batch_size` not a multiple of micro batch x processes."""
    problems = positive_int_problems({"batch_size": batch_size, "micro_batch_size": micro_batch_size})
    if problems:
        return problems
    if micro_batch_size > batch_size:
        return [f"--micro_batch_size {micro_batch_size} is larger than --batch_size {batch_size}"]
    if batch_size % (micro_batch_size * processes):
        per_step = f"--micro_batch_size {micro_batch_size} x {processes} process(es)"
        return [f"--batch_size {batch_size} is not divisible by {per_step}"]
    return []


def resolve_val_size(val_set_size: float | None, rows: int) -> int:
    """Rows held out for validation: a count, a fraction below 1, or 0; None means 500, or a tenth of a small file.

    Fails, naming `--val_set_size`, when the validation rows would leave no training rows.
    """
    if val_set_size is None:
        return min(500, rows // 10)
    if isinstance(val_set_size, bool) or not isinstance(val_set_size, (int, float)) or val_set_size < 0:
        raise UserError(f"--val_set_size must be a row count, a fraction below 1, or 0; got {val_set_size!r}")
    size = max(1, int(rows * val_set_size)) if 0 < val_set_size < 1 else int(val_set_size)
    if size and size >= rows:
        raise UserError(f"--val_set_size {val_set_size} leaves no training rows: the data has {rows} rows")
    return size


def generation_problems(
    max_new_tokens: Any, num_beams: Any, batch_size: Any, do_sample: bool, temperature: Any, top_p: Any, top_k: Any,
    repetition_penalty: Any,
) -> list[str]:
    """Generation options `generate` would reject (with a traceback) or that make no sense."""
    counts = {"max_new_tokens": max_new_tokens, "num_beams": num_beams, "batch_size": batch_size}
    problems = positive_int_problems(counts)
    if not isinstance(repetition_penalty, (int, float)) or repetition_penalty <= 0:
        problems.append(f"--repetition_penalty must be a positive number, got {repetition_penalty!r}")
    if do_sample:
        if not isinstance(temperature, (int, float)) or temperature <= 0:
            problems.append(f"--temperature must be above 0 when sampling (--do_sample True), got {temperature!r}")
        if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            problems.append(f"--top_p must be in (0, 1], got {top_p!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            problems.append(f"--top_k must be an integer >= 0, got {top_k!r}")
    return problems


def raise_problems(problems: Iterable[str]) -> None:
    """All problems as one line, so a user fixes every flag in one go."""
    problems = list(problems)
    if problems:
        raise UserError("; ".join(problems))


def check_device_options(
    precision: str, load_8bit: bool, load_4bit: bool, device: str | None = None
) -> tuple[str, str]:
    """(device, precision) for these flags, or an error: bf16/fp16 where the device lacks it, 8-bit with 4-bit,
    quantisation without CUDA or bitsandbytes."""
    device = device or resolve_device()
    resolved = resolve_precision(precision, device)
    quantization_config(bool(load_8bit), bool(load_4bit), torch_dtype(resolved))
    return device, resolved


# --- base model ------------------------------------------------------------------------------------------------


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: {what} is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: {what} must be a JSON object")
    return data


def local_model_config(base_model: str) -> dict[str, Any] | None:
    """The base model's `config.json` as a dict; None for a hub id (read when the model is loaded)."""
    path = Path(base_model).expanduser()
    if not path.is_dir():
        return None
    return read_json(path / "config.json", "the model's config.json")


def _known_model_type(model_type: str) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return model_type in CONFIG_MAPPING


def check_base_model(base_model: str, trust_remote_code: bool = False, flag: str = "--base_model") -> None:
    """A local folder with a usable config (or a possible hub id); says when a model needs `--trust_remote_code`."""
    check_model_source(base_model, flag)
    config = local_model_config(base_model)
    if config is None:
        return
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


def _tokenizer_code(path: Path) -> list[str]:
    """The code a tokenizer_config.json's `auto_map` names for a tokenizer class transformers does not have."""
    if not path.is_file():
        return []
    tokenizer_config = read_json(path, "tokenizer_config.json")
    auto_map = tokenizer_config.get("auto_map")
    entry = auto_map.get("AutoTokenizer") if isinstance(auto_map, dict) else None
    if not entry:
        return []
    import transformers

    tokenizer_class = tokenizer_config.get("tokenizer_class")
    if isinstance(tokenizer_class, str) and hasattr(transformers, tokenizer_class):
        return []
    return [str(name) for name in (entry if isinstance(entry, list) else [entry]) if name]


def embedding_rows(config: Any) -> int | None:
    """The vocabulary (embedding rows) a model config declares, also for configs nesting a text config."""
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    rows = getattr(config, "vocab_size", None) if not isinstance(config, dict) else config.get("vocab_size")
    if rows is None and isinstance(config, dict) and isinstance(config.get("text_config"), dict):
        rows = config["text_config"].get("vocab_size")
    return rows if isinstance(rows, int) else None


def check_tokenizer_fits_config(tokenizer: Any, base_model: str) -> None:
    """The Chinese-Alpaca case (a 49,954-token tokenizer on 32,000 embedding rows), caught before the weights load."""
    config = local_model_config(base_model)
    rows = embedding_rows(config) if config is not None else None
    if rows is not None and len(tokenizer) > rows:
        raise UserError(
            f"{base_model}: the tokenizer has {len(tokenizer)} tokens but the model's embeddings only {rows} "
            "(config.json vocab_size); use the tokenizer that belongs to this model (e.g. a merged "
            "Chinese-LLaMA/Alpaca checkpoint, whose embeddings were resized)"
        )


def meta_model(base_model: str, trust_remote_code: bool = False) -> Any:
    """The base model's module tree without weights (on the meta device), or None when it cannot be built offline."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(base_model, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, ImportError, RuntimeError, TypeError, AttributeError):
        return None  # loading it for real reports the problem properly


# --- adapters ---------------------------------------------------------------------------------------------------


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
    except (pickle.UnpicklingError, RuntimeError, AttributeError, EOFError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserError(
            f"{path}: refusing to load it: it is not a plain weights file, and unpickling it could run code "
            f"(torch.load weights_only=True rejected it: {first[:200]}); use an adapter you trust, "
            "ideally saved as adapter_model.safetensors"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: expected a dict of tensors (a LoRA state dict)")
    return state


def adapter_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, read from the safetensors header (no tensor data) or a weights-only `.bin`."""
    if weights.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(weights), framework="pt") as handle:
                names = handle.keys()
                return {name: tuple(handle.get_slice(name).get_shape()) for name in names}
        except (SafetensorError, OSError) as error:
            raise UserError(f"{weights}: not a readable safetensors file ({error})") from None
    return {key: tuple(value.shape) for key, value in load_pickled_weights(weights).items()}


def linear_shapes(model: Any) -> dict[str, tuple[int, int]]:
    """Module path -> (in_features, out_features) of every linear layer of a (meta or real) model."""
    shapes = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            shapes[name] = (module.in_features, module.out_features)
        elif hasattr(module, "in_features") and hasattr(module, "out_features"):  # bitsandbytes Linear8bitLt/4bit
            shapes[name] = (int(module.in_features), int(module.out_features))
    return shapes


def _module_of(key: str) -> tuple[str, str] | None:
    """`base_model.model.model.layers.0.q_proj.lora_A.weight` -> (`model.layers.0.q_proj`, `lora_A`)."""
    for part in ("lora_A", "lora_B"):
        suffix = f".{part}.weight"
        if key.endswith(suffix):
            path = key[: -len(suffix)]
            for prefix in ("base_model.model.", "base_model."):
                if path.startswith(prefix):
                    path = path[len(prefix):]
                    break
            return path, part
    return None


def adapter_problems(lora_weights: str, model: Any) -> list[str]:
    """Why the local adapter in `lora_weights` was made for another base than `model` (a meta or real model).

    Compared: the target modules in `adapter_config.json` with the base's module names; the hidden size, vocabulary
    and architecture in `bentsao_training.json` with the base's config; each LoRA matrix's shape with the layer it
    attaches to.
    """
    folder = Path(lora_weights).expanduser()
    config = read_json(folder / ADAPTER_CONFIG, ADAPTER_CONFIG)
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
        metadata = read_json(metadata_path, TRAINING_METADATA)
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
        shapes = linear_shapes(model)
        for key, shape in adapter_shapes(adapter_weights_file(lora_weights)).items():
            found = _module_of(key)
            if found is None or len(shape) != 2:
                continue
            module, part = found
            if module not in shapes:
                problems.append(f"it has weights for {module}, a layer this base does not have")
                break
            in_features, out_features = shapes[module]
            size, expected = (shape[1], in_features) if part == "lora_A" else (shape[0], out_features)
            if size != expected and not config.get("fan_in_fan_out"):
                side = "inputs" if part == "lora_A" else "outputs"
                problems.append(f"its {key} expects {size} {side}, but {module} of this base has {expected}")
                break
    return problems


def check_adapter(
    lora_weights: str, base_model: str | None = None, trust_remote_code: bool = False, model: Any = None
) -> None:
    """An adapter folder that exists, holds an adapter config and safe weights, and fits the base model.

    `model` (a loaded base) is used when given; otherwise the base's module tree is built from its config on the
    meta device, so a mismatch is reported before any weights load. A hub id is left to peft to fetch.
    """
    from utils.model import HUB_ID

    folder = Path(lora_weights).expanduser()
    if not folder.is_dir():
        looks_local = lora_weights.startswith((".", "/", "~")) or lora_weights.count("/") > 1
        if looks_local or not HUB_ID.match(lora_weights):
            raise UserError(f"--lora_weights {lora_weights}: no such folder, and it is not a Hugging Face hub id")
        return
    if not (folder / ADAPTER_CONFIG).is_file():
        raise UserError(
            f"--lora_weights {lora_weights}: the folder has no {ADAPTER_CONFIG}, so it is not a LoRA adapter"
        )
    config = read_json(folder / ADAPTER_CONFIG, ADAPTER_CONFIG)
    if config.get("peft_type", "LORA") != "LORA":
        raise UserError(f"--lora_weights {lora_weights}: a {config.get('peft_type')} adapter, not LoRA")
    weights = adapter_weights_file(lora_weights)
    if weights.suffix == ".bin":
        load_pickled_weights(weights)  # refuses a pickle that is more than tensors, before peft opens it
    if model is None and base_model:
        model = meta_model(base_model, trust_remote_code)
    if model is None:
        return
    problems = adapter_problems(lora_weights, model)
    if problems:
        trained_on = config.get("base_model_name_or_path") or "an unknown base"
        raise UserError(
            f"the adapter {lora_weights} was made for another base model than {base_model or 'this one'}: "
            f"{'; '.join(problems)} (it was trained on {trained_on}); pass the --base_model it was trained on"
        )


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
    quantisation flags on this device, and the adapter (present, safe to load, made for this base).
    """
    check_base_model(base_model, trust_remote_code)
    device, resolved = check_device_options(precision, load_8bit, load_4bit)
    if lora_weights:
        check_adapter(lora_weights, base_model, trust_remote_code)
    return device, resolved
