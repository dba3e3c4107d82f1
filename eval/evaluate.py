"""`evaluate(engine, tokenizer, examples, ...)`: generate, grade and summarise one task.

    examples -> prompts (same template code as training) -> engine.generate(n per prompt)
             -> decode -> RewardScorer.score (the training reward's math-verify grader, in its
                worker processes with the per-sample timeout) -> EvalResult

The engine is anything satisfying `grpo_fsdp.rollout.base.RolloutEngine` (the transformers
engine, the vLLM engine, the trainer's own engine between steps); only `generate` is called, so
weights, sleep and wake-up stay the caller's business.

Prompts too long for the engine: a problem whose prompt + max_new_tokens exceeds the engine's
context (`engine.max_model_len`, e.g. 512 tokens for the demo's tiny model) is skipped, not
truncated: cutting a question would grade the model on a different question. Skipped problems are
counted (`skipped_too_long`, one line on stderr) and score as wrong in every accuracy below (their
denominator stays the whole task), so a model with a shorter context is not rewarded for skipping
the longest, often hardest, problems and results stay comparable across models and engines.

Definitions (over samples, n per problem; with the default greedy k = n = 1 a sample is a problem):
  accuracy           correct samples / all samples, skipped problems included as wrong (with n > 1
                     this is the unbiased pass@1)
  skipped_too_long   problems not generated because prompt + max_new_tokens > the engine's context
  valid_format_rate  of the generated samples: those that stopped on their own (not cut at max_new_tokens) and pass
                     `grading.format_ok` (one closed \\boxed{} near the end). Departure from the
                     training reward's format term: truncation is read from the engine's
                     finish_reason rather than from length < max_new_tokens, so a completion whose
                     EOS lands exactly on the last allowed token counts as finished.
  truncated_rate     of the generated samples: those cut at max_new_tokens
  mean_length        generated tokens per generated sample, the stop token included
  pass_at_k, maj_at_k  see `metrics`; only when k > 1; a skipped problem passes nothing
  per_level, per_subject  `metrics.breakdown` of all samples by meta["level"] / meta["subject"] (skipped
                     ones as wrong), present only when some example carries that field
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from eval.metrics import answer_key, breakdown, majority_index, pass_at_k, rate
from grpo_fsdp.data.records import Example
from grpo_fsdp.data.templates import INSTRUCTION, encode_prompt, render_prompt
from grpo_fsdp.grading import format_ok
from grpo_fsdp.rewards import RewardScorer
from grpo_fsdp.rollout.base import Completion, RolloutEngine, SamplingConfig, fits_context

SAMPLING_TEMPERATURE = 1.0  # default when k > 1: the training sampler's default (GRPOConfig.temperature)


@dataclass
class EvalResult:
    """One task's numbers; `to_dict()` for the results JSON, `metrics()` for metrics.jsonl / W&B."""

    task: str
    num_problems: int
    n: int  # samples per problem
    k: int
    temperature: float
    max_new_tokens: int
    correct: int  # correct samples
    accuracy: float
    valid_format_rate: float
    truncated_rate: float
    mean_length: float
    seconds: float
    generate_seconds: float
    score_seconds: float
    timeouts: int
    parse_failures: int
    skipped_too_long: int = 0  # problems whose prompt + max_new_tokens exceed the engine's context; scored wrong
    max_model_len: int | None = None  # the engine's context, tokens (None: no limit known)
    pass_at_k: float | None = None
    maj_at_k: float | None = None
    per_level: dict[str, dict[str, float]] | None = None
    per_subject: dict[str, dict[str, float]] | None = None
    samples: list[dict[str, Any]] = field(default_factory=list, repr=False)

    @property
    def num_samples(self) -> int:
        return self.num_problems * self.n

    def to_dict(self, max_samples: int = -1) -> dict[str, Any]:
        """Every field (plus num_samples); the samples table cut to max_samples rows (-1: all)."""
        out = asdict(self)
        out["num_samples"] = self.num_samples
        if max_samples >= 0:
            out["samples"] = out["samples"][:max_samples]
        return out

    def metrics(self, prefix: str = "eval/") -> dict[str, float]:
        """Flat scalars, e.g. {"eval/gsm8k/accuracy": 0.41, "eval/math500/level_3": 0.38, ...}."""
        p = f"{prefix}{self.task}/"
        out = {p + name: float(getattr(self, name)) for name in
               ("accuracy", "valid_format_rate", "truncated_rate", "mean_length", "seconds", "timeouts", "parse_failures",
                "skipped_too_long")}
        if self.pass_at_k is not None:
            out[f"{p}pass@{self.k}"] = self.pass_at_k
        if self.maj_at_k is not None:
            out[f"{p}maj@{self.k}"] = self.maj_at_k
        for name, table in (("level", self.per_level), ("subject", self.per_subject)):
            for group, row in (table or {}).items():
                out[f"{p}{name}_{group}"] = row["accuracy"]
        return out


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def skipped_line(task: str, skipped: int, total: int, longest: int, max_new_tokens: int, context: int | None) -> str:
    """The one line that reports the problems skipped for length."""
    return (f"eval: {task}: skipped {skipped} of {total} problems whose prompt (up to {longest} tokens) + "
            f"max_new_tokens={max_new_tokens} exceeds the model's {context}-token context; they count as wrong")


