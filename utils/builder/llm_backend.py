"""The LLM backend: ask an OpenAI-compatible server, keep only answers worth trusting, resume exactly.

- Several prompt kinds per entity (`prompts.yaml`: facts, patient questions, case vignettes built only from symptom
  sets that point to the entity alone, drug safety); one request per (entity, kind), its key `entity#kind`.
- Grounding that means something (`grounding_problem`): an answer must state specific facts of the entity
  (generic ones like 遵医嘱 and 1-character ones never count; one 2-character fact alone is not enough); every
  medical term it asserts must be among the entity's facts, and every drug it names (known by how drug names end)
  must be one the graph links to the entity; a number, dose or frequency not in the facts rejects it (the standard
  safety phrases 拨打120, 请在医生指导下使用, 用药期间 are taken out first); so do an absolute claim (所有, 一定,
  不会引起任何 ...), a risky instruction or a stop or dose change, by meaning, that no negation or doctor
  governs (服药后可以喝酒, 不要紧张，自行停药即可, 症状好转即可停服, 下次吃双倍), advice that delays or stops care
  (等明早再去医院, 不必就诊, 休息一下就好; for an emergency any waiting wording), reassurance the graph does not
  state (不会被传染) and a listed contraindication said to be fine by its concept (怀孕了也不会有问题 for 妊娠期).
  The term check knows only the graph's own vocabulary (its values and entity names) plus the alarm signs and
  emergency diseases of `emergencies.yaml`: a medical term that appears nowhere in the graph and in no such list
  is not recognised as a term.
- The same content gate as the template rows (gates.py) and the same safety module (safety.py): an accepted answer
  that shows an alarm sign, a serious adverse effect or an emergency disease ends with "seek care now / 120".
- A run manifest (`OUTPUT.manifest.json`: command, model, server, temperature, prompt version, builder data version,
  a hash of the facts sent, pairs asked for) written when a run starts; `--resume True` with other settings refuses.
- A work log (`OUTPUT.work.jsonl`): one line per finished item, holding its rows and tokens, fsynced; the output is
  written at the end, as a whole, atomically, from the log (so a crash or a failing server never wipes an output).
- Token usage and an estimated cost (`--input_price`/`--output_price`, USD per million tokens) in the report;
  `--dry_run` prints what would be asked and what it would cost, and writes nothing.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from tqdm import tqdm

from utils import llm
from utils.builder import resources
from utils.builder.crossing import GraphIndex
from utils.builder.graph import Entity, generic_values
from utils.builder.rows import Row, fill
from utils.builder.safety import (
    absolute_claim,
    alarms,
    care_delaying,
    contradicted_contraindication,
    contraindication_concepts,
    dose_or_frequency,
    drug_spans,
    is_emergency_disease,
    reassurance,
    risky_instruction,
    stated_numbers,
    stopped_gradually,
    with_care_advice,
    without_allowed_phrases,
    without_names,
)
from utils.core.cli import flag
from utils.core.errors import UserError
from utils.core.io import atomic_write
from utils.llm import append_jsonl, drop_torn_tail, read_jsonl_tolerant

MAX_TERM_CHARS = 16
MIN_SUPPORT_CHARS = 4
CHARS_PER_TOKEN = 1.0  # dry-run estimate: about one token per Chinese character (an upper bound for GPT-4-class)
COMPLETION_TOKENS_PER_PAIR = 80


@dataclass(frozen=True)
class ServerArgs:
    """The flags of the openai backend, shared by both build_dataset.py commands."""

    api_base: str = flag("", "openai: the server's base URL, e.g. http://127.0.0.1:8000/v1 (default: OpenAI)")
    model: str = flag("", "openai: the model name the server serves")
    api_key_env: str = flag(llm.DEFAULT_API_KEY_ENV, "openai: environment variable holding the API key (never "
                                                     "printed)")
    concurrency: int = flag(4, "openai: requests in flight at once", low=1)
    resume: bool = flag(False, "openai: keep the earlier run's answers (same settings only) and ask only the rest")
    max_retries: int = flag(5, "openai: retries of a request that failed with 429, 5xx, a timeout or a dropped "
                               "connection", low=0)
    retry_base_delay: float = flag(1.0, "openai: seconds before asking again after an unusable reply", low=0)
    timeout: float = flag(120.0, "openai: seconds to wait for one reply", above=0)
    temperature: float = flag(0.7, "openai: sampling temperature", low=0)
    input_price: float = flag(0.0, "openai: USD per million prompt tokens, for the cost estimate", low=0)
    output_price: float = flag(0.0, "openai: USD per million completion tokens, for the cost estimate", low=0)
    dry_run: bool = flag(False, "openai: print the requests and their estimated tokens and cost; send and write "
                                "nothing")

    def server_problems(self, backend: str) -> list[str]:
        if backend == "openai" and not self.model and not self.dry_run:
            return ["--backend openai needs --model (the model name the server serves)"]
        return []

    def chat_config(self, backend: str) -> llm.ChatConfig | None:
        """How to reach the server (None for the offline template backend)."""
        if backend != "openai":
            return None
        return llm.ChatConfig(model=self.model or "(dry run)", api_base=self.api_base or None,
                              api_key_env=self.api_key_env, temperature=self.temperature, timeout=self.timeout,
                              max_retries=self.max_retries, retry_base_delay=self.retry_base_delay)


@dataclass(frozen=True)
class Item:
    """One request: its key in the work log, the messages, and how to turn the reply into rows."""

    key: str
    messages: list[dict[str, str]]
    accept: Callable[[list[tuple[str, str]]], tuple[list[Row], Counter[str]]]


@dataclass
class RunCounts:
    items: int = 0
    done_before: int = 0
    requested: int = 0
    skipped: int = 0
    reasked: int = 0
    filtered: Counter[str] = field(default_factory=Counter)


# --- grounding -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lexicon:
    """Every medical term of the graph (its values and entity names) and the alarm signs and emergency diseases of
    `emergencies.yaml`, for finding what an answer asserts. A term outside this vocabulary is not seen."""

    terms: frozenset[str]

    @classmethod
    def of(cls, entities: Sequence[Entity]) -> Lexicon:
        skip = generic_values() | frozenset(resources.safety()["generic_terms"])
        terms = {value for entity in entities for value in entity.all_values()}
        terms |= {entity.name for entity in entities}
        alarms = resources.emergencies()
        terms |= set(alarms["symptoms"]) | set(alarms["diseases"])  # 过敏性休克 is asserted even if no fact names it
        return cls(frozenset(term for term in terms if 2 <= len(term) <= MAX_TERM_CHARS and term not in skip))

    def asserted(self, text: str) -> list[str]:
        """The terms found in `text`, longest first, none inside another one found."""
        spans = [(start, start + size) for start in range(len(text))
                 for size in range(2, min(MAX_TERM_CHARS, len(text) - start) + 1)
                 if text[start : start + size] in self.terms]
        spans.sort(key=lambda span: (span[0] - span[1], span[0]))
        kept: list[tuple[int, int]] = []
        for start, end in spans:
            if not any(a <= start and end <= b for a, b in kept):
                kept.append((start, end))
        return [text[start:end] for start, end in sorted(kept)]


def facts_text(entity: Entity) -> str:
    return entity.name + "\n" + "\n".join(entity.all_values())


def grounding_problem(answer: str, entity: Entity, lexicon: Lexicon) -> str | None:
    """Why a model's answer about `entity` cannot be trusted, or None. (A risky word inside a fact of the entity the
    answer states, such as 二甲双胍's 造影检查前后需遵医嘱暂停, is the graph's own advice, not the model's.)"""
    alarm_terms = resources.emergencies()["symptoms"] + resources.emergencies()["diseases"]
    own = answer.replace(entity.name, "，")  # 阻塞性睡眠呼吸暂停 and 根治性子宫切除术 are terms, not instructions
    for fact in sorted([*entity.all_values(), *alarm_terms], key=len, reverse=True):
        if len(fact) >= 4:
            own = own.replace(fact, "，")
    emergency = is_emergency_disease(entity.name) or bool(alarms(answer, names=(entity.name,)))
    checks = ((lambda text: absolute_claim(own), "absolute claim"),
              (lambda text: risky_instruction(own), "risky instruction"),
              (lambda text: care_delaying(own, emergency), "delays or stops care"),
              (reassurance, "reassurance the graph does not state"),
              (lambda text: contradicted_contraindication(text, entity.values("contraindication")),
               "contradicts a listed contraindication"))
    for check, why in checks:
        found = check(answer)
        if found:
            return f"{why} ({found})"
    text = facts_text(entity)
    checked = without_allowed_phrases(answer)
    for number in stated_numbers(checked):
        if number not in text:
            return f"number, dose or frequency not in the facts ({number})"
    dose = dose_or_frequency(checked)
    if dose and dose not in text:
        return f"dose or frequency not in the facts ({dose})"
    generic = generic_values()
    facts = [fact for fact in entity.all_values() if len(fact) >= 2 and fact not in generic]
    support = {fact for fact in facts if fact in answer}
    if sum(len(fact) for fact in support) < MIN_SUPPORT_CHARS:
        return "not grounded in the entity's specific facts"
    for term in lexicon.asserted(checked):
        if term in entity.name or any(term in fact or fact in term for fact in facts):
            continue
        if contraindication_concepts(term) & contraindication_concepts(" ".join(entity.values("contraindication"))):
            continue  # 孕妇 for a drug whose contraindication is 妊娠期
        return f"asserts a term not among the entity's facts ({term})"
    for drug in drug_spans(without_names(checked, (entity.name, *entity.values("generic_name")))):
        if drug in entity.name or entity.name in drug or any(drug in fact or fact in drug for fact in facts):
            continue
        return f"names a drug the graph does not link to it ({drug})"
    return None


