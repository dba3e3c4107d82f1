"""The evaluator: pass@k / maj@k / breakdowns by hand, `evaluate` on a scripted engine whose every
completion is known (so each number is worked out here), per-level and per-subject counts on real
MATH rows, and `python -m eval` end to end on a tiny checkpoint trained inside the test."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections import Counter

import pytest
from conftest import REPO, SHARED, SMALL, _env, run_train

from eval.evaluate import encode_prompts, evaluate
from eval.metrics import answer_key, breakdown, majority_index, pass_at_k
from eval.tasks import load_task
from grpo_fsdp.data.records import Example
from grpo_fsdp.data.templates import INSTRUCTION
from grpo_fsdp.grading import grade
from grpo_fsdp.rewards import RewardScorer
from grpo_fsdp.rollout.base import Completion, GenerationStats, RolloutEngine, SamplingConfig
from grpo_fsdp.tokenizer import build_tiny_tokenizer

TOK = build_tiny_tokenizer()  # byte-level: one token per ASCII character


# ---------------------------------------------------------------- pure metrics, by hand


def test_pass_at_k_by_hand():
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 = c/n
    assert pass_at_k(4, 3, 2) == 1.0  # C(1,2) = 0: any 2 of 4 include a correct one
    assert pass_at_k(4, 0, 2) == 0.0
    assert pass_at_k(6, 1, 3) == pytest.approx(1 - 10 / 20)  # 1 - C(5,3)/C(6,3)
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def test_majority_vote_and_answer_key():
    assert majority_index(["5", "7", "7", None, "5"]) == 0  # 2 votes each: "5" was seen first
    assert majority_index(["7", "5", "5"]) == 1
    assert majority_index([None, "3"]) == 1
    assert majority_index([None, None]) is None
    assert answer_key("so \\boxed{\\dfrac{1}{2}}.") == "\\frac{1}{2}"
    assert answer_key("\\boxed{ 1,\\!000 }") == "1,000"
    assert answer_key("\\boxed{\\left( 3, \\pi \\right)}") == "(3,\\pi)"
    assert answer_key("the answer is 12") is None
    assert answer_key("\\boxed{12") is None  # unclosed


def test_breakdown_by_hand():
    table = breakdown([2, 1, 1, None, 3], [False, True, False, True, True])
    assert list(table) == ["1", "2", "3", "unknown"]
    assert table["1"] == {"correct": 1, "total": 2, "accuracy": 0.5}
    assert table["2"] == {"correct": 0, "total": 1, "accuracy": 0.0}
    assert table["unknown"] == {"correct": 1, "total": 1, "accuracy": 1.0}
    assert list(breakdown(["b", "a"], [True, True])) == ["a", "b"]


# ---------------------------------------------------------------- evaluate on a scripted engine


class ScriptedEngine:
    """A RolloutEngine whose completions are given per question: [(text, finish_reason), ...] for
    the n samples. Token ids are the tiny tokenizer's bytes, plus EOS when the text "stopped"."""

    def __init__(self, script: dict[str, list[tuple[str, str]]], max_model_len: int | None = None):
        self.script, self.calls = script, []
        self.last_stats = GenerationStats()
        self.max_model_len = max_model_len

    def generate(self, prompts, sampling: SamplingConfig, keys=None):
        self.calls.append((sampling, keys))
        assert all(len(p) + sampling.max_new_tokens <= (self.max_model_len or 10**9) for p in prompts)
        out = []
        for i, prompt in enumerate(prompts):
            question = TOK.decode(prompt).removeprefix("Question: ").removesuffix("\nAnswer:").removesuffix(INSTRUCTION)
            for body, finish in self.script[question][: sampling.n]:
                ids = TOK.encode(body) + ([TOK.eos_token_id] if finish == "stop" else [])
                out.append(Completion(i, ids, [0.0] * len(ids), finish))
        return out

    def load_weights(self, named_tensors): ...

    def sleep(self, level=1): ...

    def wake_up(self): ...

    def prompt_logprobs(self, prompts): ...

    def close(self): ...


@pytest.fixture(scope="module")
def scorer():
    with RewardScorer(num_workers=1) as s:
        yield s


def _ex(question, answer, level=None, subject=None):
    return Example(question, f"\\boxed{{{answer}}}", answer, {"id": question, "level": level, "subject": subject})


