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
from in_process import one_thread, run_main  # noqa: F401  one_thread: an autouse fixture

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
        with pytest.raises(UserError, match=r"--precision bf16.*cuda"):
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
    with pytest.raises(UserError, match="--device_map.*auto"):
        parse_device_map("everywhere")
    with pytest.raises(UserError, match="--device_map"):
        parse_device_map(1.5)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--device_map cuda:1"):
            parse_device_map("cuda:1")
        with pytest.raises(UserError, match="--device_map cuda:0"):
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


def gpu_check_module():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_check

    return gpu_check


def test_gpu_check_dry_run_reaches_every_check_on_cpu(tiny_llama, tmp_path):
    """`benchmarks/gpu_check.py --dry_run`: the plan at tiny shapes on CPU, through finetune.py and the Trainer: the
    checks that CPU can prove pass; those that need CUDA (flex_attention's backward, bitsandbytes, bf16, a GPU/CPU
    split, 7B memory) run their CPU part and say "needs a GPU", never passed; the multi-GPU rows are not covered."""
    gpu_check = gpu_check_module()
    code = run_main(gpu_check.main, "--dry_run", "--tokenizer_from", tiny_llama, "--output", tmp_path,
                    "--workdir", tmp_path).returncode
    summary = json.loads((tmp_path / "gpu-check-dry-run.json").read_text(encoding="utf-8"))
    checks = {check["name"]: check for check in summary["checks"]}
    statuses = {status: {n for n, c in checks.items() if c["status"] == status} for status in
                ("passed", "needs a GPU", "not covered")}
    assert code == 0 and summary["failed"] == [], [c for c in summary["checks"] if c["status"] == "failed"]
    assert statuses["passed"] == {"environment", "packing_sdpa", "resume", "export"}
    assert statuses["needs a GPU"] == {"packing_flex", "precision", "device_map", "throughput", "qlora"}
    assert statuses["not covered"] == set(gpu_check.NOT_COVERED)
    packing = checks["packing_sdpa"]["details"]
    assert packing["with checkpointing"]["difference"] <= packing["tolerance"]
    assert packing["sequences_see_each_other"]["difference"] > 10 * packing["tolerance"]  # the check has power
    assert packing["sequences_see_each_other"]["attention_calls"] == {"sdpa/None": 48}  # plain causal: they mix
    assert checks["packing_sdpa"]["work"] == {"finetune_runs": 5, "optimizer_steps": 30, "model_loads": 5}
    assert "accepted" in checks["export"]["details"]["1.0"]
    assert all("refused" in checks["export"]["details"][scale] for scale in ("0.75", "1.5"))
    assert "26/26" in checks["device_map"]["reason"] and "3 steps" in checks["throughput"]["reason"]
    assert "on CPU: error:" in checks["qlora"]["reason"]  # --load_4bit refused with one line before any work
    assert (tmp_path / "gpu-check-dry-run-scripts.log").stat().st_size > 0


def test_gpu_check_reruns_only_the_checks_named(tiny_llama, tmp_path, capsys):
    gpu_check = gpu_check_module()
    refused = run_main(gpu_check.main, "--dry_run", "--only", "resume,exprt", "--output", tmp_path)
    assert refused.returncode == 2 and "--only exprt" in refused.stderr
    code = run_main(gpu_check.main, "--dry_run", "--only", "export", "--tokenizer_from", tiny_llama, "--output",
                    tmp_path, "--workdir", tmp_path).returncode
    checks = json.loads((tmp_path / "gpu-check-dry-run.json").read_text(encoding="utf-8"))["checks"]
    ran = [c["name"] for c in checks if c["status"] != "not covered"]
    assert code == 0 and ran == ["environment", "export"]
    assert checks[1]["status"] == "passed" and checks[1]["work"]["finetune_runs"] == 1  # it trained its adapter


def test_gpu_check_limits_each_check_and_goes_on(tmp_path, monkeypatch):
    """A check past its limit fails ("TimedOut") and the next one still runs; the report is on disk after each."""
    import time

    gpu_check = gpu_check_module()
    monkeypatch.setitem(gpu_check.LIMITS, "environment", 0.2)
    report = gpu_check.Report(tmp_path / "r.json", dry_run=False, limits=True, work={"runs": 0})
    report.run("environment", lambda: time.sleep(5) or {})
    report.run("export", lambda: {"ok": True})
    written = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert [c["status"] for c in written["checks"]] == ["failed", "passed"]
    assert "TimedOut" in written["checks"][0]["error"] and written["checks"][0]["seconds"] < 2


