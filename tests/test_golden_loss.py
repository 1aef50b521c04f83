"""Golden loss: a fixed seed, the tiny LLaMA, a few steps. A silent change to tokenisation, masking, the
prompt, LoRA init, the optimiser or the schedule moves these numbers.

They hold on any machine: the base is the tests' tiny LLaMA (tests/conftest.py), whose tokenizer is learnt from
tests/fixtures/ and whose weights are the same bits on every processor (no pre-training, utils/tiny_base.py), and
the rows are tests/fixtures/qa.jsonl; four LoRA steps then move the losses by less than 1e-5 between processors,
thread counts and BLAS code paths (measured with OMP_NUM_THREADS=1/2, ATEN_CPU_CAPABILITY=default/avx2 and MKL's
oldest code paths: the base's SHA-256 the same every time, the losses within 1e-6). Editing data/ changes nothing
here. When a change is meant to move them, rerun with GOLDEN_RECORD=1 (`GOLDEN_RECORD=1 python -m pytest -q
tests/test_golden_loss.py -s`), check the change is intended, and paste the printed values.
"""

import json
import os

import pytest
from conftest import train_adapter

# --packing False: the original recipe's padded random batches; True (the default): the same rows per step, packed
# (utils/training/batching.py). Step 1 agrees; later steps differ by a few 1e-4 because LoRA dropout draws its
# masks over differently shaped tensors (without dropout the two runs agree to 1e-5: tests/test_batching.py).
GOLDEN = {
    "False": ([8.3304, 8.3153, 8.2098, 8.2112], [8.371, 8.2921, 8.2475]),
    "True": ([8.3304, 8.315, 8.2094, 8.2111], [8.371, 8.2911, 8.2466]),
}


@pytest.mark.parametrize("packing", ["False", "True"])
def test_golden_loss(tiny_llama, train_file, tmp_path, packing):
    out = tmp_path / "golden"
    train_adapter(tiny_llama, train_file, out, "--seed", "42", "--val_set_size", "4", "--packing", packing)
    history = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    train = [round(entry["loss"], 4) for entry in history if "loss" in entry]
    evals = [round(entry["eval_loss"], 4) for entry in history if "eval_loss" in entry]
    if os.environ.get("GOLDEN_RECORD"):
        full = [entry.get("loss", entry.get("eval_loss")) for entry in history if {"loss", "eval_loss"} & set(entry)]
        print(f'\n    "{packing}": ({train}, {evals}),  # unrounded, in log order: {full}')
        pytest.skip("recorded golden losses; paste them into GOLDEN")
    golden_train, golden_evals = GOLDEN[packing]
    assert len(train) == 4 and len(evals) == 3  # steps 1-4; evaluations at the start, step 2 and step 4
    assert train == pytest.approx(golden_train, abs=2e-4)
    assert evals == pytest.approx(golden_evals, abs=2e-4)
    assert evals[-1] < evals[0]  # and it learns
