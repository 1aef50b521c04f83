"""Fast training batches: packing (or length buckets), same rows per optimizer step as the original recipe.

The original recipe pads random micro-batches to their longest row; on the published data about half of every
batch is padding. Here each optimizer step takes the very same rows (the same seeded permutation as the
Trainer's own random sampler, `--batch_size` rows per step, the same number of steps) and lays them out densely:

- **packing** (LLaMA, Qwen2 and the other architectures in `PACKING_MODEL_TYPES`): a micro-batch's rows are packed
  first-fit-decreasing into bins of at most `pack_len` tokens, one bin per batch row. `position_ids` restart at 0
  for every packed sequence and no `attention_mask` is passed: transformers' `masking_utils.create_causal_mask`
  then finds the restarts (`find_packed_sequence_indices`) and builds a block-diagonal causal mask, so a token only
  sees earlier tokens of its own sequence. The first label of every packed sequence is -100, so no sequence is
  trained to predict the next one's first token.
- **varlen** (the same architectures under FlashAttention, `--attn_implementation flash_attention_2/3`): transformers'
  flash path keeps packed sequences apart only for a batch of ONE row (`_is_packed_sequence`); with several rows
  it would run plain causal attention over each whole packed row. So the micro-batch is flattened into one row and
  the sequence boundaries are passed as `cu_seq_lens_q/k` and `max_length_q/k`, as transformers' own
  `DataCollatorWithFlattening(return_flash_attn_kwargs=True)` does: the kernel runs varlen attention, no padding.
- **length buckets** (Bloom: ALiBi takes its positions from the attention mask, not position_ids, so packing would
  let sequences see each other; and any architecture not verified for packing): a step's rows sorted by length,
  cut into contiguous micro-batches balanced by padded size (`length_buckets`), each padded to its own longest row
  with an attention mask.
- **logits only where there is a label**: the prompt (and padding) positions need no logits, so the collator
  passes a boolean `logits_to_keep` (transformers' `slice_logits_to_keep`) and the matching `shift_labels`: the LM
  head and the cross-entropy run on the answer tokens only (on the published data 39% of the real tokens).

The loss is unchanged: transformers passes `num_items_in_batch` (the step's label tokens, counted over
`shift_labels`) to the model, so the loss of an optimizer step is the sum of its token losses divided by its
label-token count, however the rows are laid out (tests/test_batching.py checks this against rows run one by one).

Under several processes the sampler yields every rank's micro-batches interleaved (rank 0's, rank 1's, ... for
each slot of a step); accelerate's own `BatchSamplerShard` then hands each rank its own. The sampler's epoch is set
from the Trainer's step count at the start of every epoch (`SamplerEpoch`), so a resumed run replays the order of
the epoch it stopped in, also where the Trainer's own `set_epoch` cannot reach the sampler.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from transformers import TrainerCallback

from utils.compat import attention_implementation, is_varlen_attention
from utils.core.errors import raise_problems
from utils.data import IGNORE_INDEX

# Architectures whose causal mask comes from masking_utils with position_ids (packed sequences detected) and whose
# positions come from position_ids: each is checked by tests/test_batching.py::test_packed_forward_equals_separate.
# Not here (checked to mix packed sequences): bloom (ALiBi from the attention mask), falcon, opt.
PACKING_MODEL_TYPES = frozenset({
    "llama", "mistral", "qwen2", "qwen2_moe", "qwen3", "gemma", "gemma2", "phi", "phi3", "gpt_neox", "stablelm",
    "olmo", "starcoder2", "cohere",
})
# Architectures whose transformers causal LM takes a boolean 2D `logits_to_keep` and computes its loss with
# `ForCausalLMLoss` (so `shift_labels` works): each is probed by test_packed_forward_equals_separate.
LABEL_POSITION_MODEL_TYPES = PACKING_MODEL_TYPES | {"bloom", "falcon", "opt", "gpt2"}
PAD_TO_MULTIPLE_OF = 8
MODES = ("pack", "bucket", "padded")


# --- which speed-ups a model supports ---------------------------------------------------------------------------


def _unwrap(model: Any) -> Any:
    """The transformers model under peft / DDP wrappers."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def packing_supported(model: Any) -> bool:
    """True when `model` keeps packed sequences apart given restarting position_ids (or varlen boundaries)."""
    base = _unwrap(model)
    implementation = attention_implementation(base)
    return base.config.model_type in PACKING_MODEL_TYPES and (
        implementation in ("eager", "sdpa", "flex_attention") or is_varlen_attention(implementation)
    )


