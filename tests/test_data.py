"""Data layer: parsers on hand-checked literal rows, the loader's skip-and-count contract, the
synthetic task, prompt/completion templates, SFT masks and the stateless batch order. Tests that
read the real GSM8K/MATH copies in ../shared/data skip when they are absent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from grpo_fsdp.cli import UserError
from grpo_fsdp.config import ArithmeticConfig, DataConfig
from grpo_fsdp.data import load_examples
from grpo_fsdp.data.arithmetic import make_arithmetic, rounded_estimate, worked_solution
from grpo_fsdp.data.batching import global_batch_indices, split_for_rank
from grpo_fsdp.data.gsm8k import parse_gsm8k
from grpo_fsdp.data.math_dataset import last_boxed, parse_level, parse_math
from grpo_fsdp.data.records import Example
from grpo_fsdp.data.sft import collate, tokenize_sft
from grpo_fsdp.data.templates import INSTRUCTION, completion_text, render_prompt
from grpo_fsdp.tokenizer import build_tiny_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"real data not found at {SHARED_DATA} (only beside the project checkout)")


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# parsers
# ---------------------------------------------------------------------------------------------
def test_gsm8k_row():
    row = {"question": " How much? ", "answer": "He pays 4*250 = <<4*250=1000>>1000 dollars.\n#### 1,000"}
    ex = parse_gsm8k(row, "r1")
    assert ex.answer == "1000"
    assert ex.question == "How much?"
    assert ex.solution == "He pays 4*250 = 1000 dollars.\nThe answer is \\boxed{1000}."
    assert ex.meta["id"] == "r1"


@pytest.mark.parametrize("row, reason", [({"question": "q"}, "missing 'answer'"), ({"answer": "#### 1"}, "missing 'question'"),
                                         ({"question": "q", "answer": "no marker 5"}, "####"), ({"question": "q", "answer": "x ####  "}, "nothing after"),
                                         ({"question": "q", "answer": 5}, "not a string")])
def test_gsm8k_malformed(row, reason):
    with pytest.raises(ValueError, match=reason):
        parse_gsm8k(row)


@pytest.mark.parametrize("text, expected", [
    ("so $x = \\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
    ("first \\boxed{1} then \\boxed{2}", "2"),
    ("\\boxed{1} and finally \\fbox{a{b}c}", "a{b}c"),
    ("the set \\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
    ("\\boxed{\\left\\{ x \\right.} tail}", "\\left\\{ x \\right."),  # escaped brace does not nest
    ("it is $\\boxed 5$.", "5"),
    ("spaced \\boxed {17}.", "17"),
    ("empty \\boxed{}", ""),
    ("cut off \\boxed{\\frac{1}{2", None),
    ("no box here", None),
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_math_rows():
    row = {"problem": "P", "solution": "So $\\boxed{\\frac{1}{2}}$.", "level": "Level 3", "type": "Algebra", "unique_id": "train/a/1.json"}
    ex = parse_math(row, "fallback")
    assert (ex.answer, ex.meta) == ("\\frac{1}{2}", {"id": "train/a/1.json", "level": 3, "subject": "Algebra"})
    # The answer field wins over the box (MATH-500 style: int level, "subject").
    ex = parse_math({"problem": "P", "solution": "$\\boxed{0.5}$", "answer": "\\frac12", "level": 4, "subject": "Geometry"}, "r9")
    assert (ex.answer, ex.meta) == ("\\frac12", {"id": "r9", "level": 4, "subject": "Geometry"})
    # An unboxed solution with an answer field gets the boxed ending the SFT targets rely on.
    ex = parse_math({"problem": "P", "solution": "It is 7.", "answer": "7"})
    assert ex.solution == "It is 7.\nThe answer is \\boxed{7}."
    assert [parse_level(v) for v in ("Level 5", 2, "Level ?", None, 9, "3")] == [5, 2, None, None, None, 3]
    for bad in ({"problem": "P", "solution": "no box"}, {"problem": "P", "solution": "\\boxed{}", "answer": ""}, {"solution": "\\boxed{1}"}):
        with pytest.raises(ValueError):
            parse_math(bad)


# ---------------------------------------------------------------------------------------------
# loader
# ---------------------------------------------------------------------------------------------
GOOD = {"question": "q", "answer": "a <<1+1=2>>2\n#### 2"}


def test_malformed_rows_are_skipped_and_counted(tmp_path, capsys):
    lines = [GOOD, "{not json", {"question": "q"}, "", {"question": "q", "answer": "no marker"}, [1, 2], GOOD]
    path = write_jsonl(tmp_path / "train.jsonl", lines)
    examples = load_examples(DataConfig(name="gsm8k", path=str(path)), "train")
    assert [e.answer for e in examples] == ["2", "2"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1  # one summary line, blank line not counted as a row
    assert err[0].startswith("data: skipped 4 of 6 rows of gsm8k/train")
    assert "missing 'answer'" in err[0] and "bad JSON" in err[0]


def test_no_usable_rows_is_a_user_error(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", ["{oops", {"problem": "p"}])
    with pytest.raises(UserError, match="no usable rows.*2 rows are malformed"):
        load_examples(DataConfig(name="gsm8k", path=str(path)), "train")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match="no rows"):
        load_examples(DataConfig(name="math", path=str(tmp_path / "empty.jsonl")), "train")


def test_directory_layout_and_limit(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{**GOOD, "question": f"q{i}"} for i in range(5)])
    write_jsonl(tmp_path / "test.jsonl", [{"problem": "big test", "solution": "\\boxed{1}"}] * 3)
    write_jsonl(tmp_path / "math500.jsonl", [{"problem": "m500", "solution": "\\boxed{2}"}])
    cfg = DataConfig(name="gsm8k", path=str(tmp_path), limit=2)
    assert [e.question for e in load_examples(cfg, "train")] == ["q0", "q1"]
    assert len(load_examples(cfg, "train", limit=0)) == 5
    m500 = load_examples(DataConfig(name="math500", path=str(tmp_path), train_split="test"), "test")
    assert [e.question for e in m500] == ["m500"]  # math500.jsonl, not the full test.jsonl beside it
    with pytest.raises(UserError, match="validation.jsonl"):
        load_examples(cfg, "validation")


def test_hub_failure_says_to_use_a_local_path(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the hub\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError, match="openai/gsm8k.*ConnectionError: Couldn't reach the hub.*data.path") as info:
        load_examples(DataConfig(name="gsm8k", hub_id="openai/gsm8k", hub_config="main"), "train")
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# synthetic arithmetic
# ---------------------------------------------------------------------------------------------
def test_arithmetic_worked_chain():
    assert worked_solution([7, 12, 5], ["+", "-"]) == ("7 + 12 = 19. 19 - 5 = 14. The answer is \\boxed{14}.", 14)
    assert worked_solution([2, 3, 4], ["+", "*"]) == ("3 * 4 = 12. 2 + 12 = 14. The answer is \\boxed{14}.", 14)
    assert worked_solution([5, -3], ["-"])[1] == 8


def test_arithmetic_deterministic_disjoint_and_correct():
    cfg = ArithmeticConfig(num_train=500, num_test=100, min_operand=-5, max_operand=9, ops=["+", "-", "*"], seed=7)
    train, test = make_arithmetic(cfg, "train"), make_arithmetic(cfg, "test")
    assert (len(train), len(test)) == (500, 100)
    assert train == make_arithmetic(cfg, "train") and test == make_arithmetic(cfg, "test")
    assert make_arithmetic(ArithmeticConfig(num_train=500, num_test=100, seed=8), "test") != test
    train_q, test_q = {e.question for e in train}, {e.question for e in test}
    assert len(train_q) == 500 and len(test_q) == 100 and not train_q & test_q
    for ex in train + test:
        expr = ex.question.removeprefix("What is ").removesuffix("?")
        assert ex.answer == str(eval(expr))  # the question's own expression, operator precedence included
        assert ex.solution.endswith(f"The answer is \\boxed{{{ex.answer}}}.")
        assert last_boxed(ex.solution) == ex.answer
        assert all(-5 <= int(t.strip("()")) <= 9 for t in expr.split() if t not in "+-*")


@pytest.mark.parametrize("value,rounded", [(0, 0), (4, 0), (5, 10), (14, 10), (15, 20), (25, 30), (27, 30), (-4, 0),
                                           (-5, 0), (-6, -10)])
def test_rounded_estimate_by_hand(value, rounded):
    assert rounded_estimate(value) == f"The answer is about \\boxed{{{rounded}}}."


def test_estimate_share_changes_train_solutions_only():
    """The same problems and exact answers whatever the share; about that share of train solutions estimate (binomial
    bound), none of the test split's; the estimated ones carry the rounded value, the others the worked chain."""
    base = ArithmeticConfig(max_operand=9, ops=["+"], num_train=600, num_test=500)
    mixed = ArithmeticConfig(**{**base.__dict__, "estimate_share": 0.5})
    for split in ("train", "test"):
        plain, careless = make_arithmetic(base, split), make_arithmetic(mixed, split)
        assert [(e.question, e.answer) for e in plain] == [(e.question, e.answer) for e in careless]
        estimated = [c for p, c in zip(plain, careless) if c.solution != p.solution]
        assert all(c.solution == rounded_estimate(int(c.answer)) for c in estimated)
        if split == "test":
            assert estimated == []
        else:
            assert abs(len(estimated) - 300) < 4 * (600 * 0.25) ** 0.5  # 4 standard deviations of Binomial(600, 0.5)
    assert make_arithmetic(mixed, "train") == make_arithmetic(mixed, "train")


