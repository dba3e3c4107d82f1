"""The rollout engine protocol: what the GRPO loop may ask of whatever generates its completions.

Two engines sit behind it: `hf.HFEngine` (plain transformers, runs anywhere, used by the tests
and the CPU profile) and a colocated vLLM engine. The loop sees only these four calls:

    generate(prompts, sampling) -> completions     prompt-major, G per prompt
    load_weights(named full tensors)               after every optimizer step (weight sync)
    sleep(level) / wake_up()                       give the accelerator to the trainer and back

The one contract that matters for correctness is which log-probability an engine reports for a
sampled token; see `Completion.logprobs`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Literal, Protocol, runtime_checkable

import torch

FinishReason = Literal["stop", "length"]


@dataclass
class SamplingConfig:
    """How to sample the completions of one `generate` call.

    n: completions per prompt (the GRPO group size G).
    temperature: logits are divided by it before the softmax; 0 means greedy decoding.
    top_p: nucleus sampling, keep the smallest set of tokens whose probability reaches top_p (1.0 = off).
    top_k: keep the k most likely tokens (0 = off).
    max_new_tokens: completions that reach it end with finish_reason "length".
    seed: seeds the sampler, so the same seed, prompt keys and weights give the same completions
        (on the same device; see `RolloutEngine.generate`). None draws a fresh seed. A training
        loop should pass a different seed each step (e.g. base seed + step) or it resamples the
        same noise.
    ignore_eos: never stop on a stop token, so every completion has max_new_tokens tokens
        (throughput benchmarks with forced lengths; finish_reason is then "length").
    """

    n: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    seed: int | None = None
    ignore_eos: bool = False  # benchmarks: every completion runs to max_new_tokens (forced lengths)

    def __post_init__(self) -> None:
        problems = []
        if self.n < 1:
            problems.append(f"n={self.n} must be >= 1")
        if self.temperature < 0:
            problems.append(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            problems.append(f"top_k={self.top_k} must be >= 0 (0 = off)")
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if problems:
            raise ValueError("SamplingConfig: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Completion:
    """One generated continuation of `prompts[prompt_index]`.

    token_ids: the generated tokens only (no prompt, no padding). When finish_reason == "stop"
        the last token is the stop (EOS) token that ended it, so it is scored and trained on like
        any other token; when "length", the completion was cut at max_new_tokens.
    logprobs: one float per token in token_ids: the log-probability of that token under the
        distribution it was sampled from, *before* top-k / top-p truncation, i.e.

            logprobs[t] = log_softmax(logits_t / temperature)[token_ids[t]]

        with logits_t the model's full-vocabulary logits after the prompt and token_ids[:t].
        This is the behaviour-policy log-prob that the GRPO importance ratio needs: the trainer
        must divide its logits by the same temperature before its log_softmax, or the ratio is
        off by the temperature even with identical weights. Truncation is left out on purpose:
        the trainer cannot reproduce the renormalised truncated distribution cheaply, and a
        token that survived truncation has the same untruncated probability on both sides.
        Greedy decoding (temperature == 0) reports log_softmax(logits_t)[token], the unscaled
        distribution (temperature 1).
    finish_reason: "stop" (a stop token was generated) or "length" (max_new_tokens reached).
    """

    prompt_index: int
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason


@dataclass
class GenerationStats:
    """Throughput counters of an engine; `last_stats` covers the latest `generate`, `total_stats` all of them."""

    calls: int = 0
    sequences: int = 0
    prompt_tokens: int = 0  # real (unpadded) prompt tokens, counted once per completion
    generated_tokens: int = 0
    seconds: float = 0.0  # wall time of generate, prefill included
    prefill_seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0

    def add(self, other: GenerationStats) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)

    def as_dict(self, prefix: str = "rollout/") -> dict[str, float]:
        return {**{prefix + k: v for k, v in asdict(self).items()}, prefix + "tokens_per_s": self.tokens_per_s}


def fits_context(prompt_len: int, max_new_tokens: int, max_model_len: int | None) -> bool:
    """Whether a prompt of `prompt_len` tokens plus `max_new_tokens` generated ones fit the engine's
    context (`RolloutEngine.max_model_len`; None: no known limit).

    Callers skip the prompts that do not fit and count them (the evaluator: `eval/<task>/skipped_too_long`),
    so every generated completion had its whole budget: vLLM would cut such a completion at the
    context's end, and past `max_position_embeddings` a transformers model runs on positions it never
    saw in training.
    """
    return max_model_len is None or prompt_len + max_new_tokens <= max_model_len


def check_prompt_lengths(engine: str, prompts: list[list[int]], max_model_len: int | None) -> None:
    """Refuse, as vLLM does, a prompt that leaves no room for one new token (ValueError naming it)."""
    if max_model_len is None:
        return
    for i, p in enumerate(prompts):
        if len(p) >= max_model_len:
            raise ValueError(f"{engine}.generate: prompt {i} has {len(p)} tokens, which leaves no room for a new token "
                             f"in the model's {max_model_len}-token context; skip it (rollout.base.fits_context)")


@runtime_checkable
class RolloutEngine(Protocol):
    """What the training loop needs from a generator. It never touches anything else of an engine.

    Two attributes besides the calls: `last_stats`, throughput of the latest generate, for the
    `rollout/` metrics; `max_model_len`, the longest prompt + completion the engine serves, in tokens
    (None: no limit known), for `fits_context`. A prompt with no room for a single new token is refused.
    """

    last_stats: GenerationStats
    max_model_len: int | None

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig, keys: list[int] | None = None) -> list[Completion]:
        """Complete every prompt (a list of token ids) `sampling.n` times.

        Returns len(prompts) * n completions, prompt-major: the n completions of prompt 0, then
        the n of prompt 1, ...; so completion i belongs to prompt i // n. See `Completion` for
        which log-probs are returned and when the stop token is included.

        keys: a stable id per prompt (e.g. its index in the data set; default: its position in
        `prompts`). With a seed, completion j of a prompt depends only on (sampling.seed, its
        key, j) and the weights, not on the other prompts of the call or how they are batched,
        so a run sharded over any number of ranks samples the same rollout.
        """
        ...

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy weights in, by Hugging Face parameter name (`model.layers.0.mlp.up_proj.weight`).

        Tensors are full (unsharded); any dtype/device, converted on copy. A subset of the names
        may be given to update part of the model, except after `sleep(level=2)`, when every
        weight must be supplied again before the next `generate`.
        """
        ...

    def sleep(self, level: int = 1) -> None:
        """Release accelerator memory while the trainer runs.

        level 1: keep the weights, off the accelerator (host memory); `wake_up` brings them back.
        level 2: discard the weights; after `wake_up`, `load_weights` must re-supply all of them.
        Caches of past generations are always dropped. `generate` and `load_weights` refuse to run
        while asleep.
        """
        ...

    def wake_up(self) -> None:
        """Undo `sleep`: weights back on the accelerator (level 1) or storage re-allocated (level 2)."""
        ...

    def prompt_logprobs(self, prompts: list[list[int]]) -> list[torch.Tensor]:
        """log_softmax(logits)[token t] of every prompt token after the first, [len(p) - 1] each, at
        temperature 1: the engine's side of the weight-sync probe (`probe.check_sync`)."""
        ...

    def close(self) -> None:
        """Release the engine (vLLM: before the trainer's process group is destroyed)."""
        ...


__all__ = ["Completion", "FinishReason", "GenerationStats", "RolloutEngine", "SamplingConfig", "check_prompt_lengths", "fits_context"]
