"""The rollout engine on vLLM, colocated in the trainer's process: `VLLMEngine` behind `base.RolloutEngine`.

One `vllm.LLM` per trainer rank (every rank builds its own: construction is collective), built from a
Hugging Face directory (config + tokenizer with load_format="dummy", or a full export), run in-process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`, so weight updates are plain tensor copies) and fed prompts as token
ids. Per GRPO step: `wake_up` -> `generate` -> `sleep` while the trainer computes -> `load_weights` with
the new FSDP2 parameters -> `check_sync` of a few fixed probe prompts against `policy_prompt_logprobs`.

Where this departs from vLLM's defaults, and why:

- Log-probs. The protocol wants log_softmax(logits / T) of the sampled token over the *untruncated*
  vocabulary (`base.Completion`). vLLM's `logprobs_mode` offers raw_logprobs (T = 1) or
  processed_logprobs (after temperature *and* top-k/top-p, renormalised over the kept tokens, which
  is log p - log(kept mass), measured here up to 2.3 nats off at top_k=5; see vllm
  `ModelConfig.logprobs_mode` and the bias analysed in huggingface/trl#6789). We build the LLM with processed_logprobs, exact whenever top_k = 0 and
  top_p = 1, and give the worker's `Sampler` a subclass (`_UntruncatedLogprobs`, installed through the
  public `collective_rpc`) that reports log_softmax(logits / T) taken before truncation, so top-k/top-p
  runs are exact too. Greedy reports log_softmax(logits), as the protocol says. Prompt log-probs (the
  probe) are T = 1 in every mode.
- Seeds: the request of the prompt with key k (`generate`'s keys, default its position) gets seed
  mix(mix(seed) + k) and vLLM gives its j-th sample that seed + j, so every sample has its own generator:
  completion j depends on (seed, k, j) and the weights only, not on the other prompts or how vLLM (or
  the trainer's ranks) batch them. The samples differ from `HFEngine`'s for the same seed (other noise).
- Greedy with n > 1 (vLLM refuses n > 1 at T = 0) sends each prompt n times.
- Weight sync (`load_weights`): DTensor shards are gathered one tensor at a time and handed to the
  worker's `reload_weights` in buckets of about `sync_bucket_mb`, cut only between decoder layers: vLLM
  fuses q/k/v and gate/up into one tensor, and a layer reloaded from half its parts would be half
  garbage. The prefix cache is reset afterwards (it holds keys/values of the old weights).
- LoRA (`lora_rank` > 0, issue 14 item 4): the engine is built with vLLM's LoRA support (`enable_lora`, one slot,
  `max_lora_rank` the smallest vLLM allows >= the rank), holds the base weights (the first sync, and again after
  a `sleep(2)`), and a sync sends the adapters alone (`load_adapters`): a PEFT directory per sync, served as a new
  `LoRARequest` (the previous one is removed, so no stale adapter or prefix-cache entry can answer). Megabytes
  per sync instead of the model; the probe scores through the adapter like generation does.
- Tied embeddings: on CPU vLLM prepacks the LM head at load. The trainer's `named_parameters()` yields
  a tied weight once, as `model.embed_tokens.weight`, and a reload that sees only that name leaves the
  packed head stale (DESIGN.md; reproduced in tests/test_rollout_vllm.py). After a sync that touched
  the embedding of a tied model we re-run the LM head's post-load processing; `check_sync` guards it.
- CPU only: chunked prefill is off (a seeded request whose prefill is split crashes vLLM's CPU build,
  see `__init__`), and sleep mode is unused (the CPU worker ignores it), so `sleep`/`wake_up` there only
  flip the asleep flag that makes `generate`/`load_weights` refuse to run, as the protocol asks.
- Process-wide effects of an in-process vLLM, worth knowing in a trainer: building it seeds the global
  RNGs (we restore torch's and Python's); its CPU worker binds OpenMP threads and replaces
  `torch.set_num_threads` with a stub for the rest of the process; and its shutdown destroys the
  default torch.distributed process group, hence `close()` goes last.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from grpo_fsdp.distributed import full_tensor
from grpo_fsdp.rollout.base import Completion, GenerationStats, SamplingConfig, check_prompt_lengths
from grpo_fsdp.rollout.probe import WeightSyncError, compare_logprobs, policy_prompt_logprobs

_WRAPPER_SEGMENTS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")
_LAYER = re.compile(r"^(model\.layers\.\d+)\.")  # weights that vLLM may fuse share this prefix
_RELOAD_LOGGERS = tuple(f"vllm.model_executor.model_loader.reload.{m}" for m in ("inplace", "layerwise"))
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's LoRAConfig.max_lora_rank accepts


def lora_slot_rank(rank: int) -> int | None:
    """vLLM's max_lora_rank for adapters of `rank`: the smallest allowed value >= rank; None above 512."""
    return next((r for r in MAX_LORA_RANKS if r >= rank), None)


