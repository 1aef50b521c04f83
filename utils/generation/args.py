"""The generation flags, once: `GenerationArgs` holds them with their defaults, comments and checks, and
`@generation_flags(...)` lays them out as flags of a script's `main` (with that script's own defaults), so infer.py,
infer_literature.py and generate.py take the same `--max_new_tokens`, `--num_beams`, ... and check them the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from utils.core.cli import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, Check, dataclass_flags


@dataclass(frozen=True)
class GenerationArgs:
    """How answers are generated (transformers' `GenerationConfig`, with the flags of the original scripts)."""

    max_new_tokens: int = 256  # answer length limit, in tokens
    min_new_tokens: int = 0  # no end-of-answer before this many new tokens (0: the model may stop at once)
    num_beams: int = 4  # beam search width (1: greedy or sampling; beam search is shown when complete)
    do_sample: bool = False  # sample instead of searching; then temperature, top_p and top_k apply
    temperature: float = 0.1  # sampling temperature (> 0; lower is more conservative)
    top_p: float = 0.75  # nucleus sampling: keep the most likely tokens up to this probability mass
    top_k: int = 40  # sample among the k most likely tokens (0: no limit)
    repetition_penalty: float = 1.0  # > 1 discourages repeating tokens

    __option_checks__: ClassVar[dict[str, Check]] = {
        "max_new_tokens": AT_LEAST_ONE, "min_new_tokens": NON_NEGATIVE, "num_beams": AT_LEAST_ONE,
        "top_k": NON_NEGATIVE, "repetition_penalty": POSITIVE,
    }

    def problems(self) -> list[str]:
        """What `generate` would reject with a traceback, or what makes no sense together (the sampling knobs count
        only when sampling)."""
        problems = []
        if self.min_new_tokens > self.max_new_tokens:
            problems.append(f"--min_new_tokens {self.min_new_tokens} exceeds --max_new_tokens {self.max_new_tokens}")
        if self.do_sample:
            if not self.temperature > 0:
                problems.append(f"--temperature must be above 0 when sampling (--do_sample True), got "
                                f"{self.temperature:g}")
            if not 0 < self.top_p <= 1:
                problems.append(f"--top_p must be in (0, 1] when sampling, got {self.top_p:g}")
        return problems

    def config(self, tokenizer: Any) -> Any:
        """A `GenerationConfig` with this tokenizer's special tokens; the sampling knobs only when sampling."""
        from transformers import GenerationConfig

        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "num_beams": self.num_beams,
            "do_sample": self.do_sample,
            "repetition_penalty": self.repetition_penalty,
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.bos_token_id,
        }
        if self.min_new_tokens:
            kwargs["min_new_tokens"] = self.min_new_tokens
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return GenerationConfig(**kwargs)


DEFAULT_GENERATION = GenerationArgs()  # the `generation` default of a script's main, replaced by its flags



def generation_flags(**defaults: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Replace `main`'s `generation: GenerationArgs` parameter by one flag per field (with these `defaults`); `main`
    receives the flags packed into a `GenerationArgs`.

        @generation_flags(num_beams=1)
        def main(base_model: str = "", generation: GenerationArgs = DEFAULT_GENERATION) -> None: ...
    """
    return dataclass_flags("generation", GenerationArgs, **defaults)
