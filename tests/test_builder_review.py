"""The clinical review (docs/data_review.md) as a regression test: no row labelled misleading or garbled in any round
comes back when the rows of its entity are rebuilt with `--kb cmekg`'s default kinds, and the rows labelled correct
in the final round do (so the rebuild below is the build's, not a stand-in that trivially lacks the wrong rows)."""

from __future__ import annotations

from functools import cache

from builder_support import cmekg_entities, flat, review_table

from utils.builder.crossing import GraphIndex
from utils.builder.knowledge import entity_rows, template_options, with_safety


@cache
def rebuilt(name: str) -> frozenset[tuple[str, str]]:
    """(question, answer) of every row the default cMeKG build makes about `name`, before the gates (which only ever
    remove rows)."""
    entity = next((entity for entity in cmekg_entities() if entity.name == name), None)
    if entity is None:
        return frozenset()
    options, _ = template_options("cmekg", "default", 42, 16, 3)
    rows = entity_rows(entity, GraphIndex([entity]), options, set())
    return frozenset((flat(row.instruction), flat(row.output)) for row in (with_safety(row, entity) for row in rows))


def test_no_row_labelled_wrong_in_a_review_round_comes_back() -> None:
    wrong = review_table("### Rows labelled wrong in any round")
    assert len(wrong) >= 100 and {row["label"] for row in wrong} == {"misleading", "garbled"}
    back = [row for row in wrong if (row["question"], row["answer"]) in rebuilt(row["entity"])]
    assert not back, [(row["round"], row["entity"], row["answer"]) for row in back]
    assert sum(1 for name in {row["entity"] for row in wrong} if rebuilt(name)) >= 50  # the entities still have rows


def test_the_final_rounds_correct_rows_are_rebuilt_as_they_were() -> None:
    entities = {entity.name: entity for entity in cmekg_entities()}
    correct = [row for heading in ("#### case", "#### fact") for row in review_table(heading)
               if row["label"] == "correct"]
    assert len(correct) >= 80
    missing = [row["line"] for row in correct  # the row's entity is one the question names
               if not any((row["question"], row["answer"]) in rebuilt(name) for name in entities
                          if name in row["question"])]
    assert not missing, missing


def test_the_review_command_prints_a_stratified_sample(tmp_path, capsys) -> None:
    from builder_support import write_jsonl

    from utils.builder.review import sample
    from utils.core.cli import run_cli

    rows = [{"instruction": f"问题{n}", "output": f"答案{n}", "meta": {"kind": "fact" if n % 2 else "case"}}
            for n in range(10)]
    path = write_jsonl(tmp_path / "rows.json", rows)
    run_cli(sample, ["--rows", str(path), "--per_kind", "2", "--more", "fact=3", "--seed", "7"])
    out = capsys.readouterr().out
    assert "#### case (2 of 5)" in out and "#### fact (3 of 5)" in out
