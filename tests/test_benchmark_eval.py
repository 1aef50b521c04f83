"""evaluate.py --benchmark: the published layouts of CMMLU, C-Eval, CMB, CMExam and MedQA-MCMLE (fixtures written
here with the project's own questions, never the benchmarks' files), CMMLU's scoring checked against a reference
written from the authors' code, base and adapters side by side in one run, and bad input as one error line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from in_process import one_thread, run_main  # noqa: F401  (one_thread: an autouse fixture)

import evaluate
from utils.evaluation import benchmarks

# (question, choices A-D, answer): the project's own, plain textbook facts.
MEDICAL = [
    ("人体最大的器官是", ["肝脏", "皮肤", "肺", "大脑"], "B"),
    ("胰岛素由下列哪种细胞分泌", ["胰岛A细胞", "胰岛B细胞", "肝细胞", "胃壁细胞"], "B"),
    ("长期缺乏维生素C可引起", ["夜盲症", "佝偻病", "坏血病", "脚气病"], "C"),
    ("红细胞的主要功能是", ["运输氧气", "凝血", "吞噬细菌", "产生抗体"], "A"),
    ("正常成人安静时的心率范围一般是每分钟", ["20～40次", "40～50次", "60～100次", "120～160次"], "C"),
    ("胆汁由哪个器官分泌", ["胆囊", "胰腺", "脾脏", "肝脏"], "D"),
    ("人体内含量最多的无机盐是", ["钙", "钠", "铁", "锌"], "A"),
    ("成人血液中白细胞的正常值约为每升", ["（1～2）×10⁹", "（4～10）×10⁹", "（20～30）×10⁹", "（100～300）×10⁹"], "B"),
]
GENERAL = [
    ("中国的首都是", ["上海", "广州", "北京", "南京"], "C"),
    ("水的化学式是", ["CO2", "H2O", "O2", "NaCl"], "B"),
    ("一年有几个季节", ["两个", "三个", "四个", "五个"], "C"),
    ("2加3等于", ["4", "5", "6", "7"], "B"),
    ("太阳从哪个方向升起", ["东方", "西方", "南方", "北方"], "A"),
    ("一周有几天", ["五天", "六天", "七天", "八天"], "C"),
]
CMMLU_SUBJECTS = {"anatomy": MEDICAL[:4], "clinical_knowledge": MEDICAL[4:], "elementary_commonsense": GENERAL}
CMMLU_NAMES = {"anatomy": "解剖学", "clinical_knowledge": "临床知识", "elementary_commonsense": "小学常识"}
DEV = [("人的正常体温约为", ["30℃", "37℃", "42℃", "45℃"], "B"), ("一天有多少小时", ["12", "20", "24", "36"], "C"),
       ("成人有多少颗恒牙（含智齿）", ["20", "24", "28", "32"], "D")]


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as handle:
        csv.writer(handle).writerows([header, *rows])
    return path


def cmmlu_folder(root: Path) -> Path:
    """CMMLU's layout: dev/ and test/ with SUBJECT.csv, an unnamed index column, Question, A-D, Answer."""
    for subject, items in CMMLU_SUBJECTS.items():
        for split, rows in (("test", items), ("dev", DEV)):
            write_csv(root / split / f"{subject}.csv", ["", "Question", "A", "B", "C", "D", "Answer"],
                      [[10 + i, q, *choices, answer] for i, (q, choices, answer) in enumerate(rows)])
    return root


def ceval_folder(root: Path) -> Path:
    """C-Eval's layout: dev/, val/, test/ with SUBJECT_SPLIT.csv (id, question, A-D, answer; test has no answers)."""
    for subject, items in (("clinical_medicine", MEDICAL[:3]), ("high_school_geography", GENERAL[:3])):
        write_csv(root / "val" / f"{subject}_val.csv", ["id", "question", "A", "B", "C", "D", "answer"],
                  [[i, q, *c, a] for i, (q, c, a) in enumerate(items)])
        write_csv(root / "dev" / f"{subject}_dev.csv", ["id", "question", "A", "B", "C", "D", "answer", "explanation"],
                  [[i, q, *c, a, ""] for i, (q, c, a) in enumerate(DEV)])
        write_csv(root / "test" / f"{subject}_test.csv", ["id", "question", "A", "B", "C", "D"],
                  [[i, q, *c] for i, (q, c, _) in enumerate(items)])
    return root


