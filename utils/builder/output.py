"""Writing a build's files: rows (atomically, as a whole), the report, a validation split, a Hugging Face export,
and reading each back before anything is reported as written."""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from utils.builder.llm_backend import sidecar
from utils.core.errors import UserError
from utils.core.io import (
    atomic_write,
    check_string_fields,
    json_array_text,
    jsonl_text,
    output_dir_problems,
    output_file_problems,
    read_records,
    replace_folder,
    same_path,
)


def report_path(output: Path) -> Path:
    return output.with_name(output.name + ".report.json")


def validation_path(output: Path) -> Path:
    """`data/llama_data.json` -> `data/llama_data.val.json`."""
    return output.with_name(f"{output.stem}.val{output.suffix or '.json'}")


def split_validation(records: Sequence[dict[str, Any]], fraction: float, seed: int,
                     ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, validation): a seeded random `fraction` of the rows, each part in the original order."""
    if fraction <= 0 or not records:
        return list(records), []
    count = max(1, round(len(records) * fraction))
    if count >= len(records):
        raise UserError(f"--val_fraction {fraction} leaves no training rows out of {len(records)}")
    chosen = set(random.Random(f"{seed}:validation").sample(range(len(records)), count))
    train = [record for index, record in enumerate(records) if index not in chosen]
    return train, [record for index, record in enumerate(records) if index in chosen]


def write_rows(path: Path, records: Sequence[dict[str, Any]], as_array: bool = False) -> None:
    atomic_write(path, json_array_text(records) if as_array else jsonl_text(records))


def write_report(path: Path, report: dict[str, Any]) -> None:
    """One JSON line: valid JSON for people and tools, and harmless to readers that take `data/*.json*` as rows."""
    atomic_write(path, json.dumps(report, ensure_ascii=False) + "\n")


def verify_rows(path: Path, records: Sequence[dict[str, Any]]) -> int:
    """Read `path` back and check it holds exactly `records` (the fields the trainer reads); the row count."""
    if not records:
        text = path.read_text(encoding="utf-8") if path.is_file() else None
        if text is None or text.strip() not in ("", "[]"):
            raise UserError(f"{path}: reading it back found something other than the empty output just written")
        return 0
    located = read_records(path)
    check_string_fields(path, located, required=("instruction", "input", "output"))
    if len(located) != len(records):
        raise UserError(f"{path}: reading it back found {len(located)} rows, {len(records)} were written")
    for (where, row), record in zip(located, records, strict=True):
        if any(row[key] != record[key] for key in ("instruction", "input", "output")):
            raise UserError(f"{path} {where}: reading it back found a different row than was written")
    return len(located)


def export_hf(folder: Path, train: Sequence[dict[str, Any]], validation: Sequence[dict[str, Any]]) -> Path:
    """A `datasets.DatasetDict` (train, and validation when there is one) saved with `save_to_disk`, published
    atomically; `meta` is kept as a JSON string column."""
    from datasets import Dataset, DatasetDict

    def table(records: Sequence[dict[str, Any]]) -> Dataset:
        return Dataset.from_list([{"instruction": r["instruction"], "input": r["input"], "output": r["output"],
                                   "meta": json.dumps(r.get("meta", {}), ensure_ascii=False)} for r in records])

    splits = {"train": table(train)}
    if validation:
        splits["validation"] = table(validation)
    staging = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        DatasetDict(splits).save_to_disk(str(staging))
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise UserError(f"cannot write {folder}: {error.strerror or error}") from None
    replace_folder(staging, folder)
    from datasets import load_from_disk

    loaded = load_from_disk(str(folder))
    if loaded["train"].num_rows != len(train):
        raise UserError(f"{folder}: reading the export back found {loaded['train'].num_rows} training rows")
    return folder


# --- before any work: every path the build writes -----------------------------------------------------------------


def path_problems(source: str, source_flag: str, output: str, extra_inputs: list[str], hf_dataset: str = "",
                  validation: bool = False) -> list[str]:
    """The output path, checked before any work: given, writable, not an input, not a folder; and every file the run
    writes beside it (report, validation split, work log, manifest, lock) and the --hf_dataset folder, never an
    input or a folder that holds anything else."""
    problems = [] if source else [f"{source_flag} is required (the input)"]
    if not output:
        return [*problems, "--output is required (the file to write)"]
    inputs = [name for name in (source, *extra_inputs) if name]
    problems += output_file_problems(output, "--output", inputs)
    if problems:
        return problems
    output_path = Path(output).expanduser()
    beside = {"report": report_path(output_path), "lock": Path(f"{output_path}.lock"),
              "work log": sidecar(output_path, ".work.jsonl"),
              "manifest": sidecar(output_path, ".manifest.json")}
    if validation:
        beside["validation split"] = validation_path(output_path)
    problems = [f"{clash}: this run writes its {what} there (beside --output {output_path}); rename the input or "
                "choose another --output"
                for what, path in beside.items() for clash in inputs if same_path(clash, path)]
    if hf_dataset:
        problems += hf_dataset_problems(Path(hf_dataset).expanduser().resolve(),
                                        [output_path, *beside.values(), *map(Path, inputs)])
    return problems


def hf_dataset_problems(folder: Path, files: list[Path]) -> list[str]:
    """--hf_dataset is replaced as a whole: only a new folder, an empty one or an earlier export, and never one that
    holds the output, its companions or an input."""
    if problems := output_dir_problems(folder, "--hf_dataset"):
        return problems
    inside = next((path for path in files if folder in path.expanduser().resolve().parents), None)
    if inside is not None:
        return [(f"--hf_dataset {folder}: holds {inside}, which replacing the folder would delete; choose a folder of "
                "its own")]
    if folder.is_dir() and any(folder.iterdir()) and not (folder / "dataset_dict.json").is_file():
        return [(f"--hf_dataset {folder}: holds other files (it is no earlier `datasets` export), which replacing it "
                "would delete; choose a new or empty folder")]
    return []


def check_some_rows(records: list[dict[str, Any]], output: Path, source: str) -> None:
    """A build whose every row was filtered out writes nothing: an empty file is no success."""
    if not records:
        raise UserError(f"no rows survived the quality gates (see the counts above), so nothing was written to "
                        f"{output}; check {source}")
