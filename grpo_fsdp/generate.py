"""`python -m grpo_fsdp.generate model=<base or dir> [adapter=<dir>] prompt="What is 15 + 27?"`: answer prompts.

    python -m grpo_fsdp.generate model=outputs/demo/grpo/hf prompt="7+5=" instruction='' max_new_tokens=64
    python -m grpo_fsdp.generate model=Qwen/Qwen2.5-1.5B adapter=<run_dir>/adapter prompts_file=questions.txt
    python -m grpo_fsdp.generate model=<dir> prompt="..." temperature=0.7 n=4 seed=1   # sampled

Renders each prompt as training does (`template`, `instruction`: the chat template when the tokenizer has one),
generates with the rollout engine (`engine=auto`: vLLM when it imports and can serve the model, else
transformers; `engine=hf|vllm`), and prints each completion with the answer the reward would grade (the last
`\\boxed{}`, or "none"). `temperature=0` (the default) is greedy.

`adapter=`: a PEFT-format LoRA directory (`adapter_config.json` + `adapter_model.safetensors`, what a LoRA run
writes to `<run_dir>/adapter`). Its W + (alpha/r)·B·A is merged into the base's weights once, into a
temporary directory, and both engines serve the merged model (a one-off merge costs less than a LoRA-serving
engine for a handful of prompts). An adapter trained on an NF4 base merged into the full-precision base gives a
close model, not exactly the trained one (README, LoRA and QLoRA).

`prompts_file=`: one prompt per line, or JSONL rows with a "question" (or "prompt") field. A mistake the user can
fix ends in one line and exit code 2.
"""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from grpo_fsdp.cli import UserError, run_main
from grpo_fsdp.config import ConfigError
from grpo_fsdp.data.templates import INSTRUCTION


@dataclass
class GenerateOptions:
    model: str = ""  # base model directory or hub id (the tokenizer comes from here); required
    adapter: str = ""  # a PEFT LoRA directory to merge into `model` ("": none)
    prompt: str = ""  # one prompt (a question, rendered as in training)
    prompts_file: str = ""  # or many: one per line, or JSONL rows with "question"/"prompt"
    max_new_tokens: int = 200
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    n: int = 1  # completions per prompt (n > 1 needs temperature > 0)
    seed: int = 0
    template: str = "auto"  # auto | chat | plain, as model.template in training
    instruction: str = INSTRUCTION  # appended to each question, as data.instruction in training
    engine: str = "auto"  # auto | hf | vllm
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16
    trust_remote_code: bool = False


USAGE = ('usage: python -m grpo_fsdp.generate model=<dir or hub id> [adapter=<PEFT dir>] prompt="..." | prompts_file=F '
         "[key=value ...]\noptions: ")


def parse_options(argv: list[str]) -> GenerateOptions:
    items = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or not key.strip():
            raise ConfigError("arguments", f"{arg!r} is not key=value", 'write options as key=value, e.g. prompt="What is 2+2?"')
        items.append(f"{key}={value or repr('')}")  # instruction='' arrives as "instruction=": an empty string
    try:
        node = OmegaConf.merge(OmegaConf.structured(GenerateOptions), OmegaConf.from_dotlist(items))
        opts = OmegaConf.to_object(node)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or "arguments"
        raise ConfigError(key, str(e).splitlines()[0], "check the option's name and type (--help lists them)") from None
    assert isinstance(opts, GenerateOptions)
    if bool(opts.prompt) == bool(opts.prompts_file):
        raise ConfigError("prompt", "give exactly one of prompt= and prompts_file=", 'e.g. prompt="What is 15 + 27?"')
    if opts.max_new_tokens < 1:
        raise ConfigError("max_new_tokens", f"must be >= 1, got {opts.max_new_tokens}", "set max_new_tokens=200")
    if opts.temperature < 0 or not 0 < opts.top_p <= 1:
        raise ConfigError("temperature", "must be >= 0 with top_p in (0, 1]", "set temperature=0 (greedy) or e.g. 0.7")
    if opts.n < 1 or (opts.n > 1 and opts.temperature == 0):
        raise ConfigError("n", f"{opts.n} completions per prompt need sampling", "set n=1, or temperature>0 with n>1")
    return opts


def read_prompts(opts: GenerateOptions) -> list[str]:
    if opts.prompt:
        return [opts.prompt]
    path = Path(opts.prompts_file).expanduser()
    if not path.is_file():
        raise UserError(f"prompts_file={opts.prompts_file!r}: no such file; give a text file (one prompt per line) or JSONL")
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{number}: not valid JSON ({e.msg}); one prompt per line, or one JSON object") from None
            text = row.get("question", row.get("prompt")) if isinstance(row, dict) else None
            if not isinstance(text, str):
                raise UserError(f"{path}:{number}: a JSON row needs a \"question\" (or \"prompt\") string field")
            prompts.append(text)
        else:
            prompts.append(line)
    if not prompts:
        raise UserError(f"prompts_file={opts.prompts_file!r} holds no prompt")
    return prompts


