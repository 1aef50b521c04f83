"""utils/compat.py: the one transformers internal the project reads, checked against the installed version."""

from __future__ import annotations

import pytest
import transformers

from utils.compat import attention_implementation, is_varlen_attention


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_attention_implementation_reads_what_the_model_runs(implementation):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=64)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=implementation)
    where = f"transformers {transformers.__version__}"
    assert attention_implementation(model) == implementation, (
        f"{where} no longer keeps the attention implementation in config._attn_implementation: update "
        "utils/compat.py (attention_implementation), which decides packed layouts (utils/training/batching.py)")
    model.set_attn_implementation("eager" if implementation == "sdpa" else "sdpa")  # the public setter
    assert attention_implementation(model) != implementation, (
        f"{where}: config._attn_implementation no longer follows set_attn_implementation; update utils/compat.py")


def test_varlen_attention_names():
    assert is_varlen_attention("flash_attention_2") and is_varlen_attention("flash_attention_3")
    assert is_varlen_attention("kernels-community/flash-attn2")
    assert not any(map(is_varlen_attention, ("eager", "sdpa", "flex_attention")))
