"""`python -m eval model=<dir or hub id> tasks=[gsm8k,math500] ...`: evaluate a checkpoint on its own.

    python -m eval model=outputs/demo/grpo/hf tasks=[arithmetic] arithmetic.max_operand=9
    python -m eval model=Qwen/Qwen2.5-Math-1.5B tasks=[gsm8k,math500] data_dir=../shared/data limit=50
    python -m eval model=<dir> tasks=math500 k=8 temperature=0.6      # pass@8 and maj@8

Loads the tokenizer and weights, builds the engine (`engine=hf`; vLLM once available), runs each
task through `eval.evaluate.evaluate` with the training reward's grader, prints a short table and
writes the results JSON (`out=`, default outputs/eval/<model>-<time>.json; layout in report.py).
Options: eval/options.py. A mistake the user can fix ends in one line and exit code 2.

Imports stay inside `main`: the grader's worker processes are spawned, and a light entry module
keeps `--help` and argument errors instant.
"""

from __future__ import annotations

import sys
import time
from datetime import datetime, timezone

from grpo_fsdp.cli import run_main


def _default_out(model: str, stamp: str) -> str:
    name = "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in model.strip("/").replace("/", "_"))[-80:]
    return f"outputs/eval/{name}-{stamp}.json"


def _progress(task: str):
    def report(done: int, total: int) -> None:
        print(f"eval: {task}: {done}/{total} problems generated", file=sys.stderr, flush=True)

    return report


def main(argv: list[str]) -> int:
    from eval.options import parse_options, usage

    if any(a in ("-h", "--help", "help") for a in argv):
        print(usage())
        return 0
    opts = parse_options(argv)

    from eval.engines import (
        build_engine,
        check_budget,
        load_model_tokenizer,
        model_context,
        resolve_device,
        resolve_dtype,
    )
    from eval.evaluate import encode_prompts, evaluate
    from eval.report import results_document, table, task_entry, write_json
    from eval.tasks import data_config, get_task, load_split
    from grpo_fsdp.rewards import RewardScorer

    now = datetime.now(timezone.utc)
    date = now.isoformat(timespec="seconds")
    out = opts.out or _default_out(opts.model, now.strftime("%Y%m%d-%H%M%S"))
    # Data before the model: a missing file should not wait for the weights to load.
    data = {}
    for name in opts.tasks:
        task = get_task(name)
        cfg = data_config(task, opts.data_dir, opts.arithmetic)
        data[name] = (task, load_split(task, cfg, opts.limit), cfg.path or cfg.hub_id or "synthetic")

    device = resolve_device(opts.device)
    dtype = resolve_dtype(opts.dtype, device)
    tokenizer = load_model_tokenizer(opts.model, opts.trust_remote_code)
    # A budget that leaves no room for any prompt is refused before the weights load; single prompts too
    # long for the context are skipped and counted by `evaluate`. `longest` sizes vLLM's context.
    context, longest = model_context(opts.model, tokenizer, opts.trust_remote_code), 0
    for name, (task, examples, _) in data.items():
        max_new = opts.max_new_tokens or task.max_new_tokens
        check_budget(max_new, context, name, from_default=not opts.max_new_tokens)
        prompts = encode_prompts(tokenizer, examples, opts.template, opts.instruction)
        longest = max(longest, max_new + max(map(len, prompts), default=0))
    began = time.perf_counter()
    engine = build_engine(opts.engine, opts.model, tokenizer, device=device, dtype=opts.dtype,
                          max_batch_size=opts.batch_size, trust_remote_code=opts.trust_remote_code, longest=longest)
    print(f"eval: loaded {opts.model} on {device} ({str(dtype).removeprefix('torch.')}, engine={opts.engine}) "
          f"in {time.perf_counter() - began:.1f} s", file=sys.stderr, flush=True)

    results, entries = [], {}
    n = opts.n or opts.k
    with RewardScorer(num_workers=opts.reward_workers, timeout_s=opts.reward_timeout_s) as scorer:
        for name, (task, examples, source) in data.items():
            max_new = opts.max_new_tokens or task.max_new_tokens
            print(f"eval: {name}: {len(examples)} problems x {n} sample(s), up to {max_new} new tokens",
                  file=sys.stderr, flush=True)
            result = evaluate(engine, tokenizer, examples, template=opts.template, instruction=opts.instruction,
                              max_new_tokens=max_new, k=opts.k,
                              n=n, temperature=opts.temperature, top_p=opts.top_p, seed=opts.seed, scorer=scorer,
                              task=name, batch_size=max(1, opts.batch_size // n), progress=_progress(name))
            settings = {"template": opts.template, "instruction": opts.instruction, "max_new_tokens": max_new, "k": opts.k, "n": n,
                        "temperature": result.temperature, "top_p": opts.top_p, "seed": opts.seed, "limit": opts.limit}
            entries[name] = task_entry(result, model=opts.model, engine=opts.engine, date=date, source=source,
                                       settings=settings, max_samples=opts.max_samples)
            results.append(result)
            # rewritten after every task: a crash or Ctrl-C in a later task keeps the finished ones
            path = write_json(out, results_document(opts, entries, date=date, device=device,
                                                    dtype=str(dtype).removeprefix("torch.")))
    print(table(results))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
