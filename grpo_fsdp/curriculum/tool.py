"""`python -m grpo_fsdp.curriculum`: sample M answers per training prompt and write their semantic entropies.

    python -m grpo_fsdp.curriculum model.path=outputs/demo/sft/hf data=arithmetic samples=8
    python -m grpo_fsdp.curriculum model=qwen2.5-math-1.5b data=gsm8k samples=8 out=curriculum/gsm8k.jsonl

Options besides the training's own overrides (model, data, rollout.engine, hardware.device, ...):
samples=M (default 8), out=<file> (default outputs/curriculum/<data>-<key hash>.jsonl), seed=
(default train.seed), batch=<prompts per generate call> (default 16); `model=<existing directory>`
is read as model.path=<directory>. Completions are sampled by the rollout engine (vLLM when it is
installed, rollout/factory.py) at temperature 1 with no top-p/top-k, up to algo.max_new_tokens tokens.
Rows are appended as batches finish, so an interrupted run resumes where it stopped; a file
computed for another model, data, M or seed is moved aside and recomputed (cache.py). At the end:
one summary line and, when matplotlib is installed, a histogram `<out>.png` of the entropies.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

from grpo_fsdp.cli import compose
from grpo_fsdp.config import ConfigError
from grpo_fsdp.curriculum import cache
from grpo_fsdp.curriculum.entropy import clusters, correct_count, final_answer, semantic_entropy

OPTIONS = ("samples", "out", "seed", "batch")


def split_options(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    opts, rest = {}, []
    for arg in argv:
        name, eq, value = arg.partition("=")
        if eq and name in OPTIONS:
            opts[name] = value
        elif eq and name == "model" and os.path.isdir(os.path.expanduser(value)):
            rest.append(f"model.path={value}")
        else:
            rest.append(arg)
    if not any(a.startswith("algo=") for a in rest):
        rest.insert(0, "algo=grpo")  # algo.max_new_tokens: the completion budget of the rollouts to rank
    return opts, rest


def _int(opts: dict[str, str], name: str, default: int, low: int) -> int:
    try:
        value = int(opts.get(name, default))
    except ValueError:
        raise ConfigError(name, f"{opts[name]!r} is not an integer", f"e.g. {name}={default}") from None
    if value < low:
        raise ConfigError(name, f"must be >= {low}, got {value}", f"e.g. {name}={default}")
    return value


def prompt_row(question: str, gold: str, texts: list[str]) -> dict:
    answers = [final_answer(t) for t in texts]
    groups = clusters(answers)
    sizes = [size for _, size in groups]
    return {"id": cache.prompt_id(question), "entropy": round(semantic_entropy(sizes), 6), "clusters": sizes,
            "no_answer": sum(a is None for a in answers), "correct": correct_count(groups, gold)}


def _engine(cfg, tokenizer, out: Path):
    import torch

    from grpo_fsdp.models import DTYPES, full_state_dict, hf_config
    from grpo_fsdp.rollout.factory import make_engine, resolve_engine_kind

    device = "cuda" if cfg.hardware.device == "cuda" and torch.cuda.is_available() else "cpu"
    conf = hf_config(cfg.model, tokenizer, "sdpa")

    def model_dir() -> Path:  # vLLM starts from config + tokenizer with dummy weights, then takes ours
        path = out.with_name(out.name + ".engine")
        conf.save_pretrained(path)
        tokenizer.save_pretrained(path)
        return path

    kind = resolve_engine_kind(cfg.rollout.engine, hf_conf=conf, device=device)
    longest = cfg.data.max_prompt_length + cfg.algo.max_new_tokens
    engine = make_engine(kind, hf_conf=conf, tokenizer=tokenizer, model_dir=model_dir, device=device,
                         dtype=DTYPES[cfg.hardware.param_dtype], gpu_memory_utilization=cfg.hardware.vllm_memory_share,
                         kv_cache_memory_bytes=(1 << 30) if device == "cpu" else None,
                         max_model_len=min(getattr(conf, "max_position_embeddings", None) or 4096, max(4096, longest)),
                         seed=cfg.train.seed, load_format="dummy", max_batch_size=cfg.rollout.max_batch_size or None)
    engine.load_weights(full_state_dict(cfg.model, conf, seed=cfg.train.seed).items())
    return engine


def histogram(entropies: list[float], samples: int, path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no histogram: matplotlib is not installed (pip install matplotlib)"
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(entropies, bins=min(30, max(5, len(set(entropies)))), range=(0, math.log(samples)))
    ax.set_xlabel(f"semantic entropy (nats; max ln {samples} = {math.log(samples):.2f})")
    ax.set_ylabel("prompts")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"histogram: {path}"


def main(argv: list[str]) -> int:
    opts, overrides = split_options(argv)
    cfg = compose(overrides)
    samples, batch = _int(opts, "samples", 8, 2), _int(opts, "batch", 16, 1)
    compute(cfg, samples, _int(opts, "seed", cfg.train.seed, 0), opts.get("out") or None, batch)
    return 0


def compute(cfg, samples: int, seed: int, out: str | None = None, batch: int = 16) -> Path:
    """Sample, cluster and append every prompt missing from the cache for (cfg's model and data, samples, seed);
    -> the cache file (`out`, default outputs/curriculum/<data>-<key hash>.jsonl). A complete file costs no sampling."""
    from grpo_fsdp.data.loading import load_examples
    from grpo_fsdp.data.templates import encode_prompt, render_prompt
    from grpo_fsdp.models import load_tokenizer
    from grpo_fsdp.rollout.base import SamplingConfig

    tokenizer = load_tokenizer(cfg.model)
    examples = load_examples(cfg.data, cfg.data.train_split)
    questions, golds, prompts = [], [], []
    for e in examples:
        ids = encode_prompt(tokenizer, render_prompt(tokenizer, e.question, cfg.model.template, cfg.data.instruction))
        if len(ids) <= cfg.data.max_prompt_length:  # the ones training can use (data/lengths.py)
            questions.append(e.question)
            golds.append(e.answer)
            prompts.append(ids)
    key = cache.make_key(cache.model_key(cfg.model, cfg.train.seed), cache.data_fingerprint(cfg.data.name, questions), samples, seed)
    out = Path(out or f"outputs/curriculum/{cfg.data.name}-{cache.key_hash(key)}.jsonl")
    writer = cache.Writer(out, key)
    if writer.stale:
        print(f"info: {out} was computed for another model, data, samples or seed: moved to {out}.stale", file=sys.stderr)
    todo = [i for i, q in enumerate(questions) if cache.prompt_id(q) not in writer.rows]
    print(f"curriculum: {len(questions)} prompts, {len(questions) - len(todo)} already in {out}, {len(todo)} to sample "
          f"({samples} each)", file=sys.stderr, flush=True)
    if todo:
        from tqdm import tqdm

        engine = _engine(cfg, tokenizer, out)
        sampling = SamplingConfig(n=samples, temperature=1.0, max_new_tokens=cfg.algo.max_new_tokens, seed=seed)
        with tqdm(total=len(todo), desc="curriculum", unit="prompt", file=sys.stderr) as bar:
            for lo in range(0, len(todo), batch):
                chunk = todo[lo : lo + batch]
                # keyed by position in the data: a prompt's samples do not depend on the batch or on a resume
                completions = engine.generate([prompts[i] for i in chunk], sampling, keys=chunk)
                texts: list[list[str]] = [[] for _ in chunk]
                for c in completions:
                    texts[c.prompt_index].append(tokenizer.decode(c.token_ids, skip_special_tokens=True))
                writer.add(prompt_row(questions[i], golds[i], t) for i, t in zip(chunk, texts))
                bar.update(len(chunk))
        if hasattr(engine, "close"):
            engine.close()
    rows = [writer.rows[cache.prompt_id(q)] for q in questions]
    entropies = [float(r["entropy"]) for r in rows]
    solved = [r for r in rows if r["entropy"] == 0.0]
    right = sum(r.get("correct", 0) == samples for r in solved)
    print(f"curriculum: {out}: mean entropy {sum(entropies) / max(len(entropies), 1):.3f} nats over {len(entropies)} "
          f"prompts; {len(solved)} with H = 0 ({right} all right, {len(solved) - right} all wrong: all {samples} samples "
          f"agree, no GRPO signal; data.curriculum_drop_solved=true drops them)\n{histogram(entropies, samples, out.with_suffix('.png'))}", file=sys.stderr, flush=True)
    return out
