"""The first hour of a new user (issue 14): a mistyped flag, `--help`, a restart over an earlier run, a mistyped
path, files colleagues can read. Each check runs in-process and fails before any model is loaded when the fix
holds; a spy on `from_pretrained` fails the test if the script got that far."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import shutil
import stat
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, TRAIN_QUICK, run_script, train_adapter
from in_process import run_main
from safetensors.torch import load_file

import build_dataset
import evaluate
import export_hf_checkpoint
import finetune
import generate
import infer
import infer_literature
from utils import tiny_base
from utils.core.cli import run_cli
from utils.training import plotting

# every script's entry point, a flag as a user mistypes it, and the flag it meant
MISTYPED = [
    ("finetune.py", finetune.main, ["--num_epoch", "1"], "--num_epochs"),
    ("infer.py", infer.main, ["--max_new_token", "5"], "--max_new_tokens"),
    ("infer_literature.py", infer_literature.main, ["--single_or_mult", "multi"], "--single_or_multi"),
    ("export_hf_checkpoint.py", export_hf_checkpoint.main, ["--output_dirr", "x"], "--output_dir"),
    ("generate.py", generate.main, ["--server_prot", "7861"], "--server_port"),
    ("evaluate.py", evaluate.main, ["--predictoins", "p.jsonl"], "--predictions"),
    ("build_dataset.py", {"knowledge": build_dataset.knowledge, "literature": build_dataset.literature},
     ["knowledge", "--outptu", "o.json"], "--output"),
    ("utils/tiny_base.py", tiny_base.main, ["--pretrain_step", "0"], "--pretrain_steps"),
    ("utils/training/plotting.py", plotting.main, ["--outptu", "x.png"], "--output"),
    # the benchmarks, run as scripts: cpu.py and layouts.py answer before torch is imported
    ("benchmarks/cpu.py", "benchmarks/cpu.py", ["--repeats", "3"], "--repeat"),
    ("benchmarks/layouts.py", "benchmarks/layouts.py", ["--thread", "2"], "--threads"),
    ("benchmarks/gpu_check.py", "benchmarks/gpu_check.py", ["--dryrun"], "--dry_run"),
]
BENCHMARKS = [case[0] for case in MISTYPED if isinstance(case[1], str)]
SCRIPTS = [(case[0], case[1]) for case in MISTYPED if callable(case[1])]  # fire scripts with one entry point

# `python benchmarks/x.py argv...` that also says whether torch was imported by the time it exited
RUN_AND_REPORT_TORCH = """
import runpy, sys
from pathlib import Path
script, sys.argv = sys.argv[1], sys.argv[1:]
sys.path.insert(0, str(Path(script).resolve().parent))  # as `python script` does
try:
    runpy.run_path(script, run_name="__main__")
finally:
    print("torch imported" if "torch" in sys.modules else "torch not imported", file=sys.stderr)