def encode_prompts(tokenizer: Any, examples: Sequence[Example], template: str, instruction: str) -> list[list[int]]:
    """Each example's prompt token ids, rendered by the training's template code."""
    return [encode_prompt(tokenizer, render_prompt(tokenizer, e.question, template, instruction)) for e in examples]


def _generate(engine: RolloutEngine, prompts: list[list[int]], keys: list[int], sampling: SamplingConfig, batch_size: int,
              progress: Callable[[int, int], None] | None) -> list[Completion]:
    """All completions, prompt-major, in calls of at most batch_size prompts (0: one call).

    Each prompt is keyed by its index in the task (`keys`), so with a seed its samples depend on that
    index and not on batch_size or on which other problems were skipped (see `RolloutEngine.generate`).
    """
    step = batch_size if batch_size > 0 else max(len(prompts), 1)
    out: list[Completion] = []
    for lo in range(0, len(prompts), step):
        batch = prompts[lo : lo + step]
        got = engine.generate(batch, sampling, keys=keys[lo : lo + step])
        expected = min(step, len(prompts) - lo) * sampling.n
        if len(got) != expected:
            raise RuntimeError(f"evaluate: the engine returned {len(got)} completions for {expected} requested")
        out += got
        if progress is not None:
            progress(min(lo + step, len(prompts)), len(prompts))
    return out


def _meta_groups(examples: Sequence[Example], name: str, n: int) -> list[Any] | None:
    """meta[name] of each sample (n per example), or None when no example has that field."""
    values = [e.meta.get(name) for e in examples]
    return None if all(v is None for v in values) else [v for v in values for _ in range(n)]


def _vote_metrics(keys: list[str | None], correct: list[bool], num_problems: int, n: int, k: int) -> tuple[float, float]:
    """(pass@k averaged over problems, maj@k over each problem's first k samples)."""
    passes, majority = [], []
    for i in range(num_problems):
        flags, votes = correct[i * n : (i + 1) * n], keys[i * n : i * n + k]
        passes.append(pass_at_k(n, sum(flags), k))
        winner = majority_index(votes)
        majority.append(winner is not None and flags[winner])
    return rate(passes), rate(majority)


def _sample_rows(examples: Sequence[Example], texts: list[str], keys: list[str | None], correct: list[bool], n: int,
                 skipped: set[int]) -> list[dict[str, Any]]:
    """One row per problem, showing its first sample: problem, prediction, gold, correct (+ context).
    A skipped problem (prompt too long) has prediction "" and skipped True."""
    rows = []
    for i, e in enumerate(examples):
        row = {"id": e.meta.get("id"), "problem": e.question, "prediction": texts[i * n], "extracted": keys[i * n],
               "gold": e.answer, "correct": bool(correct[i * n]), "level": e.meta.get("level"), "subject": e.meta.get("subject"),
               "skipped": i in skipped}
        if n > 1:
            row["num_correct"] = sum(correct[i * n : (i + 1) * n])
        rows.append(row)
    return rows


