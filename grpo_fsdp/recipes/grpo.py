"""GRPO recipe (`algo=grpo`): rollouts, verifiable rewards, group-relative advantages, clipped updates.

    python -m grpo_fsdp.train algo=grpo model.path=outputs/demo/hf      # from an SFT checkpoint
    torchrun --nproc_per_node=2 -m grpo_fsdp.train algo=grpo hardware=h100x2 model=qwen2.5-math-1.5b data=gsm8k

One step, as DESIGN.md draws it: this rank's prompts -> engine.generate (G each) -> rewards (worker
pool, timeout) -> advantages (from every rank's rewards) -> old/ref log-probs when needed ->
optimizer steps over the rollout (loss / all-reduced counts) -> sync weights into the engine -> log
-> maybe checkpoint. Departures from DeepSeekMath: token-level loss (DAPO) by default, clip-higher,
population std in the advantages (see algorithms/grpo.py), KL off unless algo.beta > 0.
"""

from __future__ import annotations

import time

import torch

from grpo_fsdp import distributed
from grpo_fsdp.algorithms.grpo import count_contributions, group_advantages, grpo_loss, mask_truncated, zero_variance_groups
from grpo_fsdp.checkpoint import Checkpointer
from grpo_fsdp.cli import redacted_yaml
from grpo_fsdp.config import Config
from grpo_fsdp.data.batching import global_batch_indices
from grpo_fsdp.data.loading import load_examples
from grpo_fsdp.data.sft import SFTSample, collate
from grpo_fsdp.data.templates import encode_prompt, render_prompt
from grpo_fsdp.export import export_hf
from grpo_fsdp.faults import maybe_fault
from grpo_fsdp.logging import gpu_metrics, make_logger, process_metrics
from grpo_fsdp.models import DTYPES, build_policy, load_tokenizer
from grpo_fsdp.plan import BatchPlan
from grpo_fsdp.preemption import Preemption
from grpo_fsdp.rewards import ConstantRewardWatch, RewardScorer, RewardWeights
from grpo_fsdp.rollout.base import SamplingConfig
from grpo_fsdp.rollout.hf import HFEngine, stop_token_ids
from grpo_fsdp.schedule import build_scheduler


def sync_weights(policy, engine) -> None:
    """Gather each parameter in turn (never the whole model at once) into the engine's copy."""
    engine.load_weights((name, p) for name, p in policy.named_parameters())


def _stats(prefix: str, values: torch.Tensor) -> dict[str, float]:
    v = values.float()
    return {f"{prefix}mean": v.mean().item(), f"{prefix}std": v.std(unbiased=False).item(),
            f"{prefix}min": v.min().item(), f"{prefix}max": v.max().item()}


