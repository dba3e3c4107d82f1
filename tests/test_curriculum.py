"""SENT curriculum (issue 16, item 2): semantic entropy by hand, the stage order of the sampler and its
resume, the cache's reuse and invalidation, and the training wiring on the tiny model."""

import json
import math
import os

import pytest
from conftest import SMALL, read_metrics, run_train

from grpo_fsdp.cli import UserError
from grpo_fsdp.curriculum import cache, tool
from grpo_fsdp.curriculum.entropy import cluster_sizes, clusters, correct_count, final_answer, semantic_entropy
from grpo_fsdp.data.batching import curriculum_batch_indices

# ---------------------------------------------------------------- semantic entropy


def _entropy(texts):
    return semantic_entropy(cluster_sizes([final_answer(t) for t in texts]))


def test_entropy_of_4_4_4_5():
    # p = (3/4, 1/4): H = -(0.75 ln 0.75 + 0.25 ln 0.25) = 0.215762 + 0.346574 = 0.562335
    h = _entropy(["so \\boxed{4}", "\\boxed{4}", "\\boxed{4}", "\\boxed{5}"])
    assert h == pytest.approx(0.5623351446, abs=1e-9)
    assert round(h, 3) == 0.562


def test_equivalent_answers_share_a_cluster_under_the_reward_grader():
    texts = ["\\boxed{4}", "The answer is 4.", "\\boxed{4.0}", "\\boxed{\\frac{8}{2}}", "\\boxed{\\$4}"]
    assert cluster_sizes([final_answer(t) for t in texts]) == [5]
    assert _entropy(texts) == 0.0
    assert cluster_sizes([final_answer(t) for t in ["\\boxed{0.5}", "\\boxed{\\frac12}", "\\boxed{2}"]]) == [2, 1]


def test_no_answer_is_a_cluster_of_its_own_each():
    # 4, 4, (none), (unclosed box = none): sizes 2, 1, 1 -> H = -(0.5 ln 0.5 + 2 x 0.25 ln 0.25) = 0.346574 + 0.693147
    texts = ["\\boxed{4}", "\\boxed{4}", "I do not know", "\\boxed{4"]
    assert [final_answer(t) for t in texts] == ["4", "4", None, None]
    assert cluster_sizes([final_answer(t) for t in texts]) == [2, 1, 1]
    assert _entropy(texts) == pytest.approx(1.0397207708, abs=1e-9)
    assert _entropy(["no", "answer", "here", "at all"]) == pytest.approx(math.log(4), abs=1e-12)  # never 0


def test_correct_count_grades_each_cluster_against_gold():
    groups = clusters([final_answer(t) for t in ["\\boxed{0.5}", "\\boxed{\\frac12}", "\\boxed{2}", "nothing"]])
    assert [size for _, size in groups] == [2, 1, 1]
    assert correct_count(groups, "1/2") == 2 and correct_count(groups, "2") == 1 and correct_count(groups, "7") == 0


@pytest.mark.parametrize("overrides,field", [
    (["algo=grpo", "data.curriculum=sent"], "data.curriculum_file"),
    (["algo=grpo", "data.curriculum=sent", "data.curriculum_file=/no/such/file.jsonl"], "data.curriculum_file"),
    (["algo=grpo", "data.curriculum=entropy"], "data.curriculum"),
    (["algo=sft", "data.curriculum=sent"], "data.curriculum"),
    (["algo=grpo", "data.curriculum=sent", "data.curriculum_stages=0"], "data.curriculum_stages"),
])
def test_bad_curriculum_settings_are_refused_at_start_up(overrides, field, tmp_path):
    from grpo_fsdp.cli import compose
    from grpo_fsdp.config import ConfigError
    from grpo_fsdp.validation import validate

    with pytest.raises(ConfigError) as e:
        validate(compose(overrides), world_size=1, cuda_available=False)
    assert e.value.field_name == field, str(e.value)


# ---------------------------------------------------------------- the sampler


