"""Multiple-choice benchmarks read from their published files, prompted and scored as their authors do: CMMLU and
C-Eval (per-subject CSVs in dev/ and test/ or val/), CMB (its JSON), CMExam (its CSV), MedQA-MCMLE (its JSON Lines).
benchmarks.yaml beside this module holds each layout, its authors' prompt and letter extraction, the Chinese subject
names and which subjects are medical. `choice_predictions` is CMMLU's scoring (src/hf_causal_model.py), batched."""

from __future__ import annotations

import csv
import inspect
import io
import re
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import GenerationConfig

from utils.core.errors import UserError
from utils.core.io import read_records
from utils.generation.engine import generate_answers, model_device


@cache
def spec() -> dict[str, Any]:
    return yaml.safe_load(Path(__file__).with_name("benchmarks.yaml").read_text(encoding="utf-8"))


@dataclass
class Question:
    subject: str
    index: Any  # the benchmark's own: CMMLU's unnamed column, C-Eval's and CMB's id, else the row's position
    options: dict[str, str]  # letter -> text
    answer: str  # one letter, or several for CMB's and CMExam's multiple-answer questions
    row: dict[str, Any]  # every field (lower-cased names), for the prompt: CMB's exam_type, exam_class, ...


@dataclass
class Benchmark:
    format: str
    questions: list[Question]
    shots: dict[str | None, list[Question]] = field(default_factory=dict)  # subject (None: any) -> dev examples

    @property
    def config(self) -> dict[str, Any]:
        return spec()["formats"][self.format]

    def subject_name(self, subject: str) -> str:
        return spec()["subjects"].get(self.format, {}).get(subject, subject)

    def is_medical(self, subject: str) -> bool:
        return spec()["medical"][self.format] == "all" or subject in spec()["medical"][self.format]


def detect_format(path: Path) -> str:
    folders = [name for name in ("ceval", "cmmlu") if (path / spec()["formats"][name]["split"]).is_dir()]
    suffix = {".json": "cmb", ".csv": "cmexam", ".jsonl": "medqa"}.get(path.suffix.lower()) if path.is_file() else None
    if not (folders or suffix):
        raise UserError(f"{path}: no such file or folder" if not path.exists() else f"{path}: not a benchmark layout "
                        "(CMMLU: test/ and dev/, C-Eval: val/ and dev/, CMB .json, CMExam .csv, MedQA .jsonl)")
    return folders[0] if folders else suffix


def csv_rows(path: Path, columns: Sequence[str]) -> list[tuple[str, dict[str, str]]]:
    """(`line N`, row) with lower-cased headers; a missing column is an error naming the file and the column."""
    try:
        reader = csv.DictReader(io.StringIO(path.read_text(encoding="utf-8-sig"), newline=""))
        reader.fieldnames = [name.strip().lower() for name in reader.fieldnames or []]
        for name in columns:
            if name not in reader.fieldnames:
                raise UserError(f"{path}: no column `{name}` (the header has: {', '.join(reader.fieldnames)})")
        return [(f"line {reader.line_num}", row) for row in reader if any(str(cell or "").strip()
                                                                          for cell in row.values())]
    except (UnicodeDecodeError, csv.Error) as error:
        raise UserError(f"{path}: not a UTF-8 CSV file ({error})") from None


