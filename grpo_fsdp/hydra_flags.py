"""Hydra's own command-line flags, on top of the compose API that `cli.py` uses instead of `@hydra.main`:

    python -m grpo_fsdp.train --help [overrides]        groups and their options, every field with its value
    python -m grpo_fsdp.train --cfg job [overrides]     the composed config as YAML (secrets redacted), exit 0
    python -m grpo_fsdp.train -m optim.lr=1e-5,3e-5     a sweep: each combination in turn, each its own run_dir

Sweeps are expanded by Hydra's own override parser, as Hydra's basic sweeper does: comma lists,
`range(a,b)`, `choice(...)` and `glob(...)` over a group's options; the cartesian product of all swept
keys, the last key varying fastest. Every job is composed and validated before the first one starts,
so a bad value ends the sweep before hours are spent on the others. The jobs run one after another
in this process (there is no launcher plugin), each in `<run_dir>/<n>`, where run_dir defaults to
`outputs/multirun-<time>`; a job that fails or is preempted (SIGTERM: it saves and exits 0) ends the
sweep and says which jobs did not run. Under torchrun a sweep is refused: one torchrun per job.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import itertools
import os
import sys
import tempfile
import tokenize
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

from grpo_fsdp import config as config_module
from grpo_fsdp.cli import GROUPS, compose, group_options, redacted_yaml
from grpo_fsdp.config import Config, ConfigError

FLAGS = "--help, --cfg job, -m/--multirun"
PREEMPT_MARKER_ENV = "GRPO_FSDP_PREEMPT_MARKER"  # preemption.MARKER_ENV: rank 0 writes it after a clean SIGTERM save


@dataclasses.dataclass
class Flags:
    help: bool = False
    cfg: str | None = None
    multirun: bool = False
    overrides: list[str] = dataclasses.field(default_factory=list)


def parse_flags(argv: Sequence[str]) -> Flags:
    """Split Hydra-style flags from key=value overrides (an unknown flag is a one-line error)."""
    flags, args = Flags(), list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("--help", "-h"):
            flags.help = True
        elif arg in ("--multirun", "-m"):
            flags.multirun = True
        elif arg in ("--cfg", "-c") or arg.startswith("--cfg="):
            value = arg.partition("=")[2] or (args.pop(0) if args else "")
            if value not in ("job", "all"):
                raise ConfigError("--cfg", f"{value or 'no value'}: only the job config exists here (Hydra's own config is not used)",
                                  "use --cfg job")
            flags.cfg = "job"
        elif arg == "--resolve":  # Hydra's --cfg job --resolve: our config is always printed resolved
            continue
        elif arg.startswith("-") and "=" not in arg:
            raise ConfigError("overrides", f"unknown flag {arg!r}", f"the flags are {FLAGS}; everything else is key=value")
        else:
            flags.overrides.append(arg)
    return flags


def _on_main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


def dispatch(argv: Sequence[str], main: Callable[[list[str]], int | None]) -> int | None:
    """Handle the flags in `argv`; None when there are none (the caller trains with `argv` as overrides)."""
    flags = parse_flags(argv)
    if flags.help:
        if _on_main_rank():
            print(help_text(compose(flags.overrides)))
        return 0
    if flags.cfg:
        if _on_main_rank():
            print(redacted_yaml(compose(flags.overrides)), end="")
        return 0
    if flags.multirun:
        return multirun(flags.overrides, main)
    return None


# ------------------------------------------------------------------------------------------------
# --help
# ------------------------------------------------------------------------------------------------


def field_comments() -> dict[tuple[str, str], str]:
    """(dataclass name, field name) -> the `# comment` on its line in config.py: the schema's own docs."""
    source = inspect.getsource(config_module)
    comments = {tok.start[0]: tok.string.lstrip("# ").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    found = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name) and item.lineno in comments:
                    found[(node.name, item.target.id)] = comments[item.lineno]
    return found


def _field_lines(obj, prefix: str, comments: dict[tuple[str, str], str]) -> list[str]:
    lines = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            lines += _field_lines(value, f"{prefix}{f.name}.", comments)
            continue
        text = f"  {prefix}{f.name}={value!r}" if isinstance(value, str) else f"  {prefix}{f.name}={value}"
        note = comments.get((type(obj).__name__, f.name))
        lines.append(f"{text:<46} # {note}" if note else text)
    return lines


def help_text(cfg: Config) -> str:
    """What --help prints: usage, the groups with their options, then every field with its current value."""
    chosen = {"hardware": cfg.hardware.name, "model": cfg.model.name, "data": cfg.data.name, "algo": cfg.algo.name}
    groups = [f"  {g:<11} {', '.join(group_options(g))}" + (f"   (now: {chosen[g]})" if g in chosen else "")
              for g in GROUPS]
    comments = field_comments()
    sections = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            sections += [f"{f.name}:", *_field_lines(value, f"{f.name}.", comments)]
        else:
            sections.append(f"  {f.name}={value!r}" if isinstance(value, str) else f"  {f.name}={value}")
    return "\n".join([
        "grpo_fsdp.train: GRPO and SFT post-training on FSDP2 (README.md; conf/ holds the groups).",
        "",
        "usage: python -m grpo_fsdp.train [group=option ...] [key=value ...]",
        "       torchrun --nproc_per_node=N -m grpo_fsdp.train ...",
        "       python -m grpo_fsdp.train --cfg job [overrides]   print the composed config",
        "       python -m grpo_fsdp.train -m key=a,b [overrides]  sweep: one run per combination, in turn",
        "       python -m grpo_fsdp.train --help [overrides]      this text, for the config the overrides compose",
        "",
        "config groups (group=option):",
        *groups,
        "",
        "fields (key=value sets any of them; values below are those of this composition):",
        *sections,
    ])


