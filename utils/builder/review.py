"""A stratified sample of a build's rows for a clinician to read (docs/data_review.md):

    python -m utils.builder.review --rows cmekg_data.json --per_kind 20 --seed 2024 > sample.md
    python -m utils.builder.review --rows cmekg_data.json --per_kind 20 --more fact=40 --seed 2024  # 40 facts

The same rows and seed give the same sample: each question kind's rows are drawn with `random.Random(f"{seed}:{kind}")`,
and printed as a Markdown table (one row a line, the question and answer quoted whole) with an empty label column to
fill in: correct / useless / garbled / misleading and a one-line reason.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils.core.cli import flag
from utils.core.errors import UserError


def stratified(rows: list[dict[str, Any]], per_kind: int, seed: int, more: dict[str, int] | None = None,
               ) -> dict[str, list[tuple[int, dict[str, Any]]]]:
    """Up to `per_kind` (line number, row) pairs of each kind (`more` of the kinds it names), in file order."""
    by_kind: dict[str, list[tuple[int, dict[str, Any]]]] = defaultdict(list)
    for number, row in enumerate(rows, start=1):
        by_kind[row.get("meta", {}).get("kind", "?")].append((number, row))
    sizes = {kind: (more or {}).get(kind, per_kind) for kind in by_kind}
    return {kind: sorted(random.Random(f"{seed}:{kind}").sample(found, min(sizes[kind], len(found))),
                         key=lambda pair: pair[0])
            for kind, found in sorted(by_kind.items())}


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").strip()


@dataclass(frozen=True)
class ReviewArgs:
    """The flags of `python -m utils.builder.review`."""

    rows: str = flag("", "a build's output (JSON Lines)")
    per_kind: int = flag(20, "rows drawn of each question kind", low=1)
    seed: int = flag(2024, "the draw's seed (the same rows and seed give the same sample)")
    more: str = flag("", "kind=rows pairs drawing more of the kinds they name (fact=40,case=30)")


def sample(args: ReviewArgs) -> None:
    """Print the stratified sample of the rows file (JSON Lines) as Markdown tables, one per question kind; `more`
    (fact=40,case=30) draws more rows of the kinds it names (a kind with a large share, for a sharper estimate)."""
    rows, per_kind, seed, more = args.rows, args.per_kind, args.seed, args.more
    path = Path(rows)
    if not path.is_file():
        raise UserError(f"--rows {rows}: no such file (a build's JSON Lines output)")
    try:
        sizes = {kind.strip(): int(size) for kind, size in (part.split("=") for part in more.split(",") if part)}
    except ValueError:
        raise UserError(f"--more {more}: expected kind=rows pairs, e.g. fact=40") from None
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for kind, drawn in stratified(records, per_kind, seed, sizes).items():
        print(f"\n#### {kind} ({len(drawn)} of {sum(1 for r in records if r.get('meta', {}).get('kind') == kind)})\n")
        print("| line | question | answer | label | reason |\n| --- | --- | --- | --- | --- |")
        for number, row in drawn:
            print(f"| {number} | {cell(row['instruction'])} | {cell(row['output'])} |  |  |")


if __name__ == "__main__":
    from utils.core.cli import run_cli

    run_cli(sample)
