"""Rollout engines side by side: generation tokens/s, seconds per weight sync, seconds per evaluation.

    .venv/bin/python benchmarks/rollout_engines.py                      # tiny model, CPU, both engines
    .venv/bin/python benchmarks/rollout_engines.py --engines hf --model qwen2.5-1.5b --device cuda --batch 64,256

What runs, per engine (`hf`: transformers `HFEngine`; `vllm`: the colocated `VLLMEngine`), in this
one process, the engines one after the other (each built, measured, closed):

  model     shapes from conf/model/<--model>.yaml with random weights (nothing is downloaded); the
            tiny model's byte-level tokenizer, or the real Qwen2.5 tokenizer at --tokenizer for hub
            shapes. max_position_embeddings is raised to 4096 so GSM8K prompts fit.
  generate  --prompts chat-rendered arithmetic prompts x --group samples, temperature 1, exactly
            --max-new-tokens each (the stop token is disabled: forced lengths, so both engines do
            the same work); one untimed warm-up call, then --iters timed calls; tokens/s is the
            median over calls of generated tokens / wall seconds. --batch sets the prompt count
            (x group) for each row, e.g. 64,256 sequences.
  sync      `load_weights` of the full state dict (what the trainer does after every optimizer
            step) plus the weight-sync probe (`probe.check_sync` on 4 prompts); median of --iters.
  eval      `eval.evaluate` on the first --eval-problems GSM8K test problems (../shared/data, or
            skipped), greedy, --eval-max-new-tokens, graded by the training reward's grader.
            Random weights: the accuracy is 0 and the completions run to the budget, so this is
            the cost of an evaluation at that budget.

Writes benchmarks/results/rollout_engines-<date>.json and appends rows to rollout_engines.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--engines", default="hf,vllm")
    p.add_argument("--model", default="tiny")
    p.add_argument("--tokenizer", default=str(REPO.parent / "shared" / "tokenizers" / "qwen2.5"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", default="16", help="comma list of prompt counts (x --group sequences each)")
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--eval-problems", type=int, default=100)
    p.add_argument("--eval-max-new-tokens", type=int, default=128)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    return p.parse_args(argv)


def build(a):
    import torch

    from grpo_fsdp.cli import compose
    from grpo_fsdp.models import hf_config, load_tokenizer

    cfg = compose([f"model={a.model}", "model.path=" if a.model == "tiny" else f"model.path={a.tokenizer}"])
    tokenizer = load_tokenizer(cfg.model)
    if a.model != "tiny":  # the preset's shapes, built from its arch numbers (the tokenizer dir holds no config)
        from transformers import Qwen2Config

        ar = cfg.model.arch
        conf = Qwen2Config(vocab_size=ar.vocab_size or len(tokenizer), hidden_size=ar.hidden_size,
                           intermediate_size=ar.intermediate_size, num_hidden_layers=ar.num_layers,
                           num_attention_heads=ar.num_heads, num_key_value_heads=ar.num_kv_heads,
                           tie_word_embeddings=ar.tie_embeddings, rope_theta=ar.rope_theta)
    else:
        conf = hf_config(cfg.model, tokenizer, "sdpa")
    conf.max_position_embeddings = 4096
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    dtype = torch.float32 if a.device == "cpu" else torch.bfloat16
    with torch.device(a.device):  # random init on the device: on one CPU thread a 1.5B init took most of a minute
        state = AutoModelForCausalLM.from_config(conf, dtype=dtype).state_dict()
    return cfg, conf, tokenizer, state, dtype


def make(kind: str, a, conf, tokenizer, dtype, workdir: Path):
    from grpo_fsdp.rollout.factory import make_engine

    def model_dir():
        conf.save_pretrained(workdir)
        tokenizer.save_pretrained(workdir)
        return workdir

    return make_engine(kind, hf_conf=conf, tokenizer=tokenizer, model_dir=model_dir, device=a.device, dtype=dtype,
                       kv_cache_memory_bytes=(2 << 30) if a.device == "cpu" else None, gpu_memory_utilization=0.5,
                       max_model_len=4096, seed=0, load_format="dummy")


def measure(kind: str, a, cfg, conf, tokenizer, state, dtype) -> list[dict]:
    import tempfile

    from grpo_fsdp.data.arithmetic import make_arithmetic
    from grpo_fsdp.data.templates import encode_prompt, render_prompt
    from grpo_fsdp.rollout.base import SamplingConfig
    from grpo_fsdp.rollout.probe import compare_logprobs

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        engine = make(kind, a, conf, tokenizer, dtype, Path(tmp))
        build_s = time.perf_counter() - t0
        engine.load_weights(state.items())
        examples = make_arithmetic(cfg.data.arithmetic, "train")
        prompts = [encode_prompt(tokenizer, render_prompt(tokenizer, e.question, "auto")) for e in examples]
        for n_prompts in [int(b) for b in a.batch.split(",")]:
            sampling = SamplingConfig(n=a.group, temperature=1.0, max_new_tokens=a.max_new_tokens, seed=1, ignore_eos=True)
            batch = prompts[:n_prompts]
            engine.generate(batch, sampling)  # warm-up
            rates = []
            for _ in range(a.iters):
                t = time.perf_counter()
                out = engine.generate(batch, sampling)
                rates.append(sum(len(c.token_ids) for c in out) / (time.perf_counter() - t))
            rows.append({"engine": kind, "what": "generate", "sequences": n_prompts * a.group, "tokens_per_s": statistics.median(rates),
                         "build_s": build_s})
        syncs = []
        reference = engine.prompt_logprobs(prompts[:4])
        for _ in range(a.iters):
            t = time.perf_counter()
            engine.load_weights(state.items())
            compare_logprobs(engine.prompt_logprobs(prompts[:4]), reference, 1e-3)
            syncs.append(time.perf_counter() - t)
        rows.append({"engine": kind, "what": "sync+probe", "seconds": statistics.median(syncs)})
        rows += measure_eval(kind, a, engine, tokenizer)
        engine.close()
    return rows


def measure_eval(kind, a, engine, tokenizer) -> list[dict]:
    from eval.evaluate import evaluate
    from eval.tasks import load_task

    data = REPO.parent / "shared" / "data"
    if not data.is_dir():
        return [{"engine": kind, "what": "eval gsm8k", "skipped": "../shared/data is absent"}]
    examples = load_task("gsm8k", data_dir=str(data), limit=a.eval_problems)
    r = evaluate(engine, tokenizer, examples, max_new_tokens=a.eval_max_new_tokens, task="gsm8k", batch_size=50)
    return [{"engine": kind, "what": f"eval gsm8k x{len(examples)}", "seconds": r.seconds, "generate_s": r.generate_seconds,
             "score_s": r.score_seconds, "mean_length": r.mean_length}]


def main(argv=None) -> int:
    import torch

    a = parse_args(argv)
    if a.device == "cpu":  # on a GPU machine the host threads keep torch's default
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg, conf, tokenizer, state, dtype = build(a)
    rows = []
    for kind in a.engines.split(","):
        try:
            rows += measure(kind, a, cfg, conf, tokenizer, state, dtype)
        except Exception as e:  # noqa: BLE001 -- a side that cannot run is recorded, not crashed on
            rows.append({"engine": kind, "what": "not run", "reason": f"{type(e).__name__}: {str(e).splitlines()[0]}"})
    from train_throughput import device_name  # the same machine label as the training benchmark

    doc = {"date": date.today().isoformat(), "machine": device_name(torch.device(a.device)),
           "model": a.model, "threads": torch.get_num_threads(), "args": {k: str(v) for k, v in vars(a).items()}, "rows": rows}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"rollout_engines-{doc['date']}-{a.model}-{a.device}.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = [f"| {doc['date']} | {doc['machine']} | {a.model} | {r['engine']} | {r['what']} | "
             + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items() if k not in ("engine", "what"))
             + " |" for r in rows]
    md = a.out / "rollout_engines.md"
    if not md.exists():
        md.write_text("# Rollout engines (benchmarks/rollout_engines.py)\n\n| date | machine | model | engine | what | numbers |\n"
                      "|---|---|---|---|---|---|\n")
    with open(md, "a") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if any(r["what"] == "not run" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