def test_evaluate_greedy_by_hand(scorer):
    examples = [_ex("Q-a", "4", 1, "Algebra"), _ex("Q-b", "\\frac12", 1, "Geometry"), _ex("Q-c", "7", 2, "Algebra"),
                _ex("Q-d", "9", 3, "Algebra"), _ex("Q-e", "3", None, "Geometry")]
    script = {
        "Q-a": [("2 + 2 = 4. The answer is \\boxed{4}.", "stop")],  # correct, valid format
        "Q-b": [("So \\boxed{0.5}", "stop")],  # correct (math-verify: 0.5 = 1/2), valid
        "Q-c": [("I think \\boxed{6}", "stop")],  # wrong, valid format
        "Q-d": [("\\boxed{9} and then on and on", "length")],  # correct, but cut off: invalid format
        "Q-e": [("\\boxed{2} or \\boxed{3}", "stop")],  # correct (last box), two boxes: invalid format
    }
    engine = ScriptedEngine(script)
    assert isinstance(engine, RolloutEngine)
    r = evaluate(engine, TOK, examples, template="plain", max_new_tokens=64, scorer=scorer, task="hand")
    assert engine.calls[0][0].temperature == 0.0 and engine.calls[0][0].n == 1  # k = 1: greedy
    assert (r.num_problems, r.correct, r.accuracy) == (5, 4, 4 / 5)
    assert r.valid_format_rate == 3 / 5  # Q-a, Q-b, Q-c
    assert r.truncated_rate == 1 / 5
    # bytes of each text, + 1 EOS for the four that stopped
    assert r.mean_length == (35 + 1 + 14 + 1 + 17 + 1 + 28 + 22 + 1) / 5
    assert r.pass_at_k is None and r.maj_at_k is None
    assert r.per_level == {"1": {"correct": 2, "total": 2, "accuracy": 1.0}, "2": {"correct": 0, "total": 1, "accuracy": 0.0},
                           "3": {"correct": 1, "total": 1, "accuracy": 1.0}, "unknown": {"correct": 1, "total": 1, "accuracy": 1.0}}
    assert r.per_subject == {"Algebra": {"correct": 2, "total": 3, "accuracy": 2 / 3},
                             "Geometry": {"correct": 2, "total": 2, "accuracy": 1.0}}
    assert [(s["problem"], s["gold"], s["correct"]) for s in r.samples] == [
        ("Q-a", "4", True), ("Q-b", "\\frac12", True), ("Q-c", "7", False), ("Q-d", "9", True), ("Q-e", "3", True)]
    assert r.samples[2]["prediction"] == "I think \\boxed{6}"
    metrics = r.metrics()
    assert metrics["eval/hand/accuracy"] == 0.8 and metrics["eval/hand/level_2"] == 0.0


def test_evaluate_pass_and_maj_by_hand(scorer):
    examples = [_ex("Q-a", "5"), _ex("Q-b", "3")]
    script = {
        "Q-a": [("\\boxed{5}", "stop"), ("\\boxed{6}", "stop"), ("\\boxed{6}", "stop"), ("\\boxed{5}", "stop")],
        "Q-b": [("\\boxed{2}", "stop"), ("no idea", "stop"), ("\\boxed{3}", "stop"), ("\\boxed{2}", "stop")],
    }
    engine = ScriptedEngine(script)
    r = evaluate(engine, TOK, examples, template="plain", max_new_tokens=32, k=2, n=4, seed=7, scorer=scorer, batch_size=1)
    # one call per prompt, one seed, each prompt keyed by its index in the task
    assert [(c.n, c.temperature, c.seed, keys) for c, keys in engine.calls] == [(4, 1.0, 7, [0]), (4, 1.0, 7, [1])]
    assert (r.num_samples, r.correct, r.accuracy) == (8, 3, 3 / 8)
    # pass@2: Q-a has c=2 of 4: 1 - C(2,2)/C(4,2) = 5/6; Q-b has c=1: 1 - C(3,2)/C(4,2) = 1/2
    assert r.pass_at_k == pytest.approx((5 / 6 + 1 / 2) / 2)
    # maj@2 over the first two samples: Q-a "5" vs "6" tie -> "5" (first) correct; Q-b "2" (no rival vote) wrong
    assert r.maj_at_k == 0.5
    assert r.per_level is None and r.per_subject is None  # no example has them
    assert [s["num_correct"] for s in r.samples] == [2, 1]
    assert r.metrics()["eval//pass@2"] == r.pass_at_k
    with pytest.raises(ValueError, match="identical"):
        evaluate(engine, TOK, examples, template="plain", k=2, temperature=0.0, scorer=scorer)