"""


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if any script gets as far as loading a model or a tokenizer."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the command line was checked")

    for name in ("AutoModelForCausalLM", "AutoTokenizer"):  # a config.json may be read: it holds no weights
        monkeypatch.setattr(getattr(transformers, name), "from_pretrained", refuse)


@pytest.mark.parametrize("script, main, argv, meant", MISTYPED, ids=[case[0] for case in MISTYPED])
def test_a_mistyped_flag_is_refused_before_any_work(script, main, argv, meant, tiny_llama, train_file, tmp_path,
                                                    no_model_loading):
    # otherwise valid command lines, so that only the typo can stop them
    valid = {
        "finetune.py": ["--base_model", tiny_llama, "--data_path", train_file, "--output_dir", tmp_path / "out"],
        "infer.py": ["--base_model", tiny_llama, "--use_lora", "False"],
        "infer_literature.py": ["--base_model", tiny_llama, "--use_lora", "False"],
        "generate.py": ["--base_model", tiny_llama, "--use_lora", "False"],
        "benchmarks/layouts.py": ["--base_model", tiny_llama],
    }.get(script, [])
    started = time.monotonic()
    if isinstance(main, str):  # a benchmark: its own process, where a torch import would show
        result = run_script("-c", RUN_AND_REPORT_TORCH, main, *map(str, valid), *argv)
        *lines, torch_line = result.stderr.splitlines()
        assert "gpu_check" in main or torch_line == "torch not imported", result.stderr[-2000:]
        result.stderr = "\n".join(lines) + "\n"
    elif script == "build_dataset.py":
        result = run_main(main, *argv[:1], *valid, *argv[1:])
    else:
        result = run_main(main, *valid, *argv)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"did you mean {meant}?" in result.stderr and result.stderr.startswith("error: ")
    assert "Traceback" not in result.stderr
    assert "gpu_check" in script or time.monotonic() - started < 5  # gpu_check imports torch first: it runs on GPUs
    assert not (tmp_path / "out").exists()  # nothing written


def test_an_unknown_flag_and_bad_values_are_reported_together(tiny_llama, train_file, tmp_path, no_model_loading):
    """Every problem in one line: a mistyped flag does not hide the bad values of the known ones."""
    result = run_main(finetune.main, "--base_model", tiny_llama, "--data_path", train_file, "--output_dir",
                      tmp_path / "out", "--num_epoch", "1", "--seed", "x", "--lora_dropout", "1")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    for flag in ("--num_epoch", "--num_epochs", "--seed", "--lora_dropout"):
        assert flag in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script, main", SCRIPTS, ids=[case[0] for case in SCRIPTS])
def test_every_flag_has_help_and_help_shows_it(script, main):
    """One way to declare a flag: a dataclass field with a help string; `--help` is written from them."""
    from utils.core.cli import args_class

    components = main.values() if isinstance(main, dict) else [main]
    for component in components:
        fields = dataclasses.fields(args_class(component))
        assert all(field.metadata.get("help") for field in fields), f"{script}: a flag without help"
        result = run_main(main, *([next(iter(main))] if isinstance(main, dict) else []), "--help")
        assert result.returncode == 0 and not result.stderr
        for field in fields:
            assert f"--{field.name}" in result.stdout, f"{script} --help does not show --{field.name}"


@pytest.mark.parametrize("script", BENCHMARKS)
def test_every_flag_of_a_benchmark_has_help(script, monkeypatch):
    import importlib.util

    from utils.core.cli import args_class

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location(f"first_hour_{Path(script).stem}", REPO / script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # where dataclasses look their module up
    spec.loader.exec_module(module)
    assert all(field.metadata.get("help") for field in dataclasses.fields(args_class(module.main)))
    result = run_main(module.main, "--help")
    assert result.returncode == 0 and "--" in result.stdout


# --- restarts --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tiny_llama, train_file, tmp_path_factory) -> Path:
    """A finished 4-step run: checkpoints at steps 2 and 4, the adapter, bentsao_training.json."""
    out = tmp_path_factory.mktemp("finished") / "lora"
    train_adapter(tiny_llama, train_file, out, "--val_set_size", "0")
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_rerunning_a_stopped_run_without_resume_is_refused(finished_run, tiny_llama, train_file, tmp_path,
                                                           no_model_loading):
    stopped = tmp_path / "stopped"
    shutil.copytree(finished_run, stopped)
    for name in ("adapter_model.safetensors", "adapter_config.json", "bentsao_training.json"):
        (stopped / name).unlink()  # as a run stopped after its checkpoints, before the end
    before = snapshot(stopped)
    result = run_main(finetune.main, "--base_model", tiny_llama, "--data_path", train_file,
                      "--output_dir", stopped, "--max_steps", "8")
    assert result.returncode == 2
    assert "--resume_from_checkpoint True" in result.stderr and "--overwrite True" in result.stderr
    assert snapshot(stopped) == before  # its checkpoints are untouched


def test_resuming_a_finished_run_says_so_and_exits_0(finished_run, tiny_llama, train_file, tmp_path):
    """Requeue scripts pass --resume_from_checkpoint True every time: once the run is finished that is one line,
    exit 0, and nothing changes."""
    done = tmp_path / "done"
    shutil.copytree(finished_run, done)
    before = snapshot(done)
    result = run_main(finetune.main, "--base_model", tiny_llama, "--data_path", train_file, "--output_dir", done,
                      *TRAIN_QUICK, "--val_set_size", "0", "--resume_from_checkpoint", "True")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stdout.count("\n") == 1 and str(done) in result.stdout and not result.stderr
    assert snapshot(done) == before


def test_a_run_stopped_after_its_last_checkpoint_finishes_on_resume(finished_run, tiny_llama, train_file, tmp_path):
    """Stopped after checkpoint-4 (its last step) but before the adapter was written: resuming writes the adapter
    from that checkpoint, the same as the uninterrupted run's, without training another step."""
    stopped = tmp_path / "stopped"
    shutil.copytree(finished_run, stopped)
    for name in ("adapter_model.safetensors", "adapter_config.json", "bentsao_training.json"):
        (stopped / name).unlink()
    result = run_main(finetune.main, "--base_model", tiny_llama, "--data_path", train_file, "--output_dir", stopped,
                      *TRAIN_QUICK, "--val_set_size", "0", "--resume_from_checkpoint", "True")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert sorted(p.name for p in stopped.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]  # no step 5
    expected = load_file(str(finished_run / "adapter_model.safetensors"))
    actual = load_file(str(stopped / "adapter_model.safetensors"))
    assert expected.keys() == actual.keys() and all(torch.equal(actual[k], expected[k]) for k in expected)
    summary = json.loads((stopped / "bentsao_training.json").read_text(encoding="utf-8"))["summary"]
    assert summary["steps"] == 4 and summary["train_loss"] is None and summary["tokens_per_s"] is None  # not measured


