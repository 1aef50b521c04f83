"""The multi-turn shape of the BenTsao literature data: ` <user>: q1 <bot>: a1 <user>: q2`."""

from __future__ import annotations

from collections.abc import Callable, Sequence

USER, BOT = "<user>", "<bot>"


def render_dialogue(history: Sequence[tuple[str, str]], question: str) -> str:
    """The instruction for the next answer: earlier (question, answer) turns, then the new question.

    Each turn starts with a space, exactly as in the published `liver_cancer.json`.
    """
    turns = "".join(f" {USER}: {asked} {BOT}: {answered}" for asked, answered in history)
    return f"{turns} {USER}: {question}"


def fit_history(
    history: Sequence[tuple[str, str]],
    question: str,
    prompt_length: Callable[[str], int],
    budget: int,
) -> list[tuple[str, str]]:
    """Drop the oldest turns until the prompt for `question` is at most `budget` tokens (the new question stays)."""
    kept = list(history)
    while kept and prompt_length(render_dialogue(kept, question)) > budget:
        kept.pop(0)
    return kept
