"""A GGUF file as a base model: `--base_model model.gguf`, or `--base_model FOLDER --gguf_file model.gguf`.

transformers reads the config and the tokenizer from the file (with the `gguf` package) and, asked to, dequantises
the weights into a plain model that trains and saves; the adapter records the `.gguf` path as its base.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

GGUF_FILE_HELP = "with a folder --base_model: the GGUF file in it to load (a .gguf --base_model needs none)"


def fold_gguf_file(flags: Any) -> None:
    """`--base_model FOLDER --gguf_file NAME` is `--base_model FOLDER/NAME` from there on; called by the
    `__post_init__` of a frozen dataclass of flags."""
    if flags.gguf_file:
        object.__setattr__(flags, "base_model", str(Path(flags.base_model, flags.gguf_file)))
        object.__setattr__(flags, "gguf_file", "")


def gguf_kwargs(base_model: str) -> dict[str, str]:
    """`from_pretrained`'s source arguments: a `.gguf` file loads from its folder with `gguf_file=`; anything else
    as it is."""
    path = Path(base_model).expanduser()
    if path.suffix != ".gguf":
        return {"pretrained_model_name_or_path": base_model}
    return {"pretrained_model_name_or_path": str(path.parent), "gguf_file": str(path.resolve())}