# --- prompts -------------------------------------------------------------------------------------------------------


@cache
def prompt_kinds() -> dict[str, Any]:
    return resources.prompts()["kinds"]


def facts_json(entity: Entity) -> str:
    labels = resources.prompts()["labels"]
    return json.dumps({labels.get(relation, relation): list(values) for relation, values in entity.facts.items()},
                      ensure_ascii=False)


def unique_symptom_sets(entity: Entity, index: GraphIndex, most: int = 3) -> list[tuple[str, ...]]:
    """Sets of the disease's vocabulary symptoms that no other disease of the graph shares and that may point to one
    disease at all (the vignette rule of crossing.py: a specific sign, or four with at most two non-specific)."""
    from itertools import combinations

    symptoms = index.specific_symptoms(entity)
    found: list[tuple[str, ...]] = []
    for size in (2, 3, 4):
        for shown in combinations(symptoms[:8], size):
            if index.diagnosable(shown) and index.candidates(shown) == [entity.name]:
                found.append(shown)
                if len(found) == most:
                    return found
    return found


def knowledge_messages(entity: Entity, kind: str, count: int, index: GraphIndex) -> list[dict[str, str]] | None:
    """The messages of one prompt kind for one entity, or None when the kind does not apply to it."""
    data = resources.prompts()
    spec = prompt_kinds()[kind]
    if entity.kind not in spec["for"]:
        return None
    sets = ""
    if kind == "case":
        found = unique_symptom_sets(entity, index)
        if not found:
            return None
        sets = "；".join("、".join(pair) for pair in found)
    header = fill(data["header"], name=entity.name, kind=data["kind_names"].get(entity.kind, entity.kind),
                  facts=facts_json(entity))
    body = fill(spec["prompt"], name=entity.name, count=str(count), sets=sets)
    return [{"role": "system", "content": data["system"]}, {"role": "user", "content": header + body + data["footer"]}]


