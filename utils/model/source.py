"""Where a model or an adapter comes from: a local folder, or a Hugging Face hub id (`org/name`).

One rule for every flag that names a model (`--base_model`, `--lora_weights`): an existing folder is local; a name
that looks like a path (`./x`, `/x`, `~/x`, `a/b/c`, `x` without an `org/`, or `models/x` where `models/` is a folder
here) is a folder that does not exist, reported at once (with the nearest folder beside it) instead of after a minute
of hub retries; an `org/name` is a hub id, and while offline (`HF_HUB_OFFLINE`) it must be in the local hub cache.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any

from utils.core.errors import UserError
from utils.core.io import read_json_object

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")


def is_hub_id(name: str) -> bool:
    """`org/name` and not an existing folder: what `from_pretrained` would fetch from the hub."""
    windows_path = os.sep == "\\" and "\\" in name
    return bool(HUB_ID.match(name)) and not windows_path and not Path(name).expanduser().exists()


def check_source(name: str, flag: str, marker: str) -> None:
    """`name` is a local folder holding `marker` (config.json, adapter_config.json) or a usable hub id."""
    if not name:
        raise UserError(f"{flag} is required: a local folder or a Hugging Face hub id (org/name)")
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / marker).is_file():
            what = "a Hugging Face model" if marker == "config.json" else "a LoRA adapter"
            raise UserError(f"{flag} {name}: the folder has no {marker}, so it is not {what}")
        return
    if path.is_file() and path.suffix == ".gguf" and marker == "config.json":
        return  # a GGUF file holds the config and tokenizer itself (utils.model.loading.gguf_kwargs)
    if path.exists():
        raise UserError(f"{flag} {name}: is a file; pass the folder that holds {marker}")
    if not is_hub_id(name):
        raise UserError(f"{flag} {name}: no such folder{nearest_folder(path)} (and not a hub id of the form org/name)")
    if cached(name, marker):
        return
    if offline():
        raise UserError(f"{flag} {name}: no such folder{nearest_folder(path)}, and HF_HUB_OFFLINE is set while the hub "
                        "model is not in the local cache; download it once with network access, or pass a local folder")
    # Not cached: only the hub can have it. Asking an unreachable hub costs a minute of retries, so say it at once;
    # `models/tiny-lama` beside `models/tiny-llama` is then most likely a mistyped path. When the hub can be reached
    # it is asked (a real `Qwen/Qwen2.5-7B` beside a downloaded `Qwen/Qwen2.5-7B-Instruct` must load), and its
    # answer names the nearest local folder too (hub_error).
    if not hub_reachable():
        local = str(path.parent) != "." and path.parent.is_dir()
        where = f"; {path.parent}/ is a folder here" if local else ""
        raise UserError(f"{flag} {name}: no such folder{nearest_folder(path) if local else ''}{where}, and the hub "
                        "cannot be reached to look for a hub model of that name (nor is it in the local cache)")


def cached(name: str, marker: str) -> bool:
    """The hub model `name` is in the local hub cache (its `marker` file, e.g. config.json, is there)."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(name, marker), str)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a connection to the hub (HF_ENDPOINT) opens within `timeout` seconds, name lookup included (run in a
    thread: a lookup ignores socket timeouts). A proxy-only network counts as unreachable: the caller only uses this
    to refuse at once what would otherwise fail after a minute of retries; with a proxy configured it is not
    probed (a direct connection may be blocked where the proxy works)."""
    import socket
    import threading
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    endpoint = urlparse(constants.ENDPOINT)
    address = (endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443))
    opened: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection(address, timeout=timeout):
                opened.append(True)
        except Exception:  # noqa: BLE001 - any failure (DNS, refused, timeout) means: not reachable now
            opened.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(opened and opened[0])


def nearest_folder(path: Path) -> str:
    """` (did you mean models/tiny-llama?)`: the folder beside a missing `path` whose name is closest, or ``."""
    try:
        folders = [entry.name for entry in path.parent.iterdir() if entry.is_dir()]
    except OSError:
        return ""
    close = difflib.get_close_matches(path.name, folders, n=1, cutoff=0.6)
    if not close:
        return ""
    return f" (did you mean {close[0] if str(path.parent) == '.' else path.parent / close[0]}?)"


def check_model_source(base_model: str, flag: str = "--base_model") -> None:
    check_source(base_model, flag, "config.json")


# what huggingface_hub, httpx and requests raise when the hub cannot be reached (a DNS failure, a refused or timed-out
# connection); transformers wraps them in an OSError ("We couldn't connect to ...")
UNREACHABLE = {"LocalEntryNotFoundError", "ConnectError", "ConnectTimeout", "ConnectionError", "TimeoutException",
               "ReadTimeout", "Timeout", "OfflineModeIsEnabled"}


# what huggingface_hub raises when the hub answered but has no such (accessible) model; transformers wraps them too
NOT_FOUND = {"RepositoryNotFoundError", "EntryNotFoundError", "RevisionNotFoundError", "GatedRepoError",
             "RemoteEntryNotFoundError"}


def raised_from(error: BaseException, kinds: set[str], text: str) -> bool:
    """True when `error`, or an error it was raised from, is of a class named in `kinds` or says `text`."""
    seen: BaseException | None = error
    while seen is not None:
        if type(seen).__name__ in kinds or text in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def not_on_the_hub(error: BaseException) -> bool:
    """The hub answered, and has no such (accessible) model."""
    return raised_from(error, NOT_FOUND, "is not a local folder and is not a valid model identifier")


def unreachable(error: BaseException) -> bool:
    """The hub could not be reached."""
    return raised_from(error, UNREACHABLE, "couldn't connect")


def hub_error(name: str, error: Exception) -> UserError:
    """A loading failure of `name` as one line: for a hub id, first that there is no such local folder (the usual
    cause is a mistyped path), then the hub's side; the library's first line; the offline hint."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if "trust_remote_code" in str(error):
        return UserError(f"{name} ships its own modelling code; rerun with --trust_remote_code True if you trust it")
    if not is_hub_id(name) or offline():  # a local folder's own failure; offline: check_source said what is missing
        hint = " (HF_HUB_OFFLINE is set, so only the local cache is searched)" if is_hub_id(name) else ""
        return UserError(f"could not load {name}{hint}: {message}")
    typo = nearest_folder(Path(name)) if Path(name).parent.is_dir() and str(Path(name).parent) != "." else ""
    if unreachable(error):
        return UserError(f"no local folder {name}{typo}, and the hub could not be reached (check the path, or the "
                         f"network): {message}")
    if not_on_the_hub(error):
        return UserError(f"no local folder {name}{typo}, and the hub did not provide it: {message}")
    return UserError(f"could not load {name}: {message}")


def local_model_config(base_model: str) -> dict[str, Any] | None:
    """The base model's `config.json` as a dict; None for a hub id (read when the model is loaded)."""
    path = Path(base_model).expanduser()
    if not path.is_dir():
        return None
    return read_json_object(path / "config.json")
