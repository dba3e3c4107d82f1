"""Issue 11 items 9, 10, 13, 17: mistakes refused by `validate()` at start-up, each in one exact line."""

import pytest

from grpo_fsdp import preflight
from grpo_fsdp.cli import compose, run_main
from grpo_fsdp.config import ConfigError
from grpo_fsdp.plan import BatchPlan
from grpo_fsdp.train import dry_run, main
from grpo_fsdp.validation import validate


def refusal(overrides: list[str], world_size: int = 1, cuda: bool = False) -> str:
    with pytest.raises(ConfigError) as exc:
        validate(compose(overrides), world_size, cuda)
    return str(exc.value)


# --- item 9: accepted silently before -------------------------------------------------------------


def test_grpo_at_temperature_zero_is_refused():
    assert refusal(["algo=grpo", "algo.temperature=0"]) == (
        "algo.temperature: 0 (greedy) makes the 8 completions of a prompt identical: every advantage is 0 and "
        "nothing is learned; set algo.temperature > 0 (e.g. 1.0)")


def test_sft_checks_eval_tasks_too():
    assert refusal(["algo=sft", "eval.tasks=[nonexistent]"]) == (
        "eval.tasks: unknown value 'nonexistent'; choose one of gsm8k, math, math500, arithmetic")
    # SFT has no rollout engine and never evaluated: a valid task was silently ignored before
    assert refusal(["algo=sft", "eval.tasks=[gsm8k]"]) == (
        "eval.tasks: evaluation during training runs in the GRPO recipe only (it needs the rollout engine), not in "
        "algo=sft; leave eval.tasks empty and evaluate the export afterwards: python -m eval model=<run_dir>/hf tasks=[...]")


@pytest.mark.parametrize("override,key,where", [("+optim.lrr=1", "optim.lrr", "of optim"),
                                                ("++hardware.lora.foo=2", "hardware.lora.foo", "of hardware.lora"),
                                                ("+zzz=1", "zzz", "at the top level")])
def test_plus_cannot_add_a_key_to_the_schema(override, key, where):
    with pytest.raises(ConfigError) as exc:
        compose([override])
    assert str(exc.value) == (f"{key}: is not a field {where}; a +key override cannot add fields to the schema; check the "
                              "spelling (python -m grpo_fsdp.train --help lists the fields) and drop the +")


def test_parse_errors_no_longer_suggest_plus_key(capsys):
    with pytest.raises(SystemExit) as exc:
        run_main(main, ["optim.lr=1e-5,3e-5"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "error: overrides: Ambiguous value for argument 'optim.lr=1e-5,3e-5'; write a list as key=[a,b], quote a string "
        "with commas as key='\"a,b\"', or sweep with -m key=a,b")


# --- item 10: failing late before --------------------------------------------------------------------


@pytest.fixture
def no_wandb_login(tmp_path, monkeypatch):
    """A machine where nobody ran `wandb login`: no key, no netrc, no settings file, W&B online."""
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_BASE_URL", "https://api.wandb.ai")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_wandb_without_login_is_refused_up_front(no_wandb_login):
    pytest.importorskip("wandb")
    assert refusal(["logging.wandb=true"]) == (
        "logging.wandb: W&B is online but no credentials for https://api.wandb.ai were found (WANDB_API_KEY, ~/.netrc, "
        "wandb settings); run `wandb login` (or set WANDB_API_KEY), or WANDB_MODE=offline to log to files, or "
        "logging.wandb=false")


@pytest.mark.parametrize("way", ["offline", "disabled", "api_key", "netrc", "dry_run"])
def test_wandb_passes_with_credentials_or_offline(no_wandb_login, monkeypatch, way):
    pytest.importorskip("wandb")
    extra = []
    if way in ("offline", "disabled"):
        monkeypatch.setenv("WANDB_MODE", way)
    elif way == "api_key":
        monkeypatch.setenv("WANDB_API_KEY", "a" * 40)
    elif way == "netrc":
        netrc = no_wandb_login / "netrc"
        netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {'b' * 40}\n")
        netrc.chmod(0o600)
    else:
        extra = ["dry_run=true"]
    validate(compose(["logging.wandb=true", *extra]), 1, False)


@pytest.fixture
def small_host(monkeypatch):
    monkeypatch.setattr(preflight, "host_memory_gib", lambda: (10.0, 16.0))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)  # in-process vLLM tests leave LOCAL_WORLD_SIZE=1 behind