def knowledge_items(entities: Sequence[Entity], kinds: Sequence[str], count: int, vignettes: bool = True,
                    ) -> list[Item]:
    """One request per entity and prompt kind; the case kind (vignettes) only when vignettes are built."""
    index = GraphIndex(entities)
    lexicon = Lexicon.of(entities)
    items = []
    for entity in entities:
        for kind in kinds:
            if kind == "case" and not vignettes:
                continue
            messages = knowledge_messages(entity, kind, count, index)
            if messages is not None:
                items.append(Item(f"{entity.name}#{kind}", messages, _acceptor(entity, kind, lexicon)))
    return items


Acceptor = Callable[[list[tuple[str, str]]], tuple[list[Row], Counter[str]]]


def _acceptor(entity: Entity, kind: str, lexicon: Lexicon) -> Acceptor:
    def accept(pairs: list[tuple[str, str]]) -> tuple[list[Row], Counter[str]]:
        rows: list[Row] = []
        filtered: Counter[str] = Counter()
        for question, answer in pairs:
            problem = grounding_problem(answer, entity, lexicon)
            if problem:
                filtered[problem.split(" (")[0]] += 1
                continue
            used = tuple(dict.fromkeys(fact for fact in entity.all_values() if fact in answer))
            relations = tuple(relation for relation, values in entity.facts.items() if set(values) & set(used))
            predicates = tuple(dict.fromkeys(p for relation in relations for p in entity.sources.get(relation, ())))
            adverse = "adverse" in relations or "不良反应" in answer or "副作用" in answer
            names = (entity.name, *entity.values("generic_name"))  # a brand of insulin is never stopped alone
            keep = stopped_gradually("".join(entity.values("precaution")))
            rows.append(Row(question, with_care_advice(question, answer, adverse, names, keep), f"llm_{kind}",
                            (entity.name,), predicates, "+".join(relations), used))
        return rows, filtered

    return accept