def test_prompts_too_long_for_the_context_are_skipped_and_count_as_wrong(scorer):
    """Issue 11 item 11: a prompt + max_new_tokens beyond the engine's context is skipped (vLLM raised
    VLLMValidationError on it; transformers ran past max_position_embeddings), counted in one line and in
    `skipped_too_long`, and scored wrong: the denominators stay the whole task."""
    long_q = "Q-long " + "x" * 80
    examples = [_ex("Q-a", "5", 1), _ex(long_q, "3", 1), _ex("Q-c", "7", 2)]
    script = {"Q-a": [("\\boxed{5}", "stop"), ("\\boxed{5}", "stop")], long_q: [("\\boxed{3}", "stop")] * 2,
              "Q-c": [("\\boxed{7}", "stop"), ("\\boxed{1}", "stop")]}
    short_len, long_len, _ = map(len, encode_prompts(TOK, examples, "plain", INSTRUCTION))
    context = long_len + 10 - 1  # the long prompt + 10 new tokens is one token too many; the short ones fit
    assert short_len + 10 <= context
    engine = ScriptedEngine(script, max_model_len=context)
    lines = []
    r = evaluate(engine, TOK, examples, template="plain", max_new_tokens=10, k=2, n=2, seed=3, scorer=scorer, task="long",
                 log=lines.append)
    assert lines == [(f"eval: long: skipped 1 of 3 problems whose prompt (up to {long_len} tokens) + max_new_tokens=10 "
                     f"exceeds the model's {context}-token context; they count as wrong")]
    assert [keys for _, keys in engine.calls] == [[0, 2]]  # the kept problems keep their task indices (their seeds)
    assert (r.num_problems, r.skipped_too_long, r.max_model_len) == (3, 1, context)
    assert (r.correct, r.accuracy) == (3, 3 / 6)  # 2 + 1 of 4 generated samples, over all 6 samples
    assert r.pass_at_k == pytest.approx((1 + 0 + 1) / 3) and r.maj_at_k == pytest.approx(2 / 3)  # skipped: fails both
    assert r.valid_format_rate == 1.0 and r.mean_length == (9 + 1) and r.truncated_rate == 0.0  # over generated samples
    assert r.per_level == {"1": {"correct": 2, "total": 4, "accuracy": 0.5}, "2": {"correct": 1, "total": 2, "accuracy": 0.5}}
    assert [(s["skipped"], s["prediction"], s["correct"]) for s in r.samples] == [
        (False, "\\boxed{5}", True), (True, "", False), (False, "\\boxed{7}", True)]
    assert r.metrics()["eval/long/skipped_too_long"] == 1.0 and r.to_dict()["skipped_too_long"] == 1
    # every problem too long: nothing generated, all wrong, no crash
    none_fit = evaluate(ScriptedEngine(script, max_model_len=short_len), TOK, examples, template="plain",
                        max_new_tokens=10, scorer=scorer, task="all", log=None)
    assert (none_fit.skipped_too_long, none_fit.correct, none_fit.accuracy, none_fit.mean_length) == (3, 0, 0.0, 0.0)


def test_periodic_eval_skips_long_prompts_in_one_line(scorer, tmp_path, capsys):
    """The evaluation between training steps (recipes/periodic_eval.py) skips and counts them too, and logs
    eval/<task>/skipped_too_long; the run goes on."""
    from grpo_fsdp.config import ConfigError, EvalConfig
    from grpo_fsdp.recipes.periodic_eval import PeriodicEval

    rows = [{"question": "1+1?", "answer": "so #### 2"}, {"question": "2+" * 60 + "2?", "answer": "#### 122"}]
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    evaluator = PeriodicEval(EvalConfig(tasks=["gsm8k"], data_dir=str(tmp_path), max_new_tokens=16), rank=0, eval_rank=0,
                             tokenizer=TOK, template="plain", instruction="", scorer=scorer, max_steps=1, seed=0)
    engine = ScriptedEngine({"1+1?": [("\\boxed{2}", "stop")]}, max_model_len=100)

    class Logger:
        def __init__(self):
            self.metrics, self.tables = {}, []

        def log_eval(self, step, metrics):
            self.metrics[step] = metrics

        def log_table(self, step, key, columns, rows):
            self.tables.append((key, rows))

    logger = Logger()
    evaluator(1, engine, logger)
    assert logger.metrics[1]["eval/gsm8k/skipped_too_long"] == 1.0 and logger.metrics[1]["eval/gsm8k/accuracy"] == 0.5
    with pytest.raises(ConfigError, match=re.escape(
            "eval.max_new_tokens: 512 (task gsm8k's default) leaves no room for a prompt in the model's 512-token context; "
            "set eval.max_new_tokens=<below 512, e.g. 256>")):  # e.g. the demo's tiny model; refused on every rank
        PeriodicEval(EvalConfig(tasks=["gsm8k"]), rank=1, eval_rank=0, tokenizer=TOK, template="plain", instruction="",
                     scorer=scorer, max_steps=1, seed=0, context=512)
    line = capsys.readouterr().out.splitlines()[-1]
    assert re.fullmatch(r"eval step 1: gsm8k accuracy 50\.0% of 2 \(\d+\.\d s; 1 skipped as wrong: prompt \+ 16 new tokens "
                        r"exceed the 100-token context\)", line), line


