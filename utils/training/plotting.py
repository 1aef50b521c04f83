"""The loss curve of a training run: `loss.png` with training and validation loss against the optimizer step.

`LossPlotCallback` redraws it in the output folder at every checkpoint and at the end of training (main
process only); `plot_loss` draws one from any `log_history`, e.g. a checkpoint's `trainer_state.json`:

    python -m utils.plotting lora-bentsao/checkpoint-200/trainer_state.json lora-bentsao/loss.png

matplotlib runs with its headless Agg backend, so no display is needed.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from utils.core.cli import flag

LOSS_PNG = "loss.png"


def loss_series(log_history: Iterable[Mapping[str, Any]]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(training, validation) points as (step, loss), from the Trainer's `log_history`.

    Training points are the entries with `loss` (the final summary's `train_loss` is not one); validation
    points the entries with `eval_loss`. A step logged twice (e.g. the evaluation repeated after training)
    keeps its last value.
    """
    train: dict[int, float] = {}
    val: dict[int, float] = {}
    for entry in log_history:
        step = entry.get("step")
        if not isinstance(step, int):
            continue
        if isinstance(entry.get("loss"), (int, float)):
            train[step] = float(entry["loss"])
        if isinstance(entry.get("eval_loss"), (int, float)):
            val[step] = float(entry["eval_loss"])
    return sorted(train.items()), sorted(val.items())


def plot_loss(log_history: Iterable[Mapping[str, Any]], path: str | Path, title: str = "") -> Path | None:
    """Draw training and validation loss against step into `path` (PNG); None when there is nothing to draw."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    train, val = loss_series(log_history)
    if not train and not val:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axes = plt.subplots(figsize=(8, 4.5), dpi=100)
    try:
        if train:
            axes.plot(
                *zip(*train, strict=False),
                label="training loss",
                color="tab:blue",
                linewidth=1.2,
                marker="." if len(train) < 50 else None,
            )
        if val:
            axes.plot(*zip(*val, strict=False), label="validation loss", color="tab:orange", linewidth=1.8, marker="o")
        axes.set_xlabel("optimizer step")
        axes.set_ylabel("loss")
        axes.grid(True, alpha=0.3)
        axes.legend()
        if title:
            axes.set_title(textwrap.fill(title, width=95), fontsize=9)
        figure.tight_layout()
        figure.savefig(path)
    finally:
        plt.close(figure)
    return path


def run_title(args: Mapping[str, Any] | Any) -> str:
    """A plot title from a run's key parameters (the names finetune.py uses; absent ones are left out). `--max_steps`
    replaces the epochs when it set the length of the run."""
    if not isinstance(args, Mapping):
        args = vars(args)
    if isinstance(args.get("max_steps"), int) and args["max_steps"] > 0:
        args = {**args, "num_epochs": None, "max_steps_shown": args["max_steps"]}
    names = [
        ("base_model", "base"),
        ("data_path", "data"),
        ("prompt_template_name", "template"),
        ("learning_rate", "lr"),
        ("batch_size", "batch"),
        ("micro_batch_size", "micro"),
        ("num_epochs", "epochs"),
        ("max_steps_shown", "steps"),
        ("lora_r", "r"),
        ("lora_alpha", "alpha"),
        ("cutoff_len", "cutoff"),
    ]
    parts = []
    for key, short in names:
        value = args.get(key)
        if value in (None, ""):
            continue
        if key in ("base_model", "data_path"):
            value = Path(str(value)).name or value
        parts.append(f"{short}={value}")
    return ", ".join(parts)


class LossPlotCallback(TrainerCallback):
    """Writes `output_dir/loss.png` at each save and at the end of training, on the main process only."""

    def __init__(self, output_dir: str | Path, title: str = "") -> None:
        self.path = Path(output_dir) / LOSS_PNG
        self.title = title

    def _draw(self, state) -> None:
        if not state.is_world_process_zero:
            return
        plot_loss(state.log_history, self.path, self.title)

    def on_save(self, args, state, control, **kwargs):
        self._draw(state)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self._draw(state)
        return control


@dataclass(frozen=True)
class PlotArgs:
    """The flags of `python -m utils.training.plotting`."""

    trainer_state: str = flag("", "a checkpoint-N folder, or its trainer_state.json")
    output: str = flag("", "where to write the PNG (default: loss.png beside trainer_state.json)")
    title: str = flag("", "the plot's title (default: the checkpoint folder's name)")


def main(args: PlotArgs) -> None:
    """Draw `loss.png` from a checkpoint's trainer_state.json (default: next to it)."""
    from utils.core.errors import UserError

    source = Path(args.trainer_state)
    if source.is_dir():
        source = source / "trainer_state.json"
    try:
        history = json.loads(source.read_text(encoding="utf-8"))["log_history"]
    except (OSError, json.JSONDecodeError, KeyError) as error:
        raise UserError(f"{source}: not a readable trainer_state.json with a log_history ({error})") from None
    written = plot_loss(history, args.output or source.parent / LOSS_PNG, args.title or source.parent.name)
    if written is None:
        raise UserError(f"{source}: the log_history holds no loss to draw")
    print(f"wrote {written}")


if __name__ == "__main__":
    from utils.core.cli import run_cli

    run_cli(main)