# --- manifest and work log -----------------------------------------------------------------------------------------


def sidecar(output: Path, suffix: str) -> Path:
    return output.with_name(output.name + suffix)


def facts_hash(items: Sequence[Item]) -> str:
    digest = hashlib.sha256()
    for item in items:
        digest.update(json.dumps([item.key, item.messages], ensure_ascii=False).encode("utf-8"))
    return digest.hexdigest()[:16]


def check_manifest(output: Path, manifest: dict[str, Any], resume: bool, has_log: bool) -> None:
    """On resume, the earlier run's manifest must match this run's settings exactly; else refuse, naming them."""
    path = sidecar(output, ".manifest.json")
    if not resume or not has_log:
        return
    earlier = read_jsonl_tolerant(path)
    if not earlier:
        raise UserError(f"--resume True: {output} has a work log but no run manifest ({path}); rerun without "
                        "--resume to start afresh")
    different = [f"{key} {earlier[0].get(key)!r} -> {value!r}" for key, value in manifest.items()
                 if earlier[0].get(key) != value]
    if different:
        raise UserError(f"--resume True: the earlier run into {output} used other settings ({'; '.join(different)}); "
                        "resume with the same settings, or rerun without --resume to start afresh")


def start_run(output: Path, manifest: dict[str, Any], resume: bool) -> dict[str, dict[str, Any]]:
    """Prepare the work log and manifest; the finished items of an earlier run (when resuming), by key."""
    log, manifest_path = sidecar(output, ".work.jsonl"), sidecar(output, ".manifest.json")
    check_manifest(output, manifest, resume, log.is_file())
    if not resume:
        log.unlink(missing_ok=True)
    atomic_write(manifest_path, json.dumps(manifest, ensure_ascii=False) + "\n")
    drop_torn_tail(log)
    done: dict[str, dict[str, Any]] = {}
    for entry in read_jsonl_tolerant(log):
        if isinstance(entry.get("key"), str) and isinstance(entry.get("rows"), list):
            done[entry["key"]] = entry
    return done


# --- running -------------------------------------------------------------------------------------------------------


def warn(message: str) -> None:
    """A warning that does not break the progress bar."""
    tqdm.write(f"warning: {message}", file=sys.stderr)


def ask(client: Any, config: llm.ChatConfig, item: Item,
        sleep: Callable[[float], None] = time.sleep) -> tuple[list[tuple[str, str]], int, llm.Usage, int]:
    """(pairs, malformed items, tokens, re-asks) of one item; an unusable reply is asked once more."""
    prompt_tokens = completion_tokens = 0
    for attempt in range(2):
        reply, usage = llm.chat_reply(client, config, item.messages)
        prompt_tokens += usage.prompt_tokens
        completion_tokens += usage.completion_tokens
        items = llm.extract_json_array(reply)
        if items is not None:
            pairs, malformed = llm.qa_pairs(items)
            return pairs, malformed, llm.Usage(prompt_tokens, completion_tokens), attempt
        if attempt == 0:
            sleep(llm.backoff_delay(0, config))
    raise llm.ChatError("the reply is not a JSON array of question/answer objects (asked twice)")


