"""What the side-by-side benchmarks (grpo_vs_trl.py, dpo_vs_trl.py) share: the start model both sides load, a child
process run with its tree's peak RSS and CPU polled (and the other load on the machine beside it), TRL's methods timed
from outside, the median run of several, and the package versions every result names."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MB = 1024 * 1024


def child_env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1",
            "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}


# ---------------------------------------------------------------------------------------------
# parent: run a child, poll its tree's RSS and CPU (and, for ours, metrics.jsonl line times)
# ---------------------------------------------------------------------------------------------
def _busy(ct) -> float:
    return ct.user + ct.system + getattr(ct, "nice", 0.0) + getattr(ct, "irq", 0.0) + getattr(ct, "softirq", 0.0)


def run_child(cmd: list[str], env: dict, log: Path, watch: Path | None = None, interval: float = 0.01) -> dict:
    import psutil

    me = psutil.Process()
    cpu0, mine0 = _busy(psutil.cpu_times()), sum(me.cpu_times()[:2])
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    root = psutil.Process(proc.pid)
    peak_tree = peak_main = 0
    cpu_by_pid: dict[int, float] = {}
    line_times: list[float] = []
    stop = threading.Event()

    def poll() -> None:  # cheap file checks every `interval`, the psutil walk every 5th tick
        nonlocal peak_tree, peak_main
        tick, size = 0, -1
        while not stop.is_set():
            now = time.perf_counter()
            if watch is not None:
                try:
                    st = watch.stat().st_size
                except OSError:
                    st = -1
                if st != size:
                    size = st
                    n = watch.read_bytes().count(b"\n") if st > 0 else 0
                    line_times.extend([now] * (n - len(line_times)))
            if tick % 5 == 0:
                try:
                    procs = [root, *root.children(recursive=True)]
                except psutil.Error:
                    procs = []
                total = 0
                for p in procs:
                    try:
                        rss = p.memory_info().rss
                        c = p.cpu_times()
                        cpu_by_pid[p.pid] = c.user + c.system
                    except psutil.Error:
                        continue
                    total += rss
                    if p.pid == root.pid:
                        peak_main = max(peak_main, rss)
                peak_tree = max(peak_tree, total)
            tick += 1
            stop.wait(interval)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    stop.set()
    th.join()
    wall = time.perf_counter() - t0
    sys_busy = _busy(psutil.cpu_times()) - cpu0 - (sum(me.cpu_times()[:2]) - mine0)  # not this poller either
    own = ru.ru_utime + ru.ru_stime  # the child plus the descendants it waited for
    own = max(own, sum(cpu_by_pid.values()))
    ncpu = psutil.cpu_count() or 1
    return {"rc": proc.returncode, "process_wall_s": wall, "peak_rss_tree_mb": peak_tree / MB, "peak_rss_main_polled_mb": peak_main / MB,
            "ru_maxrss_mb": ru.ru_maxrss / 1024, "cpu_s": own, "other_cpu_share": max(0.0, sys_busy - own) / (wall * ncpu),
            "line_times": line_times, "log": str(log)}


def tail(path: str, n: int = 30) -> str:
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])


def build_start_model(a: argparse.Namespace, work: Path) -> tuple[Path, dict]:
    """The HF directory both sides start from; see the module docstring."""
    if a.model_dir is not None:
        return a.model_dir, {"source": f"given: {a.model_dir}"}
    if a.vocab == "qwen2.5":
        return build_qwen_vocab_model(a, work)
    if a.sft_steps > 0:
        return sft_start_model(a, work, "tiny (conf/model/tiny.yaml)")
    import torch
    from transformers import AutoModelForCausalLM

    from grpo_fsdp.cli import compose
    from grpo_fsdp.models import hf_config
    from grpo_fsdp.tokenizer import build_tiny_tokenizer

    cfg = compose(["model=tiny"])
    tok = build_tiny_tokenizer()
    torch.manual_seed(a.seed)
    model = AutoModelForCausalLM.from_config(hf_config(cfg.model, tok, "sdpa"), dtype=torch.float32)
    out = work / "init"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out, {"source": "tiny (conf/model/tiny.yaml), random init"}


def save_random_qwen2(arch, tok, out: Path, seed: int, dtype, **conf) -> Path:
    """A Qwen2 model of `arch`'s layers (conf/model/*.yaml), seeded random weights in `dtype`, saved to `out` with
    `tok` (its eos / pad ids); `conf`: the Qwen2Config fields that differ between callers (vocabulary, positions, ties)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(
        hidden_size=arch.hidden_size, intermediate_size=arch.intermediate_size, num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads, num_key_value_heads=arch.num_kv_heads, rope_theta=arch.rope_theta,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **conf,
    )  # fmt: skip
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config, dtype=dtype).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def build_qwen_vocab_model(a: argparse.Namespace, work: Path) -> tuple[Path, dict]:
    """The tiny model's layers with Qwen2.5's tokenizer and a tied head: random init, then --sft-steps of our SFT."""
    import torch
    from transformers import AutoTokenizer

    from grpo_fsdp.cli import compose

    if not (a.tokenizer_dir / "tokenizer.json").exists():
        raise SystemExit(f"--vocab qwen2.5: no tokenizer.json in {a.tokenizer_dir}; pass --tokenizer-dir <dir>")
    tok = AutoTokenizer.from_pretrained(a.tokenizer_dir)
    arch = compose(["model=tiny"]).model.arch
    init = save_random_qwen2(arch, tok, work / "init-qwen2.5", a.seed, torch.float32, vocab_size=len(tok),
                             max_position_embeddings=arch.max_position_embeddings, tie_word_embeddings=True,
                             bos_token_id=None)
    source = (f"tiny layers (conf/model/tiny.yaml) with the Qwen2.5 tokenizer ({len(tok):,} tokens, {a.tokenizer_dir}) "
              "and tied embeddings, random init")
    if a.sft_steps == 0:
        return init, {"source": source, "vocab_size": len(tok)}
    out, info = sft_start_model(a, work, source + ",", f"model.path={init}")
    return out, {**info, "vocab_size": len(tok)}


