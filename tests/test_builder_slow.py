"""The acceptance check of the whole cMeKG build (slow: about 1.5 minutes; `python -m pytest -m slow`)."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
from builder_support import flat, read_jsonl, review_table

from utils.builder.report import SAMPLE_ROWS, distinct_bigram_ratio, duplicate_rate, sample
from utils.builder.safety import contentless, dose_or_frequency, without_names

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_whole_cmekg_builds_within_the_targets(tmp_path: Path) -> None:
    out = tmp_path / "cmekg.json"
    started = time.monotonic()
    result = subprocess.run([sys.executable, "build_dataset.py", "knowledge", "--kb", "cmekg", "--output", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=900, check=False,
                            env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    seconds = time.monotonic() - started
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2  # kilobytes on Linux
    assert result.returncode == 0, result.stderr[-3000:]
    for phase in ("reading the graph", "building rows", "near duplicates"):
        assert f"{phase}:" in result.stderr, phase  # one line per long phase in a log, never a bar's \r redraws
    assert "\r" not in result.stderr
    assert seconds <= 300 and peak_gb <= 4.0, (seconds, peak_gb)
    rows = read_jsonl(out)
    answers = [row["output"] for row in rows]
    questions = [row["instruction"] for row in rows]
    assert len(rows) >= 50_000
    assert {row["meta"]["kind"] for row in rows} == {"fact", "case"}  # the kinds cMeKG's review passed
    assert not [row for row in rows if dose_or_frequency(without_names(row["output"], row["meta"]["entities"]))]
    assert sum(contentless(row["output"], row["meta"]["entities"]) for row in rows) <= 0.001 * len(rows)
    assert duplicate_rate(questions) <= 0.01 and duplicate_rate(answers) <= 0.05
    assert distinct_bigram_ratio(sample(questions, SAMPLE_ROWS, 42)) >= 0.10
    report = json.loads((tmp_path / "cmekg.json.report.json").read_text(encoding="utf-8"))
    assert report["metrics"]["rows"] == len(rows) and report["predicates"]["unmapped"]["kinds"] > 0
    lint = report["lint"]
    zero = ("alarm_sign_without_120", "single_diagnosis_from_few_nonspecific_symptoms", "dose_or_interval",
            "tautology", "excipient", "invented_reassurance", "evaluation_pairs")
    assert {name: lint[name] for name in zero} == dict.fromkeys(zero, 0), lint
    assert lint["contentless_share"] <= 0.001 and lint["restated_share"] <= 0.10, lint
    assert set(report["kinds"]["off"]) >= {"vignette", "differential", "dialogue"}  # said, with the reasons
    assert report["entities"]["without_rows"]["total"] > 0 and report["entities"]["without_rows"]["by_reason"]
    # no row the clinical review labelled misleading or garbled, in any round (docs/data_review.md)
    built = {(flat(row["instruction"]), flat(row["output"])) for row in rows}
    wrong = review_table("### Rows labelled wrong in any round")
    assert not [row["answer"] for row in wrong if (row["question"], row["answer"]) in built]
    print(f"\ncMeKG: {len(rows)} rows in {seconds:.0f}s, peak {peak_gb:.2f} GB; {report['metrics']['rows_by_kind']}; "
          f"lint {lint}")