def cmb_file(root: Path) -> Path:
    """CMB-Exam's JSON: exam_type, exam_class, question_type, question, option {A..E}, answer (several letters for
    a 多项选择题); the few-shot examples in ../CMB-val/CMB-val-merge.json."""
    def item(number, q, choices, answer, exam_class="执业医师", kind="单项选择题"):
        return {"id": number, "exam_type": "医师考试", "exam_class": exam_class, "exam_subject": "临床执业医师",
                "question": q, "answer": answer, "question_type": kind,
                "option": dict(zip("ABCDE", [*choices, "以上都不是"], strict=True))}
    rows = [item(i + 1, q, c, a, "执业医师" if i < 3 else "执业护士") for i, (q, c, a) in enumerate(MEDICAL[:6])]
    rows.append(item(7, "属于人体消化器官的是", ["胃", "小肠", "肺", "肾"], "AB", kind="多项选择题"))
    path = root / "CMB-test" / "CMB-test-choice-question-merge.json"
    for where, data in ((path, rows), (root / "CMB-val" / "CMB-val-merge.json", [item(1, *DEV[0])])):
        where.parent.mkdir(parents=True, exist_ok=True)
        where.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
    return path


def cmexam_file(root: Path) -> Path:
    """CMExam's CSV: Question, Options ("A text" lines), Answer, Explanation and its annotation columns."""
    header = ["Question", "Options", "Answer", "Explanation", "Disease Group", "Clinical Department",
              "Medical Discipline", "Competency", "Difficulty level"]
    rows = [[q, "\n".join(f"{letter} {text}" for letter, text in zip("ABCD", c, strict=True)), a, "", "", "", "", "",
             ""] for q, c, a in MEDICAL[:5]]
    write_csv(root / "val.csv", header, rows[:1])
    return write_csv(root / "test.csv", header, rows)


def medqa_file(root: Path) -> Path:
    """MedQA's JSON Lines (Mainland): question, options {A..E}, answer (text), meta_info, answer_idx."""
    root.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"question": q, "options": dict(zip("ABCD", c, strict=True)), "answer": c["ABCD".index(a)],
                         "meta_info": "生理学", "answer_idx": a}, ensure_ascii=False) for q, c, a in MEDICAL[:5]]
    (root / "dev.jsonl").write_text(lines[0] + "\n", encoding="utf-8")
    path = root / "test.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_benchmark(*args: object):
    return run_main(evaluate.main, "--benchmark", *args)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# --- CMMLU, against a reference written from the authors' code -------------------------------------------------------


def reference_cmmlu(model_path: Path, data_dir: Path, n_shot: int, lora: Path | None = None) -> dict:
    """CMMLU's hf_causal_model.py eval, written again: per question the prompt of mp_utils.gen_prompt (the subject's
    Chinese name, the first n_shot dev rows with their answers, the question ending in 答案是：), one unpadded forward
    pass, the logits at the last position of the tokens of A, B, C, D (convert_tokens_to_ids), argmax."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model = (PeftModel.from_pretrained(model, lora) if lora else model).eval()
    choice_ids = [tokenizer.convert_tokens_to_ids(choice) for choice in "ABCD"]

    def example(row: list[str], include_answer: bool) -> str:
        text = "题目：" + row[1] + "".join(f"\n{letter}. {row[2 + j]}" for j, letter in enumerate("ABCD"))
        text += "\n答案是："
        return text + (f"{row[6]}\n\n" if include_answer else "")

    answers = {}
    for subject, name in CMMLU_NAMES.items():
        dev, test = (list(csv.reader((data_dir / split / f"{subject}.csv").read_text(encoding="utf-8")
                                     .splitlines()))[1:] for split in ("dev", "test"))
        head = f"以下是关于{name}的单项选择题，请直接给出正确答案的选项。\n\n"
        head += "".join(example(row, True) for row in dev[:n_shot])
        for row in test:
            prompt = head + example(row, False)
            with torch.no_grad():
                logits = model(**tokenizer(prompt, return_tensors="pt")).logits[:, -1, :]
            answers[(subject, int(row[0]))] = ("ABCD"[int(logits[0, choice_ids].argmax())], prompt)
    return answers


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory) -> list[Path]:
    """Two LoRA adapters with random (non-zero) weights on every linear layer: the untrained tiny base answers B to
    everything, these spread their answers over the letters, so agreeing with the reference means something."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folders = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(tiny_llama)
        config = LoraConfig(r=8, lora_alpha=64, target_modules="all-linear", init_lora_weights=False)
        folder = tmp_path_factory.mktemp(f"adapter{seed}")
        get_peft_model(model, config).save_pretrained(folder)
        folders.append(folder)
    return folders


