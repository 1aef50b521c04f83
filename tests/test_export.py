"""export_hf_checkpoint.py: the merged checkpoint equals base + adapter, for fp32 and bf16 bases."""

import re

import pytest
import torch
from in_process import finetune as train_adapter
from in_process import one_thread, run_main  # noqa: F401  one_thread: an autouse fixture
from transformers import AutoModelForCausalLM, AutoTokenizer

import export_hf_checkpoint
from utils.model.loading import load_adapter


@pytest.mark.parametrize("arch", ["llama", "bloom"])
def test_merged_checkpoint_equals_base_plus_adapter(tiny_models, train_file, tmp_path, arch, monkeypatch):
    base = tiny_models[arch]
    adapter = tmp_path / "adapter"
    train_adapter(base, train_file, adapter, "--max_steps", "2", "--val_set_size", "0")
    merged_dir = tmp_path / "merged"
    monkeypatch.setenv("BASE_MODEL", str(base))  # the BASE_MODEL variable is honoured
    result = run_main(export_hf_checkpoint.main, "--lora_weights", adapter, "--output_dir", merged_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "merge check" in result.stdout
    assert re.search(r"([1-9]\d*) of \1 sampled merged weights compared", result.stdout), result.stdout  # fp32: all
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


def bf16_base_with_realistic_logits(tiny_llama, folder):
    """The tiny LLaMA in bf16 (as Qwen2.5, Llama-3 and Gemma ship), its final norm scaled so that the probe's logits
    reach the magnitudes of a real 7B model (|logit| up to ~20-30), where one bf16 rounding step is 0.125."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        model.model.norm.weight.mul_(12.0)  # the tests' base is not pre-trained: its logits start small
    model.to(torch.bfloat16).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(folder)
    return folder


def test_bf16_base_exports_and_keeps_the_adapter(tiny_llama, tmp_path):
    """A bf16 base merges and saves (the old absolute 5e-2 limit refused it: one bf16 step at |logit| > 8 is
    larger); the merged checkpoint equals base + adapter within bf16 rounding, and the adapter's effect is there."""
    from peft import LoraConfig, get_peft_model

    base = bf16_base_with_realistic_logits(tiny_llama, tmp_path / "bf16-base")
    torch.manual_seed(0)
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM"))
    adapter = tmp_path / "adapter"
    lora.save_pretrained(adapter)
    merged_dir = tmp_path / "merged"
    result = run_main(export_hf_checkpoint.main, "--base_model", base, "--lora_weights", adapter,
                      "--output_dir", merged_dir)  # --dtype auto: the base's own bf16
    assert result.returncode == 0, result.stderr[-2000:]
    assert "merge check" in result.stdout and "merged checkpoint saved" in result.stdout

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    probe = tokenizer(export_hf_checkpoint.PROBE_TEXT, return_tensors="pt")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert merged.dtype == torch.bfloat16
    reference = load_adapter(AutoModelForCausalLM.from_pretrained(base), str(adapter)).eval()
    plain = AutoModelForCausalLM.from_pretrained(base).eval()
    with torch.inference_mode():
        expected, actual, before = (m(**probe).logits.float() for m in (reference, merged, plain))
    scale = expected.abs().max().item()
    assert scale > 8, scale  # realistic: a bf16 step here is 0.0625 or more, above the old absolute limit
    difference, effect = (actual - expected).abs().max().item(), (expected - before).abs().max().item()
    assert difference <= export_hf_checkpoint.merge_limit(torch.bfloat16, scale), (difference, scale)
    assert effect > 4 * difference, (effect, difference)  # the merged model carries the adapter


@pytest.mark.parametrize("scale", [1.0, 0.01], ids=["adapter", "small-adapter"])
def test_a_bf16_merge_that_drops_the_adapter_is_refused(tiny_llama, tmp_path, monkeypatch, scale):
    """A merge that loses the adapter (peft's merge_and_unload standing in for a broken one by unloading without
    merging) saves nothing, also when the adapter moves the logits by less than bf16 rounding at their scale (the
    logits alone cannot tell; the merged weights can)."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.tuners_utils import BaseTuner

    base = bf16_base_with_realistic_logits(tiny_llama, tmp_path / "bf16-base")
    torch.manual_seed(0)
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, parameter in lora.named_parameters():
            if "lora_B" in name:
                parameter.mul_(scale)
    adapter = tmp_path / "adapter"
    lora.save_pretrained(adapter)
    monkeypatch.setattr(BaseTuner, "merge_and_unload", lambda self, *args, **kwargs: self.unload())
    result = run_main(export_hf_checkpoint.main, "--base_model", base, "--lora_weights", adapter,
                      "--output_dir", tmp_path / "merged")
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "nothing saved" in result.stderr  # a large adapter: its logits differ; a small one: its weights
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [1.0, 0.75, 1.5])
def test_the_merge_check_refuses_a_mis_scaled_merge(dtype, scale):
    """peft's own merge of a LoRA layer in bf16/fp16 is round(W + ΔW) within one unit in the last place everywhere;
    the same merge with ΔW scaled by 0.75 or 1.5 is refused (the old check, "closer to W + ΔW than to W", accepted
    any scale above 0.5). The mis-scaling is made by peft itself, its LoRA scale changed just before merging."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(256, 256, bias=False)).to(dtype)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["0"], init_lora_weights=False))
    model = model.to(dtype)
    [(name, base_weight, delta)] = export_hf_checkpoint.expected_merges(model)
    assert (delta.abs() > 0.05 * base_weight.abs()).float().mean() > 0.2  # an adapter of a trained one's size
    for layer in (module for module in model.modules() if hasattr(module, "scaling")):
        layer.scaling = {adapter: value * scale for adapter, value in layer.scaling.items()}
    merged = model.merge_and_unload()
    off, telling = export_hf_checkpoint.merge_mismatch(merged.get_submodule(name).weight, base_weight, delta)
    assert telling > 0.5 * delta.numel()
    assert (off == 0) == (scale == 1.0), (off, scale)
    problem, compared = export_hf_checkpoint.weights_problem(merged, [(name, base_weight, delta)])
    assert compared == 1 and (problem is None) == (scale == 1.0)
