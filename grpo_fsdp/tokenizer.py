"""The tiny model's tokenizer, built here from nothing: no download, same bytes every time.

It is a byte-level BPE with an empty merge list, so every UTF-8 byte is one token (ids 0-255 are
the byte values) and any text round-trips exactly. Three special tokens follow the Qwen2.5
convention so that prompts, chat templates and stop tokens behave the same for the tiny model as
for a real one:

    256 <|endoftext|>   padding
    257 <|im_start|>    opens a chat turn
    258 <|im_end|>      closes a chat turn; the end-of-sequence token

Cost of having no merges: sequences are as long as their UTF-8 encoding (about 4x a real BPE on
English), which is fine for a model that exists to make the pipeline run in seconds on a CPU.

The result is a `transformers.PreTrainedTokenizerFast`; `save_pretrained(dir)` writes a
tokenizer.json + tokenizer_config.json that `AutoTokenizer.from_pretrained(dir)` (and so vLLM)
loads back unchanged, chat template included.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, EOS_TOKEN)

# Qwen-style chat template, without Qwen's default system prompt (the tiny model has no persona;
# a system message, when given, is rendered like any other turn).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins that byte-level BPE uses for bytes, in byte order.

    This is the GPT-2 mapping: printable Latin-1 bytes stand for themselves, the other bytes
    are shifted to code points 256 and up. Written out here (rather than taken from
    `ByteLevel.alphabet()`, an unordered set) so that token id == byte value.
    """
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    symbols, shifted = {}, 0
    for b in range(256):
        if b in keep:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + shifted)
            shifted += 1
    return [symbols[b] for b in range(256)]


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A deterministic byte-level tokenizer with Qwen-style special tokens and chat template."""
    vocab = {sym: i for i, sym in enumerate(byte_symbols())}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # No regex split: with no merges it could not change the ids, and skipping it is faster.
    # No prefix space: " x" and "x" must stay different so prompt + completion concatenate exactly.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(SPECIAL_TOKENS))  # ids 256, 257, 258 in this order

    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=None,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=None,
        additional_special_tokens=[IM_START],
        clean_up_tokenization_spaces=False,  # would rewrite " ." to "." and break round trips
        model_max_length=1 << 20,
        chat_template=CHAT_TEMPLATE,
    )
    tok.padding_side = "right"
    return tok
