"""A gradio chat page to try a base model with a BenTsao LoRA adapter.

    python generate.py --base_model models/tiny-llama --lora_weights lora-bentsao --prompt_template med_template
    python generate.py --base_model ... --lora_weights lora-literature --prompt_template literature_template

Then open http://127.0.0.1:7860. The page has a question box (and an optional input box), the generation
settings (sampling on/off, temperature, top-p, top-k, beams, max new tokens, repetition penalty) and streams the
answer as it is generated (beam search, `beams` > 1, shows it when complete). With `literature_template` the
chat is multi-turn: earlier turns are kept in the shape the literature data was trained on
(` <user>: q1 <bot>: a1 <user>: q2`), and the oldest turns are dropped when the prompt would not leave room for
the answer. Other templates answer each question on its own, as they were trained.

Enter sends the question, Shift+Enter starts a new line. Stop ends the answer where it is and keeps it in the
conversation; Clear starts a new conversation.

The server listens on 127.0.0.1 only, unless `--server_name 0.0.0.0` says otherwise; `--share_gradio True`
asks gradio for a public link (off by default); `--auth user:password` asks for a login. Research use only:
the answers are not medical advice.
"""

import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from utils.core.cli import flag, run_cli
from utils.core.errors import raise_problems
from utils.generation.args import GenerationArgs, ModelArgs
from utils.generation.dialogue import Chat, context_length
from utils.prompter import template_problems
from utils.runtime import parse_device_map

if TYPE_CHECKING:
    import gradio as gr

SINGLE_TURN_NOTE = ("ℹ️ 此模板为单轮问答：每个问题单独回答，模型看不到之前的对话。"
                    "(This template is single-turn: each question is answered on its own; the model does not see "
                    "the earlier turns.)")
MULTI_TURN_NOTE = ("ℹ️ 多轮对话：之前的问答按文献训练数据的格式拼入提示。"
                   "(Multi-turn: earlier turns go into the prompt in the training data's shape.)")
KEYS_HINT = "Enter 发送，Shift+Enter 换行 (Enter sends, Shift+Enter starts a new line)"
DISCLAIMER = "仅供研究使用，回答不构成医疗建议；身体不适请及时就医。(Research use only; not medical advice.)"


def parse_auth(auth: str) -> tuple[str, str] | None:
    """`user:password` as gradio's (user, password); None when no login is asked for (or it is malformed: see
    `validate`)."""
    user, _, password = auth.partition(":")
    return (user, password) if user and password else None


def generation_controls(gr: Any, defaults: GenerationArgs) -> list[Any]:
    """The generation settings panel; its controls in the order `ChatSessions.respond` takes them."""
    with gr.Accordion("生成参数 (generation settings)", open=False):
        with gr.Row():
            do_sample = gr.Checkbox(value=defaults.do_sample, label="采样 (sample; else greedy/beam search)")
            temperature = gr.Slider(0.01, 2.0, value=defaults.temperature, step=0.01, label="temperature")
            top_p = gr.Slider(0.0, 1.0, value=defaults.top_p, step=0.01, label="top-p")
            top_k = gr.Slider(0, 200, value=defaults.top_k, step=1, label="top-k")
        with gr.Row():
            num_beams = gr.Slider(1, max(8, defaults.num_beams), value=defaults.num_beams, step=1,
                                  label="beams (>1: shown when complete, not streamed)")
            max_new_tokens = gr.Slider(1, max(2048, defaults.max_new_tokens), value=defaults.max_new_tokens,
                                       step=1, label="max new tokens")
            min_new_tokens = gr.Slider(0, max(256, defaults.min_new_tokens), value=defaults.min_new_tokens,
                                       step=1, label="min new tokens")
            repetition_penalty = gr.Slider(1.0, 2.0, value=defaults.repetition_penalty, step=0.01,
                                           label="repetition penalty")
    return [do_sample, temperature, top_p, top_k, num_beams, max_new_tokens, min_new_tokens, repetition_penalty]