def varlen_supported(model: Any) -> bool:
    """True when packed micro-batches must go to the model as one flattened row with their boundaries."""
    return packing_supported(model) and is_varlen_attention(attention_implementation(_unwrap(model)))


def label_positions_supported(model: Any) -> bool:
    """True when the model's forward takes a boolean 2D `logits_to_keep` and its loss takes `shift_labels`.

    That is transformers' own causal LM of an architecture in `LABEL_POSITION_MODEL_TYPES` with the standard
    `ForCausalLMLoss`; a hub model that brings its own code (`trust_remote_code`) may index differently, so it is
    left alone.
    """
    base = _unwrap(model)
    own_code = type(base).__module__.startswith("transformers.models.")
    loss_function = getattr(base, "loss_function", None)
    return (own_code and base.config.model_type in LABEL_POSITION_MODEL_TYPES
            and getattr(loss_function, "__name__", "") == "ForCausalLMLoss")


# --- grouping a step's rows -------------------------------------------------------------------------------------


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of indices into `lengths`, each bin's total at most `capacity` (a longer item gets a bin of its own).

    Items are placed longest first, each into the first bin it fits; ties keep their order, so the result is
    deterministic.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    loads: list[int] = []
    for index in order:
        size = lengths[index]
        for b, load in enumerate(loads):
            if load + size <= capacity:
                bins[b].append(index)
                loads[b] += size
                break
        else:
            bins.append([index])
            loads.append(size)
    return bins


def balance(weights: Sequence[int], parts: int) -> list[list[int]]:
    """Split indices into `parts` non-empty groups of about equal total weight (largest first, to the lightest)."""
    order = sorted(range(len(weights)), key=lambda i: -weights[i])
    heap = [(0, part) for part in range(parts)]
    groups: list[list[int]] = [[] for _ in range(parts)]
    for index in order:
        load, part = heapq.heappop(heap)
        groups[part].append(index)
        heapq.heappush(heap, (load + weights[index], part))
    return groups


def pack_step(lengths: Sequence[int], parts: int, pack_len: int) -> list[list[int]]:
    """Split one optimizer step's rows (their lengths) into `parts` micro-batches that pack well into `pack_len` bins.

    The rows are packed into bins first; with at least `parts` bins, whole bins are shared out by token count
    (so each micro-batch packs into full bins); with fewer bins, the rows themselves are shared out. Needs
    `len(lengths) >= parts`; every group is non-empty.
    """
    if len(lengths) < parts:
        raise ValueError(f"{len(lengths)} rows cannot fill {parts} micro-batches")
    bins = first_fit_decreasing(lengths, pack_len)
    if len(bins) >= parts:
        shares = balance([sum(lengths[i] for i in b) for b in bins], parts)
        return [[i for b in share for i in bins[b]] for share in shares]
    return balance(lengths, parts)