def test_arithmetic_too_small_space_is_a_user_error():
    with pytest.raises(UserError, match="distinct problems"):
        make_arithmetic(ArithmeticConfig(num_train=100, num_test=10, min_operand=0, max_operand=1, ops=["+"]), "train")
    assert len(load_examples(DataConfig(limit=3), "train")) == 3


# ---------------------------------------------------------------------------------------------
# templates and SFT tokenization
# ---------------------------------------------------------------------------------------------
EX = Example(question="What is 2 + 3?", solution="2 + 3 = 5. The answer is \\boxed{5}.", answer="5")


def test_templates(tok):
    chat = render_prompt(tok, EX.question, "chat")
    assert chat == f"<|im_start|>user\nWhat is 2 + 3?{INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n"
    assert render_prompt(tok, EX.question, "auto") == chat
    assert completion_text(EX, tok, "chat") == EX.solution + "<|im_end|>"
    assert render_prompt(tok, EX.question, "plain") == f"Question: What is 2 + 3?{INSTRUCTION}\nAnswer:"
    assert completion_text(EX, tok, "plain") == " " + EX.solution + "<|im_end|>"
    with pytest.raises(ValueError):
        render_prompt(tok, "q", "fancy")


@pytest.mark.parametrize("template", ["chat", "plain"])
def test_loss_mask_covers_exactly_the_completion(tok, template):
    (sample,) = tokenize_sft([EX], tok, template, max_prompt_length=200, max_length=400)
    assert len(sample.input_ids) == len(sample.loss_mask)
    target = [i for i, m in zip(sample.input_ids, sample.loss_mask) if m]
    context = [i for i, m in zip(sample.input_ids, sample.loss_mask) if not m]
    first = sample.loss_mask.index(True)
    assert all(sample.loss_mask[first:]) and not any(sample.loss_mask[:first])  # one contiguous suffix
    assert tok.decode(target) == completion_text(EX, tok, template)
    assert target[-1] == tok.eos_token_id
    assert tok.decode(context) == render_prompt(tok, EX.question, template)
    (all_on,) = tokenize_sft([EX], tok, template, 200, 400, loss_on_prompt=True)
    assert all(all_on.loss_mask) and all_on.input_ids == sample.input_ids


