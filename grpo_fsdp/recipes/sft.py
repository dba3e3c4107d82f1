"""SFT recipe (`algo=sft`): next-token loss on completion tokens, on FSDP2.

    python -m grpo_fsdp.train algo=sft                                    # tiny model, CPU
    torchrun --nproc_per_node=2 -m grpo_fsdp.train hardware=h100x2 model=qwen2.5-1.5b data=gsm8k algo=sft

One optimizer step: take global batch number `step` (a pure function of the step and the seed, so
resuming needs no sampler state) -> this rank's micro-batches -> all-reduce the step's target
token count -> forward/backward each micro-batch with the loss divided by that count -> clip ->
step -> log -> maybe checkpoint. Departures from common practice: none; the global-count
denominator is what makes the result independent of micro-batch size and world size.
"""

from __future__ import annotations

import time

import torch

from grpo_fsdp import distributed
from grpo_fsdp.algorithms.sft import sft_loss
from grpo_fsdp.checkpoint import Checkpointer, resume_key
from grpo_fsdp.cli import UserError, redacted_yaml
from grpo_fsdp.config import Config
from grpo_fsdp.data.batching import global_batch_indices, split_for_rank
from grpo_fsdp.data.loading import load_examples
from grpo_fsdp.data.sft import collate, tokenize_sft
from grpo_fsdp.logging import make_logger
from grpo_fsdp.models import build_policy, load_tokenizer
from grpo_fsdp.optim import build_optimizer
from grpo_fsdp.plan import BatchPlan
from grpo_fsdp.preemption import Preemption
from grpo_fsdp.recipes.step_end import checkpoint_after_step, end_of_run
from grpo_fsdp.recipes.teardown import Teardown
from grpo_fsdp.schedule import build_scheduler


def run(cfg: Config) -> int:
    with Teardown() as td:  # one ExitStack, released in a fixed order: logger, then process group
        return _run(cfg, td)


def _run(cfg: Config, td: Teardown) -> int:
    d = distributed.init(cfg.hardware.device, cfg.hardware.collective_timeout_s, cfg.hardware.cpu_offload)
    td.add("process_group", distributed.shutdown)
    run_dir = distributed.agree_run_dir(cfg.run_dir, f"sft-{cfg.model.name}-{cfg.data.name}", resume_key(cfg))
    t = cfg.train

    # 1. data: tokenized once on every rank (cheap next to training; avoids shipping tensors)
    tokenizer = load_tokenizer(cfg.model)
    examples = load_examples(cfg.data, cfg.data.train_split)
    samples = tokenize_sft(examples, tokenizer, cfg.model.template, cfg.data.max_prompt_length, cfg.data.max_length, cfg.algo.loss_on_prompt,
                           cfg.data.instruction)
    if len(samples) < t.global_batch_size:
        raise UserError(f"data: {len(samples)} usable sequences, fewer than train.global_batch_size={t.global_batch_size}; "
                        "lower the batch size or add data")
    lengths = [len(s.input_ids) for s in samples]

    # 2. model, optimizer, schedule
    policy, hf_conf = build_policy(cfg.model, cfg.hardware, tokenizer, d, t.seed, t.logprob_chunk_size)
    o = cfg.optim
    optimizer = build_optimizer(policy.parameters(), o)
    scheduler = build_scheduler(optimizer, o, t.max_steps)

    # 3. resume
    ckpt = Checkpointer(f"{run_dir}/checkpoints", cfg.checkpoint.keep_last)
    start, resumed = ckpt.resume(cfg.checkpoint.resume, policy, optimizer, scheduler)  # "resumed at step N from ..."
    torch.manual_seed(t.seed + 1000 * d.rank + start)

    plan = BatchPlan.from_config(cfg, d.world_size)
    logger = make_logger(d.rank, run_dir=run_dir, cfg=cfg.logging, config_yaml=redacted_yaml(cfg), total_steps=t.max_steps,
                         run_name=run_dir.rstrip("/").split("/")[-1], world_size=d.world_size, start_step=start, device=d.device)
    td.add("logger", logger)
    logger.print(plan.format_table())
    logger.print(f"run dir: {run_dir}\n{resumed}")
    preempt = Preemption()
    td.callback(preempt.restore)

    # 4. train
    began, losses = time.perf_counter(), []
    for step in range(start, t.max_steps):
        t0 = time.perf_counter()
        indices = global_batch_indices(lengths, t.global_batch_size, step, t.seed, t.group_by_length)
        micro = [collate([samples[i] for i in m], tokenizer.pad_token_id) for m in split_for_rank(indices, lengths, d.rank, d.world_size, t.micro_batch_size)]
        global_tokens = distributed.all_reduce_sum(sum(int(b["loss_mask"][:, 1:].sum()) for b in micro), d.device)
        local_seq_tokens = sum(int(b["attention_mask"].sum()) for b in micro)

        loss_sum = torch.zeros((), device=d.device)
        policy.train()
        for b in micro:
            b = {k: v.to(d.device) for k, v in b.items()}
            target_mask = b["loss_mask"][:, 1:]
            logp, _ = policy(b["input_ids"], b["attention_mask"], target_mask)
            loss = sft_loss(logp, target_mask, global_tokens)
            loss.backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), o.max_grad_norm if o.max_grad_norm > 0 else float("inf"))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        torch.distributed.all_reduce(loss_sum)
        seq_tokens = distributed.all_reduce_sum(local_seq_tokens, d.device)
        seconds = time.perf_counter() - t0
        metrics = {
            "train/loss": loss_sum.item(),
            "train/lr": lr,
            "train/grad_norm": float(distributed.full_tensor(grad_norm)),
            "train/target_tokens": global_tokens,
            "perf/tokens_per_s": seq_tokens / seconds,
            "perf/step_seconds": seconds,
        }
        logger.log(step + 1, metrics)
        losses.append(metrics["train/loss"])

        state = (policy, optimizer, scheduler, hf_conf, tokenizer)
        if checkpoint_after_step(step + 1, step + 1 == t.max_steps, cfg, ckpt, state, preempt, logger, run_dir, d):
            return 0

    # 5. summary line and export
    end_of_run("sft", losses, start + 1, t.max_steps, began, 3, cfg, ckpt, (policy, optimizer, scheduler, hf_conf, tokenizer),
               logger, run_dir)
    return 0