def read_questions(path: Path, name: str, subject: str | None = None) -> list[Question]:
    config = spec()["formats"][name]
    fields = config["fields"]
    letters = fields["options"] if isinstance(fields["options"], list) else []
    needed = [fields["question"], fields["answer"]] + ([] if letters else [fields["options"]])
    columns = needed + [letter.lower() for letter in letters] + ([fields["index"]] if "index" in fields else [])
    questions = []
    for position, (where, row) in enumerate(csv_rows(path, columns) if path.suffix.lower() == ".csv"
                                            else read_records(path)):
        row = {str(key).strip().lower(): value for key, value in row.items()}
        if missing := [wanted for wanted in needed if row.get(wanted) in (None, "")]:
            raise UserError(f"{path} {where}: no `{missing[0]}`")
        raw = {letter: row[letter.lower()] for letter in letters} if letters else row[fields["options"]]
        if isinstance(raw, str):  # CMExam: "A text" lines
            raw = dict((line.strip().split(" ", 1) + [""])[:2] for line in raw.splitlines() if line.strip())
        if not isinstance(raw, dict):
            raise UserError(f"{path} {where}: `{fields['options']}` must map letters to choices")
        options = {str(letter).strip().upper(): str(text) for letter, text in raw.items()
                   if len(str(text).strip()) >= config.get("min_option_length", 0)}
        answer = str(row[fields["answer"]]).strip().upper()
        if not set(answer) <= set(options):
            raise UserError(f"{path} {where}: the answer {answer!r} is not among the choices {''.join(options)}")
        index = row.get(fields.get("index", ""), position)
        questions.append(Question(subject or str(row.get(fields.get("subject", "")) or name),
                                  int(index) if str(index).isdigit() else index, options, answer,
                                  {**row, "question": str(row[fields["question"]])}))
    return questions


def read_benchmark(path: str | Path, format: str = "", subjects: Sequence[str] = (), n_shot: int = 0,
                   max_questions: int = 0) -> Benchmark:
    """The scored split of the benchmark at `path` (only `subjects` when given; the first `max_questions` of each
    subject when > 0), with its dev examples when `n_shot` > 0."""
    path = Path(path)
    bench = Benchmark(format or detect_format(path), [])
    config = bench.config
    if config["layout"] == "folder":
        def subject_file(subject: str, split: str) -> Path:
            return path / split / config["file"].format(subject=subject, split=split)

        prefix, suffix = subject_file("\0", config["split"]).name.split("\0")
        found = sorted(subject_file("*", config["split"]).parent.glob(f"{prefix}*{suffix}"))
        files = {item.name[len(prefix):len(item.name) - len(suffix)]: item for item in found}
        check_subjects(subjects, files, subject_file("*", config["split"]))
        for subject in subjects or files:
            if subject not in spec()["subjects"][bench.format]:
                raise UserError(f"{files[subject]}: `{subject}` is not a {bench.format} subject (its Chinese name for "
                                "the prompt is not in utils/evaluation/benchmarks.yaml)")
            bench.questions += read_questions(files[subject], bench.format, subject)
            if n_shot:
                dev = dev_file([subject_file(subject, config["shot_split"])])
                bench.shots[subject] = read_questions(dev, bench.format, subject)
    else:
        bench.questions = read_questions(path, bench.format)
        check_subjects(subjects, {question.subject: path for question in bench.questions}, path)
        bench.questions = [q for q in bench.questions if not subjects or q.subject in subjects]
        if n_shot:
            bench.shots[None] = read_questions(dev_file([path.parent / name for name in config["shot_files"]]),
                                               bench.format)
            for question in bench.shots[None]:
                bench.shots.setdefault(question.subject, []).append(question)
    if max_questions:  # the first of each subject (Counter.update returns None)
        seen: Counter[str] = Counter()
        bench.questions = [q for q in bench.questions if seen.update([q.subject]) or seen[q.subject] <= max_questions]
    return bench


def dev_file(candidates: list[Path]) -> Path:
    for path in candidates:
        if path.is_file():
            return path
    raise UserError(f"{candidates[0]}: no such file; --n_shot takes its examples from the benchmark's dev split")


def check_subjects(wanted: Sequence[str], available: dict[str, Path], where: Path) -> None:
    if not available:
        raise UserError(f"{where}: no such files")
    if unknown := [subject for subject in wanted if subject not in available]:
        listed = ", ".join(list(available)[:12]) + (", ..." if len(available) > 12 else "")
        raise UserError(f"--subjects: {', '.join(unknown)} not in {where} (its subjects: {listed})")


def render(config: dict[str, Any], question: Question) -> str:
    options = "\n".join(config["option"].format(letter=letter, text=text) for letter, text in question.options.items())
    return config["question"].format_map(defaultdict(str, {**question.row, "options": options}))