def length_buckets(lengths: Sequence[int], parts: int) -> list[list[int]]:
    """Split rows into `parts` contiguous groups of the rows sorted longest first, padded sizes balanced.

    A group's padded size is its row count times its longest row. The smallest cap on that size that lets `parts`
    groups hold every row is found by bisection (a greedy cut is optimal for a cap on sorted rows); groups left
    over are made by halving the largest. Needs `len(lengths) >= parts`; every group is non-empty.
    """
    if len(lengths) < parts:
        raise ValueError(f"{len(lengths)} rows cannot fill {parts} micro-batches")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])

    def cut(cap: int) -> list[list[int]]:
        groups, start = [], 0
        while start < len(order):
            size = max(1, cap // lengths[order[start]])
            groups.append(order[start:start + size])
            start += size
        return groups

    low, high = max(lengths), max(lengths) * len(lengths)
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if len(cut(middle)) <= parts else (middle + 1, high)
    groups = cut(low)
    while len(groups) < parts:
        largest = max(range(len(groups)), key=lambda g: (len(groups[g]) > 1, len(groups[g])))
        group = groups.pop(largest)
        half = len(group) // 2
        groups[largest:largest] = [group[:half], group[half:]]
    return groups


# --- the collators ------------------------------------------------------------------------------------------------


@dataclass
class BatchStats:
    """Tokens the collator saw: real ones and the padded tensor size (batch rows x width)."""

    real_tokens: int = 0
    batch_tokens: int = 0
    micro_batches: int = 0

    def add(self, real: int, total: int) -> None:
        self.real_tokens += real
        self.batch_tokens += total
        self.micro_batches += 1

    @property
    def pad_fraction(self) -> float:
        return 1 - self.real_tokens / self.batch_tokens if self.batch_tokens else 0.0


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _shifted(labels: torch.Tensor) -> torch.Tensor:
    """labels[t + 1] at position t (what position t is trained to predict), -100 after the last position."""
    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def _label_outputs(labels: torch.Tensor, label_positions_only: bool) -> dict[str, torch.Tensor]:
    """`labels` (the model shifts them itself), or with `label_positions_only` the boolean `logits_to_keep` of the
    positions that predict a label and those labels, flattened (`shift_labels`, as `slice_logits_to_keep` flattens)."""
    if not label_positions_only:
        return {"labels": labels}
    shift_labels = _shifted(labels)
    keep = shift_labels != IGNORE_INDEX
    return {"labels": labels, "shift_labels": shift_labels[keep], "logits_to_keep": keep}


@dataclass
class PackingCollator:
    """Packs a micro-batch's rows into bins of at most `pack_len` tokens: input_ids, position_ids, labels.

    Every packed sequence gets position_ids 0, 1, ...; the padding after a bin's last sequence continues that
    sequence's positions (so a batch whose bins hold one sequence each keeps the plain causal fast path) and is
    never a target. No attention mask: the restarting positions are the mask.

    With `varlen` (FlashAttention), the micro-batch becomes ONE row holding every sequence, without padding, plus
    `cu_seq_lens_q/k` (int32 sequence boundaries) and `max_length_q/k` (the longest sequence), which transformers'
    flash path hands to the varlen kernel.
    """

    pad_token_id: int
    pack_len: int
    label_positions_only: bool = False
    pad_to_multiple_of: int = PAD_TO_MULTIPLE_OF
    varlen: bool = False
    stats: BatchStats = field(default_factory=BatchStats)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        lengths = [len(feature["input_ids"]) for feature in features]
        if self.varlen:
            return self._flattened(features, lengths)
        bins = first_fit_decreasing(lengths, self.pack_len)
        width = _round_up(max(sum(lengths[i] for i in b) for b in bins), self.pad_to_multiple_of)
        input_ids = torch.full((len(bins), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(bins), width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((len(bins), width), dtype=torch.long)
        for row, members in enumerate(bins):
            start = 0
            for index in members:
                self._place(features[index], lengths[index], input_ids[row], labels[row], position_ids[row], start)
                start += lengths[index]
            last = lengths[members[-1]]
            position_ids[row, start:] = torch.arange(last, last + width - start)
        self.stats.add(sum(lengths), input_ids.numel())
        return {"input_ids": input_ids, "position_ids": position_ids, "use_cache": False,
                **_label_outputs(labels, self.label_positions_only)}

    @staticmethod
    def _place(feature: dict[str, Any], n: int, input_ids: torch.Tensor, labels: torch.Tensor,
               position_ids: torch.Tensor, start: int) -> None:
        input_ids[start:start + n] = torch.as_tensor(feature["input_ids"])
        labels[start:start + n] = torch.as_tensor(feature["labels"])
        labels[start] = IGNORE_INDEX  # the first token of a sequence is predicted by nothing in it
        position_ids[start:start + n] = torch.arange(n)

    def _flattened(self, features: list[dict[str, Any]], lengths: list[int]) -> dict[str, Any]:
        total = sum(lengths)
        input_ids = torch.empty((1, total), dtype=torch.long)
        labels = torch.empty((1, total), dtype=torch.long)
        position_ids = torch.empty((1, total), dtype=torch.long)
        boundaries = [0]
        for feature, n in zip(features, lengths, strict=True):
            self._place(feature, n, input_ids[0], labels[0], position_ids[0], boundaries[-1])
            boundaries.append(boundaries[-1] + n)
        cu_seq_lens = torch.tensor(boundaries, dtype=torch.int32)
        self.stats.add(total, total)
        return {"input_ids": input_ids, "position_ids": position_ids, "use_cache": False,
                "cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens,
                "max_length_q": max(lengths), "max_length_k": max(lengths),
                **_label_outputs(labels, self.label_positions_only)}


@dataclass
class PaddingCollator:
    """Right-pads a micro-batch to its longest row (a multiple of 8) with an attention mask, and counts padding.

    With `label_positions_only`, also the boolean `logits_to_keep` and the matching `shift_labels`.
    """

    pad_token_id: int
    label_positions_only: bool = False
    pad_to_multiple_of: int = PAD_TO_MULTIPLE_OF
    stats: BatchStats = field(default_factory=BatchStats)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        lengths = [len(feature["input_ids"]) for feature in features]
        width = _round_up(max(lengths), self.pad_to_multiple_of)
        input_ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, (feature, n) in enumerate(zip(features, lengths, strict=True)):
            input_ids[row, :n] = torch.as_tensor(feature["input_ids"])
            labels[row, :n] = torch.as_tensor(feature["labels"])
            attention_mask[row, :n] = 1
        self.stats.add(sum(lengths), input_ids.numel())
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                **_label_outputs(labels, self.label_positions_only)}


class CountingCollator:
    """Wraps another collator (the original recipe's `DataCollatorForSeq2Seq`) and counts real vs padded tokens."""

    def __init__(self, collator: Callable[[list[dict[str, Any]]], dict[str, Any]]) -> None:
        self.collator = collator
        self.stats = BatchStats()

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(features)
        self.stats.add(sum(len(feature["input_ids"]) for feature in features), batch["input_ids"].numel())
        return batch


# --- which rows go into which micro-batch -----------------------------------------------------------------------


class StepBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Yields micro-batches (lists of row indices), `micro_batches_per_step` per optimizer step and process.

    Row order: `torch.randperm(n)` seeded with `seed + epoch`, the permutation of the Trainer's own random sampler
    (accelerate's `SeedableRandomSampler` with `data_seed`), so step k holds the same rows as under the original
    recipe. Each step's `rows_per_step` rows (over all processes) are split into `micro_batches_per_step x
    world_size` micro-batches: packed groups (`pack_len` given) or contiguous length buckets, ordered by cost and
    dealt slot by slot, so that in each slot every process gets one of about the same cost. The micro-batches come
    out interleaved, slot by slot, rank 0's then rank 1's ...: accelerate's `BatchSamplerShard` (batch i to process
    i mod world_size) hands each process its own, and on one process nothing is sharded.

    A last step with fewer rows than micro-batches: one row per micro-batch on a single process; under several
    processes, rows from the start of the epoch are repeated to fill it (as `DistributedSampler` does).
    """

    def __init__(self, lengths: Sequence[int], rows_per_step: int, micro_batches_per_step: int, world_size: int = 1,
                 seed: int = 42, pack_len: int | None = None) -> None:
        if rows_per_step < micro_batches_per_step * world_size:
            raise ValueError(f"{rows_per_step} rows per step cannot fill {micro_batches_per_step} micro-batches on "
                             f"each of {world_size} processes")
        self.lengths = list(lengths)
        self.rows_per_step = rows_per_step
        self.micro_batches_per_step = micro_batches_per_step
        self.world_size = world_size
        self.seed = seed
        self.pack_len = pack_len
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.lengths) / self.rows_per_step)

    def order(self, epoch: int | None = None) -> list[int]:
        """The epoch's row order: the Trainer's random permutation for `data_seed`."""
        generator = torch.Generator()
        generator.manual_seed(self.seed + (self.epoch if epoch is None else epoch))
        return torch.randperm(len(self.lengths), generator=generator).tolist()

    def step_micro_batches(self, rows: list[int], order: list[int]) -> list[list[list[int]]]:
        """One optimizer step's rows as micro-batches: `[slot][rank] -> row indices`."""
        parts = self.world_size * self.micro_batches_per_step
        if len(rows) < parts:
            if self.world_size == 1:
                return [[[row]] for row in rows]
            rows = rows + (order * math.ceil(parts / len(order)))[: parts - len(rows)]
        lengths = [self.lengths[i] for i in rows]
        if self.pack_len is None:
            groups = length_buckets(lengths, parts)
            cost = [len(g) * max(lengths[i] for i in g) for g in groups]
        else:
            groups = pack_step(lengths, parts, self.pack_len)
            cost = [sum(lengths[i] for i in g) for g in groups]
        ranked = [groups[g] for g in sorted(range(parts), key=lambda g: -cost[g])]
        return [[[rows[i] for i in ranked[slot * self.world_size + rank]] for rank in range(self.world_size)]
                for slot in range(self.micro_batches_per_step)]

    def __iter__(self) -> Iterator[list[int]]:
        order = self.order()
        for start in range(0, len(order), self.rows_per_step):
            for slot in self.step_micro_batches(order[start:start + self.rows_per_step], order):
                yield from slot

    def __len__(self) -> int:
        full, tail = divmod(len(self.lengths), self.rows_per_step)
        per_step = self.micro_batches_per_step * self.world_size
        if not tail:
            return full * per_step
        return full * per_step + (min(self.micro_batches_per_step, tail) if self.world_size == 1 else per_step)


class SamplerEpoch(TrainerCallback):
    """Sets the sampler's epoch from the Trainer's step count at the start of each epoch.

    The Trainer sets a sampler's epoch itself only where it can reach it: after a resume inside an epoch, several
    processes deep (accelerate's `SkipBatchSampler` around its `BatchSamplerShard`), it cannot, and the sampler
    would replay the first epoch's order. The epoch is the Trainer's own `global_step // steps per epoch`.
    """

    def __init__(self, sampler: StepBatchSampler) -> None:
        self.sampler = sampler

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.sampler.set_epoch(state.global_step // self.sampler.steps_per_epoch)


# --- the plan finetune.py follows -------------------------------------------------------------------------------


@dataclass
class BatchingPlan:
    """How training batches are built: the mode, its collator and (except `padded`) its sampler's settings."""

    mode: str  # pack | bucket | padded
    collator: Any
    micro_batches_per_step: int  # per process: the Trainer's gradient_accumulation_steps
    rows_per_step: int
    pack_len: int | None = None
    label_positions_only: bool = False
    seed: int = 42
    reason: str = ""  # why this mode (e.g. why not packing)
    notes: list[str] = field(default_factory=list)

    @property
    def stats(self) -> BatchStats:
        return self.collator.stats

    @property
    def varlen(self) -> bool:
        return bool(getattr(self.collator, "varlen", False))

    def sampler(self, lengths: Sequence[int], world_size: int = 1) -> StepBatchSampler | None:
        """The batch sampler for `pack` and `bucket` (every process's micro-batches, interleaved); None (the
        Trainer's random sampler) for `padded`."""
        if self.mode == "padded":
            return None
        return StepBatchSampler(
            lengths, rows_per_step=self.rows_per_step, micro_batches_per_step=self.micro_batches_per_step,
            world_size=world_size, seed=self.seed, pack_len=self.pack_len if self.mode == "pack" else None,
        )

    def describe(self) -> str:
        if self.mode == "padded":
            return "batching: random micro-batches padded to their longest row (the original recipe, --packing False)"
        if self.mode == "pack" and self.varlen:
            layout = "each micro-batch flattened into one row (FlashAttention varlen: cu_seq_lens per sequence)"
        elif self.mode == "pack":
            layout = f"packed into rows of at most {self.pack_len} tokens (position_ids restart per sequence)"
        else:
            layout = "length-bucketed micro-batches padded to their own longest row"
        head = ", logits and loss on label positions only" if self.label_positions_only else ""
        why = f" ({self.reason})" if self.reason else ""
        return (f"batching: {self.rows_per_step} rows per optimizer step, {layout}, "
                f"{self.micro_batches_per_step} micro-batches per step per process{head}{why}")


def batching_problems(pack_len: int, cutoff_len: int, micro_batch_tokens: int) -> list[str]:
    """--pack_len: 0 (= cutoff_len) or at least cutoff_len (a row must fit in a bin)."""
    if 0 < pack_len < cutoff_len:
        return [f"--pack_len {pack_len} is shorter than --cutoff_len {cutoff_len}: a row must fit in one"]
    return []


def micro_batches_per_step(lengths: Sequence[int], batch_size: int, micro_batch_size: int, world_size: int = 1,
                           packing: bool = True, micro_batch_tokens: int = 0) -> int:
    """Micro-batches per optimizer step and process (the Trainer's gradient_accumulation_steps), known before any
    weights load: the original recipe's `batch_size / (micro_batch_size x world_size)`, or with packing more when
    a micro-batch would hold more than `micro_batch_tokens` tokens, never more than the rows a process gets."""
    accumulation = max(1, batch_size // (micro_batch_size * world_size))
    if not packing:
        return accumulation
    per_step = max(1, batch_size // world_size)
    if micro_batch_tokens and lengths:
        expected = per_step * sum(lengths) / len(lengths)
        accumulation = max(accumulation, math.ceil(expected / micro_batch_tokens))
    return min(accumulation, per_step)


def plan_batching(
    model: Any,
    lengths: Sequence[int],
    pad_token_id: int,
    batch_size: int,
    micro_batch_size: int,
    cutoff_len: int,
    world_size: int = 1,
    packing: bool = True,
    pack_len: int = 0,
    micro_batch_tokens: int = 0,
    seed: int = 42,
    padded_collator: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None,
) -> BatchingPlan:
    """Choose how to batch the training rows (`lengths`: tokens per row) for `model`.

    `packing=False`: the original recipe (random micro-batches of `micro_batch_size` rows, padded;
    `padded_collator`, default right padding to a multiple of 8). Otherwise packing where the architecture supports
    it (one flattened row per micro-batch under FlashAttention), else length buckets. Micro-batches per step:
    `micro_batches_per_step`.
    """
    raise_problems(batching_problems(pack_len, cutoff_len, micro_batch_tokens))
    accumulation = micro_batches_per_step(lengths, batch_size, micro_batch_size, world_size, packing,
                                          micro_batch_tokens)
    if not packing:
        collator = CountingCollator(padded_collator or PaddingCollator(pad_token_id))
        return BatchingPlan("padded", collator, accumulation, batch_size, seed=seed)
    pack_len = pack_len or cutoff_len
    label_only = label_positions_supported(model)
    if packing_supported(model):
        varlen = varlen_supported(model)
        if not varlen and getattr(_unwrap(model).config, "use_cache", False):  # the batches say so too
            raise ValueError("packed batches need the model's config.use_cache False: with a cache, transformers "
                             "does not look for packed sequences in position_ids and they would see each other")
        collator = PackingCollator(pad_token_id, pack_len, label_only, varlen=varlen)
        return BatchingPlan("pack", collator, accumulation, batch_size, pack_len, label_only, seed)
    base = _unwrap(model)
    reason = (f"{base.config.model_type} takes positions from the attention mask (ALiBi), so packed rows would see "
              "each other" if base.config.model_type == "bloom" else
              f"packing is not verified for {base.config.model_type} with {attention_implementation(base)} attention")
    collator = PaddingCollator(pad_token_id, label_only)
    return BatchingPlan("bucket", collator, accumulation, batch_size, None, label_only, seed, reason)


# --- the Trainer side ---------------------------------------------------------------------------------------------


class BatchingMixin:
    """Trainer mixin: train on a `BatchingPlan` (its sampler and collator); evaluation keeps `data_collator`.

    `Trainer(..., batching=plan)`; without a plan the Trainer is unchanged. It overrides `get_train_dataloader`,
    the Trainer's documented hook for a custom training DataLoader.
    """

    def __init__(self, *args: Any, batching: BatchingPlan | None = None, **kwargs: Any) -> None:
        self.batching = batching
        super().__init__(*args, **kwargs)

    def get_train_dataloader(self) -> Any:
        if self.batching is None:
            return super().get_train_dataloader()
        if self.batching.mode == "padded":  # the Trainer's own random sampler, with the counting collator
            evaluation_collator, self.data_collator = self.data_collator, self.batching.collator
            try:
                return super().get_train_dataloader()
            finally:
                self.data_collator = evaluation_collator
        from torch.utils.data import DataLoader
        from transformers.trainer_utils import seed_worker

        lengths = [len(ids) for ids in self.train_dataset["input_ids"]]
        sampler = self.batching.sampler(lengths, max(1, self.args.world_size))
        self.remove_callback(SamplerEpoch)  # a dataloader built again gets a callback for its own sampler
        self.add_callback(SamplerEpoch(sampler))
        workers = self.args.dataloader_num_workers
        extra = {"persistent_workers": self.args.dataloader_persistent_workers,
                 "prefetch_factor": self.args.dataloader_prefetch_factor} if workers else {}
        loader = DataLoader(
            self.train_dataset, batch_sampler=sampler, collate_fn=self.batching.collator, num_workers=workers,
            pin_memory=self.args.dataloader_pin_memory,
            worker_init_fn=partial(seed_worker, num_workers=workers, rank=self.args.process_index), **extra,
        )
        return self.accelerator.prepare(loader)  # several processes: BatchSamplerShard hands each its own
