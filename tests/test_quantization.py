"""8-bit / 4-bit (QLoRA) loading: one clear line where it cannot run, and bitsandbytes imported only when asked."""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_script
from in_process import run_main

from utils.core.errors import UserError
from utils.model.checks import quantization_config

NO_CUDA = "error: 8-bit/4-bit loading needs a CUDA GPU and bitsandbytes; drop --load_8bit/--load_4bit on this machine"
needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: 4-bit can load here")

def assert_no_cuda_line(result) -> None:
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stderr.strip() == NO_CUDA
    assert "Traceback" not in result.stderr and "Training BenTsao LoRA with" not in result.stdout


def script_main(name: str):
    return importlib.import_module(name.removesuffix(".py")).main


@needs_no_cuda
def test_finetune_4bit_on_cpu_is_one_line(tiny_llama, train_file, tmp_path):
    result = run_main(script_main("finetune.py"), "--base_model", tiny_llama, "--data_path", train_file,
                      "--output_dir", tmp_path / "out", "--load_4bit", "True")
    assert_no_cuda_line(result)
    assert not (tmp_path / "out").exists()


@needs_no_cuda
@pytest.mark.parametrize(("script", "flag"),
                         [("infer.py", "--load_4bit"), ("generate.py", "--load_4bit"), ("infer.py", "--load_8bit")])
def test_inference_quantized_on_cpu_is_one_line(tiny_llama, script, flag):
    result = run_main(script_main(script), "--base_model", tiny_llama, "--use_lora", "False", flag, "True")
    assert_no_cuda_line(result)


def test_8bit_and_4bit_together_is_one_line(tiny_llama, train_file, tmp_path):
    result = run_main(script_main("finetune.py"), "--base_model", tiny_llama, "--data_path", train_file,
                      "--output_dir", tmp_path / "out", "--load_8bit", "True", "--load_4bit", "True")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "error: --load_8bit and --load_4bit exclude each other: choose one"


def test_the_project_imports_bitsandbytes_only_in_quantization_problems():
    """The one `import bitsandbytes` of the project's own code sits in `quantization_problems`, which runs only for
    --load_8bit/--load_4bit. (peft imports bitsandbytes by itself whenever it is installed; without it installed,
    nothing but those flags needs it: see the next test.)"""
    found = []

    def visit(node: ast.AST, path: Path, where: str) -> None:
        for child in ast.iter_child_nodes(node):
            names = [a.name for a in child.names] if isinstance(child, ast.Import) else (
                [child.module or ""] if isinstance(child, ast.ImportFrom) else [])
            if any(name.split(".")[0] == "bitsandbytes" for name in names):
                found.append((path.name, where))
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else where
            visit(child, path, inner)

    for path in sorted(REPO.glob("*.py")) + sorted((REPO / "utils").rglob("*.py")):
        visit(ast.parse(path.read_text(encoding="utf-8")), path, "<module>")
    assert sorted(set(found)) == [("checks.py", "quantization_problems")]


def test_inference_runs_with_bitsandbytes_unimportable(tiny_llama):
    """A machine without bitsandbytes (as CI): infer.py without the flags works; sys.modules[...] = None blocks it."""
    code = ("import runpy, sys; sys.modules['bitsandbytes'] = None; "
            f"sys.argv = ['infer.py', '--base_model', {str(tiny_llama)!r}, '--use_lora', 'False', "
            "'--max_new_tokens', '2', '--num_beams', '1']; runpy.run_path('infer.py', run_name='__main__')")
    result = run_script("-c", code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("###model output###") == 4  # the built-in questions


def test_cuda_without_bitsandbytes_says_how_to_install(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    with pytest.raises(UserError, match=r"needs bitsandbytes: pip install -r requirements-gpu\.txt"):
        quantization_config(load_8bit=False, load_4bit=True, compute_dtype=torch.bfloat16)


def test_qlora_config_is_nf4_double_quant_with_the_compute_dtype(monkeypatch):
    from transformers import BitsAndBytesConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "bitsandbytes", type(sys)("bitsandbytes"))  # present, never used here
    config = quantization_config(load_8bit=False, load_4bit=True, compute_dtype=torch.bfloat16)
    assert isinstance(config, BitsAndBytesConfig) and config.load_in_4bit and not config.load_in_8bit
    assert config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.bfloat16
    assert quantization_config(load_8bit=True, load_4bit=False, compute_dtype=torch.float16).load_in_8bit
    assert quantization_config(False, False, torch.float32) is None


def test_requirements_gpu_pins_the_extras():
    lines = [line.split("#")[0].strip() for line in (REPO / "requirements-gpu.txt").read_text().splitlines()]
    pins = dict(line.split("==") for line in lines if line)
    assert set(pins) == {"bitsandbytes", "deepspeed"} and all(pins.values())
