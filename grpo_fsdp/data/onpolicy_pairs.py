"""On-policy preference pairs: the SFT model's own samples, graded, paired as chosen (correct) / rejected (wrong).

For each training question, k completions are sampled from the model at temperature 1 on the transformers engine
(`rollout/hf.py`; its noise is counter-based, so completion j of question i depends only on the seed, i and j) and
graded against the gold answer by the training reward's grader (`grading.grade`, math-verify). The pairing rule
(`pair_rows`, a pure function):

    chosen    the correct samples, distinct, in sample order; none correct: the gold worked solution (one pair)
    rejected  the wrong samples, distinct, in sample order
    pairs     the i-th chosen with the i-th rejected, at most `per_prompt` of them
    skipped   a question with no wrong sample gives no pair (counted: nothing to push down)

A completion cut at max_new_tokens (no EOS) is never chosen: its text plus the EOS the preference loader appends is
not what the model wrote. It may be rejected when its answer is wrong (a model that rambles must learn that it
does not pay; only the appended EOS was not its own). The rows are preference JSONL (`prompt` = the question,
`chosen`, `rejected` = completion texts without EOS), which `data=preference data.path=...` renders exactly as the
SFT and GRPO stages render the question (`templates.render_prompt`, the same data.instruction).

Why on-policy: pairs from the model's own samples put the rejected side where the model actually errs, as in
Iterative RPO (Pang et al. 2024, arXiv 2404.19733) and Tulu 3's on-policy preference data (Lambert et al. 2024,
arXiv 2411.15124). The synthetic set (`preference_arithmetic.py`) never shows the SFT model's careless estimates
as rejected, so DPO on it could not remove them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from grpo_fsdp.data.records import Example


@dataclass(frozen=True)
class SampleSettings:
    """How the samples are drawn; with the model's weights, the key of a reusable pairs file."""

    k: int = 8  # completions per question
    per_prompt: int = 1  # at most this many pairs per question
    seed: int = 0
    temperature: float = 1.0
    max_new_tokens: int = 96


def pair_rows(question: str, gold_solution: str, samples: list[str], correct: list[bool], cut: list[bool],
              per_prompt: int) -> tuple[list[dict[str, str]], str | None]:
    """The pairs of one question (see the module docstring) and, when it gives none, why ("no wrong sample")."""
    graded = list(zip(samples, correct, cut, strict=True))
    right = list(dict.fromkeys(s for s, ok, c in graded if ok and not c))
    wrong = list(dict.fromkeys(s for s, ok, _ in graded if not ok))
    if not wrong:
        return [], "no wrong sample"
    chosen = right or [gold_solution]
    return [{"prompt": question, "chosen": c, "rejected": r} for c, r in zip(chosen, wrong)][:per_prompt], None


def make_pairs(examples: list[Example], gold_solutions: list[str], samples: list[list[str]],
               correct: list[list[bool]], cut: list[list[bool]], per_prompt: int) -> tuple[list[dict[str, str]], dict]:
    """All questions' pairs and the counts for the summary: pairs, prompts skipped, gold chosen, cut samples."""
    rows, stats = [], Counter()
    for ex, gold, s, ok, c in zip(examples, gold_solutions, samples, correct, cut, strict=True):
        got, why = pair_rows(ex.question, gold, s, ok, c, per_prompt)
        rows += got
        stats["prompts_skipped"] += why is not None
        stats["gold_chosen"] += bool(got) and not any(o and not x for o, x in zip(ok, c))
        stats["samples_cut"] += sum(c)
        stats["samples_correct"] += sum(o and not x for o, x in zip(ok, c))
        stats["samples"] += len(s)
    return rows, {"pairs": len(rows), **{k: stats[k] for k in ("prompts_skipped", "gold_chosen", "samples",
                                                               "samples_correct", "samples_cut")}}


def sample_and_grade(model_dir: Path, examples: list[Example], template: str, instruction: str,
                     settings: SampleSettings, batch_size: int = 256) -> tuple[list[list[str]], list[list[bool]], list[list[bool]]]:
    """k completions of every question from the model in `model_dir` (texts without their stop token), whether each
    is correct (`grading.grade` against the gold answer) and whether it was cut at max_new_tokens."""
    from eval.engines import build_engine, load_model_tokenizer
    from grpo_fsdp.data.templates import encode_prompt, render_prompt
    from grpo_fsdp.grading import grade
    from grpo_fsdp.rollout.base import SamplingConfig

    tokenizer = load_model_tokenizer(str(model_dir))
    engine = build_engine("hf", str(model_dir), tokenizer, device="cpu", dtype="float32", max_batch_size=batch_size)
    prompts = [encode_prompt(tokenizer, render_prompt(tokenizer, e.question, template, instruction)) for e in examples]
    sampling = SamplingConfig(n=settings.k, temperature=settings.temperature, max_new_tokens=settings.max_new_tokens,
                              seed=settings.seed)
    done = engine.generate(prompts, sampling, keys=list(range(len(prompts))))  # keys: question index (counter noise)
    stop = set(engine.eos_token_ids)
    texts, correct, cut = [[] for _ in examples], [[] for _ in examples], [[] for _ in examples]
    for c in done:
        ids = c.token_ids[:-1] if c.finish_reason == "stop" and c.token_ids and c.token_ids[-1] in stop else c.token_ids
        text = tokenizer.decode(ids, skip_special_tokens=False)
        texts[c.prompt_index].append(text)
        correct[c.prompt_index].append(grade(text, examples[c.prompt_index].answer) > 0)
        cut[c.prompt_index].append(c.finish_reason == "length")
    return texts, correct, cut


def model_key(model_dir: Path, settings: SampleSettings, examples: list[Example]) -> str:
    """sha256 over the model's weight files, the settings and the questions: a pairs file is reused only for these."""
    h = hashlib.sha256(json.dumps(asdict(settings), sort_keys=True).encode())
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    for e in examples:
        h.update(f"{e.question}\n{e.answer}\n".encode())
    return h.hexdigest()


def ensure_pairs(out_dir: Path, model_dir: Path, examples: list[Example], gold_solutions: list[str], template: str,
                 instruction: str, settings: SampleSettings) -> tuple[Path, dict]:
    """`<out_dir>/train.jsonl` (and `meta.json`: key, settings, counts), sampled unless a file for the same model,
    settings and questions exists; returns its path and the counts."""
    path, meta_path = out_dir / "train.jsonl", out_dir / "meta.json"
    key = model_key(model_dir, settings, examples)
    if path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key:
            return path, meta["counts"]
    samples, correct, cut = sample_and_grade(model_dir, examples, template, instruction, settings)
    rows, counts = make_pairs(examples, gold_solutions, samples, correct, cut, settings.per_prompt)
    out_dir.mkdir(parents=True, exist_ok=True)
    for target, text in ((path, "".join(json.dumps(r) + "\n" for r in rows)),
                         (meta_path, json.dumps({"key": key, "settings": asdict(settings), "counts": counts}, indent=2))):
        tmp = target.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, target)  # the meta last: a file without its meta is sampled again
    return path, counts
