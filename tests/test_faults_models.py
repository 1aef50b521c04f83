"""Fault injection, models: broken base models, adapters and checkpoints are one line (never a traceback, never an
answer from a broken model), found before the weights load wherever that is possible.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from faultkit import assert_refused, assert_succeeded, assert_unchanged, cli, snapshot
from safetensors.torch import load_file, save_file

import export_hf_checkpoint
import finetune
import infer
from utils.training.args import FinetuneArgs


def truncate(path: Path, size: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if size is None else size])


def edit_json(path: Path, change: Callable[[dict], object]) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(json.dumps(data), encoding="utf-8")


def edit_tensors(path: Path, change: Callable[[dict], dict]) -> None:
    save_file(change(load_file(str(path))), str(path), metadata={"format": "pt"})


class Evil:
    """Unpickling this runs code (it writes `marker`): a weights-only loader must refuse it unread."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


@pytest.fixture(scope="module")
def adapter(tiny_llama, tmp_path_factory) -> Path:
    """A LoRA adapter for the tiny llama with non-zero weights (no training needed)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("adapter") / "lora"
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(folder)
    return folder


def copy_of(source: Path, tmp_path: Path, name: str) -> Path:
    return Path(shutil.copytree(source, tmp_path / name))


def answer(base: Path, lora: Path | None, monkeypatch, capsys, *extra):
    options = ["--lora_weights", lora] if lora else ["--use_lora", "False"]
    return cli(infer.main, "--base_model", base, *options, "--max_new_tokens", "2", "--num_beams", "1", *extra,
               monkeypatch=monkeypatch, capsys=capsys)


# --- base models -----------------------------------------------------------------------------------------------------


def nan_weights(folder: Path) -> None:
    edit_tensors(folder / "model.safetensors",
                 lambda tensors: {name: torch.full_like(t, float("nan")) for name, t in tensors.items()})


# (case, damage, key facts the error line names besides the base model's folder)
BASES = [
    ("truncated weights", lambda f: truncate(f / "model.safetensors"), []),
    ("empty weights", lambda f: truncate(f / "model.safetensors", 0), []),
    ("header lies", lambda f: (f / "model.safetensors").write_bytes((10**15).to_bytes(8, "little") + b"{}"), []),
    ("truncated tokenizer", lambda f: truncate(f / "tokenizer.json"), ["tokenizer"]),
    ("foreign tokenizer", lambda f: (f / "tokenizer.json").write_text('{"version": "1.0", "model": 5}'),
     ["tokenizer"]),
    ("config a list", lambda f: (f / "config.json").write_text("[]"), ["config.json"]),
    ("config nested", lambda f: (f / "config.json").write_text("[" * 100_000), ["config.json"]),
    ("no layers", lambda f: edit_json(f / "config.json", lambda c: c.update(num_hidden_layers=-1)), []),
    ("vocab a word", lambda f: edit_json(f / "config.json", lambda c: c.update(vocab_size="big")), ["vocab_size"]),
    ("config of another size", lambda f: edit_json(f / "config.json", lambda c: c.update(hidden_size=256)), []),
    ("unknown architecture", lambda f: edit_json(f / "config.json", lambda c: c.update(model_type="not_real")),
     ["not_real"]),
    ("NaN weights", nan_weights, ["NaN"]),
    ("no weights", lambda f: (f / "model.safetensors").unlink(), []),
]


@pytest.mark.parametrize("name, damage, expected", BASES, ids=[case[0] for case in BASES])
def test_broken_base_model(name, damage, expected, tiny_llama, tmp_path, monkeypatch, capsys):
    base = copy_of(tiny_llama, tmp_path, f"b_{name}")
    assert_refused_without_answering(damage, base, base, None, tmp_path, expected, monkeypatch, capsys)


def assert_refused_without_answering(damage, damaged: Path, base: Path, lora: Path | None, tmp_path: Path,
                                     expected: list[str], monkeypatch, capsys) -> None:
    """`damage` the copy, then infer.py refuses it in one line naming it, answers nothing and changes nothing."""
    damage(damaged)
    before = snapshot(tmp_path)
    outcome = answer(base, lora, monkeypatch, capsys)
    assert_unchanged(before, tmp_path)
    assert "###model output###" not in outcome.out, "[false success] an answer from a broken model or adapter"
    assert_refused(outcome, str(damaged), *expected)


def test_a_pickled_base_that_runs_code_is_refused_unread(tiny_llama, tmp_path, monkeypatch, capsys):
    base = copy_of(tiny_llama, tmp_path, "pickled")
    marker = tmp_path / "pwned"
    (base / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": Evil(marker)}, base / "pytorch_model.bin")
    line = assert_refused(answer(base, None, monkeypatch, capsys), str(base))
    assert "pickle" in line and "arbitrary code" in line  # says what it is, in one message
    assert not marker.exists()


# --- adapters --------------------------------------------------------------------------------------------------------


def set_first(tensors: dict, value: float) -> dict:
    name = min(tensors)
    tensors[name][0, 0] = value
    return tensors


# (case, damage, key facts the error line names besides the adapter's folder)
ADAPTERS = [
    ("NaN weight", lambda f: edit_tensors(f / "adapter_model.safetensors", lambda t: set_first(t, float("nan"))),
     ["NaN"]),
    ("inf weight", lambda f: edit_tensors(f / "adapter_model.safetensors", lambda t: set_first(t, float("inf"))),
     ["inf"]),
    ("truncated weights", lambda f: truncate(f / "adapter_model.safetensors"), []),
    ("no weights", lambda f: (f / "adapter_model.safetensors").unlink(), ["adapter_model.safetensors"]),
    ("no config", lambda f: (f / "adapter_config.json").unlink(), ["adapter_config.json"]),
    ("rank a word", lambda f: edit_json(f / "adapter_config.json", lambda c: c.update(r="8")), []),
    ("rank 0", lambda f: edit_json(f / "adapter_config.json", lambda c: c.update(r=0)), ["`r`"]),
    ("other rank", lambda f: edit_json(f / "adapter_config.json", lambda c: c.update(r=8)), ["size mismatch"]),
    ("other targets", lambda f: edit_json(f / "adapter_config.json", lambda c: c.update(target_modules=["k_proj"])),
     ["q_proj"]),
    ("renamed keys", lambda f: edit_tensors(f / "adapter_model.safetensors",
                                            lambda t: {k.replace("layers.", "layer."): v for k, v in t.items()}),
     ["layer.0"]),
    ("alpha a word", lambda f: edit_json(f / "adapter_config.json", lambda c: c.update(lora_alpha="x")), []),
    ("no peft_type", lambda f: edit_json(f / "adapter_config.json", lambda c: c.pop("peft_type")), ["peft_type"]),
    ("IA3", lambda f: edit_json(f / "adapter_config.json", lambda c: c.update(peft_type="IA3")), []),
    ("bad task type", lambda f: edit_json(f / "adapter_config.json", lambda c: c.update(task_type="BOGUS")),
     ["BOGUS"]),
    ("flat tensors", lambda f: edit_tensors(f / "adapter_model.safetensors",
                                            lambda t: {k: v.flatten().contiguous() for k, v in t.items()}), []),
    ("config a list", lambda f: (f / "adapter_config.json").write_text("[]"), []),
    ("metadata a list", lambda f: (f / "bentsao_training.json").write_text("[1]"), ["bentsao_training.json"]),
    ("metadata of another base", lambda f: (f / "bentsao_training.json").write_text('{"hidden_size": 4096}'),
     ["hidden_size 4096"]),
]


@pytest.mark.parametrize("name, damage, expected", ADAPTERS, ids=[case[0] for case in ADAPTERS])
def test_broken_adapter(name, damage, expected, tiny_llama, adapter, tmp_path, monkeypatch, capsys):
    lora = copy_of(adapter, tmp_path, "lora")
    assert_refused_without_answering(damage, lora, tiny_llama, lora, tmp_path, expected, monkeypatch, capsys)


def test_a_pickled_adapter_that_runs_code_is_refused_unread(tiny_llama, adapter, tmp_path, monkeypatch, capsys):
    lora = copy_of(adapter, tmp_path, "lora")
    (lora / "adapter_model.safetensors").unlink()
    marker = tmp_path / "pwned"
    torch.save({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": Evil(marker)},
               lora / "adapter_model.bin")
    line = assert_refused(answer(tiny_llama, lora, monkeypatch, capsys), str(lora))
    assert "pickle" in line and "arbitrary code" in line
    assert not marker.exists()


def test_an_untrained_adapter_answers_with_a_warning(tiny_llama, adapter, tmp_path, monkeypatch, capsys):
    """Every lora_B zero (peft's initial state): valid, but it changes nothing; a warning says so."""
    lora = copy_of(adapter, tmp_path, "lora")
    edit_tensors(lora / "adapter_model.safetensors",
                 lambda tensors: {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in tensors.items()})
    outcome = answer(tiny_llama, lora, monkeypatch, capsys)
    assert_succeeded(outcome)
    assert "warning: every lora_B weight" in outcome.err, "[message] no word that the adapter changes nothing"
    assert "###model output###" in outcome.out


# --- checkpoints -----------------------------------------------------------------------------------------------------

TRAIN = ["--batch_size", "4", "--micro_batch_size", "4", "--val_set_size", "0", "--cutoff_len", "64",
         "--learning_rate", "3e-3", "--logging_steps", "1", "--save_steps", "1", "--warmup_steps", "0"]


@pytest.fixture(scope="module")
def trained(tiny_llama, train_file, tmp_path_factory) -> Path:
    """A finished 2-step run with a checkpoint after each step."""
    out = tmp_path_factory.mktemp("run") / "out"
    finetune.main(FinetuneArgs(base_model=str(tiny_llama), data_path=str(train_file), output_dir=str(out),
                               max_steps=2, batch_size=4, micro_batch_size=4, val_set_size=0, cutoff_len=64,
                               learning_rate=3e-3, save_steps=1, warmup_steps=0))
    return out


def write_state(folder: Path, state: object) -> None:
    (folder / "trainer_state.json").write_text(json.dumps(state), encoding="utf-8")


def edit_state(folder: Path, **fields: object) -> None:
    state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    write_state(folder, {**state, **fields})


# (case, damage, extra flags, key facts the error line names)
CHECKPOINTS = [
    ("no optimizer", lambda c: (c / "optimizer.pt").unlink(), [], ["optimizer.pt", "--resume_weights_only True"]),
    ("no scheduler", lambda c: (c / "scheduler.pt").unlink(), [], ["scheduler.pt"]),
    ("no RNG state", lambda c: (c / "rng_state.pth").unlink(), [], ["rng_state.pth"]),
    ("truncated optimizer", lambda c: truncate(c / "optimizer.pt"), [], ["optimizer.pt"]),
    ("scheduler garbage", lambda c: (c / "scheduler.pt").write_bytes(b"garbage"), [], ["scheduler.pt"]),
    ("torn trainer_state", lambda c: truncate(c / "trainer_state.json"), [], ["trainer_state.json"]),
    ("trainer_state a list", lambda c: write_state(c, []), [], ["trainer_state.json"]),
    ("trainer_state without fields", lambda c: write_state(c, {"global_step": 1}), [], ["trainer_state.json"]),
    ("no trainer_state", lambda c: (c / "trainer_state.json").unlink(), [], ["trainer_state.json"]),
    ("negative step", lambda c: edit_state(c, global_step=-5), [], ["-5"]),
    ("step past the end", lambda c: edit_state(c, global_step=9), [], ["9"]),
    ("step not the folder's", lambda c: edit_state(c, global_step=2), [], ["checkpoint-1"]),
    ("truncated adapter", lambda c: truncate(c / "adapter_model.safetensors"), [], ["adapter_model.safetensors"]),
    ("adapter config a list", lambda c: (c / "adapter_config.json").write_text("[]"), [], ["adapter_config.json"]),
    ("other rank", lambda c: None, ["--lora_r", "16"], ["--lora_r"]),
    ("other alpha", lambda c: None, ["--lora_alpha", "32"], ["--lora_alpha"]),
    ("other targets", lambda c: None, ["--lora_target_modules", "q_proj,k_proj"], ["--lora_target_modules"]),
    ("shorter run", lambda c: None, ["--max_steps", "1"], ["--max_steps"]),
]


@pytest.mark.parametrize("name, damage, flags, expected", CHECKPOINTS, ids=[case[0] for case in CHECKPOINTS])
def test_a_broken_or_different_checkpoint_is_not_resumed(name, damage, flags, expected, trained, tiny_llama,
                                                         train_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    checkpoint = Path(shutil.copytree(trained / "checkpoint-1", out / "checkpoint-1"))
    damage(checkpoint)
    before = snapshot(tmp_path)
    outcome = cli(finetune.main, "--base_model", tiny_llama, "--data_path", train_file, "--output_dir", out,
                  "--max_steps", "2", *TRAIN, "--resume_from_checkpoint", checkpoint, *flags,
                  monkeypatch=monkeypatch, capsys=capsys)
    assert_unchanged(before, tmp_path)  # nothing trained, nothing written, not even the lock file
    assert_refused(outcome, *expected)


def test_resume_true_skips_a_torn_newest_checkpoint(trained, tiny_llama, train_file, tmp_path, monkeypatch, capsys):
    """`--resume_from_checkpoint True` takes the newest complete checkpoint: a torn newer one is passed over."""
    out = tmp_path / "out"
    shutil.copytree(trained / "checkpoint-1", out / "checkpoint-1")
    torn = Path(shutil.copytree(trained / "checkpoint-2", out / "checkpoint-2"))
    truncate(torn / "trainer_state.json")
    outcome = cli(finetune.main, "--base_model", tiny_llama, "--data_path", train_file, "--output_dir", out,
                  "--max_steps", "2", *TRAIN, "--resume_from_checkpoint", "True", monkeypatch=monkeypatch,
                  capsys=capsys)
    assert_succeeded(outcome)
    assert f"resuming {out / 'checkpoint-1'}" in outcome.out
    assert f"adapter saved to {out.resolve()}" in outcome.out
    assert all(torch.isfinite(t).all() for t in load_file(str(out / "adapter_model.safetensors")).values())


@pytest.mark.parametrize("damage", [lambda path: path.unlink(), truncate], ids=["missing", "truncated"])
def test_resume_weights_only_accepts_a_checkpoint_without_optimizer(damage, trained, tiny_llama, train_file, tmp_path,
                                                                    monkeypatch, capsys):
    """The advice given for a missing or torn optimizer state works: the weights and step resume, the optimizer
    starts afresh, the checkpoint itself is left as it was."""
    out = tmp_path / "out"
    checkpoint = Path(shutil.copytree(trained / "checkpoint-1", out / "checkpoint-1"))
    damage(checkpoint / "optimizer.pt")
    before = snapshot(checkpoint)
    outcome = cli(finetune.main, "--base_model", tiny_llama, "--data_path", train_file, "--output_dir", out,
                  "--max_steps", "2", *TRAIN, "--resume_from_checkpoint", checkpoint, "--resume_weights_only",
                  "True", monkeypatch=monkeypatch, capsys=capsys)
    assert_succeeded(outcome)
    note = next(line for line in outcome.out.splitlines() if "--resume_weights_only" in line)
    assert "optimizer.pt" in note
    assert (out / "adapter_config.json").is_file()
    assert_unchanged(before, checkpoint)


def test_a_finished_run_is_not_restarted_over(trained, tiny_llama, train_file, tmp_path, monkeypatch, capsys):
    out = Path(shutil.copytree(trained, tmp_path / "out"))
    before = snapshot(out)
    outcome = cli(finetune.main, "--base_model", tiny_llama, "--data_path", train_file, "--output_dir", out,
                  "--max_steps", "2", *TRAIN, monkeypatch=monkeypatch, capsys=capsys)
    assert_unchanged(before, out)
    assert_refused(outcome, str(out), "--overwrite True")


# --- export ----------------------------------------------------------------------------------------------------------


def export(tiny_llama: Path, lora: Path, output: Path | str, monkeypatch, capsys, *extra):
    return cli(export_hf_checkpoint.main, "--base_model", tiny_llama, "--lora_weights", lora, "--output_dir", output,
               *extra, monkeypatch=monkeypatch, capsys=capsys)


@pytest.mark.parametrize("where", ["a file", "the base", "inside the base", "the adapter", "inside the adapter",
                                   "a folder of other files", "a model", "the working folder", "under a file"])
def test_export_never_writes_over_what_it_should_not(where, tiny_llama, adapter, tmp_path, monkeypatch, capsys):
    base, lora = copy_of(tiny_llama, tmp_path, "base"), copy_of(adapter, tmp_path, "lora")
    (tmp_path / "notes.txt").write_text("keep me", encoding="utf-8")
    project = tmp_path / "project"
    project.mkdir()
    (project / "train.py").write_text("print('mine')\n", encoding="utf-8")
    model = copy_of(tiny_llama, tmp_path, "model")
    output, expected = {  # the key fact besides --output_dir
        "a file": (tmp_path / "notes.txt", "notes.txt"),
        "the base": (base, str(base)),
        "inside the base": (base / "merged", str(base)),
        "the adapter": (lora, str(lora)),
        "inside the adapter": (lora / "merged", str(lora)),
        "a folder of other files": (project, "train.py"),
        "a model": (model, "--overwrite True"),
        "the working folder": (project, str(project)),
        "under a file": (tmp_path / "notes.txt" / "merged", "notes.txt"),
    }[where]
    if where == "the working folder":
        monkeypatch.chdir(project)
    before = snapshot(tmp_path)
    outcome = export(base, lora, output, monkeypatch, capsys,
                     *(["--overwrite", "True"] if where in ("a folder of other files", "the working folder") else []))
    assert_unchanged(before, tmp_path)
    assert_refused(outcome, "--output_dir", expected)


def test_export_overwrite_replaces_a_model_whole(tiny_llama, adapter, tmp_path, monkeypatch, capsys):
    output = copy_of(tiny_llama, tmp_path, "merged")
    (output / "model-00001-of-00009.safetensors").write_bytes(b"a shard of an older export")
    outcome = export(tiny_llama, adapter, output, monkeypatch, capsys, "--overwrite", "True")
    assert_succeeded(outcome)
    assert f"merged checkpoint saved to {output.resolve()}" in outcome.out
    assert not (output / "model-00001-of-00009.safetensors").exists()  # no stale shard mixes into the new model
    merged = load_file(str(output / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in merged.values())
    assert not list(tmp_path.glob(".tmp-*")) and not list(tmp_path.glob(".old-*"))


def test_export_of_a_nan_model_saves_nothing(tiny_llama, adapter, tmp_path, monkeypatch, capsys):
    base = copy_of(tiny_llama, tmp_path, "base")
    nan_weights(base)
    assert_refused(export(base, adapter, tmp_path / "merged", monkeypatch, capsys), "NaN/inf")
    assert not (tmp_path / "merged").exists()
