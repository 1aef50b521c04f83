"""8-bit / 4-bit (QLoRA) loading: one clear line where it cannot run, and bitsandbytes imported only when asked."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import REPO, run_script

from utils.errors import UserError
from utils.model import quantization_config

NO_CUDA = "error: 8-bit/4-bit loading needs a CUDA GPU and bitsandbytes; drop --load_8bit/--load_4bit on this machine"
needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: 4-bit can load here")

FAKE_BITSANDBYTES = """import os
open(os.environ["BNB_IMPORT_MARKER"], "w").write("imported")
"""


@pytest.fixture
def fake_bitsandbytes(tmp_path) -> dict[str, str]:
    """A `bitsandbytes` that leaves a marker file when imported (and has no package metadata, so transformers'
    availability checks, which read the metadata, do not import it); the env puts it first on the path."""
    package = tmp_path / "site" / "bitsandbytes"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(FAKE_BITSANDBYTES)
    return {"PYTHONPATH": str(tmp_path / "site"), "BNB_IMPORT_MARKER": str(tmp_path / "bnb-imported")}


def assert_no_cuda_line(result) -> None:
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stderr.strip() == NO_CUDA
    assert "Traceback" not in result.stderr and "Training BenTsao LoRA with" not in result.stdout


@needs_no_cuda
def test_finetune_4bit_on_cpu_is_one_line(tiny_llama, train_file, tmp_path, fake_bitsandbytes):
    result = run_script("finetune.py", "--base_model", str(tiny_llama), "--data_path", str(train_file),
                        "--output_dir", str(tmp_path / "out"), "--load_4bit", "True", env=fake_bitsandbytes)
    assert_no_cuda_line(result)
    assert not (tmp_path / "bnb-imported").exists()  # the CUDA check comes before the import
    assert not (tmp_path / "out").exists()


@needs_no_cuda
@pytest.mark.parametrize("script", ["infer.py", "generate.py"])
@pytest.mark.parametrize("flag", ["--load_4bit", "--load_8bit"])
def test_inference_quantized_on_cpu_is_one_line(tiny_llama, script, flag):
    result = run_script(script, "--base_model", str(tiny_llama), "--use_lora", "False", flag, "True")
    assert_no_cuda_line(result)


def test_8bit_and_4bit_together_is_one_line(tiny_llama, train_file, tmp_path):
    result = run_script("finetune.py", "--base_model", str(tiny_llama), "--data_path", str(train_file),
                        "--output_dir", str(tmp_path / "out"), "--load_8bit", "True", "--load_4bit", "True")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "error: --load_8bit and --load_4bit exclude each other: choose one"


def test_bitsandbytes_is_not_imported_without_the_flags(tiny_llama, tmp_path, fake_bitsandbytes):
    result = run_script("infer.py", "--base_model", str(tiny_llama), "--use_lora", "False", "--max_new_tokens", "2",
                        "--num_beams", "1", env=fake_bitsandbytes)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "###model output###" in result.stdout
    assert not (tmp_path / "bnb-imported").exists()
    probe = ("import finetune, generate, infer, export_hf_checkpoint, utils.model, utils.distributed, sys; "
             "assert 'bitsandbytes' not in sys.modules")
    assert run_script("-c", probe, env=fake_bitsandbytes).returncode == 0
    assert not (tmp_path / "bnb-imported").exists()


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
