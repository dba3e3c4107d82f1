"""Evaluation between training steps, on one rank, with the rollout engine: DESIGN.md's time slicing.

After the weight sync of step s (every `eval.every_steps` steps and at the last step), the eval
rank (rank 1; rank 0 when it runs alone) wakes its engine, runs `eval.evaluate` on each task and
logs `eval/<task>/...` at training step s (`logger.log_eval`). The other ranks go on to the next
step and wait for it at the first collective of that step (the rollout gather), so the cost of
evaluation is the eval rank's wall time, logged as `eval/<task>/seconds`. It uses the training
engine, so evaluation sees exactly the weights that generate the next rollout (the probe check of
the vLLM engine has already vouched for them).

A problem whose prompt + max_new_tokens exceeds the engine's context is skipped, counted as wrong
and logged as `eval/<task>/skipped_too_long` (see `eval.evaluate`); the run goes on, and the
evaluation's one console line says how many were skipped. A budget that leaves no room for any
prompt (eval.max_new_tokens, or a task's default, >= the engine's context) is refused at construction,
on every rank, when the caller passes `context` (the engine's `max_model_len`).

On every other rank the object is inert (`due` is always False): the loop calls it unconditionally.
"""

from __future__ import annotations

from grpo_fsdp.config import EvalConfig

SAMPLE_COLUMNS = ("problem", "prediction", "gold", "correct")


class PeriodicEval:
    def __init__(self, cfg: EvalConfig, rank: int, eval_rank: int, tokenizer, template: str, instruction: str, scorer,
                 max_steps: int, seed: int, context: int | None = None):
        self.cfg, self.tokenizer, self.template, self.instruction, self.scorer = cfg, tokenizer, template, instruction, scorer
        self.max_steps, self.seed = max_steps, seed
        self.active = bool(cfg.tasks) and rank == eval_rank
        if context is not None and cfg.tasks:  # every rank: each raises the same one-line ConfigError
            from eval.engines import check_budget
            from eval.tasks import get_task

            for name in cfg.tasks:
                check_budget(cfg.max_new_tokens or get_task(name).max_new_tokens, context, name, from_default=not cfg.max_new_tokens,
                             option="eval.max_new_tokens")
        self.tasks = {}
        if self.active:
            from eval.tasks import get_task, load_task

            self.tasks = {name: (load_task(name, data_dir=cfg.data_dir, limit=cfg.limit),
                                 cfg.max_new_tokens or get_task(name).max_new_tokens) for name in cfg.tasks}

    def scheduled(self, step: int) -> bool:
        """Whether an evaluation happens at `step` (on the eval rank): the same answer on every rank."""
        every = self.cfg.every_steps
        return bool(self.cfg.tasks) and (step == self.max_steps or (every > 0 and step % every == 0))

    def due(self, step: int) -> bool:
        return self.active and self.scheduled(step)

    def __call__(self, step: int, engine, logger) -> dict[str, float]:
        """Evaluate at optimizer step `step` if it is due on this rank; log into the shared run. Returns the
        metrics logged ({} when nothing was evaluated here), e.g. for checkpoint.best_metric."""
        logged: dict[str, float] = {}
        if not self.due(step):
            return logged
        from eval.evaluate import evaluate

        for name, (examples, max_new_tokens) in self.tasks.items():
            result = evaluate(engine, self.tokenizer, examples, template=self.template, instruction=self.instruction, max_new_tokens=max_new_tokens,
                              k=self.cfg.k, seed=self.seed, scorer=self.scorer, task=name, batch_size=self.cfg.batch_size,
                              log=None)  # the skipped count goes into this evaluation's one line below
            logged.update(result.metrics(prefix="eval/"))
            logger.log_eval(step, result.metrics(prefix="eval/"))
            logger.log_table(step, f"eval/{name}/samples", list(SAMPLE_COLUMNS),
                             [[s[c] for c in SAMPLE_COLUMNS] for s in result.samples[: self.cfg.table_rows]])
            # the eval rank may not be rank 0, whose logger owns the console: a plain line
            skipped = "" if not result.skipped_too_long else (
                f"; {result.skipped_too_long} skipped as wrong: prompt + {max_new_tokens} new tokens exceed the "
                f"{result.max_model_len}-token context")
            print(f"eval step {step}: {name} accuracy {result.accuracy:.1%} of {result.num_problems} ({result.seconds:.1f} s"
                  f"{skipped})", flush=True)
        return logged
