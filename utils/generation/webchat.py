"""The chat page's behaviour, apart from its layout (generate.py): one answer streamed per browser session, Stop
that keeps the partial answer, Clear that drops it, and the turns kept in the shape the template was trained on.

Imports gradio when imported: only generate.py's page loads this module.
"""

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from utils.generation.args import GenerationArgs
from utils.generation.dialogue import Chat
from utils.generation.engine import stream_answer

NO_TEXT = "（模型没有生成任何文字 / the model produced no text; try sampling or min new tokens）"
STOPPED = "（已停止 / stopped）"


def one_line(text: str) -> str:
    """A reply as the literature data keeps it in the history: one line, single spaces."""
    return " ".join(text.split())


def chat_messages(turns: list[dict[str, str]]) -> list[dict[str, str]]:
    """The chatbot's messages for the turns so far."""
    messages: list[dict[str, str]] = []
    for turn in turns:
        shown = turn["question"] + (f"\n\n{turn['input']}" if turn.get("input") else "")
        messages.append({"role": "user", "content": shown})
        messages.append({"role": "assistant", "content": turn["answer"]})
    return messages


@dataclass
class Generation:
    """One answer being generated for one browser session: Stop sets `stop` (and `stopped_by_user`); Clear also sets
    `discard`, and nothing more of the answer is shown."""

    stop: threading.Event = field(default_factory=threading.Event)
    stopped_by_user: bool = False
    discard: bool = False


class ChatSessions:
    """The page's event handlers. Stop and Clear reach the running answer through `running` (by browser session),
    not by cancelling the event: a cancelled event loses its last turn and can leave gradio's red "Error" on the
    chat; they never wait for the model."""

    def __init__(self, model: Any, chat: Chat, chat_context: int) -> None:
        self.model, self.chat, self.chat_context = model, chat, chat_context
        self.running: dict[str, Generation] = {}

    def respond(self, question: str, extra_input: str, turns: list[dict[str, str]], do_sample: bool,
                temperature: float, top_p: float, top_k: int, num_beams: int, max_new_tokens: int,
                min_new_tokens: int, repetition_penalty: float, request: gr.Request):
        """Stream the answer to `question` into the chat; yields (chat messages, turns, question box). The
        parameters are the page's inputs in order (gradio passes `request` by its annotation)."""
        turns = list(turns or [])
        question, extra_input = (question or "").strip(), (extra_input or "").strip()
        settings = GenerationArgs(
            max_new_tokens=int(max_new_tokens), min_new_tokens=min(int(min_new_tokens), int(max_new_tokens)),
            num_beams=int(num_beams), do_sample=bool(do_sample), temperature=float(temperature), top_p=float(top_p),
            top_k=int(top_k), repetition_penalty=float(repetition_penalty),
        )
        prompt = self.prompt(question, extra_input, turns, settings)
        if prompt is None:
            yield chat_messages(turns), turns, question
            return
        current = {"question": question, "input": "" if self.chat.multi_turn else extra_input, "answer": ""}
        run = self.running[request.session_hash] = Generation()
        try:
            yield chat_messages(turns + [current]), turns, ""
            for text in stream_answer(self.model, self.chat.tokenizer, prompt, settings.config(self.chat.tokenizer),
                                      run.stop):
                if run.discard:
                    return
                current["answer"] = text
                yield chat_messages(turns + [current]), turns, ""
        except RuntimeError as error:
            logging.getLogger(__name__).error("%s", error)
            current["answer"] = f"⚠️ {error}"
            yield chat_messages(turns + [current]), turns, ""
            return
        finally:
            run.stop.set()  # also when the page goes away mid-answer (closed tab): generation ends
            if self.running.get(request.session_hash) is run:
                del self.running[request.session_hash]
        if not run.discard:
            turns = turns + [finished_turn(current, run)]
            yield chat_messages(turns), turns, ""

    def prompt(self, question: str, extra_input: str, turns: list[dict[str, str]],
               settings: GenerationArgs) -> str | None:
        """The prompt with as many earlier turns as fit; None (and a notice on the page) when nothing can be asked."""
        if not question:
            gr.Warning("请输入问题 (type a question first)")
            return None
        history = [(turn["question"], turn["history_answer"]) for turn in turns]
        self.chat.budget = max(1, self.chat_context - settings.max_new_tokens)
        prompt, kept = self.chat.prompt(question, history, extra_input)
        if prompt is None:
            gr.Warning("问题太长，超出了模型的上下文 (the question alone does not fit the model's context)")
        elif self.chat.multi_turn and len(kept) < len(history):
            gr.Info(f"对话过长，最早的 {len(history) - len(kept)} 轮不再计入 (oldest turns dropped to fit the context)")
        return prompt

    def stop_answer(self, request: gr.Request) -> None:
        """Stop: the answer ends where it is and stays in the conversation (no cancelled event, no error)."""
        run = self.running.get(request.session_hash)
        if run is not None:
            run.stopped_by_user = True
            run.stop.set()

    def clear_chat(self, request: gr.Request):
        """Clear: a new conversation; an answer being generated is dropped."""
        run = self.running.get(request.session_hash)
        if run is not None:
            run.discard = True
            run.stop.set()
        return [], [], ""


def finished_turn(current: dict[str, str], run: Generation) -> dict[str, str]:
    """The turn as the conversation keeps it: the answer shown (marked when stopped or empty) and, for the
    history of a multi-turn prompt, on one line."""
    answer = current["answer"].strip()
    shown = (answer or NO_TEXT) + (f" {STOPPED}" if run.stopped_by_user else "")
    return {**current, "answer": shown, "history_answer": one_line(answer)}