# ------------------------------------------------------------------------------------------------
# --multirun
# ------------------------------------------------------------------------------------------------


def expand_sweeps(overrides: Sequence[str]) -> list[list[str]]:
    """One override list per job: the cartesian product of every swept key (Hydra's basic sweeper order)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Glob
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as e:
        raise ConfigError("overrides", str(e).splitlines()[0], "check the sweep syntax: -m key=a,b or key=range(1,4)") from None
    choices = []
    for o in parsed:
        key = o.get_key_element()
        value = o.value()
        if isinstance(value, Glob):
            if o.key_or_group not in GROUPS:
                raise ConfigError(o.key_or_group, "glob() sweeps only a config group's options", "list the values: key=a,b")
            choices.append([f"{key}={name}" for name in value.filter(group_options(o.key_or_group))])
        elif o.is_sweep_override():
            if not o.is_discrete_sweep():
                raise ConfigError(o.key_or_group, f"{o.input_line!r} is not a list of values (interval sweeps need an "
                                  "optimizer plugin)", "sweep a list: key=a,b or key=range(1,4)")
            choices.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            choices.append([o.input_line])
    return [list(job) for job in itertools.product(*choices)]


def _with_run_dirs(jobs: list[list[str]]) -> tuple[list[list[str]], str]:
    """Give job n the run_dir <base>/<n>; base is the user's run_dir or outputs/multirun-<time>."""
    def key(item: str) -> str:
        return item.lstrip("+~").partition("=")[0]

    given = {item.partition("=")[2] for job in jobs for item in job if key(item) == "run_dir"}
    if len(given) > 1:  # run_dir itself is swept: each job already has its own
        return jobs, "the swept run_dir values"
    base = given.pop() if given else os.path.join("outputs", f"multirun-{datetime.now():%Y%m%d-%H%M%S}")
    return [[*(i for i in job if key(i) != "run_dir"), f"run_dir={os.path.join(base, str(n))}"]
            for n, job in enumerate(jobs)], base


def _check_job(job: list[str], n: int, total: int) -> None:
    """Compose and validate one job as `main` would (world size 1: a sweep never runs under torchrun)."""
    import torch

    from grpo_fsdp.validation import validate

    try:
        cfg = compose(job)
        validate(cfg, cfg.hardware.nproc_per_node if cfg.dry_run else 1, torch.cuda.is_available())
    except ConfigError as e:
        raise ConfigError(e.field_name, f"{e.problem} (multirun job #{n} of {total}: {' '.join(job)})", e.fix) from None


def multirun(overrides: Sequence[str], main: Callable[[list[str]], int | None]) -> int:
    if "WORLD_SIZE" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ:
        raise ConfigError("--multirun", "a sweep runs its jobs one after another in one process, which torchrun "
                          "cannot do", "launch one torchrun per value, or run the sweep without torchrun")
    jobs, base = _with_run_dirs(expand_sweeps(overrides))
    for n, job in enumerate(jobs):
        _check_job(job, n, len(jobs))
    print(f"[multirun] {len(jobs)} jobs, run dirs under {base}", flush=True)
    for n, job in enumerate(jobs):
        print(f"[multirun] #{n}: {' '.join(job)}", flush=True)
        code, preempted = _run_job(job, main)
        rest = len(jobs) - n - 1
        left = ("it was the last job" if rest == 0 else f"#{n + 1} did not run" if rest == 1
                else f"#{n + 1}-#{len(jobs) - 1} did not run")
        if preempted:
            print(f"[multirun] #{n} was preempted (SIGTERM) and saved its checkpoint; {left}", flush=True)
            return 0
        if code:
            print(f"[multirun] #{n} exited with code {code}; {left}", file=sys.stderr, flush=True)
            return code
    print(f"[multirun] all {len(jobs)} jobs done", flush=True)
    return 0


def _run_job(job: list[str], main: Callable[[list[str]], int | None]) -> tuple[int, bool]:
    """Run one job; (exit code, whether it stopped on SIGTERM), told by the preemption marker it writes.
    sys.argv holds the job's own overrides meanwhile: the SIGTERM line's resume command is built from it."""
    outer, argv = os.environ.get(PREEMPT_MARKER_ENV), sys.argv
    with tempfile.TemporaryDirectory() as tmp:
        marker = Path(tmp) / "preempted"
        os.environ[PREEMPT_MARKER_ENV] = str(marker)
        sys.argv = [argv[0], *job]
        try:
            code = main(job) or 0  # a ConfigError / UserError ends the sweep with its one line (cli.run_main)
        finally:
            sys.argv = argv
            if outer is None:
                os.environ.pop(PREEMPT_MARKER_ENV, None)
            else:
                os.environ[PREEMPT_MARKER_ENV] = outer
        preempted = marker.exists()
        if preempted and outer:
            Path(outer).write_text(marker.read_text())
    return code, preempted
