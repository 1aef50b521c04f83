"""The Trainer finetune.py runs: transformers' `Trainer` with this project's batch layout (`BatchingMixin`) and
every micro-batch's loss shown to a `DivergenceGuard`.

Checkpoints are transformers' own; which ones are complete is decided in `utils.training.checkpoints` (the Trainer
writes `trainer_state.json` last), and the final adapter is published atomically by finetune.py.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer

from utils.training.batching import BatchingMixin
from utils.training.callbacks import DivergenceGuard


class LayoutTrainer(BatchingMixin, Trainer):
    """transformers' `Trainer` plus two things: its training batches come from a `BatchingPlan` (packed, bucketed or
    the original padded layout), and each micro-batch's loss is shown to the `DivergenceGuard` callback."""

    def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, DivergenceGuard):
                callback.observe_loss(loss)
        return loss
