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
a call with the `shared_prefix` keyword comes here; one without goes to the base implementation, so
the same model also runs ordinary padded batches (SFT, the weight-sync probe). Sliding-window and
soft-capped attention are not handled: such calls raise.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

# Handed to the model as `attention_mask`: transformers takes a dict as masks already built and skips
# building its own (which would be [T, T] for the flat row, and wrong).
NO_MASKS = {"full_attention": None, "sliding_attention": None}


@dataclass
class SharedPrefix:
    """One micro-batch in the shared-prefix layout (see the module docstring). Built by `pack`."""

    input_ids: torch.Tensor  # [1, T] long, T = R*P + N*C
    position_ids: torch.Tensor  # [1, T] long: 0.. in each prompt, len(prompt).. in each completion
    owner: torch.Tensor  # [N] long: the run (prompt) of each completion
    key_mask: torch.Tensor  # [N, 1, C, P+C] bool: which prompt + completion keys each completion query sees
    predict_at: torch.Tensor  # [N, C] long: flat position whose hidden state predicts completion token t
    targets: torch.Tensor  # [N, C] long: completion tokens (padding past each end)
    lengths: torch.Tensor  # [N] long: completion lengths
    runs: int  # R
    prefix_len: int  # P
    suffix_len: int  # C
    real_tokens: int  # prompt tokens once per run + completion tokens: what the network actually processes

    def to(self, device) -> SharedPrefix:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return SharedPrefix(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in moved.items()})

    def completion_mask(self) -> torch.Tensor:
        """[N, C] bool: the real completion tokens."""
        return torch.arange(self.suffix_len)[None, :] < self.lengths[:, None].cpu()


def pack(prompts: list[list[int]], completions: list[list[int]], owner: list[int], pad_id: int) -> SharedPrefix:
    """The flat layout of `completions` (N), completion n answering `prompts[owner[n]]` (R prompts).

    Prompts must be non-empty; a completion may be empty (its row is all padding and predicts nothing).
    """
    R, N = len(prompts), len(completions)
    if R == 0 or N == 0 or len(owner) != N or min(map(len, prompts)) == 0:
        raise ValueError(f"pack: need non-empty prompts and one owner per completion (got {R} prompts, {N} completions, "
                         f"{len(owner)} owners)")
    P = max(map(len, prompts))
    C = max(max(map(len, completions)), 1)
    plen = torch.tensor([len(p) for p in prompts])  # [R]
    own = torch.tensor(owner)  # [N]
    clen = torch.tensor([len(c) for c in completions])  # [N]

    prefix = torch.full((R, P), pad_id, dtype=torch.long)
    for r, p in enumerate(prompts):
        prefix[r, : len(p)] = torch.tensor(p)
    suffix = torch.full((N, C), pad_id, dtype=torch.long)
    for n, c in enumerate(completions):
        suffix[n, : len(c)] = torch.tensor(c, dtype=torch.long)
    steps = torch.arange(C)
    positions = torch.cat([torch.arange(P).repeat(R), (plen[own][:, None] + steps).flatten()])

    prompt_keys = torch.arange(P)[None, None, :] < plen[own][:, None, None]  # [N, 1, P] -> every query
    causal = steps[None, :, None] >= steps[None, None, :]  # [1, C, C]
    key_mask = torch.cat([prompt_keys.expand(N, C, P), causal.expand(N, C, C)], dim=-1)[:, None]  # [N, 1, C, P+C]

    # token t of completion n is predicted by the prompt's last token (t = 0) or by its own token t-1
    after_prompt = (own * P + plen[own] - 1)[:, None]  # [N, 1]
    in_suffix = R * P + torch.arange(N)[:, None] * C + (steps[None, :] - 1).clamp(min=0)  # [N, C]
    predict_at = torch.where(steps[None, :] == 0, after_prompt, in_suffix)

    return SharedPrefix(
        input_ids=torch.cat([prefix.flatten(), suffix.flatten()])[None],
        position_ids=positions[None],
        owner=own,
        key_mask=key_mask,
        predict_at=predict_at,
        targets=suffix,
        lengths=clen,
        runs=R,
        prefix_len=P,
        suffix_len=C,
        real_tokens=int(plen.sum() + clen.sum()),
    )


def shared_prefix_attention(module, query, key, value, sp: SharedPrefix, dropout: float, scaling, sliding_window, **kwargs):
    """query [1, Hq, T, D], key/value [1, Hkv, T, D] (rotary applied) -> ([1, T, Hq, D], None)."""
    R, P, C = sp.runs, sp.prefix_len, sp.suffix_len
    N, cut = sp.owner.shape[0], sp.runs * sp.prefix_len
    if query.shape[0] != 1 or query.shape[2] != cut + N * C:
        raise ValueError(f"shared-prefix attention: got {tuple(query.shape)} for a layout of {R}x{P} + {N}x{C} tokens")
    if sliding_window is not None and sliding_window < P + C:
        raise NotImplementedError(f"shared-prefix attention does not implement sliding windows ({sliding_window} < {P + C} "
                                  "tokens); set algo.shared_prefix=false")
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("shared-prefix attention does not implement logit soft-capping; set algo.shared_prefix=false")
    gqa = query.shape[1] != key.shape[1]
    if gqa and query.device.type != "cpu":  # with a mask, SDPA's GQA falls back to the math kernel on CUDA
        rep = query.shape[1] // key.shape[1]
        key, value, gqa = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1), False

    def rows(x, start, stop, n, length):  # [1, H, T, D] -> [n, H, length, D]
        return x[0, :, start:stop].unflatten(1, (n, length)).transpose(0, 1)

    qp, kp, vp = (rows(x, 0, cut, R, P) for x in (query, key, value))
    qs, ks, vs = (rows(x, cut, None, N, C) for x in (query, key, value))
    out_p = F.scaled_dot_product_attention(qp, kp, vp, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa)
    keys = torch.cat([kp[sp.owner], ks], dim=2)  # [N, Hkv, P+C, D]: the prompt's keys, then the completion's
    values = torch.cat([vp[sp.owner], vs], dim=2)
    out_s = F.scaled_dot_product_attention(qs, keys, values, attn_mask=sp.key_mask, dropout_p=dropout, scale=scaling,
                                           enable_gqa=gqa)
    out = torch.cat([out_p.transpose(1, 2).flatten(0, 1), out_s.transpose(1, 2).flatten(0, 1)])  # [T, Hq, D]
    return out[None], None
