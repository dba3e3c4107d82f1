"""Start-up checks that look past the config at the machine: W&B credentials and the memory the
colocated vLLM engine is asked to take. `validation.validate()` calls them, so a run that would die
after the model, the engine and the reward workers are up (a W&B login prompt that cannot be
answered, a 65-line vLLM traceback after a 45 s compile) is refused in one line instead.

Both are best-effort and cheap: W&B's own settings resolution is used where it can be (so
`WANDB_MODE`, `wandb offline`, `WANDB_BASE_URL`, `~/.netrc` and the settings file count as they do
for `wandb.init`), and any surprise inside that machinery skips the check rather than refusing.
Memory is compared with what the host or the device profile offers, from config numbers alone
(the model is not loaded): a refusal means the setting cannot work, not that it might be tight.
A dry run skips what depends on this machine (credentials, free host memory), as it skips the CUDA
check: it may be planning a run elsewhere; the arithmetic of the profile (a KV cache too small for one
sequence, a GPU share too small for the weights) is checked in both.
"""

from __future__ import annotations

import importlib.util
import math
import os
import pathlib

from grpo_fsdp.config import Config, ConfigError
from grpo_fsdp.estimate import DTYPE_BYTES, GIB
from grpo_fsdp.param_count import param_count

# ------------------------------------------------------------------------------------------------
# W&B
# ------------------------------------------------------------------------------------------------


def _wandb_settings():
    """W&B's settings as `wandb.init` would resolve them (files, then environment), without starting
    its service process (`wandb.setup()` would). Mirrors wandb 0.31's `_WandbSetup._load_settings`."""
    import wandb

    settings = wandb.Settings()
    config_dir = os.environ.get("WANDB_CONFIG_DIR")
    base = pathlib.Path(config_dir).expanduser() if config_dir else pathlib.Path("~", ".config", "wandb").expanduser()
    settings.settings_system = str(base / "settings")
    settings.update_from_system_settings()
    settings.update_from_env_vars(dict(os.environ))
    settings.update_from_system_environment()
    return settings


def wandb_login_problem() -> str | None:
    """None when `wandb.init` will find credentials or need none (offline/disabled), else why not."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun") or os.environ.get("WANDB_API_KEY"):
        return None
    try:
        from wandb.sdk.lib import wbauth

        settings = _wandb_settings()
        if settings.mode in ("offline", "disabled", "dryrun") or settings.api_key or settings.identity_token_file:
            return None
        if os.environ.get("WANDB_IDENTITY_TOKEN_FILE") or wbauth.read_netrc_auth(host=settings.base_url):
            return None
        host = settings.base_url
    except Exception:  # noqa: BLE001  a different wandb, a malformed file: let wandb.init speak for itself
        return None
    return f"W&B is online but no credentials for {host} were found (WANDB_API_KEY, ~/.netrc, wandb settings)"


def check_wandb(cfg: Config) -> None:
    if not cfg.logging.wandb or cfg.dry_run:  # a dry run opens no W&B run (and may plan for another machine)
        return
    if (problem := wandb_login_problem()) is not None:
        raise ConfigError("logging.wandb", problem,
                          "run `wandb login` (or set WANDB_API_KEY), or WANDB_MODE=offline to log to files, "
                          "or logging.wandb=false")


# ------------------------------------------------------------------------------------------------
# vLLM memory
# ------------------------------------------------------------------------------------------------


def host_memory_gib() -> tuple[float, float]:
    """(available, total) host memory in GiB, from /proc/meminfo (sysconf elsewhere: total for both)."""
    try:
        fields = dict(line.split(":", 1) for line in pathlib.Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        kib = {k: int(v.split()[0]) for k, v in fields.items() if k in ("MemAvailable", "MemTotal")}
        return kib["MemAvailable"] / 2**20, kib["MemTotal"] / 2**20
    except (OSError, KeyError, ValueError):
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
        return total, total


def vllm_may_run(cfg: Config) -> bool:
    """rollout.engine=vllm, or auto where vLLM is installed (found, not imported: that takes seconds)."""
    engine = cfg.rollout.engine
    return engine == "vllm" or (engine == "auto" and importlib.util.find_spec("vllm") is not None)


def max_model_len(cfg: Config) -> int:
    """The engine's context, as `rollout.factory.engine_from_config` sets it (arch numbers stand in
    for the checkpoint's config.json)."""
    longest_new = max(cfg.algo.max_new_tokens, cfg.eval.max_new_tokens or (1024 if cfg.eval.tasks else 0))
    return min(cfg.model.arch.max_position_embeddings, max(4096, cfg.data.max_prompt_length + longest_new))


