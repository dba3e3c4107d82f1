"""The transformers engine on the trainer's own modules (issue 14 item 4; issue 13): no copy of the weights.

`SharedHFEngine` decodes exactly as `hf.HFEngine` (one prefill per prompt, the preallocated KV cache, the
counter-based sampler) but calls the policy itself: its LoRA layers as they are (the NF4 base dequantized per
matmul, the adapters unmerged: x W^T + (alpha/r) B A x), embeddings, norms and LM head. So the engine owns no
parameter and there is no weight sync: what it samples from is, at every moment, the policy being trained.
The copy engine it replaces held W + (alpha/r) B A in `param_dtype`, gathered into it at every sync
(`lora.merge_adapters`), as large as the model; the shared one costs nothing while the trainer works.

Every `generate` / `prompt_logprobs` runs inside `generating(policy)`:

- eval mode (LoRA dropout off), no autograd; each module's own train/eval flag is restored after, so a
  policy in train mode has its dropout back on.
- FSDP2 (`parallelize`): every FSDP module of the policy is unsharded once, with reshard-after-forward off, so
  a decode step runs no all-gather; after the call each is resharded and its flag restored. The unshard is a
  collective: every rank must enter together. The recipe calls `generate` on every rank for its own prompts;
  the evaluator, which generates on one rank, runs inside `held()`, entered on every rank (recipes/grpo.py).
  Cost: the model gathered in the compute dtype for the length of the call (on one rank FSDP2 keeps the
  unsharded parameters apart from the shards, so that is a second copy of the non-NF4 weights), freed after.
  A plain module (one fp32 process, `parallelize.shards`) needs none of this.
- QLoRA: each NF4 base weight is dequantized at its first use in the call and kept until it ends
  (`lora.dense_nf4_bases`; the same numbers as dequantizing per matmul), so a decode step stops dequantizing the
  whole model, when the dense weights take at most `DENSE_NF4_SHARE` of the free memory (host RAM on CPU, the
  device's on CUDA), judged once when the engine is built; the log line at start-up says which.
- blocks compiled by `hardware.compile` run eagerly (`torch.compiler.set_stance`): their graphs were traced for
  the training forward, and one-token decode steps with a growing cache would recompile them.

Two details lean on FSDP2's internals (torch 2.13), each commented where used: the root's lazy init runs before
the first generate (the decode calls the decoder blocks without the root's own forward, and FSDP2 takes the first
module to run forward as its root), and the reshard-after-forward flag of each FSDP module is read to restore it.

Who shares (`factory.engine_from_config`): LoRA policies, and full fine-tunes that FSDP2 does not wrap (one fp32
process, `parallelize.shards`), whose copy would hold the same fp32 numbers as the policy: a model's size of memory
and a copy of every weight per step for nothing (81 MB at Qwen2.5's vocabulary on the tiny model, issue 13; 2 GB for
a 0.5B model). A sharded full fine-tune keeps its copy engine, whose `param_dtype` copy is a deliberate stand-in for
vLLM's precision and whose weights the probe checks after each update; sharing there would also make an fp32-master
run generate from its fp32 shards, gathered.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from types import SimpleNamespace

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from grpo_fsdp.estimate import DENSE_NF4_SHARE  # the plan counts the dense bases by the same rule
from grpo_fsdp.lora import dense_nf4_bases, dense_nf4_bytes
from grpo_fsdp.rollout.base import Completion, SamplingConfig
from grpo_fsdp.rollout.hf import HFEngine


class PolicyLM(nn.Module):
    """The policy called the way `HFEngine` calls a transformers causal LM: `model(input_ids, ...).logits`.

    The policy is kept out of this module's children (stored in `__dict__`, not registered), so the engine owns
    no parameter or buffer: `parameters()` and `state_dict()` are empty."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.__dict__["policy"] = policy  # not a submodule: nothing of it belongs to the engine
        self.config = policy.config

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                logits_to_keep: int = 0):
        out = self.policy.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                past_key_values=past_key_values, use_cache=use_cache)
        hidden = out.last_hidden_state  # [B, L, H]
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return SimpleNamespace(logits=self.policy.lm_head(hidden))  # [B, L or logits_to_keep, V]


