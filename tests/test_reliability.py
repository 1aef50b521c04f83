"""Issue 5: bad input is one clear line (exit 2, no traceback), nothing is lost, nothing unsafe runs.

Most CLI cases run the script's `main` in-process through `run_cli` (the same code path as `python script.py`,
without paying for a fresh interpreter each time); a few run as real subprocesses, and the kill tests must.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, run_line, run_script
from in_process import run_main
from safetensors.torch import load_file

import build_dataset
import evaluate
import export_hf_checkpoint
import finetune
import infer
import infer_literature
from tests.fake_openai import FakeOpenAI, Reply
from utils.core.errors import UserError
from utils.training.args import FinetuneArgs

# --------------------------------------------------------------------------------------------------------------
# helpers


def cli(component: Callable | dict, *argv: str, **_: object) -> tuple[int, str, str]:
    """`python script.py argv...` in-process: (exit code, stdout, stderr)."""
    result = run_main(component, *argv)
    return result.returncode, result.stdout, result.stderr


def lora_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def assert_same_adapter(actual: Path, expected: Path) -> None:
    a, b = lora_tensors(actual), lora_tensors(expected)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-4, rtol=0)


def write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


class Evil:
    """Unpickling this runs code: it writes `marker`. A weights-only loader must refuse it without running it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def evil_pickle(path: Path, marker: Path) -> Path:
    torch.save({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": Evil(marker)}, path)
    return path


# --------------------------------------------------------------------------------------------------------------
# fixtures: crafted adapters and models (no training needed)


def make_adapter(model, folder: Path, targets: list[str], metadata: dict | None = None, safe: bool = True) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    peft_model.save_pretrained(folder, safe_serialization=safe)
    if metadata is not None:
        write(folder / "bentsao_training.json", json.dumps(metadata))
    return folder


@pytest.fixture(scope="module")
def adapters(tiny_models, tmp_path_factory) -> dict[str, Path]:
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("adapters")
    llama = tiny_models["llama"]
    fits = {"model_type": "llama", "hidden_size": 128, "vocab_size": 4000}
    made = {"llama": make_adapter(AutoModelForCausalLM.from_pretrained(llama), root / "llama", ["q_proj", "v_proj"],
                                  fits)}
    made["bloom"] = make_adapter(AutoModelForCausalLM.from_pretrained(tiny_models["bloom"]), root / "bloom",
                                 ["query_key_value"])
    for name, change in (("hidden", {"hidden_size": 256}), ("vocab", {"vocab_size": 49954})):
        made[name] = Path(shutil.copytree(made["llama"], root / name))
        write(made[name] / "bentsao_training.json", json.dumps({**fits, **change}))
    narrow = AutoConfig.from_pretrained(llama)
    narrow.hidden_size, narrow.head_dim = 64, 16
    made["narrow"] = make_adapter(AutoModelForCausalLM.from_config(narrow), root / "narrow", ["q_proj", "v_proj"])
    made["empty"] = root / "empty"
    made["empty"].mkdir()
    return made


@pytest.fixture(scope="module")
def odd_models(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    """A base that needs its own Python code, one of an unknown architecture, one whose tokenizer outgrows it."""
    root = tmp_path_factory.mktemp("odd")
    config = json.loads((tiny_llama / "config.json").read_text())
    made = {}

    remote = root / "remote"
    remote.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama / name, remote / name)
    marker = root / "remote-code-ran"
    for module in ("configuration_custom", "modeling_custom"):
        write(remote / f"{module}.py", f"open({str(marker)!r}, 'w').write('ran')\n")
    auto_map = {"AutoConfig": "configuration_custom.CustomConfig",
                "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    write(remote / "config.json", json.dumps({**config, "model_type": "bentsao_custom", "auto_map": auto_map}))
    made["remote"], made["remote_marker"] = remote, marker

    unknown = root / "unknown"
    unknown.mkdir()
    write(unknown / "config.json", json.dumps({**config, "model_type": "not_a_real_arch"}))
    made["unknown"] = unknown

    small = root / "small-vocab"
    shutil.copytree(tiny_llama, small)
    write(small / "config.json", json.dumps({**config, "vocab_size": 3000}))
    made["small_vocab"] = small
    return made


# --------------------------------------------------------------------------------------------------------------
# bad input -> one line, exit 2, no traceback

# Each case: (script, builder(tmp, base, data, adapters, odd) -> argv, expected substrings of the error line).
FAST = {"batch_size": 4, "micro_batch_size": 4, "max_steps": 2, "cutoff_len": 64, "val_set_size": 0}


def train_args(tmp: Path, base: Path | str, data: Path, **overrides) -> list:
    options = {"base_model": base, "data_path": data, "output_dir": tmp / "out", **FAST, **overrides}
    return [item for name, value in options.items() for item in (f"--{name}", value)]


def data_case(name: str, content: str | bytes) -> Callable:
    return lambda tmp, base, data, ad, odd: train_args(tmp, base, write(tmp / name, content))


def infer_args(base: Path, adapter: Path | str, *extra: str) -> list[str]:
    return ["--base_model", base, "--lora_weights", adapter, "--max_new_tokens", "4", "--num_beams", "1", *extra]


def template_file(tmp: Path, template: dict) -> Path:
    return write(tmp / "template.json", json.dumps(template))


CASES = [
    # data
    ("finetune", lambda tmp, base, data, ad, odd: train_args(tmp, base, tmp / "nope.json"),
     ["nope.json"]),
    ("finetune", data_case("bad.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "c",\n'),
     ["bad.jsonl line 2"]),
    ("finetune", data_case("rows.json", '[{"instruction": "a", "output": "b"}, {"instruction": "c"}]'),
     ["rows.json row 2", "`output`"]),
    ("finetune", data_case("rows.jsonl", '{"input": "x", "output": "b"}\n'), ["line 1", "`instruction`"]),
    ("finetune", data_case("types.jsonl", '{"instruction": 3, "output": "b"}\n'),
     ["line 1", "`instruction`"]),
    ("finetune", data_case("empty.json", "  \n"), ["empty.json"]),
    ("finetune", data_case("gbk.json", '{"instruction": "高血压", "output": "头痛"}\n'.encode("gbk")),
     ["gbk.json line 1", "UTF-8"]),
    ("finetune", lambda tmp, base, data, ad, odd: train_args(tmp, base, data, cutoff_len=8),
     ["--cutoff_len"]),
    # templates
    ("finetune", lambda tmp, base, data, ad, odd: train_args(tmp, base, data, prompt_template_name="nope"),
     ["nope", "med_template"]),
    ("finetune", lambda tmp, base, data, ad, odd: train_args(tmp, base, data, prompt_template_name=template_file(
        tmp, {"prompt_no_input": "{instruction}"})),
     ["`response_split`"]),
    ("finetune", lambda tmp, base, data, ad, odd: train_args(tmp, base, data, prompt_template_name=template_file(
        tmp, {"prompt_no_input": "{instruction} {question}", "response_split": "###"})),
     ["{question}"]),
    # models
    ("finetune", lambda tmp, base, data, ad, odd: train_args(tmp, "./no/such/model", data),
     ["--base_model ./no/such/model"]),
    ("finetune", lambda tmp, base, data, ad, odd: train_args(tmp, odd["remote"], data),
     ["--trust_remote_code True"]),
    ("finetune", lambda tmp, base, data, ad, odd: train_args(tmp, odd["unknown"], data),
     ["odd0/unknown"]),
    ("finetune", lambda tmp, base, data, ad, odd: train_args(tmp, odd["small_vocab"], data),
     ["4000", "3000"]),
    # options
    ("finetune", lambda tmp, base, data, ad, odd: train_args(tmp, base, data, micro_batch_size=8),
     ["--micro_batch_size", "--batch_size"]),
    ("finetune", lambda tmp, base, data, ad, odd: train_args(tmp, base, data, batch_size=6),
     ["--batch_size", "--micro_batch_size"]),
    ("finetune", lambda tmp, base, data, ad, odd: train_args(tmp, base, data, val_set_size=26),
     ["--val_set_size"]),
    ("finetune", lambda tmp, base, data, ad, odd: train_args(tmp, base, data, load_8bit=True, load_4bit=True),
     ["--load_8bit", "--load_4bit"]),
    ("finetune", lambda tmp, base, data, ad, odd: train_args(tmp, base, data, precision="fp16"),
     ["--precision fp16"]),
    ("finetune", lambda tmp, base, data, ad, odd: train_args(tmp, base, data, precision="fp8"),
     ["--precision"]),
    ("finetune", lambda tmp, base, data, ad, odd: train_args(tmp, base, data, attn_implementation="flash"),
     ["--attn_implementation"]),
    ("finetune", lambda tmp, base, data, ad, odd: train_args(tmp, base, data,
                                                            attn_implementation="flash_attention_2"),
     ["flash_attention_2"]),
    ("finetune", lambda tmp, base, data, ad, odd: train_args(
        tmp, base, data, output_dir=write(tmp / "adapter_config.json", "{}").parent),
     ["--overwrite True"]),
    ("finetune", lambda tmp, base, data, ad, odd: train_args(tmp, base, data, resume_from_checkpoint=True),
     ["--resume_from_checkpoint"]),
    ("finetune", lambda tmp, base, data, ad, odd: train_args(
        tmp, base, data, resume_from_checkpoint=bloom_checkpoint(tmp, ad), resume_weights_only=True),
     ["query_key_value"]),
    # adapters at inference
    ("infer", lambda tmp, base, data, ad, odd: infer_args(base, tmp / "nope"), ["nope"]),
    ("infer", lambda tmp, base, data, ad, odd: infer_args(base, ad["empty"]), ["adapter_config.json"]),
    ("infer", lambda tmp, base, data, ad, odd: infer_args(base, ad["bloom"]),
     ["--lora_weights", "query_key_value"]),
    ("infer", lambda tmp, base, data, ad, odd: infer_args(base, ad["hidden"]),
     ["hidden_size 256"]),
    ("infer", lambda tmp, base, data, ad, odd: infer_args(base, ad["vocab"]),
     ["vocab_size 49954"]),
    ("infer", lambda tmp, base, data, ad, odd: infer_args(base, ad["narrow"]),
     ["--lora_weights", "size mismatch"]),
    ("infer", lambda tmp, base, data, ad, odd: infer_args(odd["remote"], ad["llama"]), ["--trust_remote_code True"]),
    ("infer", lambda tmp, base, data, ad, odd: infer_args(base, ad["llama"], "--instruct_dir",
                                                           write(tmp / "q.jsonl", '{"instruction": 1}\n')),
     ["q.jsonl line 1", "`instruction`"]),
    ("infer", lambda tmp, base, data, ad, odd: infer_args(base, ad["llama"], "--do_sample", "--temperature", "0"),
     ["--temperature"]),
    ("infer", lambda tmp, base, data, ad, odd: infer_args(base, ad["llama"], "--precision", "fp16"),
     ["--precision fp16"]),
    ("infer", lambda tmp, base, data, ad, odd: infer_args(base, ad["llama"], "--load_4bit"),
     ["--load_4bit"]),
    ("infer_literature", lambda tmp, base, data, ad, odd: infer_args(base, ad["bloom"]),
     ["--lora_weights"]),
    ("infer_literature", lambda tmp, base, data, ad, odd: infer_args(base, ad["llama"], "--top_p", "0", "--do_sample"),
     ["--top_p"]),
    ("export", lambda tmp, base, data, ad, odd: ["--base_model", base, "--lora_weights", ad["narrow"],
                                                 "--output_dir", tmp / "merged"],
     ["size mismatch"]),
    ("export", lambda tmp, base, data, ad, odd: ["--base_model", tmp / "nope", "--lora_weights", ad["llama"]],
     ["nope"]),
    ("build_dataset", lambda tmp, base, data, ad, odd: ["knowledge", "--kb", tmp / "kb.jsonl", "--output",
                                                        tmp / "o.json"], ["kb.jsonl"]),
]
COMPONENTS = {
    "finetune": finetune.main,
    "infer": infer.main,
    "infer_literature": infer_literature.main,
    "export": export_hf_checkpoint.main,
    "build_dataset": {"knowledge": build_dataset.knowledge, "literature": build_dataset.literature},
}


def bloom_checkpoint(tmp: Path, ad: dict[str, Path]) -> Path:
    """A checkpoint folder whose adapter was trained on another base (resuming it must fail before training)."""
    folder = tmp / "out" / "checkpoint-2"
    shutil.copytree(ad["bloom"], folder)
    write(folder / "trainer_state.json", json.dumps({"global_step": 2, "max_steps": 2, "train_batch_size": 4,
                                                     "log_history": []}))
    return folder


def case_id(case: tuple) -> str:
    return f"{case[0]}-{case[2][0][:40]}"


@pytest.mark.parametrize("script, build, expected", CASES, ids=[case_id(c) for c in CASES])
def test_bad_input_is_one_clear_line(script, build, expected, tiny_llama, train_file, adapters, odd_models, tmp_path,
                                     monkeypatch, capsys):
    argv = build(tmp_path, tiny_llama, train_file, adapters, odd_models)
    code, out, err = cli(COMPONENTS[script], *argv, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 2, (out[-1500:], err[-1500:])
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: ") and "Traceback" not in err
    for text in expected:
        assert text in line, line
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()
    assert not odd_models["remote_marker"].exists()  # a model's own code never ran without --trust_remote_code


@pytest.mark.parametrize("script, args", [
    ("finetune.py", ["--val_set_size", "26"]),
    pytest.param("infer.py", ["--lora_weights", "BLOOM"], marks=pytest.mark.slow),  # in-process above, too
])
def test_real_processes_print_one_line_and_exit_2(script, args, tiny_llama, train_file, adapters, tmp_path):
    args = [str(adapters["bloom"]) if a == "BLOOM" else a for a in args]
    base = ["--base_model", str(tiny_llama)]
    if script == "finetune.py":
        base += ["--data_path", str(train_file), "--output_dir", str(tmp_path / "out")]
    result = run_script(script, *base, *args)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error: ")


def test_bf16_on_a_device_without_it(tiny_llama, train_file, adapters, tmp_path, monkeypatch, capsys):
    """A CUDA GPU without bf16 (e.g. a T4 or V100), simulated: the flag is refused before anything loads."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    code, _, err = cli(finetune.main, *train_args(tmp_path, tiny_llama, train_file, precision="bf16"),
                       monkeypatch=monkeypatch, capsys=capsys)
    assert code == 2 and "--precision bf16" in err and "cuda" in err
    code, _, err = cli(infer.main, *infer_args(tiny_llama, adapters["llama"]), "--precision", "bf16",
                       monkeypatch=monkeypatch, capsys=capsys)
    assert code == 2 and "--precision bf16" in err


def test_flash_attention_without_its_package(tiny_llama, train_file, tmp_path, monkeypatch, capsys):
    """A CUDA GPU without flash-attn installed, simulated: refused in one line before anything loads."""
    import transformers.utils

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda *a, **k: False)
    code, _, err = cli(finetune.main, *train_args(tmp_path, tiny_llama, train_file,
                                                  attn_implementation="flash_attention_2"),
                       monkeypatch=monkeypatch, capsys=capsys)
    assert code == 2 and err.startswith("error: ") and "flash-attn" in err and "Traceback" not in err


def test_debug_shows_the_traceback(tiny_llama, train_file, tmp_path, monkeypatch, capsys):
    with pytest.raises(UserError, match="larger than --batch_size"):
        cli(finetune.main, *train_args(tmp_path, tiny_llama, train_file, micro_batch_size=8), "--debug",
            monkeypatch=monkeypatch, capsys=capsys)
    monkeypatch.setenv("LOGLEVEL", "DEBUG")
    with pytest.raises(UserError, match="larger than --batch_size"):
        cli(finetune.main, *train_args(tmp_path, tiny_llama, train_file, micro_batch_size=8),
            monkeypatch=monkeypatch, capsys=capsys)


def test_matching_adapter_passes_the_checks(tiny_llama, adapters):
    """The checks do not cry wolf: an adapter made for this base passes them (with and without metadata)."""
    from transformers import AutoModelForCausalLM

    from utils.model.loading import load_adapter

    load_adapter(AutoModelForCausalLM.from_pretrained(tiny_llama), str(adapters["llama"]))
    (adapters["llama"] / "bentsao_training.json").rename(adapters["llama"] / "meta.bak")
    try:
        load_adapter(AutoModelForCausalLM.from_pretrained(tiny_llama), str(adapters["llama"]))
    finally:
        (adapters["llama"] / "meta.bak").rename(adapters["llama"] / "bentsao_training.json")


# --------------------------------------------------------------------------------------------------------------
# nothing unsafe runs


def test_pickled_adapter_that_runs_code_is_refused_and_never_runs(tiny_llama, adapters, tmp_path, monkeypatch,
                                                                   capsys):
    from peft.utils.save_and_load import load_peft_weights
    from transformers import AutoModelForCausalLM

    from utils.model.loading import load_adapter

    # the payload is live: a plain (unsafe) torch.load runs it
    probe_marker = tmp_path / "probe-ran"
    torch.load(evil_pickle(tmp_path / "probe.bin", probe_marker), weights_only=False)
    assert probe_marker.read_text() == "pwned"

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil-adapter"
    evil.mkdir()
    shutil.copy(adapters["llama"] / "adapter_config.json", evil / "adapter_config.json")
    evil_pickle(evil / "adapter_model.bin", marker)

    with pytest.raises(UserError, match="pickle"):
        load_adapter(AutoModelForCausalLM.from_pretrained(tiny_llama), str(evil))
    code, _, err = cli(infer.main, *infer_args(tiny_llama, evil), monkeypatch=monkeypatch, capsys=capsys)
    assert code == 2 and str(evil) in err and "pickle" in err and "Traceback" not in err
    code, _, err = cli(export_hf_checkpoint.main, "--base_model", tiny_llama, "--lora_weights", evil, "--output_dir",
                       tmp_path / "merged", monkeypatch=monkeypatch, capsys=capsys)
    assert code == 2 and str(evil) in err and "pickle" in err
    # peft's own loader (used for a hub adapter) is weights-only too
    with pytest.raises(Exception, match="Weights only load failed"):
        load_peft_weights(str(evil), device="cpu")
    assert not marker.exists()


def test_pickled_adapter_with_plain_tensors_loads_like_safetensors(tiny_llama, adapters, tmp_path):
    """The published BenTsao adapters are adapter_model.bin: a weights-only pickle of tensors still loads."""
    from transformers import AutoModelForCausalLM

    from utils.model.loading import load_adapter

    pickled = tmp_path / "bin-adapter"
    pickled.mkdir()
    shutil.copy(adapters["llama"] / "adapter_config.json", pickled / "adapter_config.json")
    torch.save(lora_tensors(adapters["llama"]), pickled / "adapter_model.bin")
    probe = torch.tensor([[1, 100, 200, 300]])
    with torch.inference_mode():
        expected = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_llama), str(adapters["llama"]))(probe).logits
        actual = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_llama), str(pickled))(probe).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_llama)(probe).logits
    torch.testing.assert_close(actual, expected)
    assert (actual - plain).abs().max() > 1e-4


def test_remote_code_needs_the_flag(odd_models, tiny_llama):
    from utils.model.loading import load_base_model

    with pytest.raises(UserError, match="--trust_remote_code True"):
        load_base_model(str(odd_models["remote"]))
    assert not odd_models["remote_marker"].exists()


SECRET = "sk-bentsao-TEST-9f8e7d6c5b4a"


@pytest.fixture()
def secret_env(monkeypatch) -> str:
    monkeypatch.setenv("BENTSAO_RELIABILITY_KEY", SECRET)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    return "BENTSAO_RELIABILITY_KEY"


def assert_secret_nowhere(tmp_path: Path, *texts: str) -> None:
    for text in texts:
        assert SECRET not in text
    files = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert files  # something was written, and none of it holds the key
    for path in files:
        assert SECRET.encode() not in path.read_bytes(), path


def echo_key_401(body: dict) -> Reply:
    """A server that echoes the rejected key back in its error message, as real ones partly do."""
    message = {"error": {"message": f"Incorrect API key provided: {SECRET}", "type": "invalid_request_error"}}
    return Reply(status=401, raw_body=json.dumps(message).encode())


def test_api_keys_are_never_printed_or_written(tmp_path, secret_env, monkeypatch, capsys):
    kb = write(tmp_path / "kb.jsonl", json.dumps({"中心词": "甲病", "类型": "疾病", "相关症状": ["发热", "咳嗽"]},
                                                 ensure_ascii=False) + "\n")
    pair = {"question": "甲病有哪些症状？", "answer": "甲病的常见症状包括发热、咳嗽。"}
    reply = json.dumps([pair], ensure_ascii=False)
    rows = tmp_path / "rows.jsonl"
    knowledge = ["knowledge", "--kb", kb, "--output", rows, "--backend", "openai", "--model", "fake",
                 "--api_key_env", secret_env, "--retry_base_delay", "0.001", "--per_entity", "2"]
    with FakeOpenAI(lambda body: Reply(content=reply)) as server:
        code, out, err = cli(COMPONENTS["build_dataset"], *knowledge, "--api_base", server.url,
                             monkeypatch=monkeypatch, capsys=capsys)
        assert code == 0, err
        assert server.headers[0]["authorization"] == f"Bearer {SECRET}"  # the key was really used
    assert "甲病" in rows.read_text(encoding="utf-8")
    outputs = [out, err]

    row = {"instruction": "甲病有哪些症状？", "output": "发热、咳嗽。", "model_output": "发热。"}
    predictions = write(tmp_path / "pred.jsonl", json.dumps(row, ensure_ascii=False) + "\n")
    judge = ["--predictions", predictions, "--output", tmp_path / "metrics.json", "--judge", "openai", "--model",
             "judge", "--api_key_env", secret_env, "--retry_base_delay", "0"]
    scores = '{"completeness": 2, "depth": 1, "professionalism": 3}'
    with FakeOpenAI(lambda body: Reply(content=scores)) as server:
        code, out, err = cli(evaluate.main, *judge, "--api_base", server.url, monkeypatch=monkeypatch, capsys=capsys)
        assert code == 0, err
        assert server.headers[0]["authorization"] == f"Bearer {SECRET}"
    assert json.loads((tmp_path / "metrics.json").read_text())["judge-depth"] == 1
    outputs += [out, err]

    # a server that echoes the rejected key: the one error line names the refusal, not the key
    with FakeOpenAI(echo_key_401) as server:
        code, out, err = cli(COMPONENTS["build_dataset"], *knowledge, "--api_base", server.url,
                             monkeypatch=monkeypatch, capsys=capsys)
        assert code == 2 and "401" in err and "Incorrect API key provided: ***" in err
        outputs += [out, err]
        code, out, err = cli(evaluate.main, *judge, "--api_base", server.url, "--judge_cache", tmp_path / "fresh.jsonl",
                             monkeypatch=monkeypatch, capsys=capsys)  # a fresh sidecar, so the judge is asked
        assert code == 2 and "401" in err and "Incorrect API key provided: ***" in err
        outputs += [out, err]
    assert_secret_nowhere(tmp_path, *outputs)


# --------------------------------------------------------------------------------------------------------------
# nothing lost: atomic saves, SIGKILL + resume, SIGTERM, NaN

TRAIN = {"batch_size": 4, "micro_batch_size": 4, "max_steps": 8, "learning_rate": 3e-3, "cutoff_len": 64,
         "val_set_size": 0, "logging_steps": 1, "warmup_steps": 20}


def as_argv(options: dict) -> list[str]:
    return [item for name, value in options.items() for item in (f"--{name}", str(value))]


def train_in_process(base: Path, data: Path, output_dir: Path, **options) -> Path:
    finetune.main(FinetuneArgs(base_model=str(base), data_path=str(data), output_dir=str(output_dir),
                               **{**TRAIN, **options}))
    return output_dir


@pytest.fixture(scope="module")
def uninterrupted(tiny_llama, train_file, tmp_path_factory) -> Path:
    """The reference: the same run, never interrupted."""
    return train_in_process(tiny_llama, train_file, tmp_path_factory.mktemp("whole") / "out", save_steps=4)


def start_training(base: Path, data: Path, output_dir: Path, log: Path, **options) -> subprocess.Popen:
    argv = [sys.executable, "finetune.py", "--base_model", str(base), "--data_path", str(data),
            "--output_dir", str(output_dir), *as_argv({**TRAIN, **options})]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    with open(log, "w") as out, open(f"{log}.err", "w") as err:
        return subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=err, env=env)


def wait_until(ready: Callable[[], bool], process: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        if process.poll() is not None:
            stderr = Path(f"{log}.err").read_text()[-2000:]
            pytest.fail(f"finetune.py ended (rc {process.returncode}) too early:\n{stderr}")
        time.sleep(0.02)
    process.kill()
    pytest.fail("finetune.py did not get there in time")


def test_sigkill_mid_training_then_resume_gives_the_same_adapter(uninterrupted, tiny_llama, train_file, tmp_path,
                                                                 capsys):
    out, log = tmp_path / "out", tmp_path / "run.log"
    process = start_training(tiny_llama, train_file, out, log, save_steps=1)
    wait_until(lambda: (out / "checkpoint-2" / "trainer_state.json").is_file(), process, log)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL
    assert not (out / "adapter_config.json").exists()  # no finished adapter: the run died
    for checkpoint in out.glob("checkpoint-*"):  # whatever the kill interrupted, published checkpoints are whole
        assert (checkpoint / "trainer_state.json").is_file() and (checkpoint / "adapter_model.safetensors").is_file()

    capsys.readouterr()
    train_in_process(tiny_llama, train_file, out, save_steps=1, resume_from_checkpoint=True)
    resumed_from = run_line(capsys.readouterr().out).split("resuming ")[1]
    assert "checkpoint-" in resumed_from and not resumed_from.endswith("checkpoint-8")
    assert_same_adapter(out, uninterrupted)
    assert not (out / ".tmp-adapter").exists()


def test_sigterm_saves_a_checkpoint_says_where_and_resumes_exactly(uninterrupted, tiny_llama, train_file, tmp_path):
    out, log = tmp_path / "out", tmp_path / "run.log"
    process = start_training(tiny_llama, train_file, out, log, save_steps=100)  # no scheduled checkpoint at all
    wait_until(lambda: ", loss " in log.read_text(), process, log)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 128 + signal.SIGTERM
    stdout, stderr = log.read_text(), Path(f"{log}.err").read_text()
    assert "Traceback" not in stderr and "received SIGTERM" in stderr
    saved = [line for line in stdout.splitlines() if line.startswith("stopped by SIGTERM at step")]
    assert saved and "continue with --resume_from_checkpoint True" in saved[0]
    checkpoint = Path(saved[0].split("checkpoint saved to ", 1)[1].split(";", 1)[0])
    assert checkpoint.parent == out.resolve() and (checkpoint / "trainer_state.json").is_file()
    assert int(checkpoint.name.split("-")[1]) < TRAIN["max_steps"]
    assert not (out / "adapter_config.json").exists()  # unfinished: no final adapter pretends otherwise

    train_in_process(tiny_llama, train_file, out, save_steps=100, resume_from_checkpoint=True)
    assert_same_adapter(out, uninterrupted)


def test_a_crash_mid_save_leaves_the_previous_checkpoint_and_resume_uses_it(uninterrupted, tiny_llama, train_file,
                                                                            tmp_path, monkeypatch, capsys):
    from transformers import Trainer

    out = tmp_path / "out"
    original = Trainer._save_rng_state

    def crash_at_step_3(self, output_dir):
        if self.state.global_step == 3:  # the adapter and optimizer of checkpoint-3 are already written
            raise RuntimeError("simulated crash in the middle of saving checkpoint-3")
        original(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", crash_at_step_3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_in_process(tiny_llama, train_file, out, save_steps=1)
    monkeypatch.setattr(Trainer, "_save_rng_state", original)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    torn = out / "checkpoint-3"  # the Trainer writes trainer_state.json last: without it, a checkpoint is not whole
    assert (torn / "adapter_model.safetensors").is_file() and not (torn / "trainer_state.json").exists()

    capsys.readouterr()
    train_in_process(tiny_llama, train_file, out, save_steps=1, resume_from_checkpoint=True)
    assert f"resuming {out / 'checkpoint-2'}" in capsys.readouterr().out
    assert_same_adapter(out, uninterrupted)
    assert all((folder / "trainer_state.json").is_file() for folder in out.glob("checkpoint-*"))  # all whole now


def test_final_adapter_is_replaced_whole_or_not_at_all(tmp_path):
    from utils.core.io import publish_files

    def save_files_atomically(out: Path, write_files) -> list[Path]:
        return publish_files(out, write_files, last=("adapter_config.json",), staging_name=".tmp-adapter")

    out = tmp_path / "out"
    out.mkdir()
    write(out / "adapter_config.json", "old config")
    write(out / "adapter_model.safetensors", "old weights")

    def dies_halfway(folder: Path) -> None:
        write(folder / "adapter_model.safetensors", "new weights")
        raise KeyboardInterrupt  # killed while writing

    with pytest.raises(KeyboardInterrupt):
        save_files_atomically(out, dies_halfway)
    assert (out / "adapter_model.safetensors").read_text() == "old weights"
    assert (out / "adapter_config.json").read_text() == "old config"

    def writes_all(folder: Path) -> None:
        for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "bentsao_training.json"):
            write(folder / name, f"new {name}")

    moved = save_files_atomically(out, writes_all)
    assert moved[-1].name == "adapter_config.json"  # the marker of a finished adapter lands last
    assert (out / "adapter_model.safetensors").read_text() == "new adapter_model.safetensors"
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "bentsao_training.json", "tokenizer.json"]


def test_diverging_loss_stops_keeps_the_last_good_checkpoint(tiny_llama, train_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    options = {**TRAIN, "learning_rate": 1e30, "warmup_steps": 0, "max_steps": 4, "save_steps": 1}
    code, stdout, err = cli(finetune.main, "--base_model", tiny_llama, "--data_path", train_file, "--output_dir", out,
                            *as_argv(options), monkeypatch=monkeypatch, capsys=capsys)
    assert code == 2 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: training diverged: ") and "NaN/inf" in line and "after optimizer step 2" in line
    assert "grad_norm nan" in stdout  # it really diverged: step 2's gradients were not finite
    assert str(out / "checkpoint-1") in line
    assert "--learning_rate" in line
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]  # step 2 was not saved
    assert all(torch.isfinite(t).all() for t in lora_tensors(out / "checkpoint-1").values())
    assert not (out / "adapter_config.json").exists()


def test_divergence_guard_tells_fp16_loss_scale_skips_from_divergence(tmp_path):
    from transformers import TrainerControl, TrainerState

    from utils.training.callbacks import DivergenceGuard

    args = SimpleNamespace(device="cpu")
    model = torch.nn.Linear(2, 2)
    guard, state, control = DivergenceGuard(), TrainerState(), TrainerControl()

    # fp16: the scaled gradients overflowed, the scaler skipped the step, the loss is finite -> not divergence
    guard.observe_loss(torch.tensor(2.5))
    guard.on_optimizer_step(args, state, control, optimizer=SimpleNamespace(step_was_skipped=True))
    state.global_step, control.should_save = 1, True
    guard.on_step_end(args, state, control, model=model)
    assert guard.skipped_steps == [1] and guard.diverged_step is None
    assert control.should_save and not control.should_training_stop

    # the loss itself is NaN (a scaler would skip this step too, but that is divergence): stop, do not save
    guard.observe_loss(torch.tensor(1.0))
    guard.observe_loss(torch.tensor(float("nan")))
    guard.on_optimizer_step(args, state, control, optimizer=SimpleNamespace(step_was_skipped=True))
    state.global_step, control.should_save = 2, True
    guard.on_step_end(args, state, control, model=model)
    assert guard.skipped_steps == [1] and guard.diverged_step == 2
    assert control.should_training_stop and not control.should_save
    message = guard.message(tmp_path, fp16=True)
    assert "nan" in message and "step 2" in message

    # a finite loss but weights that went non-finite (fp32/bf16 have no scaler to skip the step)
    guard, control = DivergenceGuard(), TrainerControl()
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    guard.observe_loss(torch.tensor(3.0))
    state.global_step = 3
    guard.on_step_end(args, state, control, model=model)
    assert guard.diverged_step == 3 and "trainable weight became NaN/inf" in guard.reason


def test_resume_refuses_a_checkpoint_pickle_that_runs_code(uninterrupted, tiny_llama, train_file, tmp_path,
                                                           monkeypatch, capsys):
    out = tmp_path / "out"
    shutil.copytree(uninterrupted / "checkpoint-4", out / "checkpoint-4")
    marker = tmp_path / "pwned"
    evil_pickle(out / "checkpoint-4" / "optimizer.pt", marker)
    code, _, err = cli(finetune.main, "--base_model", tiny_llama, "--data_path", train_file, "--output_dir", out,
                       *as_argv({**TRAIN, "save_steps": 4}), "--resume_from_checkpoint", "True",
                       monkeypatch=monkeypatch, capsys=capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "optimizer.pt" in err and "arbitrary code" in err and "truncated" not in err  # one message saying what
    assert not marker.exists()


def test_sigterm_in_the_last_evaluation_writes_the_adapter_then_exits_143(tiny_llama, train_file, tmp_path,
                                                                         monkeypatch):
    """A scheduler's SIGTERM while the last step's evaluation runs: the run is whole, so the adapter is written (the
    same as without the signal), and the exit code still reports the signal."""
    from transformers import Trainer

    evaluate = Trainer.evaluate

    def evaluate_then_signal(self, *args, **kwargs):
        metrics = evaluate(self, *args, **kwargs)
        if self.state.global_step == self.state.max_steps:
            os.kill(os.getpid(), signal.SIGTERM)
        return metrics

    monkeypatch.setattr(Trainer, "evaluate", evaluate_then_signal)
    out = tmp_path / "out"
    result = run_main(finetune.main, *as_argv({"base_model": tiny_llama, "data_path": train_file, "output_dir": out,
                                               **TRAIN, "val_set_size": 4, "eval_steps": 4, "cutoff_len": 128}))
    assert result.returncode == 143, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"adapter saved to {out.resolve()}" in result.stdout and "SIGTERM" in result.stdout
    assert (out / "adapter_config.json").is_file()