def test_cmmlu_predictions_agree_with_the_authors_scoring(tiny_llama, adapters, tmp_path):
    data = cmmlu_folder(tmp_path / "cmmlu")
    report, predictions = tmp_path / "report.json", tmp_path / "preds.jsonl"
    result = run_benchmark(data, "--base_model", tiny_llama, "--lora_weights", adapters[0], "--n_shot", 2,
                           "--batch_size", 4, "--output", report, "--predictions_out", predictions)
    assert result.returncode == 0, result.stderr
    questions = sum(len(items) for items in CMMLU_SUBJECTS.values())
    for label, lora in (("base", None), (str(adapters[0]), adapters[0])):
        rows = [row for row in read_jsonl(predictions) if row["model"] == label]
        assert len(rows) == questions and {tuple(row) for row in rows} == {
            ("model", "subject", "index", "prediction", "answer")}
        reference = reference_cmmlu(tiny_llama, data, n_shot=2, lora=lora)
        assert {(row["subject"], row["index"]) for row in rows} == set(reference)  # the benchmark's own index
        agree = sum(row["prediction"] == reference[(row["subject"], row["index"])][0] for row in rows)
        assert agree / len(rows) >= 0.95, f"{label}: {agree}/{len(rows)} agree"
    assert len({row["prediction"] for row in rows}) >= 3  # the adapter's answers vary: the agreement is not vacuous
    rows = [row for row in read_jsonl(predictions) if row["model"] == "base"]
    # the prompts themselves are the authors', character for character
    bench = benchmarks.read_benchmark(data, n_shot=2)
    prompts = benchmarks.build_prompts(bench, n_shot=2)
    assert prompts == [reference[(q.subject, q.index)][1] for q in bench.questions]
    # scores: each subject's share of right answers; medical is the mean of anatomy and clinical knowledge
    models = json.loads(report.read_text(encoding="utf-8"))["models"]
    for subject in CMMLU_SUBJECTS:
        mine = [row for row in rows if row["subject"] == subject]
        share = 100 * sum(row["prediction"] == row["answer"] for row in mine) / len(mine)
        assert models["base"]["subjects"][subject]["accuracy"] == pytest.approx(share, abs=0.01)
        assert models["base"]["subjects"][subject]["questions"] == len(mine)
    medical = models["base"]["medical"]
    assert medical["subjects"] == 2 and medical["questions"] == len(MEDICAL)
    assert models["base"]["general"]["questions"] == len(GENERAL)
    assert "| **medical** (2 of 3 subjects) | 8 |" in result.stdout
    assert "| elementary_commonsense 小学常识 | 6 |" in result.stdout
    assert "\r" not in result.stderr and "ETA" in result.stderr  # progress as plain lines when not a terminal


