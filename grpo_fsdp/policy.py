"""The trainable language model: a transformers decoder whose head runs in chunks.

`Policy` re-registers the Hugging Face model's `model` (embeddings, decoder blocks, final norm)
and `lm_head` under the same names, so its state-dict keys are exactly the Hugging Face ones
(export needs no renaming). It exists for one reason: FSDP2's root module must own the forward
that reads `lm_head.weight`, and here that forward computes token log-probs in chunks
(`logprobs.chunked_token_logprobs`) instead of materialising full-vocabulary logits.

It takes either padded rows (input_ids + attention_mask, target_mask [B, L-1]) or one GRPO micro-
batch in the shared-prefix layout (`shared_prefix.SharedPrefix`, target_mask [N, C]); the latter
needs the model built with the `grpo_fsdp+<base>` attention (`attention.attention_name`). Its kernel is
`grpo_attention` (hardware.grpo_attention: sdpa, flex, fa2_varlen, or auto, chosen per micro-batch by
`grpo_attention.choose`); fa2_varlen re-lays the micro-batch out padding-free (`varlen.py`) first.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from grpo_fsdp.attention import PREFIX
from grpo_fsdp.grpo_attention import choose
from grpo_fsdp.logprobs import chunked_token_logprobs, fused_token_loss
from grpo_fsdp.shared_prefix import SharedPrefix, mask_placeholder
from grpo_fsdp.varlen import varlen_layout


def prefix_block_mask(sp: SharedPrefix):
    from grpo_fsdp.flex_prefix import prefix_block_mask as build  # FlexAttention loads only when used

    return build(sp)


class Policy(nn.Module):
    def __init__(self, hf_model: PreTrainedModel, chunk_size: int, grpo_attention: str = "sdpa"):
        super().__init__()
        self.grpo_attention = grpo_attention  # hardware.grpo_attention: the kernel of shared-prefix batches (grpo_attention.py)
        self.model = hf_model.model  # embed_tokens, layers, norm, rotary_emb
        self.lm_head = hf_model.lm_head
        self.config: PretrainedConfig = hf_model.config
        self.chunk_size = chunk_size
        # the GRPO recipe trains this policy through the fused head (train.lm_head): its no-grad passes (pi_old, the
        # reference) then use the same arithmetic, so their log-probs equal the trained ones bit for bit
        self.fused_head = False
        self._hf_class = type(hf_model)

    @property
    def shared_prefix_ok(self) -> bool:
        """Whether this model's attention takes the shared-prefix layout."""
        return str(self.config._attn_implementation).startswith(PREFIX)

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    def forward(
        self,
        input_ids: torch.Tensor | None = None,  # [B, L]
        attention_mask: torch.Tensor | None = None,  # [B, L], 1 = real token (right padding)
        target_mask: torch.Tensor | None = None,  # [B, L-1] bool: score token t+1 given tokens <= t; [N, C] with shared_prefix
        with_entropy: bool = False,
        temperature: float = 1.0,  # GRPO scores tokens under the sampler's logits / T
        shared_prefix: SharedPrefix | None = None,  # instead of input_ids/attention_mask: completions sharing prompts
        token_loss=None,  # token_grad(logp [k], lo, hi) of a loss separable per token: the fused head (below)
    ) -> tuple[torch.Tensor, ...]:
        """Log-probs (and entropies) of the target tokens -> (dense, dense | None) shaped like target_mask, 0 off-target.

        Only the masked positions go through the LM head, so prompt and padding cost nothing there. With
        `token_loss` (algorithms/token_loss.py: tokens lo:hi in target_mask.nonzero() order) the head is
        `logprobs.fused_token_loss`, whose loss's gradient is applied in forward: -> (dense logp, dense entropy |
        None, loss), the log-probs and entropies detached, the loss carrying the gradient.
        """
        if shared_prefix is not None:
            if not self.shared_prefix_ok:
                raise RuntimeError(f"Policy: attention {self.config._attn_implementation!r} does not take the shared-prefix "
                                   "layout; build the policy with attention.attention_name(...) or set algo.shared_prefix=false")
            sp, placeholder = shared_prefix, mask_placeholder(shared_prefix.input_ids.device)
            kernel = choose(self.grpo_attention, sp, sp.input_ids.device.type)
            if kernel == "fa2_varlen":  # the same completions, padding-free, each behind its own prompt copy
                row = varlen_layout(sp)
                ids, positions, predict_at, extra = row.input_ids, row.position_ids, row.predict_at, {"varlen": row}
            else:
                ids, positions, predict_at, extra = sp.input_ids, sp.position_ids, sp.predict_at, {"shared_prefix": sp}
                if kernel == "flex":
                    extra["flex_mask"] = prefix_block_mask(sp)  # once per micro-batch, shared by every layer
            hidden = self.model(input_ids=ids, position_ids=positions, use_cache=False, attention_mask=placeholder,
                                **extra).last_hidden_state[0]  # [T, H]
            sel = target_mask.nonzero(as_tuple=True)  # (completion, token) of each scored token
            hidden, targets = hidden.index_select(0, predict_at[sel]), sp.targets[sel]  # [M, H], [M] (see shared_prefix)
        else:
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
            sel = target_mask.nonzero(as_tuple=True)  # (rows, cols) of predicted positions
            flat = sel[0] * hidden.shape[1] + sel[1]  # position (row, col) of hidden[:, :-1], in hidden flattened
            hidden, targets = hidden.flatten(0, 1).index_select(0, flat), input_ids[:, 1:][sel]  # [M, H], [M]
        bias = getattr(self.lm_head, "bias", None)
        if token_loss is not None:
            loss, logp, ent = fused_token_loss(hidden, self.lm_head.weight, targets, self.chunk_size, token_loss, bias,
                                               temperature, with_entropy)
        else:
            logp, ent = chunked_token_logprobs(hidden, self.lm_head.weight, targets, self.chunk_size, bias, with_entropy,
                                               temperature, rows=self.fused_head)
        dense = hidden.new_zeros(target_mask.shape, dtype=torch.float32).index_put(sel, logp)
        dense_ent = None if ent is None else hidden.new_zeros(target_mask.shape, dtype=torch.float32).index_put(sel, ent)
        return (dense, dense_ent) if token_loss is None else (dense, dense_ent, loss)
