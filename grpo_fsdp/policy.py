"""The trainable language model: a transformers decoder whose head runs in chunks.

`Policy` re-registers the Hugging Face model's `model` (embeddings, decoder blocks, final norm)
and `lm_head` under the same names, so its state-dict keys are exactly the Hugging Face ones
(export needs no renaming). It exists for one reason: FSDP2's root module must own the forward
that reads `lm_head.weight`, and here that forward computes token log-probs in chunks
(`logprobs.chunked_token_logprobs`) instead of materialising full-vocabulary logits.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from grpo_fsdp.logprobs import chunked_token_logprobs


class Policy(nn.Module):
    def __init__(self, hf_model: PreTrainedModel, chunk_size: int):
        super().__init__()
        self.model = hf_model.model  # embed_tokens, layers, norm, rotary_emb
        self.lm_head = hf_model.lm_head
        self.config: PretrainedConfig = hf_model.config
        self.chunk_size = chunk_size
        self._hf_class = type(hf_model)

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, L]
        attention_mask: torch.Tensor,  # [B, L], 1 = real token (right padding)
        target_mask: torch.Tensor,  # [B, L-1] bool: score token t+1 given tokens <= t
        with_entropy: bool = False,
        temperature: float = 1.0,  # GRPO scores tokens under the sampler's logits / T
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probs (and entropies) of the target tokens -> ([B, L-1], [B, L-1] | None), 0 off-target.

        Only the masked positions go through the LM head, so prompt and padding cost nothing there.
        """
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        sel = target_mask.nonzero(as_tuple=True)  # (rows, cols) of predicted positions
        targets = input_ids[:, 1:][sel]  # [M]
        logp, ent = chunked_token_logprobs(
            hidden[:, :-1][sel], self.lm_head.weight, targets, self.chunk_size, getattr(self.lm_head, "bias", None), with_entropy,
            temperature,
        )
        dense = hidden.new_zeros(target_mask.shape, dtype=torch.float32).index_put(sel, logp)
        dense_ent = None if ent is None else hidden.new_zeros(target_mask.shape, dtype=torch.float32).index_put(sel, ent)
        return dense, dense_ent

