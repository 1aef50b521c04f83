"""Where a model or an adapter comes from (a local folder, or a Hugging Face hub id `org/name`), and the one place
that turns a loading library's failure into one line.

An existing folder is local. A missing name is a hub id when it has the form `org/name` and nothing local resembles
it; `./x`, `/x`, `~/x`, `a/b/c`, a bare `x`, and `models/tiny-lama` beside a folder `models/tiny-llama` are mistyped
paths, reported at once with the nearest folder (the hub would be asked for a minute first). While offline
(`HF_HUB_OFFLINE`) a hub id must be in the local hub cache.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

from utils.core.errors import UserError, first_line
from utils.core.io import nearest

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")


def is_hub_id(name: str) -> bool:
    """`org/name` that is no local path and resembles none: what `from_pretrained` would fetch from the hub."""
    path = Path(name).expanduser()
    return bool(HUB_ID.match(name)) and not path.exists() and not nearest(path, folders=True)


def source_problems(name: str, flag: str, marker: str) -> list[str]:
    """`name` is a local folder holding `marker` (config.json, adapter_config.json), or a hub id the hub (or, offline,
    the local cache) can serve."""
    if not name:
        return [f"{flag} is required: a local folder or a Hugging Face hub id (org/name)"]
    path = Path(name).expanduser()
    if path.is_dir():
        return [] if (path / marker).is_file() else [f"{flag} {name}: the folder has no {marker}"]
    if path.exists():  # a file: a GGUF base holds its config and tokenizer itself (gguf.py)
        return [] if path.suffix == ".gguf" and marker == "config.json" and path.is_file() else [
            f"{flag} {name}: is a file; pass the folder that holds {marker}"]
    from huggingface_hub import try_to_load_from_cache

    if HUB_ID.match(name) and isinstance(try_to_load_from_cache(name, marker), str):  # in the local hub cache
        return []
    if not is_hub_id(name):
        return [f"{flag} {name}: no such folder{nearest(path, folders=True)} (and not a hub id of the form org/name)"]
    if offline():
        return [(f"{flag} {name}: no such folder, and HF_HUB_OFFLINE is set while the hub model is not in the local "
                "cache; download it once with network access, or pass a local folder")]
    return []


def load_error(what: str, name: str, error: Exception) -> UserError:
    """A library's failure to load `what` (`the tokenizer of`, `the weights of`, `--lora_weights`) `name` as one
    line."""
    if isinstance(error, pickle.UnpicklingError):  # torch.load(weights_only=True) refused it: nothing in it ran
        return UserError(f"refusing to load {what} {name}: a file in it is a pickle that is not plain tensors, and "
                         f"unpickling it could run arbitrary code; use safetensors weights you trust "
                         f"(torch: {first_line(error)})")
    if "trust_remote_code" in str(error):
        return UserError(f"{name} ships its own Python code; rerun with --trust_remote_code True if you trust it")
    offline_note = " (HF_HUB_OFFLINE is set: only the local cache is searched)" if is_hub_id(name) and offline() else ""
    return UserError(f"could not load {what} {name}{offline_note}: {first_line(error)}")
