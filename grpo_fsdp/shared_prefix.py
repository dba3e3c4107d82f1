"""Shared-prefix forward for GRPO training: each prompt goes through the network once, not G times.

GRPO trains on G completions of every prompt. Padded rows repeat the prompt in each of them, so
its tokens run through every layer G times, in the forward and again in the backward. With
prompts longer than completions (few-shot or chat-templated math prompts) that is most of the
work. Here the micro-batch is one flat row:

    [ prompt 0 | prompt 1 | ... | prompt R-1 | completion 0 | completion 1 | ... | completion N-1 ]
      R runs x P tokens (each right-padded)     N x C tokens (each right-padded), owner[n] = its run

and attention, per layer, is two SDPA calls (`_shared_prefix_attention`):

    prefix   run r's prompt attends causally to itself                               [R, H, P, D]
    suffix   completion n attends to the real tokens of its prompt (keys and values
             of run owner[n]) and causally to itself                                 [N, H, C, P+C]

Rotary positions continue from each prompt's length, so every completion token sees exactly
what it sees in its own padded row: log-probs and gradients equal the padded forward to float
rounding (tests/test_shared_prefix.py). The gradient of a prompt's keys and values sums over
its completions, as it does when the prompt is repeated. The idea is Prefix Grouper (Liu et al.
2025, arXiv:2506.05433); this is our own implementation on transformers' attention interface.

`attention.py` registers it with transformers as part of `grpo_fsdp+<base>` (e.g. `grpo_fsdp+sdpa`):
a call with the `shared_prefix` keyword comes here (with `hardware.grpo_attention=flex` the same layout
goes through FlexAttention instead, `flex_prefix.py`; `fa2_varlen` re-lays it out padding-free, `varlen.py`);
one without goes to the base implementation, so the same model also runs ordinary padded batches (SFT,
the weight-sync probe). Sliding-window and soft-capped attention are not handled: such calls raise.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F


def mask_placeholder(device) -> torch.Tensor:
    """What the model gets as `attention_mask` with the shared-prefix layout: transformers returns a 4D mask
    as it is instead of building one (which would be [T, T] for the flat row, and wrong); the shared-prefix
    attention ignores it and uses each block's `key_mask`."""
    return torch.ones((1, 1, 1, 1), dtype=torch.bool, device=device)


@dataclass
class SuffixBlock:
    """Completions of similar length, padded to the longest of them (`length_blocks`)."""

    rows: torch.Tensor  # [n] long: which completions of the micro-batch, in layout order
    owner: torch.Tensor  # [n] long: the run (prompt) of each
    key_mask: torch.Tensor  # [n, 1, C, P+C] bool: which prompt + completion keys each completion query sees
    length: int  # C


@dataclass
class SharedPrefix:
    """One micro-batch in the shared-prefix layout (see the module docstring). Built by `pack`."""

    input_ids: torch.Tensor  # [1, T] long, T = R*P + sum over blocks of n*C
    position_ids: torch.Tensor  # [1, T] long: 0.. in each prompt, len(prompt).. in each completion
    predict_at: torch.Tensor  # [N, Cmax] long: flat position whose hidden state predicts completion token t
    targets: torch.Tensor  # [N, Cmax] long: completion tokens (padding past each end)
    lengths: torch.Tensor  # [N] long: completion lengths
    prompt_lengths: torch.Tensor  # [R] long: real tokens of each prompt (the rest of its P is padding)
    blocks: list[SuffixBlock]
    runs: int  # R
    prefix_len: int  # P
    real_tokens: int  # prompt tokens once per run + completion tokens: what the network actually processes

    def to(self, device) -> SharedPrefix:
        def move(obj):
            return type(obj)(**{f.name: (v.to(device) if isinstance(v, torch.Tensor) else v)
                                for f in fields(obj) for v in [getattr(obj, f.name)]})

        out = move(self)
        out.blocks = [move(b) for b in self.blocks]
        return out

    def completion_mask(self) -> torch.Tensor:
        """[N, Cmax] bool: the real completion tokens."""
        return torch.arange(self.targets.shape[1])[None, :] < self.lengths[:, None].cpu()


