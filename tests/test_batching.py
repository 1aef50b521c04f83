"""Fast batches (utils/training/batching.py): the same rows and loss as the original recipe, in fewer padded tokens;
packed sequences kept apart under every attention implementation, FlashAttention's varlen path included."""

import contextlib
import itertools
import json
import math
import random
import shutil
import sys

import pytest
import torch
from conftest import project_rows
from in_process import finetune as train_adapter
from in_process import one_thread, run_main  # noqa: F401  one_thread: an autouse fixture

from utils.data import IGNORE_INDEX, tokenize_row
from utils.generation.engine import default_batch_size
from utils.prompter import Prompter
from utils.training.batching import (
    LABEL_POSITION_MODEL_TYPES,
    PACKING_MODEL_TYPES,
    PackingCollator,
    StepBatchSampler,
    first_fit_decreasing,
    length_buckets,
    pack_step,
    plan_batching,
)


def summary_of(stdout: str) -> dict:
    line = next(line for line in stdout.splitlines() if line.startswith("summary: "))
    return json.loads(line[len("summary: "):])


def lora_tensors(folder) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def test_first_fit_decreasing_and_step_split():
    lengths = [5, 9, 3, 7, 2, 8, 1, 6]
    bins = first_fit_decreasing(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == math.ceil(sum(lengths) / 10)  # FFD is optimal here
    assert first_fit_decreasing([12, 3], 10) == [[0], [1]]  # too long for a bin: a bin of its own
    for parts in (1, 3, 5, 8):
        groups = pack_step(lengths, parts, 10)
        assert len(groups) == parts and all(groups)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    with pytest.raises(ValueError):
        pack_step([3, 4], 3, 10)


def test_length_buckets_are_contiguous_and_balanced():
    rng = random.Random(3)
    lengths = [rng.randint(5, 250) for _ in range(64)]
    for parts in (1, 2, 5, 16, 64):
        groups = length_buckets(lengths, parts)
        assert len(groups) == parts and all(groups)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        flat = [lengths[i] for g in groups for i in g]
        assert flat == sorted(lengths, reverse=True)  # contiguous runs of the rows sorted longest first
    padded = [len(g) * max(lengths[i] for i in g) for g in length_buckets(lengths, 8)]
    assert max(padded) <= 1.5 * sum(lengths) / 8 + max(lengths)  # no bucket far above an even share
    with pytest.raises(ValueError):
        length_buckets([3, 4], 3)


def step_rows(batches: list[list[int]], micro_batches_per_step: int) -> list[set[int]]:
    steps = [batches[i:i + micro_batches_per_step] for i in range(0, len(batches), micro_batches_per_step)]
    return [{row for batch in step for row in batch} for step in steps]


@pytest.mark.parametrize("pack_len", [None, 64])  # length buckets, packing
def test_sampler_takes_the_trainer_random_samplers_rows_per_step(pack_len):
    """Step k holds the rows of step k under the original recipe (accelerate's seeded random sampler)."""
    from accelerate.data_loader import SeedableRandomSampler

    rng = random.Random(0)
    lengths = [rng.randint(5, 60) for _ in range(37)]
    sampler = StepBatchSampler(lengths, rows_per_step=8, micro_batches_per_step=4, seed=42, pack_len=pack_len)
    reference = SeedableRandomSampler(range(len(lengths)), data_seed=42)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        reference.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) == 4 * 4 + 4  # 4 full steps of 4 micro-batches, a 5-row tail in 4
        order = list(reference)
        expected = [set(order[i:i + 8]) for i in range(0, len(order), 8)]
        assert step_rows(batches, 4) == expected
        assert sorted(row for batch in batches for row in batch) == list(range(len(lengths)))  # each row once


def test_sampler_tail_smaller_than_the_micro_batch_count():
    sampler = StepBatchSampler([10] * 10, rows_per_step=8, micro_batches_per_step=4, pack_len=32)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 4 + 2  # the 2-row tail: 2 micro-batches of one row
    assert [len(b) for b in batches[4:]] == [1, 1]


