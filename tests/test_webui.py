"""generate.py: the gradio chat page, driven in headless Chromium (Playwright) on a tiny base model.

The browser is Debian's `chromium` at /usr/bin/chromium (Playwright's own browser download does not work here);
without it the browser test is skipped. Set BENTSAO_WEBUI_SCREENSHOT=docs/webui.png to keep the screenshot.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
QUESTION = "高血压患者日常生活中需要注意什么？"


@pytest.fixture(scope="module")
def webui_base(tiny_llama) -> Path:
    """The session's tiny LLaMA base (tests/conftest.py builds it with utils.tiny_base); no adapter needed."""
    return tiny_llama


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_page(url: str, process: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"generate.py exited with {process.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as response:
            if response.status == 200 and "Running on local URL" in log.read_text(errors="replace"):
                return  # served, and the banner printed once launch() returns is in the log
        time.sleep(0.5)
    pytest.fail(f"generate.py did not serve {url} within {timeout} s:\n{log.read_text(errors='replace')[-3000:]}")


@pytest.fixture(scope="module")
def webui(webui_base, tmp_path_factory) -> Iterator[dict]:
    """generate.py in a subprocess with its default address, greedy. --min_new_tokens 400: every answer is long
    enough (seconds on the tiny model) to watch it grow and to stop it half-way."""
    port = free_port()
    log = tmp_path_factory.mktemp("webui-log") / "generate.log"
    command = [sys.executable, "generate.py", "--base_model", str(webui_base), "--use_lora", "False",
               "--prompt_template", "med_template", "--server_port", str(port), "--max_new_tokens", "400",
               "--min_new_tokens", "400"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    env.pop("GRADIO_SERVER_NAME", None)
    with open(log, "w") as handle:
        process = subprocess.Popen(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for_page(f"http://127.0.0.1:{port}/", process, log)
        yield {"process": process, "port": port, "url": f"http://127.0.0.1:{port}/", "log": log}
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_listens_on_loopback_only_by_default(webui):
    import psutil

    listening = [conn for conn in psutil.Process(webui["process"].pid).net_connections(kind="inet")
                 if conn.status == psutil.CONN_LISTEN]
    assert any(conn.laddr.port == webui["port"] for conn in listening), listening
    exposed = [conn.laddr for conn in listening if not ipaddress.ip_address(conn.laddr.ip).is_loopback]
    assert exposed == [], f"generate.py listens on non-loopback addresses by default: {exposed}"


def test_banner_names_this_scripts_flags_not_gradios(webui):
    log = webui["log"].read_text(errors="replace")
    assert f"Running on local URL:  http://127.0.0.1:{webui['port']}" in log
    assert "--share_gradio True" in log
    assert "share=True" not in log  # gradio's own advice, about its launch() call


# Records the length of the newest answer each time the chat changes: (answers on the page, its length).
WATCH_ANSWERS = """() => {
    window.answerLengths = [];
    const chat = document.querySelector('#chat');
    const record = () => {
        const answers = chat.querySelectorAll('[data-testid="bot"]');
        const length = answers.length ? answers[answers.length - 1].innerText.trim().length : 0;
        const seen = window.answerLengths, last = seen[seen.length - 1];
        if (!last || last[0] !== answers.length || last[1] !== length) seen.push([answers.length, length]);
    };
    new MutationObserver(record).observe(chat, {subtree: true, childList: true, characterData: true});
}"""
# True once the answer number `n` has been seen with three different, growing, non-empty lengths.
ANSWER_GREW = """(n) => {
    const lengths = window.answerLengths.filter(([count, length]) => count === n && length > 0).map(([, l]) => l);
    return lengths.length >= 3 && lengths.every((length, i) => i === 0 || length > lengths[i - 1]);
}"""


def ask_with_enter_and_stop_half_way(page, question: str, number: int) -> None:
    """Type `question`, press Enter, watch answer `number` grow, press Stop, wait until it is marked stopped."""
    from utils.generation.webchat import STOPPED

    box = page.locator("#question textarea")
    box.fill(question)
    box.press("Enter")
    page.wait_for_function(ANSWER_GREW, arg=number, timeout=60_000)
    page.locator("#stop").click()
    page.wait_for_function(
        """([n, marker]) => {
            const answers = document.querySelectorAll('#chat [data-testid="bot"]');
            return answers.length === n && answers[n - 1].innerText.includes(marker);
        }""", arg=[number, STOPPED], timeout=60_000)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium: install Debian's chromium package "
                    "(`apt-get install -y chromium`; .ci/run does) to run the browser test")
def test_enter_sends_the_answer_streams_and_stop_keeps_the_conversation(webui, tmp_path):
    """One browser session, as a user: Shift+Enter is a new line, Enter sends; the answer grows on the page in
    several updates (streamed); Stop ends it and keeps it; the next question adds to the conversation, and no
    error badge appears. With med_template the page says that each question is answered on its own."""
    from playwright.sync_api import sync_playwright

    from utils.generation.webchat import NO_TEXT, STOPPED

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 820})
            page.goto(webui["url"], wait_until="domcontentloaded", timeout=60_000)
            assert "each question is answered on its own" in page.locator("#mode-note").inner_text(timeout=30_000)
            box = page.locator("#question textarea")
            box.fill("第一行")
            box.press("Shift+Enter")
            box.press_sequentially("第二行")
            assert box.input_value() == "第一行\n第二行"  # a new line, nothing sent
            assert page.locator('#chat [data-testid="user"]').count() == 0

            page.evaluate(WATCH_ANSWERS)
            ask_with_enter_and_stop_half_way(page, QUESTION, 1)
            assert page.locator('#chat [data-testid="user"]').last.inner_text().strip() == QUESTION
            first = page.locator('#chat [data-testid="bot"]').first.inner_text().strip()
            assert first.endswith(STOPPED) and first != STOPPED and NO_TEXT not in first  # the partial answer kept
            assert box.input_value() == ""  # ready for the next question

            ask_with_enter_and_stop_half_way(page, "那饮食呢？", 2)
            asked = [text.strip() for text in page.locator('#chat [data-testid="user"]').all_inner_texts()]
            assert asked == [QUESTION, "那饮食呢？"]
            assert page.locator('#chat [data-testid="bot"]').first.inner_text().strip() == first
            assert page.get_by_text("Error", exact=True).count() == 0  # gradio's badge of a failed event

            page.get_by_text("生成参数 (generation settings)").click()
            page.get_by_text("max new tokens").wait_for(timeout=10_000)
            screenshot = tmp_path / "webui.png"
            page.screenshot(path=str(screenshot), full_page=True)
            page.locator("#clear").click()
            page.wait_for_function("() => !document.querySelector('#chat [data-testid=\"user\"]')", timeout=30_000)
        finally:
            browser.close()
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    keep = os.environ.get("BENTSAO_WEBUI_SCREENSHOT")
    if keep:
        Path(keep).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(screenshot, keep)