def test_stages_are_walked_easy_to_hard_and_resume_exactly():
    ordered = [17, 3, 9, 0, 22, 5, 11, 8, 1, 14, 2, 20, 6, 19, 4, 13, 7, 23, 10, 16, 12, 21, 15, 18]  # easiest first
    b, stages, seed = 4, 3, 7  # 8 prompts per stage -> 2 batches per stage, 6 per epoch
    straight = [curriculum_batch_indices(ordered, stages, b, step, seed) for step in range(14)]
    assert [s for _, s in straight] == [0, 0, 1, 1, 2, 2] * 2 + [0, 0]
    for epoch in range(2):
        for stage in range(3):
            got = straight[6 * epoch + 2 * stage][0] + straight[6 * epoch + 2 * stage + 1][0]
            assert sorted(got) == sorted(ordered[8 * stage : 8 * stage + 8])  # each stage's prompts, each once
    assert straight[0][0] != straight[6][0]  # a new shuffle in the next epoch
    assert straight[0][0] != ordered[:4]  # shuffled within the stage
    # resume: a fresh call at step k gives the uninterrupted run's batch (a pure function of step, seed, order)
    assert [curriculum_batch_indices(list(ordered), stages, b, step, seed) for step in range(5, 14)] == straight[5:]
    assert curriculum_batch_indices(ordered, stages, b, 0, seed + 1) != straight[0]


def test_too_many_stages_for_the_batch_is_one_line():
    with pytest.raises(UserError, match=r"^data.curriculum_stages=4: a stage of 2 prompts cannot fill one batch of 4"):
        curriculum_batch_indices(list(range(8)), 4, 4, 0, 0)


def _cache_file(path, questions, entropies, model="m"):
    key = cache.make_key(model, "d", 4, 0)
    w = cache.Writer(path, key)
    w.add({"id": cache.prompt_id(q), "entropy": h, "clusters": [4]} for q, h in zip(questions, entropies))


def test_training_order_sorts_by_entropy_and_drops_solved(tmp_path):
    qs = ["a", "b", "c", "d", "e"]
    _cache_file(tmp_path / "c.jsonl", qs[::-1], [0.9, 0.0, 1.2, 0.3, 0.3])  # e, d, c, b, a
    order, ent, line = cache.training_order(str(tmp_path / "c.jsonl"), qs, "m", drop_solved=False)
    assert ent == [0.3, 0.3, 1.2, 0.0, 0.9] and order == [3, 0, 1, 4, 2]  # ties keep the data order
    assert "1 with H = 0" in line and "kept" in line
    order, _, line = cache.training_order(str(tmp_path / "c.jsonl"), qs, "m", drop_solved=True)
    assert order == [0, 1, 4, 2] and "dropped" in line
    with pytest.raises(UserError, match="was computed for model m, not other"):
        cache.training_order(str(tmp_path / "c.jsonl"), qs, "other", drop_solved=False)
    with pytest.raises(UserError, match="has no entropy for 1 of the 6 training prompts"):
        cache.training_order(str(tmp_path / "c.jsonl"), [*qs, "f"], "m", drop_solved=False)


# ---------------------------------------------------------------- the tool and its cache


class _FakeEngine:
    """Answers prompt k's samples with 'x' boxed k mod 3 times per sample index: deterministic entropies."""

    def __init__(self, log, fail_after=None):
        self.log, self.fail_after = log, fail_after

    def generate(self, prompts, sampling, keys):
        if self.fail_after is not None and len(self.log) >= self.fail_after:
            raise KeyboardInterrupt  # an interrupted run
        self.log.append(list(keys))
        from grpo_fsdp.rollout.base import Completion

        tok = __import__("grpo_fsdp.tokenizer", fromlist=["x"]).build_tiny_tokenizer()
        out = []
        for i, k in enumerate(keys):
            for s in range(sampling.n):
                text = f"\\boxed{{{s % (k % 3 + 1)}}}"
                out.append(Completion(i, tok.encode(text, add_special_tokens=False), [0.0], "stop"))
        return out


TOOL = ["model.arch.hidden_size=64", "model.arch.intermediate_size=128", "model.arch.num_layers=2", "data.limit=10",
        "samples=4", "batch=4", "algo.max_new_tokens=8"]


def _tool(monkeypatch, out, extra=(), fail_after=None):
    calls = []
    monkeypatch.setattr(tool, "_engine", lambda cfg, tok, path: _FakeEngine(calls, fail_after))
    tool.main([*TOOL, f"out={out}", *extra])
    return calls


