"""Data layer: datasets -> `Example`s -> prompts / SFT samples -> deterministic batches.

    records.py       the `Example` record every data set parses into
    gsm8k.py         GSM8K rows ("#### N" gold answers)
    math_dataset.py  MATH / MATH-500 rows and the `last_boxed` answer extractor
    arithmetic.py    the synthetic task the tiny model learns on a CPU
    loading.py       `load_examples(cfg, split)`: local JSONL or the hub, malformed rows counted
    templates.py     prompt and completion text (chat or plain), consistent with each other
    sft.py           tokenization with a loss mask, and padding collation
    lengths.py       which rollout prompts fit data.max_prompt_length and the model's context (counted)
    preference.py    DPO pairs (prompt / chosen / rejected, plain or chat messages): parsing, rendering, truncation
    preference_arithmetic.py  the synthetic preference set (correct vs. one wrong step), offline
    length_report.py `python -m grpo_fsdp.data.length_report`: length percentiles, coverage, a max_length to use
    png.py           the report's histogram, written with zlib alone
    batching.py      stateless batch order (resume- and world-size-independent)
"""

from grpo_fsdp.data.loading import load_examples
from grpo_fsdp.data.records import Example

__all__ = ["Example", "load_examples"]
