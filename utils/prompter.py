"""Renders the JSON prompt templates of `templates/`.

A template is a JSON object with `prompt_no_input` and `response_split`, optionally `prompt_input`,
`description` and `multi_turn` (true: the instruction carries a dialogue, ` <user>: ... <bot>: ... <user>: ...`, as
the literature template's does). Placeholders are `{instruction}` and `{input}`, nothing else (no format specs).
A chat template file (`"chat_template": true`, `system`, as `templates/chat.json`) renders rows with the base
tokenizer's own chat template instead, the dialogue as user/assistant turns.
The BenTsao templates keep the exact prompt strings of the published ones, because the published adapters were
trained on them: `PUBLISHED_SHA256` holds their hashes, so that a plain clone can check them.
"""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Any

from utils.core.errors import UserError
from utils.core.io import read_json_object

TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "templates"
REQUIRED_KEYS = ("prompt_no_input", "response_split")
OPTIONAL_KEYS = ("prompt_input", "description")
PLACEHOLDERS = {"instruction", "input"}
USER, BOT = "<user>", "<bot>"  # the turns of a literature dialogue: ` <user>: q1 <bot>: a1 <user>: q2`
# SHA-256 of the published BenTsao / Alpaca-LoRA prompt strings (UTF-8): the interface of the published adapters.
PUBLISHED_SHA256 = {
    "med_template": {
        "prompt_input": "21ddf1ee517984777afebae47de0f5e70c0c78b9e854bfe904a71203a9533c77",
        "prompt_no_input": "21ddf1ee517984777afebae47de0f5e70c0c78b9e854bfe904a71203a9533c77",
        "response_split": "3e236bb1507d9be418a8f4b2aff3944fe039d5de8b0b2237fdfe839ce32d727f",
    },
    "bloom_deploy": {
        "prompt_input": "74c5c012a1d7d364a7063144abae9cbbe76aa0e753bf361f0e721af47d12d0b3",
        "prompt_no_input": "a5891575915446be4a4cf8ada6945db0726fa842faa0a8a4192e6a0985e68c63",
        "response_split": "a891385ec136cfcf5511e6e5d5a2810b6042674b87d9ed673fa096e21ac20f55",
    },
    "literature_template": {
        "prompt_no_input": "7e0778f59c85fd3249317414ebfb35372bcc58dfb3151c9c71e474e03f001bcb",
        "response_split": "2941b397ee6917cf71ab453fc341ab787b755930c16ee41dce15aa291a32019c",
    },
    "alpaca": {
        "prompt_input": "f1b8970aa9b05de470dbd1413609a155a16c9e9cfe4efbf01cf38dc2049fde66",
        "prompt_no_input": "7768da83ee0feb389c3bbcac0841599b1f953ff9ee5c448ec02fc560d762893f",
        "response_split": "155ffaece2b6883601c73c88e116b817dcce2803babbeb5408ca8abfbfb9d8e1",
    },
}


def available_templates() -> list[str]:
    return sorted(path.stem for path in TEMPLATES_DIR.glob("*.json"))


def _placeholders(text: str) -> set[str]:
    """The placeholder names of a prompt string; a format spec or conversion (`{instruction:d}`, `{input!r}`) is an
    error: it would pass here and fail, or print something odd, only when a row is rendered."""
    fields = set()
    for _, field, spec, conversion in string.Formatter().parse(text):
        if field is None:
            continue
        if spec or conversion:
            raise ValueError(f"{{{field}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}} has a "
                             "format spec or conversion; write {instruction} or {input} only")
        fields.add(field)
    return fields


def resolve_template_path(template: str) -> Path:
    """A template name (looked up in the repo's `templates/`) or a path to a JSON file."""
    candidate = Path(template)
    if candidate.suffix == ".json" or candidate.parent != Path("."):
        if candidate.is_file():
            return candidate
        raise UserError(
            f"template file {template} does not exist (available templates: {', '.join(available_templates())})"
        )
    path = TEMPLATES_DIR / f"{template}.json"
    if not path.is_file():
        raise UserError(f"unknown template `{template}`; available templates: {', '.join(available_templates())}")
    return path