@pytest.mark.parametrize("pack_len", [None, 64])
def test_accelerates_sharding_hands_each_process_its_share_of_every_step(pack_len):
    """The sampler yields every process's micro-batches interleaved; accelerate's own `BatchSamplerShard` (what
    `accelerator.prepare` wraps it in under several processes) gives each process its own, step by step."""
    from accelerate.data_loader import BatchSamplerShard

    rng = random.Random(1)
    lengths = [rng.randint(5, 60) for _ in range(50)]
    sampler = StepBatchSampler(lengths, 16, 2, world_size=2, seed=7, pack_len=pack_len)
    shards = [BatchSamplerShard(sampler, num_processes=2, process_index=r) for r in (0, 1)]
    per_rank = [list(shard) for shard in shards]
    assert len(per_rank[0]) == len(per_rank[1]) == len(shards[0]) == 4 * 2  # ceil(50 / 16) steps, 2 per process
    order = torch.randperm(50, generator=torch.Generator().manual_seed(7)).tolist()
    for step in range(3):
        mine = [{row for b in per_rank[r][2 * step:2 * step + 2] for row in b} for r in (0, 1)]
        assert not mine[0] & mine[1] and mine[0] | mine[1] == set(order[16 * step:16 * step + 16])


def test_packing_collator_layout():
    features = [
        {"input_ids": [1, 11, 12, 13], "labels": [IGNORE_INDEX, IGNORE_INDEX, 12, 13]},
        {"input_ids": [1, 21, 22], "labels": [1, 21, 22]},  # train_on_inputs: even its first token is labelled
        {"input_ids": [1, 31, 32, 33, 34, 35], "labels": [IGNORE_INDEX] * 3 + [33, 34, 35]},
    ]
    collator = PackingCollator(pad_token_id=0, pack_len=8, pad_to_multiple_of=8)
    batch = collator(features)
    assert batch["input_ids"].tolist() == [[1, 31, 32, 33, 34, 35, 0, 0], [1, 11, 12, 13, 1, 21, 22, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 3, 0, 1, 2, 3]]
    assert batch["labels"][1].tolist() == [-100, -100, 12, 13, -100, 21, 22, -100]  # no sequence predicts the next
    assert "attention_mask" not in batch and batch["use_cache"] is False
    assert collator.stats.real_tokens == 13 and collator.stats.batch_tokens == 16
    labelled = PackingCollator(pad_token_id=0, pack_len=8, label_positions_only=True)(features)
    assert labelled["logits_to_keep"].dtype == torch.bool
    assert labelled["shift_labels"].tolist() == [33, 34, 35, 12, 13, 21, 22]
    assert labelled["logits_to_keep"][1].tolist() == [False, True, True, False, True, True, False, False]


def tiny_lora(path, arch):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from utils.model.loading import load_tokenizer, resolve_lora_targets

    tokenizer = load_tokenizer(str(path))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(path))
    model.config.use_cache = False
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=resolve_lora_targets(model, None),
                        init_lora_weights=False, task_type="CAUSAL_LM")  # non-zero B: the adapter takes part
    return get_peft_model(model, config).eval(), tokenizer


