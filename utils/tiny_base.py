"""Build a tiny base model with a real tokenizer: the embedded default, and what the tests train.

    python -m utils.tiny_base --arch llama --output_dir models/tiny-llama

The tokenizer is a sentencepiece BPE model (byte-level BPE for qwen2, as the real family) trained on the project's
own text (`data/`, `data_literature/`, the prompt templates; or the files `--corpus_files` names); the model is
initialised from `--seed` and pre-trained for `--pretrain_steps` steps on the same text, so that fine-tuning starts
from something that has seen Chinese. The folder loads offline with `AutoTokenizer.from_pretrained(DIR)` and
`AutoModelForCausalLM.from_pretrained(DIR)`. Special tokens follow each real family: LLaMA (`<s>` prepended, no pad
token), Bloom (`<pad>`, no `<s>` prepended), Qwen2 (`<|endoftext|>` as end and pad, no `<s>`), so scripts must read
them from the tokenizer.

Which weights depend on the processor: the initialisation does not (integers drawn from torch's Mersenne Twister,
scaled by a power of two: no transcendental function, no vectorised kernel, so every CPU, thread count and ATen/MKL
code path gives the same bits; torch's own `normal_` does not, its AVX2 and scalar paths differ by ~4e-8). The
pre-training does: 120 full-parameter AdamW steps through MKL/oneDNN kernels amplify the last-bit differences
between processors to ~0.1 in the weights. So a golden value recorded on one machine holds on another only for a
base built with `--pretrain_steps 0`, which is what tests/ train (tests/conftest.py).
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from utils.core.cli import flag
from utils.core.errors import UserError, first_line, raise_problems
from utils.core.io import file_problems, output_dir_problems

REPO_ROOT = Path(__file__).resolve().parent.parent
ARCHS = ("llama", "bloom", "qwen2")
HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE, MAX_POSITIONS = 128, 4, 4, 2, 344, 1024


def read_rows(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def corpus(root: Path = REPO_ROOT, files: list[Path] | None = None) -> tuple[list[str], list[str]]:
    """Text in a fixed order: (lines to train the tokenizer on, QA documents to pre-train on).

    By default the project's own text: every string in `data/` and `data_literature/` (knowledge-base lists
    included) and the prompt templates; with `files`, only those JSON / JSON Lines files. Rows with an answer
    become `instruction\nanswer` documents for pre-training.
    """
    lines: list[str] = []
    documents: list[str] = []
    default = files is None
    if default:
        files = sorted((root / "data").glob("*.json*")) + sorted((root / "data_literature").glob("*.json*"))
    for path in files:
        for row in read_rows(path):
            for value in row.values():
                items = value if isinstance(value, list) else [value]
                lines.extend(str(item).strip() for item in items if isinstance(item, str) and item.strip())
            if isinstance(row.get("instruction"), str) and isinstance(row.get("output"), str):
                documents.append(f"{row['instruction'].strip()}\n{row['output'].strip()}")
    for path in sorted((root / "templates").glob("*.json")) if default else []:
        lines.extend(v for v in json.loads(path.read_text(encoding="utf-8")).values() if isinstance(v, str) and v)
    return lines, documents


def train_tokenizer(lines: list[str], workdir: Path, vocab_size: int) -> Path:
    import sentencepiece as spm

    corpus_file = workdir / "corpus.txt"
    corpus_file.write_text("\n".join(line.replace("\n", " ") for line in lines), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus_file),
        model_prefix=str(workdir / "tokenizer"),
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=0.995,
        byte_fallback=True,  # rare characters become bytes instead of <unk>
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        control_symbols=["<|endoftext|>"],
        num_threads=1,  # deterministic
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return workdir / "tokenizer.model"


def train_byte_level_tokenizer(lines: list[str], vocab_size: int):
    """Qwen2's kind of tokenizer: byte-level BPE, `<|endoftext|>` ends and pads, nothing prepended.

    (transformers loads any qwen2 checkpoint's tokenizer as `Qwen2Tokenizer`, which rebuilds a byte-level
    pipeline from the vocabulary and merges, so a sentencepiece vocabulary would not survive loading.)
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def make_tokenizer(arch: str, lines: list[str], workdir: Path, vocab_size: int):
    from transformers import LlamaTokenizer

    if arch == "qwen2":
        tokenizer = train_byte_level_tokenizer(lines, vocab_size)
        tokenizer.padding_side = "right"
        return tokenizer
    try:
        train_tokenizer(lines, workdir, vocab_size)
    except RuntimeError as error:  # sentencepiece: "Vocabulary size is too high" for the corpus
        raise UserError(f"--vocab_size {vocab_size}: the corpus cannot fill it ({first_line(error)})") from None
    tokenizer = LlamaTokenizer.from_pretrained(str(workdir))
    if arch == "llama":
        tokenizer.add_bos_token = True
    elif arch == "bloom":
        tokenizer.pad_token = "<pad>"
        tokenizer.add_bos_token = False
    tokenizer.padding_side = "right"
    return tokenizer


