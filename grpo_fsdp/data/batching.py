"""Deterministic, stateless batch order.

`global_batch_indices(..., step, ...)` is a pure function of its arguments: there is no sampler
state to checkpoint, resuming at step k reproduces exactly the batches of an uninterrupted run,
and every rank computes the same global batch without communication. `split_for_rank` then cuts
that global batch into micro-batches the same way on every rank, so the set of sequences an
optimizer step sees does not depend on the world size (the loss normalisation takes care of
the rest).

Curriculum order (`curriculum_batch_indices`): the same idea over an easy-to-hard list cut into stages.

Order within an epoch: a permutation seeded by (seed, epoch); the tail that does not fill a whole
global batch is dropped (a different tail each epoch, so no sample is left out for good). With
group_by_length, each window of 16 consecutive global batches of that permutation is sorted by
length, cut into batches of similar lengths, and the batches of the window are shuffled so long
and short batches still alternate; this cuts padding while keeping the randomness local.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from grpo_fsdp.cli import UserError

WINDOW_BATCHES = 16  # global batches sorted together by length (larger: less padding, less random)


def _rng(*key: object) -> random.Random:
    # A string seed is hashed with SHA-512 by `random`: stable across processes and Python versions
    # (unlike hash() of a tuple, which is salted per process for strings).
    return random.Random(":".join(str(k) for k in key))


def batches_per_epoch(num_samples: int, global_batch_size: int) -> int:
    if global_batch_size <= 0:
        raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
    return num_samples // global_batch_size


def _epoch_batches(lengths: Sequence[int], global_batch_size: int, epoch: int, seed: int, group_by_length: bool) -> list[list[int]]:
    n_batches = batches_per_epoch(len(lengths), global_batch_size)
    order = list(range(len(lengths)))
    _rng("perm", seed, epoch).shuffle(order)
    order = order[: n_batches * global_batch_size]  # drop the incomplete last batch
    if not group_by_length:
        return [order[i : i + global_batch_size] for i in range(0, len(order), global_batch_size)]
    batches = []
    span = WINDOW_BATCHES * global_batch_size
    for w, start in enumerate(range(0, len(order), span)):
        window = sorted(order[start : start + span], key=lambda i: lengths[i])  # stable: ties keep permutation order
        chunk = [window[i : i + global_batch_size] for i in range(0, len(window), global_batch_size)]
        _rng("window", seed, epoch, w).shuffle(chunk)
        batches.extend(chunk)
    return batches


def global_batch_indices(lengths: Sequence[int], global_batch_size: int, step: int, seed: int, group_by_length: bool) -> list[int]:
    """Sample indices of global batch number `step` (0-based; epochs follow one another)."""
    per_epoch = batches_per_epoch(len(lengths), global_batch_size)
    if per_epoch == 0:
        raise UserError(
            f"data: {len(lengths)} usable examples cannot fill one batch of train.global_batch_size={global_batch_size}; "
            "lower train.global_batch_size or use more data (data.limit=0)"
        )
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    epoch, index = divmod(step, per_epoch)
    return _epoch_batches(lengths, global_batch_size, epoch, seed, group_by_length)[index]


def split_for_rank(indices: Sequence[int], lengths: Sequence[int], rank: int, world_size: int, micro_batch_size: int) -> list[list[int]]:
    """This rank's micro-batches of one global batch, in accumulation order.

    The global batch is sorted by length (longest first, so a memory peak shows at the first
    micro-batch) and cut into world_size * accum micro-batches of consecutive lengths. At
    accumulation step a, rank r takes micro-batch a * world_size + r: all ranks work on similar
    lengths at the same time, so none waits long for another at the gradient all-reduce.
    """
    per_pass = world_size * micro_batch_size
    if not 0 <= rank < world_size or micro_batch_size <= 0:
        raise ValueError(f"bad rank {rank} / world_size {world_size} / micro_batch_size {micro_batch_size}")
    if len(indices) % per_pass:
        raise ValueError(f"global batch of {len(indices)} is not a multiple of world_size {world_size} x micro_batch_size {micro_batch_size}")
    accum = len(indices) // per_pass
    ordered = sorted(indices, key=lambda i: (-lengths[i], i))
    micro = [ordered[k : k + micro_batch_size] for k in range(0, len(ordered), micro_batch_size)]
    return [micro[a * world_size + rank] for a in range(accum)]


def curriculum_stages(n: int, stages: int) -> list[range]:
    """Positions 0..n-1 of an easy-to-hard ordering cut into `stages` contiguous stages (sizes differ by <= 1)."""
    if stages < 1 or stages > max(n, 1):
        raise ValueError(f"cannot cut {n} prompts into {stages} stages")
    bounds = [n * k // stages for k in range(stages + 1)]
    return [range(bounds[k], bounds[k + 1]) for k in range(stages)]


def curriculum_batch_indices(ordered: Sequence[int], stages: int, global_batch_size: int, step: int, seed: int) -> tuple[list[int], int]:
    """(sample indices, stage) of global batch number `step` under a curriculum (SENT, arXiv 2512.04359).

    `ordered` lists sample indices from easiest to hardest (lowest semantic entropy first). It is cut into
    `stages` contiguous stages; an epoch walks stage 0, then 1, ..., each shuffled by (seed, epoch, stage)
    and cut into whole global batches (a stage's tail that does not fill one is left out of that epoch, a
    different tail each epoch); the next epoch walks the stages again. Like `global_batch_indices` it is a
    pure function of its arguments: resuming at step k gives exactly the batches of an uninterrupted run.
    """
    parts = curriculum_stages(len(ordered), stages)
    counts = [batches_per_epoch(len(p), global_batch_size) for p in parts]
    if min(counts) == 0:
        raise UserError(
            f"data.curriculum_stages={stages}: a stage of {min(len(p) for p in parts)} prompts cannot fill "
            f"one batch of {global_batch_size}; use fewer stages (at most {len(ordered) // global_batch_size}) or more data")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    epoch, index = divmod(step, sum(counts))
    stage = 0
    while index >= counts[stage]:
        index -= counts[stage]
        stage += 1
    members = [ordered[i] for i in parts[stage]]
    _rng("curriculum", seed, epoch, stage).shuffle(members)
    return members[index * global_batch_size : (index + 1) * global_batch_size], stage
