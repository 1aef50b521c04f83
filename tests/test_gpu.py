"""The GPU paths: what can be checked on CPU here (precision choice, warm-up, --device_map parsing, the whole
`benchmarks/gpu_check.py` plan at tiny shapes), and tests marked `gpu` that run the real thing when CUDA is present
(`python -m pytest -m gpu`; they skip on a machine without CUDA)."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, run_script
from in_process import one_thread  # noqa: F401  an autouse fixture
from test_batching import flash_attention_on_cpu  # noqa: F401  the fixture: CPU kernels for transformers' flash path

from utils.core.errors import UserError
from utils.runtime import parse_device_map, resolve_precision
from utils.training import setup

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize(("gpu", "native", "emulated", "auto"), [
    ("A100/H100 (compute capability 8.0+)", True, True, "bf16"),
    ("V100/T4 (bf16 only emulated)", False, True, "fp16"),
])
def test_precision_auto_takes_bf16_only_where_the_gpu_computes_it_natively(monkeypatch, gpu, native, emulated, auto):
    """torch.cuda.is_bf16_supported() counts emulation (a V100 or T4 says True, and runs bf16 several times slower);
    --precision auto must ask for native support. The GPU's answers are stood in for; the choice is the real code."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: emulated if including_emulation else native)
    assert resolve_precision("auto", "cuda") == auto, gpu
    if native:
        assert resolve_precision("bf16", "cuda") == "bf16"
    else:
        with pytest.raises(UserError, match="--precision bf16 is not supported natively on this cuda device"):
            resolve_precision("bf16", "cuda")
    assert resolve_precision("fp16", "cuda") == "fp16"


def test_the_published_command_line_warms_up_like_the_original_recipe():
    """BenTsao's published run: 8,658 rows, --batch_size 128, 10 epochs, the default validation split (500 rows):
    8,158 training rows, 64 steps an epoch, 640 steps. The original recipe warmed up for 100 of them."""
    rows = 8658
    validation = setup.resolve_val_size(None, rows)
    steps = setup.total_steps(rows - validation, batch_size=128, num_epochs=10, max_steps=-1)
    assert (validation, steps) == (500, 640)
    assert setup.warmup(100, steps) == 100
    assert setup.warmup(100, 4) == 0 and setup.warmup(100, 40) == 8  # a short run is not spent warming up
    assert setup.warmup(0, steps) == 0 and setup.warmup(20, steps) == 20


def test_qlora_setup_checkpoints_without_reentrancy(tiny_llama, monkeypatch):
    """`--load_4bit True --gradient_checkpointing True`: build_peft_model prepares the base with peft's
    prepare_model_for_kbit_training, then every decoder layer is recomputed with use_reentrant=False (peft's own
    checkpointing call passes no such argument: reentrant, which torch deprecates). What runs is recorded in a
    training step; without CUDA a plain base stands in for the 4-bit one bitsandbytes would load."""
    import transformers.modeling_utils
    from torch.utils.checkpoint import checkpoint
    from transformers import AutoModelForCausalLM

    calls = []

    def recorded(function, *args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return checkpoint(function, *args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", recorded)
    import peft

    prepared, prepare = [], peft.prepare_model_for_kbit_training
    monkeypatch.setattr(peft, "prepare_model_for_kbit_training",
                        lambda model, **kwargs: prepared.append(kwargs) or prepare(model, **kwargs))
    args = SimpleNamespace(load_8bit=False, load_4bit=True, gradient_checkpointing=True, lora_r=4, lora_alpha=8,
                           lora_dropout=0.0)
    model = setup.build_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), ["q_proj", "v_proj"], args)
    model.train()
    ids = torch.tensor([[1, 5, 9, 14, 2]])
    model(input_ids=ids, labels=ids).loss.backward()
    assert prepared == [{"use_gradient_checkpointing": False}]
    assert calls == [False] * model.config.num_hidden_layers
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_parse_device_map():
    assert parse_device_map("") is None and parse_device_map(None) is None
    for strategy in ("auto", "balanced", "balanced_low_0", "sequential"):
        assert parse_device_map(strategy) == strategy
    assert parse_device_map("cpu") == {"": "cpu"}
    with pytest.raises(UserError, match="--device_map must be one of auto, balanced"):
        parse_device_map("everywhere")
    with pytest.raises(UserError, match="--device_map must be one of"):
        parse_device_map(1.5)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--device_map cuda:1: no such CUDA device"):
            parse_device_map("cuda:1")
        with pytest.raises(UserError, match="--device_map cuda:0: no such CUDA device"):
            parse_device_map(0)  # fire passes a bare GPU index as an int


