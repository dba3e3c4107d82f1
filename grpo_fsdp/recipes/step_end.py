"""What every recipe does after an optimizer step (the checkpoint rule and the preemption exit) and at the end of
a run that was not preempted (the loss summary line and the exports, `end_of_run`: the LoRA adapter as a PEFT
directory and the Hugging Face model, merged under LoRA; GRPO calls `export_final` alone).

    SIGTERM seen by any rank  -> save now, print the resume line, and tell the caller to stop
    the last step (checkpoint.save_final), every checkpoint.every_steps, a new best -> save
    then the fault-injection point `after_step` (tests kill a run here: faults.py)

One function so that SFT, GRPO and DPO cannot drift apart on when a run is resumable.
"""

from __future__ import annotations

import time

from grpo_fsdp import distributed
from grpo_fsdp.export import export_adapter, export_hf
from grpo_fsdp.faults import maybe_fault
from grpo_fsdp.lora import has_lora


def checkpoint_after_step(step: int, done: bool, cfg, ckpt, state: tuple, preempt, logger, run_dir: str, d,
                          improved: bool = False) -> bool:
    """After optimizer step `step` (1-based). `state` = (policy, optimizer, scheduler, hf_conf, tokenizer).
    Returns True when the run must stop (preempted: saved, resume line printed); a collective on every rank."""
    policy, optimizer, scheduler, hf_conf, tokenizer = state
    if distributed.any_rank(preempt.requested, d.device):
        saved = ckpt.save(step, policy, optimizer, scheduler, step, hf_conf, tokenizer)
        logger.print(preempt.saved(step, saved, run_dir, d.rank))
        return True
    every = cfg.checkpoint.every_steps
    if (done and cfg.checkpoint.save_final) or (every and step % every == 0) or improved:
        ckpt.save(step, policy, optimizer, scheduler, step, hf_conf, tokenizer)
    maybe_fault("after_step", step)
    return False


def end_of_run(name: str, losses: list[float], first: int, last: int, began: float, digits: int, cfg, ckpt, state: tuple,
               logger, run_dir: str) -> None:
    """`<name>: steps first-last, loss a -> b, N s; checkpoint in ...` (when this run took steps), then the export to
    `<run_dir>/hf` with checkpoint.export_hf (a collective). `state` as in `checkpoint_after_step`."""
    policy, _, _, hf_conf, tokenizer = state
    if losses:
        logger.print(f"{name}: steps {first}-{last}, loss {losses[0]:.{digits}f} -> {losses[-1]:.{digits}f}, "
                     f"{time.perf_counter() - began:.0f} s; checkpoint in {ckpt.latest()}")
    export_final(cfg, policy, hf_conf, tokenizer, logger, run_dir)


def export_final(cfg, policy, hf_conf, tokenizer, logger, run_dir: str) -> None:
    """With checkpoint.export_hf (collectives: every rank calls it): under LoRA the adapter alone as a PEFT directory,
    `<run_dir>/adapter`, then the model (merged under LoRA) as a Hugging Face directory, `<run_dir>/hf`."""
    if not cfg.checkpoint.export_hf:
        return
    if has_lora(policy):
        logger.print(f"exported the LoRA adapter (PEFT format) to {export_adapter(policy, f'{run_dir}/adapter')}")
    out = export_hf(policy, hf_conf, tokenizer, f"{run_dir}/hf", cfg.hardware.param_dtype)
    logger.print(f"exported Hugging Face model to {out}")