def test_per_level_and_subject_counts_add_up(scorer):
    data = SHARED / "data"
    if not (data / "math" / "test.jsonl").is_file():
        pytest.skip("../shared/data/math/test.jsonl is absent (a fresh clone without the shared folder)")
    examples = load_task("math", data_dir=str(data))[::125]  # the file is sorted by subject: spread out
    assert len(examples) == 40
    # right on every third problem (the gold itself), a wrong number elsewhere
    script = {e.question: [(f"\\boxed{{{e.answer if i % 3 == 0 else 'zzz'}}}", "stop")] for i, e in enumerate(examples)}
    r = evaluate(ScriptedEngine(script), TOK, examples, template="plain", max_new_tokens=8, scorer=scorer, task="math")
    assert r.correct == 14  # problems 0, 3, ..., 39
    for table, field in ((r.per_level, "level"), (r.per_subject, "subject")):
        assert sum(row["total"] for row in table.values()) == r.num_problems == 40
        assert sum(row["correct"] for row in table.values()) == r.correct
        expected = Counter("unknown" if e.meta[field] is None else str(e.meta[field]) for e in examples)
        assert {g: row["total"] for g, row in table.items()} == dict(expected)
    assert len(r.per_subject) > 1 and len(r.per_level) > 1


# ---------------------------------------------------------------- python -m eval end to end


def _eval_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "eval", *args], check=False, cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny model trained for 2 SFT steps and exported to Hugging Face format, as the demo does."""
    run_dir = tmp_path_factory.mktemp("eval") / "run"
    run_train([*SMALL, f"run_dir={run_dir}", "train.max_steps=2", "checkpoint.export_hf=true"])
    return run_dir / "hf"


SHARED_MATH500 = (SHARED / "data" / "math" / "math500.jsonl").is_file()
TASKS = ["arithmetic", "math500"] if SHARED_MATH500 else ["arithmetic"]


@pytest.fixture(scope="module")
def cli_results(checkpoint, tmp_path_factory):
    """One `python -m eval` run on the checkpoint: (process, results JSON)."""
    out = tmp_path_factory.mktemp("eval-out") / "results.json"
    proc = _eval_cli(f"model={checkpoint}", f"tasks=[{','.join(TASKS)}]", "limit=6", "max_new_tokens=12", f"out={out}",
                     f"data_dir={SHARED / 'data'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads(out.read_text()), out


def test_cli_writes_results_json(checkpoint, cli_results):
    proc, doc, out = cli_results
    assert doc["model"] == str(checkpoint) and doc["engine"] == "hf" and doc["date"] and doc["settings"]["limit"] == 6
    assert list(doc["tasks"]) == TASKS
    for name, t in doc["tasks"].items():
        for key in ("accuracy", "valid_format_rate", "mean_length", "seconds", "per_level", "per_subject", "samples",
                    "pass_at_k", "maj_at_k", "model", "date", "engine", "settings"):
            assert key in t, (name, key)
        assert t["num_problems"] == len(t["samples"]) == 6 and t["settings"]["max_new_tokens"] == 12
        assert t["settings"]["temperature"] == 0.0 and t["seconds"] > 0
        assert 0 < t["mean_length"] <= 12
        assert t["correct"] == sum(s["correct"] for s in t["samples"]) == round(t["accuracy"] * 6)
        # the JSON's verdicts are the training reward's grader's
        assert [s["correct"] for s in t["samples"]] == [grade(s["prediction"], s["gold"]) == 1.0 for s in t["samples"]]
        assert set(t["samples"][0]) >= {"problem", "prediction", "gold", "correct"}
    if SHARED_MATH500:
        m = doc["tasks"]["math500"]
        assert sum(row["total"] for row in m["per_level"].values()) == 6
        assert sum(row["total"] for row in m["per_subject"].values()) == 6
    assert doc["tasks"]["arithmetic"]["per_level"] is None  # synthetic problems have no level
    assert "accuracy" in proc.stdout and str(out) in proc.stdout


def test_held_out_accuracy_matches_cli(checkpoint, cli_results):
    """grpo_fsdp.accuracy (the demo's helper) now runs through the evaluator: same greedy numbers."""
    from grpo_fsdp.accuracy import held_out_accuracy

    cli = cli_results[1]["tasks"]["arithmetic"]
    acc = held_out_accuracy(checkpoint, load_task("arithmetic", limit=6), max_new_tokens=12, batch_size=4)
    assert (acc.total, acc.correct, acc.mean_length) == (6, cli["correct"], cli["mean_length"])


def test_cli_skips_prompts_longer_than_the_context(checkpoint, tmp_path):
    """Issue 11 item 11 on the transformers engine, end to end: the demo's model has a 512-token context and a
    GSM8K prompt of 561 tokens ended the run in a traceback (vLLM) or ran past the positions the model knows
    (transformers). Here the context is cut to 96 tokens and one handmade question is too long for it."""
    model = tmp_path / "short_context"
    shutil.copytree(checkpoint, model)
    conf = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**conf, "max_position_embeddings": 96}))
    rows = [{"question": "1+2?", "answer": "#### 3"}, {"question": "What is " + "1+" * 40 + "1?", "answer": "#### 41"},
            {"question": "4+4?", "answer": "#### 8"}]
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "results.json"
    proc = _eval_cli(f"model={model}", "tasks=[gsm8k]", f"data_dir={tmp_path}", "max_new_tokens=16", "instruction=",
                     f"out={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    long_len = len(encode_prompts(TOK, [Example(rows[1]["question"], "", "41", {})], "auto", "")[0])
    assert (f"eval: gsm8k: skipped 1 of 3 problems whose prompt (up to {long_len} tokens) + max_new_tokens=16 exceeds "
            "the model's 96-token context; they count as wrong") in proc.stderr.splitlines()
    task = json.loads(out.read_text())["tasks"]["gsm8k"]
    assert (task["num_problems"], task["skipped_too_long"], task["max_model_len"]) == (3, 1, 96)
    assert [s["skipped"] for s in task["samples"]] == [False, True, False] and task["samples"][1]["prediction"] == ""
    assert 0 < task["mean_length"] <= 16  # over the two generated problems
    # a budget that leaves no room for any prompt: one line before the weights load
    proc = _eval_cli(f"model={model}", "tasks=[gsm8k]", f"data_dir={tmp_path}", "max_new_tokens=96")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        ("error: max_new_tokens: 96 (the max_new_tokens option) leaves no room for a prompt in the model's 96-token context; "
        "set max_new_tokens=<below 96, e.g. 48>")], proc.stderr


