"""On-policy DPO pairs (grpo_fsdp/data/onpolicy_pairs.py): the pairing rule on hand-made samples, the counts, the
pairs file rendering exactly as the SFT/GRPO prompt and target, and its reuse key."""

from __future__ import annotations

import json

import pytest

import grpo_fsdp.data.onpolicy_pairs as op
from grpo_fsdp.config import ArithmeticConfig, DataConfig
from grpo_fsdp.data.arithmetic import make_arithmetic
from grpo_fsdp.data.onpolicy_pairs import SampleSettings, ensure_pairs, make_pairs, pair_rows
from grpo_fsdp.data.preference import load_pairs, tokenize_pairs
from grpo_fsdp.data.records import Example
from grpo_fsdp.data.sft import tokenize_sft
from grpo_fsdp.data.templates import encode_prompt, render_prompt
from grpo_fsdp.tokenizer import build_tiny_tokenizer

Q, GOLD = "What is 3 + 4?", "3 + 4 = 7. The answer is \\boxed{7}."
OK, EST, BAD = GOLD, "The answer is about \\boxed{10}.", "3 + 4 = 8. The answer is \\boxed{8}."


def test_correct_and_wrong_samples_pair_in_sample_order():
    samples = [EST, OK, BAD, OK]
    rows, why = pair_rows(Q, GOLD, samples, [False, True, False, True], [False] * 4, per_prompt=4)
    # distinct correct: [OK]; distinct wrong: [EST, BAD]; pairs zip them: one pair
    assert (rows, why) == ([{"prompt": Q, "chosen": OK, "rejected": EST}], None)
    alt = "3 + 4 = 7. So \\boxed{7}."
    rows, _ = pair_rows(Q, GOLD, [BAD, OK, EST, alt], [False, True, False, True], [False] * 4, per_prompt=4)
    assert rows == [{"prompt": Q, "chosen": OK, "rejected": BAD}, {"prompt": Q, "chosen": alt, "rejected": EST}]
    rows, _ = pair_rows(Q, GOLD, [BAD, OK, EST, alt], [False, True, False, True], [False] * 4, per_prompt=1)
    assert rows == [{"prompt": Q, "chosen": OK, "rejected": BAD}]


def test_no_wrong_sample_gives_no_pair_and_no_correct_sample_takes_the_gold_solution():
    assert pair_rows(Q, GOLD, [OK, OK], [True, True], [False, False], per_prompt=2) == ([], "no wrong sample")
    rows, why = pair_rows(Q, GOLD, [EST, BAD, EST], [False] * 3, [False] * 3, per_prompt=2)
    assert why is None and rows == [{"prompt": Q, "chosen": GOLD, "rejected": EST}]  # the gold solution pairs once


def test_samples_cut_at_max_new_tokens_are_never_chosen_but_may_be_rejected():
    cut_wrong = "3 + 4 = 7. 7 + 7"
    rows, _ = pair_rows(Q, GOLD, [OK, cut_wrong], [True, False], [False, True], 1)
    assert rows == [{"prompt": Q, "chosen": OK, "rejected": cut_wrong}]
    # the only correct sample was cut: the gold solution is chosen
    rows, _ = pair_rows(Q, GOLD, [OK, BAD], [True, False], [True, False], 1)
    assert rows == [{"prompt": Q, "chosen": GOLD, "rejected": BAD}]
    # a cut sample graded correct is not rejected either: no wrong sample, no pair
    assert pair_rows(Q, GOLD, [OK, OK + " 7"], [True, True], [False, True], 1) == ([], "no wrong sample")


def test_make_pairs_counts():
    exs = [Example(question=f"q{i}", solution="", answer="7") for i in range(3)]
    rows, counts = make_pairs(exs, ["g0", "g1", "g2"],
                              [[OK, EST], [OK, OK], [BAD, EST]],
                              [[True, False], [True, True], [False, False]],
                              [[False, False], [False, False], [False, True]], per_prompt=1)
    assert rows == [{"prompt": "q0", "chosen": OK, "rejected": EST}, {"prompt": "q2", "chosen": "g2", "rejected": BAD}]
    assert counts == {"pairs": 2, "prompts_skipped": 1, "gold_chosen": 1, "samples": 6, "samples_correct": 3,
                      "samples_cut": 1}


def test_pairs_file_renders_as_the_sft_and_grpo_prompt_and_target(tmp_path):
    """The prompt token ids of an on-policy pair equal the arithmetic prompt's (GRPO's encode_prompt, SFT's
    tokenize_sft), and a gold chosen side equals the SFT target's token ids."""
    tok = build_tiny_tokenizer()
    ex = make_arithmetic(ArithmeticConfig(max_operand=9, ops=["+"], num_train=4, num_test=4), "test")[0]
    rows, _ = make_pairs([ex], [ex.solution], [[EST]], [[False]], [[False]], per_prompt=1)
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (pair,) = tokenize_pairs(load_pairs(DataConfig(name="preference", path=str(path), instruction=""), "train"),
                             tok, "auto", "", 128, 192)
    grpo_prompt = encode_prompt(tok, render_prompt(tok, ex.question, "auto", ""))
    (sft,) = tokenize_sft([ex], tok, "auto", 128, 192, instruction="")
    assert pair.prompt_ids == grpo_prompt == sft.input_ids[: len(grpo_prompt)]
    assert pair.chosen_ids == sft.input_ids[len(grpo_prompt):]
    assert tok.decode(pair.rejected_ids) == EST + tok.eos_token
    # the default instruction would render another prompt: the test can fail
    assert encode_prompt(tok, render_prompt(tok, ex.question, "auto")) != pair.prompt_ids


def test_pairs_file_is_reused_for_the_same_model_and_resampled_for_another(tmp_path, monkeypatch):
    calls = []

    def fake_sample(model_dir, examples, template, instruction, settings):
        calls.append(settings)
        return [[EST, OK]] * len(examples), [[False, True]] * len(examples), [[False, False]] * len(examples)

    monkeypatch.setattr(op, "sample_and_grade", fake_sample)
    model = tmp_path / "hf"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights A")
    exs = [Example(question=Q, solution=GOLD, answer="7")]
    settings = SampleSettings(k=2, seed=3)
    path, counts = ensure_pairs(tmp_path / "pairs", model, exs, [GOLD], "auto", "", settings)
    assert counts["pairs"] == 1 and len(calls) == 1
    assert json.loads(path.read_text()) == {"prompt": Q, "chosen": OK, "rejected": EST}
    assert ensure_pairs(tmp_path / "pairs", model, exs, [GOLD], "auto", "", settings) == (path, counts)
    assert len(calls) == 1  # reused
    ensure_pairs(tmp_path / "pairs", model, exs, [GOLD], "auto", "", SampleSettings(k=2, seed=4))
    assert len(calls) == 2  # another seed
    (model / "model.safetensors").write_bytes(b"weights B")
    ensure_pairs(tmp_path / "pairs", model, exs, [GOLD], "auto", "", SampleSettings(k=2, seed=4))
    assert len(calls) == 3  # another model


@pytest.mark.parametrize("bad", [[True], [False, False, False]])
def test_pair_rows_refuses_mismatched_lists(bad):
    with pytest.raises(ValueError):
        pair_rows(Q, GOLD, [OK, BAD], bad, [False, False], 1)