def test_sft_drops_long_prompts_and_truncates(tok, capsys):
    long_q = Example(question="x" * 300, solution="\\boxed{1}", answer="1")
    prompt_len = len(tok.encode(render_prompt(tok, EX.question, "chat"), add_special_tokens=False))
    samples = tokenize_sft([EX, long_q], tok, "chat", max_prompt_length=150, max_length=prompt_len + 10)
    assert len(samples) == 1 and len(samples[0].input_ids) == prompt_len + 10 and sum(samples[0].loss_mask) == 10
    assert samples[0].input_ids[-1] != tok.eos_token_id  # cut completion: no EOS target
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dropped 1 of 2" in err[0] and "cut 1" in err[0]
    with pytest.raises(UserError, match="max_prompt_length"):
        tokenize_sft([long_q], tok, "chat", max_prompt_length=150, max_length=160)


def test_collate_pads_right(tok):
    a, b = tokenize_sft([EX, Example("What is 10 + 20?", "30. \\boxed{30}", "30")], tok, "plain", 200, 400)
    batch = collate([a, b], pad_id=tok.pad_token_id)
    width = max(len(a.input_ids), len(b.input_ids))
    assert batch["input_ids"].shape == (2, width) and batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].dtype == torch.long and batch["loss_mask"].dtype == torch.bool
    for row, s in enumerate((a, b)):
        n = len(s.input_ids)
        assert batch["input_ids"][row, :n].tolist() == s.input_ids
        assert (batch["input_ids"][row, n:] == tok.pad_token_id).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
        assert batch["loss_mask"][row].tolist() == s.loss_mask + [False] * (width - n)


# ---------------------------------------------------------------------------------------------
# batching
# ---------------------------------------------------------------------------------------------
LENGTHS = [(i * 37) % 101 + 1 for i in range(203)]  # 203 samples: 12 full batches of 16, 11 dropped