def run(cfg: Config) -> int:
    d = distributed.init(cfg.hardware.device)
    run_dir = distributed.agree_run_dir(cfg.run_dir, f"grpo-{cfg.model.name}-{cfg.data.name}")
    g, t, o = cfg.algo, cfg.train, cfg.optim

    # 1. prompts: rendered and tokenized once on every rank
    tokenizer = load_tokenizer(cfg.model)
    examples = [e for e in load_examples(cfg.data, cfg.data.train_split)]
    prompts = [encode_prompt(tokenizer, render_prompt(tokenizer, e.question, cfg.model.template)) for e in examples]
    keep = [i for i, p in enumerate(prompts) if len(p) <= cfg.data.max_prompt_length]
    examples, prompts = [examples[i] for i in keep], [prompts[i] for i in keep]

    # 2. policy (+ reference only when beta > 0), optimizer, engine, scorer
    policy, hf_conf = build_policy(cfg.model, cfg.hardware, tokenizer, d, t.seed, t.logprob_chunk_size)
    reference = build_policy(cfg.model, cfg.hardware, tokenizer, d, t.seed, t.logprob_chunk_size)[0].eval() if g.beta > 0 else None
    optimizer = torch.optim.AdamW(policy.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    plan = BatchPlan.from_config(cfg, d.world_size)
    scheduler = build_scheduler(optimizer, o, t.max_steps * plan.optimizer_steps_per_batch)
    engine = HFEngine(hf_conf, stop_token_ids(tokenizer, hf_conf), tokenizer.pad_token_id, d.device, DTYPES[cfg.hardware.param_dtype])
    scorer = RewardScorer(RewardWeights(g.reward_correct, g.reward_format, g.overlong_penalty, g.overlong_buffer),
                          num_workers=g.reward_workers, timeout_s=g.reward_timeout_s)
    watch = ConstantRewardWatch(g.constant_reward_warn_steps)

    ckpt = Checkpointer(f"{run_dir}/checkpoints", cfg.checkpoint.keep_last)
    source = ckpt.latest() if cfg.checkpoint.resume == "auto" else (None if cfg.checkpoint.resume == "none" else cfg.checkpoint.resume)
    start = ckpt.load(source, policy, optimizer, scheduler).step if source is not None else 0
    sync_weights(policy, engine)
    logger = make_logger(d.rank, run_dir=run_dir, cfg=cfg.logging, config_yaml=redacted_yaml(cfg), total_steps=t.max_steps,
                         run_name=run_dir.rstrip("/").split("/")[-1], world_size=d.world_size, start_step=start)
    logger.print(plan.format_table())
    preempt = Preemption()
    local_prompts = g.prompts_per_step // d.world_size
    per_rank_opt = t.global_batch_size // d.world_size  # completions per rank per optimizer step

    for step in range(start, t.max_steps):
        phase: dict[str, float] = {}
        tick = time.perf_counter()
        # 3. rollout: this rank's slice of the step's prompts, G completions each
        ids = global_batch_indices([len(p) for p in prompts], g.prompts_per_step, step, t.seed, False)
        mine = ids[d.rank * local_prompts:(d.rank + 1) * local_prompts]
        sampling = SamplingConfig(n=g.group_size, temperature=g.temperature, top_p=g.top_p, top_k=g.top_k,
                                  max_new_tokens=g.max_new_tokens, seed=t.seed * 1_000_003 + step * 1009 + d.rank)
        completions = engine.generate([prompts[i] for i in mine], sampling)
        phase["generate"] = time.perf_counter() - tick

        # 4. rewards (local), then advantages from every rank's rewards
        tick = time.perf_counter()
        texts = [tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in completions]
        golds = [examples[mine[c.prompt_index]].answer for c in completions]
        scored = scorer.score(texts, golds, [len(c.token_ids) for c in completions], g.max_new_tokens)
        local_r = torch.tensor(scored.rewards, dtype=torch.float32)
        all_r = torch.cat(distributed.all_gather_tensor(local_r, d.device))  # [B*G], rank-major = prompt-major
        adv_all = group_advantages(all_r, g.group_size, g.advantage_scale)
        n_local = len(completions)
        adv = adv_all[d.rank * n_local:(d.rank + 1) * n_local].float()
        truncated = torch.tensor([c.finish_reason == "length" for c in completions])
        keep_seq = torch.ones(n_local, dtype=torch.bool)
        if g.filter_zero_variance:
            flat = zero_variance_groups(all_r, g.group_size).repeat_interleave(g.group_size)
            keep_seq = ~flat[d.rank * n_local:(d.rank + 1) * n_local]
        phase["score"] = time.perf_counter() - tick

        # 5. training batch: prompt + completion, loss on completion tokens only
        samples = [SFTSample(prompts[mine[c.prompt_index]] + c.token_ids,
                             [False] * len(prompts[mine[c.prompt_index]]) + [bool(k)] * len(c.token_ids))
                   for c, k in zip(completions, keep_seq.tolist())]
        order = list(range(n_local))
        groups = [order[i:i + per_rank_opt] for i in range(0, n_local, per_rank_opt)]  # optimizer steps of this rollout
        micro_idx = [[grp[i:i + t.micro_batch_size] for i in range(0, len(grp), t.micro_batch_size)] for grp in groups]
        batches = {tuple(m): collate([samples[i] for i in m], tokenizer.pad_token_id) for grp in micro_idx for m in grp}
        for m, b in batches.items():
            b["target_mask"] = b["loss_mask"][:, 1:]
            if g.mask_truncated:
                b["target_mask"] = mask_truncated(b["target_mask"], truncated[list(m)])
            b["adv"] = adv[list(m)]
        single_pass = g.updates_per_rollout == 1 and len(groups) == 1
        temp = g.temperature if g.temperature > 0 else 1.0  # greedy rollouts: score the plain distribution
        tick = time.perf_counter()
        with torch.no_grad():
            for m, b in batches.items():
                if not single_pass:  # old log-probs of the sampling policy, for the importance ratio
                    b["old"], _ = policy(b["input_ids"].to(d.device), b["attention_mask"].to(d.device), b["target_mask"].to(d.device), temperature=temp)
                if reference is not None:
                    b["ref"], _ = reference(b["input_ids"].to(d.device), b["attention_mask"].to(d.device), b["target_mask"].to(d.device), temperature=temp)
        phase["logprobs"] = time.perf_counter() - tick

        # 6. optimizer steps: mu passes over the rollout, each optimizer step over global_batch_size completions
        tick = time.perf_counter()
        agg = {"loss": 0.0, "clip_low": 0.0, "clip_high": 0.0, "kl": 0.0, "entropy": 0.0, "tokens": 0.0, "grad_norm": 0.0}
        policy.train()
        for _ in range(g.updates_per_rollout):
            for grp in micro_idx:
                local = {"global_tokens": 0, "global_sequences": 0}
                for m in grp:
                    for k, v in count_contributions(batches[tuple(m)]["target_mask"]).items():
                        local[k] += int(v)
                norm = {k: distributed.all_reduce_sum(v, d.device) for k, v in local.items()}
                norm["max_completion_length"] = g.max_new_tokens
                for m in grp:
                    b = batches[tuple(m)]
                    tm = b["target_mask"].to(d.device)
                    logp, ent = policy(b["input_ids"].to(d.device), b["attention_mask"].to(d.device), tm, with_entropy=True, temperature=temp)
                    old = logp.detach() if single_pass else b["old"]
                    loss, st = grpo_loss(logp, old, b.get("ref"), b["adv"].to(d.device), tm, eps_low=g.clip_eps_low,
                                         eps_high=g.clip_eps_high, beta=g.beta, aggregation=g.loss, normalisers=norm)
                    loss.backward()
                    n_tok = float(tm.sum())
                    agg["loss"] += loss.item()
                    agg["tokens"] += n_tok
                    agg["entropy"] += float((ent.detach() * tm).sum())
                    agg["clip_low"] += float(st["clip_frac_low"]) * n_tok
                    agg["clip_high"] += float(st["clip_frac_high"]) * n_tok
                    agg["kl"] += float(st.get("kl_mean", torch.tensor(0.0))) * n_tok
                gn = torch.nn.utils.clip_grad_norm_(policy.parameters(), o.max_grad_norm if o.max_grad_norm > 0 else float("inf"))
                agg["grad_norm"] = gn.full_tensor().item() if hasattr(gn, "full_tensor") else float(gn)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        phase["train"] = time.perf_counter() - tick

        tick = time.perf_counter()
        sync_weights(policy, engine)
        phase["sync"] = time.perf_counter() - tick

        # 7. log one dict (global sums over ranks)
        sums = torch.tensor([agg[k] for k in ("loss", "tokens", "entropy", "clip_low", "clip_high", "kl")], dtype=torch.float64, device=d.device)
        torch.distributed.all_reduce(sums)
        loss_sum, tokens, ent_sum, cl, ch, kl = sums.tolist()
        lengths = torch.tensor([len(c.token_ids) for c in completions], dtype=torch.float32)
        all_len = torch.cat(distributed.all_gather_tensor(lengths, d.device))
        all_trunc = torch.cat(distributed.all_gather_tensor(truncated.float(), d.device))
        correct = distributed.all_reduce_sum(sum(scored.correct), d.device)
        gen_tokens = distributed.all_reduce_sum(int(lengths.sum()), d.device)
        passes = plan.optimizer_steps_per_batch
        metrics = {
            "train/loss": loss_sum / passes, "train/entropy": ent_sum / max(tokens, 1), "train/clip_frac_low": cl / max(tokens, 1),
            "train/clip_frac_high": ch / max(tokens, 1), "train/kl": kl / max(tokens, 1), "train/grad_norm": agg["grad_norm"],
            "train/lr": scheduler.get_last_lr()[0],
            **_stats("reward/", all_r),
            "reward/correct_rate": correct / len(all_r),
            "reward/timeouts": distributed.all_reduce_sum(scored.timeouts, d.device),
            "reward/parse_failures": distributed.all_reduce_sum(scored.parse_failures, d.device),
            **_stats("train/advantage_", adv_all),
            "rollout/completion_length_mean": all_len.mean().item(), "rollout/completion_length_max": all_len.max().item(),
            "rollout/truncation_rate": all_trunc.mean().item(),
            "perf/generation_tokens_per_s": gen_tokens / max(phase["generate"], 1e-9),
            "perf/training_tokens_per_s": distributed.all_reduce_sum(sum(int(b["attention_mask"].sum()) for b in batches.values()), d.device)
            * g.updates_per_rollout / max(phase["train"], 1e-9),
            **{f"perf/{k}_seconds": v for k, v in phase.items()},
            **process_metrics(), **gpu_metrics(d.local_rank if d.device.type == "cuda" else None),
        }
        logger.log(step + 1, metrics)
        if (warning := watch.update(all_r.tolist())) is not None:
            logger.print(f"warning: {warning}")

        every = cfg.checkpoint.every_steps
        if distributed.any_rank(preempt.requested, d.device):
            ckpt.save(step + 1, policy, optimizer, scheduler, step + 1, hf_conf, tokenizer)
            logger.print(f"SIGTERM: saved checkpoint at step {step + 1}; exiting (resume with checkpoint.resume=auto)")
            break
        if step + 1 == t.max_steps or (every and (step + 1) % every == 0):
            ckpt.save(step + 1, policy, optimizer, scheduler, step + 1, hf_conf, tokenizer)
        maybe_fault("after_step", step + 1)
    else:
        if cfg.checkpoint.export_hf:
            logger.print(f"exported Hugging Face model to {export_hf(policy, hf_conf, tokenizer, f'{run_dir}/hf', cfg.hardware.param_dtype)}")
    scorer.close()
    preempt.restore()
    logger.close()
    return 0
