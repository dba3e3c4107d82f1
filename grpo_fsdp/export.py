"""Export to a Hugging Face directory (safetensors + config + tokenizer), and LoRA adapters in PEFT's format.

In training, `export_hf` gathers the full state dict to rank 0 (on the CPU, one tensor at a time)
and writes it; the result loads with `AutoModelForCausalLM.from_pretrained`. With LoRA (lora.py) it
writes the merged model (W + (alpha / r) B A, W dequantized when the base was NF4: the weights the run
trained with), and `export_adapter` writes the adapters alone as PEFT does: `adapter_config.json` +
`adapter_model.safetensors` with keys `base_model.model.<name>.lora_A.weight`, which
`peft.PeftModel.from_pretrained(base, dir)` and vLLM's `LoRARequest` load.

As a command it turns any complete checkpoint into such a directory:

    python -m grpo_fsdp.export outputs/demo/checkpoints/step_000060 [outputs/demo/hf-step60]

A LoRA checkpoint holds only the adapters (checkpoint.py): the command writes the PEFT adapter directory
(default `<run_dir>/adapter-step_N`), and with `merge=true` also the merged model (`merged_dir=`, default
`<run_dir>/hf-step_N`), built on the base model the run started from (`base=<dir or hub id>` to override; an
NF4 run's base is quantized and dequantized as in training first, so the merge is the trained model).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from grpo_fsdp.checkpoint import LORA_INFO  # model/lora.json of a LoRA checkpoint: adapter config, NF4 or not
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
    """Collective: every rank calls it; rank 0 writes. Returns the directory. LoRA: the merged model."""
    from grpo_fsdp.lora import has_lora, merge_adapters

    if has_lora(policy):  # one full tensor at a time on every rank (a collective each); rank 0 keeps them
        state = {}
        for name, tensor in merge_adapters(policy):
            if dist.get_rank() == 0:
                state[name] = tensor.cpu()
    else:
        state = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        write_hf_dir(state, conf, tokenizer, out_dir, dtype)
    dist.barrier()
    return Path(out_dir)


PEFT_PREFIX = "base_model.model."


def write_adapter_dir(adapters: dict[str, torch.Tensor], adapter_config: dict, out_dir: str | Path) -> Path:
    """PEFT's layout: adapter_config.json + adapter_model.safetensors (keys prefixed `base_model.model.`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {PEFT_PREFIX + k: v.detach().to("cpu", torch.float32).contiguous() for k, v in adapters.items()}
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=1))
    return out


def export_adapter(policy, out_dir: str | Path) -> Path:
    """Collective: the LoRA adapters of `policy` as a PEFT directory, written by rank 0."""
    from grpo_fsdp.lora import adapter_state_dict

    adapters = adapter_state_dict(policy)
    if dist.get_rank() == 0:
        write_adapter_dir(adapters, policy.lora_info["adapter_config"], out_dir)
    dist.barrier()
    return Path(out_dir)


def export_checkpoint(ckpt_dir: str | Path, out_dir: str | Path, dtype: str = "float32", merge: bool = False,
                      base: str = "", merged_dir: str | Path | None = None) -> Path:
    """Offline: a DCP checkpoint directory -> Hugging Face directory, in one process on the CPU. A LoRA
    checkpoint -> PEFT adapter directory at `out_dir` (+ the merged model at `merged_dir` when `merge`)."""
    import torch.distributed.checkpoint as dcp
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from grpo_fsdp.checkpoint import SafeFileSystemReader
    from grpo_fsdp.cli import UserError

    ckpt = Path(ckpt_dir)
    if not (ckpt / "COMPLETE").exists():
        raise UserError(f"{ckpt} is not a complete checkpoint (no COMPLETE file); pass a step_* directory")
    if (ckpt / "model" / LORA_INFO).exists():
        return _export_lora_checkpoint(ckpt, out_dir, dtype, merge, base, merged_dir)
    if merge or base:
        raise UserError(f"{ckpt} is a full-weight checkpoint, not a LoRA one: merge=/base= do not apply; drop them")
    conf = AutoConfig.from_pretrained(ckpt / "model")
    tokenizer = AutoTokenizer.from_pretrained(ckpt / "model")
    model = AutoModelForCausalLM.from_config(conf, dtype=torch.float32)
    state = {"model": model.state_dict()}
    dcp.load(state, storage_reader=SafeFileSystemReader(str(ckpt)), no_dist=True)
    return write_hf_dir(state["model"], conf, tokenizer, out_dir, dtype)


