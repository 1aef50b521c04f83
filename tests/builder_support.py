"""Shared by the builder's tests: the real cMeKG graph read once per test session (curated as a build curates it),
small graphs made by hand."""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

from utils.builder.curation import curate
from utils.builder.graph import (
    Entity,
    GraphStats,
    RawEntity,
    build_entity,
    graph_from_mapping,
    predicate_map,
    read_graph,
)

REPO = Path(__file__).resolve().parent.parent
SUBSET_STEP = 12  # every 12th subject of cMeKG: a deterministic subset of about 2,300 entities


@cache
def cmekg_raw() -> tuple[RawEntity, ...]:
    """Every subject of the installed cMeKG graph (read once per process, through the no-globals unpickler)."""
    return tuple(read_graph("cmekg")[0])


@cache
def cmekg_entities() -> tuple[Entity, ...]:
    """Every entity of cMeKG as `--kb cmekg` reads it: cleaned, then curated against the whole graph."""
    stats = GraphStats()
    built = (build_entity(raw, predicate_map(), stats) for raw in cmekg_raw())
    return tuple(curate([entity for entity in built if entity is not None], stats, "cmekg"))


@cache
def cmekg_subset() -> tuple[Entity, ...]:
    """Every 12th entity of the curated graph: a deterministic subset of about 2,300 entities."""
    return cmekg_entities()[::SUBSET_STEP]


@cache
def cmekg_neighbourhood(*words: str) -> tuple[Entity, ...]:
    """The real subjects of cMeKG whose symptom values mention one of `words` (as the source writes them)."""
    wanted = set(predicate_map().relations["symptom"].predicates)
    stats = GraphStats()
    raws = [raw for raw in cmekg_raw() if any(word in value for predicate, values in raw.predicates
                                               if predicate in wanted for value in values for word in words)]
    entities = (build_entity(raw, predicate_map(), stats) for raw in raws)
    return tuple(entity for entity in entities if entity is not None)


def entities_from(graph: dict[str, dict[str, list[str]]]) -> list[Entity]:
    """Clean, curated entities of a hand-made {subject: {predicate: [values]}} graph (cMeKG's shape)."""
    stats = GraphStats()
    built = (build_entity(raw, predicate_map(), stats) for raw in graph_from_mapping(graph, "test graph"))
    return curate([entity for entity in built if entity is not None], stats)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


_CELL = re.compile(r"(?<!\\)\|")


def review_table(heading: str) -> list[dict[str, str]]:
    """The rows of the Markdown table after `heading` in docs/data_review.md, by column name (cells unescaped)."""
    lines = (REPO / "docs" / "data_review.md").read_text(encoding="utf-8").split(heading, 1)[1].splitlines()
    start = next(number for number, line in enumerate(lines) if line.startswith("|"))
    header = [cell.strip() for cell in _CELL.split(lines[start])[1:-1]]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip().replace("\\|", "|") for cell in _CELL.split(line)[1:-1]]
        rows.append(dict(zip(header, cells, strict=True)))
    return rows


def flat(text: str) -> str:
    """A row's text as the review quotes it (a dialogue's turns on one line)."""
    return text.replace("\n", " ").strip()
