"""The benchmark scripts run end to end on tiny sizes (the figures themselves come from the full runs)."""

import json

from conftest import run_script


def json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def test_cpu_benchmark_on_a_few_rows(tiny_llama, tmp_path):
    result = run_script("benchmarks/cpu.py", "--rows", "40", "--questions", "6", "--max_new_tokens", "4",
                        "--base_model", str(tiny_llama), "--workdir", str(tmp_path))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    train, infer = json_lines(result.stdout)
    assert train["name"] == "train" and infer["name"] == "infer"
    for line in (train, infer):
        assert {"baseline_s", "ours_s", "speedup", "pad_fraction"} <= line.keys()
        assert line["baseline_s"] > 0 and line["ours_s"] > 0 and line["speedup"] > 0
    assert train["rows"] == 40 and train["steps"]["baseline"] == train["steps"]["ours"] == 1
    assert train["batching"] == {"baseline": "padded", "ours": "pack"}
    assert train["pad_fraction"]["ours"] < train["pad_fraction"]["baseline"]
    # one step, the same rows, LoRA B still zero (so dropout changes nothing): the same loss
    assert abs(train["train_loss"]["ours"] - train["train_loss"]["baseline"]) <= 2e-4
    assert infer["answers_identical"] == "6/6" and infer["batch_size"] == {"baseline": 1, "ours": 32}