def test_cache_is_reused_resumed_and_invalidated_on_a_model_change(tmp_path, monkeypatch):
    out = tmp_path / "c.jsonl"
    with pytest.raises(KeyboardInterrupt):
        _tool(monkeypatch, out, fail_after=1)  # killed after the first batch of 4 prompts
    _, rows = cache.read(out)
    assert len(rows) == 4
    calls = _tool(monkeypatch, out)  # resumes: only the 6 missing prompts
    assert calls == [[4, 5, 6, 7], [8, 9]]
    key, rows = cache.read(out)
    assert len(rows) == 10 and key["samples"] == 4
    # prompt k answers s mod (k mod 3 + 1) over s = 0..3: one cluster (H 0), [2,2] (ln 2), [2,1,1] (1.0397)
    assert sorted({r["entropy"] for r in rows.values()}) == [0.0, round(math.log(2), 6), round(1.0397207708, 6)]
    assert _tool(monkeypatch, out) == []  # the same key: nothing sampled again
    assert len(_tool(monkeypatch, out, ["model.arch.hidden_size=32"])) == 3  # another model: all 10 again
    assert (tmp_path / "c.jsonl.stale").is_file()
    assert len(_tool(monkeypatch, out, ["model.arch.hidden_size=32", "samples=5"])) == 3  # another M too


def test_model_fingerprint_follows_the_weights(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"1234")
    first = cache.model_fingerprint(str(tmp_path))
    assert cache.model_fingerprint(str(tmp_path)) == first
    (tmp_path / "model.safetensors").write_bytes(b"12345")  # retrained into the same directory
    assert cache.model_fingerprint(str(tmp_path)) != first


# ---------------------------------------------------------------- training with the curriculum


def test_grpo_walks_the_curriculum_and_keeps_best_and_latest(tmp_path):
    """The real tool (tiny model, transformers engine) then 4 GRPO steps on 2 processes under data.curriculum=sent,
    with an evaluation every step on rank 1 and checkpoint.best_metric (rank 0 decides from rank 1's value): stages
    and batch entropies are logged, best/ and latest.json are written."""
    import subprocess
    import sys

    from conftest import REPO

    out = tmp_path / "c.jsonl"
    small = [*SMALL, "data.limit=32", "algo=grpo", "algo.reward_workers=1", "algo.max_new_tokens=8", "algo.prompts_per_step=4",
             "algo.group_size=2", "train.global_batch_size=8", "train.micro_batch_size=4", "optim.warmup_steps=0", "rollout.engine=hf"]
    proc = subprocess.run([sys.executable, "-m", "grpo_fsdp.curriculum", *small, "samples=4", f"out={out}"], check=False, cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "with H = 0" in proc.stderr and "no histogram: matplotlib is not installed" in proc.stderr or out.with_suffix(".png").exists()
    _, rows = cache.read(out)
    assert len(rows) == 32
    run_dir = tmp_path / "run"
    run_train([*small, f"run_dir={run_dir}", "train.max_steps=4", "data.curriculum=sent", f"data.curriculum_file={out}",
               "data.curriculum_stages=4", "eval.tasks=[arithmetic]", "eval.every_steps=1", "eval.limit=4", "eval.max_new_tokens=8",
               "checkpoint.best_metric=eval/arithmetic/accuracy", "checkpoint.keep_last=1"], nproc=2)  # eval on rank 1
    metrics = read_metrics(run_dir)
    train = [r for r in metrics if "train/loss" in r]
    assert [r["curriculum/stage"] for r in train] == [0, 0, 1, 1]  # 8 prompts per stage: 2 steps of 4 each
    h = sorted(r["entropy"] for r in rows.values())  # the stage's batch means lie within its entropy range
    assert all(h[0] - 1e-9 <= r["curriculum/batch_entropy"] <= h[7] + 1e-9 for r in train[:2])
    assert all(h[8] - 1e-9 <= r["curriculum/batch_entropy"] <= h[15] + 1e-9 for r in train[2:])
    root = run_dir / "checkpoints"
    latest = json.loads((root / "latest.json").read_text())
    assert latest == {"step": 4, "path": str((root / "step_000004").resolve()), "name": "step_000004"}
    best = json.loads((root / "best" / "BEST.json").read_text())
    evals = [(r["step"], r["eval/arithmetic/accuracy"]) for r in metrics if "eval/arithmetic/accuracy" in r]
    assert best["step"] == max(evals, key=lambda e: (e[1], -e[0]))[0] and best["value"] == max(v for _, v in evals)
