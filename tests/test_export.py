import pytest
import torch
from conftest import run_script, train_adapter
from transformers import AutoModelForCausalLM, AutoTokenizer

from utils.model.loading import load_adapter


@pytest.mark.parametrize("arch", ["llama", "bloom"])
def test_merged_checkpoint_equals_base_plus_adapter(tiny_models, train_file, tmp_path, arch):
    base = tiny_models[arch]
    adapter = tmp_path / "adapter"
    train_adapter(base, train_file, adapter)
    merged_dir = tmp_path / "merged"
    result = run_script("export_hf_checkpoint.py", "--lora_weights", str(adapter), "--output_dir", str(merged_dir),
                        env={"BASE_MODEL": str(base)})  # the BASE_MODEL variable is honoured
    assert result.returncode == 0, result.stderr[-2000:]
    assert "merge check" in result.stdout
    assert (merged_dir / "model.safetensors").is_file() and (merged_dir / "tokenizer.json").is_file()

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    probe = tokenizer("肝癌的早期症状有哪些？", return_tensors="pt")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    reference = load_adapter(AutoModelForCausalLM.from_pretrained(base), str(adapter)).eval()
    plain = AutoModelForCausalLM.from_pretrained(base).eval()
    with torch.inference_mode():
        expected, actual, before = (m(**probe).logits for m in (reference, merged, plain))
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)
    assert (actual - before).abs().max() > 1e-4  # the adapter really changed the model
