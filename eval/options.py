"""Command-line options of `python -m eval`: a typed schema, key=value parsing, validation.

The arguments are OmegaConf dotlist items checked against `EvalOptions` (so a typo or a wrong
type is caught), without Hydra: the evaluator has no config groups to compose. Every refusal is a
`ConfigError` that names the option and the fix; `run_main` prints it as one line, exit code 2.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from eval.tasks import TASKS
from grpo_fsdp.cli import UserError
from grpo_fsdp.config import ArithmeticConfig, ConfigError
from grpo_fsdp.data.templates import INSTRUCTION, TEMPLATES

ENGINES = ("auto", "hf", "vllm")  # as rollout.engine in training: auto = vLLM when it imports, else transformers


@dataclass
class EvalOptions:
    model: str = ""  # saved model directory (e.g. <run_dir>/hf) or hub id; required
    tasks: list[str] = field(default_factory=lambda: ["gsm8k", "math500"])
    limit: int = 0  # first N problems of each task (0: all)
    max_new_tokens: int = 0  # generation budget (0: each task's default, see eval/tasks.py)
    k: int = 1  # pass@k / maj@k when > 1
    n: int = 0  # samples per problem (0: k)
    temperature: float | None = None  # None: greedy when n == 1, else 1.0
    top_p: float = 1.0
    seed: int = 0
    template: str = "auto"  # auto | chat | plain, as model.template in training
    instruction: str = INSTRUCTION  # appended to each question, as data.instruction in training
    data_dir: str = ""  # local data sets (gsm8k/test.jsonl, math/test.jsonl, math/math500.jsonl); "" = hub
    out: str = ""  # results JSON path ("": outputs/eval/<model>-<time>.json)
    engine: str = "hf"  # hf | vllm | auto (vLLM when it imports and can serve the model)
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16
    batch_size: int = 64  # sequences decoded together
    reward_workers: int = 1
    reward_timeout_s: float = 5.0
    max_samples: int = 100  # rows of the samples table kept per task in the JSON (-1: all)
    trust_remote_code: bool = False
    arithmetic: ArithmeticConfig = field(default_factory=ArithmeticConfig)  # the synthetic task's settings


USAGE = """usage: python -m eval model=<dir or hub id> [tasks=[gsm8k,math500]] [limit=N] [k=1] [key=value ...]
options: """


def usage() -> str:
    return USAGE + " ".join(f"{k}=" for k in EvalOptions.__dataclass_fields__) + "  (see eval/options.py)"


def _dotlist(argv: list[str]) -> list[str]:
    items = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or not key.strip():
            raise ConfigError("arguments", f"{arg!r} is not key=value",
                              "write options as key=value, e.g. python -m eval model=outputs/run/hf tasks=[gsm8k]")
        if key == "tasks" and not value.strip().startswith("["):
            value = f"[{value}]"  # tasks=gsm8k means tasks=[gsm8k]
        if value == "":  # instruction='' reaches us as "instruction=": an empty string, as Hydra reads it, not null
            value = "''"
        items.append(f"{key}={value}")
    return items


def parse_options(argv: list[str]) -> EvalOptions:
    """EvalOptions from key=value arguments, validated; ConfigError on the first problem."""
    try:
        node = OmegaConf.merge(OmegaConf.structured(EvalOptions), OmegaConf.from_dotlist(_dotlist(argv)))
        opts = OmegaConf.to_object(node)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or "arguments"
        raise ConfigError(key, str(e).splitlines()[0], "check the option's name and type (python -m eval --help)") from None
    assert isinstance(opts, EvalOptions)
    validate(opts)
    return opts


def _at_least(name: str, value: float, low: float) -> None:
    if value < low:
        raise ConfigError(name, f"must be >= {low}, got {value}", f"set {name}=<a number >= {low}>")


def check_model(model: str) -> None:
    """Refuse an empty model and a local-looking path that is not a directory (a hub id is checked on load)."""
    if not model:
        raise ConfigError("model", "is required", "pass model=<saved model directory or hub id>")
    # A hub id is "name" or "org/name"; anything else is a path and must exist.
    path = os.path.expanduser(model)
    if (model.startswith(("/", ".", "~")) or model.count("/") > 1 or os.path.exists(path)) and not os.path.isdir(path):
        raise UserError(f"model={model!r}: no such directory; point it at a saved model (e.g. <run_dir>/hf) or a hub id")


def validate(o: EvalOptions) -> None:
    """Every check that needs no model or data: the first problem found is raised."""
    check_model(o.model)
    if not o.tasks:
        raise ConfigError("tasks", "is empty", f"name at least one of {', '.join(TASKS)}")
    for task in o.tasks:
        if task not in TASKS:
            raise ConfigError("tasks", f"unknown task {task!r}", f"choose from {', '.join(TASKS)}")
    for choice, value, allowed in (("engine", o.engine, ENGINES), ("template", o.template, TEMPLATES)):
        if value not in allowed:
            raise ConfigError(choice, f"unknown value {value!r}", f"choose one of {', '.join(allowed)}")
    for name, low in (("limit", 0), ("max_new_tokens", 0), ("k", 1), ("n", 0), ("batch_size", 1), ("reward_workers", 1)):
        _at_least(name, getattr(o, name), low)
    if o.n and o.n < o.k:
        raise ConfigError("n", f"{o.n} samples cannot give pass@{o.k}", f"set n >= k (n={o.k}) or leave n=0")
    if o.temperature is not None and o.temperature < 0:
        raise ConfigError("temperature", f"must be >= 0, got {o.temperature}", "use 0 for greedy decoding")
    if max(o.n, o.k) > 1 and o.temperature == 0:
        raise ConfigError("temperature", f"0 (greedy) makes all {max(o.n, o.k)} samples identical",
                          "set temperature>0 (e.g. 0.6 or 1.0) for pass@k / maj@k")
    if not 0 < o.top_p <= 1:
        raise ConfigError("top_p", f"{o.top_p} is outside (0, 1]", "use 1.0 for no nucleus truncation")
    if o.reward_timeout_s <= 0:
        raise ConfigError("reward_timeout_s", f"must be positive, got {o.reward_timeout_s}", "e.g. reward_timeout_s=5")