def _mix_seed(seed: int) -> int:
    """SplitMix64 finaliser to 62 bits: nearby inputs (step seeds, prompt keys) give far-apart request
    seeds, so the n consecutive seeds vLLM derives for a request's samples never meet another's."""
    z = (seed + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) >> 2


def _install_untruncated_logprobs(worker) -> bool:
    """collective_rpc target: make the worker's sampler report untruncated log_softmax(logits / T).

    Swaps the class of the existing instance (the rejection sampler keeps a reference to it) for a
    subclass overriding one method. False when the runner has no V1 `Sampler`: vLLM's Model Runner V2
    (the GPU default where Triton is installed; CPU builds use V1) has its own sampler, whose
    processed_logprobs are truncated too; there only top_k = 0, top_p = 1 runs are exact and
    `generate` refuses the others.
    """
    from vllm.v1.sample.sampler import Sampler

    sampler = getattr(getattr(worker, "model_runner", None), "sampler", None)
    if not isinstance(sampler, Sampler):
        return False
    if not isinstance(sampler, _UntruncatedLogprobs):
        sampler.__class__ = _make_untruncated_class(type(sampler))
        sampler.topk_topp_sampler.logprobs_mode = "raw_logprobs"  # its truncated log_softmax is unused now
    return True


def _make_untruncated_class(base: type) -> type:
    def sample(self, logits, sampling_metadata, logprobs_mode_override=None):
        logprobs = None
        if sampling_metadata.max_num_logprobs is not None:  # before base.sample: it scales logits in place
            temp = sampling_metadata.temperature  # [B], None when the whole batch is greedy
            scaled = logits if temp is None else logits / torch.where(temp < 1e-5, 1.0, temp).unsqueeze(1)
            logprobs = scaled.log_softmax(dim=-1, dtype=torch.float32)  # [B, V], untruncated
        sampled, processed = base.sample(self, logits, sampling_metadata, logprobs_mode_override)
        return sampled, (processed if logprobs is None else logprobs)

    return type("UntruncatedLogprobs" + base.__name__, (base, _UntruncatedLogprobs), {"sample": sample})


class _UntruncatedLogprobs:
    """Marker for an already patched sampler."""


def _refresh_tied_lm_head(worker) -> None:
    """collective_rpc target: redo the LM head's post-load processing (the CPU prepack) after its
    shared weight, `embed_tokens`, was reloaded."""
    model = worker.model_runner.get_model()
    head = getattr(model, "lm_head", None)
    method = getattr(head, "quant_method", None)
    if method is not None:
        method.process_weights_after_loading(head)


