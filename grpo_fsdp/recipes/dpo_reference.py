"""Reference log-probs for DPO: computed once before training and cached on disk (`algo.precompute_ref=true`).

The reference is the model DPO starts from (the SFT export in `model.path`), so before the first update the
policy IS the reference: one no-grad pass of the policy over every pair gives the summed log-probs of both
completions, and no second model is ever held in memory (`algo.precompute_ref=false` keeps a frozen copy instead,
`models.build_reference`, or with LoRA turns the adapters off, and scores each micro-batch online; both are tested
equal). The pass runs before a checkpoint is resumed, so the weights are still the starting ones. With LoRA the
pass runs with the adapters off (`lora.BaseModel`, recipes/dpo.py): the base model, which before the first update
is also the policy (B = 0), and stays the reference after it.

Cache layout: `<algo.ref_cache_dir or <run_dir>/ref_logps>/<key>/shard_<k>.pt`, each an fp32 tensor [rows, 2]
(chosen, rejected) for rows k*R .. k*R+R-1 of the tokenized pairs (R = algo.ref_rows_per_shard), written
atomically (a temporary file, then a rename). Shards are the unit of work and of resuming: rank 0 lists the
missing ones, they are dealt round-robin over the ranks, and an interrupted pass redoes only what is missing,
on any world size. `<key>` is a SHA-256 over what the values depend on: the model (model.* fields, the tiny
model's init seed, the size and mtime of each weight file of a local model.path), the compute dtype, which
model scores (the full policy, or with LoRA the adapters-off base, NF4-quantized with hardware.load_in_4bit),
the data lengths, and every pair's token ids. A run on the same model, data and lengths reuses the cache; a
changed model, max_length or row computes a new one. Every rank then reads all shards ([N, 2] floats: 8 bytes
a pair) and keeps them in memory.

FSDP runs a collective in every forward, so every rank must run the same number of forwards: a rank with fewer
micro-batches to score runs copies of one pair and discards the result.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from grpo_fsdp import distributed
from grpo_fsdp.config import Config
from grpo_fsdp.data.preference import PreferenceSample
from grpo_fsdp.faults import maybe_fault
from grpo_fsdp.recipes.dpo_pairs import layout_pairs, pair_logps

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".json")


def _model_identity(cfg: Config) -> dict:
    m = cfg.model
    hw = cfg.hardware
    ident = {"model": asdict(m), "param_dtype": hw.param_dtype}
    if hw.lora.enabled:  # the base model scores (adapters off); NF4 changes its weights, the adapters never count
        ident["reference"] = "base, adapters off" + (", nf4 weights" if hw.load_in_4bit else "")
    if not m.path:
        ident["init_seed"] = cfg.train.seed  # the tiny model is initialised from train.seed (models.full_state_dict)
    elif os.path.isdir(os.path.expanduser(m.path)):
        root = Path(os.path.expanduser(m.path))
        ident["files"] = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in root.iterdir()
                                if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    return ident


def cache_key(cfg: Config, samples: list[PreferenceSample]) -> str:
    """The content hash naming the cache directory (see the module docstring)."""
    h = hashlib.sha256()
    head = {"model": _model_identity(cfg), "max_length": cfg.data.max_length, "max_prompt_length": cfg.data.max_prompt_length}
    h.update(json.dumps(head, sort_keys=True, default=str).encode())
    for s in samples:
        h.update(json.dumps([s.prompt_ids, s.chosen_ids, s.rejected_ids]).encode())
    return h.hexdigest()[:20]


def cache_dir(cfg: Config, run_dir: str, samples: list[PreferenceSample]) -> Path:
    return Path(cfg.algo.ref_cache_dir or os.path.join(run_dir, "ref_logps")) / cache_key(cfg, samples)


def _shard_path(root: Path, k: int) -> Path:
    return root / f"shard_{k:05d}.pt"


def precompute(policy, samples: list[PreferenceSample], root: Path, rows_per_shard: int, micro_batch_size: int,
               pad_id: int, d, say=print, shared_prefix: bool = True) -> torch.Tensor:
    """[N, 2] fp32 reference log-probs (chosen, rejected) of every pair, from the cache or computed into it."""
    n_shards = -(-len(samples) // rows_per_shard)
    missing = None
    if d.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        missing = [k for k in range(n_shards) if not _shard_path(root, k).exists()]
    missing = distributed.broadcast_object(missing)
    if missing:
        done = n_shards - len(missing)
        say(f"reference log-probs: scoring {len(missing)} of {n_shards} shards ({done} already in {root})")
        mine = missing[d.rank :: d.world_size]
        t0 = time.perf_counter()
        _score_shards(policy, samples, root, mine, rows_per_shard, micro_batch_size, lambda s: layout_pairs(s, pad_id, shared_prefix), d)
        say(f"reference log-probs: {len(missing)} shards scored in {time.perf_counter() - t0:.2f} s")
    else:
        say(f"reference log-probs: reusing {root} ({len(samples)} pairs)")
    dist.barrier()
    return torch.cat([torch.load(_shard_path(root, k), weights_only=True) for k in range(n_shards)])


def _score_shards(policy, samples, root: Path, mine: list[int], rows_per_shard: int, micro: int, layout, d) -> None:
    work = []  # (shard, row indices of one micro-batch, last micro-batch of its shard)
    for k in mine:
        rows = sorted(range(k * rows_per_shard, min((k + 1) * rows_per_shard, len(samples))), key=lambda i: -samples[i].tokens)
        chunks = [rows[a : a + micro] for a in range(0, len(rows), micro)]
        work += [(k, c, j == len(chunks) - 1) for j, c in enumerate(chunks)]
    rounds = _max(len(work), d)
    was_training = policy.training
    policy.eval()
    out: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for r in range(rounds):
            if r >= len(work):  # keep the collectives in step with the busier ranks
                pair_logps(policy, layout(samples[:1]), d.device)
                continue
            k, rows, last = work[r]
            lp = pair_logps(policy, layout([samples[i] for i in rows]), d.device)
            for i, c, rj in zip(rows, lp.chosen.tolist(), lp.rejected.tolist()):
                out[i] = torch.tensor([c, rj], dtype=torch.float32)
            if last:
                base = k * rows_per_shard
                shard = torch.stack([out.pop(i) for i in range(base, min(base + rows_per_shard, len(samples)))])
                tmp = _shard_path(root, k).with_suffix(f".tmp{d.rank}")
                torch.save(shard, tmp)
                os.replace(tmp, _shard_path(root, k))
                maybe_fault("ref_shard_written", k)
    policy.train(was_training)


def _max(value: int, d) -> int:
    t = torch.tensor(value, device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())
