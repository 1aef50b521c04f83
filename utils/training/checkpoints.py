"""Checkpoints: which `checkpoint-N` folders are complete, which one a run resumes from, and refusing a resume
that would silently train differently.

transformers' Trainer writes a checkpoint's files in a fixed order and `trainer_state.json` last, so a folder whose
`trainer_state.json` reads back is complete; one without it is a save that a kill interrupted. `--resume_from_checkpoint
True` takes the newest complete one; a folder named explicitly must be complete, and hold the optimizer, scheduler and
RNG states (without them a resumed run lands somewhere else), unless `--resume_weights_only True` accepts that.
"""

from __future__ import annotations

import json
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any

from utils.core.errors import UserError, first_line

CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
RESUME_HINT = "continue it with --resume_from_checkpoint True"


def checkpoint_folders(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every `checkpoint-N` folder, by step (not by mtime, which network file systems blur)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = CHECKPOINT_NAME.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


# What the Trainer reads from trainer_state.json when it resumes (a state without them fails deep inside `train`).
STATE_FIELDS = {"global_step": int, "max_steps": int, "train_batch_size": int, "log_history": list}


def _load_state(folder: Path) -> dict[str, Any] | None:
    """trainer_state.json as a dict with every field the Trainer needs to resume, or None (torn, or lacking one)."""
    try:
        state = json.loads((folder / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # ValueError: also torn UTF-8 and JSONDecodeError
        return None
    if not isinstance(state, dict):
        return None
    for name, kind in STATE_FIELDS.items():
        if isinstance(state.get(name), bool) or not isinstance(state.get(name), kind):
            return None
    return state


def _inconsistent(folder: Path, state: dict[str, Any]) -> str | None:
    """Steps that no Trainer wrote: resuming from them would name new checkpoints after nonsense steps and overwrite
    others (a negative step, one past the run's end, or another step than the folder's name)."""
    step, last = state["global_step"], state["max_steps"]
    if step < 0 or (last > 0 and step > last):
        return f"says step {step} of {last}"
    match = CHECKPOINT_NAME.match(folder.name)
    if match and int(match.group(1)) != step:
        return f"says step {step}, but the folder is {folder.name}"
    return None


def read_trainer_state(folder: Path) -> dict[str, Any] | None:
    """The checkpoint's trainer_state.json, or None when it does not read back whole (torn, lacking a field the
    Trainer needs to resume) or its steps are impossible."""
    state = _load_state(folder)
    return state if state is not None and _inconsistent(folder, state) is None else None


def _unreadable(path: Path) -> str | None:
    """Why a state file written by `torch.save` cannot be resumed from, loaded the way the Trainer loads it
    (weights-only, with the numpy types of an RNG state allowed: nothing in it runs), or None."""
    import torch
    from transformers.trainer_pt_utils import safe_globals

    try:
        with safe_globals():
            torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch refused to unpickle it: it holds more than plain data
        return "is a pickle that is not plain data (unpickling it could run arbitrary code)"
    except Exception:  # noqa: BLE001 - a zip or pickle cut short by a crash or a full disk, or not torch's at all
        return "does not read back (truncated?)"
    return None


def missing_state(folder: Path, world_size: int) -> dict[str, str]:
    """{file: why} for the optimizer, scheduler and RNG state files a checkpoint lacks, or cannot be resumed from."""
    deepspeed = any(path.is_dir() and path.name.startswith("global_step") for path in folder.iterdir())
    fsdp_sharded = any(path.is_dir() and path.name.startswith("optimizer_") for path in folder.iterdir())
    optimizer = "optimizer.bin" if (folder / "optimizer.bin").is_file() else "optimizer.pt"  # .bin: FSDP's file
    wanted = [] if deepspeed else ["scheduler.pt"] if fsdp_sharded else [optimizer, "scheduler.pt"]
    wanted += ["rng_state.pth"] if world_size <= 1 else [f"rng_state_{rank}.pth" for rank in range(world_size)]
    found = {name: "is missing" if not (folder / name).is_file() else _unreadable(folder / name) for name in wanted}
    return {name: why for name, why in found.items() if why}


def checkpoint_problems(folder: Path) -> list[str]:
    """Why `folder` is not a complete checkpoint (empty when it is)."""
    if not folder.is_dir():
        return [f"{folder} is not a folder"]
    problems = []
    if not (folder / TRAINER_STATE).is_file():
        problems.append(f"it has no {TRAINER_STATE} (an interrupted save?)")
    elif (state := _load_state(folder)) is None:
        problems.append(f"its {TRAINER_STATE} does not read back (torn by a crash?)")
    elif (why := _inconsistent(folder, state)) is not None:
        problems.append(f"its {TRAINER_STATE} {why}")
    deepspeed = any(path.is_dir() and path.name.startswith("global_step") for path in folder.iterdir())
    if not deepspeed:  # the adapter is read when training resumes, deep inside the Trainer
        problems += _adapter_problems(folder)
    return problems


def _adapter_problems(folder: Path) -> list[str]:
    """A checkpoint's adapter: its config a JSON object, its safetensors weights readable (the header parses)."""
    from safetensors import safe_open

    try:
        config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        config = None
    if not isinstance(config, dict):
        return ["its adapter_config.json is missing or not a JSON object"]
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        return [] if (folder / "adapter_model.bin").is_file() else ["it has no adapter weights"]
    try:
        with safe_open(str(weights), framework="pt"):
            return []
    except Exception as error:  # noqa: BLE001 - safetensors' own error type: torn or not safetensors at all
        return [f"its adapter_model.safetensors does not read back ({first_line(error)})"]


def at_last_step(folder: Path) -> bool:
    """The checkpoint was saved at the run's last step (the Trainer always saves there)."""
    state = read_trainer_state(folder) or {}
    return state.get("global_step", -1) == state.get("max_steps")


def latest_complete(output_dir: str | Path) -> Path | None:
    for _, folder in reversed(checkpoint_folders(output_dir)):
        if not checkpoint_problems(folder):
            return folder
    return None


def resolve_checkpoint(resume_from_checkpoint: str | bool | None, output_dir: str | Path) -> Path | None:
    """`True`: the newest complete checkpoint-N in `output_dir`; a path: that folder, which must be complete."""
    if resume_from_checkpoint in (None, False, ""):
        return None
    if resume_from_checkpoint is True:
        found = latest_complete(output_dir)
        if found is None:
            raise UserError(f"--resume_from_checkpoint True: no complete checkpoint-N folder in {output_dir}"
                            + (" (the first is written after --save_steps steps)" if not checkpoint_folders(
                                output_dir) else ""))
        return found
    folder = Path(str(resume_from_checkpoint)).expanduser()
    problems = checkpoint_problems(folder)
    if problems:
        raise UserError(f"--resume_from_checkpoint {folder}: not a complete checkpoint: {'; '.join(problems)}; "
                        "pass a complete checkpoint-N folder, or True for the newest in --output_dir")
    return folder


def check_resumable(folder: Path, world_size: int, weights_only: bool) -> tuple[Path, str | None]:
    """(what to resume from, a note): the checkpoint itself when its optimizer/scheduler/RNG state is whole; with
    `weights_only`, a view of it without the files it lacks or cannot resume from (the Trainer starts those afresh
    when they are absent, but fails on a torn one); else refused."""
    missing = missing_state(folder, world_size)
    if not missing:
        return folder, None
    described = "; ".join(f"{name} {why}" for name, why in missing.items())
    if not weights_only:
        raise UserError(f"--resume_from_checkpoint {folder}: {described}, so the resumed run would not continue the "
                        "interrupted one exactly; resume from another checkpoint, or pass --resume_weights_only True "
                        "to take its weights and step and start the optimizer state afresh")
    view = Path(tempfile.mkdtemp(prefix="bentsao-resume-")) / folder.name
    view.mkdir()
    for path in folder.iterdir():
        if path.name not in missing:
            (view / path.name).symlink_to(path.resolve())
    return view, (f"note: resuming {folder} with --resume_weights_only: {described}; the optimizer/scheduler/RNG "
                  "state starts afresh, so this run differs from an uninterrupted one")


def check_same_lora(folder: Path, lora_r: int, lora_alpha: int, targets: Any) -> None:
    """A checkpoint trained with another LoRA shape cannot be resumed into this run's adapter."""
    try:
        config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return  # DeepSpeed checkpoints keep the engine state instead; the Trainer reports a mismatch itself
    if not isinstance(config, dict):
        return  # checkpoint_problems has refused it already
    problems = []
    if isinstance(config.get("r"), int) and config["r"] != lora_r:
        problems.append(f"--lora_r {config['r']} (this run: {lora_r})")
    if isinstance(config.get("lora_alpha"), (int, float)) and config["lora_alpha"] != lora_alpha:
        problems.append(f"--lora_alpha {config['lora_alpha']} (this run: {lora_alpha})")
    saved = config.get("target_modules")
    if isinstance(saved, list) and isinstance(targets, list) and set(saved) != set(targets):
        problems.append(f"--lora_target_modules {','.join(sorted(saved))} (this run: {','.join(sorted(targets))})")
    if problems:
        raise UserError(f"--resume_from_checkpoint {folder} was trained with {', '.join(problems)}; resume with the "
                        "same LoRA settings")