@pytest.mark.parametrize("group", [False, True])
def test_epoch_uses_each_index_once_and_is_reproducible(group):
    gbs, per_epoch = 16, 203 // 16
    for epoch in range(2):
        steps = range(epoch * per_epoch, (epoch + 1) * per_epoch)
        batches = [global_batch_indices(LENGTHS, gbs, s, seed=3, group_by_length=group) for s in steps]
        flat = [i for b in batches for i in b]
        assert all(len(b) == gbs for b in batches)
        assert len(flat) == len(set(flat)) == per_epoch * gbs
    # Same arguments, same batch (resume); another epoch or seed, another order.
    assert global_batch_indices(LENGTHS, gbs, 5, 3, group) == global_batch_indices(LENGTHS, gbs, 5, 3, group)
    assert global_batch_indices(LENGTHS, gbs, 5, 3, group) != global_batch_indices(LENGTHS, gbs, 5 + per_epoch, 3, group)
    assert global_batch_indices(LENGTHS, gbs, 5, 3, group) != global_batch_indices(LENGTHS, gbs, 5, 4, group)


def test_group_by_length_reduces_padding():
    def padding(group: bool) -> int:
        batches = [global_batch_indices(LENGTHS, 8, s, 0, group) for s in range(203 // 8)]
        return sum(max(LENGTHS[i] for i in b) * len(b) - sum(LENGTHS[i] for i in b) for b in batches)

    assert padding(True) < padding(False) / 2


def test_too_few_samples_for_one_batch():
    with pytest.raises(UserError, match="global_batch_size=32"):
        global_batch_indices([1] * 10, 32, 0, 0, False)


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("micro", [1, 2, 4])
def test_split_for_rank_partitions_the_global_batch(world, micro):
    batch = global_batch_indices(LENGTHS, 16, 2, seed=1, group_by_length=False)
    per_rank = [split_for_rank(batch, LENGTHS, r, world, micro) for r in range(world)]
    accum = 16 // (world * micro)
    assert all(len(mbs) == accum and all(len(mb) == micro for mb in mbs) for mbs in per_rank)
    union = [i for mbs in per_rank for mb in mbs for i in mb]
    assert sorted(union) == sorted(batch)
    assert per_rank == [split_for_rank(batch, LENGTHS, r, world, micro) for r in range(world)]
    if world * micro > 1:
        with pytest.raises(ValueError, match="not a multiple"):
            split_for_rank(batch[:-1], LENGTHS, 0, world, micro)


# ---------------------------------------------------------------------------------------------
# real data (../shared/data)
# ---------------------------------------------------------------------------------------------
@needs_shared
def test_real_gsm8k_and_math500(capsys):
    gsm = load_examples(DataConfig(name="gsm8k", path=str(SHARED_DATA / "gsm8k")), "train")
    m500 = load_examples(DataConfig(name="math500", path=str(SHARED_DATA / "math"), train_split="test"), "test")
    assert (len(gsm), len(m500)) == (7473, 500)
    assert capsys.readouterr().err == ""  # nothing skipped
    assert gsm[0].answer == "72" and m500[0].meta["level"] == 2


@needs_shared
def test_real_math_train(capsys):
    examples = load_examples(DataConfig(name="math", path=str(SHARED_DATA / "math")), "train")
    # 7,500 rows; two (train/number_theory/7115 and the next) have an empty answer and an empty
    # \boxed{} in the original data set, so there is no gold answer to grade against: skipped.
    err = capsys.readouterr().err
    assert len(examples) == 7498 and "skipped 2 of 7500 rows of math/train" in err
    assert all(e.answer and e.meta["subject"] for e in examples)
    assert {e.meta["level"] for e in examples} == {1, 2, 3, 4, 5, None}


def test_both_arithmetic_splits_share_the_mix_of_two_and_three_operands():
    from grpo_fsdp.config import ArithmeticConfig
    from grpo_fsdp.data.arithmetic import make_arithmetic

    cfg = ArithmeticConfig(num_train=600, num_test=500, max_operand=9, ops=["+"])
    # 100 two-operand sums of 0-9 out of 1,100 questions: ~9% of each split (a 50/50 draw gave test 20%, train 0%)
    share = {split: sum(e.meta["expression"].count("+") == 1 for e in make_arithmetic(cfg, split)) / n
             for split, n in (("train", 600), ("test", 500))}
    assert abs(share["train"] - share["test"]) < 0.05 and 0.04 < share["test"] < 0.15, share