def test_bad_device_map_is_one_line(tiny_llama, monkeypatch, capsys):
    import infer
    from utils.core.cli import run_cli

    monkeypatch.setattr(sys, "argv", ["infer.py", "--base_model", str(tiny_llama), "--use_lora", "False",
                                      "--device_map", "everywhere"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        run_cli(infer.main)
    expected = ("error: --device_map must be one of auto, balanced, balanced_low_0, sequential or a device "
                "(cpu, mps, cuda, cuda:1), got 'everywhere'")
    assert exit_.value.code == 2 and capsys.readouterr().err.strip().splitlines() == [expected]


def test_gpu_check_dry_run_runs_the_whole_plan_on_cpu(tiny_llama, tmp_path):
    """`benchmarks/gpu_check.py --dry_run`: every check of the GPU plan at tiny shapes on CPU; what needs CUDA,
    bitsandbytes or flash-attn is reported "needs a GPU", never passed; one JSON report; exit 0."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_check

    report = tmp_path / "report.json"
    code = gpu_check.main(["--dry_run", "--tokenizer_from", str(tiny_llama), "--output", str(report),
                           "--workdir", str(tmp_path)])
    summary = json.loads(report.read_text(encoding="utf-8"))
    statuses = {check["name"]: check["status"] for check in summary["checks"]}
    assert code == 0 and summary["failed"] == [], [c for c in summary["checks"] if c["status"] == "failed"]
    for name in ("environment", "packed_training[tiny, sdpa]", "packed_training[tiny-qwen2, sdpa]",
                 "gradient_checkpointing[tiny]", "benchmark[tiny, sdpa]", "resume", "device_map_auto",
                 "export_bf16"):
        assert statuses[name] == "passed", name
    for name in ("packed_training[tiny, flash_attention_2]", "precision", "qlora_4bit", "lora_8bit"):
        assert statuses[name] == "needs a GPU", name  # not silently passed on CPU
    packed = next(c for c in summary["checks"] if c["name"] == "packed_training[tiny, sdpa]")["details"]
    assert packed["logit_difference"] <= 1e-4 * packed["largest_logit"] < packed["leak_difference"]


@pytest.mark.usefixtures("flash_attention_on_cpu")
def test_gpu_check_flash_attention_check_runs_the_varlen_layout():
    """gpu_check's FlashAttention-2 check (reported "needs a GPU" in the dry run) through transformers' real flash
    path with the CPU kernels of tests/test_batching.py: the code the GPU will run, at a tiny shape."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu as bench
    import gpu_check

    model, _ = bench.build_model("tiny", "cpu", torch.float32, gradient_checkpointing=False, lora_dropout=0.0)
    model.get_base_model().set_attn_implementation("flash_attention_2")
    details = gpu_check.packed_training(model, "tiny", "flash_attention_2", "cpu", torch.float32)
    assert "varlen" in details["layout"]
    assert details["logit_difference"] <= 1e-4 * details["largest_logit"] < details["leak_difference"]


def test_gpu_check_without_a_gpu_says_how_to_dry_run(capsys, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_check

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # main() narrows it to one GPU; restored after
    assert gpu_check.main([]) == 2 and "--dry_run" in capsys.readouterr().err


@pytest.mark.parametrize("visible, chosen, after", [
    (None, "0", "0"), ("2,3", "2", "2"), ("1", None, "1"), ("", None, ""),
])
def test_gpu_check_runs_on_one_gpu(visible, chosen, after):
    """On a machine with several GPUs gpu_check narrows CUDA_VISIBLE_DEVICES to the first before CUDA starts: its
    in-process finetune.py runs are one process, which finetune.py refuses with several GPUs visible."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_check

    environ = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    assert gpu_check.one_gpu(environ) == chosen
    assert environ["CUDA_VISIBLE_DEVICES"] == after


# --- on a CUDA GPU ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
def test_gpu_check_on_this_gpu(tmp_path):
    """The full plan on the lent GPU: 7B-shaped LLaMA and Qwen2.5, quantized steps, resume, export (minutes)."""
    result = run_script("benchmarks/gpu_check.py", "--output", str(tmp_path / "report.json"), timeout=1800)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]


@pytest.mark.gpu
@needs_cuda
def test_finetune_trains_on_the_gpu_in_bf16_or_fp16(tiny_llama, train_file, tmp_path):
    from conftest import train_adapter

    result = train_adapter(tiny_llama, train_file, tmp_path / "out", "--max_steps", "2")
    assert "device: cuda" in result.stdout
    expected = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    assert f"precision: {expected}" in result.stdout


@pytest.mark.gpu
@needs_cuda
def test_infer_device_map_auto_answers_as_without_it(tiny_llama, tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"instruction": q}, ensure_ascii=False) + "\n"
                                 for q in ("肝癌有哪些早期症状？", "发热时应该多喝水吗？")), encoding="utf-8")
    answers = []
    for extra in ([], ["--device_map", "auto"]):
        output = tmp_path / f"answers{len(extra)}.jsonl"
        result = run_script("infer.py", "--base_model", str(tiny_llama), "--use_lora", "False", "--instruct_dir",
                            str(questions), "--max_new_tokens", "8", "--num_beams", "1", "--output_file", str(output),
                            *extra)
        assert result.returncode == 0, result.stderr[-2000:]
        answers.append([json.loads(line)["model_output"] for line in output.read_text(encoding="utf-8").splitlines()])
    assert answers[0] == answers[1] and len(answers[0]) == 2
