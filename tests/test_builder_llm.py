"""The LLM backend against a loopback fake OpenAI server (never the network): grounding and safety filters (every
hostile answer class, on the own knowledge base and on cMeKG's vocabulary), several prompt kinds, the run manifest,
exact resume, nothing lost when the server fails (or when the output was torn), usage and cost, --dry_run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from builder_support import REPO, cmekg_entities, entities_from, read_jsonl, write_jsonl

import build_dataset as bd
from tests.fake_openai import FakeOpenAI, Reply, last_user_message, scripted
from utils.builder.curation import load_entities
from utils.builder.llm_backend import Lexicon, facts_text, grounding_problem, sidecar
from utils.builder.safety import is_emergency_disease
from utils.core.errors import UserError
from utils.core.io import RunLock

KB = [
    {"中心词": "甲氨蝶呤", "类型": "药物", "药物类别": ["抗代谢药"], "用途": ["类风湿关节炎", "银屑病"],
     "不良反应": ["肝功能损害", "骨髓抑制", "口腔溃疡"], "禁忌": ["妊娠期"], "用法用量": ["遵医嘱"]},
    {"中心词": "甲病", "类型": "疾病", "相关症状": ["发热", "咳嗽", "吸气性喉鸣"], "所属科室": ["呼吸内科"],
     "药物治疗": ["药甲"]},
    {"中心词": "药甲", "类型": "药物", "用途": ["退热"], "不良反应": ["恶心", "皮疹"]},
]
GOOD_MTX = ("甲氨蝶呤能治什么？", "甲氨蝶呤可用于类风湿关节炎和银屑病，需在医生指导下使用。")
BAD_MTX = [
    # daily methotrexate: a known fatal error
    ("甲氨蝶呤怎么吃？", "甲氨蝶呤用于治疗类风湿关节炎，需每天服用一次，遵医嘱。"),
    ("甲氨蝶呤吃多少？", "甲氨蝶呤治疗银屑病时每次服用10mg，骨髓抑制少见。"),  # an invented dose
    ("甲氨蝶呤安全吗？", "甲氨蝶呤用于银屑病时不会引起任何不良反应。"),  # an absolute claim
    ("甲氨蝶呤有副作用吗？", "甲氨蝶呤可能引起肝功能损害、骨髓抑制和皮疹。"),  # 皮疹 is a fact of another drug
    ("甲氨蝶呤要注意什么？", "请遵医嘱。"),  # nothing specific
]
REPLIES = {
    "甲氨蝶呤": [GOOD_MTX, *BAD_MTX],
    "甲病": [("甲病有哪些症状？", "甲病的常见症状包括发热、咳嗽。"), ("甲病看什么科？", "甲病一般到呼吸内科就诊。")],
    "药甲": [("药甲有什么用？", "药甲可用于退热，可能引起恶心、皮疹等不良反应。")],
}


def qa_json(pairs) -> str:
    text = json.dumps([{"question": q, "answer": a} for q, a in pairs], ensure_ascii=False)
    return f"好的：\n```json\n{text}\n```"


def by_entity(body: dict) -> Reply:
    message = last_user_message(body)
    name = next(name for name in REPLIES if f"“{name}”" in message)
    return Reply(content=qa_json(REPLIES[name]), prompt_tokens=100, completion_tokens=50)


@pytest.fixture()
def api_env(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("FAKE_LLM_KEY", "sk-test-secret-123")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    return "FAKE_LLM_KEY"


def run(server: FakeOpenAI, kb: Path, out: Path, key_env: str, **options) -> None:
    bd.knowledge(bd.KnowledgeArgs(kb=str(kb), output=str(out), backend="openai", api_base=server.url,
                                  model=options.pop("model", "m1"), api_key_env=key_env, concurrency=2, per_entity=4,
                                  retry_base_delay=0.0, exclude_questions="none", **options))


def test_grounding_rejects_daily_methotrexate_invented_doses_absolutes_and_foreign_terms() -> None:
    entities = entities_from({"甲氨蝶呤": {"不良反应": ["肝功能损害", "骨髓抑制"], "适应症": ["类风湿关节炎"],
                                       "用法用量": ["遵医嘱"]},
                              "药甲": {"不良反应": ["皮疹"], "适应症": ["退热"]}})
    lexicon = Lexicon.of(entities)
    mtx = entities[0]
    assert grounding_problem("甲氨蝶呤可用于类风湿关节炎，可能引起肝功能损害。", mtx, lexicon) is None
    reasons = {answer: grounding_problem(answer, mtx, lexicon) for _, answer in BAD_MTX}
    assert all(reasons.values()), reasons
    assert "每天" in reasons[BAD_MTX[0][1]] and "10" in reasons[BAD_MTX[1][1]]
    assert reasons[BAD_MTX[2][1]].startswith("absolute claim") and "皮疹" in reasons[BAD_MTX[3][1]]
    assert reasons[BAD_MTX[4][1]].startswith("not grounded")
    # 遵医嘱 is a fact of the drug, but generic: alone it grounds nothing; nor does one 2-character fact alone.
    assert grounding_problem("甲氨蝶呤的用法：遵医嘱。", mtx, lexicon) is not None
    # loopholes an audit found: a daily schedule without a number, risky instructions, a term the graph lacks
    assert "天天" in grounding_problem("甲氨蝶呤用于类风湿关节炎，天天吃就行，可能引起肝功能损害。", mtx, lexicon)
    assert "每晚" in grounding_problem("甲氨蝶呤用于类风湿关节炎，每晚吃，可能引起肝功能损害。", mtx, lexicon)
    for answer, risky in (("甲氨蝶呤用于类风湿关节炎，服药后可以喝酒，注意肝功能损害。", "喝酒"),
                          ("甲氨蝶呤用于类风湿关节炎，可以放心使用，偶有肝功能损害。", "放心使用"),
                          ("甲氨蝶呤用于类风湿关节炎，症状好转就自行停药，注意肝功能损害。", "自行停药"),
                          ("甲氨蝶呤用于类风湿关节炎，和退热药可以同服，注意骨髓抑制。", "可以同服"),
                          ("甲氨蝶呤用于类风湿关节炎，效果不好可以加量，注意骨髓抑制。", "加量")):
        assert grounding_problem(answer, mtx, lexicon) == f"risky instruction ({risky})", answer
    assert "过敏性休克" in grounding_problem("甲氨蝶呤用于类风湿关节炎，可能引起肝功能损害和过敏性休克。", mtx, lexicon)
    # the same words, negated, are sound advice
    assert grounding_problem("甲氨蝶呤用于类风湿关节炎，服药期间避免饮酒，不要自行停药，注意肝功能损害。", mtx,
                             lexicon) is None


OWN_KB = REPO / "data" / "knowledge_base.jsonl"
# A second audit's hostile wordings, by meaning rather than by the phrases the first one listed: stopping or changing
# the dose, a drug the graph does not link (newer anticoagulants included), deferring care; and what stays allowed.
DRUG_HOSTILE = [("症状好转即可停服。", "risky instruction"), ("出血时剂量减少一半。", "risky instruction"),
                ("漏服后下次吃双倍。", "risky instruction"), ("症状好转就不吃了。", "risky instruction"),
                ("效果不好就多吃点。", "risky instruction"),
                ("可以换成依度沙班。", "names a drug the graph does not link"),
                ("也可以改用艾多沙班。", "names a drug the graph does not link"),
                ("可以换成达比加群。", "names a drug the graph does not link"),
                ("出血不严重的话不必就诊。", "delays or stops care")]
EMERGENCY_HOSTILE = ["休息一下就好。", "等明早再去医院。", "不着急去医院。", "歇歇就好。", "可以先观察一下。"]
DRUG_KEPT = ["如出现严重出血请拨打120。", "请在医生指导下使用。", "用药期间如有不适及时就医。", "不要自行停药。",
             "漏服后不要加倍。", "遵医嘱调整剂量。", "症状好转后也不要自行停药。", "不可自行减量或加倍。"]
# Hostile answers of every class the review found, each otherwise grounded in the entity's facts (own KB's 华法林 and
# 急性心肌梗死), with the reason each must be rejected for.
HOSTILE = {
    "华法林": [
        ("华法林用于心房颤动患者预防脑卒中，妊娠期也适合使用。", "contradicts a listed contraindication"),
        ("华法林用于预防和治疗静脉血栓栓塞症，不要紧张自行停药即可。", "risky instruction"),
        ("华法林用于心房颤动患者预防脑卒中，出血时剂量减半或暂停几天。", "risky instruction"),
        ("华法林用于心房颤动患者预防脑卒中，症状好转后不用再吃了。", "delays or stops care"),
        ("华法林用于预防和治疗静脉血栓栓塞症，也可以换成佐拉沙坦。", "names a drug the graph does not link"),
        ("华法林用于心房颤动患者预防脑卒中，和阿司匹林一起用更好。", "asserts a term not among the entity's facts"),
        ("华法林用于心房颤动患者预防脑卒中，不用担心出血。", "reassurance the graph does not state"),
        *(("华法林用于心房颤动患者预防脑卒中，" + tail, why) for tail, why in DRUG_HOSTILE),
        ("华法林用于心房颤动患者预防脑卒中，怀孕了也不会有问题。", "contradicts a listed contraindication"),
    ],
    "急性心肌梗死": [
        ("急性心肌梗死常表现为胸痛、胸闷，可以先在家休息观察，第二天再去医院。", "delays or stops care"),
        *(("急性心肌梗死常表现为胸痛、胸闷，" + tail, "delays or stops care") for tail in EMERGENCY_HOSTILE),
    ],
}
KEPT = {
    "华法林": ["华法林用于心房颤动患者预防脑卒中，用药期间需定期监测凝血功能，请在医生指导下使用。",
            "华法林可能引起出血，用药期间需定期监测凝血功能，如出现严重出血应立即就医，必要时拨打120。",
            "华法林的禁忌包括活动性出血和妊娠期。"],
    "急性心肌梗死": ["急性心肌梗死常表现为胸痛、胸闷和大汗，应立即拨打120。",
               "急性心肌梗死可能并发心律失常和心力衰竭。"],
}
# More sound wordings (not sent end to end: the builder keeps one row per restated fact).
KEPT_WORDINGS = {"华法林": ["华法林用于心房颤动患者预防脑卒中，孕妇禁用。",
                          *("华法林用于预防和治疗静脉血栓栓塞症，" + tail for tail in DRUG_KEPT)],
                 "急性心肌梗死": ["急性心肌梗死常表现为胸痛、胸闷，不要在家休息观察，应立即拨打120。"]}


def test_grounding_rejects_every_hostile_class_and_keeps_the_safety_phrases_on_the_own_kb() -> None:
    entities, _ = load_entities(str(OWN_KB))
    lexicon = Lexicon.of(entities)
    by_name = {entity.name: entity for entity in entities}
    for name, answers in HOSTILE.items():
        for answer, why in answers:
            problem = grounding_problem(answer, by_name[name], lexicon)
            assert problem is not None and problem.startswith(why), (answer, problem)
    for name, answers in KEPT.items():
        for answer in answers + KEPT_WORDINGS[name]:
            assert grounding_problem(answer, by_name[name], lexicon) is None, answer
    # the graph's own advice is no risky instruction of the model's (a drug's 手术前需暂停用药)
    (drug,) = entities_from({"甲药": {"适应症": ["甲病"], "注意事项": ["手术前需暂停用药"]}})
    assert grounding_problem("甲药可用于甲病，手术前需暂停用药。", drug, Lexicon.of([drug])) is None
    assert grounding_problem("甲药可用于甲病，手术前需暂停用药，出院后也可暂停几天。", drug, Lexicon.of([drug]))


def test_grounding_keeps_the_safety_phrases_and_rejects_hostile_answers_on_the_cmekg_vocabulary() -> None:
    entities = list(cmekg_entities())
    lexicon = Lexicon.of(entities)
    drug = next(e for e in entities if e.values("contraindication") == ("孕妇禁用",) and len(e.values("adverse")) >= 2
                and not [value for value in e.values("adverse") if "停" in value])
    lead = f"{drug.name}可能引起{drug.values('adverse')[0]}、{drug.values('adverse')[1]}，"
    good = lead + "用药期间如有不适请在医生指导下使用，出现严重过敏时拨打120。"
    assert grounding_problem(good, drug, lexicon) is None
    for answer, why in (("孕妇也可以服用。", "contradicts a listed contraindication"),
                        ("不要紧张自行停药即可。", "risky instruction"),
                        ("疼痛好转后不用再吃。", "delays or stops care"),
                        ("也可以加用佐拉沙星。", "names a drug the graph does not link"),
                        ("也可以加用布洛芬。", "names a drug the graph does not link"),
                        ("也可用于治疗肺炎。", "asserts a term not among the entity's facts")):
        problem = grounding_problem(lead + answer, drug, lexicon)
        assert problem is not None and problem.startswith(why), (answer, problem)


def test_grounding_rejects_hostile_meanings_and_keeps_safety_phrases_on_cmekg_warfarin_and_heart_attack() -> None:
    """The second audit's wordings on cMeKG's own 华法林钠片 and 急性心肌梗死 (an emergency disease), and a listed
    pregnancy contraindication said to be fine in other words (怀孕了也不会有问题 for 孕妇禁用)."""
    entities = list(cmekg_entities())
    lexicon = Lexicon.of(entities)
    by_name = {entity.name: entity for entity in entities}
    warfarin, infarction = by_name["华法林钠片"], by_name["急性心肌梗死"]
    assert is_emergency_disease(infarction.name) and "依度沙班" not in facts_text(warfarin)
    cases = [(warfarin, "华法林钠片可能引起出血、皮疹，" + tail, why) for tail, why in DRUG_HOSTILE]
    cases += [(infarction, "急性心肌梗死常表现为胸骨后疼痛、呼吸困难，" + tail, "delays or stops care")
              for tail in EMERGENCY_HOSTILE]
    pregnancy = next(e for e in entities if e.values("contraindication") == ("孕妇禁用",)
                     and len(e.values("adverse")) >= 2 and not [v for v in e.values("adverse") if "停" in v])
    lead = f"{pregnancy.name}可能引起{pregnancy.values('adverse')[0]}、{pregnancy.values('adverse')[1]}，"
    cases += [(pregnancy, lead + tail, "contradicts a listed contraindication")
              for tail in ("怀孕了也不会有问题。", "妊娠期用没关系。")]
    for entity, answer, why in cases:
        problem = grounding_problem(answer, entity, lexicon)
        assert problem is not None and problem.startswith(why), (answer, problem)
    kept = [(warfarin, "华法林钠片可能引起出血、皮疹，" + tail) for tail in DRUG_KEPT]
    kept += [(infarction, "急性心肌梗死常表现为胸骨后疼痛、呼吸困难，应立即拨打120。"),
             (pregnancy, lead + "孕妇禁用。")]
    for entity, answer in kept:
        assert grounding_problem(answer, entity, lexicon) is None, answer


def test_grounding_rejects_none_of_the_committed_own_kb_answers_for_its_new_meaning_rules() -> None:
    """False positives: the committed own-KB rows (template answers a clinician reviewed) against each entity they are
    about; no stop/dose, deferral, contraindication or unlinked-drug rule may reject one. (A bare 饮酒 opening
    a risk-factor sentence is still read as an instruction: one row, the known exception.)"""
    entities, _ = load_entities(str(OWN_KB))
    lexicon = Lexicon.of(entities)
    by_name = {entity.name: entity for entity in entities}
    rejected = []
    for row in read_jsonl(REPO / "data" / "llama_data.json"):
        for name in row["meta"]["entities"]:
            problem = grounding_problem(row["output"], by_name[name], lexicon) or ""
            if problem.startswith(("absolute claim", "risky", "delays", "reassurance", "contradicts", "names a drug")):
                rejected.append((name, problem, row["output"]))
    assert {output for _, problem, output in rejected if problem != "risky instruction (饮酒)"} == set(), rejected
    assert len({output for _, _, output in rejected}) <= 1, rejected


def own_kb_replies(body: dict) -> Reply:
    message = last_user_message(body)
    name = next(name for name in HOSTILE if f"“{name}”" in message)
    pairs = [(f"关于{name}的问题{number}", answer) for number, answer in
             enumerate([answer for answer, _ in HOSTILE[name]] + KEPT[name])]
    return Reply(content=qa_json(pairs))


def test_hostile_answers_from_the_server_never_reach_the_output(tmp_path: Path, api_env: str,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """End to end through the fake server on the own KB's entries: only the kept answers are written, an emergency
    answer without 120 gets the care advice (the template rows' safety module), and the report's lint agrees."""
    lines = [line for line in OWN_KB.read_text(encoding="utf-8").splitlines()
             if json.loads(line)["中心词"] in HOSTILE]
    kb = tmp_path / "kb.jsonl"
    kb.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "rows.json"
    with FakeOpenAI(own_kb_replies) as server:
        run(server, kb, out, api_env, prompt_kinds="facts")
    outputs = [row["output"] for row in read_jsonl(out)]
    hostile = [answer for answers in HOSTILE.values() for answer, _ in answers]
    assert not [text for text in outputs if any(text.startswith(answer) for answer in hostile)]
    assert len(outputs) == sum(len(answers) for answers in KEPT.values())
    no_120 = next(text for text in outputs if text.startswith("急性心肌梗死可能并发心律失常和心力衰竭。"))
    assert "立即就医" in no_120 and "120" in no_120
    report = json.loads((tmp_path / "rows.json.report.json").read_text(encoding="utf-8"))
    assert report["lint"]["alarm_sign_without_120"] == 0 and report["lint"]["invented_reassurance"] == 0
    assert "delays or stops care" in capsys.readouterr().out


def test_a_torn_output_is_an_existing_output_not_a_traceback(tmp_path: Path, api_env: str,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """An output torn by an earlier crash (not valid UTF-8) is kept when the server fails, with one error line, and
    replaced by a run that completes; never a UnicodeDecodeError."""
    kb = write_jsonl(tmp_path / "kb.jsonl", KB)
    out = tmp_path / "rows.json"
    torn = '{"instruction": "甲'.encode()[:-1]
    out.write_bytes(torn)
    with FakeOpenAI(lambda body: Reply(status=500)) as server, pytest.raises(UserError, match="left as it was"):
        run(server, kb, out, api_env, max_retries=0)
    assert out.read_bytes() == torn and "not valid UTF-8" in capsys.readouterr().out
    with FakeOpenAI(by_entity) as server:
        run(server, kb, out, api_env)
    assert read_jsonl(out)


def test_only_trusted_answers_are_kept_from_several_prompt_kinds(tmp_path: Path, api_env: str,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    kb = write_jsonl(tmp_path / "kb.jsonl", KB)
    out = tmp_path / "rows.json"
    with FakeOpenAI(by_entity) as server:
        run(server, kb, out, api_env, input_price=1.0, output_price=2.0)
        asked = [last_user_message(body) for body in server.requests]
        assert server.headers[0]["authorization"] == "Bearer sk-test-secret-123"
    assert sum("“甲氨蝶呤”" in message for message in asked) == 3  # facts, patient, safety
    assert sum("“甲病”" in message for message in asked) == 3  # facts, patient, case (发热+咳嗽 point to it alone)
    outputs = {row["output"] for row in read_jsonl(out)}
    assert outputs == {GOOD_MTX[1], "甲病的常见症状包括发热、咳嗽。", "甲病一般到呼吸内科就诊。",
                       "药甲可用于退热，可能引起恶心、皮疹等不良反应。"}
    rows = read_jsonl(out)
    assert all(row["meta"]["kind"].startswith("llm_") and row["meta"]["entities"] for row in rows)
    report = json.loads((tmp_path / "rows.json.report.json").read_text(encoding="utf-8"))
    requests = len(asked)
    assert report["llm"]["prompt_tokens"] == 100 * requests and report["llm"]["completion_tokens"] == 50 * requests
    assert report["llm"]["estimated_cost_usd"] == pytest.approx((100 * requests + 2 * 50 * requests) / 1e6)
    printed = capsys.readouterr()
    assert "absolute claim" in printed.out and "number, dose or frequency not in the facts" in printed.out
    assert "sk-test-secret-123" not in printed.out + printed.err


def test_resume_refuses_other_settings_and_resumes_exactly(tmp_path: Path, api_env: str) -> None:
    kb = write_jsonl(tmp_path / "kb.jsonl", KB)
    out = tmp_path / "rows.json"
    failures = [Reply(status=503)] * 2

    def responder(body: dict) -> Reply:  # 甲病's facts prompt fails twice, then works
        message = last_user_message(body)
        if "“甲病”" in message and "每个问题只问一个方面" in message and failures:
            return failures.pop()
        return by_entity(body)

    with FakeOpenAI(responder) as server:
        run(server, kb, out, api_env, max_retries=1)  # the SDK's one retry is used up: skipped for now
        first = read_jsonl(out)
        done = {entry["key"] for entry in read_jsonl(sidecar(out, ".work.jsonl"))}
        assert len(done) == 8 and "甲病#facts" not in done
        with pytest.raises(UserError, match="other settings .*model 'm1' -> 'm2'"):
            run(server, kb, out, api_env, model="m2", resume=True)
        changed = write_jsonl(tmp_path / "kb2.jsonl", [{**KB[0], "禁忌": ["妊娠期", "哺乳期"]}, *KB[1:]])
        with pytest.raises(UserError, match="other settings .*facts_hash"):
            bd.knowledge(bd.KnowledgeArgs(kb=str(changed), output=str(out), backend="openai", api_base=server.url,
                                          model="m1", api_key_env=api_env, per_entity=4, exclude_questions="none",
                                          resume=True))
        before = len(server.requests)
        run(server, kb, out, api_env, max_retries=1, resume=True)
        again = [last_user_message(body) for body in server.requests[before:]]
        assert len(again) == 1 and "“甲病”" in again[0]  # only what failed is asked again
        rows = read_jsonl(out)
        assert {row["output"] for row in first} <= {row["output"] for row in rows}
        assert len({row["instruction"] for row in rows}) == len(rows)
        before = len(server.requests)
        run(server, kb, out, api_env, resume=True)
        assert len(server.requests) == before and read_jsonl(out) == rows  # a finished run asks nothing


def test_a_failing_rerun_without_resume_keeps_the_rows_it_had(tmp_path: Path, api_env: str) -> None:
    kb = write_jsonl(tmp_path / "kb.jsonl", KB)
    out = tmp_path / "rows.json"
    with FakeOpenAI(by_entity) as server:
        run(server, kb, out, api_env)
    kept = out.read_bytes()
    with FakeOpenAI(lambda body: Reply(status=500)) as server, pytest.raises(
            UserError, match="requests failed, so .*rows.json was left as it was"):
        run(server, kb, out, api_env, max_retries=0)
    assert out.read_bytes() == kept


def test_a_fresh_run_whose_every_request_fails_writes_nothing_and_says_so(tmp_path: Path, api_env: str) -> None:
    kb = write_jsonl(tmp_path / "kb.jsonl", KB)
    out = tmp_path / "rows.json"
    with FakeOpenAI(lambda body: Reply(status=500)) as server, pytest.raises(
            UserError, match="requests that were asked failed .* nothing was written"):
        run(server, kb, out, api_env, max_retries=0)
    assert not out.exists()


def test_a_second_run_into_the_same_output_is_refused(tmp_path: Path, api_env: str) -> None:
    kb = write_jsonl(tmp_path / "kb.jsonl", KB)
    out = tmp_path / "rows.json"
    with RunLock(f"{out}.lock", "another"), FakeOpenAI(by_entity) as server:
        with pytest.raises(UserError, match="is in use by another run"):
            run(server, kb, out, api_env, resume=True)
        assert server.requests == []


@pytest.mark.parametrize("reply", [
    Reply(raw_body=b"<html>upstream is down</html>", content_type="text/html"),
    Reply(raw_body=b'{"choices": [', content_type="application/json"),
    Reply(raw_body=b'{"object": "error"}', content_type="application/json"),
], ids=["html", "torn-json", "not-a-completion"])
def test_a_200_that_is_not_a_completion_skips_the_item(tmp_path: Path, api_env: str, reply: Reply,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    kb = write_jsonl(tmp_path / "kb.jsonl", KB)
    out = tmp_path / "rows.json"
    with FakeOpenAI(scripted({"“药甲”": [reply] * 6}, by_entity)) as server:
        run(server, kb, out, api_env)
    printed = capsys.readouterr()
    assert "药甲#facts" in printed.err and "skipped" in printed.err and "Traceback" not in printed.err
    assert "药甲可用于退热，可能引起恶心、皮疹等不良反应。" not in out.read_text(encoding="utf-8")
    assert "甲病一般到呼吸内科就诊。" in out.read_text(encoding="utf-8")


def test_dry_run_sends_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    kb = write_jsonl(tmp_path / "kb.jsonl", KB)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    bd.knowledge(bd.KnowledgeArgs(kb=str(kb), output=str(tmp_path / "rows.json"), backend="openai", dry_run=True,
                                  input_price=0.15, output_price=0.6, exclude_questions="none"))
    printed = capsys.readouterr().out
    assert "dry run: 9 requests" in printed and "estimated cost: $" in printed and "“甲氨蝶呤”" in printed
    assert sorted(path.name for path in tmp_path.iterdir()) == ["kb.jsonl"]


def test_a_refused_key_stops_the_run_with_one_line(tmp_path: Path, api_env: str) -> None:
    kb = write_jsonl(tmp_path / "kb.jsonl", KB[:1])
    with FakeOpenAI(lambda body: Reply(status=401)) as server:
        with pytest.raises(UserError, match="refused the request .*401"):
            run(server, kb, tmp_path / "o.json", api_env)
        asked = [last_user_message(body) for body in server.requests]
        assert asked and len(asked) == len(set(asked))  # a refused key is not retried
    assert not (tmp_path / "o.json").exists() and not sidecar(tmp_path / "o.json", ".work.jsonl").exists()