def length_blocks(lengths: list[int], max_blocks: int = 4, candidates: int = 32) -> list[list[int]]:
    """Split completions into at most `max_blocks` groups of similar length, to cut padding.

    Sorted by length (longest first), a block pads to its first member; the split minimises padded
    tokens + 2 * max(lengths) per block (each block costs two more attention calls per layer). Splits
    are considered only where the length changes, thinned to `candidates` places, so this stays
    cheap for micro-batches of hundreds of completions.
    """
    order = sorted(range(len(lengths)), key=lambda n: -lengths[n])
    sl = [max(lengths[n], 1) for n in order]
    cuts = [i for i in range(1, len(sl)) if sl[i] < sl[i - 1]]
    if len(cuts) > candidates:
        cuts = [cuts[round(k * (len(cuts) - 1) / (candidates - 1))] for k in range(candidates)]
    points = [0, *cuts, len(sl)]  # block boundaries are chosen among these
    per_block = 2 * sl[0]
    inf = float("inf")
    # best[k][j]: least cost of covering sl[:points[j]] with k blocks; back[k][j]: the previous boundary
    best = [[inf] * len(points) for _ in range(max_blocks + 1)]
    back = [[0] * len(points) for _ in range(max_blocks + 1)]
    best[0][0] = 0
    for k in range(1, max_blocks + 1):
        for j in range(1, len(points)):
            for i in range(j):
                cost = best[k - 1][i] + (points[j] - points[i]) * sl[points[i]] + per_block
                if cost < best[k][j]:
                    best[k][j], back[k][j] = cost, i
    k = min(range(1, max_blocks + 1), key=lambda k: best[k][-1])
    bounds, j = [], len(points) - 1
    while k > 0:
        i = back[k][j]
        bounds.append((points[i], points[j]))
        j, k = i, k - 1
    return [order[lo:hi] for lo, hi in reversed(bounds)]


def pack(prompts: list[list[int]], completions: list[list[int]], owner: list[int], pad_id: int,
         max_blocks: int = 4) -> SharedPrefix:
    """The flat layout of `completions` (N), completion n answering `prompts[owner[n]]` (R prompts).

    Prompts must be non-empty; a completion may be empty (its row is all padding and predicts nothing).
    `max_blocks` > 1 lets completions of different lengths pad to different lengths (`length_blocks`).
    """
    R, N = len(prompts), len(completions)
    if R == 0 or N == 0 or len(owner) != N or min(map(len, prompts)) == 0 or not all(0 <= o < R for o in owner):
        raise ValueError(f"pack: need non-empty prompts and one owner in [0, {R}) per completion (got {R} prompts, "
                         f"{N} completions, owners {sorted(set(owner))[:8]})")
    P = max(map(len, prompts))
    C = max(max(map(len, completions)), 1)
    plen = torch.tensor([len(p) for p in prompts])  # [R]
    own = torch.tensor(owner)  # [N]
    clen = torch.tensor([len(c) for c in completions])  # [N]

    prefix = torch.full((R, P), pad_id, dtype=torch.long)
    for r, p in enumerate(prompts):
        prefix[r, : len(p)] = torch.tensor(p)
    ids, positions = [prefix.flatten()], [torch.arange(P).repeat(R)]
    targets = torch.full((N, C), pad_id, dtype=torch.long)
    for n, c in enumerate(completions):
        targets[n, : len(c)] = torch.tensor(c, dtype=torch.long)
    # token t of completion n is predicted by the prompt's last token (t = 0) or by its own token t-1
    predict_at = (own * P + plen[own] - 1)[:, None].repeat(1, C)  # [N, C], t = 0 filled in for every t
    blocks, start = [], R * P
    for rows in length_blocks(clen.tolist(), max_blocks) if max_blocks > 1 else [list(range(N))]:
        rows_t = torch.tensor(rows)
        Cb = max(int(clen[rows_t].max()), 1)
        steps = torch.arange(Cb)
        ids.append(targets[rows_t, :Cb].flatten())
        positions.append((plen[own[rows_t]][:, None] + steps).flatten())
        prompt_keys = torch.arange(P)[None, None, :] < plen[own[rows_t]][:, None, None]  # [n, 1, P]
        causal = steps[None, :, None] >= steps[None, None, :]  # [1, Cb, Cb]
        key_mask = torch.cat([prompt_keys.expand(len(rows), Cb, P), causal.expand(len(rows), Cb, Cb)], dim=-1)[:, None]
        in_block = start + torch.arange(len(rows))[:, None] * Cb + steps[None, :-1]  # [n, Cb-1]: tokens 1..Cb-1
        predict_at[rows_t, 1:Cb] = in_block
        blocks.append(SuffixBlock(rows=rows_t, owner=own[rows_t], key_mask=key_mask, length=Cb))
        start += len(rows) * Cb

    return SharedPrefix(
        input_ids=torch.cat(ids)[None],
        position_ids=torch.cat(positions)[None],
        predict_at=predict_at,
        targets=targets,
        lengths=clen,
        prompt_lengths=plen,
        blocks=blocks,
        runs=R,
        prefix_len=P,
        real_tokens=int(plen.sum() + clen.sum()),
    )