def read_checkpoint_adapters(ckpt: Path) -> dict[str, torch.Tensor]:
    """The adapter tensors of a LoRA checkpoint (its model entries), full, on the CPU."""
    import torch.distributed.checkpoint as dcp

    from grpo_fsdp.checkpoint import SafeFileSystemReader

    reader = SafeFileSystemReader(str(ckpt))
    meta = reader.read_metadata().state_dict_metadata
    names = [k[len("model."):] for k in meta if k.startswith("model.") and (".lora_A." in k or ".lora_B." in k)]
    state = {"model": {n: torch.empty(tuple(meta[f"model.{n}"].size), dtype=torch.float32) for n in names}}
    dcp.load(state, storage_reader=SafeFileSystemReader(str(ckpt)), no_dist=True)
    return state["model"]


def merge_into(weights: dict[str, torch.Tensor], adapters: dict[str, torch.Tensor], scaling: float,
               nf4_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """W + scaling * B A for every adapted layer of a full state dict (fp32), W first quantized to NF4 and
    dequantized in `nf4_dtype` when the run trained on an NF4 base (quant.py: the same deterministic rounding)."""
    from grpo_fsdp.quant import to_nf4

    out = dict(weights)
    for key, a in adapters.items():
        if not key.endswith(".lora_A.weight"):
            continue
        layer = key[: -len(".lora_A.weight")]
        w = out[f"{layer}.weight"]
        if nf4_dtype is not None:
            w = to_nf4(w.to(nf4_dtype)).get_original_weight()
        out[f"{layer}.weight"] = w.float() + (adapters[f"{layer}.lora_B.weight"].float() @ a.float()) * scaling
    return out


def _export_lora_checkpoint(ckpt: Path, out_dir, dtype: str, merge: bool, base: str, merged_dir) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from grpo_fsdp.cli import UserError

    info = json.loads((ckpt / "model" / LORA_INFO).read_text())
    adapter_config = dict(info["adapter_config"])
    if base:
        adapter_config["base_model_name_or_path"] = base
    source = adapter_config["base_model_name_or_path"]
    if merge and not source:
        raise UserError(f"{ckpt}: the run started from the seeded tiny model (no model.path), so there is no base "
                        "to merge into; pass base=<model directory> holding those weights")
    adapters = read_checkpoint_adapters(ckpt)
    out = write_adapter_dir(adapters, adapter_config, out_dir)
    if not merge:
        return out
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise UserError(f"base={source!r}: cannot load the base model ({str(e).splitlines()[0]}); pass base=<model "
                        "directory>") from None
    nf4_dtype = DTYPES[info["param_dtype"]] if info["load_in_4bit"] else None
    merged = merge_into(model.state_dict(), adapters, adapter_config["lora_alpha"] / adapter_config["r"], nf4_dtype)
    conf, tokenizer = AutoConfig.from_pretrained(ckpt / "model"), AutoTokenizer.from_pretrained(ckpt / "model")
    target = merged_dir or ckpt.parent.parent / f"hf-{ckpt.name}"
    write_hf_dir(merged, conf, tokenizer, target, dtype)
    print(f"merged {ckpt} into {source} -> {target}")
    return out


USAGE = ("usage: python -m grpo_fsdp.export CHECKPOINT_DIR [OUT_DIR] [float32|bfloat16] [merge=true] [base=DIR] "
         "[merged_dir=DIR]  (merge/base/merged_dir: LoRA checkpoints)")


def cli(argv: list[str] | None = None) -> None:
    from grpo_fsdp.cli import UserError, run_main

    def main(args: list[str]) -> int:
        options = dict(a.removeprefix("export.").split("=", 1) for a in args if "=" in a)
        args = [a for a in args if "=" not in a]
        if not args or args[0] in ("-h", "--help") or len(args) > 3:
            print(USAGE)
            return 0 if args else 2
        unknown = set(options) - {"merge", "base", "merged_dir"}
        if unknown or options.get("merge", "false").lower() not in ("true", "false"):
            raise UserError(f"unknown or malformed option(s) {sorted(unknown) or ['merge=' + options['merge']]}; {USAGE}")
        ckpt = Path(args[0])
        lora = (ckpt / "model" / LORA_INFO).exists()
        out = args[1] if len(args) > 1 else str(ckpt.parent.parent / f"{'adapter' if lora else 'hf'}-{ckpt.name}")
        path = export_checkpoint(args[0], out, args[2] if len(args) > 2 else "float32",
                                 merge=options.get("merge", "false").lower() == "true", base=options.get("base", ""),
                                 merged_dir=options.get("merged_dir"))
        print(f"exported {args[0]} -> {path}" + (" (LoRA adapter, PEFT format)" if lora else ""))
        return 0

    run_main(main, argv)


if __name__ == "__main__":
    cli(sys.argv[1:])