def read_adapter(adapter_dir: str) -> tuple[dict, dict]:
    """(adapter_config, {HF module name + .lora_A/.lora_B.weight: tensor}) of a PEFT LoRA directory."""
    from safetensors.torch import load_file

    from grpo_fsdp.export import PEFT_PREFIX

    d = Path(adapter_dir).expanduser()
    config_file, weights_file = d / "adapter_config.json", d / "adapter_model.safetensors"
    if not (config_file.is_file() and weights_file.is_file()):
        raise UserError(f"adapter={adapter_dir!r}: not a PEFT adapter directory (needs adapter_config.json and "
                        "adapter_model.safetensors, as <run_dir>/adapter holds)")
    config = json.loads(config_file.read_text())
    if config.get("peft_type", "LORA") != "LORA" or not config.get("r") or "lora_alpha" not in config:
        raise UserError(f"adapter={adapter_dir!r}: adapter_config.json is not a LoRA config with r and lora_alpha")
    tensors = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(str(weights_file)).items()}
    return config, tensors


def merge_adapter_dir(model: str, adapter_dir: str, out_dir: str, trust_remote_code: bool = False) -> str:
    """Write `model` with the adapter merged (fp32) to `out_dir`; returns it."""
    import torch
    from transformers import AutoModelForCausalLM

    from eval.engines import model_config
    from grpo_fsdp.export import merge_into, write_hf_dir
    from grpo_fsdp.models import load_tokenizer

    config, adapters = read_adapter(adapter_dir)
    cfg = model_config(model, trust_remote_code)
    base = AutoModelForCausalLM.from_pretrained(cfg.path, dtype=torch.float32, trust_remote_code=trust_remote_code)
    weights = base.state_dict()
    missing = sorted({k.rsplit(".lora_", 1)[0] for k in adapters} - {k.removesuffix(".weight") for k in weights})
    if missing:
        raise UserError(f"adapter={adapter_dir!r} adapts {missing[0]}, which {model} does not have: "
                        "pass the base model the adapter was trained on")
    merged = merge_into(weights, adapters, config["lora_alpha"] / config["r"])
    return str(write_hf_dir(merged, base.config, load_tokenizer(cfg), out_dir, "float32"))


def generate(opts: GenerateOptions):
    """(tokenizer, questions, completions) for validated options: the engine is built, used and closed here."""
    questions = read_prompts(opts)

    from eval.engines import build_engine, check_model, load_model_tokenizer
    from grpo_fsdp.data.templates import encode_prompt, render_prompt
    from grpo_fsdp.rollout.base import SamplingConfig

    check_model(opts.model)
    tokenizer = load_model_tokenizer(opts.model, opts.trust_remote_code)
    try:
        prompts = [encode_prompt(tokenizer, render_prompt(tokenizer, q, opts.template, opts.instruction)) for q in questions]
    except ValueError as e:  # an unknown template, or chat without a chat template
        raise ConfigError("template", str(e), "use template=auto, chat or plain") from None
    longest = max(map(len, prompts)) + opts.max_new_tokens
    with tempfile.TemporaryDirectory(prefix="grpo-fsdp-merged-") as tmp:
        model = opts.model
        if opts.adapter:
            model = merge_adapter_dir(opts.model, opts.adapter, tmp, opts.trust_remote_code)
            print(f"generate: merged the adapter {opts.adapter} into {opts.model}", file=sys.stderr, flush=True)
        engine = build_engine(opts.engine, model, tokenizer, device=opts.device, dtype=opts.dtype,
                              trust_remote_code=opts.trust_remote_code, longest=longest)
        try:
            sampling = SamplingConfig(n=opts.n, temperature=opts.temperature, top_p=opts.top_p,
                                      max_new_tokens=opts.max_new_tokens, seed=opts.seed)
            completions = engine.generate(prompts, sampling)
        finally:
            engine.close()
    return tokenizer, questions, completions


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help", "help") for a in argv):
        print(USAGE + " ".join(f"{k}=" for k in GenerateOptions.__dataclass_fields__) + "  (see grpo_fsdp/generate.py)")
        return 0
    from grpo_fsdp.grading import answer_text

    tokenizer, questions, completions = generate(parse_options(argv))
    for c in completions:
        text = tokenizer.decode(c.token_ids, skip_special_tokens=True)
        print(f"prompt: {questions[c.prompt_index]}\ncompletion: {text}\nanswer: {answer_text(text) or '(none)'} "
              f"[{len(c.token_ids)} tokens, {c.finish_reason}]\n")
    return 0


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
