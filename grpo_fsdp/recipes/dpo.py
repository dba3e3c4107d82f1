"""DPO recipe (`algo=dpo`): preference pairs against a frozen reference, on FSDP2.

    python -m grpo_fsdp.train algo=dpo data=preference_arithmetic model.path=<SFT run_dir>/hf     # CPU
    torchrun --nproc_per_node=4 -m grpo_fsdp.train experiment=olmo3-dpo-b200x4 model.path=<SFT export> data.path=...

One optimizer step: global batch number `step` of pairs (a pure function of the step and the seed: resuming
needs no sampler state) -> this rank's micro-batches -> all-reduce the step's pair count (and chosen-token
count for algo.sft_weight) -> per micro-batch: the pairs in the shared-prefix layout (each prompt once,
`dpo_pairs.py`), policy log-probs, reference log-probs (the cache, or the frozen copy), the loss divided by
the global counts (`algorithms/dpo.py`), backward -> clip -> step -> one all-reduce of the logged sums -> log ->
maybe checkpoint. Departures from TRL's DPOTrainer: the reference is scored by the policy itself before the
first update (the SFT model is the reference; `dpo_reference.py`), and the loss denominator is global, so
the result does not depend on micro-batch size or world size (tested to 1e-5). With LoRA
(`hardware.lora.enabled`, 4-bit base or not) the reference is the base model, the policy with its adapters off
(`lora.BaseModel`, issue 14 item 1), for the cache pass and for the online reference alike: no second copy of
the weights is built.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from grpo_fsdp import distributed
from grpo_fsdp.algorithms.dpo import pair_losses, step_loss
from grpo_fsdp.checkpoint import Checkpointer, resume_key
from grpo_fsdp.cli import UserError, redacted_yaml
from grpo_fsdp.config import Config, DPOConfig, OptimConfig, TrainConfig
from grpo_fsdp.data.batching import batches_per_epoch, global_batch_indices, split_for_rank
from grpo_fsdp.data.preference import load_pairs, tokenize_pairs
from grpo_fsdp.logging import make_logger
from grpo_fsdp.lora import BaseModel
from grpo_fsdp.models import build_policy, build_reference, load_tokenizer
from grpo_fsdp.optim import build_optimizer
from grpo_fsdp.plan import BatchPlan
from grpo_fsdp.preemption import Preemption
from grpo_fsdp.recipes.dpo_eval import held_out_pairs, reward_metrics, score
from grpo_fsdp.recipes.dpo_pairs import budget_micro_batches, layout_pairs, pair_logps, processed_tokens
from grpo_fsdp.recipes.dpo_reference import cache_dir, precompute
from grpo_fsdp.recipes.step_end import checkpoint_after_step, end_of_run
from grpo_fsdp.recipes.teardown import Teardown
from grpo_fsdp.schedule import build_scheduler

# the sums all-reduced once per step, in this order (the logged means divide them by the pair count)
SUMS = ("loss", "reward_chosen", "reward_rejected", "accuracy", "logp_chosen", "logp_rejected", "len_chosen", "len_rejected")


def run_length(algo: DPOConfig, train: TrainConfig, optim: OptimConfig, pairs: int) -> tuple[int, OptimConfig]:
    """(optimizer steps, optim with its warmup): algo.epochs > 0 gives epochs x (pairs // global batch) steps (at
    least 1) instead of train.max_steps; algo.warmup_ratio > 0 sets optim.warmup_steps = round(ratio x steps)."""
    steps = max(1, int(algo.epochs * batches_per_epoch(pairs, train.global_batch_size))) if algo.epochs > 0 else train.max_steps
    if algo.warmup_ratio > 0:
        optim = dataclasses.replace(optim, warmup_steps=round(algo.warmup_ratio * steps))
    return steps, optim


def rank_micro_batches(indices: list[int], lengths: list[int], d, micro_batch_size: int, budget: int) -> list[list[int]]:
    """This rank's micro-batches of the global batch: `train.micro_batch_size` pairs each (`split_for_rank`), or with
    `algo.micro_batch_tokens` > 0 the rank's pairs packed up to that many tokens each (`budget_micro_batches`). Every
    rank must run as many forward/backward passes as the others (FSDP's collectives): the short ones get [] fillers."""
    micro = split_for_rank(indices, lengths, d.rank, d.world_size, micro_batch_size)
    if budget <= 0:
        return micro
    micro = budget_micro_batches([i for m in micro for i in m], lengths, budget)
    most = torch.tensor(len(micro), device=d.device)
    torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
    return micro + [[] for _ in range(int(most.item()) - len(micro))]


def run(cfg: Config) -> int:
    with Teardown() as td:  # one ExitStack, released in a fixed order: logger, then process group
        return _run(cfg, td)


def _run(cfg: Config, td: Teardown) -> int:
    d = distributed.init(cfg.hardware.device, cfg.hardware.collective_timeout_s, cfg.hardware.cpu_offload)
    td.add("process_group", distributed.shutdown)
    run_dir = distributed.agree_run_dir(cfg.run_dir, f"dpo-{cfg.model.name}-{cfg.data.name}", resume_key(cfg))
    t, a, o = cfg.train, cfg.algo, cfg.optim

    # 1. data: pairs tokenized once on every rank (cheap next to training)
    tokenizer = load_tokenizer(cfg.model)
    pairs = load_pairs(cfg.data, cfg.data.train_split)
    samples = tokenize_pairs(pairs, tokenizer, cfg.model.template, cfg.data.instruction, cfg.data.max_prompt_length,
                             cfg.data.max_length, quiet=d.rank != 0)
    if len(samples) < t.global_batch_size:
        raise UserError(f"data: {len(samples)} usable preference pairs, fewer than train.global_batch_size="
                        f"{t.global_batch_size}; lower the batch size or add data")
    lengths = [s.tokens for s in samples]
    steps, o = run_length(a, t, o, len(samples))

    # 2. model, optimizer, schedule
    policy, hf_conf = build_policy(cfg.model, cfg.hardware, tokenizer, d, t.seed, t.logprob_chunk_size)
    optimizer = build_optimizer(policy.parameters(), o)
    scheduler = build_scheduler(optimizer, o, steps)

    # 3. reference: scored once by the starting policy and cached, or a frozen copy scoring online (before resume).
    #    With LoRA, both are the policy with its adapters off (the base model): no second copy of the weights.
    say = print if d.is_main else (lambda *_: None)
    held_out = held_out_pairs(cfg, tokenizer, quiet=d.rank != 0) if a.eval_pairs > 0 else []
    ref_table, reference, held_ref = None, None, None
    base = BaseModel(policy) if cfg.hardware.lora.enabled else None
    if base is not None:
        say("reference: the policy with its LoRA adapters off (the base model; no second copy of the weights)")
    if a.precompute_ref:
        cached = lambda rows: precompute(base or policy, rows, cache_dir(cfg, run_dir, rows), a.ref_rows_per_shard,
                                         t.micro_batch_size, tokenizer.pad_token_id, d, say, a.shared_prefix)
        ref_table = cached(samples)
        held_ref = cached(held_out) if held_out else None
    else:
        reference = base or build_reference(policy, hf_conf, cfg.model, cfg.hardware, d, t.logprob_chunk_size)
        if held_out:
            held_ref = score(reference, held_out, t.micro_batch_size, tokenizer.pad_token_id, a.shared_prefix, d.device)[:, :2]

    # 4. resume
    ckpt = Checkpointer(f"{run_dir}/checkpoints", cfg.checkpoint.keep_last)
    start, resumed = ckpt.resume(cfg.checkpoint.resume, policy, optimizer, scheduler)
    torch.manual_seed(t.seed + 1000 * d.rank + start)
    plan = BatchPlan.from_config(cfg, d.world_size)
    logger = make_logger(d.rank, run_dir=run_dir, cfg=cfg.logging, config_yaml=redacted_yaml(cfg), total_steps=steps,
                         run_name=run_dir.rstrip("/").split("/")[-1], world_size=d.world_size, start_step=start, device=d.device)
    td.add("logger", logger)
    logger.print(plan.format_table())
    epochs = f" ({a.epochs:g} epochs of {len(samples)} pairs, warmup {o.warmup_steps})" if a.epochs > 0 else ""
    logger.print(f"run dir: {run_dir}\ndpo: loss={a.loss} beta={a.beta:g} steps={steps}{epochs}\n{resumed}")
    preempt = Preemption()
    td.callback(preempt.restore)

    # 5. train
    began, losses = time.perf_counter(), []
    for step in range(start, steps):
        t0, cpu0 = time.perf_counter(), time.process_time()
        indices = global_batch_indices(lengths, t.global_batch_size, step, t.seed, t.group_by_length)
        micro = rank_micro_batches(indices, lengths, d, t.micro_batch_size, a.micro_batch_tokens)
        global_pairs = float(t.global_batch_size)
        global_chosen = distributed.all_reduce_sum(sum(len(samples[i].chosen_ids) for m in micro for i in m), d.device)

        sums, tokens, phase = torch.zeros(len(SUMS), dtype=torch.float64), 0, {"forward": 0.0, "backward": 0.0}
        policy.train()
        for rows in micro:
            filler = not rows  # a token-budget rank with fewer micro-batches: one pair at weight 0 keeps FSDP in step
            rows = rows or indices[:1]
            batch = layout_pairs([samples[i] for i in rows], tokenizer.pad_token_id, a.shared_prefix)
            tokens += 0 if filler else processed_tokens(batch)
            t_fwd = time.perf_counter()
            pol = pair_logps(policy, batch, d.device)
            if ref_table is not None:
                ref_c, ref_r = (ref_table[rows, j].to(d.device) for j in (0, 1))
            else:
                with torch.no_grad():
                    ref = pair_logps(reference, batch, d.device)
                ref_c, ref_r = ref.chosen, ref.rejected
            per_pair, rew_c, rew_r = pair_losses(a.loss, pol.chosen, pol.rejected, ref_c, ref_r, pol.chosen_len,
                                                 pol.rejected_len, a.beta, a.label_smoothing)
            loss = step_loss(per_pair, global_pairs, -pol.chosen.sum(), global_chosen, a.sft_weight)
            t_bwd = time.perf_counter()
            (loss * 0 if filler else loss).backward()
            phase["forward"] += t_bwd - t_fwd
            phase["backward"] += time.perf_counter() - t_bwd
            if filler:
                continue
            row = (loss.detach() * global_pairs, rew_c.sum(), rew_r.sum(), (rew_c > rew_r).sum(), pol.chosen.detach().sum(),
                   pol.rejected.detach().sum(), pol.chosen_len.sum(), pol.rejected_len.sum())
            sums += torch.stack([x.double().cpu() for x in row])
        t_opt = time.perf_counter()
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), o.max_grad_norm if o.max_grad_norm > 0 else float("inf"))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        phase["optimizer"] = time.perf_counter() - t_opt

        totals = sums.to(d.device)
        torch.distributed.all_reduce(totals)  # the step's sums over ranks, then means per pair
        mean = dict(zip(SUMS, (totals / global_pairs).tolist()))
        all_tokens = distributed.all_reduce_sum(tokens, d.device)
        seconds = time.perf_counter() - t0
        metrics = {
            "train/loss": mean["loss"],
            "train/lr": lr,
            "train/grad_norm": float(distributed.full_tensor(grad_norm)),
            "train/rewards_chosen": mean["reward_chosen"],
            "train/rewards_rejected": mean["reward_rejected"],
            "train/rewards_margin": mean["reward_chosen"] - mean["reward_rejected"],
            "train/reward_accuracy": mean["accuracy"],
            "train/logps_chosen": mean["logp_chosen"],
            "train/logps_rejected": mean["logp_rejected"],
            "train/length_chosen": mean["len_chosen"],
            "train/length_rejected": mean["len_rejected"],
            "train/pairs": global_pairs,
            "perf/tokens_per_s": all_tokens / seconds,
            "perf/step_seconds": seconds,
            "perf/cpu_seconds": time.process_time() - cpu0,  # this process's, all threads: the work, however shared the CPU
            # forward: the policy's (and an online reference's) forward and the loss; optimizer: clip + step. Host
            # clock: on CUDA, work still queued when a phase ends is counted in a later one.
            **{f"perf/{k}_seconds": v for k, v in phase.items()},
        }
        done = step + 1 == steps
        if done and held_out:  # 6. the held-out pairs, scored by the final policy (dpo_eval.py)
            scores = score(policy, held_out, t.micro_batch_size, tokenizer.pad_token_id, a.shared_prefix, d.device)
            metrics.update(reward_metrics(scores, held_ref[:, 0], held_ref[:, 1], a.loss, a.beta, a.label_smoothing))
            logger.print(f"held-out pairs ({len(held_out)}): reward accuracy {metrics['eval/reward_accuracy']:.1%}, "
                         f"margin {metrics['eval/rewards_margin']:+.3f}")
        logger.log(step + 1, metrics)
        losses.append(metrics["train/loss"])

        state = (policy, optimizer, scheduler, hf_conf, tokenizer)
        if checkpoint_after_step(step + 1, done, cfg, ckpt, state, preempt, logger, run_dir, d):
            return 0

    # 7. summary line and export
    end_of_run("dpo", losses, start + 1, steps, began, 4, cfg, ckpt, (policy, optimizer, scheduler, hf_conf, tokenizer),
               logger, run_dir)
    return 0