def test_vllm_kv_cache_larger_than_the_host_is_refused(small_host):
    assert refusal(["algo=grpo", "rollout.engine=vllm", "hardware.vllm_kv_cache_gib=64"], world_size=2) == (
        "hardware.vllm_kv_cache_gib: 64 GiB x 2 rank(s) of vLLM KV cache exceed the 10.0 GiB of host memory available "
        "(of 16.0 GiB); set hardware.vllm_kv_cache_gib <= 2.5 or use rollout.engine=hf")
    validate(compose(["algo=grpo", "rollout.engine=hf", "hardware.vllm_kv_cache_gib=64"]), 2, False)  # no vLLM: fine


def test_vllm_share_of_cpu_memory_beyond_what_is_free_is_refused(small_host):
    assert refusal(["algo=grpo", "rollout.engine=vllm", "hardware.vllm_kv_cache_gib=0", "hardware.vllm_memory_share=0.9"]) == (
        "hardware.vllm_memory_share: 0.9 of 16.0 GiB host memory x 1 rank(s) is more than the 10.0 GiB available (on CPU "
        "vLLM takes its share of host memory); set hardware.vllm_kv_cache_gib=1 (a fixed KV cache) or use rollout.engine=hf")


def test_vllm_kv_cache_smaller_than_one_sequence_is_refused(small_host):
    # tiny model: 4 layers x 2 KV heads x head_dim 32 x K and V x 4 bytes = 2 KiB per token, 512-token context
    assert refusal(["algo=grpo", "rollout.engine=vllm", "hardware.vllm_kv_cache_gib=0.0001"]) == (
        "hardware.vllm_kv_cache_gib: 0.0001 GiB cannot hold one 512-token sequence (0.000977 GiB of K/V at float32); "
        "set hardware.vllm_kv_cache_gib >= 0.01 or use rollout.engine=hf")


@pytest.mark.parametrize("lora", [[], ["hardware.lora.enabled=true", "hardware.load_in_4bit=true", "hardware.compile=false"]],
                         ids=["full", "qlora"])  # QLoRA: vLLM still holds the base in param_dtype (adapters on top)
def test_vllm_gpu_share_smaller_than_the_weights_is_refused(lora):
    assert refusal(["algo=grpo", "hardware=h100x2", "model=qwen2.5-math-1.5b", "rollout.engine=vllm",
                    "hardware.vllm_memory_share=0.02", "dry_run=true", *lora], world_size=2) == (
        "hardware.vllm_memory_share: 0.02 x 80 GiB = 1.6 GiB cannot hold the model's 2.9 GiB of bfloat16 weights plus "
        "one 4096-token sequence of KV cache (0.11 GiB); set hardware.vllm_memory_share >= 0.04 or use rollout.engine=hf")


def test_keep_last_zero_names_keep_last():
    assert refusal(["checkpoint.keep_last=0"]) == (
        "checkpoint.keep_last: must be >= 1, got 0 (the newest checkpoint is always kept); set checkpoint.keep_last=1 or more")


def test_short_run_says_the_warmup_default_is_in_the_way():
    assert refusal(["train.max_steps=3"]) == (
        "optim.warmup_steps: 5 (the default) warmup optimizer steps exceed the run's 3 optimizer steps "
        "(train.max_steps=3); set optim.warmup_steps=0..3, or raise train.max_steps to at least 5")


# --- item 17: step units ---------------------------------------------------------------------------------


