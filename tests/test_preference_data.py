"""Issue 15 item 1: preference rows (plain and conversational), rendering, keep-end truncation, counted skips, and the
synthetic arithmetic preference set."""

from __future__ import annotations

import json

import pytest

from grpo_fsdp.cli import UserError
from grpo_fsdp.config import ArithmeticConfig, DataConfig
from grpo_fsdp.data.arithmetic import make_arithmetic, worked_solution
from grpo_fsdp.data.preference import PreferencePair, load_pairs, parse_preference, render_pair, tokenize_pairs
from grpo_fsdp.data.preference_arithmetic import make_arithmetic_pairs, parse_expression, worked_chain
from grpo_fsdp.tokenizer import build_tiny_tokenizer

U = lambda text: {"role": "user", "content": text}
A = lambda text: {"role": "assistant", "content": text}


def test_parse_plain_and_conversational_rows():
    assert parse_preference({"prompt": "q", "chosen": "a", "rejected": "b"}, "") == PreferencePair("q", "a", "b")
    # the hub's conversational format: shared leading turns are the prompt
    row = {"chosen": [U("hi"), A("yo"), U("more?"), A("sure")], "rejected": [U("hi"), A("yo"), U("more?"), A("no")]}
    assert parse_preference(row, "") == PreferencePair([U("hi"), A("yo"), U("more?")], [A("sure")], [A("no")])
    # Tulu 3 mixture: a string prompt and whole conversations that repeat it
    row = {"prompt": "hi", "chosen": [U("hi"), A("yo")], "rejected": [U("hi"), A("hey")]}
    assert parse_preference(row, "") == PreferencePair([U("hi")], [A("yo")], [A("hey")])
    # a message prompt with string answers
    assert parse_preference({"prompt": [U("hi")], "chosen": "yo", "rejected": "hey"}, "") == PreferencePair([U("hi")], "yo", "hey")


@pytest.mark.parametrize("row,reason", [
    ({"prompt": "q", "chosen": "a"}, "no 'rejected' field"),
    ({"prompt": "q", "rejected": "b"}, "no 'chosen' field"),
    ({"chosen": "a", "rejected": "b"}, "no 'prompt' field"),
    ({"chosen": [A("a")], "rejected": [A("b")]}, "no shared leading messages"),
    ({"prompt": "q", "chosen": [{"text": "a"}], "rejected": "b"}, "'chosen' is neither a string nor a list"),
])
def test_malformed_rows_name_the_field(row, reason):
    with pytest.raises((ValueError, TypeError), match=reason):
        parse_preference(row, "")


def test_render_plain_and_conversational_with_the_chat_template():
    tok = build_tiny_tokenizer()
    assert render_pair(PreferencePair("2+2?", "4", "5"), tok, "auto", "") == (
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n", "4<|im_end|>", "5<|im_end|>")
    pair = PreferencePair([U("hi")], [A("yo")], [A("hey")])
    assert render_pair(pair, tok, "auto", "") == ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
                                                  "yo<|im_end|>\n", "hey<|im_end|>\n")
    with pytest.raises(UserError, match="conversational preference rows need a chat template"):
        render_pair(pair, tok, "plain", "")


