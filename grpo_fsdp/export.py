"""Export to a Hugging Face directory (safetensors + config + tokenizer).

In training, `export_hf` gathers the full state dict to rank 0 (on the CPU, one tensor at a time)
and writes it; the result loads with `AutoModelForCausalLM.from_pretrained`. As a command it turns
any complete checkpoint into such a directory:

    python -m grpo_fsdp.export outputs/demo/checkpoints/step_000060 [outputs/demo/hf-step60]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from grpo_fsdp.models import DTYPES

SHARD_BYTES = 4 * 1024**3


def write_hf_dir(state: dict[str, torch.Tensor], conf, tokenizer, out_dir: str | Path, dtype: str) -> Path:
    """Write safetensors shards (+ index when more than one), config.json and the tokenizer."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if getattr(conf, "tie_word_embeddings", False):
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}  # tied: stored once
    torch_dtype = DTYPES[dtype]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        t = tensor.detach().to("cpu", torch_dtype).contiguous()
        if size and size + t.numel() * t.element_size() > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.numel() * t.element_size()
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, fname))
        total = sum(t.numel() * t.element_size() for s in shards for t in s.values())
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    conf.dtype = torch_dtype
    conf.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def export_hf(policy, conf, tokenizer, out_dir: str | Path, dtype: str) -> Path:
    """Collective: every rank calls it; rank 0 writes. Returns the directory."""
    state = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        write_hf_dir(state, conf, tokenizer, out_dir, dtype)
    dist.barrier()
    return Path(out_dir)


def export_checkpoint(ckpt_dir: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Offline: a DCP checkpoint directory -> Hugging Face directory, in one process on the CPU."""
    import torch.distributed.checkpoint as dcp
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from grpo_fsdp.checkpoint import SafeFileSystemReader
    from grpo_fsdp.cli import UserError

    ckpt = Path(ckpt_dir)
    if not (ckpt / "COMPLETE").exists():
        raise UserError(f"{ckpt} is not a complete checkpoint (no COMPLETE file); pass a step_* directory")
    conf = AutoConfig.from_pretrained(ckpt / "model")
    tokenizer = AutoTokenizer.from_pretrained(ckpt / "model")
    model = AutoModelForCausalLM.from_config(conf, dtype=torch.float32)
    state = {"model": model.state_dict()}
    dcp.load(state, storage_reader=SafeFileSystemReader(str(ckpt)), no_dist=True)
    return write_hf_dir(state["model"], conf, tokenizer, out_dir, dtype)


def cli(argv: list[str] | None = None) -> None:
    from grpo_fsdp.cli import run_main

    def main(args: list[str]) -> int:
        if not args or args[0] in ("-h", "--help") or len(args) > 3:
            print("usage: python -m grpo_fsdp.export CHECKPOINT_DIR [OUT_DIR] [float32|bfloat16]")
            return 0 if args else 2
        out = args[1] if len(args) > 1 else str(Path(args[0]).parent.parent / f"hf-{Path(args[0]).name}")
        path = export_checkpoint(args[0], out, args[2] if len(args) > 2 else "float32")
        print(f"exported {args[0]} -> {path}")
        return 0

    run_main(main, argv)


if __name__ == "__main__":
    cli(sys.argv[1:])