def test_grpo_warmup_is_compared_in_optimizer_steps():
    # a rollout of 16 prompts x 8 = 128 completions in optimizer steps of 16: 8 optimizer steps per train step
    grpo = ["algo=grpo", "train.max_steps=1", "train.global_batch_size=16", "train.micro_batch_size=8"]
    validate(compose([*grpo, "optim.warmup_steps=5"]), 1, False)  # refused before: 5 > train.max_steps=1
    assert refusal([*grpo, "optim.warmup_steps=9"]) == (
        "optim.warmup_steps: 9 warmup optimizer steps exceed the run's 8 optimizer steps (train.max_steps=1 rollouts x "
        "8 optimizer steps each); set optim.warmup_steps=0..8, or raise train.max_steps to at least 2")


def test_start_up_table_states_the_step_units():
    rows = dict(BatchPlan.from_config(compose(["algo=grpo", "train.global_batch_size=16", "train.micro_batch_size=8"]), 1).rows())
    assert (rows["steps (train.max_steps)"], rows["optimizer steps in the run"]) == ("60 rollouts", "480 (warmup 5)")
    rows = dict(BatchPlan.from_config(compose(["algo=sft"]), 1).rows())
    assert (rows["steps (train.max_steps)"], rows["optimizer steps in the run"]) == ("60 optimizer steps", "60 (warmup 5)")


# --- item 13 (issue 14 since): what LoRA and the NF4 base cannot do, refused before anything starts --------------


def test_lora_and_4bit_refusals():
    assert refusal(["hardware.lora.enabled=true", "hardware.load_in_4bit=true"], world_size=3) == (
        "hardware.load_in_4bit: NF4 weights are cut into 8 equal row shards, which 3 ranks do not share evenly; use a "
        "world size dividing 8 (1, 2, 4 or 8), or hardware.load_in_4bit=false")
    assert refusal(["hardware.lora.enabled=true", "hardware.load_in_4bit=true", "hardware.compile=true"]).startswith(
        "hardware.compile: torch.compile over NF4 weights")
    assert refusal(["hardware.lora.enabled=true", "hardware.lora.dropout=1"]) == (
        "hardware.lora.dropout: 1.0 is outside [0, 1); use e.g. 0 or 0.05")
    assert refusal(["hardware.lora.enabled=true", "hardware.lora.target_modules=[q_proj,qkv]"]).startswith(
        "hardware.lora.target_modules: ['q_proj', 'qkv']: qkv is not a decoder linear; choose from q_proj, ")
    validate(compose(["hardware=gpu8gb"]), 1, cuda_available=True)  # the 8 GB profile now runs (planned and built)
    validate(compose(["hardware.lora.enabled=true", "hardware.load_in_4bit=true", "hardware.cpu_offload=true"]), 2, False)


def test_lora_and_4bit_can_still_be_planned():
    cfg = compose(["experiment=deepseek7b-direct-grpo", "dry_run=true"])
    validate(cfg, cfg.hardware.nproc_per_node, cuda_available=False)
    text = dry_run(cfg, cfg.hardware.nproc_per_node)
    assert "(trainable " in text and "offloaded to CPU per rank" in text


# --- issue 13: the fused LM head only where the loss is separable per token --------------------------------------


def test_fused_lm_head_refusals():
    assert refusal(["algo=grpo", "train.lm_head=fused", "algo.importance_level=sequence"]) == (
        "train.lm_head: fused needs a loss separable per token, not with algo.importance_level=sequence (a sequence "
        "ratio reads the whole completion); use train.lm_head=auto (fused where the loss allows) or blocked")
    assert refusal(["algo=grpo", "train.lm_head=fused", "algo.entropy_top_quantile=0.2"]).startswith(
        "train.lm_head: fused needs a loss separable per token, not with the entropy mask")
    assert refusal(["algo=sft", "train.lm_head=fused"]) == (
        "train.lm_head: fused applies GRPO's per-token loss gradient; algo=sft runs the blocked head; leave "
        "train.lm_head=auto")
    assert refusal(["algo=grpo", "train.lm_head=fast"]).startswith("train.lm_head: unknown value 'fast'")
    validate(compose(["algo=grpo", "train.lm_head=auto", "algo.importance_level=sequence"]), 1, False)  # auto: blocked
    validate(compose(["algo=grpo", "train.lm_head=fused"]), 1, False)  # the default loss is separable