@pytest.mark.parametrize("arch, mode", [("llama", "pack"), ("qwen2", "pack"), ("bloom", "bucket")])
def test_step_loss_equals_rows_one_by_one(tiny_models, arch, mode):
    """The loss of one optimizer step (its micro-batches, `num_items_in_batch` as the Trainer passes it) equals the
    sum of each row's token losses, run alone, over the step's label tokens: no row sees another, none is lost."""
    model, tokenizer = tiny_lora(tiny_models[arch], arch)
    prompter = Prompter("med_template")
    items = [tokenize_row(row, prompter, tokenizer, 96, train_on_inputs=i % 3 == 0)
             for i, row in enumerate(project_rows()[:12])]
    features = [{"input_ids": it.input_ids, "labels": it.labels} for it in items]
    with torch.no_grad():
        total, count = 0.0, 0
        for feature in features:
            ids, labels = torch.tensor([feature["input_ids"]]), torch.tensor([feature["labels"]])
            total += model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(1)).loss.item()
            count += int((labels[:, 1:] != IGNORE_INDEX).sum())
        expected = total / count
        for label_positions in (False, True):
            plan = plan_batching(model, [len(f["input_ids"]) for f in features], tokenizer.pad_token_id,
                                 batch_size=12, micro_batch_size=6, cutoff_len=96, pack_len=320)
            plan.collator.label_positions_only = label_positions
            assert plan.mode == mode and plan.micro_batches_per_step == 2
            sampler = plan.sampler([len(f["input_ids"]) for f in features])
            micro = [plan.collator([features[i] for i in rows]) for rows in sampler]
            if mode == "pack":
                assert max(int((b["position_ids"] == 0).sum(1).max()) for b in micro) > 1  # rows share a bin
            n = sum(int((b["shift_labels"] if "shift_labels" in b else b["labels"][:, 1:]).ne(-100).sum())
                    for b in micro)
            assert n == count
            loss = sum(model(**b, num_items_in_batch=torch.tensor(n)).loss.item() for b in micro)
            assert loss == pytest.approx(expected, abs=1e-5), (label_positions, loss, expected)


def test_packing_refuses_a_model_that_would_build_a_cache(tiny_models):
    """With a cache transformers skips the packed-sequence detection (position_ids restarts), so packed sequences
    would see each other: plan_batching packs only for a model whose config.use_cache is False (finetune.py sets
    it), and each packed batch says use_cache=False as well."""
    model, tokenizer = tiny_lora(tiny_models["llama"], "llama")
    prompter = Prompter("med_template")
    features = [{"input_ids": it.input_ids, "labels": it.labels} for it in
                (tokenize_row(row, prompter, tokenizer, 96, False) for row in project_rows()[:8])]
    lengths = [len(f["input_ids"]) for f in features]
    plan = plan_batching(model, lengths, tokenizer.pad_token_id, batch_size=8, micro_batch_size=2, cutoff_len=96,
                         pack_len=320)
    batch = plan.collator(features[:4])
    assert plan.mode == "pack" and batch["use_cache"] is False and batch["input_ids"].shape[0] < 4  # rows share bins
    with torch.no_grad():  # what the refusal prevents: the same packed batch with a cache computes other logits
        inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
        apart, mixed = (model(**inputs, use_cache=cache).logits for cache in (False, True))
    assert (apart - mixed).abs().max() > 1e-3
    model.config.use_cache = True
    with pytest.raises(ValueError, match="use_cache"):
        plan_batching(model, lengths, tokenizer.pad_token_id, batch_size=8, micro_batch_size=2, cutoff_len=96)


