"""Issue 15 item 6: the length analysis gives the percentiles, coverage, layout tokens and recommendation computed
by hand, on a hand-made table of lengths and end to end on a JSONL fixture with the byte-level tokenizer."""

from __future__ import annotations

import json

import pytest

from grpo_fsdp.config import ConfigError
from grpo_fsdp.data.length_report import RowLengths, layout_tokens, main, nearest_rank, summarise

ROWS = [RowLengths(*r) for r in [(100, 400, 300), (200, 800, 900), (300, 1500, 1000), (500, 1600, 1700), (1000, 2000, 1500),
                                 (1000, 3000, 2500), (2000, 2500, 3000), (3000, 4000, 3500), (4000, 5000, 5000),
                                 (6000, 7000, 6500)]]
# totals (prompt + max(chosen, rejected)), sorted: 500 1100 1800 2200 3000 4000 5000 7000 9000 13000


def test_percentiles_coverage_and_recommendation_by_hand():
    rep = summarise(ROWS, 0.9, pairs=True)
    # nearest rank of 10 values: p50 -> 5th, p90 -> 9th, p95 -> ceil(9.5) = 10th, p99 -> 10th
    assert rep["percentiles"]["total"] == {"50": 3000, "90": 9000, "95": 13000, "99": 13000}
    assert rep["percentiles"]["prompt"] == {"50": 1000, "90": 4000, "95": 6000, "99": 6000}
    assert rep["percentiles"]["chosen"] == {"50": 2000, "90": 5000, "95": 7000, "99": 7000}
    assert rep["percentiles"]["rejected"] == {"50": 1700, "90": 5000, "95": 6500, "99": 6500}
    # the cut-offs and the recommended max_length (9024, below)
    assert rep["coverage"] == {"2048": 0.3, "4096": 0.6, "8192": 0.8, "9024": 0.9, "12288": 0.9, "16384": 1.0}
    assert list(rep["layouts"]) == list(rep["coverage"])
    # 90% coverage: the 9th total, 9000, rounded up to 141 x 64; prompts: 4000 -> 63 x 64
    assert (rep["recommended_max_length"], rep["recommended_max_prompt_length"]) == (9024, 4032)
    assert summarise(ROWS, 0.5, pairs=True)["recommended_max_length"] == 3008  # 3000 -> 47 x 64
    assert nearest_rank([3, 1, 2], 100) == 3 and nearest_rank([3, 1, 2], 1) == 1


def test_layout_tokens_by_hand():
    # one pair (100, 400, 300) at L = 2048: padded 2 x 2048; padding-free 2 x 100 + 400 + 300; shared prompt 800
    lay = layout_tokens([RowLengths(100, 400, 300)], 2048, pairs=True)
    assert lay == {"padded": 4096, "padding_free": 900, "padding_overhead": 4096 / 900 - 1, "shared_prompt": 800}
    # (2000, 2500, 3000) cut to L = 4096: completions get 2096 each -> padding-free 2 x 4096, no padding
    lay = layout_tokens([RowLengths(2000, 2500, 3000)], 4096, pairs=True)
    assert lay == {"padded": 8192, "padding_free": 8192, "padding_overhead": 0.0, "shared_prompt": 6192}
    # not pairs: one row of prompt + completion
    assert layout_tokens([RowLengths(10, 20)], 64, pairs=False) == {"padded": 64, "padding_free": 30, "padding_overhead": 64 / 30 - 1}


def test_cli_on_a_jsonl_fixture_writes_markdown_json_and_png(tmp_path, capsys):
    path = tmp_path / "train.jsonl"
    # byte-level tokens, plain template: prompt "Question: {q}\nAnswer:" = 18 + len(q); " {text}<eos>" = len(text) + 2
    rows = [{"prompt": "q" * 2 * i, "chosen": "c" * 10 * i, "rejected": "r" * 5 * i} for i in (1, 2, 3, 4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "report"
    main(["algo=dpo", "data=preference", f"data.path={path}", "model.template=plain", "data.instruction=''", "coverage=0.5",
          "sample=0", f"out={out}"])
    rep = json.loads((out / "lengths.json").read_text())
    assert rep["rows"] == 4 and rep["pairs"]
    assert rep["max"] == {"prompt": 26, "chosen": 42, "rejected": 22, "total": 68}  # i = 4: 18 + 8, 40 + 2, 20 + 2
    assert rep["percentiles"]["total"] == {"50": 44, "90": 68, "95": 68, "99": 68}  # totals 20 + 12 i: 32 44 56 68
    assert rep["percentiles"]["prompt"]["50"] == 22 and rep["recommended_max_length"] == 64
    assert rep["coverage"]["2048"] == 1.0 and rep["coverage"]["64"] == 0.75  # 32, 44, 56 of 32 44 56 68
    assert (out / "lengths.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    md = (out / "lengths.md").read_text()
    assert "| p50 | 22 | 22 | 12 | 44 |" in md and "data.max_length=64 data.max_prompt_length=64" in md
    assert md in capsys.readouterr().out
    with pytest.raises(ConfigError, match="coverage"):
        main(["data=preference", f"data.path={path}", "coverage=2"])
