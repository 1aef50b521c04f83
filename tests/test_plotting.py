"""utils/training/plotting.py: loss.png from a log_history, and the callback that writes it during training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from utils.core.errors import UserError
from utils.training.plotting import LOSS_PNG, LossPlotCallback, PlotArgs, loss_series, main, plot_loss, run_title

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# What Trainer.state.log_history looks like: training logs, evaluations, an evaluation repeated after training
# at the same step, and the final summary (train_loss is not a point of the curve).
LOG_HISTORY = [
    {"loss": 4.1, "grad_norm": 0.5, "learning_rate": 0.003, "epoch": 0.33, "step": 1},
    {"loss": 3.9, "grad_norm": 0.5, "learning_rate": 0.002, "epoch": 0.67, "step": 2},
    {"eval_loss": 4.2, "eval_runtime": 0.04, "epoch": 0.67, "step": 2},
    {"loss": 3.7, "grad_norm": 0.6, "learning_rate": 0.001, "epoch": 1.0, "step": 3},
    {"loss": 3.5, "grad_norm": 0.6, "learning_rate": 0.0005, "epoch": 1.33, "step": 4},
    {"eval_loss": 3.95, "eval_runtime": 0.04, "epoch": 1.33, "step": 4},
    {"train_runtime": 11.0, "train_loss": 3.8, "epoch": 1.33, "step": 4},
    {"eval_loss": 3.95, "eval_runtime": 0.05, "epoch": 1.33, "step": 4},
]


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_loss_series_separates_training_and_validation():
    train, val = loss_series(LOG_HISTORY)
    assert train == [(1, 4.1), (2, 3.9), (3, 3.7), (4, 3.5)]
    assert val == [(2, 4.2), (4, 3.95)]


def test_plot_loss_writes_a_png(tmp_path):
    path = plot_loss(LOG_HISTORY, tmp_path / "run" / LOSS_PNG, "lr=0.003, batch=8")
    assert path == tmp_path / "run" / LOSS_PNG
    width, height = png_size(path)
    assert (width, height) == (800, 450)
    assert path.stat().st_size > 5000  # a drawn figure, not an empty canvas


def test_plot_loss_draws_nothing_without_losses(tmp_path):
    assert plot_loss([{"train_runtime": 1.0, "step": 0}], tmp_path / LOSS_PNG) is None
    assert not (tmp_path / LOSS_PNG).exists()


def test_callback_writes_on_save_and_train_end_on_the_main_process_only(tmp_path):
    from transformers import TrainerControl, TrainerState

    callback = LossPlotCallback(tmp_path, title="test run")
    state = TrainerState(is_world_process_zero=False)
    state.log_history = list(LOG_HISTORY[:3])
    callback.on_save(None, state, TrainerControl())
    assert not (tmp_path / LOSS_PNG).exists()

    state.is_world_process_zero = True
    callback.on_save(None, state, TrainerControl())
    first = (tmp_path / LOSS_PNG).read_bytes()
    state.log_history = list(LOG_HISTORY)
    callback.on_train_end(None, state, TrainerControl())
    png_size(tmp_path / LOSS_PNG)
    assert (tmp_path / LOSS_PNG).read_bytes() != first  # redrawn with the later points


def test_run_title_names_the_key_parameters():
    title = run_title({"base_model": "/models/llama-7b-hf", "data_path": "data/llama_data.json", "learning_rate": 3e-4,
                       "batch_size": 128, "micro_batch_size": 4, "lora_r": 8, "wandb_project": ""})
    assert title == "base=llama-7b-hf, data=llama_data.json, lr=0.0003, batch=128, micro=4, r=8"


def test_cli_draws_from_a_checkpoint(tmp_path):
    checkpoint = tmp_path / "checkpoint-4"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text(json.dumps({"log_history": LOG_HISTORY}), encoding="utf-8")
    main(PlotArgs(str(checkpoint)))
    png_size(checkpoint / LOSS_PNG)
    (tmp_path / "broken.json").write_text("{}", encoding="utf-8")
    with pytest.raises(UserError, match="log_history"):
        main(PlotArgs(str(tmp_path / "broken.json")))


def test_run_title_shows_steps_when_max_steps_set_the_length():
    args = {"learning_rate": 3e-4, "batch_size": 128, "num_epochs": 3, "lora_r": 8}
    assert "epochs=3" in run_title({**args, "max_steps": -1}) and "steps=" not in run_title({**args, "max_steps": -1})
    title = run_title({**args, "max_steps": 50})
    assert "steps=50" in title and "epochs" not in title
