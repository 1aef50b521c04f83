"""The generation flags, once: infer.py, infer_literature.py and generate.py take the same `--max_new_tokens`,
`--num_beams`, ... (their dataclasses extend `GenerationArgs`) and check them the same way."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from utils.core.cli import flag
from utils.model.checks import adapter_source_problems, quantization_problems
from utils.model.gguf import GGUF_FILE_HELP, fold_gguf_file
from utils.model.source import source_problems


@dataclass(frozen=True)
class GenerationArgs:
    """How answers are generated (transformers' `GenerationConfig`, with the flags of the original scripts)."""

    max_new_tokens: int = flag(256, "answer length limit, in tokens", low=1)
    min_new_tokens: int = flag(0, "no end-of-answer before this many new tokens (0: the model may stop at once)", low=0)
    num_beams: int = flag(4, "beam search width (1: greedy or sampling)", low=1)
    do_sample: bool = flag(False, "sample instead of searching; then temperature, top_p and top_k apply")
    temperature: float = flag(0.1, "sampling temperature (> 0; lower is more conservative)")
    top_p: float = flag(0.75, "nucleus sampling: keep the most likely tokens up to this probability mass")
    top_k: int = flag(40, "sample among the k most likely tokens (0: no limit)", low=0)
    repetition_penalty: float = flag(1.0, "> 1 discourages repeating tokens", above=0)

    def generation_problems(self) -> list[str]:
        """What `generate` would reject with a traceback, or what makes no sense together (the sampling knobs count
        only when sampling)."""
        problems = []
        if self.min_new_tokens > self.max_new_tokens:
            problems.append(f"--min_new_tokens {self.min_new_tokens} exceeds --max_new_tokens {self.max_new_tokens}")
        if self.do_sample and not self.temperature > 0:
            problems.append(f"--temperature must be above 0 when sampling (--do_sample True), got {self.temperature:g}")
        if self.do_sample and not 0 < self.top_p <= 1:
            problems.append(f"--top_p must be in (0, 1] when sampling, got {self.top_p:g}")
        return problems

    def config(self, tokenizer: Any) -> Any:
        """A `GenerationConfig` with this tokenizer's special tokens; the sampling knobs only when sampling."""
        from transformers import GenerationConfig

        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams, "do_sample": self.do_sample,
            "repetition_penalty": self.repetition_penalty, "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id,
        }
        if self.min_new_tokens:
            kwargs["min_new_tokens"] = self.min_new_tokens
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return GenerationConfig(**kwargs)


@dataclass(frozen=True)
class ModelArgs:
    """The flags every script that answers with a base model and an adapter takes."""

    base_model: str = flag("", "local folder, hub id or .gguf file of the base model (required)")
    gguf_file: str = flag("", GGUF_FILE_HELP)
    lora_weights: str = flag("", "adapter folder written by finetune.py (or a hub id)")
    use_lora: bool = flag(True, "apply --lora_weights (False: a merged checkpoint or the bare base)")
    load_8bit: bool = flag(False, "load the base in 8-bit (CUDA + bitsandbytes)")
    load_4bit: bool = flag(False, "load the base in 4-bit nf4 (CUDA + bitsandbytes)")
    precision: str = flag("auto", "auto | bf16 | fp16 | fp32 (fp32 on CPU)", choices=("auto", "bf16", "fp16", "fp32"))
    trust_remote_code: bool = flag(False, "allow a hub model's own Python code to run")
    seed: int = flag(42, "seeds sampling", low=0, high=2**32 - 1)

    def __post_init__(self) -> None:
        fold_gguf_file(self)

    def model_problems(self) -> list[str]:
        """The base and the adapter are where they are said to be; the quantisation flags can run here."""
        problems = quantization_problems(self.load_8bit, self.load_4bit)
        problems += source_problems(self.base_model, "--base_model", "config.json")
        if self.use_lora and not self.lora_weights:
            problems.append("--lora_weights is required with --use_lora True (for a merged checkpoint or a bare base "
                            "model, pass --use_lora False)")
        return problems + (adapter_source_problems(self.lora_weights) if self.adapter else [])

    @property
    def adapter(self) -> str | None:
        """The adapter to apply, or None (`--use_lora False`)."""
        return self.lora_weights if self.use_lora else None

    def load(self, prompt_template: str, device_map: Any = None) -> tuple[Any, Any, str, Any]:
        """(model, tokenizer, device, prompter), seeded: the base with the adapter, ready to answer; the prompter
        renders a chat template with the base model's own tokenizer."""
        from transformers import set_seed

        from utils.model.loading import load_for_inference
        from utils.prompter import Prompter

        set_seed(self.seed)
        model, tokenizer, device = load_for_inference(
            self.base_model, self.adapter, precision=self.precision, load_8bit=self.load_8bit,
            load_4bit=self.load_4bit, trust_remote_code=self.trust_remote_code, device_map=device_map)
        return model, tokenizer, device, Prompter(prompt_template, tokenizer=tokenizer)
