"""GPU benchmark: LoRA training throughput of 7B-shaped models, the original layout against packing.

    python benchmarks/gpu.py                  # LLaMA-7B and Qwen2.5-7B shapes, bf16, on the GPU
    python benchmarks/gpu.py --tiny           # the same code on a tiny shape, on CPU (what the tests run)

Models are randomly initialised from a config (no download): `llama-7b` (LLaMA-1 7B: 4096 hidden, 32 layers, 32
heads, 11008 MLP, 32,000 vocabulary) and `qwen2.5-7b` (3584 hidden, 28 layers, 28 query / 4 key-value heads, 18944
MLP, 152,064 vocabulary). LoRA r=8 on all linear layers, gradient checkpointing, AdamW. Rows are synthetic: token
ids at random, lengths drawn from the published llama_data.json's distribution under the tiny tokenizer (mean 122,
sd 35, 49-256 tokens), the first 61% of each row a prompt masked out of the loss, as in the data.

Two layouts, about `--micro_batch_tokens` (4,096) tokens per micro-batch:
- `cutoff256`: the original recipe, random rows padded to their longest (16 rows per micro-batch);
- `packed2048`: the rows packed into bins of 2,048 tokens (2 bins per micro-batch), logits on label positions only
  (utils/training/batching.py, the default of finetune.py); under FlashAttention the micro-batch's sequences go as
  one row with their boundaries (varlen), as finetune.py sends them.

For each it prints one JSON line: real (non-pad) tokens/s, peak memory, and utilization = 4 x N_params x tokens/s
over the same run's measured bf16 matmul throughput (4N: the forward pass and the input-gradient matmuls;
frozen weights get no weight gradient, and LoRA's own matmuls are negligible), then the projection to the
published headline run: 10 epochs of 8,658 rows (the original took 2h17m on an A100).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from bench_flags import StrictParser

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def build_parser() -> StrictParser:
    parser = StrictParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny shape on CPU in fp32 (the code path, no figures)")
    parser.add_argument("--shapes", default="", help="comma-separated: llama-7b,qwen2.5-7b (default) or tiny")
    parser.add_argument("--layouts", default="cutoff256,packed2048",
                        help="comma-separated: cutoff256 (the original rows, padded) and/or packed2048 (bins)")
    parser.add_argument("--micro_batch_tokens", type=int, default=4096, help="about this many tokens a micro-batch")
    parser.add_argument("--rows", type=int, default=1024, help="synthetic rows to draw micro-batches from")
    parser.add_argument("--steps", type=int, default=10, help="timed micro-batches (one optimizer step each)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed micro-batches first")
    parser.add_argument("--no_gradient_checkpointing", dest="gradient_checkpointing", action="store_false",
                        help="keep every activation (more memory, less recomputation)")
    parser.add_argument("--attn_implementation", default="sdpa",
                        help="sdpa (a block-diagonal mask for packed rows) or flash_attention_2 (varlen)")
    return parser


if __name__ == "__main__":
    build_parser().parse_args()  # a mistyped flag is answered before the torch import below (13-16 s)

import torch  # noqa: E402

from utils.training.batching import PackingCollator, PaddingCollator, first_fit_decreasing  # noqa: E402

SHAPES: dict[str, dict[str, Any]] = {
    "llama-7b": {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                 "num_key_value_heads": 32, "intermediate_size": 11008, "vocab_size": 32000,
                 "max_position_embeddings": 2048, "tie_word_embeddings": False},
    "qwen2.5-7b": {"model_type": "qwen2", "hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28,
                   "num_key_value_heads": 4, "intermediate_size": 18944, "vocab_size": 152064,
                   "max_position_embeddings": 32768, "tie_word_embeddings": False, "rope_theta": 1000000.0},
    "llama-1b": {"model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 16,
                 "num_key_value_heads": 16, "intermediate_size": 5632, "vocab_size": 32000,
                 "max_position_embeddings": 2048, "tie_word_embeddings": False},
    "tiny": {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "intermediate_size": 172, "vocab_size": 1000,
             "max_position_embeddings": 2048, "tie_word_embeddings": False},
    "tiny-qwen2": {"model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "intermediate_size": 172, "vocab_size": 1500,
                   "max_position_embeddings": 2048, "tie_word_embeddings": False},
}
HEADLINE_ROWS, HEADLINE_EPOCHS = 8658, 10
LENGTHS = {"mean": 122, "sd": 35, "min": 49, "max": 256, "prompt_share": 0.61}


def synthetic_rows(count: int, vocab: int, seed: int = 0) -> list[dict[str, list[int]]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = (torch.randn(count, generator=generator) * LENGTHS["sd"] + LENGTHS["mean"]).round().long()
    lengths = lengths.clamp(LENGTHS["min"], LENGTHS["max"]).tolist()
    rows = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=generator).tolist()
        prompt = int(n * LENGTHS["prompt_share"])
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def micro_batches(rows: list[dict], layout: str, micro_batch_tokens: int, pad_token_id: int = 0,
                  varlen: bool = False) -> list[tuple[dict, int]]:
    """Consecutive micro-batches of about `micro_batch_tokens` tokens in the given layout, with their real tokens.

    `varlen` (FlashAttention): each packed micro-batch as one row with its sequence boundaries, as finetune.py does."""
    if layout == "cutoff256":
        per_batch = max(1, micro_batch_tokens // 256)
        collator: Any = PaddingCollator(pad_token_id)
    elif layout == "packed2048":  # whole bins of 2,048 tokens, micro_batch_tokens // 2048 of them per micro-batch
        bins = first_fit_decreasing([len(row["input_ids"]) for row in rows], 2048)
        per_batch = max(1, micro_batch_tokens // 2048)
        chunks = [[rows[i] for b in bins[start:start + per_batch] for i in b]
                  for start in range(0, len(bins) - per_batch + 1, per_batch)]
        collator = PackingCollator(pad_token_id, pack_len=2048, label_positions_only=True, varlen=varlen)
        return [(collator(chunk), sum(len(row["input_ids"]) for row in chunk)) for chunk in chunks]
    else:
        raise SystemExit(f"unknown layout {layout!r}: cutoff256 or packed2048")
    chunks = [rows[start:start + per_batch] for start in range(0, len(rows) - per_batch + 1, per_batch)]
    return [(collator(chunk), sum(len(row["input_ids"]) for row in chunk)) for chunk in chunks]


def matmul_flops(device: str, dtype: torch.dtype, size: int, repeats: int) -> float:
    """Measured dense matmul throughput (FLOP/s) of this device in `dtype`."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - started)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def base_config(shape: str):
    """The transformers config of a shape in SHAPES (random init, no download)."""
    from transformers import AutoConfig

    settings = dict(SHAPES[shape])
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    config.use_cache = False
    return config


