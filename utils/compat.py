"""The one place where this project reads a transformers internal that has no public equivalent.

Each function here names the internal it reads; `tests/test_compat.py` checks it against the installed
transformers and fails with a message naming that version when the internal changes. Everything else in the
project goes through public APIs.
"""

from __future__ import annotations

from typing import Any

# Attention implementations whose kernels take packed sequences as one flattened row with `cu_seq_lens_*` /
# `max_length_*` (transformers' varlen path); hub kernels such as "kernels-community/flash-attn2" included.
VARLEN_MARKERS = ("flash_attention", "flash-attn", "flash_attn")


def attention_implementation(model: Any) -> str:
    """The attention implementation a loaded transformers model runs ("eager", "sdpa", "flash_attention_2", ...).

    transformers keeps it in `config._attn_implementation` (what its own attention layers and mask builders read);
    there is no public getter in transformers 5.
    """
    return getattr(model.config, "_attn_implementation", None) or "eager"


def is_varlen_attention(implementation: str) -> bool:
    """True for FlashAttention-style kernels: packed sequences must come as one row with their boundaries."""
    return any(marker in implementation for marker in VARLEN_MARKERS)