def load_template(template: str) -> dict[str, str]:
    path = resolve_template_path(template)
    hint = f"available templates: {', '.join(available_templates())}"
    data = read_json_object(path, f"template {path}")
    if data.get("chat_template") is True:  # rendered by the tokenizer's chat template (Prompter.render)
        if not isinstance(data.get("system", ""), str) or not isinstance(data.get("multi_turn", False), bool):
            raise UserError(f"template {path}: `system` must be a string and `multi_turn` true or false; {hint}")
        return data
    missing = [key for key in REQUIRED_KEYS if key not in data]
    if missing:
        raise UserError(f"template {path}: missing key {', '.join(f'`{k}`' for k in missing)}; {hint}")
    for key in REQUIRED_KEYS + OPTIONAL_KEYS:
        if key in data and not isinstance(data[key], str):
            raise UserError(f"template {path}: `{key}` must be a string; {hint}")
    if not isinstance(data.get("multi_turn", False), bool):
        raise UserError(f"template {path}: `multi_turn` must be true or false; {hint}")
    for key in ("prompt_input", "prompt_no_input"):
        if key not in data:
            continue
        try:
            fields = _placeholders(data[key])
        except ValueError as error:
            raise UserError(f"template {path}: `{key}` is not a valid format string ({error}); {hint}") from None
        unknown = fields - PLACEHOLDERS
        if unknown:
            raise UserError(
                f"template {path}: `{key}` has unknown placeholder {', '.join('{' + f + '}' for f in sorted(unknown))}"
                f" (allowed: {{instruction}}, {{input}}); {hint}"
            )
        if "instruction" not in fields:
            raise UserError(f"template {path}: `{key}` has no {{instruction}} placeholder; {hint}")
    return data


def template_problems(template: str) -> list[str]:
    """What is wrong with `template` (not found, not a template), for a script's `validate`; nothing for ""."""
    try:
        if template:
            load_template(template)
    except UserError as error:
        return [str(error)]
    return []


class Prompter:
    """`Prompter("med_template")` or `Prompter("path/to/template.json")`."""

    def __init__(self, template: str = "med_template", verbose: bool = False, tokenizer: Any = None) -> None:
        self.template_name = template
        self.template = load_template(template)
        self.tokenizer = tokenizer  # a chat template's renderer: set once the base model's tokenizer is loaded
        if verbose:
            print(f"Using prompt template {template}: {self.template.get('description', '')}")

    @property
    def multi_turn(self) -> bool:
        """True when the template's instruction carries a dialogue (` <user>: ... <bot>: ... <user>: ...`)."""
        return bool(self.template.get("multi_turn", False))

    @property
    def chat(self) -> bool:
        """True when the tokenizer's own chat template renders the prompts."""
        return self.template.get("chat_template") is True

    @property
    def response_split(self) -> str:
        return self.template.get("response_split", "")

    def turns(self, instruction: str, input: str | None = None) -> list[dict[str, str]]:
        """A row as chat turns: the template's system prompt, then the instruction as a user turn, or (multi_turn)
        its dialogue ` <user>: q1 <bot>: a1 <user>: q2` as user/assistant turns; an input joins the last turn."""
        parts = re.split(f" ?({USER}|{BOT}): ", instruction) if self.multi_turn else [instruction]
        turns = [{"role": "system", "content": self.template["system"]}] if self.template.get("system") else []
        turns += [{"role": "user", "content": parts[0]}] if parts[0].strip() else []
        turns += [{"role": "user" if marker == USER else "assistant", "content": text}
                  for marker, text in zip(parts[1::2], parts[2::2], strict=True)]
        if input:
            turns[-1]["content"] += f"\n{input}"
        return turns

    def render(self, turns: list[dict[str, str]], tokenizer: Any = None) -> str:
        """The chat as the tokenizer's chat template writes it, ending with the assistant's cue when the last turn is
        not the assistant's; less a leading BOS that the tokenizer adds itself when it encodes the text."""
        tokenizer = tokenizer or self.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(f"--prompt_template {self.template_name} renders the base model's own chat template, and "
                            "its tokenizer has none: use a plain template such as med_template")
        text = tokenizer.apply_chat_template(turns, tokenize=False,
                                             add_generation_prompt=turns[-1]["role"] != "assistant")
        bos = tokenizer.bos_token
        adds_bos = bos is not None and tokenizer("")["input_ids"][:1] == [tokenizer.bos_token_id]
        return text[len(bos):] if adds_bos and text.startswith(bos) else text

    def generate_prompt(self, instruction: str, input: str | None = None, label: str | None = None) -> str:
        """The prompt for an instruction (and optional input), followed by `label` when training.

        When the chosen prompt has no `{input}` placeholder (the published `med_template` drops it, and
        `literature_template` has no `prompt_input` at all), a non-empty input is appended to the instruction
        on a new line, so it still reaches the model. With an empty input the published prompt is unchanged.
        """
        if self.chat:
            turns = self.turns(instruction, input)
            return self.render(turns + [{"role": "assistant", "content": label}] if label else turns)
        if input:
            fmt = self.template.get("prompt_input", self.template["prompt_no_input"])
            if "input" in _placeholders(fmt):
                prompt = fmt.format_map({"instruction": instruction, "input": input})
            else:
                prompt = fmt.format_map({"instruction": f"{instruction}\n{input}", "input": ""})
        else:
            prompt = self.template["prompt_no_input"].format_map({"instruction": instruction, "input": ""})
        if label:
            prompt = f"{prompt}{label}"
        return prompt

    def get_response(self, output: str) -> str:
        """The text after the response marker; the whole text when the marker is absent or empty."""
        split = self.response_split
        if split and split in output:
            return output.split(split, 1)[1].strip()
        return output.strip()
