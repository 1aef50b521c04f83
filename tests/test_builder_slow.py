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
from builder_support import read_jsonl

from utils.builder.report import SAMPLE_ROWS, distinct_bigram_ratio, duplicate_rate, sample
from utils.builder.safety import contentless, dose_or_frequency

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
    for phase in ("reading the graph", "building rows", "reverse look-ups", "near duplicates"):
        assert phase in result.stderr, phase  # a progress bar for every long phase
    assert seconds <= 300 and peak_gb <= 4.0, (seconds, peak_gb)
    rows = read_jsonl(out)
    answers = [row["output"] for row in rows]
    questions = [row["instruction"] for row in rows]
    assert len(rows) >= 50_000
    flagged = sum(1 for row in rows if dose_or_frequency(row["output"]) or contentless(row["output"],
                                                                                      row["meta"]["entities"]))
    assert flagged <= 0.001 * len(rows)
    assert duplicate_rate(questions) <= 0.01 and duplicate_rate(answers) <= 0.05
    assert distinct_bigram_ratio(sample(questions, SAMPLE_ROWS, 42)) >= 0.10
    report = json.loads((tmp_path / "cmekg.json.report.json").read_text(encoding="utf-8"))
    assert report["metrics"]["rows"] == len(rows) and report["predicates"]["unmapped"]["kinds"] > 0
    print(f"\ncMeKG: {len(rows)} rows in {seconds:.0f}s, peak {peak_gb:.2f} GB; {report['metrics']}")