@pytest.mark.parametrize("model_type", sorted(LABEL_POSITION_MODEL_TYPES))
def test_packed_forward_equals_separate(model_type):
    """Every architecture in PACKING_MODEL_TYPES keeps packed sequences apart, and every one in
    LABEL_POSITION_MODEL_TYPES takes a boolean `logits_to_keep` with `shift_labels` (tiny random configs, no
    download): what `label_positions_supported` promises, checked against the installed transformers."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from utils.training.batching import label_positions_supported, packing_supported

    config = AutoConfig.for_model(model_type)
    sizes = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "head_dim": 16, "intermediate_size": 128, "vocab_size": 500, "max_position_embeddings": 256,
             "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "use_cache": False, "ffn_dim": 128,
             "word_embed_proj_dim": 64}
    for name, value in sizes.items():
        with contextlib.suppress(AttributeError):  # e.g. falcon derives head_dim itself
            setattr(config, name, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    assert label_positions_supported(model)
    assert packing_supported(model) == (model_type in PACKING_MODEL_TYPES)
    a, b = torch.randint(5, 400, (1, 20)), torch.randint(5, 400, (1, 30))
    with torch.no_grad():
        alone = torch.cat([model(input_ids=a).logits, model(input_ids=b).logits], dim=1)
        if model_type in PACKING_MODEL_TYPES:
            positions = torch.cat([torch.arange(20), torch.arange(30)])[None]
            packed = model(input_ids=torch.cat([a, b], dim=1), position_ids=positions).logits
            torch.testing.assert_close(packed, alone, atol=1e-4, rtol=1e-4)
        labels = torch.cat([torch.full((1, 10), IGNORE_INDEX), b[:, 10:]], dim=1)
        full = model(input_ids=b, labels=labels)
        keep = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX) != IGNORE_INDEX
        kept = model(input_ids=b, logits_to_keep=keep, labels=labels, shift_labels=labels[:, 1:][labels[:, 1:] >= 0])
    assert kept.logits.shape == (int(keep.sum()), config.vocab_size)
    torch.testing.assert_close(kept.logits, full.logits[keep], atol=1e-5, rtol=1e-5)
    assert kept.loss.item() == pytest.approx(full.loss.item(), abs=1e-5)


def test_packed_training_matches_the_original_recipe_step_for_step(tiny_llama, train_file, tmp_path):
    """Same rows, same steps: without dropout the packed run logs the original recipe's losses."""
    runs = {}
    for packing in ("False", "True"):
        out = tmp_path / f"packing-{packing}"
        result = train_adapter(tiny_llama, train_file, out, "--packing", packing, "--lora_dropout", "0",
                               "--val_set_size", "0")
        history = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
        runs[packing] = ([e["loss"] for e in history if "loss" in e], lora_tensors(out), summary_of(result.stdout))
    (original, original_lora, original_summary), (packed, packed_lora, packed_summary) = runs["False"], runs["True"]
    assert len(packed) == len(original) == 4
    assert packed == pytest.approx(original, abs=1e-5)
    for name in original_lora:
        torch.testing.assert_close(packed_lora[name], original_lora[name], atol=1e-4, rtol=1e-3)
    assert original_summary["batching"] == "padded" and packed_summary["batching"] == "pack"
    assert original_summary["steps"] == packed_summary["steps"] == 4
    for summary in (original_summary, packed_summary):
        assert 0 <= summary["pad_fraction"] < 1 and summary["tokens_per_s"] > 0