@pytest.mark.parametrize("checkpoint", ["checkpoint-2", "checkpoint-4"], ids=["mid-run", "last step"])
def test_a_checkpoint_whose_weight_names_do_not_fit_is_refused_on_resume(finished_run, tiny_llama, train_file,
                                                                         tmp_path, checkpoint):
    """peft resumes renamed weights with a warning and trains fresh ones in their place: refused, naming the
    checkpoint, before a step is trained."""
    from safetensors.torch import save_file

    stopped = tmp_path / "stopped"
    shutil.copytree(finished_run, stopped)
    if checkpoint == "checkpoint-2":
        shutil.rmtree(stopped / "checkpoint-4")
    for name in ("adapter_model.safetensors", "adapter_config.json", "bentsao_training.json"):
        (stopped / name).unlink()
    weights = stopped / checkpoint / "adapter_model.safetensors"
    save_file({k.replace("layers.", "layer."): v for k, v in load_file(str(weights)).items()}, str(weights),
              metadata={"format": "pt"})
    before = snapshot(stopped)
    result = run_main(finetune.main, "--base_model", tiny_llama, "--data_path", train_file, "--output_dir", stopped,
                      *TRAIN_QUICK, "--val_set_size", "0", "--resume_from_checkpoint", "True")
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert checkpoint in result.stderr and "layer.0" in result.stderr and "Traceback" not in result.stderr
    assert snapshot(stopped) == before


@pytest.mark.parametrize("length", [["--max_steps", "8"], ["--max_steps", "-1", "--num_epochs", "2"]],
                         ids=["max_steps", "num_epochs"])