def test_base_and_adapters_side_by_side_in_one_run(tiny_llama, adapters, tmp_path):
    data = cmmlu_folder(tmp_path / "cmmlu")
    report, predictions = tmp_path / "report.json", tmp_path / "preds.jsonl"
    result = run_benchmark(data, "--base_model", tiny_llama, "--lora_weights", ",".join(map(str, adapters)),
                           "--output", report, "--predictions_out", predictions)
    assert result.returncode == 0, result.stderr
    labels = ["base", *map(str, adapters)]
    assert list(json.loads(report.read_text(encoding="utf-8"))["models"]) == labels
    assert result.stdout.splitlines()[0] == "| subject | questions | " + " | ".join(labels) + " |"
    rows = read_jsonl(predictions)
    by_model = {label: [row for row in rows if row["model"] == label] for label in labels}
    assert all(len(group) == len(rows) // 3 for group in by_model.values())
    # each column is its own model: the adapter on a freshly loaded base, the base once the adapters are taken off
    for label, lora in zip(labels, [None, *adapters], strict=True):
        reference = reference_cmmlu(tiny_llama, data, n_shot=0, lora=lora)
        assert [row["prediction"] for row in by_model[label]] == [
            reference[(row["subject"], row["index"])][0] for row in by_model[label]]
    predicted = {label: [row["prediction"] for row in group] for label, group in by_model.items()}
    assert predicted["base"] != predicted[labels[1]] != predicted[labels[2]]  # the adapters do change answers


# --- the other layouts ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout,expected", [
    (ceval_folder, {"format": "ceval", "questions": 6, "subjects": ["clinical_medicine", "high_school_geography"],
                    "header": "以下是中国关于临床医学考试的单项选择题，请选出其中的正确答案。\n\n"}),
    (cmb_file, {"format": "cmb", "questions": 7, "subjects": ["执业医师", "执业护士"],
                "header": "问：以下是中国医师考试中执业医师考试的一道单项选择题，不需要做任何分析和解释"}),
    (cmexam_file, {"format": "cmexam", "questions": 5, "subjects": ["cmexam"],
                   "header": "问题: 人体最大的器官是, \n 选项: A 肝脏"}),
    (medqa_file, {"format": "medqa", "questions": 5, "subjects": ["生理学"],
                  "header": "以下是中国医师资格考试的单项选择题，请直接给出正确答案的选项。\n\n题目："}),
])
def test_each_layout_is_read_and_scored(tiny_llama, tmp_path, layout, expected):
    path = layout(tmp_path / "bench")
    bench = benchmarks.read_benchmark(path, n_shot=1)
    assert bench.format == expected["format"] and len(bench.questions) == expected["questions"]
    assert sorted({q.subject for q in bench.questions}) == sorted(expected["subjects"])
    prompts = benchmarks.build_prompts(bench, n_shot=1)
    assert all(prompt.count(expected["header"].split("\n")[0]) >= 1 for prompt in prompts[:1])
    predictions = tmp_path / "preds.jsonl"
    result = run_benchmark(path, "--base_model", tiny_llama, "--n_shot", 1, "--scoring", "logits",
                           "--predictions_out", predictions)
    assert result.returncode == 0, result.stderr
    rows = read_jsonl(predictions)
    assert len(rows) == expected["questions"]
    assert all(row["prediction"] in bench.questions[i].options for i, row in enumerate(rows))


def test_cmb_answers_and_few_shot_follow_its_authors(tmp_path):
    bench = benchmarks.read_benchmark(cmb_file(tmp_path / "CMB"), n_shot=1)
    assert bench.questions[-1].answer == "AB" and bench.questions[0].index == 1
    prompt = benchmarks.build_prompts(bench, n_shot=1)[0]
    assert prompt.startswith("问：以下是中国医师考试中执业医师考试的一道单项选择题")
    assert "\n答：答案是B。\n问：" in prompt  # the solved example, as CMB's few-shot template writes it
    assert prompt.endswith("E. 以上都不是\n答：")
    dev = benchmarks.read_benchmark(tmp_path / "CMB" / "CMB-val" / "CMB-val-merge.json", n_shot=1)
    assert "答案是" not in benchmarks.build_prompts(dev, n_shot=1)[0]  # its own solved copy is no example