def test_hf_engine_refuses_a_prompt_with_no_room(checkpoint):
    """The engines agree on a prompt that fills the context: vLLM raised its own VLLMValidationError, the transformers
    engine generated past max_position_embeddings; both now raise the same ValueError (callers skip such prompts)."""
    from eval.engines import build_engine, load_model_tokenizer

    engine = build_engine("hf", str(checkpoint), load_model_tokenizer(str(checkpoint)), device="cpu", dtype="float32")
    assert engine.max_model_len == 512
    with pytest.raises(ValueError, match="prompt 1 has 512 tokens, which leaves no room for a new token in the model's "
                                         "512-token context"):
        engine.generate([[5] * 10, [5] * 512], SamplingConfig(n=1, temperature=0.0, max_new_tokens=4))


@pytest.mark.parametrize(("args", "expected"), [
    (["tasks=[gsm8k,nope]"], "error: tasks: unknown task 'nope'"),
    (["k=two"], "error: k: "),
    (["limit"], "error: arguments: 'limit' is not key=value"),
    (["engine=tensorrt"], "error: engine: unknown value 'tensorrt'"),
])
def test_cli_bad_argument_is_one_line(checkpoint, args, expected):
    proc = _eval_cli(f"model={checkpoint}", "tasks=[arithmetic]", *args)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith(expected) and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_cli_missing_model_is_one_line(tmp_path):
    proc = _eval_cli(f"model={tmp_path / 'no-such-model'}", "tasks=[arithmetic]")
    assert proc.returncode == 2
    expected = f"error: model={str(tmp_path / 'no-such-model')!r}: no such directory; "
    assert proc.stderr.strip().splitlines() == [expected + "point it at a saved model (e.g. <run_dir>/hf) or a hub id"]


def test_empty_value_is_an_empty_string(tmp_path):
    """`instruction=''` in a shell arrives as "instruction=": the empty string (as Hydra reads it), not null."""
    from eval.options import parse_options

    assert parse_options([f"model={tmp_path}", "instruction="]).instruction == ""
    assert parse_options([f"model={tmp_path}", "instruction=Answer briefly."]).instruction == "Answer briefly."