def test_resuming_a_finished_run_for_longer_is_refused(finished_run, tiny_llama, train_file, tmp_path, length):
    """A longer run resumed from the last checkpoint would continue a learning-rate schedule that reached 0 at step
    4 (then jump) and replace the finished adapter without --overwrite."""
    done = tmp_path / "done"
    shutil.copytree(finished_run, done)
    before = snapshot(done)
    result = run_main(finetune.main, "--base_model", tiny_llama, "--data_path", train_file, "--output_dir", done,
                      *TRAIN_QUICK, "--val_set_size", "0", *length, "--resume_from_checkpoint", "True")
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert str(done) in result.stderr and "--output_dir" in result.stderr and "--overwrite True" in result.stderr
    assert snapshot(done) == before


def test_resuming_a_stopped_run_with_another_length_is_refused(finished_run, tiny_llama, train_file, tmp_path):
    stopped = tmp_path / "stopped"
    shutil.copytree(finished_run, stopped)
    shutil.rmtree(stopped / "checkpoint-4")
    for name in ("adapter_model.safetensors", "adapter_config.json", "bentsao_training.json"):
        (stopped / name).unlink()  # as a run stopped after checkpoint-2
    result = run_main(finetune.main, "--base_model", tiny_llama, "--data_path", train_file, "--output_dir", stopped,
                      *TRAIN_QUICK, "--val_set_size", "0", "--max_steps", "6", "--resume_from_checkpoint", "True")
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "checkpoint-2" in result.stderr and "--max_steps" in result.stderr


def test_rerunning_a_finished_run_advises_a_new_folder_or_overwrite(finished_run, tiny_llama, train_file, tmp_path,
                                                                   no_model_loading):
    done = tmp_path / "done"
    shutil.copytree(finished_run, done)
    result = run_main(finetune.main, "--base_model", tiny_llama, "--data_path", train_file, "--output_dir", done,
                      "--max_steps", "8")
    assert result.returncode == 2
    assert str(done) in result.stderr and "--overwrite True" in result.stderr
    assert "--resume_from_checkpoint" not in result.stderr  # the user never passed it; a finished run has no resume


# --- mistyped paths ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["--base_model", "./models/tiny-lama"], ["--base_model", "tiny-lama"],
                                  ["--lora_weights", "lora-bentsa"]],
                         ids=["path", "bare-name-base", "bare-name-adapter"])
