"""Batch semantics: how one optimizer step is cut into prompts, sequences, micro-batches and ranks.

The trainer prints this plan once at start-up (and `dry_run=true` prints only this and the memory
estimate), so that "batch size" never means two things. The vocabulary, shared by every recipe:

- a *batch* is what one step of the outer loop consumes: for SFT a set of (prompt, target) rows;
  for GRPO (Shao et al. 2024, "DeepSeekMath", sec. 4.1) a rollout of `prompts x G` completions;
- `prompts_per_step` / `sequences_per_step` count that batch over all ranks;
- the batch may be split into `optimizer_steps_per_batch` optimizer steps (PPO-style mini-batches,
  Schulman et al. 2017, sec. 5); each optimizer step takes `sequences_per_step /
  optimizer_steps_per_batch` sequences, split into `grad_accum_steps` micro-batches of
  `micro_batch_size` sequences on each of `world_size` ranks;
- `loss_denominator` says what the summed loss is divided by (DESIGN.md: a global count, so the
  result does not depend on how the batch is split).

`from_config` assumes `validation.validate()` has passed (divisibility is checked there, with a
one-line fix). Each algorithm contributes one small function to `_SEMANTICS` that says what a
batch is; the micro-batch arithmetic below is shared, so a GRPO entry (with a group size and
several optimizer steps per rollout) is an added function, not a rewrite.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from grpo_fsdp.config import Config


@dataclass(frozen=True)
class _BatchShape:
    """What one algorithm says a batch is; the micro-batch split is derived from it."""

    prompts_per_step: int
    sequences_per_step: int
    loss_denominator: str
    optimizer_steps_per_batch: int = 1
    samples_per_prompt: int = 1  # GRPO's group size G; 1 for SFT and DPO-style rows
    step_unit: str = "optimizer steps"  # what one step of train.max_steps is


def _sft_shape(cfg: Config) -> _BatchShape:
    # One sequence per prompt; the global batch is one optimizer step.
    n = cfg.train.global_batch_size
    return _BatchShape(
        prompts_per_step=n,
        sequences_per_step=n,
        loss_denominator="target tokens in the step, all-reduced over ranks",
    )


def _grpo_shape(cfg: Config) -> _BatchShape:
    # One rollout of prompts x G completions, consumed mu times in optimizer steps of global_batch_size.
    g = cfg.algo
    rollout = g.prompts_per_step * g.group_size
    denominators = {"dapo": "completion tokens in the optimizer step, all-reduced",
                    "bnpo": "completion tokens in the optimizer step, all-reduced",
                    "cispo": "completion tokens in the optimizer step, all-reduced",
                    "grpo": "completions in the optimizer step (each a token mean), all-reduced",
                    "dr_grpo": "completions in the optimizer step x algo.max_new_tokens"}
    return _BatchShape(
        prompts_per_step=g.prompts_per_step,
        sequences_per_step=rollout * g.updates_per_rollout,
        loss_denominator=denominators[g.loss],
        optimizer_steps_per_batch=rollout * g.updates_per_rollout // cfg.train.global_batch_size,
        samples_per_prompt=g.group_size,
        step_unit="rollouts",
    )


def _dpo_shape(cfg: Config) -> _BatchShape:
    # One row = one prompt with its chosen and rejected completions (the prompt computed once, shared_prefix.py).
    n = cfg.train.global_batch_size
    return _BatchShape(prompts_per_step=n, sequences_per_step=n,
                       loss_denominator="preference pairs in the step, all-reduced (+ chosen tokens for algo.sft_weight)")


# algo name -> batch shape. A new algorithm adds one entry.
_SEMANTICS: dict[str, Callable[[Config], _BatchShape]] = {"sft": _sft_shape, "grpo": _grpo_shape, "dpo": _dpo_shape}


@dataclass(frozen=True)
class BatchPlan:
    """The numbers that define one step; printed at start-up by `format_table`."""

    prompts_per_step: int  # prompts in one batch, over all ranks
    sequences_per_step: int  # sequences (rows or completions) in one batch, over all ranks
    micro_batch_size: int  # sequences per forward/backward on one rank
    grad_accum_steps: int  # micro-batches per rank per optimizer step
    world_size: int
    loss_denominator: str  # what the summed loss of an optimizer step is divided by
    optimizer_steps_per_batch: int  # 1 for SFT; PPO-style mini-batches for GRPO
    samples_per_prompt: int = 1  # completions per prompt (GRPO group size)
    train_steps: int = 0  # train.max_steps: steps of the outer loop (SFT: optimizer steps; GRPO: rollouts)
    step_unit: str = "optimizer steps"
    warmup_steps: int = 0  # optim.warmup_steps, in optimizer steps

    @property
    def optimizer_steps_total(self) -> int:
        """Optimizer steps in the whole run: the unit of optim.warmup_steps and of the lr schedule."""
        return self.train_steps * self.optimizer_steps_per_batch

    @property
    def sequences_per_optimizer_step(self) -> int:
        return self.sequences_per_step // self.optimizer_steps_per_batch

    @property
    def sequences_per_rank_per_optimizer_step(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps

    @classmethod
    def from_config(cls, cfg: Config, world_size: int) -> BatchPlan:
        """Derive the plan. Assumes `validate(cfg, world_size, ...)` passed, so divisions are exact."""
        name = cfg.algo.name
        if name not in _SEMANTICS:  # a schema added without a plan entry: a programming error
            raise KeyError(f"no batch semantics for algo {name!r}; add one to grpo_fsdp.plan._SEMANTICS")
        shape = _SEMANTICS[name](cfg)
        micro = cfg.train.micro_batch_size
        per_opt_step = shape.sequences_per_step // shape.optimizer_steps_per_batch
        # For SFT this is global_batch_size // (micro_batch_size * world_size).
        grad_accum = per_opt_step // (micro * world_size)
        return cls(
            prompts_per_step=shape.prompts_per_step,
            sequences_per_step=shape.sequences_per_step,
            micro_batch_size=micro,
            grad_accum_steps=grad_accum,
            world_size=world_size,
            loss_denominator=shape.loss_denominator,
            optimizer_steps_per_batch=shape.optimizer_steps_per_batch,
            samples_per_prompt=shape.samples_per_prompt,
            train_steps=cfg.train.max_steps,
            warmup_steps=cfg.optim.warmup_steps,
            step_unit=shape.step_unit,
        )

    def rows(self) -> list[tuple[str, str]]:
        """(label, value) pairs in print order; also handy for logging as a dict."""
        rows = [("prompts / step", str(self.prompts_per_step))]
        if self.samples_per_prompt > 1:  # only meaningful for group-sampling algorithms
            rows.append(("completions / prompt", str(self.samples_per_prompt)))
        rows += [
            ("sequences / step", str(self.sequences_per_step)),
            ("optimizer steps / batch", str(self.optimizer_steps_per_batch)),
            ("sequences / optimizer step", str(self.sequences_per_optimizer_step)),
            ("world size", str(self.world_size)),
            ("micro-batch size (per rank)", str(self.micro_batch_size)),
            ("grad accumulation steps", str(self.grad_accum_steps)),
            ("loss denominator", self.loss_denominator),
        ]
        if self.train_steps:  # step units (TrainConfig): a GRPO step is a rollout of several optimizer steps
            rows += [("steps (train.max_steps)", f"{self.train_steps} {self.step_unit}"),
                     ("optimizer steps in the run", f"{self.optimizer_steps_total} (warmup {self.warmup_steps})")]
        return rows

    def format_table(self) -> str:
        """An aligned two-column text table under the title "batch semantics"."""
        rows = self.rows()
        width = max(len(k) for k, _ in rows)
        lines = ["batch semantics", "-" * (width + 2 + max(len(v) for _, v in rows))]
        lines += [f"{k.ljust(width)}  {v}" for k, v in rows]
        return "\n".join(lines)
