"""Command-line plumbing shared by every entry point: Hydra composition and one-line errors.

We use Hydra's compose API rather than `@hydra.main` so that (a) a mistake anywhere, including an
unknown group option such as `hardware=h100x9`, ends in one line that names the field and the fix,
and (b) nothing is written to a Hydra output directory, which torchrun ranks would otherwise race
on (all ranks agree on the run directory through `distributed.agree_run_dir` instead).
"""

from __future__ import annotations

import atexit
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from omegaconf import OmegaConf

from grpo_fsdp.config import ALGO_SCHEMAS, Config, ConfigError, register_configs
from grpo_fsdp.redaction import redact

CONF_DIR = Path(os.environ.get("GRPO_FSDP_CONF", Path(__file__).resolve().parent.parent / "conf"))
GROUPS = ("hardware", "model", "data", "algo", "experiment")


class UserError(RuntimeError):
    """A problem the user can fix at run time (missing file, malformed data): one line, no traceback."""


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _unknown_option(overrides: Sequence[str]) -> ConfigError | None:
    for item in overrides:
        key, _, value = item.lstrip("+~").partition("=")
        if key in GROUPS and value and value != "null" and value not in group_options(key):
            return ConfigError(key, f"no such option {value!r}", f"choose one of {', '.join(group_options(key))}")
    return None


def _keys_outside_schema(node, prefix: str = "") -> list[str]:
    """Keys of a typed section that its dataclass lacks: only a `+key=value` override can add them (YAML
    keys are checked by Hydra), and `OmegaConf.to_object` would drop them without a word."""
    import dataclasses

    schema = OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(schema):
        return []
    fields = {f.name for f in dataclasses.fields(schema)}
    found = []
    for key in node:
        if key not in fields:
            found.append(f"{prefix}{key}")
        elif OmegaConf.is_dict(child := node._get_node(key)):
            found += _keys_outside_schema(child, f"{prefix}{key}.")
    return found


def _parse_hint(message: str) -> str:
    if "Ambiguous value" in message:  # an unquoted comma: a list or a sweep was meant
        return "write a list as key=[a,b], quote a string with commas as key='\"a,b\"', or sweep with -m key=a,b"
    return "check the override syntax: key=value, group=option (python -m grpo_fsdp.train --help lists both)"


def compose(overrides: Sequence[str] = ()) -> Config:
    """Compose conf/config.yaml with command-line overrides into a typed `Config`."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if err := _unknown_option(overrides):
        raise err
    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            node = hydra_compose(config_name="config", overrides=list(overrides))
        OmegaConf.resolve(node)
        if extra := _keys_outside_schema(node):
            section = extra[0].rpartition(".")[0]
            where = f"of {section}" if section else "at the top level"
            raise ConfigError(extra[0], f"is not a field {where}; a +key override cannot add fields to the schema",
                              "check the spelling (python -m grpo_fsdp.train --help lists the fields) and drop the +")
        algo = node.algo
        if OmegaConf.is_dict(algo) and algo.get("name") not in ALGO_SCHEMAS:
            raise ConfigError("algo", f"unknown algorithm {algo.get('name')!r}", f"choose one of {', '.join(ALGO_SCHEMAS)}")
        cfg = OmegaConf.to_object(node)
    except ConfigError:
        raise
    except OmegaConfBaseException as e:  # wrong type or unknown key, e.g. optim.lr=fast
        key = getattr(e, "full_key", "") or "config"
        msg = str(e).splitlines()[0]
        raise ConfigError(key, msg, "check the spelling and type of the override (see conf/ for the fields)") from None
    except HydraException as e:
        cause = e.__cause__
        if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", ""):
            fix = "check the field name in conf/ or grpo_fsdp/config.py" if "not in" in str(cause) else "give a value of the field's type"
            raise ConfigError(cause.full_key, str(cause).splitlines()[0], fix) from None
        raise ConfigError("overrides", str(e).splitlines()[0], _parse_hint(str(e))) from None
    assert isinstance(cfg, Config)
    return cfg


def redacted_yaml(cfg: Config) -> str:
    """The resolved config as YAML, secrets redacted (by field name and by value, redaction.py): what
    `<run_dir>/config.yaml` holds and what W&B receives as the run's config."""
    return OmegaConf.to_yaml(OmegaConf.create(redact(OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True))))


def run_main(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> None:
    """Run `main(overrides)`; user-caused errors end in one line on stderr and exit code 2.

    Under torchrun any rank may be the one that fails (rank 1 loads the evaluator's data): its line
    carries its rank, and a text that several ranks raise is printed once (`peers.report`). A
    collective that timed out or lost a peer ends in one line naming the rank that stopped answering,
    or in silence when that rank printed its own error (exit code 1). Teardown has already run in the
    recipe (`recipes/teardown.py`) when we get here."""
    from grpo_fsdp import peers

    args = list(sys.argv[1:] if argv is None else argv)
    try:
        code = main(args)
    except (ConfigError, UserError) as e:
        peers.publish_cause(str(e))
        if line := peers.report(str(e)):
            print(line, file=sys.stderr, flush=True)
        _exit(2)
    except Exception as e:
        if not peers.is_collective_failure(e):
            peers.publish_cause(f"{type(e).__name__}: {e}")  # a bug: its traceback follows, the peers stay quiet
            raise
        if line := peers.explain_collective_failure(e):
            print(line, file=sys.stderr, flush=True)
        _exit(1)
    _exit(code or 0)


def _exit(code: int) -> NoReturn:
    """End the process with `code`. A torchrun worker that started its process group runs the atexit handlers,
    flushes stdio and leaves without the interpreter's finalization: FSDP2 keeps the gloo process group referenced
    past `destroy_process_group`, so its threads (pt_gloo_runloop, gloo_tcp_loop) still run when the interpreter
    tears down, and tearing them down there aborted ~1 clean 2-process run in 4 to 28 on a loaded 2-core machine
    ("terminate called without an active exception", exit 134; also with the heartbeat thread turned off). Everything
    of ours is released by then (recipes/teardown.py); only module and C++ static teardown is skipped."""
    launched = sys.modules.get("grpo_fsdp.distributed")  # imported by every recipe before its group starts
    if launched is not None and launched.launched_group():
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