def sft_start_model(a: argparse.Namespace, work: Path, source: str, *overrides: str) -> tuple[Path, dict]:
    """--sft-steps of our SFT on arithmetic into <work>/sft (the model `overrides` name, else the tiny one): its HF export."""
    run_dir = work / "sft"
    cmd = [sys.executable, "-m", "grpo_fsdp.train", f"run_dir={run_dir}", *overrides, f"train.max_steps={a.sft_steps}",
           f"train.seed={a.seed}", "logging.progress_bar=false"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, check=False, cwd=REPO, env=child_env(a.threads), capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"SFT of the start model failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return run_dir / "hf", {"source": f"{source} after {a.sft_steps} SFT steps on arithmetic",
                            "sft_final_loss": rows[-1]["train/loss"], "sft_seconds": time.perf_counter() - t0}


def timed(phase: dict[str, float], name: str, fn):
    """`fn` wrapped to add its wall seconds to phase[name] (TRL's methods, timed from outside)."""
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            phase[name] += time.perf_counter() - t
    return wrapper


def summarise(rs: list[dict]) -> dict:
    """The run with the median tokens/s (its every number), peak RSS as the max over runs, and the spread."""
    ok = [r for r in rs if "tokens_per_s" in r]
    if not ok:
        return rs[-1]
    ok.sort(key=lambda r: r["tokens_per_s"])
    med = dict(ok[(len(ok) - 1) // 2])
    med["tokens_per_s_runs"] = [r["tokens_per_s"] for r in rs if "tokens_per_s" in r]
    med["steady_tokens_per_s_runs"] = [r["steady_tokens_per_s"] for r in rs if "tokens_per_s" in r]
    med["steady_tokens_per_s"] = statistics.median(med["steady_tokens_per_s_runs"])
    for k in ("peak_rss_tree_mb", "ru_maxrss_mb", "other_cpu_share"):
        med[k] = max(r[k] for r in ok)
    med["failed_runs"] = len(rs) - len(ok)
    return med


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "trl", "accelerate", "datasets", "grpo-fsdp"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out