def evaluate(
    engine: RolloutEngine,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    template: str = "auto",
    instruction: str = INSTRUCTION,
    max_new_tokens: int = 512,
    k: int = 1,
    n: int | None = None,
    temperature: float | None = None,
    top_p: float = 1.0,
    seed: int | None = 0,
    scorer: RewardScorer | None = None,
    task: str = "",
    batch_size: int = 0,
    progress: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] | None = _stderr,
) -> EvalResult:
    """Evaluate `engine` on `examples`; see the module docstring for every number's definition.

    template, instruction: the prompt, as in training (model.template, data.instruction).
    k: pass@k / maj@k are reported when k > 1. n: samples per problem (default k; n >= k).
    temperature: None means greedy (0) when n == 1, else SAMPLING_TEMPERATURE.
    scorer: a running RewardScorer to reuse (the trainer's); None starts one worker for this call.
    batch_size: prompts per engine.generate call (0: all at once); progress(done, total) after each.
    log: where the one line about skipped (too long) problems goes; None: nowhere (the count is in the result).
    """
    n = k if n is None else n
    if k < 1 or n < k:
        raise ValueError(f"evaluate: need 1 <= k <= n, got k={k}, n={n}")
    if not examples:
        raise ValueError("evaluate: no examples")
    temp = (0.0 if n == 1 else SAMPLING_TEMPERATURE) if temperature is None else temperature
    if n > 1 and temp == 0:
        raise ValueError(f"evaluate: n={n} samples at temperature 0 are {n} identical greedy completions; use temperature > 0")
    sampling = SamplingConfig(n=n, temperature=temp, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)

    began = time.perf_counter()
    prompts = encode_prompts(tokenizer, examples, template, instruction)
    context = getattr(engine, "max_model_len", None)
    kept = [i for i, p in enumerate(prompts) if fits_context(len(p), max_new_tokens, context)]
    skipped = sorted(set(range(len(prompts))) - set(kept))
    if skipped and log is not None:
        log(skipped_line(task, len(skipped), len(prompts), max(len(prompts[i]) for i in skipped), max_new_tokens, context))
    completions = _generate(engine, [prompts[i] for i in kept], kept, sampling, batch_size, progress) if kept else []
    generated = time.perf_counter()
    gen_texts = [tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in completions]
    lengths = [len(c.token_ids) for c in completions]
    golds = [examples[i].answer for i in kept for _ in range(n)]
    own = scorer is None and bool(kept)
    scorer = RewardScorer(num_workers=1) if own else scorer
    try:
        scored = scorer.score(gen_texts, golds, lengths, max_new_tokens) if kept else None
    finally:
        if own:
            scorer.close()
    # every sample of the task, prompt-major; a skipped problem's n samples are empty and wrong
    slot = {i: j for j, i in enumerate(kept)}
    texts = [gen_texts[slot[i] * n + s] if i in slot else "" for i in range(len(examples)) for s in range(n)]
    correct = [bool(scored.correct[slot[i] * n + s]) if i in slot else False for i in range(len(examples)) for s in range(n)]
    finished = [c.finish_reason == "stop" for c in completions]
    keys = [answer_key(t) for t in texts]
    levels, subjects = _meta_groups(examples, "level", n), _meta_groups(examples, "subject", n)
    pass_k, maj_k = _vote_metrics(keys, correct, len(examples), n, k) if k > 1 else (None, None)
    done = time.perf_counter()
    return EvalResult(
        task=task,
        num_problems=len(examples),
        n=n,
        k=k,
        temperature=temp,
        max_new_tokens=max_new_tokens,
        correct=sum(correct),
        accuracy=rate(correct),
        valid_format_rate=rate([f and format_ok(t) for f, t in zip(finished, gen_texts)]),
        truncated_rate=rate([not f for f in finished]),
        mean_length=rate(lengths),
        seconds=done - began,
        generate_seconds=generated - began,
        score_seconds=done - generated,
        timeouts=scored.timeouts if scored else 0,
        parse_failures=scored.parse_failures if scored else 0,
        skipped_too_long=len(skipped),
        max_model_len=context,
        pass_at_k=pass_k,
        maj_at_k=maj_k,
        per_level=None if levels is None else breakdown(levels, correct),
        per_subject=None if subjects is None else breakdown(subjects, correct),
        samples=_sample_rows(examples, texts, keys, correct, n, set(skipped)),
    )