def build_demo(model: Any, chat: Chat, chat_context: int, title: str, defaults: GenerationArgs) -> "gr.Blocks":
    """The gradio page: chat, question (+ input) boxes, buttons, generation settings; the behaviour is
    utils/generation/webchat.py's."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry or version check leaves the machine
    import gradio as gr

    from utils.generation.webchat import ChatSessions

    sessions = ChatSessions(model, chat, chat_context)
    with gr.Blocks(title="BenTsao 本草", analytics_enabled=False) as demo:
        gr.Markdown(f"## BenTsao 本草 · 医学问答\n{title}\n\n{DISCLAIMER}")
        mode = "多轮对话 (multi-turn)" if chat.multi_turn else "单轮问答 (single-turn)"
        gr.Markdown(MULTI_TURN_NOTE if chat.multi_turn else SINGLE_TURN_NOTE, elem_id="mode-note")
        chatbot = gr.Chatbot(label=f"对话 · {mode}", elem_id="chat", height=420)
        turns_state = gr.State([])
        with gr.Row():
            # lines=1 with room to grow: gradio then sends on Enter and starts a new line on Shift+Enter (a box of
            # lines > 1 does the reverse, which no chat app does)
            question = gr.Textbox(label="问题 (question)", lines=1, max_lines=8, scale=4, elem_id="question",
                                  placeholder=f"例如：高血压患者日常生活中需要注意什么？ · {KEYS_HINT}")
            extra_input = gr.Textbox(label="补充信息 (input, 可选)", lines=1, max_lines=8, scale=2, elem_id="input",
                                     visible=not chat.multi_turn)
        with gr.Row():
            submit = gr.Button("提交 (submit)", variant="primary", elem_id="submit")
            stop = gr.Button("停止 (stop)", elem_id="stop")
            clear = gr.Button("清空对话 (clear)", elem_id="clear")
        inputs = [question, extra_input, turns_state, *generation_controls(gr, defaults)]
        outputs = [chatbot, turns_state, question]
        for trigger in (submit.click, question.submit, extra_input.submit):
            trigger(sessions.respond, inputs, outputs)
        stop.click(sessions.stop_answer, None, None, concurrency_limit=None)
        clear.click(sessions.clear_chat, None, outputs, concurrency_limit=None)
    demo.queue(default_concurrency_limit=1)  # one generation at a time on the one model
    return demo


def port_problems(server_name: str, server_port: int) -> list[str]:
    """Another program already listens on the address (found before the model loads)."""
    import socket

    try:
        infos = socket.getaddrinfo(server_name, server_port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        return [f"--server_name {server_name}: not an address of this machine ({error.strerror})"]
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        try:
            probe.bind(address)
        except OSError as error:
            return [f"cannot listen on {server_name}:{server_port} ({error.strerror}); another program uses it: "
                    + "choose another --server_port"]
    return []


@dataclass(frozen=True)
class GenerateArgs(ModelArgs, GenerationArgs):
    """The flags of generate.py; the generation flags are the page's initial settings."""

    num_beams: int = flag(1, "beam search width (1: greedy or sampling; answers stream only then)", low=1)
    repetition_penalty: float = flag(1.1, "> 1 discourages repeating tokens", above=0)
    prompt_template: str = flag("med_template", "a name in templates/ or a path; a multi_turn template keeps history")
    server_name: str = flag("127.0.0.1", "address to listen on; 0.0.0.0 exposes the page to the network")
    server_port: int = flag(7860, "port to listen on", low=1, high=65535)
    share_gradio: bool = flag(False, "ask gradio for a public share link (off: nothing leaves this machine)")
    auth: str = flag("", "user:password to require a login")
    device_map: str = flag("", "auto: spread a large model over all GPUs (then CPU RAM); or a device, e.g. cuda:1")


def validate(args: GenerateArgs) -> list[str]:
    problems = args.generation_problems()
    if args.auth and parse_auth(args.auth) is None:
        problems.append("--auth must look like user:password")
    problems += port_problems(args.server_name, args.server_port)
    return problems + args.model_problems() + template_problems(args.prompt_template)


def main(args: GenerateArgs) -> None:
    """Serve the chat page until interrupted."""
    device_map = parse_device_map(args.device_map)
    raise_problems(validate(args))
    login = parse_auth(args.auth)
    model, tokenizer, device, prompter = args.load(args.prompt_template, device_map)
    context = context_length(model, tokenizer)
    chat = Chat(prompter, tokenizer, context - args.max_new_tokens)
    adapter = f"adapter `{args.lora_weights}`" if args.use_lora else "no adapter"
    title = f"base `{args.base_model}` · {adapter} · template `{args.prompt_template}` · {device}"
    demo = build_demo(model, chat, context, title, args)
    server_name = args.server_name
    if server_name not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {server_name}, so other machines can reach this page"
              + ("" if login else "; consider --auth user:password"), file=sys.stderr, flush=True)
    # quiet: gradio's own banner would advise `share=True` in `launch()`, which is no flag of this script
    demo.launch(server_name=server_name, server_port=args.server_port, share=args.share_gradio, auth=login,
                show_error=True, quiet=True, prevent_thread_lock=True)
    print(f"* Running on local URL:  {demo.local_url}", flush=True)
    if demo.share_url:
        print(f"* Running on public URL: {demo.share_url} (anyone with the link reaches this page)", flush=True)
    elif args.share_gradio:
        print("warning: gradio could not create a public link (no network?); the page is local only",
              file=sys.stderr, flush=True)
    else:
        print("* Only this machine can open it; --server_name 0.0.0.0 serves your network, --share_gradio True asks "
              "gradio for a public link", flush=True)
    demo.block_thread()


if __name__ == "__main__":
    run_cli(main)
