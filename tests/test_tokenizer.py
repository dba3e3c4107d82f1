"""The tiny tokenizer: deterministic, lossless on any UTF-8, Qwen-style specials and chat template,
and a faithful save_pretrained / AutoTokenizer round trip. Plus the real Qwen2.5 tokenizer's
chat template, when ../shared holds it."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from grpo_fsdp.data.templates import render_prompt
from grpo_fsdp.tokenizer import build_tiny_tokenizer, byte_symbols

QWEN_DIR = Path(__file__).resolve().parents[2] / "shared" / "tokenizers" / "qwen2.5"


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def _random_unicode(rng: random.Random, n: int) -> str:
    # Any code point except surrogates (which are not valid UTF-8 on their own).
    chars = []
    while len(chars) < n:
        cp = rng.choice([rng.randrange(0, 0x80), rng.randrange(0x80, 0x800), rng.randrange(0x800, 0x10000), rng.randrange(0x10000, 0x110000)])
        if not 0xD800 <= cp <= 0xDFFF:
            chars.append(chr(cp))
    return "".join(chars)


def test_build_is_deterministic(tok):
    assert build_tiny_tokenizer().backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()


def test_vocab_and_special_tokens(tok):
    assert len(tok) == 259
    assert len(set(byte_symbols())) == 256
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", 256)
    assert tok.convert_tokens_to_ids("<|im_start|>") == 257
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 258)
    assert tok.bos_token is None
    # No merges: one token per byte, and the id is the byte value.
    assert tok.encode("Hi é", add_special_tokens=False) == list("Hi é".encode())
    assert tok.encode("<|im_start|>a<|im_end|>", add_special_tokens=False) == [257, 97, 258]


@pytest.mark.parametrize("text", ["", " leading and trailing  ", "tab\tnew\nline\r\n", "emoji 🤖👍🏽", "中文 日本語 한국어",
                                  "e\u0301 combining", "\\boxed{\\frac{1}{2}}", "\x00\x7f nul and del", "<|im_end|> in text"])
def test_round_trip_examples(tok, text):
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_round_trip_random_unicode(tok):
    rng = random.Random(0)
    for _ in range(200):
        text = _random_unicode(rng, rng.randrange(1, 40))
        ids = tok.encode(text, add_special_tokens=False)
        assert len(ids) == len(text.encode("utf-8"))
        assert tok.decode(ids) == text


def test_chat_template(tok):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q?"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n"
    no_gen = tok.apply_chat_template(messages[1:], add_generation_prompt=False, tokenize=False)
    assert no_gen == "<|im_start|>user\nQ?<|im_end|>\n"


def test_save_and_reload(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    text = "What is 7 + 12 - 5? ✓ <|im_end|>"
    assert again.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
    assert again.decode(tok.encode(text, add_special_tokens=False)) == text
    assert (again.eos_token_id, again.pad_token_id, len(again)) == (258, 256, 259)
    assert again.chat_template == tok.chat_template
    msgs = [{"role": "user", "content": "x"}]
    assert again.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"
    assert again.decode([257, 120, 258], skip_special_tokens=True) == "x"


@pytest.mark.skipif(not QWEN_DIR.is_dir(), reason=f"real Qwen2.5 tokenizer not found at {QWEN_DIR} (only beside the project checkout)")
def test_qwen_chat_template_renders_user_turn():
    qwen = AutoTokenizer.from_pretrained(QWEN_DIR)
    prompt = render_prompt(qwen, "What is 1 + 1?", "auto")
    assert "<|im_start|>user\nWhat is 1 + 1?" in prompt
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert qwen.eos_token == "<|im_end|>"