def _reshards_after_forward(module: FSDPModule) -> bool:
    # FSDP2 has a setter for this flag but no getter: each parameter group's post-forward mesh is None when it
    # keeps its parameters after forward (torch 2.13, FSDPParamGroup._reshard_after_forward)
    return any(g.post_forward_mesh_info is not None for g in module._get_fsdp_state()._fsdp_param_groups)


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """`module` in eval mode (dropout off) inside the block; each submodule's own train/eval flag restored after."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        yield module.eval()
    finally:
        for m, mode in modes:
            m.training = mode


@contextmanager
def generating(policy: nn.Module) -> Iterator[None]:
    """`policy` ready to decode (module docstring): eval mode, no grad, FSDP2 modules unsharded for the whole
    block (a collective: every rank enters), compiled blocks eager; everything restored on exit."""
    fsdp = [m for m in policy.modules() if isinstance(m, FSDPModule)]
    flags: list[tuple[FSDPModule, bool]] = []
    with eval_mode(policy):
        try:
            with torch.no_grad():  # not inference_mode: the gathered parameters are FSDP2's, reused by training
                if isinstance(policy, FSDPModule):  # FSDP2 takes the first module to run forward as its root:
                    policy._get_fsdp_state()._lazy_init()  # the decode runs the blocks alone, so settle the root first
                for m in fsdp:
                    flags.append((m, _reshards_after_forward(m)))
                    m.set_reshard_after_forward(False, recurse=False)
                for m in fsdp:
                    m.unshard()
            with torch.compiler.set_stance("force_eager"):
                yield
        finally:
            for m, flag in flags:
                m.set_reshard_after_forward(flag, recurse=False)
                m.reshard()


def _free_bytes(device: torch.device) -> int:
    """Free memory where the weights live: the device's on CUDA, the host's available RAM otherwise."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


class SharedHFEngine(HFEngine):
    """`RolloutEngine` on the trainer's own policy (`policy.Policy`, LoRA layers if any); see the module docstring.

    There is nothing to sync: `load_weights` refuses (the recipe's `sync_weights` skips it), `sleep` and `wake_up`
    do nothing (the weights are the trainer's). The first-sync probe still compares this engine's decoding
    forward with the trainer's log-prob forward on the same modules.
    """

    probe_every_sync = False
    shares_policy = True  # recipes/grpo.py sync_weights: no weights to send

    def __init__(self, policy: nn.Module, eos_token_ids: int | Sequence[int], pad_token_id: int | None = None,
                 device: str | torch.device = "cpu", max_batch_size: int | None = None):
        self.policy = policy
        self._depth = 0  # nested held() / generate calls: only the outermost gathers
        dtype = policy.model.get_input_embeddings().weight.dtype  # LoRA: the base is stored in the compute dtype
        super().__init__(policy.config, eos_token_ids, pad_token_id, device, dtype, max_batch_size)
        # QLoRA: dequantize each NF4 base once per rollout rather than at every decode step, when that fits
        self.dense_nf4_bytes = dense_nf4_bytes(policy, dtype)
        free = _free_bytes(self.device)
        self.dense_nf4 = 0 < self.dense_nf4_bytes <= DENSE_NF4_SHARE * free
        if self.dense_nf4_bytes:
            mb = self.dense_nf4_bytes / 2**20
            self.dense_nf4_line = (f"NF4 bases dequantized once per rollout, {mb:,.0f} MB while it runs" if self.dense_nf4
                                   else f"NF4 bases dequantized at every decode step: {mb:,.0f} MB dense would exceed "
                                        f"{DENSE_NF4_SHARE:.0%} of the {free / 2**20:,.0f} MB free")
        else:
            self.dense_nf4_line = ""

    def _build_model(self, config, dtype) -> nn.Module:
        return PolicyLM(self.policy)

    @contextmanager
    def held(self) -> Iterator[None]:
        """Keep the policy gathered for generation across several calls (the evaluator's). Collective under FSDP2:
        enter it on every rank, also on those that then generate nothing."""
        if self._depth == 0:
            with generating(self.policy), (dense_nf4_bases(self.policy) if self.dense_nf4 else nullcontext()):
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
        else:
            yield

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig, keys: list[int] | None = None) -> list[Completion]:
        with self.held():
            return super().generate(prompts, sampling, keys)

    def prompt_logprobs(self, prompts: list[list[int]], max_logits_mb: float = 256) -> list[torch.Tensor]:
        with self.held():
            return super().prompt_logprobs(prompts, max_logits_mb)

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        raise RuntimeError("SharedHFEngine.load_weights: the engine generates with the trainer's own modules; "
                           "there are no weights to load (recipes/grpo.py sync_weights skips it)")

    def sleep(self, level: int = 1) -> None:
        if level not in (1, 2):
            raise ValueError(f"SharedHFEngine.sleep: level={level} must be 1 (offload) or 2 (discard)")

    def wake_up(self) -> None:
        """Nothing to bring back: the weights are the trainer's."""


@contextmanager
def held_for_generation(engine, active: bool = True) -> Iterator[None]:
    """`engine.held()` when `active` and the engine shares the policy, else nothing: the recipe enters it on every
    rank around the evaluator, which generates on one rank only."""
    if active and isinstance(engine, SharedHFEngine):
        with engine.held():
            yield
    else:
        yield


__all__ = ["PolicyLM", "SharedHFEngine", "eval_mode", "generating", "held_for_generation"]
