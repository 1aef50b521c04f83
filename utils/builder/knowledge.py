"""The template pipeline over a whole graph: every entity's rows, then the rows across entities, then the safety pass
(every row that shows an alarm sign, a serious adverse effect or an emergency disease says to seek care now / 120).

Deterministic for a seed: each entity (and each cross-entity key) draws from its own generator, and the rows come
out in the graph's order, so the same graph and seed give the same file byte for byte.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

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
from utils.builder.progress import progress_bar
from utils.builder.questions import interleave, single_entity_rows
from utils.builder.rows import Row, rng_for
from utils.builder.safety import stopped_gradually, with_care_advice

KINDS = ("fact", "case", "multi_fact", "dialogue", "reverse", "compare", "multi_hop", "vignette", "differential")


@dataclass(frozen=True)
class TemplateOptions:
    seed: int = 42
    per_entity: int = 16  # rows about one entity at most (its relations first, then the other kinds in turn)
    turns: int = 3  # user turns of a dialogue row
    kinds: frozenset[str] = field(default_factory=lambda: frozenset(KINDS))  # the question kinds to build
    combinable: frozenset[str] | None = None  # relations dialogues and two-relation rows may combine (None: all)


def default_kinds(kb: str) -> tuple[frozenset[str], dict[str, str]]:
    """The question kinds a build of `kb` makes by default, and the ones left out with the reason (`clinical.yaml`:
    on cMeKG, the kinds a clinician's review of the rows found not good enough)."""
    off = dict(resources.clinical()["kinds_off"].get(kb, {})) if kb == "cmekg" else {}
    return frozenset(kind for kind in KINDS if kind not in off), off


def chosen_kinds(question_kinds: str, kb: str) -> tuple[frozenset[str], dict[str, str]]:
    """`--question_kinds`: `default`, `all`, or a comma-separated list of kinds."""
    if question_kinds.strip() in ("", "default"):
        return default_kinds(kb)
    if question_kinds.strip() == "all":
        return frozenset(KINDS), {}
    asked = [kind.strip() for kind in question_kinds.split(",") if kind.strip()]
    return frozenset(asked), {kind: "not asked for (--question_kinds)" for kind in KINDS if kind not in asked}


def kinds_problems(question_kinds: str) -> list[str]:
    if question_kinds.strip() in ("", "default", "all"):
        return []
    unknown = [kind.strip() for kind in question_kinds.split(",") if kind.strip() and kind.strip() not in KINDS]
    return [f"--question_kinds: unknown kind {', '.join(unknown)} (known: {', '.join(KINDS)}, or default, all)"
            ] if unknown else []


def template_options(kb: str, question_kinds: str, seed: int, per_entity: int, turns: int,
                     ) -> tuple[TemplateOptions, dict[str, str]]:
    """The options of a build of `kb` (its default kinds and combinable relations, `clinical.yaml`), and the kinds
    left out with the reason."""
    kinds, off = chosen_kinds(question_kinds, kb)
    combinable = resources.clinical()["combinable"].get(kb)
    return TemplateOptions(seed, per_entity, turns, kinds, frozenset(combinable) if combinable else None), off


def entity_rows(entity: Entity, index: GraphIndex, options: TemplateOptions, compared: set[tuple[str, str]],
                ) -> list[Row]:
    """The rows about one entity: each relation once (a case, a dialogue, two at once, or plainly), then vignettes,
    multi-hop questions, comparisons and differentials in turn, up to `per_entity`."""
    kinds = options.kinds
    rng = rng_for(options.seed, "entity", entity.name)
    max_candidates = int(resources.cleaning()["max_vignette_candidates"])
    own = single_entity_rows(entity, rng, options.turns, kinds, options.combinable)
    disease = entity.kind == "disease"
    groups = [
        vignette_rows(entity, index, options.seed, max_candidates, kinds) if disease else [],
        multi_hop_rows(entity, index, options.seed) if "multi_hop" in kinds else [],
        comparison_rows(entity, index, options.seed, compared) if "compare" in kinds else [],
        shared_symptom_rows(entity, index, options.seed, max_candidates) if disease and "differential" in kinds
        else [],
    ]
    return (own + interleave(groups))[: options.per_entity]


def with_safety(row: Row, subject: Entity | None = None) -> Row:
    """The row with the care advice its question and answer call for (safety.care_advice); `subject`, the row's
    entity, tells more: a brand's generic names (诺和灵30R笔芯 is an insulin, never to be stopped on one's own) and
    a precaution against stopping it abruptly."""
    question = row.instruction.rsplit("<user>:", 1)[-1]
    generic = subject.values("generic_name") if subject else ()
    keep = bool(subject) and stopped_gradually("".join(subject.values("precaution")))
    answer = with_care_advice(question, row.output, "adverse" in row.relation, (*row.entities, *generic), keep)
    return row if answer == row.output else replace(row, output=answer)


def template_rows(entities: Sequence[Entity], options: TemplateOptions, progress: bool = False) -> list[Row]:
    """All template rows of a graph, before the quality gates."""
    index = GraphIndex(entities)
    compared: set[tuple[str, str]] = set()
    rows: list[Row] = []
    for entity in progress_bar(entities, "building rows", "entities", progress):
        rows.extend(entity_rows(entity, index, options, compared))
    rows.extend(reverse_rows(index, options.seed, options.kinds, progress))
    by_name = {entity.name: entity for entity in entities}
    return [with_safety(row, by_name.get(row.entities[0]) if row.entities else None) for row in rows]