def test_a_mistyped_local_path_is_refused_at_once_even_online(argv, tiny_llama, monkeypatch, no_model_loading):
    """Not a hub id (no org/name): no network wait, even with the hub reachable in principle."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    args = {"--base_model": str(tiny_llama), "--lora_weights": "", "--use_lora": "True"}
    args.update(dict(zip(argv[0::2], argv[1::2], strict=True)))
    if args["--lora_weights"] == "":
        args["--use_lora"] = "False"
    started = time.monotonic()
    result = run_main(infer.main, *[item for pair in args.items() for item in pair])
    assert result.returncode == 2 and f"{argv[0]} {argv[1]}" in result.stderr, result.stderr
    assert time.monotonic() - started < 5


@pytest.fixture
def no_network(monkeypatch):
    """Fail the test if anything looks up a host name or opens a connection."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("the network was used")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_a_mistyped_path_beside_its_folder_is_refused_at_once_online(tiny_llama, tmp_path, monkeypatch,
                                                                      no_model_loading, no_network):
    """`models/tiny-lama` has the form of a hub id (org/name), but `models/tiny-llama` is a folder here: a mistyped
    path, answered at once with the nearest folder, not after a minute of hub retries."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    (tmp_path / "models" / "tiny-llama").mkdir(parents=True)
    (tmp_path / "models" / "bloom-560m").mkdir()
    monkeypatch.chdir(tmp_path)
    started = time.monotonic()
    result = run_main(infer.main, "--base_model", "models/tiny-lama", "--use_lora", "False")
    assert time.monotonic() - started < 1
    assert result.returncode == 2, result.stderr
    assert "--base_model models/tiny-lama" in result.stderr and "models/tiny-llama?" in result.stderr


def test_a_hub_id_is_left_to_the_hub_unless_offline_and_not_cached(tmp_path, monkeypatch, no_network):
    """`Qwen/Qwen2.5-7B` while `Qwen/Qwen2.5-7B-Instruct` was downloaded into ./Qwen: in the hub cache it is a hub id
    online and offline; not cached, offline, it is refused at once; not cached, online, from_pretrained asks the
    hub (which may have it)."""
    from huggingface_hub import constants

    from utils.model.source import source_problems

    snapshot = tmp_path / "cache" / "models--Qwen--Qwen2.5-7B" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}", encoding="utf-8")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123", encoding="utf-8")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    (tmp_path / "work" / "Qwen" / "Qwen2.5-7B-Instruct").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work")
    for offline in ("1", ""):
        monkeypatch.setenv("HF_HUB_OFFLINE", offline)
        assert source_problems("Qwen/Qwen2.5-7B", "--base_model", "config.json") == []
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (problem,) = source_problems("meta-llama/Llama-2-7b-hf", "--base_model", "config.json")
    assert "meta-llama/Llama-2-7b-hf" in problem and "HF_HUB_OFFLINE" in problem
    monkeypatch.setenv("HF_HUB_OFFLINE", "")
    assert source_problems("meta-llama/Llama-2-7b-hf", "--base_model", "config.json") == []


def test_a_hub_failure_is_one_line_naming_the_model(monkeypatch):
    """The error transformers raises when the hub is unreachable (an OSError from huggingface_hub's
    LocalEntryNotFoundError from httpx's ConnectError) names the model and the library's reason."""
    import httpx
    from huggingface_hub.errors import LocalEntryNotFoundError

    from utils.model.source import load_error

    try:
        try:
            try:
                raise httpx.ConnectError("[Errno -3] Temporary failure in name resolution")
            except httpx.ConnectError as dns:
                raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub") from dns
        except LocalEntryNotFoundError as missing:
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files") from missing
    except OSError as error:
        message = str(load_error("the weights of", "meta-llama/Llama-2-7b-hf", error))
    assert "meta-llama/Llama-2-7b-hf" in message and "We couldn't connect" in message and "\n" not in message


def test_an_uncached_hub_id_while_offline_is_refused_at_once(tiny_llama, tmp_path, monkeypatch, no_model_loading):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # no models/ folder here: `models/tiny-lama` is read as a hub id
    started = time.monotonic()
    result = run_main(infer.main, "--base_model", "models/tiny-lama", "--use_lora", "False")
    assert result.returncode == 2 and "HF_HUB_OFFLINE" in result.stderr, result.stderr
    assert "models/tiny-lama" in result.stderr and time.monotonic() - started < 5


# --- progress in logs ---------------------------------------------------------------------------------------


class TerminalStream(io.StringIO):
    """A stream that says it is a terminal, as stderr is under `python finetune.py ... | tee log` from a shell."""

    def isatty(self) -> bool:
        return True


def test_progress_lines_reach_a_teed_log_while_stderr_is_a_terminal(tiny_llama, train_file, tmp_path):
    """`python finetune.py ... | tee log`: stdout is a pipe, stderr the terminal. The log gets `step N/M` lines, never
    the Trainer's `{'loss': ...}` dicts (the real Trainer, its real progress callbacks; only isatty says terminal)."""
    log, terminal = io.StringIO(), TerminalStream()
    argv = ["--base_model", str(tiny_llama), "--data_path", str(train_file), "--output_dir", str(tmp_path / "out"),
            *TRAIN_QUICK, "--val_set_size", "0"]
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(terminal):
        run_cli(finetune.main, argv)
    text = log.getvalue()
    assert re.search(r"^step 1/4, [\d.]+ s/step, ETA .*, loss \d", text, flags=re.MULTILINE), text[-3000:]
    assert re.search(r"^step 4/4, ", text, flags=re.MULTILINE) and "checkpoint saved: " in text
    assert "{'loss'" not in text and "'epoch'" not in text, text[-3000:]


def test_a_log_file_gets_no_progress_bar_junk(tiny_llama, train_file, tmp_path):
    """nohup/sbatch: stderr is a file. datasets' map bars, transformers' "Loading weights" bar, the Trainer's bar and
    infer.py's answering bar are off (each redraw would be a `\r`-joined chunk, the last one printed twice)."""
    trained = train_adapter(tiny_llama, train_file, tmp_path / "lora", "--val_set_size", "0")
    answered = run_main(infer.main, "--base_model", tiny_llama, "--lora_weights", tmp_path / "lora",
                        "--max_new_tokens", "4", "--num_beams", "1")
    assert answered.returncode == 0, answered.stderr[-2000:]
    for result in (trained, answered):
        assert "\r" not in result.stderr and "\r" not in result.stdout, result.stderr[-2000:]
    assert "step 4/4" in trained.stdout  # the progress lines stand in for the bars


def test_a_log_file_gets_no_bar_that_a_library_draws_with_tqdm_itself(tiny_llama, tmp_path):
    """transformers' GGUF conversion draws a plain `tqdm.auto` bar; torch imports tqdm before TQDM_DISABLE could be
    read, so run_cli sets tqdm's default itself (a bar asked for explicitly still draws)."""
    import tqdm.auto

    assert run_main(infer.main, "--base_model", tiny_llama, "--use_lora", "False", "--max_new_tokens", "2",
                    "--num_beams", "1").returncode == 0
    stream = io.StringIO()
    for _ in tqdm.auto.tqdm(range(3), file=stream, mininterval=0):
        pass
    assert stream.getvalue() == ""
    assert tqdm.auto.tqdm(range(3), disable=False, file=stream).disable is False


# --- files colleagues can read ----------------------------------------------------------------------------------


def test_published_adapter_and_checkpoint_files_follow_the_umask(finished_run):
    """Libraries write some files through 0600 temporary files; the published ones get what open() would give."""
    from utils.core.io import FILE_MODE

    umask = os.umask(0)
    os.umask(umask)
    assert FILE_MODE == 0o666 & ~umask
    files = [path for path in finished_run.rglob("*") if path.is_file()]
    assert any(path.name == "adapter_model.safetensors" for path in files)
    assert any(path.parent.name.startswith("checkpoint-") for path in files)
    modes = {str(path.relative_to(finished_run)): oct(stat.S_IMODE(path.stat().st_mode)) for path in files}
    assert set(modes.values()) == {oct(FILE_MODE)}, modes


def test_replace_folder_makes_a_private_staging_folder_readable(tmp_path):
    """What export_hf_checkpoint.py publishes: a merged checkpoint staged with 0600 files (mkstemp)."""
    from utils.core.io import FILE_MODE, replace_folder

    staging = tmp_path / ".staging"
    staging.mkdir(mode=0o700)
    descriptor, name = tempfile.mkstemp(dir=staging)
    os.write(descriptor, b"{}")
    os.close(descriptor)
    os.rename(name, staging / "config.json")
    assert stat.S_IMODE((staging / "config.json").stat().st_mode) == 0o600
    replace_folder(staging, tmp_path / "merged")
    assert stat.S_IMODE((tmp_path / "merged" / "config.json").stat().st_mode) == FILE_MODE
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "merged").stat().st_mode) == 0o777 & ~umask  # a folder others may enter


