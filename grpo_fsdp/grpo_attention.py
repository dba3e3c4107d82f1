"""Which attention kernel trains a GRPO micro-batch: `hardware.grpo_attention`, and the rule behind `auto`.

A GRPO micro-batch arrives in the shared-prefix layout (`shared_prefix.pack`: each prompt once, then its
completions). Three kernels can train it; all give the same log-probs and gradients (tests):

    sdpa        the layout through SDPA, one call for the prompts and one per length block, each with an
                explicit [n, 1, C, P+C] mask and the prompt's keys/values gathered per completion (repeated
                per query head on CUDA, where SDPA refuses grouped-query heads with a mask)  shared_prefix.py
    flex        the same layout through FlexAttention: one call per layer over the flat row, a block mask,
                keys/values read in place, grouped-query heads native                        flex_prefix.py
    fa2_varlen  padding-free: every completion behind its own copy of its prompt, rows concatenated,
                position ids restarting per row, FlashAttention-2's variable-length kernel    varlen.py

`auto`, the default, is the rule (`choose`):

    CPU                      sdpa. torch 2.13 has no fused FlexAttention backward on CPU (it refuses one;
                             flex_prefix.py runs the unfused reference instead), and flash-attn is CUDA-only.
                             Measured in benchmarks/prefix_attention.py (results/prefix_attention.md).
    CUDA, flash-attn present per micro-batch: fa2_varlen when the padding-free row is at most
                             VARLEN_MARGIN x the shared-prefix row (tokens each layer processes), else sdpa.
                             Varlen repeats every prompt G times, the shared layout pads prompts and length
                             blocks; the per-token work of the projections and MLP dominates at 1-2k tokens, so
                             the shorter row wins unless FA2's faster kernel outweighs the difference.
    CUDA, no flash-attn      sdpa.

flex is opt-in on CUDA (`hardware.grpo_attention=flex`). On the first GPU run (H200, torch 2.11.0+cu130,
2026-11-30, benchmarks/results/gpu_check-2026-11-30-nvidia-h200.md) it trained a GRPO step of one shape
(benchmarks/grpo_step.py: compiled in the first step, then 1.79 s per step), but a second shape in the same
process (a recompile: tests/test_gpu_flex.py's second case, and prefix_attention.py's varied completion
lengths) did not finish within 45-100 s, while sdpa ran every shape (2.75 s per 8 x 8 x 1.3k-token step).
GRPO's lengths change every micro-batch, so `auto` waits until tests/test_gpu_flex.py and gpu_check.sh's
prefix-attention-flex line pass.

VARLEN_MARGIN = 1.05 is a stated prior, not yet a measurement. Per token, Qwen2.5-1.5B spends 6N = 9 GFLOP
in its weights (forward + backward) and 12·L·h·s = 0.66 GFLOP in attention at s = 1280 (PaLM's count,
half that with the causal mask): attention is under a tenth of the step, and FlexAttention at 90% / 85%
of FlashAttention-2's forward / backward speed (He et al., "FlexAttention", PyTorch blog, Aug 2024)
costs about 1% of it. So the row with fewer tokens should win almost always; the 5% leaves room for
what FLOPs do not show (Flex's partial blocks, building the block mask, compilation).
`benchmarks/prefix_attention.py --device cuda` (command lines in benchmarks/README.md) measures the
three on Qwen2.5-1.5B shapes; set the margin from where they cross.
"""

from __future__ import annotations

import importlib.util

KERNELS = ("auto", "sdpa", "flex", "fa2_varlen")
VARLEN_MARGIN = 1.05


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def flex_available() -> bool:
    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


def unavailable(setting: str, device_type: str) -> str | None:
    """Why `setting` cannot run on `device_type` here (one phrase), or None. For start-up validation."""
    if setting == "fa2_varlen" and device_type != "cuda":
        return "FlashAttention-2's varlen kernel needs a CUDA device"
    if setting == "fa2_varlen" and not flash_attn_available():
        return "flash-attn is not installed (pip install flash-attn --no-build-isolation)"
    if setting == "flex" and not flex_available():
        return "this torch has no torch.nn.attention.flex_attention (torch >= 2.5 has it)"
    return None


def row_tokens(sp) -> tuple[int, int]:
    """(shared-prefix row, padding-free row): tokens each layer processes for micro-batch `sp` in each layout."""
    owners = [0] * len(sp.lengths)
    for b in sp.blocks:
        for row, own in zip(b.rows.tolist(), b.owner.tolist()):
            owners[row] = own
    plen = sp.prompt_lengths.tolist()
    return int(sp.input_ids.shape[1]), sum(plen[o] for o in owners) + int(sp.lengths.sum())


def choose(setting: str, sp, device_type: str, flash: bool | None = None) -> str:
    """The kernel for this micro-batch: `setting` unless it is `auto`, then the rule in the module docstring."""
    if setting != "auto":
        return setting
    if device_type != "cuda":
        return "sdpa"
    if not (flash_attn_available() if flash is None else flash):
        return "sdpa"
    shared, varlen = row_tokens(sp)
    return "fa2_varlen" if varlen <= VARLEN_MARGIN * shared else "sdpa"