def shared_prefix_attention(module, query, key, value, sp: SharedPrefix, dropout: float, scaling, sliding_window, **kwargs):
    """query [1, Hq, T, D], key/value [1, Hkv, T, D] (rotary applied) -> ([1, T, Hq, D], None)."""
    R, P = sp.runs, sp.prefix_len
    cut = R * P
    longest = max(b.length for b in sp.blocks)
    if query.shape[0] != 1 or query.shape[2] != cut + sum(len(b.rows) * b.length for b in sp.blocks):
        raise ValueError(f"shared-prefix attention: got {tuple(query.shape)} for a layout of {R}x{P} prompt tokens + "
                         f"{[(len(b.rows), b.length) for b in sp.blocks]} completion tokens")
    if sliding_window is not None and sliding_window < P + longest:
        raise NotImplementedError(f"shared-prefix attention does not implement sliding windows ({sliding_window} < "
                                  f"{P + longest} tokens); set algo.shared_prefix=false")
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("shared-prefix attention does not implement logit soft-capping; set algo.shared_prefix=false")
    gqa = query.shape[1] != key.shape[1]
    if gqa and query.device.type != "cpu":  # with a mask, SDPA's GQA falls back to the math kernel on CUDA
        rep = query.shape[1] // key.shape[1]
        key, value, gqa = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1), False

    def rows(x, start, n, length):  # [1, H, T, D] -> [n, H, length, D]
        return x[0, :, start : start + n * length].unflatten(1, (n, length)).transpose(0, 1)

    qp, kp, vp = (rows(x, 0, R, P) for x in (query, key, value))
    outs = [F.scaled_dot_product_attention(qp, kp, vp, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa)]
    start = cut
    for b in sp.blocks:
        n = len(b.rows)
        qs, ks, vs = (rows(x, start, n, b.length) for x in (query, key, value))
        # [n, Hkv, P+C, D]: the prompt's keys, then the completion's. index_select, not kp[owner]: its backward is
        # index_add_, ~20x faster on CPU at 2 threads than the accumulating index_put_ of advanced indexing (~0.9 ms a call)
        keys = torch.cat([kp.index_select(0, b.owner), ks], dim=2)
        values = torch.cat([vp.index_select(0, b.owner), vs], dim=2)
        outs.append(F.scaled_dot_product_attention(qs, keys, values, attn_mask=b.key_mask, dropout_p=dropout, scale=scaling,
                                                   enable_gqa=gqa))
        start += n * b.length
    return torch.cat([o.transpose(1, 2).flatten(0, 1) for o in outs])[None], None  # [1, T, Hq, D]
