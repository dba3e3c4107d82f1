"""The entropy mask's cost and saving in one GRPO optimizer step, mask off and on in turn in one process.

    .venv/bin/python benchmarks/entropy_mask_step.py                       # the demo's model shape, byte vocabulary
    .venv/bin/python benchmarks/entropy_mask_step.py --vocab 151665 --completions 32   # Qwen2.5's vocabulary

A random Qwen2-architecture policy (the demo's shape by default: hidden 64, 2 layers, 2 heads; --vocab sets the
vocabulary, --tied ties the head), a rollout of --completions random completions of --length tokens in groups of 8
with random 0/1 rewards, cut into micro-batches of --micro (padded rows), and recipes/grpo.py's own functions:

  off      optimizer_step(...) as today (algo.entropy_top_quantile = 1.0)
  on       old_policy_pass(..., need_entropy=True) (pi_old's entropies, a no-grad forward: the recipe's
           "logprobs" phase) then optimizer_step(..., ents) at q = --quantile (the "train" phase); with one
           micro-batch (--micro >= --completions) no pass: the step's own forward gives the entropies

Each round runs off, then on; the learning rate is 0 so every round sees the same weights. Medians over --rounds
after one warm-up round. The saving is in the LM head's backward (grpo_fsdp/logprobs.py skips the dropped rows),
so it grows with the vocabulary; the entropy pass costs one forward. Prints a markdown row per setting.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, default=0, help="0: the tiny model's byte-level tokenizer")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--tied", action="store_true")
    p.add_argument("--completions", type=int, default=128)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--micro", type=int, default=32)
    p.add_argument("--quantile", type=float, default=0.2)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from grpo_fsdp import distributed
    from grpo_fsdp.config import GRPOConfig, OptimConfig
    from grpo_fsdp.policy import Policy
    from grpo_fsdp.recipes.grpo_update import old_policy_pass, optimizer_step
    from grpo_fsdp.recipes.rollout_batch import gather_rollout, micro_batches
    from grpo_fsdp.rollout import Completion
    from grpo_fsdp.schedule import build_scheduler
    from grpo_fsdp.tokenizer import build_tiny_tokenizer

    vocab = a.vocab or len(build_tiny_tokenizer())
    conf = Qwen2Config(vocab_size=vocab, hidden_size=a.hidden, intermediate_size=4 * a.hidden, num_hidden_layers=a.layers,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024, tie_word_embeddings=a.tied,
                       pad_token_id=0, bos_token_id=None, eos_token_id=1)
    conf._attn_implementation = "sdpa"
    torch.manual_seed(0)
    policy = Policy(AutoModelForCausalLM.from_config(conf), chunk_size=1024)
    gen = torch.Generator().manual_seed(1)
    group = 8
    prompts = [torch.randint(2, vocab, (16,), generator=gen).tolist() for _ in range(a.completions // group)]
    completions = [Completion(i // group, torch.randint(2, vocab, (a.length,), generator=gen).tolist(), [0.0] * a.length, "length")
                   for i in range(a.completions)]
    d = distributed.init("cpu")
    try:
        rewards = (torch.rand(a.completions, generator=gen) < 0.5).float().tolist()
        rollout = gather_rollout(completions, rewards, prompts, group)
        from grpo_fsdp.algorithms.grpo import group_advantages

        adv = group_advantages(rollout.rewards, group)
        batches = micro_batches(rollout, adv, torch.ones(a.completions, dtype=torch.bool), range(a.completions), a.micro, 0,
                                False, False)
        opt = torch.optim.SGD(policy.parameters(), lr=0.0)
        sched = build_scheduler(opt, OptimConfig(lr=0.0, warmup_steps=0), 10_000)
        times = {"off_train": [], "on_entropy_pass": [], "on_train": []}
        kept = []
        for r in range(1 + a.rounds):
            t = time.perf_counter()
            optimizer_step(policy, opt, sched, batches, None, None, GRPOConfig(group_size=group, rollout_correction="none"),
                           1.0, d.device, 1.0)
            t_off = time.perf_counter() - t
            t = time.perf_counter()
            ents = None  # one micro-batch: the recipe takes its own forward's entropies, no extra pass
            if len(batches) > 1:
                _, (ents,) = old_policy_pass(policy, [batches], d.device, 1.0, need_old=False, need_entropy=True)
            t_pass = time.perf_counter() - t
            t = time.perf_counter()
            on = optimizer_step(policy, opt, sched, batches, None, None,
                                GRPOConfig(group_size=group, rollout_correction="none", entropy_top_quantile=a.quantile),
                                1.0, d.device, 1.0, ents)
            t_on = time.perf_counter() - t
            if r:
                times["off_train"].append(t_off)
                times["on_entropy_pass"].append(t_pass)
                times["on_train"].append(t_on)
                kept.append(on["emask_kept"] / on["emask_scored"])
        med = {k: statistics.median(v) for k, v in times.items()}
    finally:
        distributed.shutdown()
    tokens = a.completions * a.length
    print(f"| {vocab:,} | {a.hidden} | {a.layers} | {'yes' if a.tied else 'no'} | {tokens:,} | {len(batches)} | {a.quantile} | {statistics.mean(kept):.3f} | "
          f"{med['off_train']:.2f} | {med['on_train']:.2f} | {med['on_train'] / med['off_train']:.2f} | "
          f"{med['on_entropy_pass']:.2f} | {(med['on_train'] + med['on_entropy_pass']) / med['off_train']:.2f} | "
          f"{torch.get_num_threads()} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