class VLLMEngine:
    """`RolloutEngine` on a colocated `vllm.LLM`; see the module docstring.

    model_dir: a Hugging Face directory: config.json and tokenizer, plus safetensors unless
        load_format="dummy" (random weights; then `generate` refuses to run before a full `load_weights`,
        which spares the trainer exporting the whole model just to start the engine).
    eos_token_ids: the stop token(s) (`hf.stop_token_ids(tokenizer, config)`).
    gpu_memory_utilization: vLLM's share of the accelerator (weights + KV cache); on CPU vLLM reads it
        as a share of host memory, so prefer `kv_cache_memory_bytes` there.
    enable_sleep_mode: None = on CUDA only (the CPU worker ignores sleep).
    sync_bucket_mb: weights per `reload_weights` call during a sync (whole decoder layers).
    lora_rank: > 0 serves LoRA adapters of that rank (at most 512) on the base weights (`load_adapters`).
    llm_kwargs: passed to `vllm.LLM` as they are (e.g. enforce_eager, max_num_seqs).
    """

    def __init__(
        self,
        model_dir: str | Path,
        eos_token_ids: int | Sequence[int],
        *,
        dtype: torch.dtype | str = torch.float32,
        device: str = "cpu",
        gpu_memory_utilization: float = 0.5,
        kv_cache_memory_bytes: int | None = None,
        max_model_len: int = 2048,
        seed: int = 0,
        enable_sleep_mode: bool | None = None,
        enable_prefix_caching: bool = True,
        sync_bucket_mb: float = 256,
        load_format: str = "auto",
        lora_rank: int = 0,
        **llm_kwargs,
    ):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # read when the LLM is built
        from vllm import LLM

        eos = [eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids)
        if not eos:
            raise ValueError("VLLMEngine: eos_token_ids is empty; generation could never stop early")
        self.eos_token_ids = eos
        self.dtype = _DTYPE_NAMES[dtype] if isinstance(dtype, torch.dtype) else dtype
        self.sleep_enabled = device.startswith("cuda") if enable_sleep_mode is None else enable_sleep_mode
        self.sync_bucket_bytes = int(sync_bucket_mb * 2**20)
        self.seed = seed
        # On CPU a seeded request whose prefill is split across steps crashes vLLM ("CPU Generator does
        # not use offset": the discarded partial-prefill sample is rewound by a CUDA-only generator call,
        # see vllm-project/vllm#10097), so prompts are prefilled whole there.
        cpu_defaults = {} if device.startswith("cuda") else {"enable_chunked_prefill": False}
        if lora_rank > 0:
            slot = lora_slot_rank(lora_rank)
            if slot is None:
                raise ValueError(f"VLLMEngine: lora_rank={lora_rank} is above vLLM's largest ({MAX_LORA_RANKS[-1]})")
            llm_kwargs = {"enable_lora": True, "max_loras": 1, "max_lora_rank": slot, **llm_kwargs}
        rng = (random.getstate(), torch.get_rng_state())  # in-process, vLLM seeds the global generators
        self.llm = LLM(
            model=str(model_dir), dtype=self.dtype, seed=seed, max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization, kv_cache_memory_bytes=kv_cache_memory_bytes,
            enable_sleep_mode=self.sleep_enabled, enable_prefix_caching=enable_prefix_caching,
            load_format=load_format, logprobs_mode="processed_logprobs", **{**cpu_defaults, **llm_kwargs},
        )
        random.setstate(rng[0])
        torch.set_rng_state(rng[1])
        hf_conf = self.llm.llm_engine.model_config.hf_config
        self.vocab_size = hf_conf.vocab_size
        self.max_model_len: int | None = self.llm.llm_engine.model_config.max_model_len
        self.tied = bool(getattr(hf_conf, "tie_word_embeddings", False))
        self.exact_truncated_logprobs = all(self.llm.collective_rpc(_install_untruncated_logprobs))
        self._asleep = 0
        self._reload_all = load_format == "dummy"  # also after sleep(2): the next load_weights brings every weight
        self.serves_adapters = lora_rank > 0
        self.lora_request = None  # the adapter of the last sync (vllm.lora.request.LoRARequest)
        self._adapter_root = Path(tempfile.mkdtemp(prefix="grpo-lora-")) if self.serves_adapters else None
        self.last_sync_seconds = 0.0
        self.last_sync_bytes = 0
        self.last_stats = GenerationStats()
        self.total_stats = GenerationStats()

    # -- generation ----------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig, keys: list[int] | None = None) -> list[Completion]:
        from vllm import SamplingParams

        self._require_ready("generate")
        keys = list(range(len(prompts))) if keys is None else list(keys)
        if len(keys) != len(prompts):
            raise ValueError(f"VLLMEngine.generate: {len(keys)} keys for {len(prompts)} prompts")
        for i, p in enumerate(prompts):
            if not p or min(p) < 0 or max(p) >= self.vocab_size:
                raise ValueError(f"VLLMEngine.generate: prompt {i} is empty or has token ids outside "
                                 f"[0, {self.vocab_size})")
        check_prompt_lengths("VLLMEngine", prompts, self.max_model_len)  # ours, not vLLM's VLLMValidationError
        truncated = sampling.top_k > 0 or sampling.top_p < 1.0
        if truncated and not sampling.greedy and not self.exact_truncated_logprobs:
            raise RuntimeError("VLLMEngine.generate: this vLLM model runner reports only truncated log-probs under "
                               "top_k/top_p; set top_k=0 top_p=1.0, or VLLM_USE_V2_MODEL_RUNNER=0 (GPU), "
                               "or use rollout.engine=hf")
        common = {"max_tokens": sampling.max_new_tokens, "logprobs": 0,  # logprobs=0: the sampled token's only
                  "stop_token_ids": [] if sampling.ignore_eos else self.eos_token_ids, "ignore_eos": sampling.ignore_eos,
                  "detokenize": False}
        if sampling.greedy:  # vLLM allows n == 1 only at T = 0: repeat each prompt instead
            requests = [p for p in prompts for _ in range(sampling.n)]
            params = SamplingParams(n=1, temperature=0.0, **common)
        else:
            requests = prompts
            base = None if sampling.seed is None else _mix_seed(sampling.seed)
            params = [SamplingParams(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                                     top_k=sampling.top_k or -1, seed=None if base is None else _mix_seed(base + key),
                                     **common) for key in keys]
        start = time.perf_counter()
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in requests], params, use_tqdm=False,
                                    lora_request=self.lora_request)
        seconds = time.perf_counter() - start

        completions = []
        for r, out in enumerate(outputs):
            owner = r // sampling.n if sampling.greedy else r
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                if c.finish_reason not in ("stop", "length"):
                    raise RuntimeError(f"VLLMEngine.generate: request {r} ended with finish_reason={c.finish_reason!r}")
                if c.finish_reason == "stop" and (not ids or ids[-1] not in self.eos_token_ids):
                    raise RuntimeError(f"VLLMEngine.generate: request {r} stopped without a stop token "
                                       f"(stop_reason={c.stop_reason!r})")
                logprobs = [lp[t].logprob for lp, t in zip(c.logprobs, ids)]
                completions.append(Completion(owner, ids, logprobs, c.finish_reason))
        stats = GenerationStats(calls=1, sequences=len(completions), seconds=seconds,
                                prompt_tokens=sum(len(prompts[c.prompt_index]) for c in completions),
                                generated_tokens=sum(len(c.token_ids) for c in completions))
        self.last_stats = stats
        self.total_stats.add(stats)
        return completions

    def prompt_logprobs(self, prompts: list[list[int]]) -> list[torch.Tensor]:
        """log_softmax(logits)[token t] of every prompt token after the first, [len(p) - 1] per prompt (T = 1)."""
        from vllm import SamplingParams

        self._require_ready("prompt_logprobs")
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False,
                                    lora_request=self.lora_request)
        # prompt_logprobs[0] is None (nothing predicts the first token)
        return [torch.tensor([lp[t].logprob for lp, t in zip(o.prompt_logprobs[1:], p[1:])])
                for o, p in zip(outputs, prompts)]

    def check_sync(self, trainer_logprobs: Sequence[torch.Tensor], prompts: list[list[int]], tolerance: float) -> float:
        """Compare the engine's prompt log-probs of `prompts` with the trainer's (`probe.policy_prompt_logprobs`);
        return the largest absolute difference, or raise `probe.WeightSyncError`."""
        return compare_logprobs(self.prompt_logprobs(prompts), trainer_logprobs, tolerance)

    # -- weights and memory ------------------------------------------------------------------

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        self._require_ready("load_weights", weights_needed=False)
        start = time.perf_counter()
        bucket: list[tuple[str, torch.Tensor]] = []
        size, total, group, touched_embedding = 0, 0, None, False
        quiet = [logging.getLogger(n) for n in _RELOAD_LOGGERS]  # each partial reload warns of every weight it lacks
        levels = [q.level for q in quiet]
        try:
            for q in quiet:
                q.setLevel(logging.ERROR)
            for name, tensor in named_tensors:
                for seg in _WRAPPER_SEGMENTS:
                    name = name.replace(seg, "")
                tensor = full_tensor(tensor)  # a DTensor shard is gathered (collective on every rank)
                tensor = tensor.detach().to(getattr(torch, self.dtype))  # the bucket holds engine-dtype copies
                m = _LAYER.match(name)
                key = m.group(1) if m else name
                if key != group and size >= self.sync_bucket_bytes:  # cut only between layers
                    self._reload(bucket)
                    bucket, size = [], 0
                group = key
                touched_embedding |= name == "model.embed_tokens.weight"
                bucket.append((name, tensor))
                size += tensor.numel() * tensor.element_size()
                total += tensor.numel() * tensor.element_size()
            if bucket:
                self._reload(bucket)
        finally:
            for q, level in zip(quiet, levels):
                q.setLevel(level)
        if self.tied and touched_embedding:
            self.llm.collective_rpc(_refresh_tied_lm_head)
        self.llm.reset_prefix_cache()  # cached keys/values were computed with the old weights
        self._reload_all = False
        self.last_sync_seconds = time.perf_counter() - start
        self.last_sync_bytes = total

    @property
    def needs_base_weights(self) -> bool:
        """True until a full `load_weights` (dummy start) and again after `sleep(2)` discarded the weights."""
        return self._reload_all

    def load_adapters(self, adapters: dict[str, torch.Tensor], adapter_config: dict) -> None:
        """Serve these LoRA adapters (full tensors under their Hugging Face module names, `lora.adapter_state_dict`)
        from now on: written as a PEFT directory and activated as a new `LoRARequest`; the previous one is removed."""
        from vllm.lora.request import LoRARequest

        from grpo_fsdp.export import write_adapter_dir

        self._require_ready("load_adapters")
        if not self.serves_adapters:
            raise RuntimeError("VLLMEngine.load_adapters: the engine was built without LoRA (lora_rank=0)")
        start = time.perf_counter()
        previous = self.lora_request
        serial = 1 if previous is None else previous.lora_int_id + 1
        path = write_adapter_dir(adapters, adapter_config, self._adapter_root / f"sync{serial}")
        self.lora_request = LoRARequest(f"sync{serial}", serial, str(path))
        if previous is not None:
            self.llm.llm_engine.remove_lora(previous.lora_int_id)
            shutil.rmtree(previous.lora_path, ignore_errors=True)
        self.llm.reset_prefix_cache()
        self.last_sync_seconds = time.perf_counter() - start
        self.last_sync_bytes = sum(t.numel() * 4 for t in adapters.values())  # written in fp32

    def _reload(self, bucket: list[tuple[str, torch.Tensor]]) -> None:
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": bucket, "is_checkpoint_format": True})

    def sleep(self, level: int = 1) -> None:
        if level not in (1, 2):
            raise ValueError(f"VLLMEngine.sleep: level={level} must be 1 (offload) or 2 (discard)")
        if self._asleep >= level:
            return
        if self.sleep_enabled:
            self.llm.reset_prefix_cache()
            self.llm.sleep(level=level)
        # else: the CPU worker has no sleep mode (vLLM logs and ignores it); weights simply stay put
        self._asleep = level
        self._reload_all |= level == 2

    def wake_up(self) -> None:
        if not self._asleep:
            return
        if self.sleep_enabled:
            self.llm.wake_up()
        self._asleep = 0

    def close(self) -> None:
        """Shut vLLM down. Call it last: vLLM's teardown also destroys torch.distributed's default
        process group (the trainer's), and left to the interpreter's exit it fails on a group the
        trainer has already destroyed."""
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None
        if self._adapter_root is not None:
            shutil.rmtree(self._adapter_root, ignore_errors=True)

    def _require_ready(self, what: str, weights_needed: bool = True) -> None:
        if self.llm is None:
            raise RuntimeError(f"VLLMEngine.{what}: the engine is closed")
        if self._asleep:
            raise RuntimeError(f"VLLMEngine.{what}: the engine is asleep (level {self._asleep}); call wake_up() first")
        if weights_needed and self._reload_all:
            raise RuntimeError(f"VLLMEngine.{what}: the engine holds no real weights (load_format=dummy, or "
                               "sleep(level=2)); call load_weights with the full state dict first")


__all__ = ["MAX_LORA_RANKS", "VLLMEngine", "WeightSyncError", "lora_slot_rank", "policy_prompt_logprobs"]