def test_generate_scoring_reads_the_letter_as_each_benchmark_does(tiny_llama, tmp_path):
    rules = benchmarks.spec()["extract"]
    question = benchmarks.Question("s", 0, dict(zip("ABCD", "甲乙丙丁", strict=True)), "B", {})
    several = benchmarks.Question("s", 0, dict(zip("ABCDE", "甲乙丙丁戊", strict=True)), "ACD", {})
    assert benchmarks.extract_letters("B. 乙", question, rules["cmmlu"]) == "B"
    assert benchmarks.extract_letters("我认为答案是C，因为……", question, rules["cmmlu"]) == "C"
    assert benchmarks.extract_letters("选项D是正确的", question, rules["ceval"]) == "D"
    assert benchmarks.extract_letters("无法确定", question, rules["cmmlu"]) == ""  # no guess
    assert benchmarks.extract_letters("正确选项是ACD。其余错误", several, rules["cmb"]) == "ACD"
    assert benchmarks.extract_letters("答案是BC。", question, rules["cmb"]) == "B"  # one answer: the first letter
    assert benchmarks.extract_letters("乙\n解释: 因为甲不对", question, rules["cmexam"]) == "B"
    path, predictions = medqa_file(tmp_path / "medqa"), tmp_path / "preds.jsonl"
    result = run_benchmark(path, "--base_model", tiny_llama, "--scoring", "generate", "--max_new_tokens", 4,
                           "--predictions_out", predictions)
    assert result.returncode == 0, result.stderr
    bench = benchmarks.read_benchmark(path)
    for row, q in zip(read_jsonl(predictions), bench.questions, strict=True):
        assert row["prediction"] == benchmarks.extract_letters(row["output"], q, rules["cmmlu"])


def test_choice_predictions_is_the_same_batched_or_alone(tiny_llama):
    from utils.model.loading import load_for_inference

    model, tokenizer, _ = load_for_inference(str(tiny_llama))
    prompts = [f"题目：{q}\n" + "\n".join(f"{x}. {c}" for x, c in zip("ABCD", cs, strict=True)) + "\n答案是："
               for q, cs, _ in MEDICAL + GENERAL]
    alone = benchmarks.choice_predictions(model, tokenizer, prompts, "ABCD", batch_size=1)
    assert benchmarks.choice_predictions(model, tokenizer, prompts, "ABCD", batch_size=5) == alone
    assert benchmarks.choice_predictions(model, tokenizer, prompts[:2], ["AB", "CD"])[1] in "CD"


# --- bad input ----------------------------------------------------------------------------------------------------


def error_line(result) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in result.stderr
    return lines[-1]


def test_bad_benchmarks_are_one_error_line(tiny_llama, tmp_path):
    assert "nowhere" in error_line(run_benchmark(tmp_path / "nowhere", "--base_model", tiny_llama))
    data = cmmlu_folder(tmp_path / "cmmlu")
    line = error_line(run_benchmark(data, "--base_model", tiny_llama, "--subjects", "anatomy,astrology"))
    assert "astrology" in line and "anatomy" not in line.split("not in")[0]
    broken = data / "test" / "anatomy.csv"
    broken.write_text(",Question,A,B,C,D\n0,问题,甲,乙,丙,丁\n", encoding="utf-8")
    line = error_line(run_benchmark(data, "--base_model", tiny_llama))
    assert str(broken) in line and "answer" in line.lower()
    broken.write_text(",Question,A,B,C,D,Answer\n0,问题,甲,乙,丙,丁,A\n1,问题,甲,乙,丙,丁,F\n", encoding="utf-8")
    line = error_line(run_benchmark(data, "--base_model", tiny_llama))
    assert f"{broken} line 3" in line and "'F'" in line
    (data / "dev" / "virology.csv").unlink(missing_ok=True)
    header = ["", "Question", "A", "B", "C", "D", "Answer"]
    write_csv(data / "test" / "virology.csv", header, [[0, "q", 1, 2, 3, 4, "A"]])
    line = error_line(run_benchmark(data, "--base_model", tiny_llama, "--subjects", "virology", "--n_shot", 1))
    assert str(data / "dev" / "virology.csv") in line
    write_csv(data / "test" / "bmw.csv", header, [[0, "q", 1, 2, 3, 4, "A"]])
    assert "bmw" in error_line(run_benchmark(data, "--base_model", tiny_llama, "--subjects", "bmw"))
    assert "--base_model" in error_line(run_benchmark(data))
    result = run_benchmark(data, "--base_model", tiny_llama, "--lora_weights", tmp_path / "lora-typo")
    assert "--lora_weights" in error_line(result) and "questions" not in result.stderr  # before the base is scored