def test_gpu_check_environment_fails_on_a_missing_package(monkeypatch):
    """Strict: a package the scripts need that does not import fails the environment check (on the GPU machine it
    must travel as a wheel); bitsandbytes is excused only in a dry run."""
    import importlib

    gpu_check = gpu_check_module()
    real = importlib.import_module

    def without(name):
        def import_module(module, *args, **kwargs):
            if module == name:
                raise ImportError(f"No module named {name!r}")
            return real(module, *args, **kwargs)
        return import_module

    monkeypatch.setattr(importlib, "import_module", without("fire"))
    with pytest.raises(gpu_check.CheckFailed, match="fire does not import"):
        gpu_check.environment(dry_run=True)
    monkeypatch.setattr(importlib, "import_module", without("bitsandbytes"))
    assert gpu_check.environment(dry_run=True)["bitsandbytes"] is None


def test_gpu_check_flops_count_the_real_model():
    """The throughput check's FLOPs: 4 per frozen matmul weight and token (forward, input gradient), 6 with
    recomputation, counted from the LLaMA-7B shape against the parameters of the model transformers builds."""
    from transformers import AutoConfig, AutoModelForCausalLM

    gpu_check = gpu_check_module()
    shape = gpu_check.SHAPES["llama-7b"]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **shape, tie_word_embeddings=False))
    matmuls = sum(p.numel() for n, p in model.named_parameters() if n.endswith("proj.weight"))
    assert gpu_check.flops_per_token(shape, context=0, label_share=0, recompute=False) == 4 * matmuls
    assert gpu_check.flops_per_token(shape, context=0, label_share=0, recompute=True) == 6 * matmuls
    assert gpu_check.flops_per_token(shape, 0, 1.0, False) - 4 * matmuls == 4 * model.lm_head.weight.numel()
    attention = gpu_check.flops_per_token(shape, 100, 0, False) - 4 * matmuls
    assert attention == 3 * shape["num_hidden_layers"] * 4 * shape["hidden_size"] * 100  # QK^T, PV; backward 2x


def test_gpu_check_without_a_gpu_says_how_to_dry_run(capsys, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    gpu_check = gpu_check_module()
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # main() narrows it to one GPU; restored after
    result = run_main(gpu_check.main)
    assert result.returncode == 2 and "--dry_run" in result.stderr


@pytest.mark.parametrize("visible, chosen, after", [
    (None, "0", "0"), ("2,3", "2", "2"), ("1", None, "1"), ("", None, ""),
])
def test_gpu_check_runs_on_one_gpu(visible, chosen, after):
    """On a machine with several GPUs gpu_check narrows CUDA_VISIBLE_DEVICES to the first before CUDA starts: its
    in-process finetune.py runs are one process, which finetune.py refuses with several GPUs visible."""
    gpu_check = gpu_check_module()
    environ = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    assert gpu_check.one_gpu(environ) == chosen
    assert environ["CUDA_VISIBLE_DEVICES"] == after


# --- on a CUDA GPU ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
def test_gpu_check_on_this_gpu(tmp_path):
    """The full plan on the lent GPU (minutes): docs/multi_gpu.md gives the command for the lent machine."""
    result = run_script("benchmarks/gpu_check.py", "--output", str(tmp_path), timeout=1800)
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


def test_bf16_on_cpu_autocasts_as_the_trainer_does(tiny_llama, train_file, tmp_path, monkeypatch):
    """`--precision bf16` on CPU trains under the Trainer's bf16 autocast (accelerate's mixed precision), as on a GPU,
    not in bare bf16."""
    from conftest import train_adapter

    import finetune

    seen = {}
    build = finetune.build_trainer

    def spy(*args, **kwargs):
        trainer, batching = build(*args, **kwargs)
        seen["mixed_precision"] = trainer.accelerator.mixed_precision
        return trainer, batching

    monkeypatch.setattr(finetune, "build_trainer", spy)
    train_adapter(tiny_llama, train_file, tmp_path / "bf16", "--precision", "bf16", "--max_steps", "1")
    assert seen["mixed_precision"] == "bf16"


@pytest.mark.parametrize("engine", ["deepspeed", "fsdp"])
def test_a_quantised_base_with_a_sharding_engine_is_refused_before_any_work(engine, monkeypatch):
    from utils.training.args import FinetuneArgs
    from utils.training.engines import engine_problems

    if engine == "fsdp":
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    args = FinetuneArgs(load_4bit=True, deepspeed="configs/deepspeed/zero2.json" if engine == "deepspeed" else "")
    problems = engine_problems(args, require_cuda=False)
    assert any("--load_8bit/--load_4bit" in problem for problem in problems), problems
