"""The multi-turn shape of the BenTsao literature data (` <user>: q1 <bot>: a1 <user>: q2`), and prompts for a chat."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from utils.prompter import BOT, USER


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


def context_length(model: Any, tokenizer: Any, fallback: int = 2048) -> int:
    """Tokens the model can attend to: the smaller of its position limit and the tokenizer's maximum."""
    limits = [getattr(model.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    limits = [limit for limit in limits if isinstance(limit, int) and 0 < limit < 1_000_000]
    return min(limits) if limits else fallback


class Chat:
    """Prompts for a conversation.

    With a multi-turn template (`"multi_turn": true`, as `literature_template`) the earlier turns go into the
    instruction in the training data's shape and the oldest are dropped until the prompt fits `budget` tokens; any
    other template answers each question on its own, as it was trained.
    """

    def __init__(self, prompter: Any, tokenizer: Any, budget: int) -> None:
        self.prompter = prompter
        self.tokenizer = tokenizer
        self.budget = budget

    @property
    def multi_turn(self) -> bool:
        return self.prompter.multi_turn

    def tokens(self, prompt: str) -> int:
        return len(self.tokenizer(prompt)["input_ids"])

    def prompt(self, question: str, history: Sequence[tuple[str, str]], extra_input: str = "",
               ) -> tuple[str | None, list[tuple[str, str]]]:
        """(the prompt, the history it kept); the prompt is None when the question alone does not fit."""
        if not self.multi_turn:
            prompt = self.prompter.generate_prompt(question, extra_input or None)
            return (prompt if self.tokens(prompt) <= self.budget else None), []
        kept = fit_history(history, question, lambda text: self.tokens(self.prompter.generate_prompt(text)),
                           self.budget)
        prompt = self.prompter.generate_prompt(render_dialogue(kept, question))
        return (prompt if self.tokens(prompt) <= self.budget else None), kept
