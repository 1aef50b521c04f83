"""Build a tiny base model with a real tokenizer: the embedded default, and what the tests train.

    python -m utils.tiny_base --arch llama --output_dir models/tiny-llama

The tokenizer is a sentencepiece BPE model trained on the project's own text (`data/`, `data_literature/`,
the prompt templates); the model is randomly initialised with `--seed` and optionally pre-trained for a few
steps on the same text, so that fine-tuning starts from something that has seen Chinese. The folder loads
offline with `AutoTokenizer.from_pretrained(DIR)` and `AutoModelForCausalLM.from_pretrained(DIR)`.
Special tokens follow each real family: LLaMA (`<s>` prepended, no pad token), Bloom (`<pad>`, no `<s>`
prepended), Qwen2 (`<|endoftext|>` as end and pad, no `<s>`), so scripts must read them from the tokenizer.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
ARCHS = ("llama", "bloom", "qwen2")
HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE, MAX_POSITIONS = 128, 4, 4, 2, 344, 1024


def corpus_lines(root: Path = REPO_ROOT) -> list[str]:
    """The project's own text, in a fixed order, one sentence-ish line each."""
    lines: list[str] = []
    files = sorted((root / "data").glob("*.json*")) + sorted((root / "data_literature").glob("*.json*"))
    for path in files:
        text = path.read_text(encoding="utf-8")
        rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines() if x.strip()]
        for row in rows:
            for value in row.values():
                if isinstance(value, str) and value.strip():
                    lines.append(value.strip())
                elif isinstance(value, list):
                    lines.extend(str(item) for item in value if str(item).strip())
    for path in sorted((root / "templates").glob("*.json")):
        lines.extend(v for v in json.loads(path.read_text(encoding="utf-8")).values() if isinstance(v, str) and v)
    return lines


def train_tokenizer(lines: list[str], workdir: Path, vocab_size: int) -> Path:
    import sentencepiece as spm

    corpus = workdir / "corpus.txt"
    corpus.write_text("\n".join(line.replace("\n", " ") for line in lines), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
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


def make_tokenizer(arch: str, sp_model_dir: Path):
    from transformers import LlamaTokenizer

    tokenizer = LlamaTokenizer.from_pretrained(str(sp_model_dir))
    if arch == "llama":
        tokenizer.add_bos_token = True
    elif arch == "bloom":
        tokenizer.pad_token = "<pad>"
        tokenizer.add_bos_token = False
    elif arch == "qwen2":
        tokenizer.bos_token = None
        tokenizer.eos_token = "<|endoftext|>"
        tokenizer.pad_token = "<|endoftext|>"
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
    if arch == "llama":
        return LlamaConfig(
            vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=MAX_POSITIONS,
            tie_word_embeddings=False, **special,
        )
    if arch == "qwen2":
        return Qwen2Config(
            vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=MAX_POSITIONS,
            tie_word_embeddings=True, **special,
        )
    return BloomConfig(vocab_size=vocab, hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS, **special)


def pretrain(model, tokenizer, lines: list[str], steps: int, seed: int, max_len: int = 128) -> list[float]:
    """A few steps of full-parameter language modelling on the corpus, so the base is not pure noise."""
    if steps <= 0:
        return []
    rng = random.Random(seed)
    eos = tokenizer.eos_token or ""
    texts = [line + eos for line in lines]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        rows = [tokenizer(text, max_length=max_len, truncation=True)["input_ids"] for text in rng.sample(texts, k=min(16, len(texts)))]
        width = max(len(row) for row in rows)
        input_ids = torch.tensor([row + [0] * (width - len(row)) for row in rows])
        attention_mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def build(
    arch: str = "llama",
    output_dir: str = "models/tiny-llama",
    seed: int = 42,
    vocab_size: int = 4000,
    pretrain_steps: int = 60,
) -> str:
    """Build the tiny base model `arch` into `output_dir` and return the folder."""
    from transformers import AutoModelForCausalLM

    if arch not in ARCHS:
        raise SystemExit(f"error: --arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    started = time.time()
    torch.manual_seed(seed)
    lines = corpus_lines()
    with tempfile.TemporaryDirectory() as workdir:
        train_tokenizer(lines, Path(workdir), vocab_size)
        tokenizer = make_tokenizer(arch, Path(workdir))
    model = AutoModelForCausalLM.from_config(make_config(arch, tokenizer))
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    losses = pretrain(model, tokenizer, lines, pretrain_steps, seed)
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
    import fire

    fire.Fire(build)
