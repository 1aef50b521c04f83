"""Renders the JSON prompt templates of `templates/`.

A template is a JSON object with `prompt_no_input` and `response_split`, optionally `prompt_input` and
`description`. Placeholders are `{instruction}` and `{input}`. The BenTsao templates keep the exact prompt
strings of the published ones, because the published adapters were trained on them.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from utils.core.errors import UserError

TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "templates"
REQUIRED_KEYS = ("prompt_no_input", "response_split")
OPTIONAL_KEYS = ("prompt_input", "description")
PLACEHOLDERS = {"instruction", "input"}


def available_templates() -> list[str]:
    return sorted(path.stem for path in TEMPLATES_DIR.glob("*.json"))


def _placeholders(text: str) -> set[str]:
    return {field for _, field, _, _ in string.Formatter().parse(text) if field is not None}


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
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"template {path}: not valid UTF-8 JSON ({error}); {hint}") from None
    if not isinstance(data, dict):
        raise UserError(f"template {path}: expected a JSON object; {hint}")
    missing = [key for key in REQUIRED_KEYS if key not in data]
    if missing:
        raise UserError(f"template {path}: missing key {', '.join(f'`{k}`' for k in missing)}; {hint}")
    for key in REQUIRED_KEYS + OPTIONAL_KEYS:
        if key in data and not isinstance(data[key], str):
            raise UserError(f"template {path}: `{key}` must be a string; {hint}")
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


class Prompter:
    """`Prompter("med_template")` or `Prompter("path/to/template.json")`."""

    def __init__(self, template: str = "med_template", verbose: bool = False) -> None:
        self.template_name = template
        self.template = load_template(template)
        if verbose:
            print(f"Using prompt template {template}: {self.template.get('description', '')}")

    @property
    def response_split(self) -> str:
        return self.template["response_split"]

    def generate_prompt(self, instruction: str, input: str | None = None, label: str | None = None) -> str:
        """The prompt for an instruction (and optional input), followed by `label` when training.

        When the chosen prompt has no `{input}` placeholder (the published `med_template` drops it, and
        `literature_template` has no `prompt_input` at all), a non-empty input is appended to the instruction
        on a new line, so it still reaches the model. With an empty input the published prompt is unchanged.
        """
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