def test_packed_resume_in_a_later_epoch_continues_the_run(tiny_llama, train_file, tmp_path):
    """Resuming from a checkpoint in the second epoch replays that epoch's packed order (3 steps per epoch)."""
    whole = tmp_path / "whole"
    result = train_adapter(tiny_llama, train_file, whole, "--max_steps", "6")
    assert "packed into rows of at most 128 tokens" in result.stdout
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(whole / "checkpoint-4", resumed / "checkpoint-4")
    train_adapter(tiny_llama, train_file, resumed, "--max_steps", "6", "--resume_from_checkpoint", "True")
    state = json.loads((resumed / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6 and state["epoch"] == pytest.approx(2.0)
    expected, actual = lora_tensors(whole), lora_tensors(resumed)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-5, rtol=0)


def test_attn_implementation_reaches_the_model_and_packing_stays(tiny_llama, train_file, tmp_path):
    out = tmp_path / "eager"
    result = train_adapter(tiny_llama, train_file, out, "--attn_implementation", "eager", "--max_steps", "2",
                           "--val_set_size", "0")
    assert json.loads((out / "bentsao_training.json").read_text())["attn_implementation"] == "eager"
    assert summary_of(result.stdout)["batching"] == "pack"  # eager attention keeps packed rows apart too
    from utils.model.loading import load_base_model

    model = load_base_model(str(tiny_llama), device="cpu", attn_implementation="eager")
    assert model.config._attn_implementation == "eager"


def test_bloom_trains_on_length_buckets(tiny_models, train_file, tmp_path):
    result = train_adapter(tiny_models["bloom"], train_file, tmp_path / "bloom", "--max_steps", "2")
    assert "length-bucketed micro-batches" in result.stdout and "ALiBi" in result.stdout
    assert summary_of(result.stdout)["batching"] == "bucket"


def test_micro_batch_tokens_splits_steps_not_rows(tiny_llama, train_file, tmp_path):
    result = train_adapter(tiny_llama, train_file, tmp_path / "split", "--micro_batch_tokens", "200",
                           "--max_steps", "2", "--val_set_size", "0")
    assert "micro-batches per step per process" in result.stdout
    line = next(line for line in result.stdout.splitlines() if line.startswith("batching:"))
    assert int(line.split(" micro-batches per step")[0].rsplit(" ", 1)[1]) > 2  # more than 8 // 4
    assert summary_of(result.stdout)["steps"] == 2


def test_pack_len_shorter_than_cutoff_len_is_refused(tiny_llama, train_file, tmp_path):
    import finetune

    result = run_main(finetune.main, "--base_model", tiny_llama, "--data_path", train_file, "--output_dir",
                      tmp_path / "x", "--cutoff_len", "256", "--pack_len", "128")
    assert result.returncode == 2 and "--pack_len 128" in result.stderr and "--cutoff_len 256" in result.stderr


def test_default_inference_batch_size_follows_beams():
    assert default_batch_size(1) == 32 and default_batch_size(4) == 8 and default_batch_size(64) == 1
    assert default_batch_size("x") == 32  # an invalid --num_beams is reported by the validation, not here


def test_output_file_rows_in_input_order_under_small_batches(tiny_llama, tmp_path):
    """Rows of different lengths, batches of 2 sorted by length: the answers file keeps the input order and each
    answer is the one-at-a-time greedy answer."""
    rows = [{"instruction": q, "id": i} for i, q in enumerate(
        ["咳嗽", "高血压患者在日常生活中需要注意什么？请从饮食、运动和用药三方面说明。", "发热怎么办？",
         "糖尿病", "一位60岁男性出现持续性右上腹隐痛和消瘦，既往有乙肝病史，应做哪些检查？"])]
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    written = {}
    for batch_size in ("1", "2"):
        out = tmp_path / f"answers-{batch_size}.jsonl"
        import infer

        result = run_main(infer.main, "--base_model", tiny_llama, "--use_lora", "False", "--instruct_dir", questions,
                          "--num_beams", "1", "--max_new_tokens", "8", "--batch_size", batch_size, "--output_file", out)
        assert result.returncode == 0, result.stderr[-2000:]
        written[batch_size] = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [w["id"] for w in written["2"]] == [r["id"] for r in rows]
    assert written["2"] == written["1"]


# --- FlashAttention: transformers' real flash path, CPU functions standing in for the CUDA kernels ---------------


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float | None) -> torch.Tensor:
    """Exact attention of one sequence, FlashAttention's layout: (seq, heads, dim); grouped key/value heads."""
    repeat = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=causal, scale=scale)
    return out.transpose(0, 1)


def cpu_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                        alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash_attn.flash_attn_func's contract on CPU: a batch of (batch, seq, heads, dim), each row one sequence."""
    return torch.stack([_attend(q[b], k[b], v[b], causal, softmax_scale) for b in range(q.shape[0])])


def cpu_flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                               deterministic=False, return_attn_probs=False, block_table=None):
    """flash_attn.flash_attn_varlen_func's contract on CPU: (total, heads, dim), sequences cut at cu_seqlens."""
    assert cu_seqlens_q.dtype == torch.int32 and int(cu_seqlens_q[-1]) == q.shape[0]
    out = torch.empty_like(q)
    for start, end in itertools.pairwise(cu_seqlens_q.tolist()):
        out[start:end] = _attend(q[start:end], k[start:end], v[start:end], causal, softmax_scale)
    return out