# --- the pieces behind the page, without a browser ---------------------------------------------------------


def test_literature_template_keeps_the_training_shape_and_drops_old_turns(webui_base):
    from utils.generation.dialogue import Chat
    from utils.model.loading import load_tokenizer
    from utils.prompter import Prompter

    assert Prompter("literature_template").multi_turn and not Prompter("med_template").multi_turn
    tokenizer = load_tokenizer(str(webui_base))
    prompter = Prompter("literature_template")
    chat = Chat(prompter, tokenizer, budget=1024 - 64)
    history = [("肝癌有哪些危险因素？", "乙肝、丙肝病毒感染和肝硬化。"), ("怎么筛查？", "超声加甲胎蛋白。")]
    prompt, kept = chat.prompt("多久查一次？", history)
    expected = (" <user>: 肝癌有哪些危险因素？ <bot>: 乙肝、丙肝病毒感染和肝硬化。"
                " <user>: 怎么筛查？ <bot>: 超声加甲胎蛋白。 <user>: 多久查一次？")
    assert prompt == prompter.generate_prompt(expected)
    assert kept == history

    last_turn_only = prompter.generate_prompt(" <user>: 怎么筛查？ <bot>: 超声加甲胎蛋白。 <user>: 多久查一次？")
    budget = len(tokenizer(last_turn_only)["input_ids"])
    short = Chat(prompter, tokenizer, budget=budget)
    prompt, kept = short.prompt("多久查一次？", history)
    assert kept == history[1:]
    assert prompt.count("<user>") == 2


def test_single_turn_template_answers_each_question_alone(webui_base):
    from utils.generation.dialogue import Chat
    from utils.model.loading import load_tokenizer
    from utils.prompter import Prompter

    prompter = Prompter("med_template")
    chat = Chat(prompter, load_tokenizer(str(webui_base)), budget=1024 - 64)
    prompt, kept = chat.prompt(QUESTION, [("之前的问题", "之前的回答")], "男，65岁")
    assert prompt == prompter.generate_prompt(QUESTION, "男，65岁")
    assert kept == [] and "之前" not in prompt


def test_auth_and_one_line_history():
    from generate import GenerateArgs, parse_auth, validate
    from utils.generation.webchat import one_line

    assert parse_auth("") is None
    assert parse_auth("doctor:s3cret:x") == ("doctor", "s3cret:x")
    assert parse_auth("doctor") is None
    assert any("--auth" in problem for problem in validate(GenerateArgs(auth="doctor", use_lora=False)))
    assert one_line(" 第一行\n第二行  第三行 ") == "第一行 第二行 第三行"
