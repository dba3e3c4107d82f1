"""`python -m grpo_fsdp.generate` (issue 14 item 6): a base model and a PEFT adapter directory give the greedy
completion that PEFT's own merged model gives through transformers' `generate`; the adapter changes the answer;
bad input ends in one line."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from grpo_fsdp.cli import UserError, compose
from grpo_fsdp.config import ConfigError, LoraConfig
from grpo_fsdp.data.templates import encode_prompt, render_prompt
from grpo_fsdp.export import write_adapter_dir
from grpo_fsdp.generate import generate, main, parse_options, read_prompts
from grpo_fsdp.lora import LoRALinear, adapter_state_dict, apply_lora, peft_adapter_config
from grpo_fsdp.models import hf_config, load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "12+7="
NEW = 12


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A random tiny model with its byte-level tokenizer, and a LoRA adapter for it with B far from 0."""
    root = tmp_path_factory.mktemp("gen")
    cfg = compose(["model.arch.hidden_size=64", "model.arch.intermediate_size=128", "model.arch.num_layers=2"])
    tokenizer = load_tokenizer(cfg.model)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config(cfg.model, tokenizer, "sdpa"), dtype=torch.float32)
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    lora = LoraConfig(enabled=True, rank=4, alpha=8.0, target_modules=["q_proj", "v_proj", "o_proj"])
    apply_lora(model, lora)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_(0, 0.5)
    write_adapter_dir(adapter_state_dict(model), peft_adapter_config(model, lora, str(root / "base")), root / "adapter")
    return root, tokenizer


ARGS = [f"prompt={PROMPT}", "instruction=", "template=plain", f"max_new_tokens={NEW}", "engine=hf", "device=cpu"]


def _cli(*args: str) -> list[int]:
    _, questions, (completion,) = generate(parse_options([*args, *ARGS]))
    assert questions == [PROMPT] and completion.prompt_index == 0
    return completion.token_ids


def _reference(model, tokenizer) -> list[int]:
    ids = torch.tensor([encode_prompt(tokenizer, render_prompt(tokenizer, PROMPT, "plain", ""))])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW,
                         pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def test_the_adapter_merged_gives_peft_s_greedy_completion(dirs, capsys):
    peft = pytest.importorskip("peft")
    root, tokenizer = dirs
    base = AutoModelForCausalLM.from_pretrained(root / "base").eval()
    expected_base = _reference(base, tokenizer)
    merged = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "base"), root / "adapter")
    expected = _reference(merged.merge_and_unload().eval(), tokenizer)
    assert expected != expected_base  # the adapter matters, so equality below is not the base's by accident
    assert _cli(f"model={root / 'base'}") == expected_base
    assert _cli(f"model={root / 'base'}", f"adapter={root / 'adapter'}") == expected
    assert main([f"model={root / 'base'}", *ARGS]) == 0  # what a user sees: prompt, completion, answer
    out = capsys.readouterr().out
    assert out.startswith(f"prompt: {PROMPT}\ncompletion: ") and f"[{NEW} tokens, length]" in out


def test_prompts_file_lines_and_jsonl(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text('What is 2+2?\n\n{"question": "What is 3+3?"}\n{"prompt": "7+5="}\n')
    assert read_prompts(parse_options([f"prompts_file={f}", "model=x"])) == ["What is 2+2?", "What is 3+3?", "7+5="]


@pytest.mark.parametrize("args,match", [
    (["model=m"], "prompt: give exactly one of prompt= and prompts_file="),
    (["model=m", "prompt=a", "prompts_file=b"], "prompt: give exactly one"),
    (["model=m", "prompt=a", "n=4"], "n: 4 completions per prompt need sampling"),
    (["model=m", "prompt=a", "max_new_tokens=0"], "max_new_tokens: must be >= 1"),
    (["model=m", "prompt=a", "tempreature=1"], "tempreature"),
])
def test_bad_options_are_one_line(args, match):
    with pytest.raises(ConfigError, match=match):
        parse_options(args)


def test_bad_files_are_one_line(dirs, tmp_path, capsys):
    root, _ = dirs
    with pytest.raises(UserError, match="not a PEFT adapter directory"):
        main([f"model={root / 'base'}", f"adapter={tmp_path}", "prompt=a", "engine=hf", "device=cpu"])
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"text": "no question"}\n')
    with pytest.raises(UserError, match=r'p.jsonl:1: a JSON row needs a "question"'):
        read_prompts(parse_options([f"prompts_file={bad}", "model=m"]))
    other = tmp_path / "other"
    (other).mkdir()
    config = json.loads((root / "adapter" / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps(config))
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(root / "adapter" / "adapter_model.safetensors"))
    save_file({k.replace("layers.0.", "layers.9."): v for k, v in tensors.items()}, str(other / "adapter_model.safetensors"))
    with pytest.raises(UserError, match="which .* does not have: pass the base model the adapter was trained on"):
        main([f"model={root / 'base'}", f"adapter={other}", "prompt=a", "engine=hf", "device=cpu"])