def build_prompts(bench: Benchmark, n_shot: int = 0, count_tokens: Callable[[str], int] | None = None,
                  max_length: int = 2048) -> list[str]:
    """The authors' prompt per question: header, `n_shot` solved dev examples of its subject, the question. As CMMLU's
    gen_prompt, the longest examples go until it fits `max_length` tokens, and the header too if that is not enough."""
    config, prompts, count = bench.config, [], cache(count_tokens) if count_tokens else None
    for question in bench.questions:
        header = config["header"].format(subject_name=bench.subject_name(question.subject))
        end = render(config, question)
        pool = [shot for shot in bench.shots.get(question.subject) or bench.shots.get(None, [])
                if render(config, shot) != end]  # scoring the dev file itself: never a question's own answer
        shots = [render(config, shot) + config["shot"].format(answer=shot.answer) for shot in pool[:n_shot]]
        room = max_length - count(header) - count(end) if count else max_length
        while count and shots and sum(map(count, shots)) >= room:
            shots = [shot for shot in shots if count(shot) != max(map(count, shots))]
        prompts.append(end if room < 0 else header + "".join(shots) + end)
    return prompts


@torch.inference_mode()
def choice_predictions(model: Any, tokenizer: Any, prompts: Sequence[str], letters: str | Sequence[str] = "ABCD",
                       batch_size: int = 8, progress: Callable[[int], Any] = lambda done: None) -> list[str]:
    """For each prompt, the letter (of `letters`, or of `letters[i]` for prompt i) whose token has the highest
    next-token logit after the prompt: CMMLU's and C-Eval's answer-only scoring, batched. A letter's token is the
    one `convert_tokens_to_ids` gives (as CMMLU takes it), or the last it encodes to when the vocabulary lacks it."""
    choices = [letters] * len(prompts) if isinstance(letters, str) else list(letters)
    ids = {letter: tokenizer.convert_tokens_to_ids(letter) for letter in set("".join(choices))}
    ids = {letter: token if token not in (None, tokenizer.unk_token_id) else
           tokenizer.encode(letter, add_special_tokens=False)[-1] for letter, token in ids.items()}
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    positions = "position_ids" in inspect.signature(base.forward).parameters  # Bloom has ALiBi instead
    order = sorted(range(len(prompts)), key=lambda index: -len(prompts[index]))  # longest first: no late OOM
    predictions = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        indices = order[start:start + batch_size]
        encoded = tokenizer([prompts[i] for i in indices], return_tensors="pt", padding=True, padding_side="left")
        inputs = {key: value.to(model_device(model)) for key, value in encoded.items() if key != "token_type_ids"}
        if positions:  # counted as generate() does: a left-padded prompt gets the positions it has alone
            inputs["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        logits = model(**inputs).logits[:, -1, :].float()
        for row, index in enumerate(indices):
            predictions[index] = choices[index][int(logits[row, [ids[c] for c in choices[index]]].argmax())]
        progress(len(indices))
    return predictions


def extract_letters(text: str, question: Question, rules: dict[str, Any]) -> str:
    """The answer a generated reply gives, by the benchmark's rules (benchmarks.yaml `extract`); '' when none."""
    text, options = text.strip(), question.options
    found = text[0] if rules.get("leading_letter") and text[:1] in options else None
    for pattern, group in [] if found else rules["patterns"]:
        if match := re.search(pattern, text, re.MULTILINE):
            found = match.group(group) or ""
            break
    if found is None:
        named = [char for char in text if char in options]
        line = text.split("\n")[0] if "解释" in text else text  # CMExam reads the first line of an explained reply
        found = {"only_letter": named[0] if len(named) == 1 else "", "all_letters": "".join(named),
                 "letters_or_texts": "".join(letter for letter, choice in options.items()
                                             if letter in line or (choice and choice in line))}[rules["fallback"]]
    letters = "".join(sorted({char for char in found if char in options}, key=found.index))
    return "".join(sorted(letters)) if len(question.answer) > 1 or rules.get("keep_all") else letters[:1]


def progress_line(label: str, total: int) -> Callable[[int], None]:
    """A callback printing `label: done/total questions, rate, ETA`: in place on a terminal, else a line per 10 s."""
    stream = sys.stderr
    start, state, tty = time.monotonic(), {"done": 0, "shown": -1e9}, stream.isatty()

    def advance(count: int) -> None:
        state["done"] += count
        now, done = time.monotonic(), state["done"]
        if done >= total or now - state["shown"] >= (0.5 if tty else 10):
            state["shown"], rate = now, done / max(now - start, 1e-9)
            eta = time.strftime("%H:%M:%S", time.gmtime((total - done) / rate))
            print(f"{chr(13) if tty else ''}{label}: {done}/{total} questions, {rate:.1f}/s, ETA {eta}", file=stream,
                  end="\n" if not tty or done >= total else "", flush=True)

    return advance


def predict(bench: Benchmark, model: Any, tokenizer: Any, label: str, n_shot: int = 0, scoring: str = "",
            batch_size: int = 8, max_new_tokens: int = 32, render: Callable[[str], str] | None = None,
            ) -> list[dict[str, Any]]:
    """One row per question: `model` (label), `subject`, `index`, `prediction`, `answer` (generating: `output`).
    `render`: the prompt as a training template wraps it (a chat template: the question as the user's turn)."""
    max_length = min(getattr(model.config, "max_position_embeddings", None) or 2048, 2048)  # CMMLU's 2048
    prompts = build_prompts(bench, n_shot, lambda text: len(tokenizer.encode(text)), max_length)
    prompts = [render(prompt) for prompt in prompts] if render else prompts
    progress, questions = progress_line(label, len(prompts)), bench.questions
    if (scoring or bench.config["scoring"]) == "logits":
        letters = ["".join(question.options) for question in questions]
        predicted = choice_predictions(model, tokenizer, prompts, letters, batch_size, progress)
        texts: list[str | None] = [None] * len(questions)
    else:
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                  eos_token_id=tokenizer.eos_token_id)
        texts = generate_answers(model, tokenizer, prompts, config, batch_size, progress=False,
                                 on_answer=lambda index, answer: progress(1))
        rules = spec()["extract"][bench.config["extract"]]
        predicted = [extract_letters(text, q, rules) for text, q in zip(texts, questions, strict=True)]
    return [{"model": label, "subject": q.subject, "index": q.index, "prediction": letter, "answer": q.answer}
            | ({"output": text} if text is not None else {})
            for q, letter, text in zip(questions, predicted, texts, strict=True)]