# --- no library deprecation noise from our own calls ---------------------------------------------------------


def test_gradient_checkpointing_and_lora_print_no_future_warning(tiny_llama):
    """`--gradient_checkpointing True` goes through transformers 5's activation_checkpointing_enable (its old name
    warns), and peft's read of the deprecated is_gradient_checkpointing is silenced (utils/__init__.py)."""
    import warnings
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from utils.training.setup import build_peft_model

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    args = SimpleNamespace(load_8bit=False, load_4bit=False, gradient_checkpointing=True, lora_r=4, lora_alpha=8,
                           lora_dropout=0.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        peft_model = build_peft_model(model, ["q_proj", "v_proj"], args)
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == []
    assert peft_model.get_base_model().is_activation_checkpointing


def test_a_mistyped_data_path_gets_a_did_you_mean(tiny_llama, tmp_path, no_model_loading):
    (tmp_path / "llama_data.json").write_text('{"instruction": "q", "output": "a"}\n', encoding="utf-8")
    result = run_main(finetune.main, "--base_model", tiny_llama, "--data_path", tmp_path / "llama_dat.json",
                      "--output_dir", tmp_path / "out")
    assert result.returncode == 2 and f"{tmp_path / 'llama_data.json'}?" in result.stderr, result.stderr
    assert "--data_path" in result.stderr


def test_every_problem_of_a_build_command_is_in_its_one_error(tmp_path):
    result = run_main({"knowledge": build_dataset.knowledge}, "knowledge", "--kb", REPO / "data/knowledge_base.jsonl",
                      "--question_kinds", "fact,bogus", "--prompt_kinds", "nope", "--backend", "openai",
                      "--output", tmp_path / "out.json")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert all(fact in result.stderr for fact in ("bogus", "nope", "--model")) and not list(tmp_path.iterdir())


def test_a_mistyped_knowledge_base_gets_a_did_you_mean(tmp_path):
    (tmp_path / "knowledge_base.jsonl").write_text('{"中心词": "甲病", "常见症状": ["发热"]}\n', encoding="utf-8")
    result = run_main({"knowledge": build_dataset.knowledge}, "knowledge", "--kb", tmp_path / "knowledge_bas.jsonl",
                      "--output", tmp_path / "out.json")
    assert result.returncode == 2 and "--kb" in result.stderr, result.stderr
    assert f"{tmp_path / 'knowledge_base.jsonl'}?" in result.stderr and not (tmp_path / "out.json").exists()


@pytest.mark.parametrize("busy, env, expected", [(5, None, 2), (70, None, 1), (100, None, 1), (100, "2", 2)])
def test_cpu_threads_follow_the_idle_cores_unless_omp_num_threads_says(busy, env, expected, monkeypatch):
    """On a CPU that other work keeps busy, torch's default threads fight it (docs/performance.md): the scripts
    take as many threads as cores are idle; OMP_NUM_THREADS, when set, decides."""
    import psutil

    from utils.runtime import use_idle_cores

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(psutil, "cpu_percent", lambda interval: busy)
    if env is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", env)
    threads = torch.get_num_threads()
    try:
        line = use_idle_cores()
        assert torch.get_num_threads() == expected and f"{expected} torch thread" in line
    finally:
        torch.set_num_threads(threads)


def test_the_progress_line_says_what_to_do_when_steps_slow_down(monkeypatch):
    from utils.training.callbacks import ProgressLines

    lines = io.StringIO()
    progress = ProgressLines(enabled=True, stream=lines)
    clock = iter([0.0, 10.0, 20.0, 100.0])  # training starts; steps 10 and 20 at 1 s/step; step 30 at 8 s/step
    monkeypatch.setattr(time, "monotonic", lambda: next(clock))
    args, state = SimpleNamespace(device=torch.device("cpu")), SimpleNamespace(global_step=0, max_steps=40,
                                                                               is_world_process_zero=True)
    progress.on_train_begin(args, state, None)
    for step in (10, 20, 30):
        state.global_step = step
        progress.on_log(args, state, None, logs={"loss": 1.0})
    first, second, third = lines.getvalue().splitlines()
    assert "OMP_NUM_THREADS" not in first + second and "OMP_NUM_THREADS=1" in third