def make_config(arch: str, tokenizer):
    from transformers import BloomConfig, LlamaConfig, Qwen2Config

    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vocab = len(tokenizer)
    decoder = {"vocab_size": vocab, "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE,
               "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
               "max_position_embeddings": MAX_POSITIONS}
    if arch == "llama":
        return LlamaConfig(**decoder, tie_word_embeddings=False, **special)
    if arch == "qwen2":
        return Qwen2Config(**decoder, tie_word_embeddings=True, **special)
    return BloomConfig(vocab_size=vocab, hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS, **special)


def portable_init(model, seed: int) -> None:
    """Every matrix drawn again, bit-identical on any processor: uniform integers k in [-m, m] (torch's Mersenne
    Twister, no vectorised arithmetic) times 2**-16, with m chosen for the config's `initializer_range` standard
    deviation. Vectors (norm weights: ones, biases: zeros) keep their constant initialisation."""
    std = float(getattr(model.config, "initializer_range", 0.02))
    bound = round(std * 3**0.5 * 2**16)  # a uniform on [-a, a] has standard deviation a / sqrt(3)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in sorted(model.named_parameters()):
            if parameter.dim() >= 2:
                draws = torch.randint(-bound, bound + 1, parameter.shape, generator=generator, dtype=torch.int64)
                parameter.copy_(draws.to(torch.float64).mul_(2.0**-16).to(parameter.dtype))


def pretrain(model, tokenizer, documents: list[str], steps: int, seed: int, max_len: int = 128) -> list[float]:
    """A few steps of full-parameter language modelling on the QA documents, so the base is not pure noise."""
    if steps <= 0 or not documents:
        return []
    rng = random.Random(seed)
    eos = tokenizer.eos_token or ""
    texts = [document + eos for document in documents]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    losses = []
    for step in range(1, steps + 1):
        rows = [tokenizer(text)["input_ids"][:max_len] for text in rng.sample(texts, k=min(16, len(texts)))]
        width = max(len(row) for row in rows)
        input_ids = torch.tensor([row + [0] * (width - len(row)) for row in rows])
        attention_mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if step % 20 == 0 or step == steps:  # on a busy 2-core machine this takes minutes: say how far it is
            print(f"pre-training the tiny base: step {step}/{steps}, loss {losses[-1]:.2f}", flush=True)
    model.eval()
    return losses


@dataclass(frozen=True)
class TinyBaseArgs:
    """The flags of `python -m utils.tiny_base`."""

    arch: str = flag("llama", "the family: llama, bloom or qwen2", choices=ARCHS)
    output_dir: str = flag("models/tiny-llama", "the folder to write: config, safetensors weights, tokenizer")
    seed: int = flag(42, "seeds the initialisation and the pre-training batches", low=0)
    vocab_size: int = flag(4000, "tokenizer vocabulary", low=300, high=64000)
    pretrain_steps: int = flag(120, "pre-training steps on the corpus (0: the processor-independent initialisation "
                                    "only)", low=0)
    corpus_files: str = flag("", "comma-separated JSON (Lines) files to learn from; default: data/, data_literature/")


def validate(args: TinyBaseArgs) -> list[str]:
    """A new or empty --output_dir, or one that holds a model to replace (never an adapter or other files); corpus
    files that exist."""
    output = Path(args.output_dir).expanduser()
    problems = output_dir_problems(output, "--output_dir")
    if not problems and output.is_dir() and any(output.iterdir()) and not (output / "config.json").is_file():
        problems.append(f"--output_dir {output}: holds other files and no model to replace; choose a new folder")
    for name in filter(None, map(str.strip, args.corpus_files.split(","))):
        problems += file_problems(name, "--corpus_files")
    return problems


def main(args: TinyBaseArgs) -> str:
    """Build the tiny base model `--arch` into `--output_dir`."""
    raise_problems(validate(args))
    return build(**vars(args))


def build(arch: str = "llama", output_dir: str = "models/tiny-llama", seed: int = 42, vocab_size: int = 4000,
          pretrain_steps: int = 120, corpus_files: str = "") -> str:
    """Build the tiny base model `arch` into `output_dir` and return the folder."""
    from transformers import AutoModelForCausalLM

    started = time.time()
    torch.manual_seed(seed)
    files = [Path(name.strip()) for name in str(corpus_files).split(",") if name.strip()] or None
    lines, documents = corpus(files=files)
    print(f"building the tiny {arch} base: a tokenizer from {len(lines)} lines of text, then {pretrain_steps} "
          "pre-training steps", flush=True)
    with tempfile.TemporaryDirectory() as workdir:
        tokenizer = make_tokenizer(arch, lines, Path(workdir), vocab_size)
    model = AutoModelForCausalLM.from_config(make_config(arch, tokenizer))
    portable_init(model, seed)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    losses = pretrain(model, tokenizer, documents, pretrain_steps, seed)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    loss_note = f", pre-training loss {losses[0]:.2f} -> {losses[-1]:.2f}" if losses else ""
    print(
        f"tiny {arch} base: {n_params / 1e6:.2f}M parameters, vocabulary {len(tokenizer)}{loss_note}, "
        f"saved to {out} in {time.time() - started:.0f}s"
    )
    return str(out)


if __name__ == "__main__":
    from utils.core.cli import run_cli

    run_cli(main)
