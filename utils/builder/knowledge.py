"""The template pipeline over a whole graph: every entity's rows, then the rows across entities, with a progress bar.

Deterministic for a seed: each entity (and each cross-entity key) draws from its own generator, and the rows come
out in the graph's order, so the same graph and seed give the same file byte for byte.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tqdm import tqdm

from utils.builder import resources
from utils.builder.crossing import (
    GraphIndex,
    comparison_rows,
    multi_hop_rows,
    reverse_rows,
    shared_symptom_rows,
    vignette_rows,
)
from utils.builder.graph import Entity
from utils.builder.questions import case_rows, dialogue_rows, fact_rows, interleave, multi_fact_rows
from utils.builder.rows import Row, rng_for


@dataclass(frozen=True)
class TemplateOptions:
    seed: int = 42
    per_entity: int = 16  # rows about one entity at most (facts first, then the other kinds in turn)
    turns: int = 3  # user turns of a dialogue row
    multi_facts: int = 2  # two-relation questions per entity


def entity_rows(entity: Entity, index: GraphIndex, options: TemplateOptions, compared: set[tuple[str, str]],
                ) -> list[Row]:
    """The rows about one entity: each relation once, then cases, vignettes, multi-hop, comparisons, two facts at
    once and a dialogue, taken in turn up to `per_entity`."""
    rng = rng_for(options.seed, "entity", entity.name)
    max_candidates = int(resources.cleaning()["max_vignette_candidates"])
    facts = fact_rows(entity, rng)
    groups = [
        case_rows(entity, rng),
        vignette_rows(entity, index, options.seed, max_candidates) if entity.kind == "disease" else [],
        multi_hop_rows(entity, index, options.seed),
        comparison_rows(entity, index, options.seed, compared),
        multi_fact_rows(entity, rng, options.multi_facts),
        dialogue_rows(entity, rng, options.turns),
        shared_symptom_rows(entity, index, options.seed, max_candidates) if entity.kind == "disease" else [],
    ]
    return (facts + interleave(groups))[: options.per_entity]


def template_rows(entities: Sequence[Entity], options: TemplateOptions, progress: bool = False) -> list[Row]:
    """All template rows of a graph, before the quality gates."""
    index = GraphIndex(entities)
    compared: set[tuple[str, str]] = set()
    rows: list[Row] = []
    for entity in tqdm(entities, desc="building rows", unit="entity", disable=not progress, mininterval=1.0):
        rows.extend(entity_rows(entity, index, options, compared))
    rows.extend(reverse_rows(entities, options.seed, progress))
    return rows
