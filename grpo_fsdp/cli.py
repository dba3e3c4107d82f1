"""Command-line plumbing shared by every entry point: Hydra composition and one-line errors.

We use Hydra's compose API rather than `@hydra.main` so that (a) a mistake anywhere, including an
unknown group option such as `hardware=h100x9`, ends in one line that names the field and the fix,
and (b) nothing is written to a Hydra output directory, which torchrun ranks would otherwise race
on (all ranks agree on the run directory through `distributed.agree_run_dir` instead).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from omegaconf import OmegaConf

from grpo_fsdp.config import ALGO_SCHEMAS, Config, ConfigError, register_configs

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
        raise ConfigError("overrides", str(e).splitlines()[0], "check the override syntax: key=value, or +key=value for a new key") from None
    assert isinstance(cfg, Config)
    return cfg


SECRET_WORDS = {"key", "apikey", "token", "secret", "password", "passwd"}


def _is_secret(name) -> bool:
    # whole words only: wandb_api_key and hf_token are secrets, tokenizer and keep_last are not
    return bool(SECRET_WORDS & set(str(name).lower().replace("-", "_").split("_")))


def redact(node):
    """Replace the value of any non-empty field whose name looks like a secret (api_key, hf_token...)."""
    if isinstance(node, dict):
        return {k: ("<redacted>" if v and _is_secret(k) else redact(v)) for k, v in node.items()}
    if isinstance(node, list):
        return [redact(v) for v in node]
    return node


def redacted_yaml(cfg: Config) -> str:
    """The resolved config as YAML, secrets redacted: what `<run_dir>/config.yaml` holds."""
    return OmegaConf.to_yaml(OmegaConf.create(redact(OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True))))


def run_main(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> None:
    """Run `main(overrides)`; user-caused errors end in one line on stderr and exit code 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        code = main(args)
    except (ConfigError, UserError) as e:
        rank = os.environ.get("RANK", "0")
        if rank == "0":
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    sys.exit(code or 0)