def enable_gradient_checkpointing(model) -> None:
    """Recompute activations in the backward pass (non-reentrant), on the model under a peft wrapper too."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.2x
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.enable_input_require_grads()


def build_model(shape: str, device: str, dtype: torch.dtype, gradient_checkpointing: bool,
                attn_implementation: str = "sdpa", lora_dropout: float = 0.05):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(base_config(shape), dtype=dtype,
                                                 attn_implementation=attn_implementation)
    n_params = sum(p.numel() for p in model.parameters())
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=lora_dropout,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    return model, n_params


def benchmark(shape: str, layout: str, args: argparse.Namespace, device: str, dtype: torch.dtype,
              peak_flops: float, built: tuple[Any, int] | None = None) -> dict[str, Any]:
    """Train `args.steps` micro-batches (one optimizer step each) after `args.warmup`; time, memory, utilization.

    `built`: (a LoRA model of `shape` already built as `build_model` does, its base parameter count) to reuse."""
    model, n_params = built or build_model(shape, device, dtype, args.gradient_checkpointing,
                                           args.attn_implementation)
    model.train()
    batches = micro_batches(synthetic_rows(args.rows, SHAPES[shape]["vocab_size"]), layout, args.micro_batch_tokens,
                            varlen=args.attn_implementation.startswith("flash"))
    steps = min(args.steps, len(batches) - args.warmup)
    if steps < 1:
        raise SystemExit(f"--rows {args.rows} gives {len(batches)} micro-batches: fewer than --warmup + 1")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    real = padded = 0
    started = 0.0
    for step, (cpu_batch, real_tokens) in enumerate(batches[:args.warmup + steps]):
        if step == args.warmup:
            synchronize(device)
            started = time.perf_counter()
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in cpu_batch.items()}
        count = (batch["shift_labels"] if "shift_labels" in batch else batch["labels"][:, 1:]).ne(-100).sum()
        model(**batch, num_items_in_batch=count).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= args.warmup:
            real += real_tokens
            padded += int(cpu_batch["input_ids"].numel())
    synchronize(device)
    tokens_per_s = real / (time.perf_counter() - started)
    hours = HEADLINE_ROWS * HEADLINE_EPOCHS * LENGTHS["mean"] / tokens_per_s / 3600
    result = {
        "name": f"{shape}/{layout}", "device": device_name(device), "dtype": str(dtype).replace("torch.", ""),
        "params": n_params, "lora": "r=8 all-linear",
        "gradient_checkpointing": args.gradient_checkpointing,
        "attention": args.attn_implementation,
        "micro_batch_tokens": round(padded / steps), "pad_fraction": round(1 - real / padded, 4),
        "tokens_per_s": round(tokens_per_s, 1),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
        "matmul_tflops": round(peak_flops / 1e12, 3),
        "utilization": round(4 * n_params * tokens_per_s / peak_flops, 4),
        "steps": steps,
        "projection": {"run": f"{HEADLINE_EPOCHS} epochs x {HEADLINE_ROWS} rows x {LENGTHS['mean']} tokens",
                       "hours": round(hours, 2), "original": "2h17m on an A100"},
    }
    del optimizer
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({torch.get_num_threads()} threads)"


def main(argv: list[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    if args.tiny:
        device, dtype = "cpu", torch.float32
        shapes = args.shapes or "tiny"
        args.rows, args.steps, args.warmup = min(args.rows, 128), min(args.steps, 3), min(args.warmup, 1)
        peak = matmul_flops(device, dtype, 512, 5)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU here: run `python benchmarks/gpu.py --tiny` for the CPU code path")
        device, dtype = "cuda", torch.bfloat16
        shapes = args.shapes or "llama-7b,qwen2.5-7b"
        peak = matmul_flops(device, dtype, 8192, 50)
    lines = []
    for shape in shapes.split(","):
        for layout in args.layouts.split(","):
            line = benchmark(shape, layout, args, device, dtype, peak)
            print(json.dumps(line, ensure_ascii=False), flush=True)
            lines.append(line)
    return lines


if __name__ == "__main__":
    main()