def accuracy_report(bench: Benchmark, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per model: each subject's accuracy (%); medical, general and overall: the mean over their subjects (CMMLU's)."""
    tally: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for row in rows:
        tally[row["model"]][row["subject"]][0] += row["prediction"] == row["answer"]
        tally[row["model"]][row["subject"]][1] += 1

    def summary(counts: dict[str, list[int]], members: list[str]) -> dict[str, Any] | None:
        return {"accuracy": round(sum(100 * counts[s][0] / counts[s][1] for s in members) / len(members), 2),
                "subjects": len(members), "correct": sum(counts[s][0] for s in members),
                "questions": sum(counts[s][1] for s in members)} if members else None

    return {model: {"medical": summary(counts, [s for s in counts if bench.is_medical(s)]),
                    "general": summary(counts, [s for s in counts if not bench.is_medical(s)]),
                    "overall": summary(counts, list(counts)), "subjects": {s: summary(counts, [s]) for s in counts}}
            for model, counts in tally.items()}


def markdown_table(bench: Benchmark, report: dict[str, Any]) -> str:
    """Subjects as rows, then the medical, general and overall means; one accuracy column per model."""
    names, first = list(report), next(iter(report.values()))
    lines = ["| subject | questions | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
    rows = [(f"{s} {bench.subject_name(s)}".removesuffix(f" {s}"), [report[n]["subjects"][s] for n in names])
            for s in first["subjects"]]
    rows += [(f"**{g}** ({first[g]['subjects']} of {len(first['subjects'])} subjects)", [report[n][g] for n in names])
             for g in ("medical", "general", "overall") if first[g]]
    lines += [f"| {label} | {scores[0]['questions']} | " + " | ".join(f"{x['accuracy']:.2f}" for x in scores) + " |"
              for label, scores in rows]
    return "\n".join(lines)