def test_render_with_the_qwen_template(qwen_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    prompt, chosen, rejected = render_pair(PreferencePair([U("hi")], [A("yo")], [A("hey")]), tok, "auto", "")
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert (chosen, rejected) == ("yo<|im_end|>\n", "hey<|im_end|>\n")


def test_truncation_keeps_the_end_of_the_prompt_and_cuts_completions(capsys):
    tok = build_tiny_tokenizer()  # byte-level: one token per character, <|im_end|> one token
    pair = PreferencePair("abcdef", "right", "wrong!")
    # plain template: prompt "Question: abcdef\nAnswer:" (24 tokens), completions " right<eos>" (7), " wrong!<eos>" (8)
    full = tokenize_pairs([pair], tok, "plain", "", 100, 200)[0]
    assert (len(full.prompt_ids), len(full.chosen_ids), len(full.rejected_ids)) == (24, 7, 8)
    (s,) = tokenize_pairs([pair], tok, "plain", "", 10, 16)
    assert tok.decode(s.prompt_ids) == "ef\nAnswer:"  # the last 10 tokens
    assert tok.decode(s.chosen_ids) == " right" and tok.decode(s.rejected_ids) == " wrong"  # 16 - 10 = 6 tokens each
    assert s.length == 16 and s.tokens == 22
    assert capsys.readouterr().err.splitlines() == [
        ("data: 1 of 1 preference pairs kept; skipped 0; kept the last data.max_prompt_length=10 tokens of 1 prompts; "
        "cut 2 completions to data.max_length=16")]


def test_equal_empty_and_truncated_to_equal_pairs_are_skipped_and_counted_in_one_line(capsys):
    tok = build_tiny_tokenizer()
    pairs = [PreferencePair("q", "same", "same"), PreferencePair("q", "", "b"), PreferencePair("q", "abcdefX", "abcdefY"),
             PreferencePair("q", "good", "bad")]
    # prompt "Question: q\nAnswer:" is 19 tokens: max_length 23 leaves 4 per completion, " abc" on both sides of the third
    samples = tokenize_pairs(pairs, tok, "plain", "", 20, 23)
    assert len(samples) == 1 and tok.decode(samples[0].chosen_ids) == " goo"
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("data: 1 of 4 preference pairs kept; skipped 3 (")
    for reason in ("1x an empty side", "1x chosen equal to rejected", "1x identical once truncated"):
        assert reason in err[0]
    with pytest.raises(UserError, match=r"^data: no preference pair is usable: all 2 rows skipped \(1x"):
        tokenize_pairs(pairs[:2], tok, "plain", "", 20, 23)


def test_load_pairs_from_jsonl_counts_malformed_rows(tmp_path, capsys):
    path = tmp_path / "train.jsonl"
    rows = [{"prompt": "q1", "chosen": "a", "rejected": "b"}, {"prompt": "q2", "chosen": "a"}, {"prompt": "q3", "chosen": "c", "rejected": "d"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pairs = load_pairs(DataConfig(name="preference", path=str(path)), "train")
    assert [p.prompt for p in pairs] == ["q1", "q3"]
    assert "skipped 1 of 3 rows of preference/train" in capsys.readouterr().err
    path.write_text(json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    with pytest.raises(UserError, match=r"all 1 rows are malformed \(1x no 'rejected' field \(first at row 1\)\)"):
        load_pairs(DataConfig(name="preference", path=str(path)), "train")


def test_worked_chain_without_an_error_is_the_sft_solution():
    for operands, ops in [([7, 12, 5], ["+", "-"]), ([2, 3, 4], ["+", "*"]), ([-3, 4], ["*"]), ([9, 0, 2], ["*", "-"])]:
        assert worked_chain(operands, ops) == worked_solution(operands, ops)
    assert worked_chain([7, 12, 5], ["+", "-"], wrong_step=0, error=2) == (
        "7 + 12 = 21. 21 - 5 = 16. The answer is \\boxed{16}.", 16)
    assert parse_expression("7 + (-2) * 3") == ([7, -2, 3], ["+", "*"])


def test_synthetic_pairs_prefer_the_correct_solution_of_the_same_shape():
    cfg = ArithmeticConfig(num_train=300, num_test=50, ops=["+", "-", "*"])
    pairs, examples = make_arithmetic_pairs(cfg, "train"), make_arithmetic(cfg, "train")
    assert len(pairs) == 300 and pairs == make_arithmetic_pairs(cfg, "train")  # deterministic
    for p, ex in zip(pairs, examples):
        assert (p.prompt, p.chosen) == (ex.question, ex.solution)  # chosen: exactly the SFT target
        assert p.rejected != p.chosen and p.rejected.count("=") == p.chosen.count("=")  # same chain of steps
        wrong = p.rejected.rsplit("\\boxed{", 1)[1].rstrip("}.")
        assert wrong != ex.answer  # a wrong final answer
    assert {p.prompt for p in make_arithmetic_pairs(cfg, "test")}.isdisjoint({p.prompt for p in pairs})


def test_synthetic_pairs_choose_the_worked_chain_where_the_sft_target_estimates():
    """With data.arithmetic.estimate_share the SFT target of about half the problems is "The answer is about ...":
    the pair's chosen side stays the worked correct chain (it was the estimate before the fix)."""
    plain = ArithmeticConfig(max_operand=9, ops=["+"], num_train=200, num_test=50)
    mixed = ArithmeticConfig(**{**plain.__dict__, "estimate_share": 0.5})
    assert any("about" in ex.solution for ex in make_arithmetic(mixed, "train"))
    assert make_arithmetic_pairs(mixed, "train") == make_arithmetic_pairs(plain, "train")
