"""Knowledge-tuning data, built the way BenTsao built its own (the original code was never released).

    python build_dataset.py knowledge --kb data/knowledge_base.jsonl --output data/llama_data.json
    python build_dataset.py knowledge --kb cmekg --output cmekg_data.json           # the whole cMeKG graph
    python build_dataset.py literature --docs data_literature/documents.jsonl --output data_literature/liver_cancer.json

`knowledge` reads a knowledge graph (`cmekg`: the one the `pycmekg` package ships; a cMeKG-style pickle; or JSON
Lines, one entity a line), maps its predicates to question kinds (utils/builder/predicates.yaml), cleans its values,
builds clinically careful rows (template) or asks an OpenAI-compatible server (openai), passes every row through the
quality gates, and writes JSON Lines `{instruction, input: "", output, meta}` (`meta`, the provenance, is ignored by
the trainer) plus a report beside it. `literature` turns documents into dialogues in the published literature shape.
See docs/building_data.md.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils import llm
from utils.builder import llm_backend, resources
from utils.builder import output as out
from utils.builder.curation import load_entities
from utils.builder.gates import GateCounts, LeakIndex, apply_gates
from utils.builder.knowledge import TemplateOptions, kinds_problems, template_options, template_rows
from utils.builder.lint import lint
from utils.builder.literature import dialogue_turns, literature_item, load_documents
from utils.builder.literature import template_rows as literature_template_rows
from utils.builder.llm_backend import ServerArgs
from utils.builder.report import entities_without_rows, graph_report, row_metrics, summary_lines
from utils.builder.rows import Row
from utils.core.cli import flag, run_cli
from utils.core.errors import UserError, raise_problems
from utils.core.io import (
    RunLock,
    check_string_fields,
    read_records,
)

REPO = Path(__file__).resolve().parent
DEFAULT_EXCLUDE = "data/infer.json"
PROMPT_KINDS = "facts,patient,case,safety"
BACKENDS = ("template", "openai")


# --- stages shared by both commands -------------------------------------------------------------------------------


def eval_questions(exclude_questions: str) -> tuple[list[str], list[str], str]:
    """The evaluation questions to keep out of training, their golden answers (a diagnosis question is about the
    diseases its answer names), and where they came from (`none` turns this off)."""
    if exclude_questions.lower() == "none":
        return [], [], "none"
    path = Path(exclude_questions)
    if exclude_questions == DEFAULT_EXCLUDE and not path.exists():
        path = REPO / DEFAULT_EXCLUDE  # the default names the project's own file, wherever the command runs
    located = read_records(path)
    check_string_fields(path, located, required=("instruction",))
    return ([row["instruction"] for _, row in located], [str(row.get("output", "")) for _, row in located],
            str(path))


def write_and_verify(output: Path, train: list[dict[str, Any]], validation: list[dict[str, Any]],
                     as_array: bool) -> dict[str, int]:
    """Write the rows (and the validation split), atomically, and read them back; the verified counts."""
    out.write_rows(output, train, as_array)
    counts = {"train": out.verify_rows(output, train)}
    if validation:
        path = out.validation_path(output)
        out.write_rows(path, validation, as_array)
        counts["validation"] = out.verify_rows(path, validation)
    return counts


def finish(output: Path, report: dict[str, Any], records: list[dict[str, Any]], written: dict[str, int],
           hf_dataset: str, validation: list[dict[str, Any]]) -> None:
    """Report, export, and only then say what was written (every file named was read back first)."""
    report["metrics"] = row_metrics(records, report.get("seed", 42))
    report["split"] = written
    report_file = out.report_path(output)
    out.write_report(report_file, report)
    if json.loads(report_file.read_text(encoding="utf-8"))["metrics"]["rows"] != len(records):
        raise UserError(f"{report_file}: reading the report back found other figures than were written")
    for line in summary_lines(report):
        print(line)
    if hf_dataset:
        train = records if not validation else [r for r in records if r not in validation]
        out.export_hf(Path(hf_dataset).expanduser().resolve(), train, validation)
        print(f"wrote a Hugging Face dataset to {hf_dataset} (load_from_disk checked)")
    split = f" + {written['validation']} validation rows in {out.validation_path(output)}" if validation else ""
    print(f"wrote {written['train']} rows to {output}{split} and the report to {report_file} (read back and checked)")


def run_llm(items: list[llm_backend.Item], output: Path, config: llm.ChatConfig, manifest: dict[str, Any],
            concurrency: int, resume: bool) -> tuple[list[Row], dict[str, dict[str, Any]], llm_backend.RunCounts]:
    """Ask for every item not done yet; the rows of all finished items (this run's and, resuming, earlier ones)."""
    client = llm.make_client(config)  # first: a missing key fails before any file is touched
    done = llm_backend.start_run(output, manifest, resume)
    counts = llm_backend.RunCounts()
    llm_backend.run_items(items, done, llm_backend.sidecar(output, ".work.jsonl"), client, config, concurrency,
                          counts)
    rows = llm_backend.collected_rows(items, done, counts)
    print(f"requests: {counts.items} in all, {counts.done_before} already done (resume), {counts.requested} asked, "
          f"{counts.skipped} skipped (rerun with --resume True to ask them again); filtered answers: "
          + (", ".join(f"{why} {n}" for why, n in counts.filtered.most_common()) or "none"))
    return rows, done, counts


def keep_or_refuse(output: Path, resume: bool, counts: llm_backend.RunCounts, kept: list[Row]) -> None:
    """A fresh run that could not ask everything never replaces an existing output (it would lose rows), and a run
    whose every request failed writes nothing (an empty file is no success). An output that is not valid UTF-8 (torn
    by an earlier crash) is an existing output like any other: kept when this run is incomplete, else replaced."""
    data = output.read_bytes() if output.is_file() else b""
    existing = data.strip() not in (b"", b"[]")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        print(f"warning: {output} is not valid UTF-8 (torn by an earlier run?): it is kept unless this run writes "
              "the whole output anew")
    if existing and not resume and counts.skipped:
        raise UserError(f"{counts.skipped} of {counts.items} requests failed, so {output} was left as it was; this "
                        f"run's answers are kept in {llm_backend.sidecar(output, '.work.jsonl')}: rerun with "
                        "--resume True to ask the failed ones again and write the output")
    if counts.skipped and not kept:
        raise UserError(f"all {counts.skipped} requests that were asked failed and no earlier answers are kept, so "
                        f"nothing was written to {output}; see the lines above for why, then rerun (--resume True "
                        "keeps whatever a later run gets)")


def manifest_for(command: str, config: llm.ChatConfig, items: list[llm_backend.Item], **settings: Any,
                 ) -> dict[str, Any]:
    return {"command": command, "model": config.model, "api_base": config.api_base or "openai",
            "temperature": config.temperature, "builder_data": resources.data_version(),
            "facts_hash": llm_backend.facts_hash(items), **settings}


# --- commands ------------------------------------------------------------------------------------------------------


def knowledge_rows(entities: Any, output: Path, server: ServerArgs, config: llm.ChatConfig | None, kinds: list[str],
                   options: TemplateOptions, leaks: LeakIndex, near_duplicate: float, counts: GateCounts,
                   ) -> tuple[list[Row], dict[str, Any]] | None:
    """The gated rows (template, or asked of the server) and the report's extra part; None after a dry run."""
    leaks.bind(entities)
    if config is None:
        rows = template_rows(entities, options, progress=True)
        return apply_gates(rows, leaks, near_duplicate, counts, progress=True), {}
    items = llm_backend.knowledge_items(entities, kinds, options.per_entity, "vignette" in options.kinds)
    if server.dry_run:
        print("\n".join(llm_backend.dry_run_lines(items, options.per_entity, server.input_price, server.output_price)))
        return None
    manifest = manifest_for("knowledge", config, items, prompt_version=resources.prompts()["version"],
                            prompt_kinds=kinds, per_entity=options.per_entity)
    rows, done, run_counts = run_llm(items, output, config, manifest, server.concurrency, server.resume)
    kept = apply_gates(rows, leaks, near_duplicate, counts)
    keep_or_refuse(output, server.resume, run_counts, kept)
    return kept, {"llm": llm_backend.usage_report(items, done, server.input_price, server.output_price)}


@dataclass(frozen=True)
class BuildArgs(ServerArgs):
    """The flags both commands take."""

    output: str = flag("", "the file to write (knowledge: JSON Lines; literature: a JSON array, the published "
                           "shape); the report goes beside it, OUTPUT.report.json")
    seed: int = flag(42, "the template's seed: the same input and seed give the same file, byte for byte", low=0)
    turns: int = flag(3, "user turns in a dialogue row at most (1: single-turn rows only)", low=1)
    near_duplicate: float = flag(0.8, "question+answer bigram Jaccard at which a row is a near duplicate of a kept "
                                      "one", low=0, high=1)
    backend: str = flag("template", "template (offline, deterministic) or openai (an OpenAI-compatible server)",
                        choices=BACKENDS)


@dataclass(frozen=True)
class KnowledgeArgs(BuildArgs):
    """The flags of `build_dataset.py knowledge`."""

    kb: str = flag("", "the graph: `cmekg` (the one pycmekg ships), FILE.pkl (a cMeKG-style pickle) or FILE.jsonl")
    per_entity: int = flag(16, "template: rows about one entity at most; openai: question/answer pairs per request",
                           low=1)
    exclude_questions: str = flag(DEFAULT_EXCLUDE, "evaluation questions kept out of training (equal or near-equal); "
                                                   "none")
    leak_threshold: float = flag(0.8, "character-bigram Jaccard at which a question counts as an evaluation question",
                                 low=0, high=1)
    val_fraction: float = flag(0.0, "also write this share of the rows to OUTPUT's .val file", low=0, below=1)
    hf_dataset: str = flag("", "also save a Hugging Face `datasets` folder here (save_to_disk; train and validation)")
    prompt_kinds: str = flag(PROMPT_KINDS, "openai: the prompt kinds to ask per entity, comma-separated")
    question_kinds: str = flag("default", "kinds to build (fact,case,...,differential), or default (fewer for cmekg: "
                                          "the report says why) or all")


def validate_knowledge(args: KnowledgeArgs) -> list[str]:
    """Every problem with the options and paths, before the graph is read."""
    kinds = [kind.strip() for kind in args.prompt_kinds.split(",") if kind.strip()]
    unknown = [kind for kind in kinds if kind not in llm_backend.prompt_kinds()]
    problems = [(f"--prompt_kinds: unknown kind {', '.join(unknown)} (known: "
                f"{', '.join(llm_backend.prompt_kinds())})")] if unknown else []
    excluded = [] if args.exclude_questions == "none" else [args.exclude_questions]
    return problems + kinds_problems(args.question_kinds) + args.server_problems(args.backend) + out.path_problems(
        args.kb, "--kb", args.output, excluded, args.hf_dataset, validation=args.val_fraction > 0)


def knowledge(args: KnowledgeArgs) -> None:
    """Knowledge graph -> instruction rows (JSON Lines) and a report."""
    started = time.monotonic()
    raise_problems(validate_knowledge(args))
    options, kinds_off = template_options(args.kb, args.question_kinds, args.seed, args.per_entity, args.turns)
    kinds = [kind.strip() for kind in args.prompt_kinds.split(",") if kind.strip()]
    config, output_path = args.chat_config(args.backend), Path(args.output).expanduser()
    questions, answers, exclude = eval_questions(args.exclude_questions)
    with RunLock(f"{output_path}.lock", f"--output {output_path}"):
        entities, stats = load_entities(args.kb, progress=True)
        counts = GateCounts()
        leaks = LeakIndex(questions, args.leak_threshold, answers)
        built = knowledge_rows(entities, output_path, args, config, kinds, options, leaks, args.near_duplicate, counts)
        if built is None:
            return
        kept, report_extra = built
        records = [row.record() for row in kept]
        out.check_some_rows(records, output_path, f"--kb {args.kb}")
        train, validation = out.split_validation(records, args.val_fraction, args.seed)
        written = write_and_verify(output_path, train, validation, as_array=False)
        report = graph_report(stats, counts, args.seed, args.backend, exclude) | report_extra
        report["kinds"] = {"built": sorted(options.kinds), "off": kinds_off}
        report["lint"] = lint(kept, entities, leaks.pairs)
        report["entities"]["without_rows"] = entities_without_rows(entities, kept, stats, counts)
        finish(output_path, report, records, written, args.hf_dataset, validation)
    print(f"took {time.monotonic() - started:.1f}s")


def literature_rows(documents: list[Any], output: Path, server: ServerArgs, config: llm.ChatConfig | None,
                    turns: int, seed: int, pairs_per_document: int, min_overlap: float, near_duplicate: float,
                    counts: GateCounts) -> tuple[list[Row], dict[str, Any]] | None:
    """The gated dialogue rows (template, or asked of the server) and the report's extra part; None after a dry run.
    The answers are the document's own sentences: no fact gate (a screening interval is no graph dose)."""
    no_leaks = LeakIndex([], 1.0)
    if config is None:
        rows = literature_template_rows(documents, turns, seed)
        return apply_gates(rows, no_leaks, near_duplicate, counts, check_content=False, unique_answers=False), {}
    items = [literature_item(d, pairs_per_document, turns, min_overlap, seed) for d in documents if d.text]
    if server.dry_run:
        print("\n".join(llm_backend.dry_run_lines(items, pairs_per_document, server.input_price, server.output_price)))
        return None
    manifest = manifest_for("literature", config, items, prompt_version=resources.literature()["prompt_version"],
                            pairs_per_document=pairs_per_document, min_overlap=min_overlap, turns=turns)
    rows, done, run_counts = run_llm(items, output, config, manifest, server.concurrency, server.resume)
    kept = apply_gates(rows, no_leaks, near_duplicate, counts, check_content=False, unique_answers=False)
    keep_or_refuse(output, server.resume, run_counts, kept)
    return kept, {"llm": llm_backend.usage_report(items, done, server.input_price, server.output_price)}


@dataclass(frozen=True)
class LiteratureArgs(BuildArgs):
    """The flags of `build_dataset.py literature`."""

    docs: str = flag("", "the documents: JSON Lines of {\"title\", \"text\"}, e.g. data_literature/documents.jsonl")
    pairs_per_document: int = flag(6, "openai: dialogue turns asked for per document", low=1)
    min_overlap: float = flag(0.5, "openai: share of an answer's character bigrams that must occur in the document",
                              low=0, high=1)


def literature(args: LiteratureArgs) -> None:
    """Documents (JSON Lines of {"title", "text"}) -> literature dialogues (a JSON array in the published shape)."""
    raise_problems(args.server_problems(args.backend) + out.path_problems(args.docs, "--docs", args.output, []))
    config, output_path = args.chat_config(args.backend), Path(args.output).expanduser()
    documents = load_documents(args.docs)
    with RunLock(f"{output_path}.lock", f"--output {output_path}"):
        counts = GateCounts()
        built = literature_rows(documents, output_path, args, config, args.turns, args.seed, args.pairs_per_document,
                                args.min_overlap, args.near_duplicate, counts)
        if built is None:
            return
        kept, report = built
        records = [row.record() for row in kept]
        out.check_some_rows(records, output_path, f"--docs {args.docs}")
        bad = next((r for r in records if dialogue_turns(r["instruction"]) is None), None)
        if bad is not None:
            raise UserError(f"a dialogue is not in the shape ` <user>: ... <bot>: ... <user>: ...`: "
                            f"{bad['instruction']!r}")
        report = {"command": "literature", "source": args.docs, "backend": args.backend, "seed": args.seed,
                  "documents": {"read": len(documents), "empty": sum(1 for d in documents if not d.text)},
                  **report,
                  "removed": {"content": dict(counts.rejected), "duplicate_questions": counts.duplicate_questions,
                              "duplicate_answers": counts.duplicate_answers,
                              "near_duplicates": counts.near_duplicates}}
        written = write_and_verify(output_path, records, [], as_array=True)
        finish(output_path, report, records, written, "", [])


if __name__ == "__main__":
    run_cli({"knowledge": knowledge, "literature": literature})