def run_items(items: Sequence[Item], done: dict[str, dict[str, Any]], log: Path, client: Any,
              config: llm.ChatConfig, concurrency: int, counts: RunCounts) -> None:
    """Ask every item not done yet, `concurrency` at a time; each finished item is appended to the log at once."""
    pending = [item for item in items if item.key not in done]
    counts.items, counts.done_before, counts.requested = len(items), len(items) - len(pending), len(pending)
    pool = ThreadPoolExecutor(max_workers=concurrency)
    futures: dict[Future[Any], Item] = {pool.submit(ask, client, config, item): item for item in pending}
    try:
        for future in tqdm(as_completed(futures), total=len(futures), desc="asking", unit="request",
                           file=sys.stderr, disable=None):
            item = futures[future]
            try:
                pairs, malformed, usage, reasked = future.result()
            except llm.ChatError as error:
                counts.skipped += 1
                warn(f"{item.key}: {error}; skipped (rerun with --resume True to ask again)")
                continue
            rows, filtered = item.accept(pairs)
            filtered["malformed"] += malformed
            counts.reasked += reasked
            entry = {"key": item.key, "rows": [row.record() | {"values": list(row.values)} for row in rows],
                     "usage": {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens},
                     "filtered": dict(filtered)}
            append_jsonl(log, [entry])
            done[item.key] = entry
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # on a fatal error or Ctrl-C, unsent requests are dropped


def collected_rows(items: Sequence[Item], done: dict[str, dict[str, Any]], counts: RunCounts) -> list[Row]:
    """The rows of every finished item, in item order (not the order replies came in), as `Row`s for the gates."""
    rows = []
    for item in items:
        entry = done.get(item.key)
        if entry is None:
            continue
        counts.filtered.update({key: int(value) for key, value in entry.get("filtered", {}).items()})
        for record in entry["rows"]:
            meta = record.get("meta", {})
            rows.append(Row(record["instruction"], record["output"], meta.get("kind", "llm"),
                            tuple(meta.get("entities", ())), tuple(meta.get("predicates", ())),
                            meta.get("relation", ""), tuple(record.get("values", ()))))
    return rows


def usage_report(items: Sequence[Item], done: dict[str, dict[str, Any]], input_price: float, output_price: float,
                 ) -> dict[str, Any]:
    prompt = sum(int(done[item.key].get("usage", {}).get("prompt_tokens", 0)) for item in items if item.key in done)
    completion = sum(int(done[item.key].get("usage", {}).get("completion_tokens", 0))
                     for item in items if item.key in done)
    priced = input_price > 0 or output_price > 0
    cost = (prompt * input_price + completion * output_price) / 1e6 if priced else None
    return {"requests": sum(1 for item in items if item.key in done), "prompt_tokens": prompt,
            "completion_tokens": completion, "input_price_per_million": input_price,
            "output_price_per_million": output_price,
            "estimated_cost_usd": round(cost, 6) if cost is not None else None}


def dry_run_lines(items: Sequence[Item], pairs_per_item: int, input_price: float, output_price: float) -> list[str]:
    """What a run would ask and roughly cost (nothing is sent, nothing is written)."""
    chars = sum(len(message["content"]) for item in items for message in item.messages)
    prompt_tokens = math.ceil(chars * CHARS_PER_TOKEN)
    completion_tokens = len(items) * pairs_per_item * COMPLETION_TOKENS_PER_PAIR
    kinds = Counter(item.key.rsplit("#", 1)[-1] for item in items)
    per_kind = ", ".join(f"{kind} {count}" for kind, count in kinds.items())
    lines = [f"dry run: {len(items)} requests ({per_kind}); nothing sent, nothing written",
             (f"estimated tokens: {prompt_tokens} prompt (about {CHARS_PER_TOKEN:g} per character) + "
              f"{completion_tokens} completion (about {COMPLETION_TOKENS_PER_PAIR} per pair)")]
    if input_price > 0 or output_price > 0:
        cost = (prompt_tokens * input_price + completion_tokens * output_price) / 1e6
        lines.append(f"estimated cost: ${cost:.4f} at ${input_price:g}/${output_price:g} per million tokens")
    else:
        lines.append("estimated cost: pass --input_price and --output_price (USD per million tokens) to estimate it")
    if items:
        lines.append(f"first request ({items[0].key}):\n{items[0].messages[-1]['content']}")
    return lines