@pytest.fixture
def flash_attention_on_cpu(monkeypatch):
    """Everything of transformers' FlashAttention-2 path runs for real (attention-implementation dispatch, mask
    building, `_flash_attention_forward` with its `_is_packed_sequence` / varlen decisions); only what needs a CUDA
    GPU stands in: the two `flash_attn` kernels (exact CPU attention above) and the device/package availability
    checks that would refuse a machine without them."""
    import types

    import transformers.modeling_flash_attention_utils as flash_utils
    from transformers import PreTrainedModel

    kernels = types.ModuleType("flash_attn")
    kernels.flash_attn_func, kernels.flash_attn_varlen_func = cpu_flash_attn_func, cpu_flash_attn_varlen_func
    kernels.flash_attn_with_kvcache = None
    padding = types.ModuleType("flash_attn.bert_padding")
    padding.pad_input, padding.unpad_input = flash_utils._pad_input, flash_utils._unpad_input
    kernels.bert_padding = padding
    monkeypatch.setitem(sys.modules, "flash_attn", kernels)
    monkeypatch.setitem(sys.modules, "flash_attn.bert_padding", padding)
    monkeypatch.setattr(flash_utils, "is_flash_attn_2_available", lambda: True)
    monkeypatch.setattr(flash_utils, "_loaded_implementation", None)
    monkeypatch.setattr(PreTrainedModel, "_flash_attn_can_dispatch", lambda self, *args, **kwargs: True)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_flash_attention_packed_micro_batches_equal_separate_rows(tiny_models, flash_attention_on_cpu, arch):
    """Under flash_attention_2 the packed micro-batch goes as ONE row with cu_seq_lens: logits and the step's loss
    equal the rows run one by one (1e-5). The several-row packed layout that sdpa takes would let sequences attend
    to each other under FlashAttention (transformers keeps them apart only in a one-row batch): it differs."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from utils.compat import attention_implementation
    from utils.model.loading import load_tokenizer, resolve_lora_targets

    tokenizer = load_tokenizer(str(tiny_models[arch]))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_models[arch]), attn_implementation="flash_attention_2")
    assert attention_implementation(model) == "flash_attention_2"
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=resolve_lora_targets(model, None),
                        init_lora_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(model, config).eval()
    prompter = Prompter("med_template")
    features = [{"input_ids": it.input_ids, "labels": it.labels} for it in
                (tokenize_row(row, prompter, tokenizer, 96, train_on_inputs=i % 3 == 0)
                 for i, row in enumerate(project_rows()[:8]))]
    lengths = [len(f["input_ids"]) for f in features]
    plan = plan_batching(model, lengths, tokenizer.pad_token_id, batch_size=8, micro_batch_size=4, cutoff_len=96,
                         pack_len=320)
    assert plan.mode == "pack" and plan.varlen and "varlen" in plan.describe()
    micro = [[features[i] for i in rows] for rows in plan.sampler(lengths)]
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([f["input_ids"]])).logits[0] for f in features]
        total, count = 0.0, 0
        for f in features:
            labels = torch.tensor([f["labels"]])
            total += model(input_ids=torch.tensor([f["input_ids"]]), labels=labels,
                           num_items_in_batch=torch.tensor(1)).loss.item()
            count += int((labels[:, 1:] != IGNORE_INDEX).sum())
        loss, step_logits = 0.0, {}
        for rows in micro:
            batch = plan.collator(rows)
            assert batch["input_ids"].shape[0] == 1
            assert batch["cu_seq_lens_q"].tolist()[-1] == batch["input_ids"].shape[1]
            loss += model(**batch, num_items_in_batch=torch.tensor(count)).loss.item()
            plain = {k: v for k, v in batch.items() if k not in ("labels", "shift_labels", "logits_to_keep")}
            logits = model(**plain).logits[0]
            for feature, (start, end) in zip(rows, itertools.pairwise(batch["cu_seq_lens_q"].tolist()), strict=True):
                step_logits[id(feature)] = logits[start:end]
        for feature, expected in zip(features, alone, strict=True):
            torch.testing.assert_close(step_logits[id(feature)], expected, atol=1e-5, rtol=1e-5)
        assert loss == pytest.approx(total / count, abs=1e-5)
        # the several-row layout sdpa takes: [f0 f1] in one row, [f2] in another, position_ids restarting
        (n0, n1, n2), width = lengths[:3], max(lengths[0] + lengths[1], lengths[2])
        ids = torch.zeros((2, width), dtype=torch.long)
        positions = torch.arange(width).repeat(2, 1)
        ids[0, :n0 + n1] = torch.tensor(features[0]["input_ids"] + features[1]["input_ids"])
        positions[0, n0:] = torch.arange(width - n0)
        ids[1, :n2] = torch.tensor(features[2]["input_ids"])
        mixed = model(input_ids=ids, position_ids=positions).logits
    assert (mixed[0, n0:n0 + n1] - alone[1]).abs().max() > 1e-2  # the second sequence saw the first