def kv_bytes_per_token(cfg: Config) -> int:
    """K and V of every layer for one token: 2 x layers x kv_heads x head_dim x dtype bytes."""
    a = cfg.model.arch
    return 2 * a.num_layers * a.num_kv_heads * (a.hidden_size // a.num_heads) * DTYPE_BYTES[cfg.hardware.param_dtype]


def check_vllm_memory(cfg: Config, world_size: int) -> None:
    """Refuse a KV cache or memory share vLLM cannot get: more than the host has (CPU), less than the
    weights (GPU share), or too small for one sequence of the engine's context."""
    hw = cfg.hardware
    if not vllm_may_run(cfg):  # with LoRA vLLM holds the base in param_dtype, plus one small adapter slot
        return
    fix_engine = "or use rollout.engine=hf"
    seq_len = max_model_len(cfg)
    one_seq_gib = kv_bytes_per_token(cfg) * seq_len / GIB
    kv = hw.vllm_kv_cache_gib
    if kv > 0 and kv < one_seq_gib:
        raise ConfigError("hardware.vllm_kv_cache_gib", f"{kv:g} GiB cannot hold one {seq_len}-token sequence "
                          f"({one_seq_gib:.3g} GiB of K/V at {hw.param_dtype})",
                          f"set hardware.vllm_kv_cache_gib >= {math.ceil(one_seq_gib * 100) / 100:g} {fix_engine}")
    if hw.device == "cpu":
        if cfg.dry_run:  # like the CUDA check: a dry run may plan for another machine than this one
            return
        # vLLM's CPU worker takes its KV cache (or its share of host memory) from what is free on the host.
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        available, total = host_memory_gib()
        if kv > 0 and kv * local > available:
            raise ConfigError("hardware.vllm_kv_cache_gib", f"{kv:g} GiB x {local} rank(s) of vLLM KV cache exceed the "
                              f"{available:.1f} GiB of host memory available (of {total:.1f} GiB)",
                              f"set hardware.vllm_kv_cache_gib <= {max(available / local / 2, 0.01):.2g} {fix_engine}")
        if kv == 0 and hw.vllm_memory_share * total * local > available:
            raise ConfigError("hardware.vllm_memory_share", f"{hw.vllm_memory_share:g} of {total:.1f} GiB host memory x "
                              f"{local} rank(s) is more than the {available:.1f} GiB available (on CPU vLLM takes its "
                              "share of host memory)", f"set hardware.vllm_kv_cache_gib=1 (a fixed KV cache) {fix_engine}")
        return
    if hw.gpu_memory_gib <= 0:  # a CUDA profile without a device size: nothing to compare with
        return
    weights_gib = param_count(cfg.model.arch) * DTYPE_BYTES[hw.param_dtype] / GIB
    share_gib = hw.vllm_memory_share * hw.gpu_memory_gib
    need = weights_gib + (kv if kv > 0 else one_seq_gib)
    if kv == 0 and share_gib < need:
        least = math.ceil(need / hw.gpu_memory_gib * 100) / 100
        raise ConfigError("hardware.vllm_memory_share", f"{hw.vllm_memory_share:g} x {hw.gpu_memory_gib:g} GiB = "
                          f"{share_gib:.1f} GiB cannot hold the model's {weights_gib:.1f} GiB of {hw.param_dtype} weights "
                          f"plus one {seq_len}-token sequence of KV cache ({one_seq_gib:.2f} GiB)",
                          f"set hardware.vllm_memory_share >= {least:g} {fix_engine}")
    if kv > 0 and weights_gib + kv > hw.gpu_memory_gib:
        raise ConfigError("hardware.vllm_kv_cache_gib", f"{kv:g} GiB plus the model's {weights_gib:.1f} GiB of weights "
                          f"exceed the {hw.gpu_memory_gib:g} GiB device (hardware.gpu_memory_gib)",
                          f"set hardware.vllm_kv_cache_gib < {hw.gpu_memory_gib - weights_gib:.0f} {fix_engine}")
