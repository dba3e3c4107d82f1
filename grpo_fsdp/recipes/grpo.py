"""GRPO recipe (`algo=grpo`): rollouts, verifiable rewards, group-relative advantages, clipped updates.

    python -m grpo_fsdp.train algo=grpo model.path=outputs/demo/sft/hf    # from an SFT checkpoint
    torchrun --nproc_per_node=2 -m grpo_fsdp.train algo=grpo hardware=h100x2 model=qwen2.5-math-1.5b data=gsm8k

One step, as DESIGN.md draws it: this rank's prompts -> engine.generate (G each) -> rewards (worker
pool, timeout) -> the rollout of every rank, gathered -> advantages -> old/ref log-probs when needed
-> optimizer steps over the rollout (loss / all-reduced counts) -> sync weights into the engine ->
log -> maybe checkpoint. The step does not depend on the number of ranks or the micro-batch size
(recipes/rollout_batch.py; tested 1 vs 2 processes). Departures from DeepSeekMath: token-level
loss (DAPO) by default, clip-higher, population std in the advantages (see algorithms/grpo.py),
KL off unless algo.beta > 0, and the engine's own log-probs of the sampled tokens correct the surrogate
for the engine/trainer mismatch (truncated importance sampling by default, algorithms/rollout_correction.py).
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from contextlib import contextmanager

import torch

from grpo_fsdp import distributed
from grpo_fsdp.algorithms.entropy_mask import mask_metrics
from grpo_fsdp.algorithms.grpo import group_advantages, zero_variance_groups
from grpo_fsdp.algorithms.separable import fused_head_problem
from grpo_fsdp.checkpoint import Checkpointer, resume_key
from grpo_fsdp.cli import redacted_yaml
from grpo_fsdp.config import Config
from grpo_fsdp.curriculum.auto import resolve as resolve_curriculum
from grpo_fsdp.curriculum.cache import model_key
from grpo_fsdp.curriculum.sampler import PromptOrder
from grpo_fsdp.data.lengths import fit_prompts
from grpo_fsdp.data.loading import load_examples
from grpo_fsdp.data.templates import encode_prompt, render_prompt
from grpo_fsdp.logging import make_logger
from grpo_fsdp.lora import BaseModel, adapter_state_dict, adapters_disabled, has_lora, merge_adapters
from grpo_fsdp.models import build_policy, build_reference, hf_config, load_tokenizer
from grpo_fsdp.optim import build_optimizer
from grpo_fsdp.plan import BatchPlan
from grpo_fsdp.policy import Policy
from grpo_fsdp.preemption import Preemption
from grpo_fsdp.recipes.grpo_update import old_policy_pass, optimizer_step, score_logprobs
from grpo_fsdp.recipes.periodic_eval import PeriodicEval
from grpo_fsdp.recipes.rollout_batch import gather_rollout, micro_batches, rank_share
from grpo_fsdp.recipes.step_end import checkpoint_after_step, export_final
from grpo_fsdp.recipes.teardown import Teardown
from grpo_fsdp.rewards import ConstantRewardWatch, RewardScorer, RewardWeights, timeout_warning
from grpo_fsdp.rollout.base import SamplingConfig
from grpo_fsdp.rollout.factory import engine_from_config, probe_tolerance
from grpo_fsdp.rollout.probe import check_sync
from grpo_fsdp.rollout.shared import eval_mode, held_for_generation
from grpo_fsdp.schedule import build_scheduler


def sync_weights(policy, engine, probes: list[list[int]], tolerance: float, device, first: bool = False) -> float | None:
    """Gather each parameter in turn (never the whole model at once) into the engine's copy, then
    check that both score the probe prompts alike (`rollout/probe.py`). Returns the largest gap, or
    None when not probed: engines whose load is exact by construction (`probe_every_sync = False`,
    the transformers engine) are probed at the first sync only, which checks the name mapping and
    that both forwards agree; vLLM (its own loaders, sleep and wake) at every sync. An engine that generates with
    the policy's own modules (`shares_policy`, the transformers engine under LoRA: rollout/shared.py) gets nothing;
    the first sync still probes it (its decoding forward against the trainer's log-prob forward)."""
    # The probe scores with the policy in eval mode (LoRA dropout off), as the engine samples.
    if getattr(engine, "shares_policy", False):
        if not (first and probes):
            return None
        with eval_mode(policy):
            return check_sync(engine, policy, probes, tolerance, device)
    # LoRA: an engine that serves adapters (vLLM) gets the base weights once (and after a sleep(2)), then the adapters
    # alone; any other gets the merged weights W + (alpha / r) B A, one tensor at a time (lora.merge_adapters).
    # Probed at every sync either way (4 prompts): the first sync (B = 0) could not catch a wrong merge or adapter.
    lora = has_lora(policy)
    if lora and getattr(engine, "serves_adapters", False):
        if first or engine.needs_base_weights:
            with adapters_disabled(policy):
                engine.load_weights(merge_adapters(policy))
        engine.load_adapters(adapter_state_dict(policy), policy.lora_info["adapter_config"])
    else:
        engine.load_weights(merge_adapters(policy) if lora else ((name, p) for name, p in policy.named_parameters()))
    if not probes or not (first or lora or getattr(engine, "probe_every_sync", True)):
        return None
    with eval_mode(policy):
        return check_sync(engine, policy, probes, tolerance, device)


class Phases:
    """Wall seconds per phase of a step: `with phases("generate"): ...` -> {"perf/generate_seconds": s}.
    On CUDA each phase ends with a synchronize, so queued kernels count in the phase that launched them."""

    def __init__(self, device: torch.device):
        self.seconds: dict[str, float] = defaultdict(float)
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    @contextmanager
    def __call__(self, name: str):
        tick = time.perf_counter()
        yield
        self.sync()
        self.seconds[name] += time.perf_counter() - tick

    def metrics(self) -> dict[str, float]:
        return {f"perf/{k}_seconds": v for k, v in self.seconds.items()}


def _stats(prefix: str, values: torch.Tensor) -> dict[str, float]:
    v = values.float()
    return {f"{prefix}mean": v.mean().item(), f"{prefix}std": v.std(unbiased=False).item(),
            f"{prefix}min": v.min().item(), f"{prefix}max": v.max().item()}


def run(cfg: Config) -> int:
    with Teardown() as td:  # one ExitStack, released in a fixed order: engine, reward workers, logger, process group
        return _run(cfg, td)


def _run(cfg: Config, td: Teardown) -> int:
    d = distributed.init(cfg.hardware.device, cfg.hardware.collective_timeout_s, cfg.hardware.cpu_offload)
    td.add("process_group", distributed.shutdown)
    run_dir = distributed.agree_run_dir(cfg.run_dir, f"grpo-{cfg.model.name}-{cfg.data.name}", resume_key(cfg))
    g, t, o = cfg.algo, cfg.train, cfg.optim

    # 1. prompts: rendered and tokenized once on every rank
    tokenizer = load_tokenizer(cfg.model)
    examples = load_examples(cfg.data, cfg.data.train_split)
    prompts = [encode_prompt(tokenizer, render_prompt(tokenizer, e.question, cfg.model.template, cfg.data.instruction)) for e in examples]
    context = getattr(hf_config(cfg.model, tokenizer, "sdpa"), "max_position_embeddings", None)  # config.json only
    fit = fit_prompts([len(p) for p in prompts], cfg.data.max_prompt_length, g.max_new_tokens, context, g.prompts_per_step)
    examples, prompts = [examples[i] for i in fit.kept], [prompts[i] for i in fit.kept]
    if fit.summary and d.is_main:
        print(fit.summary, file=sys.stderr, flush=True)
    data_cfg = resolve_curriculum(cfg, d.is_main)  # data.curriculum=auto: the SENT file, computed on rank 0 when missing
    order = PromptOrder(data_cfg, [e.question for e in examples], [len(p) for p in prompts], g.prompts_per_step, t.seed,
                        model_key(cfg.model, t.seed))  # each step's prompts: shuffled epochs or the SENT curriculum

    # 2. reward workers (they import their grader while the models load), policy (+ reference only when
    #    beta > 0), optimizer, engine
    scorer = RewardScorer(RewardWeights(g.reward_correct, g.reward_format, g.overlong_penalty, g.overlong_buffer),
                          num_workers=g.reward_workers, timeout_s=g.reward_timeout_s)
    td.add("rewards", scorer)
    policy, hf_conf = build_policy(cfg.model, cfg.hardware, tokenizer, d, t.seed, t.logprob_chunk_size)
    reference = None if g.beta == 0 else BaseModel(policy) if cfg.hardware.lora.enabled else \
        build_reference(policy, hf_conf, cfg.model, cfg.hardware, d, t.logprob_chunk_size)  # LoRA: adapters off
    optimizer = build_optimizer(policy.parameters(), o)
    plan = BatchPlan.from_config(cfg, d.world_size)
    scheduler = build_scheduler(optimizer, o, t.max_steps * plan.optimizer_steps_per_batch)
    engine = td.add("engine", engine_from_config(cfg, hf_conf, tokenizer, d.device, d.rank, run_dir, policy))  # auto: vLLM if it imports
    probes, tolerance = prompts[: cfg.rollout.probe_prompts], probe_tolerance(cfg)
    watch = ConstantRewardWatch(g.constant_reward_warn_steps)
    evaluator = PeriodicEval(cfg.eval, d.rank, d.eval_rank, tokenizer, cfg.model.template, cfg.data.instruction, scorer,
                             t.max_steps, t.seed, context=engine.max_model_len)

    ckpt = Checkpointer(f"{run_dir}/checkpoints", cfg.checkpoint.keep_last, cfg.checkpoint.best_metric, cfg.checkpoint.best_mode)
    start, resumed = ckpt.resume(cfg.checkpoint.resume, policy, optimizer, scheduler)  # "resumed at step N from ..."
    first_gap = sync_weights(policy, engine, probes, tolerance, d.device, first=True)  # logged with the first step
    logger = make_logger(d.rank, run_dir=run_dir, cfg=cfg.logging, config_yaml=redacted_yaml(cfg), total_steps=t.max_steps,
                         run_name=run_dir.rstrip("/").split("/")[-1], world_size=d.world_size, start_step=start, device=d.device)
    td.add("logger", logger)
    logger.print(plan.format_table())
    logger.print(f"run dir: {run_dir}\n{resumed}")
    if order.summary:
        logger.print(order.summary)
    preempt = Preemption()
    td.callback(preempt.restore)
    per_rank = g.prompts_per_step // d.world_size
    lo, hi = d.rank * per_rank, (d.rank + 1) * per_rank  # this rank's prompt positions in every step
    n_opt = plan.optimizer_steps_per_batch // g.updates_per_rollout  # optimizer steps per pass over the rollout
    single_pass = plan.optimizer_steps_per_batch == 1  # then the sampling policy is the policy: ratio 1
    temp = g.temperature if g.temperature > 0 else 1.0  # greedy rollouts: score the plain distribution
    masking = g.entropy_top_quantile < 1 or g.entropy_threshold > 0  # the entropy mask (algorithms/entropy_mask.py)
    shared = g.shared_prefix and policy.shared_prefix_ok  # each prompt once per micro-batch (shared_prefix.py)
    # the loss's gradient inside the LM head's forward where the loss is separable per token (algorithms/token_loss.py)
    blocked_why = fused_head_problem(g.importance_level, g.rollout_correction, g.rollout_correction_level, masking)
    fused = t.lm_head != "blocked" and blocked_why is None
    if t.lm_head == "auto" and blocked_why is not None:
        logger.print(f"note: the LM head runs blocked (4 matmuls, not the fused 3): {blocked_why}")
    for model in (policy, reference):  # pi_old's and the reference's no-grad passes in the same arithmetic
        if isinstance(model, Policy):
            model.fused_head = fused
    if g.shared_prefix and not shared:
        logger.print(f"note: attention {cfg.hardware.attn_implementation!r} cannot take the shared-prefix layout; "
                     "training on padded prompt + completion rows")

    scorer.wait_ready()  # not during step 1's rollout
    for step in range(start, t.max_steps):
        phases = Phases(d.device)
        # 3. rollout: this rank's slice of the step's prompts, G completions each, keyed by global position
        with phases("generate"):
            ids, order_metrics = order(step)  # curriculum/stage and curriculum/batch_entropy under data.curriculum=sent
            sampling = SamplingConfig(n=g.group_size, temperature=g.temperature, top_p=g.top_p, top_k=g.top_k,
                                      max_new_tokens=g.max_new_tokens, seed=t.seed * 1_000_003 + step, ignore_eos=g.ignore_eos)
            completions = engine.generate([prompts[i] for i in ids[lo:hi]], sampling, keys=list(range(lo, hi)))
            engine.sleep(cfg.rollout.sleep_level)  # the trainer's turn on the device

        # 4. rewards here, then every rank's rollout and the group-relative advantages
        with phases("score"):
            texts = [tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in completions]
            golds = [examples[ids[lo + c.prompt_index]].answer for c in completions]
            scored = scorer.score(texts, golds, [len(c.token_ids) for c in completions], g.max_new_tokens,
                                  budget_s=g.reward_step_budget_s)  # hanging answers cost at most the budget
            rollout = gather_rollout(completions, scored.rewards, [prompts[i] for i in ids], g.group_size)
            adv = group_advantages(rollout.rewards, g.group_size, g.advantage_scale)  # [P*G]
            keep = torch.ones_like(rollout.truncated)
            if g.filter_zero_variance:
                keep = ~zero_variance_groups(rollout.rewards, g.group_size).repeat_interleave(g.group_size)

        # 5. this rank's micro-batches of each optimizer step; old and reference log-probs when needed
        with phases("logprobs"):
            steps = [micro_batches(rollout, adv, keep, rank_share(c, t.global_batch_size, d.rank, d.world_size),
                                   t.micro_batch_size, tokenizer.pad_token_id, g.mask_truncated, shared)
                     for c in range(n_opt)]
            # pi_old's entropies for the entropy mask, unless one micro-batch per rank and a single pass: then its own forward's
            need_ents = masking and not (single_pass and len(steps[0]) == 1)
            olds, ents = old_policy_pass(policy, steps, d.device, temp, need_old=not single_pass, need_entropy=need_ents)
            refs = [None] * n_opt if reference is None else [score_logprobs(reference, s, d.device, temp) for s in steps]

        # 6. optimizer steps: mu passes over the rollout
        with phases("train"):
            policy.train()
            done = [optimizer_step(policy, optimizer, scheduler, s, None if olds is None else olds[c], refs[c], g,
                                   o.max_grad_norm, d.device, temp, None if ents is None else ents[c], fused)
                    for _ in range(g.updates_per_rollout) for c, s in enumerate(steps)]

        with phases("sync"):
            engine.wake_up()
            probe_gap = sync_weights(policy, engine, probes, tolerance, d.device)
            probe_gap, first_gap = (first_gap if probe_gap is None else probe_gap), None

        # 7. log one dict (sums over ranks)
        keys = ("loss", "tokens", "entropy", "clip_low", "clip_high", "kl", "mismatch_kl", "mismatch_abs", "mismatch_outside",
                "mismatch_tokens", "corrected", "emask_scored", "emask_kept", "emask_kept_entropy", "emask_dropped_entropy")
        sums = torch.tensor([sum(x[k] for x in done) for k in keys], dtype=torch.float64, device=d.device)
        torch.distributed.all_reduce(sums)
        total = dict(zip(keys, sums.tolist()))
        tokens, engine_tokens = max(total["tokens"], 1.0), max(total["mismatch_tokens"], 1.0)
        abs_max = torch.tensor(max(x["mismatch_abs_max"] for x in done), dtype=torch.float64, device=d.device)
        torch.distributed.all_reduce(abs_max, op=torch.distributed.ReduceOp.MAX)
        lengths = torch.tensor([len(x) for x in rollout.tokens], dtype=torch.float32)
        trained = sum(b["tokens"] for s in steps for b in s) * g.updates_per_rollout
        seconds = phases.seconds
        metrics = {
            "train/loss": total["loss"] / plan.optimizer_steps_per_batch, "train/entropy": total["entropy"] / tokens,
            "train/clip_frac_low": total["clip_low"] / tokens, "train/clip_frac_high": total["clip_high"] / tokens,
            "train/kl": total["kl"] / tokens, "train/grad_norm": sum(x["grad_norm"] for x in done) / len(done),
            "train/lr": scheduler.get_last_lr()[0], "train/skipped_updates": sum(x["skipped"] for x in done),
            **_stats("reward/", rollout.rewards),
            "reward/correct_rate": distributed.all_reduce_sum(sum(scored.correct), d.device) / len(rollout.rewards),
            "reward/timeouts": distributed.all_reduce_sum(scored.timeouts, d.device),
            "reward/over_budget": distributed.all_reduce_sum(scored.over_budget, d.device),
            "reward/parse_failures": distributed.all_reduce_sum(scored.parse_failures, d.device),
            **_stats("train/advantage_", adv),
            "rollout/completion_length_mean": lengths.mean().item(), "rollout/completion_length_max": lengths.max().item(),
            "rollout/truncation_rate": rollout.truncated.float().mean().item(),
            # engine vs trainer on the scored tokens (rollout_correction.py): k3 KL(engine || trainer), |log-ratio|,
            # the share outside [1/C, C], and the share the correction capped (tis) or dropped (mis)
            "rollout/mismatch_kl": total["mismatch_kl"] / engine_tokens,
            "rollout/mismatch_abs_logp_mean": total["mismatch_abs"] / engine_tokens,
            "rollout/mismatch_abs_logp_max": abs_max.item(),
            "rollout/mismatch_outside_cap": total["mismatch_outside"] / engine_tokens,
            "rollout/correction_frac": total["corrected"] / engine_tokens,
            **({} if probe_gap is None else {"rollout/probe_max_abs_diff": probe_gap}),
            "perf/generation_tokens_per_s": lengths.sum().item() / max(seconds["generate"], 1e-9),
            "perf/training_tokens_per_s": distributed.all_reduce_sum(trained, d.device) / max(seconds["train"], 1e-9),
            **phases.metrics(), **order_metrics,
            **(mask_metrics(total, [x["entropy_threshold"] for x in done if not x["skipped"]]) if masking else {}),
        }
        logger.log(step + 1, metrics)
        # the eval rank only; the others wait at the next collective. An engine on the policy's own modules (LoRA,
        # rollout/shared.py) gathers them first on every rank, as that unshard is a collective
        with held_for_generation(engine, evaluator.scheduled(step + 1)):
            evaluated = evaluator(step + 1, engine, logger)
        improved = ckpt.observe(step + 1, evaluated, evaluator.scheduled(step + 1))  # checkpoint.best_metric: save as best/
        if (warning := watch.update(rollout.rewards.tolist())) is not None:
            logger.print(f"warning: {warning}")
        if warning := timeout_warning(step + 1, int(metrics["reward/timeouts"]), int(metrics["reward/over_budget"]),
                                      len(rollout.rewards), g.reward_timeout_warn_share, g.reward_timeout_s,
                                      g.reward_step_budget_s):
            logger.print(f"warning: {warning}")

        # 8. checkpoints: every N steps, at the end, and on SIGTERM
        state = (policy, optimizer, scheduler, hf_conf, tokenizer)
        if checkpoint_after_step(step + 1, step + 1 == t.max_steps, cfg, ckpt, state, preempt, logger, run_dir, d, improved):
            break
    else:
        export_final(cfg, policy, hf_conf, tokenizer, logger, run_dir)
    return 0
