"""The evaluator: GSM8K / MATH / MATH-500 (and the synthetic arithmetic task) on any rollout engine.

    from eval import evaluate, load_task
    result = evaluate(engine, tokenizer, load_task("math500", data_dir="../shared/data"), max_new_tokens=1024)
    result.accuracy, result.per_level, result.metrics()   # -> {"eval/math500/accuracy": ...}

Modules: tasks.py (task registry -> examples), evaluate.py (generate, grade, summarise),
metrics.py (pass@k, maj@k, breakdowns: pure), engines.py (engine + tokenizer for a saved model),
options.py / report.py / __main__.py (`python -m eval model=<dir> tasks=[gsm8k,math500]`).
"""

from __future__ import annotations

import importlib

# Resolved on first use (PEP 562): `python -m eval` imports this package first, and argument errors
# and --help should not pay for importing torch and transformers.
_EXPORTS = {"EvalResult": "eval.evaluate", "evaluate": "eval.evaluate", "TASKS": "eval.tasks", "load_task": "eval.tasks",
            "build_engine": "eval.engines", "load_model_tokenizer": "eval.engines"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'eval' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
