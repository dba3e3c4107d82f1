"""The rollout engine on plain transformers: batched sampling with a KV cache, on any device.

`HFEngine` holds its own unsharded copy of the network (built from the config, weights pushed in
by `load_weights`; under LoRA the trainer uses `shared.SharedHFEngine`, the same decoding on its own modules,
no copy) and decodes all prompts x G together, left-padded, one token per step:

    prefill   each distinct prompt once, then the cache rows are copied G times (GRPO samples G
              completions of the same prompt; prefilling them G times would waste G-1 passes),
              into a cache preallocated to prompt + max_new_tokens (`kv_cache.py`: no per-step copies)
    decode    feed the last token of every live row with its own position id (left padding shifts
              each row's positions), sample with our own sampler (`sampler.py`), record the log-prob;
              the step is `decode_step.LeanDecodeStep` (the same function in fewer ops) where the model
              allows, transformers' forward otherwise (`lean_decode_reason` says why)
    finish    a row that emits a stop token is done; once a quarter of the batch is done the done
              rows are dropped from the batch and the cache (one gather of the filled positions)

The sampler is ours rather than `model.generate` because the engine must report the log-prob of
each sampled token under the temperature-scaled, *untruncated* distribution (see
`base.Completion`), and `generate`'s processors hand back only the truncated scores.

`static_cache=True` preallocates a `StaticCache` (no per-step concatenation, fixed shapes) and
`compile=True` additionally runs the one-token decode step through `torch.compile`. Static mode
prefills every row (a static cache cannot be regrown to G rows) and never compacts the batch.

Sampling noise is counter-based (`noise.py`): completion j of a prompt depends only on the seed,
the prompt's key and j, so the batch layout (other prompts, chunking, ranks, compaction) does not
change it. The same holds in the vLLM engine, which seeds each request.

Departures from vLLM: no paged attention or continuous batching, so a batch runs until its
longest completion ends (compaction only reduces the work of finished rows).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, StaticCache

from grpo_fsdp.attention import with_our_attention
from grpo_fsdp.distributed import full_tensor
from grpo_fsdp.rollout.base import Completion, GenerationStats, SamplingConfig, check_prompt_lengths
from grpo_fsdp.rollout.decode_step import SDPA_NAMES, LeanDecodeStep, lean_decode_reason
from grpo_fsdp.rollout.kv_cache import preallocated_cache
from grpo_fsdp.rollout.noise import stream_ids
from grpo_fsdp.rollout.sampler import Sampler

# Wrapper segments that torch.compile / activation checkpointing insert into parameter names.
_WRAPPER_SEGMENTS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


def stop_token_ids(tokenizer, config: PretrainedConfig | None = None) -> list[int]:
    """The tokenizer's EOS plus the model config's eos id(s) (Qwen2.5-Instruct: <|im_end|> and <|endoftext|>)."""
    ids = [tokenizer.eos_token_id]
    conf_eos = getattr(config, "eos_token_id", None) if config is not None else None
    ids += conf_eos if isinstance(conf_eos, (list, tuple)) else [conf_eos]
    return list(dict.fromkeys(i for i in ids if i is not None))


class HFEngine:
    """`RolloutEngine` on a transformers causal LM; see the module docstring.

    config: the transformers config (e.g. `models.hf_config(...)`); the network is built from it
        with random weights, so real weights must arrive through `load_weights` before use.
    eos_token_ids: the stop token(s) (`stop_token_ids(tokenizer, config)`).
    pad_token_id: fed to finished rows and used for left padding (never attended); default: first eos.
    max_batch_size: at most this many sequences decode together (None: all prompts x n at once).
    lean_decode: decode steps by `decode_step.LeanDecodeStep` where the model allows (`lean_decode_reason` says
        why not otherwise); False keeps transformers' forward (tests compare the two).
    """

    # `load_weights` copies each tensor by name into this engine's own parameters, checking names and
    # shapes, and `generate` refuses weights discarded by sleep(2): nothing a later probe could catch that
    # the first one (recipes/grpo.py) did not. vLLM's loaders, sleep and wake are probed at every sync.
    probe_every_sync = False

    def __init__(
        self,
        config: PretrainedConfig,
        eos_token_ids: int | Sequence[int],
        pad_token_id: int | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_batch_size: int | None = None,
        static_cache: bool = False,
        compile: bool = False,
        lean_decode: bool = True,
    ):
        eos = [eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids)
        if not eos:
            raise ValueError("HFEngine: eos_token_ids is empty; generation could never stop early")
        if compile and not static_cache:
            raise ValueError("HFEngine: compile=True needs static_cache=True (a growing cache recompiles every step)")
        self.config = config
        self.max_model_len: int | None = getattr(config, "max_position_embeddings", None)  # positions it was built for
        self.device = torch.device(device)
        self.dtype = dtype
        self.eos_token_ids = eos
        self.pad_token_id = eos[0] if pad_token_id is None else pad_token_id
        self.max_batch_size = max_batch_size
        self.static_cache = static_cache
        self.model = self._build_model(config, dtype)
        # name -> Parameter (tied names map to the same object) or persistent buffer
        self._targets: dict[str, torch.Tensor] = self.model.state_dict(keep_vars=True)
        self._params = {id(p): p for p in self.model.parameters()}  # unique parameters
        self._shapes = {key: p.shape for key, p in self._params.items()}
        self._missing: set[int] = set()  # parameters without valid data (after sleep(2))
        self._asleep = 0  # 0 awake, else the sleep level
        self._eos = torch.tensor(eos, device=self.device)
        self._step = torch.compile(self._forward_last, dynamic=None) if compile else self._forward_last
        # decode steps in fewer ops where the model allows (decode_step.py); why not is kept for the log and tests
        self.lean_decode_reason = ("turned off" if not lean_decode else "static cache" if static_cache
                                   else lean_decode_reason(self.model, self.device))
        if self.lean_decode_reason is None:
            self._step = LeanDecodeStep(self.model)
        # SDPA takes a boolean [B, 1, 1, L] padding mask for a one-token step; FlashAttention-2 wants the 2D mask
        self._decode_mask_4d = self.model.config._attn_implementation in SDPA_NAMES
        self.last_stats = GenerationStats()
        self.total_stats = GenerationStats()

    def _build_model(self, config: PretrainedConfig, dtype: torch.dtype) -> torch.nn.Module:
        """This engine's own network, random weights (`shared.SharedHFEngine` uses the trainer's instead)."""
        with torch.device(self.device):  # our attention: transformers' plus GQA without copies on CPU (attention.py)
            model = AutoModelForCausalLM.from_config(with_our_attention(config), dtype=dtype)
        return model.eval().requires_grad_(False)

    # -- weights and memory ------------------------------------------------------------------

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        self._require_awake("load_weights")
        for name, tensor in named_tensors:
            for seg in _WRAPPER_SEGMENTS:
                name = name.replace(seg, "")
            target = self._targets.get(name)
            if target is None:
                raise KeyError(f"HFEngine.load_weights: {type(self.model).__name__} has no weight named {name!r}")
            tensor = full_tensor(tensor)  # a DTensor shard is gathered (collective on every rank)
            if tensor.shape != target.shape:
                raise ValueError(f"HFEngine.load_weights: {name} has shape {tuple(tensor.shape)}, "
                                 f"the model expects {tuple(target.shape)}")
            target.copy_(tensor)  # converts dtype and device
            self._missing.discard(id(target))

    def sleep(self, level: int = 1) -> None:
        if level not in (1, 2):
            raise ValueError(f"HFEngine.sleep: level={level} must be 1 (offload) or 2 (discard)")
        if self._asleep >= level:
            return
        for key, p in self._params.items():
            if level == 2:  # keep the Parameter objects (ties, name map) and drop only their storage
                p.data = torch.empty(0, dtype=p.dtype, device=self.device)
                self._missing.add(key)
            elif self.device.type != "cpu":  # level 1 on an accelerator: park in (pinned) host memory
                host = torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=torch.cuda.is_available())
                p.data = host.copy_(p.data)
        self._asleep = level
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def wake_up(self) -> None:
        if not self._asleep:
            return
        for key, p in self._params.items():
            if key in self._missing:
                p.data = torch.empty(self._shapes[key], dtype=p.dtype, device=self.device)
            elif p.device != self.device:
                p.data = p.data.to(self.device, non_blocking=True)
        if self.device.type == "cuda":  # the pinned host copies may be reused once the copies are done
            torch.cuda.current_stream(self.device).synchronize()
        self._asleep = 0

    @torch.inference_mode()
    def prompt_logprobs(self, prompts: list[list[int]], max_logits_mb: float = 256) -> list[torch.Tensor]:
        """log_softmax(logits)[token t] of every prompt token after the first, [len(p) - 1] each (T = 1):
        the engine's side of the weight-sync probe (`probe.check_sync`). Right-padded batches, no cache,
        as many prompts per forward as keep the fp32 logits under `max_logits_mb`."""
        self._require_awake("prompt_logprobs")
        out, batch = [], []
        per_token = self.model.config.vocab_size * 4 / 2**20  # MB of fp32 logits per position
        for i, p in enumerate(prompts):
            batch.append(p)
            nxt = prompts[i + 1] if i + 1 < len(prompts) else None
            if nxt is None or (len(batch) + 1) * max(*map(len, batch), len(nxt)) * per_token > max_logits_mb:
                out += self._prompt_logprobs_batch(batch)
                batch = []
        return out

    def _prompt_logprobs_batch(self, prompts: list[list[int]]) -> list[torch.Tensor]:
        longest = max(map(len, prompts))
        ids = torch.full((len(prompts), longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, p in enumerate(prompts):
            ids[r, : len(p)], mask[r, : len(p)] = torch.tensor(p), 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()  # [B, L-1, V]
        logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # [B, L-1]
        return [logp[r, : len(p) - 1].cpu() for r, p in enumerate(prompts)]

    def close(self) -> None:
        """Nothing to release beyond Python's own garbage collection (the vLLM engine has a real one)."""

    def _require_awake(self, what: str) -> None:
        if self._asleep:
            raise RuntimeError(f"HFEngine.{what}: the engine is asleep (level {self._asleep}); call wake_up() first")

    # -- generation ----------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], sampling: SamplingConfig, keys: list[int] | None = None) -> list[Completion]:
        self._require_awake("generate")
        if self._missing:
            raise RuntimeError(f"HFEngine.generate: {len(self._missing)} weights were discarded by sleep(level=2) "
                               "and not reloaded; call load_weights with the full state dict first")
        vocab = self.model.config.vocab_size
        for i, p in enumerate(prompts):
            if not p or min(p) < 0 or max(p) >= vocab:
                raise ValueError(f"HFEngine.generate: prompt {i} is empty or has token ids outside [0, {vocab})")
        check_prompt_lengths("HFEngine", prompts, self.max_model_len)
        start = time.perf_counter()
        stats = GenerationStats(calls=1)
        keys = list(range(len(prompts))) if keys is None else list(keys)
        if len(keys) != len(prompts):
            raise ValueError(f"HFEngine.generate: {len(keys)} keys for {len(prompts)} prompts")
        seed = int(torch.randint(0, 2**62, ())) if sampling.seed is None else sampling.seed
        owners = [i for i in range(len(prompts)) for _ in range(sampling.n)]  # prompt index of each sequence
        streams = stream_ids(seed, [keys[i] for i in owners], [j for _ in prompts for j in range(sampling.n)])
        chunk = self.max_batch_size or max(len(owners), 1)
        completions: list[Completion] = []
        for lo in range(0, len(owners), chunk):
            completions += self._generate_chunk(prompts, owners[lo : lo + chunk], streams[lo : lo + chunk], sampling, stats)
        stats.seconds = time.perf_counter() - start
        self.last_stats = stats
        self.total_stats.add(stats)
        return completions

    def _forward_last(self, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]  # [B, V] in the head's dtype: the sampler converts a block at a time

    def _generate_chunk(self, prompts, owners: list[int], streams: list[int], sampling: SamplingConfig, stats) -> list[Completion]:
        dev, pad, max_new = self.device, self.pad_token_id, sampling.max_new_tokens
        # Rows to prefill: each distinct prompt once (dynamic cache) or every sequence (static cache).
        distinct = list(dict.fromkeys(owners))
        prefill_owners = owners if self.static_cache else distinct
        lengths = [len(prompts[i]) for i in prefill_owners]
        P = max(lengths)
        total_len = P + max_new
        if self.static_cache:  # round up so that compiled shapes repeat across calls
            total_len = -(-total_len // 64) * 64
        ids = torch.full((len(prefill_owners), P), pad, dtype=torch.long)
        mask = torch.zeros((len(prefill_owners), total_len), dtype=torch.long)
        for r, (i, n) in enumerate(zip(prefill_owners, lengths)):
            ids[r, P - n :] = torch.tensor(prompts[i])
            mask[r, P - n :] = 1  # prompt tokens and every future position (causality hides the future)
        ids, mask = ids.to(dev), mask.to(dev)
        pos = (mask[:, :P].cumsum(-1) - 1).clamp(min=0)  # left padding: each row counts from its first token
        next_pos = torch.tensor(lengths, device=dev)  # position id of the next token, per row

        t0 = time.perf_counter()
        if self.static_cache:
            cache = StaticCache(config=self.model.config, max_cache_len=total_len)
            logits = self._forward_last(ids, mask, pos, cache)
        else:
            cache = preallocated_cache(self.model.config, P + max_new)
            logits = self._forward_last(ids, mask[:, :P], pos, cache)  # [distinct, V]
            row_of = {i: r for r, i in enumerate(distinct)}
            expand = torch.tensor([row_of[i] for i in owners], device=dev)  # [B] prefill row of each sequence
            cache.batch_select_indices(expand)  # copies each prompt's cache rows G times
            logits, mask, next_pos = logits[expand], mask[expand], next_pos[expand]
            if self._decode_mask_4d:  # one token attends to every real key so far: [B, 1, 1, L] as SDPA takes it,
                mask = mask.bool()[:, None, None, :]  # handed over as built (transformers skips its mask code)
        stats.prefill_seconds += time.perf_counter() - t0

        B = len(owners)
        tokens = torch.full((B, max_new), pad, dtype=torch.long, device=dev)
        logps = torch.zeros((B, max_new), dtype=torch.float32, device=dev)
        n_tokens = torch.full((B,), max_new, dtype=torch.long, device=dev)
        stopped = torch.zeros(B, dtype=torch.bool, device=dev)
        rows = torch.arange(B, device=dev)  # original row of each live batch row
        row_streams = torch.tensor(streams, dtype=torch.int64, device=dev)  # noise stream of each sequence
        done = torch.zeros(B, dtype=torch.bool, device=dev)  # per live batch row
        sampler = Sampler(sampling, logits.shape[-1], dev)
        for t in range(max_new):
            tok, lp = sampler.sample(logits, row_streams[rows], t)  # [b], [b]
            tokens[rows, t], logps[rows, t] = tok, lp  # rows already done write past their end: trimmed below
            hit = torch.isin(tok, self._eos) & ~done & (not sampling.ignore_eos)
            n_tokens[rows] = torch.where(hit, t + 1, n_tokens[rows])
            stopped[rows] |= hit
            done |= hit
            live = int((~done).sum())  # the one host sync per step
            if live == 0 or t + 1 == max_new:
                break
            if not self.static_cache and live <= 0.75 * done.numel():
                keep = (~done).nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                rows, done, tok, mask, next_pos = rows[keep], done[keep], tok[keep], mask[keep], next_pos[keep]
            feed = torch.where(done, pad, tok)[:, None]  # finished rows read padding; their output is ignored
            step_mask = mask if self.static_cache else mask[..., : P + t + 1]
            logits = self._step(feed, step_mask, next_pos[:, None], cache)
            next_pos = next_pos + 1

        tokens_l, logps_l, n_l, stop_l = tokens.tolist(), logps.tolist(), n_tokens.tolist(), stopped.tolist()
        stats.sequences += B
        stats.prompt_tokens += sum(len(prompts[i]) for i in owners)
        stats.generated_tokens += sum(n_l)
        return [
            Completion(owners[r], tokens_l[r][: n_l[r]], logps_l[r][: n_l[r]], "stop" if stop_l[r] else "length")
            for r in range(B)
        ]
